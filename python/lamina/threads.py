"""lamina.Threads: thread counts, CPU pinning, priority and polling of a context's ggml threadpools."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Literal, Union

from . import _native
from .system import allowed_cpus, default_threads, default_threads_batch, physical_cores

CpuSpec = Union[str, Iterable[int], None]
Priority = Literal["low", "normal", "medium", "high", "realtime"]
# ggml_sched_priority values; medium/high/realtime are SCHED_FIFO 40/80/90 on Linux (need CAP_SYS_NICE)
PRIORITIES = {"low": -1, "normal": 0, "medium": 1, "high": 2, "realtime": 3}
_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_cpus(spec: CpuSpec, what: str = "cpus") -> tuple[int, ...] | None:
    """CPU ids from a list ([0, 2, 4]), a range string ("0-3,8") or a hex mask ("0x15").

    Raises ValueError for malformed or empty sets and for CPUs this process may not run on."""
    if spec is None:
        return None
    cpus: set[int] = set()
    if isinstance(spec, str):
        text = spec.strip()
        if text.lower().startswith("0x"):
            try:
                mask = int(text, 16)
            except ValueError:
                raise ValueError(f"{what}={spec!r}: not a hex CPU mask") from None
            cpus = {i for i in range(mask.bit_length()) if mask >> i & 1}
        else:
            for part in text.split(","):
                m = _RANGE.match(part)
                if not m:
                    raise ValueError(f"{what}={spec!r}: expected CPU ids and ranges like '0-3,8' or a mask like '0xff'")
                lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
                if hi < lo:
                    raise ValueError(f"{what}={spec!r}: range {lo}-{hi} runs backwards")
                cpus.update(range(lo, hi + 1))
    elif isinstance(spec, (int, bool)):
        raise TypeError(f"{what}={spec!r}: give a list ([{spec}]), a range string ('0-3') or a hex mask string ('0xff')")
    else:
        for c in spec:
            if not isinstance(c, int) or isinstance(c, bool) or c < 0:
                raise ValueError(f"{what}: CPU ids are ints >= 0, got {c!r}")
            cpus.add(c)
    if not cpus:
        raise ValueError(f"{what}={spec!r} names no CPU")
    allowed = set(allowed_cpus())
    outside = sorted(cpus - allowed)
    if outside:
        raise ValueError(f"{what}: CPU(s) {outside} are outside this process's allowed set "
                         f"{cpu_ranges(sorted(allowed))} (sched_getaffinity)")
    return tuple(sorted(cpus))


def cpu_ranges(cpus: Iterable[int]) -> str:
    """Sorted CPU ids as ranges: [0, 1, 2, 3, 8] -> "0-3,8"."""
    runs: list[list[int]] = []
    for c in cpus:
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


@dataclass(frozen=True)
class Threads:
    """Threads of a context: ``n`` for generation (one token per decode), ``batch`` for prompt
    processing, each run by its own ggml threadpool.

    cpus / batch_cpus pin the pool's threads (the calling thread included, only for the duration
    of a decode) to a CPU set: a list, a range string "0-7,12" or a hex mask "0xff"; batch_cpus
    defaults to cpus. strict=True puts each thread on its own listed CPU. priority: "low",
    "normal" (inherit), "medium", "high", "realtime". poll: 0 (sleep at once) .. 100 (spin) while
    waiting for work; by default 0 when lamina chooses n (its generation count then adapts to busy
    CPUs, see Context.threads), else 50 as in llama.cpp. Defaults: n = physical cores (of
    cpus, when given), batch = logical CPUs.
    A pinned pool may not have more threads than CPUs (ggml's threads busy-wait at barriers).
    """

    n: int | None = None
    batch: int | None = None
    cpus: CpuSpec = None
    batch_cpus: CpuSpec = None
    strict: bool = False
    priority: Priority = "normal"
    poll: int | None = None

    def __post_init__(self) -> None:
        for name in ("n", "batch"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 512):
                raise ValueError(f"Threads.{name} must be an int in [1, 512], got {v!r}")
        object.__setattr__(self, "cpus", parse_cpus(self.cpus, "Threads.cpus"))
        object.__setattr__(self, "batch_cpus", parse_cpus(self.batch_cpus, "Threads.batch_cpus"))
        if not isinstance(self.strict, bool):
            raise TypeError(f"Threads.strict must be a bool, got {self.strict!r}")
        if self.priority not in PRIORITIES:
            raise ValueError(f"Threads.priority must be one of {', '.join(PRIORITIES)}, got {self.priority!r}")
        if self.poll is not None and (not isinstance(self.poll, int) or isinstance(self.poll, bool)
                                      or not 0 <= self.poll <= 100):
            raise ValueError(f"Threads.poll must be an int in [0, 100], got {self.poll!r}")
        if self.strict and self.cpus is None and self.batch_cpus is None:
            raise ValueError("Threads.strict=True pins one thread per CPU: give cpus")
        n, batch = self.resolve()
        for name, count, cpus in (("n", n, self._gen_cpus()), ("batch", batch, self._batch_cpus())):
            # ggml's threads spin at every barrier of a graph: two of them sharing one pinned CPU
            # wait out each other's time slices, and a decode slows down a thousandfold
            if cpus is not None and count > len(cpus):
                raise ValueError(f"Threads.{name}={count} threads pinned to {len(cpus)} CPU(s) ({cpu_ranges(cpus)}): "
                                 "ggml's threads busy-wait at barriers, so a pinned set needs a CPU per thread")

    def _gen_cpus(self) -> tuple[int, ...] | None:
        return self.cpus  # type: ignore[return-value]

    def _batch_cpus(self) -> tuple[int, ...] | None:
        return self.batch_cpus if self.batch_cpus is not None else self.cpus  # type: ignore[return-value]

    def resolve(self) -> tuple[int, int]:
        """(generation, batch) thread counts after defaults."""
        gen_cpus, batch_cpus = self._gen_cpus(), self._batch_cpus()
        n = self.n if self.n is not None else (physical_cores(list(gen_cpus)) if gen_cpus else default_threads())
        if self.batch is not None:
            batch = self.batch
        elif self.n is not None and batch_cpus is None:
            batch = self.n
        else:
            batch = len(batch_cpus) if batch_cpus else default_threads_batch()
        return n, batch

    def pools(self) -> tuple[_native.PoolParams, _native.PoolParams]:
        """The native threadpool settings for generation and for batches."""
        n, batch = self.resolve()
        out: list[_native.PoolParams] = []
        for threads, cpus in ((n, self._gen_cpus()), (batch, self._batch_cpus())):
            p = _native.PoolParams()
            p.n_threads, p.cpus, p.strict = threads, list(cpus or ()), self.strict and cpus is not None
            p.priority, p.poll = PRIORITIES[self.priority], self.poll if self.poll is not None else 0 if self.n is None else 50
            # lamina's default counts adapt (cpp/tuner.h; the batch pool follows generation's); at poll
            # 0 the workers sleep at once between graphs, so those left out do not spin on freed CPUs
            p.adapt = self.n is None and (not out or self.batch is None)
            out.append(p)
        return out[0], out[1]

    def describe(self) -> str:
        n, batch = self.resolve()
        extra = [(self.cpus is not None, f"cpus {cpu_ranges(self._gen_cpus() or ())}"),
                 (self.batch_cpus is not None, f"batch cpus {cpu_ranges(self._batch_cpus() or ())}"),
                 (self.strict, "strict"), (self.priority != "normal", f"priority {self.priority}"),
                 (self.poll is not None, f"poll {self.poll}")]
        return ", ".join([f"{n} generation", f"{batch} batch"] + [text for given, text in extra if given])
