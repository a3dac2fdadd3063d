"""Checks for numbers that cross into the native layer (a leaf module: imports nothing of lamina).

Every int handed to lamina._native is range-checked here first, so a bad value gets lamina's
own ValueError naming the argument and its range, never nanobind's "incompatible function
arguments" TypeError for a value that overflows a C type.
"""
from __future__ import annotations

from typing import Any

INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1


def check_int(name: str, value: Any, lo: int, hi: int = INT32_MAX) -> int:
    """``value`` as an int in [lo, hi]; TypeError for a non-int (bools included), ValueError out of range."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_pos(name: str, value: Any) -> int:
    """A KV cache position: >= 0, or -1 for an open end."""
    return check_int(name, value, -1)


def check_seq(name: str, value: Any, allow_all: bool = False) -> int:
    """A sequence id: >= 0 (llama.cpp checks it against n_seq_max), or -1 for all where allowed."""
    return check_int(name, value, -1 if allow_all else 0)
