"""lamina.load_config: settings from a model.yml, LAMINA_* environment variables and arguments.

Precedence: defaults < model.yml < environment < explicit arguments. Every effective value
records where it came from; keys lamina does not know are reported, never silently used.
model.yml files written for Jan/Cortex work as they are: their keys (ngl, ctx_len,
cpu_threads, n_parallel, cache_type, files, ...) map to lamina's names below.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from .context import KV, KV_TYPES
from .threads import PRIORITIES, Threads


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return v.strip().lower() in ("1", "true", "yes", "on")
    raise ValueError(f"expected a boolean, got {v!r}")


def _int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError(f"expected an integer, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    raise ValueError(f"expected an integer, got {v!r}")


def _ngl(v: Any) -> int | str:
    if isinstance(v, str) and v.strip().lower() in ("all", "auto"):
        return v.strip().lower()
    n = _int(v)
    if n < 0:  # llama.cpp's -1 means every layer
        if n == -1:
            return "all"
        raise ValueError(f"expected an int >= 0, 'all' or 'auto', got {v!r}")
    return n


def _flash(v: Any) -> bool | str:
    if isinstance(v, str) and v.strip().lower() == "auto":
        return "auto"
    return _bool(v)


def _cache_type(v: Any) -> str:
    if v not in KV_TYPES:
        raise ValueError(f"expected one of {', '.join(KV_TYPES)}, got {v!r}")
    return str(v)


def _priority(v: Any) -> str:
    if v not in PRIORITIES:
        raise ValueError(f"expected one of {', '.join(PRIORITIES)}, got {v!r}")
    return str(v)


def _path(v: Any) -> str:
    if isinstance(v, list):  # Jan/Cortex: files: [path, ...]
        if not v:
            raise ValueError("files is empty")
        v = v[0]
    if not isinstance(v, str) or not v:
        raise ValueError(f"expected a path, got {v!r}")
    return v


def _cpus(v: Any) -> str | list[int]:
    if isinstance(v, list):
        return [_int(c) for c in v]
    if isinstance(v, (str, int)) and not isinstance(v, bool):
        return str(v)
    raise ValueError(f"expected a CPU list, range or mask, got {v!r}")


def _endpoints(v: Any) -> list[str]:
    """RPC servers: a list, or "host:port,host:port" (LAMINA_RPC)."""
    items = [x.strip() for x in v.split(",")] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(x, str) and x for x in items):
        raise ValueError(f"expected a list of 'host:port', got {v!r}")
    for x in items:
        host, sep, port = x.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected 'host:port', got {x!r}")
    return list(items)


# lamina name -> (parser, default, model.yml aliases)
SETTINGS: dict[str, tuple[Callable[[Any], Any], Any, tuple[str, ...]]] = {
    "model": (_path, None, ("model_path", "files", "path")),
    "gpu": (_bool, True, ()),
    "n_gpu_layers": (_ngl, "auto", ("ngl",)),
    "main_gpu": (_int, 0, ()),
    "n_ctx": (_int, 4096, ("ctx_len", "context_length")),
    "n_batch": (_int, 2048, ()),
    "n_ubatch": (_int, 512, ()),
    "n_seq_max": (_int, 1, ("n_parallel",)),
    "threads": (_int, None, ("cpu_threads", "n_threads")),
    "threads_batch": (_int, None, ()),
    "cpus": (_cpus, None, ("cpu_mask",)),
    "cpu_strict": (_bool, False, ()),
    "priority": (_priority, "normal", ("prio",)),
    "poll": (_int, 50, ()),
    "flash_attn": (_flash, "auto", ()),
    "type_k": (_cache_type, "f16", ("cache_type_k",)),
    "type_v": (_cache_type, "f16", ("cache_type_v",)),
    "kv_offload": (_bool, True, ()),
    "use_mmap": (_bool, True, ("mmap",)),
    "use_mlock": (_bool, False, ("mlock",)),
    "rpc": (_endpoints, None, ("rpc_servers",)),
}
# model.yml keys that set two settings at once
COMBINED = {"cache_type": ("type_k", "type_v")}
# model.yml keys of other tools that describe the model but configure nothing here
IGNORED = {"id", "name", "version", "engine", "object", "owned_by", "created", "size", "stream", "prompt_template",
           "system_template", "user_template", "ai_template", "description", "tags", "stop", "max_tokens",
           "temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty", "seed"}
ENV_PREFIX = "LAMINA_"


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str  # "default", "model.yml (path)", "env LAMINA_X", "argument"


@dataclass(frozen=True)
class Config:
    """Effective settings with their sources (lamina.load_config)."""

    settings: dict[str, Setting]
    path: Path | None = None
    unknown: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> Any:
        return self.settings[name].value

    def source(self, name: str) -> str:
        return self.settings[name].source

    @property
    def inert(self) -> list[str]:
        """Settings that have no effect with the other values, and why."""
        out = []
        if not self["gpu"]:
            for name in ("n_gpu_layers", "main_gpu", "kv_offload", "rpc"):
                if self.source(name) != "default":
                    out.append(f"{name}={self[name]!r} ({self.source(name)}) is inert: gpu is off "
                               f"({self.source('gpu')})")
        return out

    def model_kwargs(self) -> dict[str, Any]:
        return dict(gpu=self["gpu"], n_gpu_layers=self["n_gpu_layers"], main_gpu=self["main_gpu"],
                    n_ctx=self["n_ctx"], kv=self.kv(), use_mmap=self["use_mmap"], use_mlock=self["use_mlock"],
                    rpc=self["rpc"])

    def kv(self) -> KV:
        return KV(type_k=self["type_k"], type_v=self["type_v"], offload=self["kv_offload"])

    def threads(self) -> Threads:
        return Threads(n=self["threads"], batch=self["threads_batch"], cpus=self["cpus"], strict=self["cpu_strict"],
                       priority=self["priority"], poll=self["poll"])

    def context_kwargs(self) -> dict[str, Any]:
        return dict(n_ctx=self["n_ctx"], n_batch=self["n_batch"], n_ubatch=self["n_ubatch"],
                    n_seq_max=self["n_seq_max"], threads=self.threads(), kv=self.kv(), flash_attn=self["flash_attn"])

    def __str__(self) -> str:
        lines = [f"config{f' from {self.path}' if self.path else ''}:"]
        for name, s in self.settings.items():
            lines.append(f"  {name:14} {s.value!r:24} {s.source}")
        lines += [f"  inert: {r}" for r in self.inert]
        if self.ignored:
            lines.append(f"  ignored (not lamina settings): {', '.join(self.ignored)}")
        if self.unknown:
            lines.append(f"  unknown keys: {', '.join(self.unknown)}")
        return "\n".join(lines)


def _alias_table() -> dict[str, str]:
    table = {}
    for name, (_, _, aliases) in SETTINGS.items():
        table[name] = name
        for a in aliases:
            table[a] = name
    return table


def load_config(path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None,
                strict: bool = False, **overrides: Any) -> Config:
    """Settings from ``path`` (a model.yml), then LAMINA_* variables of ``env`` (default
    os.environ), then ``overrides`` (lamina names). Bad values raise ValueError naming the key and
    where it came from; unknown keys are listed in Config.unknown (strict=True: ValueError)."""
    env = os.environ if env is None else env
    values: dict[str, Setting] = {name: Setting(default, "default") for name, (_, default, _) in SETTINGS.items()}
    aliases = _alias_table()

    def put(name: str, raw: Any, source: str) -> None:
        parse = SETTINGS[name][0]
        try:
            value = None if raw is None else parse(raw)
        except ValueError as exc:
            raise ValueError(f"{name} ({source}): {exc}") from None
        values[name] = Setting(value, source)

    unknown: list[str] = []
    ignored: list[str] = []
    file = Path(path) if path is not None else None
    if file is not None:
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ValueError(f"{file}: not valid YAML: {exc}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{file}: expected a mapping of settings, got {type(data).__name__}")
        source = f"model.yml ({file})"
        for key, raw in data.items():
            key = str(key)
            if key in COMBINED:
                for name in COMBINED[key]:
                    put(name, raw, source)
            elif key in aliases:
                put(aliases[key], raw, source)
            elif key in IGNORED:
                ignored.append(key)
            else:
                unknown.append(key)
        model = values["model"]
        if model.value is not None and not Path(model.value).is_absolute():
            values["model"] = Setting(str(file.parent / model.value), model.source)  # relative to the file
    for name in SETTINGS:
        var = ENV_PREFIX + name.upper()
        if var in env:
            put(name, env[var], f"env {var}")
    for name, raw in overrides.items():
        if name not in SETTINGS:
            raise TypeError(f"load_config() got an unknown setting {name!r}; known: {', '.join(SETTINGS)}")
        put(name, raw, "argument")
    if strict and unknown:
        raise ValueError(f"{file}: unknown keys {unknown}")
    return Config(settings=values, path=file, unknown=unknown, ignored=ignored)
