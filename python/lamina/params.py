"""Value types and checks that cross into the native layer: KV cache settings, context settings,
token arrays, ints range-checked for C types. A leaf: it imports only lamina._native (and
lamina.errors, which is the native exceptions), so every other module can import it at top level.

Each check lives on one side. The native side checks every value whose bad form would make
llama.cpp crash, hang or misbehave (sizes, ranges, type ids, finite floats), since lamina._native
can be called directly; Python checks what only it can: types, names ("auto", "layer", "q8_0")
mapped to native codes, values that must fit a C type (nanobind's own error would be a
TypeError for an int it cannot convert), and rules that need Python's knowledge (devices,
placement, config).

Every int handed to lamina._native is range-checked here first, so a bad value gets lamina's
own ValueError naming the argument and its range, never nanobind's "incompatible function
arguments" TypeError for a value that overflows a C type.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Union

import numpy as np
import numpy.typing as npt

from . import _native
from .errors import OutOfMemoryError

INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
NGL = Union[int, Literal["all", "auto"]]  # n_gpu_layers: a count, every layer, or llama.cpp's memory fit


def parse_ngl(value: Any) -> NGL:
    """The one reading of n_gpu_layers, for Model, model.yml, LAMINA_N_GPU_LAYERS, -ngl and bench's
    -ngl lists: an int >= 0 (or its digits), "all" or -1 (llama.cpp's "every layer"), or "auto".
    Anything else raises ValueError with the same message wherever it came from."""
    n: Any = value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("all", "auto"):
            return text  # type: ignore[return-value]
        n = int(text) if re.fullmatch(r"-?[0-9]+", text) else None
    elif isinstance(value, np.integer) or isinstance(value, (float, np.floating)) and float(value).is_integer():
        n = int(value)
    if isinstance(n, int) and not isinstance(n, bool) and n >= -1:
        return "all" if n == -1 else n
    raise ValueError(f"expected an int >= 0, 'all' (or -1) or 'auto' for n_gpu_layers, got {value!r}")


def check_int(name: str, value: Any, lo: int, hi: int = INT32_MAX) -> int:
    """``value`` as an int in [lo, hi]; TypeError for a non-int (bools included), ValueError out of range."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_count(name: str, value: Any, lo: int = 0, hi: int | None = INT32_MAX) -> int:
    """An int >= lo (a ValueError naming ``name`` for anything else, bools too), then check_int's hi (None: none)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return value if hi is None else check_int(name, value, lo, hi)


def check_pos(name: str, value: Any) -> int:
    """A KV cache position: >= 0, or -1 for an open end."""
    return check_int(name, value, -1)


def check_seq(name: str, value: Any, allow_all: bool = False) -> int:
    """A sequence id: >= 0 (llama.cpp checks it against n_seq_max), or -1 for all where allowed."""
    return check_int(name, value, -1 if allow_all else 0)


LOGITS = {"none": 0, "last": 1, "all": 2}
POOLING = {None: -1, "none": 0, "mean": 1, "cls": 2, "last": 3, "rank": 4}
FLASH = {"auto": -1, False: 0, True: 1}


# K/V cache types llama.cpp supports (its CLI's list)
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")


@dataclass(frozen=True)
class KV:
    """KV cache settings: K/V types by ggml name, offload to the model's devices."""

    type_k: str = "f16"
    type_v: str = "f16"
    offload: bool = True
    unified: bool = False
    swa_full: bool = True

    def __post_init__(self) -> None:
        for name in ("type_k", "type_v"):
            value = getattr(self, name)
            if value not in KV_TYPES:
                raise ValueError(f"KV.{name}={value!r}: the KV cache takes one of {', '.join(KV_TYPES)}")

    @property
    def quantized_v(self) -> bool:
        return self.type_v not in ("f32", "f16", "bf16")


# llama-bench's context settings (its to_llama_cparams): f16 K/V, sliding-window caches at window size.
BENCH_KV = KV(type_k="f16", type_v="f16", swa_full=False)


ROPE_SCALING = {None: -1, "none": 0, "linear": 1, "yarn": 2, "longrope": 3}


def context_settings(n_ctx: int, n_batch: int, n_ubatch: int, n_seq_max: int, kv: KV,
                     flash_attn: bool | Literal["auto"], on_gpu: bool, *, embeddings: bool = False,
                     pooling: str | None = None, rope_scaling: str | None = None, rope_freq_base: float = 0.0,
                     rope_freq_scale: float = 0.0) -> _native.ContextParams:
    """Validated native context settings (lamina.h: context_params)."""
    for name, value in (("n_ctx", n_ctx), ("n_batch", n_batch), ("n_ubatch", n_ubatch), ("n_seq_max", n_seq_max)):
        check_count(name, value, 0, UINT32_MAX)  # what the C type holds; the sizes' own rules are native
    if flash_attn not in FLASH:
        raise ValueError(f"flash_attn must be 'auto', True or False, got {flash_attn!r}")
    if not isinstance(kv, KV):
        raise TypeError(f"kv must be a lamina.KV, got {kv!r}")
    if kv.quantized_v and flash_attn is False:
        raise ValueError(f"a quantized V cache ({kv.type_v}) needs flash attention: use flash_attn='auto' or True")
    if rope_scaling not in ROPE_SCALING:
        raise ValueError(f"rope_scaling must be None (the model's), 'none', 'linear', 'yarn' or 'longrope', "
                         f"got {rope_scaling!r}")
    for rope_name, rope_value in (("rope_freq_base", rope_freq_base), ("rope_freq_scale", rope_freq_scale)):
        if isinstance(rope_value, bool) or not isinstance(rope_value, (int, float)):
            raise TypeError(f"{rope_name} must be a number (0: the model's), got {rope_value!r}")
    s = _native.ContextParams()
    s.n_ctx, s.n_batch, s.n_ubatch, s.n_seq_max = n_ctx, n_batch, n_ubatch, n_seq_max
    s.flash_attn = FLASH[flash_attn]
    s.type_k, s.type_v = _native.ggml_type_from_name(kv.type_k), _native.ggml_type_from_name(kv.type_v)
    s.offload_kqv, s.op_offload = kv.offload and on_gpu, on_gpu
    s.embeddings, s.swa_full, s.kv_unified, s.pooling_type = embeddings, kv.swa_full, kv.unified, POOLING[pooling]
    s.rope_scaling_type = ROPE_SCALING[rope_scaling]
    s.rope_freq_base, s.rope_freq_scale = float(rope_freq_base), float(rope_freq_scale)
    return s


def as_tokens(tokens: Any, n_vocab: int | None = None) -> npt.NDArray[np.int32]:
    """Token ids as a contiguous int32 array; rejects non-integers and values int32 cannot hold."""
    arr = np.atleast_1d(np.asarray(tokens))
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
            raise IndexError(f"token id {lo if lo < 0 else hi} is out of range [0, {limit})")
    return np.ascontiguousarray(arr, dtype=np.int32)


def out_of_memory(message: str, device: str, nbytes: int) -> OutOfMemoryError:
    """lamina.OutOfMemoryError with the device and the bytes it names (as the native one carries)."""
    err = OutOfMemoryError(message)
    err.device, err.bytes = device, nbytes
    return err


def kv_tensor_error(refused: tuple[str, int], n_ctx: int) -> OutOfMemoryError:
    """The OutOfMemoryError for a device that cannot use one layer's K or V cache tensor."""
    dev, size = refused
    return out_of_memory(
        f"{dev} cannot use a KV cache tensor of {size / 2**20:,.0f} MiB (one layer's K or V cache for "
        f"n_ctx={n_ctx or 'the training context'}; the device limits the size of one tensor): give a smaller n_ctx, or "
        f"kv=lamina.KV(offload=False) to keep the cache in host memory", dev, size)
