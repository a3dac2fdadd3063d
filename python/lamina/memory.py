"""Memory before allocation: what a model and context would take on each device (llama.cpp's
no-alloc load), and the offload report of a loaded model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .params import NGL

MiB = 1024 * 1024


def _mib(n: int) -> str:
    return f"{n / MiB:,.1f}"


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes on one device (or "host"): model weights, context (KV cache, outputs), compute buffers."""

    device: str
    model: int
    context: int
    compute: int
    free: int
    total: int
    layers: int | None = None  # layers llama.cpp placed there (loaded models only)

    @property
    def bytes(self) -> int:
        return self.model + self.context + self.compute

    # the names of the design's offload contract
    @property
    def name(self) -> str:
        return self.device

    @property
    def weight_bytes(self) -> int:
        return self.model

    @property
    def kv_bytes(self) -> int:
        return self.context

    @property
    def compute_bytes(self) -> int:
        return self.compute


def _table(rows: list[DeviceMemory], with_layers: bool) -> list[str]:
    head = f"  {'device':<16}" + (f"{'layers':>7}" if with_layers else "") + \
        f"{'model MiB':>12}{'context MiB':>13}{'compute MiB':>13}{'free MiB':>12}"
    lines = [head]
    for r in rows:
        lay = f"{(r.layers if r.layers is not None else '-')!s:>7}" if with_layers else ""
        free = _mib(r.free) if r.total else "-"
        lines.append(f"  {r.device:<16}{lay}{_mib(r.model):>12}{_mib(r.context):>13}{_mib(r.compute):>13}{free:>12}")
    return lines


@dataclass(frozen=True)
class MemoryEstimate:
    """Model.estimate_memory(): per-device bytes a context of n_ctx tokens would need, computed
    by llama.cpp without allocating anything."""

    n_ctx: int
    devices: list[DeviceMemory]

    def on(self, device: str) -> DeviceMemory:
        for d in self.devices:
            if d.device == device:
                return d
        raise KeyError(f"no device {device!r} in this estimate: {[d.device for d in self.devices]}")

    @property
    def kv_bytes(self) -> int:
        """Context bytes on every device (KV cache and output buffer)."""
        return sum(d.context for d in self.devices)

    def __str__(self) -> str:
        return "\n".join([f"memory for n_ctx={self.n_ctx}:"] + _table(self.devices, False))


def estimate_from_native(n_ctx: int, rows: list[dict[str, Any]]) -> MemoryEstimate:
    return MemoryEstimate(n_ctx=n_ctx, devices=[
        DeviceMemory(r["device"], int(r["model"]), int(r["context"]), int(r["compute"]), int(r["free"]),
                     int(r["total"])) for r in rows])


@dataclass(frozen=True)
class Offload:
    """What happened to the offload request (model.offload).

    gpu: whether anything may go to a device. layers_effective counts the n_layer repeating layers
    plus the output layer that llama.cpp placed on devices. per_device: llama.cpp's placement per
    device with the bytes of weights, and of a context of ``n_ctx`` tokens (estimated at load,
    without allocating). reasons: every decision taken on the request's behalf, in words.
    """

    gpu: bool
    layers_requested: NGL | None
    layers_effective: int
    n_layer: int
    devices: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    per_device: list[DeviceMemory] = field(default_factory=list)
    n_ctx: int | None = None

    def layers_on(self, device: str) -> int:
        return sum(d.layers or 0 for d in self.per_device if d.device == device)

    def __str__(self) -> str:
        where = ", ".join(self.devices) if self.devices else "CPU only"
        lines = [f"gpu: {'on' if self.gpu else 'off'}; layers on devices: {self.layers_effective}/{self.n_layer + 1} "
                 f"(requested: {self.layers_requested!r}); devices: {where}"]
        lines += [f"  - {r}" for r in self.reasons]
        if self.per_device:
            lines.append(f"placement (context bytes for n_ctx={self.n_ctx}):")
            lines += _table(self.per_device, True)
        return "\n".join(lines)
