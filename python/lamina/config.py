"""lamina.load_config: settings from a model.yml, LAMINA_* environment variables and arguments.

Precedence: defaults < model.yml < environment < explicit arguments. Every effective value
records where it came from ("default", "path:line", "env LAMINA_X", "argument"); keys lamina
does not know are reported with a suggestion, never silently used; settings that cannot take
effect with the others (a stale ngl with the GPU off, ...) raise lamina.InertSettingWarning,
each once per load, and cfg.explain() lists them. model.yml files written for Jan/Cortex work as
they are: their keys (ngl, ctx_len, cpu_threads, n_parallel, cache_type, files, and Jan's
llama.cpp keys batch_size, no_kv_offload, fit_target, ...) map to lamina's names in SETTINGS.
"""
from __future__ import annotations

import difflib
import json
import os
import random
import re
import reprlib
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import yaml

from . import _native
from .errors import ConfigWarning, InertSettingWarning
from .params import INT32_MAX, KV, KV_TYPES, UINT32_MAX, parse_ngl
from .sampling import Sampler
from .system import allowed_cpus, devices, gpu_absent_reason
from .threads import PRIORITIES, Threads

if TYPE_CHECKING:
    from .context import Context
    from .model import Model

_TRUE, _FALSE = ("1", "true", "yes", "on", "enabled"), ("0", "false", "no", "off", "disabled")
_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlevel = 60, 60, 3


def _short(v: Any) -> str:
    """repr() cut to a line: values can be huge (YAML aliases repeat a value without copying it)."""
    return _repr.repr(v)


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
        return v.strip().lower() in _TRUE
    raise ValueError(f"expected a boolean (true/false, on/off), got {_short(v)}")


def _int(v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str) and re.fullmatch(r"-?[0-9]+", v.strip()) or isinstance(v, float) and v.is_integer():
        return int(v)
    raise ValueError(f"expected an integer, got {_short(v)}")


def _float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got {_short(v)}")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {_short(v)}") from None
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError(f"expected a finite number, got {_short(v)}")
    return x


def _ranged(parse: Callable[[Any], Any], lo: float, hi: float | None = None, what: str = "") -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        x = parse(v)
        if x < lo or (hi is not None and x > hi):
            raise ValueError(f"expected {what or 'a value'} in [{lo}, {'inf' if hi is None else hi}], got {_short(v)}")
        return x
    return check


