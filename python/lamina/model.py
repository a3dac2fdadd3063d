"""lamina.Model: a loaded GGUF model, its metadata, tokenizer, and where its layers went."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence, Union

import numpy as np
import numpy.typing as npt

from . import _core, _native
from .models import default_model_path
from .system import devices as list_devices

if TYPE_CHECKING:
    from .context import Context, KV, Threads

NGL = Union[int, Literal["all", "auto"]]
_SPLIT_MODES = {"none": 0, "layer": 1, "row": 2}


def as_tokens(tokens: Any, n_vocab: int | None = None) -> npt.NDArray[np.int32]:
    """Token ids as a contiguous int32 array; rejects non-integers and values int32 cannot hold."""
    arr = np.asarray(tokens)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int32)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.dtype != np.int32:
        lo, hi = int(arr.min()), int(arr.max())
        limit = n_vocab if n_vocab is not None else 2**31
        if lo < 0 or hi >= limit:
            bad = lo if lo < 0 else hi
            raise IndexError(f"token id {bad} is out of range [0, {limit})")
    return np.ascontiguousarray(arr, dtype=np.int32)


@dataclass(frozen=True)
class ModelInfo:
    """Facts about a loaded model (model.info)."""

    path: str
    arch: str
    name: str
    desc: str
    n_params: int
    size: int
    n_layer: int
    n_ctx_train: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_swa: int
    n_vocab: int
    bos: int
    eos: int
    eot: int
    add_bos: bool
    chat_template: str | None
    has_encoder: bool
    is_recurrent: bool


@dataclass(frozen=True)
class Offload:
    """What happened to the offload request (model.offload)."""

    gpu: bool
    layers_requested: NGL | None
    layers_effective: int
    n_layer: int
    devices: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        where = ", ".join(self.devices) if self.devices else "CPU only"
        lines = [f"gpu: {'on' if self.gpu else 'off'}; layers on devices: {self.layers_effective}/{self.n_layer + 1} "
                 f"(requested: {self.layers_requested!r}); devices: {where}"]
        lines += [f"  - {r}" for r in self.reasons]
        return "\n".join(lines)


class Model:
    """A GGUF model loaded by llama.cpp.

    Args:
        path: GGUF file; None loads the default model (Gemma 3 270M Q4_K_M package).
        gpu: False keeps everything on the CPU: weights, KV cache and op offload; any
            n_gpu_layers given is then inert and ``offload`` says so.
        n_gpu_layers: layers on GPU devices: an int (clamped to n_layer + 1), "all" or "auto".
        use_mmap, use_mlock: as llama.cpp.
        progress: called with a float in [0, 1] while loading; return False to cancel.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        gpu: bool = True,
        n_gpu_layers: NGL = "auto",
        main_gpu: int = 0,
        split_mode: str = "layer",
        tensor_split: Sequence[float] | None = None,
        devices: Sequence[int | str] | None = None,
        use_mmap: bool = True,
        use_mlock: bool = False,
        progress: Callable[[float], bool | None] | None = None,
    ) -> None:
        self._native: _native.Model | None = None
        if path is None:
            path = default_model_path()
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        if split_mode not in _SPLIT_MODES:
            raise ValueError(f"split_mode must be one of {sorted(_SPLIT_MODES)}, got {split_mode!r}")
        if not (isinstance(n_gpu_layers, int) or n_gpu_layers in ("all", "auto")):
            raise ValueError(f"n_gpu_layers must be an int, 'all' or 'auto', got {n_gpu_layers!r}")
        self.path = Path(path)
        self.gpu_requested = gpu

        gpu_devices = [d for d in list_devices() if d.kind in ("gpu", "igpu", "remote")]
        if devices is not None:
            chosen = []
            for sel in devices:
                match = [d for d in gpu_devices if d.index == sel or d.name == sel]
                if not match:
                    raise ValueError(f"no GPU device {sel!r}; available: {[d.name for d in gpu_devices]}")
                chosen.extend(match)
            gpu_devices = chosen

        reasons: list[str] = []
        if not gpu:
            reasons.append("gpu=False: everything stays on the CPU")
        elif not gpu_devices:
            reasons.append("no GPU device found (or no GPU backend compiled): everything stays on the CPU")
        use_gpu = gpu and bool(gpu_devices)
        if not use_gpu and n_gpu_layers not in ("auto", 0):
            reasons.append(f"n_gpu_layers={n_gpu_layers!r} is inert without a GPU")
        ngl = 0
        if use_gpu:
            # "auto" until the no-alloc fit lands: every layer (llama.cpp's own default)
            ngl = -1 if n_gpu_layers in ("all", "auto") else int(n_gpu_layers)
            if n_gpu_layers == "auto":
                reasons.append("auto: offloading every layer (memory fit not computed)")
            if ngl < -1:
                raise ValueError(f"n_gpu_layers must be >= 0, got {n_gpu_layers}")

        # llama.cpp's load modes: -1 auto (mmap where it helps), 0 none, 2 mlock, 3 mmap+mlock
        load_mode = (3 if use_mlock else -1) if use_mmap else (2 if use_mlock else 0)
        _core.sync_log_level()
        self._native = _native.Model(
            os.fspath(self.path),
            n_gpu_layers=ngl,
            load_mode=load_mode,
            devices=[d.index for d in gpu_devices] if use_gpu else [],
            split_mode=_SPLIT_MODES[split_mode],
            main_gpu=main_gpu,
            tensor_split=list(tensor_split) if tensor_split is not None else None,
            progress=progress,
        )
        info = self._native.info()
        self.info = ModelInfo(**{k: info[k] for k in ModelInfo.__dataclass_fields__})
        n_layer = self.info.n_layer
        effective = 0
        if use_gpu:
            effective = n_layer + 1 if ngl < 0 or ngl > n_layer else ngl
            if isinstance(n_gpu_layers, int) and n_gpu_layers > n_layer + 1:
                reasons.append(f"n_gpu_layers={n_gpu_layers} clamped to {n_layer + 1} (n_layer + output)")
        self.offload = Offload(
            gpu=use_gpu,
            layers_requested=n_gpu_layers,
            layers_effective=effective,
            n_layer=n_layer,
            devices=[d.name for d in gpu_devices] if use_gpu else [],
            reasons=reasons,
        )

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Release the model (contexts still open keep the weights alive until they close)."""
        if self._native is not None:
            self._native.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def native(self) -> _native.Model:
        if self._native is None:
            raise RuntimeError("model failed to initialise")
        return self._native

    # -- vocabulary ----------------------------------------------------------------------
    def tokenize(self, text: str | bytes, *, add_special: bool = True, special: bool = False) -> npt.NDArray[np.int32]:
        """Text -> int32 token ids. add_special adds BOS/EOS as the model wants; special parses
        markup such as ``<start_of_turn>`` into control tokens."""
        data = text.encode("utf-8") if isinstance(text, str) else text
        if not isinstance(data, bytes):
            raise TypeError(f"text must be str or bytes, got {type(text).__name__}")
        return self.native.tokenize(data, add_special, special)

    def detokenize(self, tokens: Any, *, special: bool = False) -> str:
        """Token ids -> text (invalid UTF-8 at the edges becomes U+FFFD)."""
        arr = as_tokens(tokens, self.info.n_vocab)
        return self.native.detokenize(arr, False, special).decode("utf-8", errors="replace")

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        return self.native.token_to_piece(int(token), special)

    def is_eog(self, token: int) -> bool:
        return self.native.is_eog(int(token))

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], *, template: str | None = None,
                            add_assistant: bool = True) -> str:
        """Render chat messages ({"role": ..., "content": ...}) with llama.cpp's template support.

        template: a template string or a built-in name (lamina.chat_templates()); default: the
        model's own (tokenizer.chat_template). Raises ValueError if there is none llama.cpp supports.
        """
        tmpl = template if template is not None else self.info.chat_template
        if tmpl is None:
            raise ValueError(f"{self.info.name or self.path.name} has no chat template in its metadata; pass "
                             f"template= a template string or a built-in name from lamina.chat_templates()")
        msgs = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise TypeError(f"message {i} must be a mapping with str 'role' and 'content', got {m!r}")
            msgs.append((m["role"], m["content"]))
        return _native.chat_apply_template(tmpl, msgs, add_assistant).decode("utf-8", errors="replace")

    @property
    def metadata(self) -> dict[str, str]:
        """Every GGUF metadata key/value (values as strings)."""
        return self.native.metadata()

    # -- embeddings ----------------------------------------------------------------------
    def embed(self, texts: str | Sequence[str], *, normalize: bool = True,
              pooling: Literal["none", "mean", "cls", "last"] | None = None,
              threads: "int | Threads | None" = None) -> npt.NDArray[np.float32]:
        """Embeddings of ``texts``: array (n, n_embd), or (n_embd,) for one string.

        pooling: None uses the model's own (an embedding model's mean/cls/...); a generative
        model without one gives its last token's hidden state. normalize: L2-normalise rows.
        """
        from .context import Context

        single = isinstance(texts, str)
        items = [texts] if isinstance(texts, str) else list(texts)
        if not items or not all(isinstance(t, str) for t in items):
            raise TypeError("texts must be a string or a non-empty sequence of strings")
        toks = [self.tokenize(t) for t in items]
        longest = max(1, max(len(t) for t in toks))
        if longest > self.info.n_ctx_train:
            raise ValueError(f"a text has {longest} tokens, more than the model's context ({self.info.n_ctx_train})")
        size = max(longest, 512)  # one ubatch holds a whole text (non-causal models need that)
        with Context(self, n_ctx=size, n_batch=size, n_ubatch=size, threads=threads, embeddings=True,
                     pooling=pooling) as ctx:
            rows = []
            for t in toks:
                ctx.kv_clear()
                ctx.native.decode(t, 1)
                rows.append(ctx.native.embedding(0))
        out = np.stack(rows).astype(np.float32, copy=False)
        if normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True).astype(np.float32)
            out = (out / np.where(norms == 0, np.float32(1), norms)).astype(np.float32, copy=False)
        return out[0] if single else out

    # -- contexts ------------------------------------------------------------------------
    def context(
        self,
        n_ctx: int = 4096,
        *,
        n_batch: int = 2048,
        n_ubatch: int = 512,
        n_seq_max: int = 1,
        threads: "int | Threads | None" = None,
        kv: "KV | None" = None,
        flash_attn: bool | Literal["auto"] = "auto",
        embeddings: bool = False,
    ) -> "Context":
        """Create a context (see lamina.Context)."""
        from .context import Context

        return Context(self, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, n_seq_max=n_seq_max,
                       threads=threads, kv=kv, flash_attn=flash_attn, embeddings=embeddings)

    def __repr__(self) -> str:
        return f"<lamina.Model {self.info.desc!r} from {str(self.path)!r}>"
