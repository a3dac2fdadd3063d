"""lamina.Model: a loaded GGUF model, its metadata, tokenizer, and where its layers went."""
from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from . import _core, _native
from .context import Context
from .errors import InertSettingWarning
from .lora import Lora
from .memory import MiB, DeviceMemory, MemoryEstimate, Offload, estimate_from_native
from .models import default_model_path
from .params import KV, NGL, POOLING, check_count, check_int, context_settings, kv_tensor_error, parse_ngl
from .system import Device, gpu_absent_reason, rpc_connect
from .system import devices as list_devices
from .threads import Threads
from .tokenizer import ModelInfo, Vocabulary

if TYPE_CHECKING:
    from .config import Config

_SPLIT_MODES = {"none": 0, "layer": 1, "row": 2, "tensor": 3}


@dataclass(frozen=True)
class Ranked:
    """A document of Model.rerank: its index in ``documents`` and its relevance score."""

    index: int
    score: float


class Model(Vocabulary):
    """A GGUF model loaded by llama.cpp.

    Args:
        path: GGUF file; None loads the default model (Gemma 3 270M Q4_K_M package).
        gpu: False keeps everything on the CPU: weights, KV cache and op offload; any
            n_gpu_layers, tensor_split or device override given is then inert and ``offload`` says so.
        n_gpu_layers: layers on GPU devices: an int (clamped to n_layer + 1), "all", or "auto":
            the most layers that fit each device's free memory minus ``fit_margin`` (or within
            ``memory_limit``) together with a context of ``n_ctx`` tokens, computed by llama.cpp's
            common_fit_params without allocating.
        devices: GPU/remote devices to use, by name or ggml index (default: every local GPU, and the
            devices of the servers in ``rpc``).
        rpc: ggml RPC servers ("host:port") whose devices join this model (lamina.rpc_connect for
            each; start one with ``lamina rpc-server``). Remote devices are used only when named
            here or in ``devices``, never because another model connected them.
        split_mode: "layer" (whole layers per device), "tensor" (tensor parallelism: each matrix
            across the devices; needs flash attention), "row" (backends with split buffers only) or
            "none" (everything on ``main_gpu``). tensor_split: share per chosen device.
        tensor_overrides: [(regex, device)]: tensors whose name matches go to that device name or
            index, or "cpu" (e.g. ("ffn_.*_exps", "cpu") keeps MoE experts on the CPU).
        n_ctx, kv: the context you plan to use, for "auto" and for the per-device report; n_ctx=0
            lets "auto" pick the largest context (>= fit_ctx tokens) that fits.
        memory_limit: {device: bytes} the most "auto" may use on a device.
        fit_margin: bytes "auto" leaves free on each device (one value, or one per device);
            fit_ctx: the smallest context "auto" may choose when n_ctx=0 (llama.cpp's --fit-ctx).
        use_mmap, use_mlock: as llama.cpp.
        progress: called with a float in [0, 1] while loading; return False to cancel.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, gpu: bool = True, n_gpu_layers: NGL = "auto",
                 main_gpu: int = 0, split_mode: str = "layer", tensor_split: Sequence[float] | None = None,
                 devices: Sequence[int | str | Device] | None = None,
                 tensor_overrides: Sequence[tuple[str, int | str | Device]] | None = None, n_ctx: int = 4096,
                 kv: KV | None = None, memory_limit: Mapping[int | str | Device, int] | None = None,
                 fit_margin: int | Sequence[int] = 1024 * MiB, fit_ctx: int = 4096, use_mmap: bool = True,
                 use_mlock: bool = False, progress: Callable[[float], bool | None] | None = None,
                 rpc: Sequence[str] | None = None) -> None:
        self._native: _native.Model | None = None
        if path is None:
            path = default_model_path()
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        if split_mode not in _SPLIT_MODES:
            raise ValueError(f"split_mode must be one of {sorted(_SPLIT_MODES)}, got {split_mode!r}")
        n_gpu_layers = parse_ngl(n_gpu_layers)
        check_count("n_ctx", n_ctx, hi=None)
        margins_given = [fit_margin] if isinstance(fit_margin, int) else list(fit_margin)
        if not margins_given or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 0
                                        for m in margins_given):
            raise ValueError(f"fit_margin must be bytes >= 0 (one value, or one per device), got {fit_margin!r}")
        check_count("fit_ctx", fit_ctx, hi=None)
        self.path = Path(path)
        self.gpu_requested = gpu
        self.config: "Config | None" = None
        self.config_lora: dict[Lora, float] = {}  # the config's LoRA adapters: its contexts' default
        self.kv = kv or KV()

        # values llama.cpp would abort on (its memory fit below reads the file too): ModelFormatError
        _native.validate_gguf(os.fspath(self.path))
        if isinstance(rpc, str):
            raise TypeError("rpc is a list of 'host:port' strings: rpc=['host:50052']")
        remote = {d.index for ep in (rpc if gpu else None) or () for d in rpc_connect(ep)}
        plan = plan_placement(gpu=gpu, n_gpu_layers=n_gpu_layers, main_gpu=main_gpu, split_mode=split_mode,
                              tensor_split=tensor_split, devices=devices, tensor_overrides=tensor_overrides,
                              memory_limit=memory_limit, rpc=rpc, all_devices=list_devices(memory=False),
                              remote=remote)
        for message in plan.inert:
            warnings.warn(message, InertSettingWarning, stacklevel=2)
        self.n_ctx = n_ctx
        _core.sync_log_level()
        if plan.use_gpu and n_gpu_layers == "auto":
            self.n_ctx = self._auto_fit(plan, margins_given, fit_ctx)
        self._plan = plan
        self._placement = plan.native()
        # llama.cpp's load modes: -1 auto (mmap where it helps), 0 none, 2 mlock, 3 mmap+mlock
        load_mode = (3 if use_mlock else -1) if use_mmap else (2 if use_mlock else 0)
        self._native = _native.Model(os.fspath(self.path), self._placement, load_mode=load_mode, progress=progress)
        info = self._native.info()
        self.info = ModelInfo(**{k: info[k] for k in ModelInfo.__dataclass_fields__})
        if self.n_ctx == 0:
            self.n_ctx = self.info.n_ctx_train
        self._layers: list[tuple[int, str]] = list(self._native.layer_devices())  # (layer, device) as loaded
        self._offload: Offload | None = None  # made on first use: per device it needs a no-alloc estimate

    def _auto_fit(self, plan: "Plan", margins_given: list[int], fit_ctx: int) -> int:
        """n_gpu_layers="auto": llama.cpp's own no-alloc fit (common_fit_params) of layers (and, for
        n_ctx=0, the context) to each device's free memory minus its margin. Updates the plan;
        returns the n_ctx to use."""
        gpu_devices, n_ctx = plan.devices, self.n_ctx
        if self.kv.offload:  # llama.cpp's fit creates contexts too: a KV tensor a device cannot use aborts it
            self._refuse_kv_tensors(n_ctx, self.kv, [d.name for d in gpu_devices])
        if len(margins_given) not in (1, len(gpu_devices)):
            raise ValueError(f"fit_margin has {len(margins_given)} values for {len(gpu_devices)} devices")
        margins = [max(0, _native.device_memory(d.index)[0] - plan.limits[d.index]) if d.index in plan.limits
                   else margins_given[i if len(margins_given) > 1 else 0] for i, d in enumerate(gpu_devices)]
        settings = context_settings(n_ctx, 2048, 512, 1, self.kv, "auto", True)
        fit = _native.fit(os.fspath(self.path), plan.native(), settings, margins, fit_ctx if n_ctx == 0 else n_ctx)
        if fit["status"] != "fits":
            plan.ngl = 0
            plan.reasons.append(f"auto: llama.cpp's memory fit reports '{fit['status']}': nothing offloaded")
            return n_ctx
        plan.ngl = int(fit["n_gpu_layers"])
        if plan.ngl >= 0 and len(gpu_devices) > 1 and fit["tensor_split"]:
            plan.tensor_split = list(fit["tensor_split"])
        plan.overrides = [(str(p), int(d)) for p, d in fit["overrides"]]
        plan.reasons.append(f"auto: llama.cpp's memory fit chose n_gpu_layers={'all' if plan.ngl < 0 else plan.ngl}" +
                            (f" and n_ctx={fit['n_ctx']}" if n_ctx == 0 else "") +
                            f" (margins {', '.join(f'{m / MiB:.0f} MiB' for m in margins)})")
        if plan.overrides:  # a mixture of experts: experts in host memory first, then as many layers as fit
            plan.reasons.append(f"auto: a mixture of experts: {len(plan.overrides)} expert tensor pattern(s) kept in "
                                "host memory, as llama.cpp's --fit does")
        return int(fit["n_ctx"]) if n_ctx == 0 else n_ctx

    @property
    def output_on_gpu(self) -> bool:
        """Whether the output layer (the logits) was placed on a GPU device at load."""
        if not self.on_gpu or not self._layers:
            return False
        return not max(self._layers)[1].upper().startswith("CPU")

    @property
    def on_gpu(self) -> bool:
        """Whether anything of this model may go to a device (gpu on, and a device to use)."""
        return self._plan.use_gpu

    @property
    def offload(self) -> Offload:
        """Where the layers went, per device with the bytes of weights, KV and compute for a context
        of n_ctx tokens, and why (made on first use: the bytes come from a no-alloc estimate)."""
        if self._offload is None:
            self._offload = self._offload_report()
        return self._offload

    @offload.setter
    def offload(self, value: Offload) -> None:
        self._offload = value

    def _offload_report(self) -> Offload:
        plan, n_layer = self._plan, self.info.n_layer
        placed = Counter(dev for _layer, dev in self._layers)
        cpu_names = {d.name for d in list_devices(memory=False) if d.kind == "cpu"}
        reasons = list(plan.reasons)
        if isinstance(plan.n_gpu_layers, int) and plan.use_gpu and plan.n_gpu_layers > n_layer + 1:
            reasons.append(f"n_gpu_layers={plan.n_gpu_layers} clamped to {n_layer + 1} (n_layer + output)")
        per_device: list[DeviceMemory] = []
        if plan.use_gpu:
            for d in self.estimate_memory(self.n_ctx).devices:
                layers = sum(n for dev, n in placed.items() if dev in cpu_names) if d.device == "host" \
                    else placed.get(d.device, 0)
                per_device.append(DeviceMemory(d.device, d.model, d.context, d.compute, d.free, d.total, layers))
        return Offload(gpu=plan.use_gpu, layers_requested=plan.n_gpu_layers,
                       layers_effective=sum(n for dev, n in placed.items() if dev not in cpu_names), n_layer=n_layer,
                       devices=[d.name for d in plan.devices] if plan.use_gpu else [], reasons=reasons,
                       per_device=per_device, n_ctx=self.n_ctx)

    @classmethod
    def from_config(cls, config: "Config", **kwargs: Any) -> "Model":
        """Load the model a Config names, with its settings (kwargs override them). Settings the
        config makes inert (n_gpu_layers with gpu off, ...) are named, with their source, in
        ``offload.reasons``; contexts of this model default to the config's settings."""
        model = cls(config["model"], **{**config.model_kwargs(), **kwargs})
        model.config = config
        model.config_lora = {model.load_lora(p): scale for p, scale in config["lora"] or ()}
        config.check_model(model)
        if config.inert:
            model._plan.reasons.extend(r for r in config.inert if r not in model._plan.reasons)
            model._offload = None
        return model

    def estimate_memory(self, n_ctx: int | None = None, *, kv: KV | None = None, n_seq_max: int = 1,
                        n_batch: int = 2048, n_ubatch: int = 512,
                        flash_attn: bool | Literal["auto"] = "auto") -> MemoryEstimate:
        """Bytes per device (and host) that this model's weights and a context with these
        settings take, computed by llama.cpp's no-alloc load: nothing is allocated. n_ctx=0 is
        the model's training context."""
        n = self.n_ctx if n_ctx is None else n_ctx
        self.check_kv_tensors(n, kv or self.kv)
        settings = context_settings(n, n_batch, n_ubatch, n_seq_max, kv or self.kv, flash_attn, self._plan.use_gpu)
        rows = _native.memory_estimate(os.fspath(self.path), self._placement, settings)
        return estimate_from_native(n if n else self.info.n_ctx_train, rows)

    def check_kv_tensors(self, n_ctx: int, kv: KV) -> None:
        """Raise OutOfMemoryError when a device that holds layers cannot use one layer's K or V
        cache tensor for n_ctx positions (0: the training context). llama.cpp would allocate it
        and then abort the process (Vulkan devices limit one tensor to maxStorageBufferRange)."""
        if not kv.offload or not self._plan.use_gpu:
            return  # the cache stays in host memory
        cpu = {d.name for d in list_devices(memory=False) if d.kind == "cpu"}
        held = sorted({dev for layer, dev in self._layers if layer < self.info.n_layer and dev not in cpu})
        if held:
            self._refuse_kv_tensors(n_ctx or self.info.n_ctx_train, kv, held)

    def _refuse_kv_tensors(self, n_ctx: int, kv: KV, devices: list[str]) -> None:
        refused = _native.kv_tensor_refusals_file(os.fspath(self.path), n_ctx, _native.ggml_type_from_name(kv.type_k),
                                                  _native.ggml_type_from_name(kv.type_v), devices)
        if refused:
            raise kv_tensor_error(refused[0], n_ctx)

    # -- embeddings ----------------------------------------------------------------------
    def embed(self, texts: str | Sequence[str], *, normalize: bool = True,
              pooling: Literal["none", "mean", "cls", "last"] | None = None,
              threads: int | Threads | None = None) -> npt.NDArray[np.float32]:
        """Embeddings of ``texts``: array (n, n_embd), or (n_embd,) for one string.

        pooling: None uses the model's own (an embedding model's mean/cls/...); a generative
        model without one gives its last token's hidden state. normalize: L2-normalise rows.
        """
        single = isinstance(texts, str)
        items = [texts] if isinstance(texts, str) else list(texts)
        if not items or not all(isinstance(t, str) for t in items):
            raise TypeError("texts must be a string or a non-empty sequence of strings")
        out = self._pooled([self.tokenize(t) for t in items], pooling, threads)
        if normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True).astype(np.float32)
            out = (out / np.where(norms == 0, np.float32(1), norms)).astype(np.float32, copy=False)
        return out[0] if single else out

    def rerank(self, query: str, documents: Sequence[str], *, top_n: int | None = None,
               threads: int | Threads | None = None) -> list[Ranked]:
        """Documents ranked by relevance to ``query`` with a reranker (a model whose pooling is
        rank: a BERT-style cross-encoder or a Qwen3-reranker-style model), most relevant first:
        Ranked(index, score), the first ``top_n`` of them (None: all). Each pair is scored as
        llama-server's /v1/rerank scores it: the model's "rerank" template where it has one, else
        BOS query EOS SEP document EOS, and the score is the rank head's output."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        if isinstance(documents, str) or not all(isinstance(d, str) for d in documents):
            raise TypeError("documents must be a sequence of strings")
        if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 0):
            raise ValueError(f"top_n must be an int >= 0 or None, got {top_n!r}")
        pooling = self.metadata.get(f"{self.info.arch}.pooling_type")
        if pooling != str(POOLING["rank"]):
            raise ValueError(f"{self.info.name or self.path.name} is not a reranker (its pooling is "
                             f"{pooling or 'none'}, not rank): use embed() for an embedding model")
        if not documents:
            return []
        scores = self._pooled([self.native.rerank_tokens(query, d) for d in documents], "rank", threads)
        ranked = sorted((Ranked(i, float(s[0])) for i, s in enumerate(scores)), key=lambda r: -r.score)
        return ranked if top_n is None else ranked[:top_n]

    def _pooled(self, toks: list[npt.NDArray[np.int32]], pooling: str | None,
                threads: int | Threads | None) -> npt.NDArray[np.float32]:
        """One pooled output row per token list, each decoded alone (a non-causal model sees one
        whole text per ubatch)."""
        longest = max(1, max(len(t) for t in toks))
        if longest > self.info.n_ctx_train:
            raise ValueError(f"a text has {longest} tokens, more than the model's context ({self.info.n_ctx_train})")
        size = max(longest, 512)
        with Context(self, n_ctx=size, n_batch=size, n_ubatch=size, threads=threads, embeddings=True,
                     pooling=pooling) as ctx:  # type: ignore[arg-type]
            rows = []
            for t in toks:
                ctx.kv_clear()
                ctx.native.decode(t, 1)
                rows.append(ctx.native.embedding(0))
        return np.stack(rows).astype(np.float32, copy=False)

    # -- LoRA adapters -------------------------------------------------------------------
    def load_lora(self, path: str | os.PathLike[str]) -> Lora:
        """Load a LoRA adapter (GGUF) for this model; apply it to contexts with a scale
        (``model.context(lora={adapter: 1.0})``, ``ctx.set_lora(...)``). Raises
        FileNotFoundError, ModelFormatError (malformed, or for another model's shapes), LoadError
        (llama.cpp's reason: another architecture, ...)."""
        return Lora(self, path)

    # -- contexts ------------------------------------------------------------------------
    def context(self, n_ctx: int | None = None, **kwargs: Any) -> Context:
        """A context of this model: ``lamina.Context(model, n_ctx=..., **kwargs)``, whose docstring
        lists the arguments and how they default (an argument given wins, then the model's config,
        then the defaults)."""
        return Context(self, n_ctx=n_ctx, **kwargs)

    def __repr__(self) -> str:
        return f"<lamina.Model {self.info.desc!r} from {str(self.path)!r}>"


@dataclass
class Plan:
    """Where a model's weights will go, decided before anything is loaded (plan_placement)."""

    use_gpu: bool
    devices: list[Device]               # the GPU/remote devices layers may go to
    n_gpu_layers: NGL                   # as asked
    ngl: int                            # for llama.cpp: -1 every layer
    split_mode: str
    main_gpu: int
    tensor_split: list[float] | None
    overrides: list[tuple[str, int]]    # (regex, device index or -1 for the CPU)
    limits: dict[int, int]              # device index -> the most "auto" may use there
    reasons: list[str]                  # every decision taken on the request's behalf, in words
    inert: list[str]                    # settings given that cannot take effect (InertSettingWarning)

    def native(self) -> _native.Placement:
        p = _native.Placement()
        p.n_gpu_layers, p.split_mode, p.main_gpu = self.ngl, _SPLIT_MODES[self.split_mode], self.main_gpu
        p.devices = [d.index for d in self.devices] if self.use_gpu else []
        p.tensor_split, p.overrides = self.tensor_split, self.overrides
        return p


def plan_placement(*, gpu: bool, n_gpu_layers: NGL, main_gpu: int, split_mode: str,
                   tensor_split: Sequence[float] | None, devices: Sequence[int | str | Device] | None,
                   tensor_overrides: Sequence[tuple[str, int | str | Device]] | None,
                   memory_limit: Mapping[int | str | Device, int] | None, rpc: Sequence[str] | None,
                   all_devices: list[Device], remote: set[int], absent: Callable[[], str] = gpu_absent_reason,
                   row_split: Callable[[int], bool] = _native.supports_row_split) -> Plan:
    """The placement a Model's arguments ask for on a machine with ``all_devices`` (``remote``:
    indices of the RPC devices named by ``rpc``): the devices, the layer count for llama.cpp, the
    split, the overrides, and the reasons and inert settings in words. Pure: it loads nothing and
    opens no device (``absent`` says why there is no GPU, ``row_split`` which devices have split
    buffers), so it is testable with made-up devices. Raises ValueError for a placement that
    cannot be."""
    check_int("main_gpu", main_gpu, 0)
    gpu_devices = [d for d in all_devices if d.kind in ("gpu", "igpu") or d.index in remote]
    if devices is not None:
        candidates = [d for d in all_devices if d.kind in ("gpu", "igpu", "remote")]
        gpu_devices = [_find_device(candidates, sel, "devices") for sel in devices]
        if len({d.index for d in gpu_devices}) != len(gpu_devices):
            raise ValueError(f"devices lists a device twice: {list(devices)!r}")
    reasons: list[str] = []
    inert: list[str] = []
    no_gpu = "gpu=False" if not gpu else "" if gpu_devices else \
        "devices=[] chooses no device" if devices is not None else absent()
    if no_gpu:
        reasons.append(f"{no_gpu}: everything stays on the CPU")
    use_gpu = not no_gpu
    if rpc and not gpu:
        reasons.append(f"rpc={list(rpc)!r} is inert without a GPU")
        inert.append(f"rpc={list(rpc)!r} is inert: gpu=False")
    if not use_gpu and n_gpu_layers not in ("auto", 0):
        reasons.append(f"n_gpu_layers={n_gpu_layers!r} is inert without a GPU")
        inert.append(f"n_gpu_layers={n_gpu_layers!r} is inert: {no_gpu}")
    if use_gpu and split_mode == "row":
        unsupported = [d.name for d in gpu_devices if not row_split(d.index)]
        if unsupported:
            raise ValueError(f"split_mode='row' needs split buffers, which {', '.join(unsupported)} do not offer in "
                             "this llama.cpp (its CUDA backend dropped them): use split_mode='tensor' "
                             "(tensor parallelism) or 'layer'")
    if use_gpu and split_mode == "tensor" and n_gpu_layers == "auto":
        raise ValueError("llama.cpp's memory fit does not support split_mode='tensor': give n_gpu_layers")
    split = _check_tensor_split(tensor_split, len(gpu_devices)) if tensor_split is not None else None
    if split is not None and not use_gpu:
        reasons.append("tensor_split is inert without a GPU")
        split = None
    if use_gpu and split_mode == "none" and not 0 <= main_gpu < len(gpu_devices):
        raise ValueError(f"main_gpu={main_gpu} is not one of the {len(gpu_devices)} chosen devices")
    overrides: list[tuple[str, int]] = []
    for pattern, target in tensor_overrides or ():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"tensor override patterns are non-empty regex strings, got {pattern!r}")
        if target == "cpu":
            overrides.append((pattern, -1))
        elif use_gpu:
            overrides.append((pattern, _find_device(gpu_devices, target, "tensor_overrides").index))
        else:
            _find_device([d for d in all_devices if d.kind != "cpu"], target, "tensor_overrides")
            reasons.append(f"tensor override {pattern!r} -> {target!r} is inert without a GPU")
    limits = {}
    for sel, nbytes in (memory_limit or {}).items():
        if not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"memory_limit values are bytes >= 0, got {nbytes!r}")
        limits[_find_device(gpu_devices, sel, "memory_limit").index] = nbytes
    if limits and n_gpu_layers != "auto":
        raise ValueError("memory_limit applies to n_gpu_layers='auto'")
    ngl = 0 if not use_gpu else -1 if n_gpu_layers in ("all", "auto") else int(n_gpu_layers)
    return Plan(use_gpu=use_gpu, devices=gpu_devices if use_gpu else [], n_gpu_layers=n_gpu_layers, ngl=ngl,
                split_mode=split_mode, main_gpu=main_gpu, tensor_split=split, overrides=overrides, limits=limits,
                reasons=reasons, inert=inert)


def _find_device(candidates: list[Device], sel: int | str | Device, what: str) -> Device:
    if isinstance(sel, Device):
        sel = sel.index
    for d in candidates:
        if (isinstance(sel, int) and not isinstance(sel, bool) and d.index == sel) or d.name == sel:
            return d
    raise ValueError(f"{what}: no GPU device {sel!r}; available: {[f'{d.index}:{d.name}' for d in candidates]}")


def _check_tensor_split(split: Sequence[float], n_devices: int) -> list[float]:
    values = [float(x) for x in split]
    if n_devices and len(values) > n_devices:
        raise ValueError(f"tensor_split has {len(values)} entries for {n_devices} device(s)")
    if any(not np.isfinite(x) or x < 0 for x in values):
        raise ValueError(f"tensor_split entries must be finite and >= 0, got {list(split)!r}")
    if not any(values):
        raise ValueError("tensor_split must give some device a share (all entries are zero)")
    return values