def _choice(*options: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if not isinstance(v, str) or v.strip().lower() not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {_short(v)}")
        return v.strip().lower()
    return check


def _flash(v: Any) -> bool | str:
    if isinstance(v, str) and v.strip().lower() == "auto":
        return "auto"
    return _bool(v)


def _path(v: Any) -> str:
    if isinstance(v, list):  # Jan/Cortex: files: [path, ...]
        if not v:
            raise ValueError("expected a path, got an empty list")
        v = v[0]
    if not isinstance(v, str) or not v:
        raise ValueError(f"expected a path, got {_short(v)}")
    return v


def _loras(v: Any) -> list[tuple[str, float]]:
    """LoRA adapters: a path, or a list of paths (scale 1) and {path: ..., scale: ...} mappings."""
    out: list[tuple[str, float]] = []
    for item in v if isinstance(v, list) else [v]:
        if isinstance(item, dict):
            extra = set(item) - {"path", "scale"}
            if extra or "path" not in item:
                raise ValueError(f"a LoRA entry takes path and scale, got {_short(item)}")
            path, scale = _path(item["path"]), _float(item.get("scale", 1.0))
        else:
            path, scale = _path(item), 1.0
        if any(p == path for p, _ in out):
            raise ValueError(f"{path!r} is listed twice")
        out.append((path, scale))
    return out


def _list(v: Any) -> list[Any]:
    """A YAML list, or a comma (or slash) separated string as llama.cpp's flags take it."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return [v]
    if isinstance(v, str):
        return [x.strip() for x in v.replace("/", ",").split(",") if x.strip()]
    if isinstance(v, list):
        return v
    raise ValueError(f"expected a list, got {_short(v)}")


def _cpus(v: Any) -> str | list[int]:
    if isinstance(v, list):
        return [_int(c) for c in v]
    if isinstance(v, (str, int)) and not isinstance(v, bool):
        return str(v)
    raise ValueError(f"expected a CPU list, range or mask, got {_short(v)}")


def _endpoints(v: Any) -> list[str]:
    """RPC servers: a list, or "host:port,host:port" (LAMINA_RPC)."""
    items = _list(v)
    if not all(isinstance(x, str) and x for x in items):
        raise ValueError(f"expected a list of 'host:port', got {_short(v)}")
    for x in items:
        host, sep, port = x.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected 'host:port', got {_short(x)}")
    return list(items)


def _devices(v: Any) -> list[int | str] | None:
    """GPU/remote devices by ggml name or index; "none" (llama.cpp's --device none): no device."""
    items = _list(v)
    if not items:  # Jan writes device: "" for "the default"
        return None
    if items == ["none"]:
        return []
    out: list[int | str] = []
    for x in items:
        if isinstance(x, int) and not isinstance(x, bool) or isinstance(x, str) and x.isdigit():
            out.append(int(x))
        elif isinstance(x, str) and x:
            out.append(x)
        else:
            raise ValueError(f"expected device names or indexes, got {_short(v)}")
    return out


def _overrides(v: Any) -> list[tuple[str, str]]:
    """Tensor placement overrides: llama.cpp's -ot "regex=buffer type,..." (Jan's
    override_tensor_buffer_t) or a list of [regex, device] pairs; the CPU buffer types go to "cpu"."""
    out = []
    for item in _list(v) if isinstance(v, str) else v if isinstance(v, list) else [None]:
        if isinstance(item, str) and "=" in item:
            pattern, _, target = item.rpartition("=")
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item):
            pattern, target = item
        else:
            raise ValueError(f"expected 'regex=device' items (or [regex, device] pairs), got {_short(v)}")
        if not pattern or not target:
            raise ValueError(f"expected 'regex=device' items, got {_short(item)}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        out.append((pattern, "cpu" if target.upper().startswith("CPU") else target))
    return out


def _logit_bias(v: Any) -> dict[int, float]:
    """{token: bias} or [[token, bias], ...] (the OpenAI and llama.cpp server forms)."""
    pairs = v.items() if isinstance(v, dict) else v if isinstance(v, list) else None
    out: dict[int, float] = {}
    try:
        for tok, bias in pairs or ():
            out[_int(tok)] = float("-inf") if bias is False else _float(bias)
    except (TypeError, ValueError):
        pairs = None
    if pairs is None:
        raise ValueError(f"expected {{token: bias}} or [[token, bias], ...], got {_short(v)}")
    return out


def _strings(v: Any) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"expected a list of strings, got {_short(v)}")
    return list(v)


def _inverse(v: Any) -> float:
    """llama.cpp's --rope-scale N is rope_freq_scale 1/N."""
    x = _float(v)
    if x <= 0:
        raise ValueError(f"expected a factor > 0, got {_short(v)}")
    return 1.0 / x


def _tensor_split(v: Any) -> list[float]:
    values = [_float(x) for x in _list(v)]
    if not values or any(x < 0 for x in values) or not any(values):
        raise ValueError(f"expected shares >= 0 per device, not all zero, got {_short(v)}")
    return values


def _mib_list(v: Any) -> int | list[int]:
    """fit_target: MiB, one for every device or one per device; in bytes."""
    values = [_ranged(_int, 0, what="MiB")(x) for x in _list(v)]
    if not values:
        raise ValueError(f"expected MiB per device, got {_short(v)}")
    return values[0] * 2**20 if len(values) == 1 else [x * 2**20 for x in values]


def _mirostat(v: Any) -> int:
    """0, 1 or 2; Cortex writes ``mirostat: false`` for off (and true for v1)."""
    n = int(v) if isinstance(v, bool) else _int(v)
    if n not in (0, 1, 2):
        raise ValueError(f"expected 0 (off), 1 or 2, got {_short(v)}")
    return n


def _int_or(special: dict[int, Any], lo: int, hi: int, expected: str) -> Callable[[Any], Any]:
    """An int in [lo, hi], or one of llama.cpp's special values, read as ``special`` maps them."""
    def check(v: Any) -> Any:
        n = _int(v)
        if n in special:
            return special[n]
        if not lo <= n <= hi:
            raise ValueError(f"expected {expected}, got {_short(v)}")
        return n
    return check


# a thread count; llama.cpp's -1 (and 0) mean its default: here the physical cores
_threads = _int_or({-1: None, 0: None}, 1, 4096, "a thread count in [1, 4096], or -1 for the default")
# llama.cpp's LLAMA_DEFAULT_SEED (-1, or UINT32_MAX): a random seed per run
_seed = _int_or({-1: None, UINT32_MAX: None}, 0, UINT32_MAX - 1, f"-1 (random) or an int in [0, {UINT32_MAX})")
# llama.cpp's n_predict -1 (no limit) and -2 (until the context is full)
_max_tokens = _int_or({-1: INT32_MAX, -2: INT32_MAX}, 0, INT32_MAX,
                      "-1 (no limit), -2 (to the end of the context) or an int >= 0")


def _stop(v: Any) -> list[str]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ValueError(f"expected a string or a list of strings, got {_short(v)}")
    return [s for s in items if s]


def _text(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {_short(v)}")
    return v


@dataclass(frozen=True)
class Spec:
    parse: Callable[[Any], Any]
    default: Any
    aliases: tuple[str, ...] = ()


_count = _ranged(_int, 1, INT32_MAX, "a count")
_CTX = _native.ContextParams()  # context defaults: one home, cpp/lamina.h
_SMP = Sampler()                # sampling defaults: one home, cpp/sampler.h (temperature: llama.cpp CLI's 0.8)
_prob = _ranged(_float, 0.0, 1.0, "a probability")
_nonneg = _ranged(_float, 0.0, None, "a number")

# lamina name -> how to read it, its default, and the keys other tools (Jan, Cortex, llama.cpp) use
SETTINGS: dict[str, Spec] = {
    # the model and where it goes
    "model": Spec(_path, None, ("model_path", "llama_model_path", "files", "path")),
    "gpu": Spec(_bool, True),
    "n_gpu_layers": Spec(parse_ngl, "auto", ("ngl", "gpu_layers")),
    "main_gpu": Spec(_ranged(_int, 0, INT32_MAX, "a device index"), 0),
    "split_mode": Spec(_choice("none", "layer", "row", "tensor"), "layer", ("sm",)),
    "tensor_split": Spec(_tensor_split, None, ("ts",)),
    "devices": Spec(_devices, None, ("device", "dev")),
    "rpc": Spec(_endpoints, None, ("rpc_servers",)),
    "tensor_overrides": Spec(_overrides, None, ("override_tensor", "override_tensor_buffer_t", "ot")),
    "cpu_moe": Spec(_bool, False),
    "n_cpu_moe": Spec(_ranged(_int, 0, INT32_MAX, "layers"), 0),
    "fit": Spec(_bool, True),
    "fit_target": Spec(_mib_list, 1024 * 2**20),
    "fit_ctx": Spec(_ranged(_int, 0, INT32_MAX, "tokens"), 4096),
    "use_mmap": Spec(_bool, True, ("mmap",)),
    "use_mlock": Spec(_bool, False, ("mlock",)),
    "lora": Spec(_loras, None, ("lora_adapters",)),
    # the context
    "n_ctx": Spec(_ranged(_int, 0, UINT32_MAX, "tokens"), 4096, ("ctx_len", "context_length", "ctx_size")),
    "n_batch": Spec(_ranged(_int, 1, UINT32_MAX, "tokens"), _CTX.n_batch, ("batch_size",)),
    "n_ubatch": Spec(_ranged(_int, 1, UINT32_MAX, "tokens"), _CTX.n_ubatch, ("ubatch_size",)),
    "n_seq_max": Spec(_ranged(_int, 1, 256, "sequences"), _CTX.n_seq_max, ("n_parallel", "parallel")),
    "flash_attn": Spec(_flash, "auto", ("flash_attention",)),
    "type_k": Spec(_choice(*KV_TYPES), "f16", ("cache_type_k",)),
    "type_v": Spec(_choice(*KV_TYPES), "f16", ("cache_type_v",)),
    "kv_offload": Spec(_bool, True),
    "kv_unified": Spec(_bool, False),
    "swa_full": Spec(_bool, True),
    "rope_scaling": Spec(_choice("none", "linear", "yarn", "longrope"), None, ("rope_scaling_type",)),
    "rope_freq_base": Spec(_nonneg, 0.0),
    "rope_freq_scale": Spec(_nonneg, 0.0),
    # threads
    "threads": Spec(_threads, None, ("cpu_threads", "n_threads")),
    "threads_batch": Spec(_threads, None, ("n_threads_batch",)),
    "cpus": Spec(_cpus, None, ("cpu_mask",)),
    "cpu_strict": Spec(_bool, False),
    "priority": Spec(_choice(*PRIORITIES), "normal", ("prio",)),
    "poll": Spec(_ranged(_int, 0, 100, "a percentage"), None),
    # generation (defaults: llama.cpp's CLI)
    "max_tokens": Spec(_max_tokens, None, ("n_predict",)),
    "stop": Spec(_stop, None),
    "ignore_eos": Spec(_bool, False),
    "ctx_shift": Spec(_bool, False, ("context_shift",)),
    "chat_template": Spec(_text, None),
    "n_keep": Spec(_ranged(_int, 0, INT32_MAX, "tokens"), 0, ("keep",)),
    # sampling (defaults: llama.cpp's CLI; Sampler() itself defaults to greedy)
    "temperature": Spec(_nonneg, 0.8, ("temp",)),
    "top_k": Spec(_ranged(_int, 0, INT32_MAX, "a count"), _SMP.top_k),
    "top_p": Spec(_prob, _SMP.top_p),
    "min_p": Spec(_prob, _SMP.min_p),
    "typical_p": Spec(_prob, _SMP.typical_p, ("typ_p", "typical")),
    "top_n_sigma": Spec(_float, _SMP.top_n_sigma),
    "repeat_penalty": Spec(_ranged(_float, 1e-9, None, "a factor"), _SMP.repeat_penalty),
    "repeat_last_n": Spec(_ranged(_int, -1, INT32_MAX, "tokens"), _SMP.penalty_last_n, ("penalty_last_n",)),
    "frequency_penalty": Spec(_float, _SMP.frequency_penalty),
    "presence_penalty": Spec(_float, _SMP.presence_penalty),
    "dry_multiplier": Spec(_nonneg, _SMP.dry_multiplier),
    "dry_base": Spec(_ranged(_float, 1.0, None, "a base"), _SMP.dry_base),
    "dry_allowed_length": Spec(_ranged(_int, 0, INT32_MAX, "tokens"), _SMP.dry_allowed_length),
    "dry_penalty_last_n": Spec(_ranged(_int, -1, INT32_MAX, "tokens"), _SMP.dry_penalty_last_n),
    "dry_sequence_breakers": Spec(_strings, None),
    "xtc_probability": Spec(_prob, _SMP.xtc_probability),
    "xtc_threshold": Spec(_prob, _SMP.xtc_threshold),
    "dynatemp_range": Spec(_nonneg, _SMP.dynatemp_range),
    "dynatemp_exponent": Spec(_ranged(_float, 1e-9, None, "an exponent"), _SMP.dynatemp_exponent),
    "mirostat": Spec(_mirostat, _SMP.mirostat),
    "mirostat_tau": Spec(_ranged(_float, 1e-9, None, "a target entropy"), _SMP.mirostat_tau, ("mirostat_ent",)),
    "mirostat_eta": Spec(_ranged(_float, 1e-9, None, "a learning rate"), _SMP.mirostat_eta, ("mirostat_lr",)),
    "min_keep": Spec(_ranged(_int, 0, INT32_MAX, "a count"), _SMP.min_keep),
    "logit_bias": Spec(_logit_bias, None),
    "seed": Spec(_seed, None),
    "grammar": Spec(_text, None),
    "grammar_file": Spec(_path, None),
    "json_schema": Spec(lambda v: v if isinstance(v, dict) else json.loads(_text(v)), None),
    "json_schema_file": Spec(_path, None),
}
# model.yml keys that set two settings at once, booleans named the other way round, and llama.cpp
# options that take another form of a lamina setting
COMBINED = {"cache_type": ("type_k", "type_v")}
NEGATED = {"no_kv_offload": "kv_offload", "no_mmap": "use_mmap", "no_context_shift": "ctx_shift"}
TRANSFORMED: dict[str, tuple[str, Callable[[Any], Any]]] = {"rope_scale": ("rope_freq_scale", _inverse)}
# Jan's model.json keeps its settings in two mappings: their keys count as top-level keys
NESTED = ("settings", "parameters")
# keys that name the model file; with one of them present, `model:` is Cortex's model id, not a path
PATH_KEYS = ("files", "llama_model_path", "model_path", "path")
# keys of other tools that describe the model, or run the app or its server: they configure nothing here
IGNORED = {"id", "name", "version", "engine", "object", "owned_by", "created", "size", "stream", "prompt_template",
           "system_template", "user_template", "ai_template", "description", "tags", "model_type", "author",
           "os", "gpu_arch", "quantization_method", "metadata", "sources", "format", "jinja", "reasoning_budget",
           "auto_unload", "version_backend", "offload_mmproj", "system_prompt"}
# keys other tools act on that lamina does not: a warning says why, unless the value is the neutral one
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "mmproj": ((None, ""), "multimodal projectors are not supported by lamina yet"),
    "tfs_z": ((1, 1.0, None), "tail-free sampling was removed from llama.cpp"),
    "penalize_nl": ((False, None), "llama.cpp removed penalize_nl; the penalties apply to every token"),
    "n_probs": ((0, None), "token probabilities are a server response field; use ctx.logits"),
    "caching_enabled": ((True, None), "lamina always reuses the cached prompt prefix"),
    "embedding": ((False, None), "use Model.embed()"),
    "cont_batching": ((False, True, None), "continuous batching is not in lamina yet"),
    "defrag_thold": ((None, -1, -1.0), "llama.cpp no longer defragments the KV cache (the option is deprecated)"),
    "pooling": ((None, ""), "pooling applies to embeddings: Model.embed(pooling=...)"),
}
ENV_PREFIX = "LAMINA_"
PATH_SETTINGS = ("model", "grammar_file", "json_schema_file")
GRAMMARS = ("grammar", "grammar_file", "json_schema", "json_schema_file")  # one of them at most


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str  # "default", "path:line", "env LAMINA_X", "argument"


def _err(source: str, name: str, why: str) -> str:
    """An error message that starts with where the value came from: path:line, env X or argument."""
    return f"{name} ({source}): {why}" if source == "argument" or source.startswith("env ") else \
        f"{source}: {name}: {why}"


@dataclass(frozen=True)
class Config:
    """Effective settings with their sources (lamina.load_config)."""

    settings: dict[str, Setting]
    path: Path | None = None
    unknown: list[str] = field(default_factory=list)  # "path:line: unknown key 'x' (did you mean 'y'?)"
    ignored: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    gpu_off: str = ""  # why no layer can go to a device with these settings on this machine ("" if one can)
    _inert: dict[str, str] = field(default_factory=dict, repr=False)
    _replaced: dict[str, Setting] = field(default_factory=dict, repr=False)  # values an inert check changed

    def __getitem__(self, name: str) -> Any:
        return self.settings[name].value

    def source(self, name: str) -> str:
        return self.settings[name].source

    def is_set(self, name: str) -> bool:
        return self.settings[name].source != "default"

    def given(self, name: str) -> Any:
        """The value as given, before an inert check replaced it (threads above the CPUs, ...)."""
        return self._replaced.get(name, self.settings[name]).value

    def _replace(self, name: str, value: Any, note: str) -> None:
        self._replaced.setdefault(name, self.settings[name])
        self.settings[name] = Setting(value, f"{self.source(name)}, {note}")

    @property
    def inert(self) -> list[str]:
        """Settings that have no effect with the other values (or on this machine), and why."""
        return list(self._inert.values())

    def note_inert(self, name: str, why: str, stacklevel: int = 3) -> None:
        """Record ``name`` as inert and warn (InertSettingWarning), once per loaded config."""
        if name in self._inert:
            return
        msg = f"{name}={_short(self[name])} ({self.source(name)}) is inert: {why}"
        self._inert[name] = msg
        warnings.warn(msg, InertSettingWarning, stacklevel=stacklevel)

    # -- what the settings configure ---------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for lamina.Model (inert settings left out: they were reported)."""
        kw: dict[str, Any] = dict(gpu=self["gpu"], n_ctx=self["n_ctx"], kv=self.kv(), use_mmap=self["use_mmap"],
                                  use_mlock=self["use_mlock"], fit_ctx=self["fit_ctx"], fit_margin=self["fit_target"])
        ngl = self["n_gpu_layers"]
        if not self["fit"] and not self.is_set("n_gpu_layers") and not self.gpu_off:
            ngl = "all"  # llama.cpp without --fit: every layer on the GPU
        overrides = list(self["tensor_overrides"] or [])
        if self["cpu_moe"]:  # llama.cpp's --cpu-moe and --n-cpu-moe N: expert tensors stay on the CPU
            overrides.append((MOE_EXPERTS, "cpu"))
        overrides += [(rf"blk\.{i}{MOE_EXPERTS}", "cpu") for i in range(self["n_cpu_moe"] if not self["cpu_moe"] else 0)]
        placement = {"n_gpu_layers": ngl, "main_gpu": self["main_gpu"], "split_mode": self["split_mode"],
                     "tensor_split": self["tensor_split"], "devices": self["devices"], "rpc": self["rpc"],
                     "tensor_overrides": overrides or None}
        return {**kw, **{name: value for name, value in placement.items() if name not in self._inert}}

    def kv(self) -> KV:
        return KV(type_k=self["type_k"], type_v=self["type_v"], offload=self["kv_offload"],
                  unified=self["kv_unified"], swa_full=self["swa_full"])

    def threads(self) -> Threads:
        return Threads(n=self["threads"], batch=self["threads_batch"], cpus=self["cpus"], strict=self["cpu_strict"],
                       priority=self["priority"], poll=self["poll"])

    def context_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for lamina.Context / Model.context."""
        return dict(n_ctx=self["n_ctx"], n_batch=self["n_batch"], n_ubatch=self["n_ubatch"],
                    n_seq_max=self["n_seq_max"], threads=self.threads(), kv=self.kv(), flash_attn=self["flash_attn"],
                    rope_scaling=self["rope_scaling"], rope_freq_base=self["rope_freq_base"],
                    rope_freq_scale=self["rope_freq_scale"])

    def grammar(self) -> str | None:
        """The GBNF grammar from grammar, grammar_file, json_schema or json_schema_file (one of
        them); ValueError names the setting's source when the file or the schema is bad."""
        name = next((n for n in GRAMMARS if self[n] is not None), None)
        if name is None:
            return None
        try:
            if name == "grammar":
                return str(self[name])
            if name == "grammar_file":
                return Path(self[name]).read_text(encoding="utf-8")
            schema = self[name] if name == "json_schema" else json.loads(Path(self[name]).read_text(encoding="utf-8"))
            return str(_native.json_schema_to_grammar(json.dumps(schema)))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ValueError(_err(self.source(name), name, str(exc) or type(exc).__name__)) from None

    def sampler(self) -> Sampler:
        """A lamina.Sampler with the file's sampling settings (llama.cpp's CLI defaults for the
        rest: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05). seed -1 or unset: a random seed,
        drawn here (sampler.seed says which)."""
        # the Sampler fields that are settings of the same name and taken as they are
        kw: dict[str, Any] = {f.name: self[f.name] for f in fields(Sampler) if f.name in SETTINGS and f.name not in
                              ("dry_sequence_breakers", "logit_bias", "grammar", "json_schema", "seed")}
        if self["dry_sequence_breakers"] is not None:
            kw["dry_sequence_breakers"] = tuple(self["dry_sequence_breakers"])
        seed = self["seed"]
        return Sampler(**kw, penalty_last_n=self["repeat_last_n"], logit_bias=dict(self["logit_bias"] or {}),
                       grammar=self.grammar(), seed=random.randrange(UINT32_MAX) if seed is None else seed)

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for Context.generate/chat: sampler, stop, ignore_eos, context_full and
        n_keep, max_tokens when the file sets it, and template (for chat) when it names one."""
        kw: dict[str, Any] = dict(sampler=self.sampler(), stop=self["stop"] or (), ignore_eos=self["ignore_eos"],
                                  context_full="shift" if self["ctx_shift"] else "stop", n_keep=self["n_keep"])
        if self["max_tokens"] is not None:
            kw["max_tokens"] = self["max_tokens"]
        return kw

    # -- checks that need the model or a context --------------------------------------------
    def check_model(self, model: "Model") -> None:
        """Inert settings that depend on the loaded model (called by Model.from_config)."""
        ngl = self["n_gpu_layers"]
        if self.is_set("n_gpu_layers") and isinstance(ngl, int) and model.on_gpu and ngl > model.info.n_layer + 1:
            self.note_inert("n_gpu_layers", f"the model has {model.info.n_layer} layers (+1 output): "
                            f"{model.info.n_layer + 1} are offloaded", stacklevel=4)

    def check_context(self, ctx: "Context") -> None:
        """Inert settings that depend on a context (called when a context of a configured model opens)."""
        if self["ctx_shift"] and not ctx.kv.can_shift:
            self.note_inert("ctx_shift", f"{ctx.model.info.arch}'s KV cache cannot shift positions: a full "
                            "context ends the generation", stacklevel=5)

    # -- reports -------------------------------------------------------------------------
    def explain(self) -> str:
        """Every effective value with its source, then inert, unknown, unsupported and ignored keys."""
        lines = [f"config{f' from {self.path}' if self.path else ''} (defaults < model.yml < LAMINA_* env < arguments):"]
        width = max(len(n) for n in self.settings)
        for name, s in self.settings.items():
            value = "(random)" if name == "seed" and s.value is None else "(none)" if s.value is None else s.value
            text = value if isinstance(value, str) and name != "grammar" else _short(value)
            lines.append(f"  {name:{width}} {text:40} {s.source}")
        lines += [f"  {kind}: {x}" for kind, xs in (("inert", self.inert), ("unknown", self.unknown),
                                                    ("unsupported", self.unsupported)) for x in xs]
        if self.ignored:
            lines.append(f"  ignored (describe the model or the app, configure nothing here): {', '.join(self.ignored)}")
        return "\n".join(lines)

    __str__ = explain


MOE_EXPERTS = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"  # llama.cpp's LLM_FFN_EXPS_REGEX
MAX_VALUES = 100_000  # YAML aliases can repeat a value without copying it: refuse files that expand beyond this
MAX_REPORTED = 50     # unknown keys reported one by one (difflib per key); the rest are counted


def _expanded(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many values a node stands for once its aliases are expanded (shared nodes counted per use)."""
    key = id(node)
    if key not in memo:
        memo[key] = 1  # a recursive alias counts once
        children: list[yaml.Node] = []
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        memo[key] = 1 + sum(_expanded(c, memo) for c in children)
    return memo[key]


def _read_yaml(file: Path) -> list[tuple[str, Any, int]]:
    """The top-level (key, value, line) entries of a YAML mapping, from PyYAML's node marks, with
    Jan's settings:/parameters: mappings unfolded into it. Raises ValueError with path:line(:col)."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)  # checks the characters: a NUL byte raises here
        node = loader.get_single_node()
        if node is None:
            return []
        if not isinstance(node, yaml.MappingNode):
            raise ValueError(f"{file}:{node.start_mark.line + 1}: expected a mapping of settings (key: value), "
                             f"got {node.tag.rsplit(':', 1)[-1]}")
        size = _expanded(node, {})
        if size > MAX_VALUES:
            raise ValueError(f"{file}: expands to {size:,} values (YAML aliases); a model.yml holds far fewer")
        entries: list[tuple[str, Any, int]] = []
        pairs = [(k, v, False) for k, v in _pairs(loader, node)]
        while pairs:
            key_node, value_node, nested = pairs.pop(0)
            key = str(loader.construct_object(key_node, deep=True))
            if key in NESTED and not nested and isinstance(value_node, yaml.MappingNode):
                pairs = [(k, v, True) for k, v in _pairs(loader, value_node)] + pairs
                continue
            entries.append((key, loader.construct_object(value_node, deep=True), key_node.start_mark.line + 1))
        return entries
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else str(file)
        raise ValueError(f"{where}: not valid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:  # the reader's errors (a NUL byte, ...) carry their position in the text
        raise ValueError(f"{file}: not valid YAML: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _pairs(loader: yaml.SafeLoader, node: yaml.MappingNode) -> list[tuple[yaml.Node, yaml.Node]]:
    """The key/value nodes of a mapping with YAML merge keys (<<: *base) resolved: a key given
    in the mapping itself wins over a merged one."""
    own = {k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge"}
    ids = {id(k) for k, _ in node.value}
    loader.flatten_mapping(node)
    return [(k, v) for k, v in node.value if id(k) in ids or not (isinstance(k, yaml.ScalarNode) and k.value in own)]


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:
        close = [k for k in known if (len(key) > 3 and key in k) or (len(k) > 3 and k in key)][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


# LAMINA_* variables that are not settings (the build, the add-ons, the tests)
OTHER_VARIABLES = {"ADDONS", "CUDA_RUNTIME", "CPU_VARIANT", "REQUIRE_MODEL", "REQUIRE_TOOLS", "REQUIRE_PORTABLE",
                   "CACHE_DIR", "LLAMA_CPP_DIR", "LLAMA_CPP_ARCHIVE", "PORTABLE", "BUILD_TOOLS", "EXTRA_TOOLS",
                   "CCACHE", "SANITIZE", "STUBGEN", "WHEEL", "VULKAN_WHEEL", "ADDON"}


def _beside(file: Path, value: str, source: str, name: str) -> Path:
    """A path a config file names: relative to the file's folder; FileNotFoundError if it is not there."""
    p = Path(value).expanduser()
    p = p if p.is_absolute() else file.parent / p
    if not p.exists():
        raise FileNotFoundError(f"{source}: {name}: {value!r} does not exist"
                                + ("" if Path(value).is_absolute() else f" (looked in {file.parent})"))
    return p


def load_config(path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None,
                strict: bool = False, **overrides: Any) -> Config:
    """Settings from ``path`` (a model.yml), then LAMINA_* variables of ``env`` (default
    os.environ), then ``overrides`` (lamina names or model.yml keys). Bad values raise ValueError
    naming ``path:line`` (or the variable, or the argument); a model, grammar or schema file
    named relative to the model.yml is found next to it, and one that does not exist raises
    FileNotFoundError with ``path:line``. Unknown keys and LAMINA_* variables warn
    (lamina.ConfigWarning) with a suggestion; strict=True raises ValueError instead. Inert
    settings warn (lamina.InertSettingWarning), each once."""
    env = os.environ if env is None else env
    values: dict[str, Setting] = {name: Setting(spec.default, "default") for name, spec in SETTINGS.items()}
    aliases = {key: name for name, spec in SETTINGS.items() for key in (name, *spec.aliases)}
    # a model.yml key -> the setting it sets and how to read it (None: the setting's own parse)
    readers: dict[str, tuple[str, Callable[[Any], Any] | None]] = {
        **TRANSFORMED, **{k: (n, lambda v: not _bool(v)) for k, n in NEGATED.items()},
        **{k: (n, None) for k, n in aliases.items()}}
    known = sorted(set(readers) | set(COMBINED))

    def put(name: str, raw: Any, source: str, parse: Callable[[Any], Any] | None = None) -> None:
        try:
            value = None if raw is None else (parse or SETTINGS[name].parse)(raw)
        except (ValueError, TypeError) as exc:
            raise ValueError(_err(source, name, str(exc))) from None
        values[name] = Setting(value, source)

    unknown: list[str] = []
    ignored: list[str] = []
    unsupported: list[str] = []
    file = Path(path) if path is not None else None
    if file is not None:
        entries = _read_yaml(file)
        keys = {key for key, _, _ in entries}
        given: dict[str, tuple[str, int]] = {}  # setting -> the key and line that set it
        # a combined key first, so cache_type_k overrides cache_type's K wherever it stands
        for key, raw, line in sorted(entries, key=lambda e: e[0] not in COMBINED):
            source = f"{file}:{line}"
            if key == "model" and keys & set(PATH_KEYS):
                ignored.append("model")  # Cortex: the model's id; files: names the file
                continue
            if key in COMBINED:
                for name in COMBINED[key]:
                    put(name, raw, source)
                continue
            if key in IGNORED:
                ignored.append(key)
                continue
            if key in UNSUPPORTED:
                neutral, why = UNSUPPORTED[key]
                if not any(raw == n and type(raw) is type(n) for n in neutral):
                    unsupported.append(f"{source}: {key}: {why}")
                continue
            if key not in readers:
                unknown.append(f"{source}: unknown key {key!r}" +
                               (_suggest(key, known) if len(unknown) < MAX_REPORTED else ""))
                continue
            name, parse = readers[key]
            if name in given and given[name][0] not in COMBINED:
                prev, prev_line = given[name]
                raise ValueError(f"{source}: {key} sets {name}, which {prev} on line {prev_line} sets already")
            given[name] = (key, line)
            put(name, raw, source, parse)
        if len(unknown) > MAX_REPORTED:
            unknown[MAX_REPORTED:] = [f"{file}: {len(unknown) - MAX_REPORTED:,} more unknown keys"]
        for name in PATH_SETTINGS:  # relative to the file's folder, and there
            s = values[name]
            if s.value is not None and s.source != "default":
                values[name] = Setting(str(_beside(file, s.value, s.source, name)), s.source)
        if values["lora"].value and values["lora"].source != "default":
            s = values["lora"]
            resolved = [(str(_beside(file, p, s.source, "lora").resolve()), scale) for p, scale in s.value]
            if len({p for p, _ in resolved}) < len(resolved):
                raise ValueError(_err(s.source, "lora", "one adapter file is listed twice"))
            values["lora"] = Setting(resolved, s.source)
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX):
            continue
        name = var[len(ENV_PREFIX):].lower()
        if name in SETTINGS:
            put(name, env[var], f"env {var}")
        elif var[len(ENV_PREFIX):] not in OTHER_VARIABLES:
            close = [aliases[name]] if name in aliases else difflib.get_close_matches(name, list(SETTINGS), 1, 0.6)
            unknown.append(f"env {var}: not a lamina setting" +
                           (f" (did you mean {ENV_PREFIX}{close[0].upper()}?)" if close else ""))
    for key, raw in overrides.items():
        setting = aliases.get(key)
        if setting is None:
            raise TypeError(f"load_config() got an unknown setting {key!r}{_suggest(key, known)}")
        put(setting, raw, "argument")
    grammars = [n for n in GRAMMARS if values[n].value is not None]
    if len(grammars) > 1:
        raise ValueError(f"give one of grammar, grammar_file, json_schema, json_schema_file; got "
                         + ", ".join(f"{n} ({values[n].source})" for n in grammars))
    if strict and (unknown or unsupported):
        raise ValueError("; ".join(unknown + unsupported))
    for msg in unknown + unsupported:
        warnings.warn(msg, ConfigWarning, stacklevel=2)
    cfg = Config(settings=values, path=file, unknown=unknown, ignored=ignored, unsupported=unsupported,
                 gpu_off=_gpu_off(values))
    _check_inert(cfg)
    return cfg


