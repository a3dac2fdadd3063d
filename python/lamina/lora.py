"""lamina.Lora: a LoRA adapter loaded for one model, applied to its contexts with a scale."""
from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

from . import _core, _native

if TYPE_CHECKING:
    from .model import Model


class Lora(_core.NativeOwner[_native.Lora]):
    """A LoRA adapter in GGUF (as llama.cpp's convert_lora_to_gguf.py writes it), loaded for one
    model: ``model.load_lora(path)``. Apply it with ``model.context(lora={lora: 1.0})`` or swap
    adapters on a running context with ``ctx.set_lora({lora: 0.5, other: 1.0})``; the model is
    not reloaded. An adapter for another architecture or other shapes raises ModelFormatError or
    LoadError. close() releases this handle; contexts that apply it keep it alive.
    """

    _what = "LoRA adapter"

    def __init__(self, model: "Model", path: str | os.PathLike[str]) -> None:
        self._native: _native.Lora | None = None
        self.model = model
        self.path = Path(path)
        self._native = _native.Lora(model.native, os.fspath(self.path))

    @property
    def alpha(self) -> float:
        """adapter.lora.alpha: with it, a scale s applies as s * alpha / rank; 0: s as given."""
        return float(self.native.alpha)

    @property
    def metadata(self) -> dict[str, str]:
        """The adapter file's scalar metadata (general.*, adapter.*), as strings."""
        return dict(self.native.metadata())

    @property
    def closed(self) -> bool:
        return self._native is None or bool(self._native.closed)

    def __repr__(self) -> str:
        return f"<lamina.Lora {str(self.path)!r}{' closed' if self.closed else ''}>"


# What Context(lora=...) and set_lora take: an adapter (scale 1), {adapter: scale}, [(adapter, scale)]
LoraSpec = Union[Lora, Mapping[Lora, float], Sequence[tuple[Lora, float]], None]


def lora_items(spec: LoraSpec) -> list[tuple[Lora, float]]:
    """(adapter, scale) pairs of a LoraSpec; TypeError / ValueError for anything else."""
    if spec is None:
        return []
    if isinstance(spec, Lora):
        return [(spec, 1.0)]
    pairs: list[Any] = list(spec.items()) if isinstance(spec, Mapping) else list(spec)
    out: list[tuple[Lora, float]] = []
    for item in pairs:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(f"lora takes a Lora, {{Lora: scale}} or [(Lora, scale)], got an item {item!r}")
        lora, scale = item
        if not isinstance(lora, Lora):
            raise TypeError(f"expected a lamina.Lora (model.load_lora(path)), got {type(lora).__name__}")
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"the scale of {lora!r} must be a number, got {scale!r}")
        out.append((lora, float(scale)))  # OverflowError for an int beyond a float
    return out