def _gpu_off(values: dict[str, Setting]) -> str:
    if not values["gpu"].value:
        return f"gpu is off ({values['gpu'].source})"
    if values["devices"].value == []:
        return f"devices=none ({values['devices'].source}): no device is chosen"
    if values["rpc"].value:
        return ""  # the servers' devices take layers
    why = gpu_absent_reason()
    return f"no GPU: {why}" if why else ""


def _check_inert(cfg: Config) -> None:
    """Settings that cannot take effect with the others or on this machine (warned once each). A
    value equal to the default is never inert (Jan writes main_gpu: 0), nor is ngl: 0 (the very
    fix for a stale ngl)."""
    def set_to_other(name: str) -> bool:
        return cfg.is_set(name) and cfg[name] != SETTINGS[name].default

    why = cfg.gpu_off
    if why:
        for name in ("n_gpu_layers", "main_gpu", "tensor_split", "split_mode", "devices", "rpc"):
            if set_to_other(name) and not (name == "devices" and cfg[name] == []) and \
                    not (name == "n_gpu_layers" and cfg[name] == 0):
                cfg.note_inert(name, why, stacklevel=4)
        if set_to_other("kv_offload"):
            cfg.note_inert("kv_offload", f"{why}: the KV cache is in host memory anyway", stacklevel=4)
    elif set_to_other("main_gpu") and cfg["split_mode"] != "none" and not cfg["rpc"] and cfg["devices"] is None:
        gpus = [d for d in devices(memory=False) if d.kind in ("gpu", "igpu")]
        if len(gpus) == 1:
            cfg.note_inert("main_gpu", f"there is one GPU ({gpus[0].name})", stacklevel=4)
    cpus = len(allowed_cpus())
    for name in ("threads", "threads_batch"):
        if cfg.is_set(name) and cfg[name] is not None and cfg[name] > cpus:
            cfg.note_inert(name, f"this process may use {cpus} CPUs: more threads would share them and slow "
                           f"each other down; {cpus} are used", stacklevel=4)
            cfg._replace(name, cpus, f"inert above {cpus}")
    if cfg["flash_attn"] is False and KV(type_v=cfg["type_v"]).quantized_v:
        cfg.note_inert("type_v", "a quantized V cache needs flash attention (flash_attn is off, "
                       f"{cfg.source('flash_attn')}): the V cache stays f16", stacklevel=4)
        cfg._replace("type_v", "f16", "inert: f16")
    if set_to_other("n_keep") and not cfg["ctx_shift"]:
        cfg.note_inert("n_keep", "it applies when the context shifts (ctx_shift is off)", stacklevel=4)
