#!/usr/bin/env python3
"""lamina beside other GPU work in the same process (issue 30), every layer on GPU 0.

A Python thread keeps the GPU busy with torch, cupy or jax, `a = tanh(a @ a)` in a loop, on the
library's default stream or on a side stream of its own, while the main thread generates.
- lamina: the time of --tokens greedy tokens alone, and with the busy thread (which never waits,
  so its queue is as deep as the driver lets it grow, as in ordinary torch code);
- the busy library: its step time alone, and while lamina generates in another thread (the thread
  synchronizes every 10 steps to time them).
Medians of --reps runs. A case whose first busy run takes longer than --cap seconds is not
repeated. usage: python ci/gpu_share.py MODEL [--tokens 32] [--reps 3] [--libs torch,cupy,jax]
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any, Callable

import lamina


def busy_step(lib: str, n: int, side: bool) -> tuple[Callable[[], None], Callable[[], None], Any]:
    """(step, sync, stream context) for one library: step queues one a = tanh(a @ a)."""
    if lib == "torch":
        import torch

        stream = torch.cuda.Stream() if side else torch.cuda.default_stream()
        with torch.cuda.stream(stream):
            box = [torch.randn(n, n, device="cuda") / n ** 0.5]

        def step() -> None:
            with torch.cuda.stream(stream):
                box[0] = (box[0] @ box[0]).tanh()
        return step, stream.synchronize, stream
    if lib == "cupy":
        import cupy as cp

        stream = cp.cuda.Stream(non_blocking=True) if side else cp.cuda.Stream.null
        with stream:
            box = [cp.random.randn(n, n, dtype=cp.float32) / n ** 0.5]

        def step() -> None:
            with stream:
                box[0] = cp.tanh(box[0] @ box[0])
        return step, stream.synchronize, stream
    if lib == "jax":
        import jax
        import jax.numpy as jnp

        f = jax.jit(lambda a: jnp.tanh(a @ a))
        box = [jax.random.normal(jax.random.PRNGKey(0), (n, n)) / n ** 0.5]

        def step() -> None:
            box[0] = f(box[0])
        return step, lambda: box[0].block_until_ready(), None
    raise ValueError(lib)


class Busy(threading.Thread):
    """Runs step in a loop until stopped; with sync_every, times each group of steps."""

    def __init__(self, step: Callable[[], None], sync: Callable[[], None], sync_every: int = 0) -> None:
        super().__init__(daemon=True)
        self.step, self.sync, self.sync_every = step, sync, sync_every
        self.stop = threading.Event()
        self.step_ms: list[float] = []

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            for _ in range(max(1, self.sync_every)):
                self.step()
            if self.sync_every:
                self.sync()
                self.step_ms.append((time.perf_counter() - t0) * 1e3 / self.sync_every)
        self.sync()

    def end(self) -> None:
        self.stop.set()
        self.join()


def generate(ctx: lamina.Context, tokens: int) -> float:
    t0 = time.perf_counter()
    out = ctx.complete("The history of the city begins", max_tokens=tokens, ignore_eos=True)
    assert len(out.tokens) == tokens
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--libs", default="torch,cupy,jax")
    ap.add_argument("--sizes", default="1024,2048")
    ap.add_argument("--cap", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=0, help="the context's threads (0: lamina's default)")
    a = ap.parse_args()
    model = lamina.Model(a.model, n_gpu_layers="all")
    ctx = model.context(n_ctx=512, **({"threads": a.threads} if a.threads else {}))
    generate(ctx, a.tokens)  # warm-up (graphs, pools)
    print(f"lamina {a.tokens} tokens, model {a.model}, {ctx.threads} threads; device "
          f"{lamina.devices(memory=False)[0].description}")
    print("| library | matrix | stream | lamina alone ms | lamina beside it ms | slowdown "
          "| its step alone ms | its step beside lamina ms | its slowdown |")
    print("|---|---|---|---|---|---|---|---|---|")
    for lib in a.libs.split(","):
        for n in map(int, a.sizes.split(",")):
            for side in ((False, True) if lib != "jax" else (False,)):
                try:
                    step, sync, _ = busy_step(lib, n, side)
                except ImportError as exc:
                    print(f"| {lib} | {n}² | - | not installed: {exc} |")
                    break
                for _ in range(3):
                    step()
                sync()
                alone = statistics.median(generate(ctx, a.tokens) for _ in range(a.reps))
                busy = Busy(step, sync)
                busy.start()
                time.sleep(0.5)  # let its queue fill
                beside = []
                for _ in range(a.reps):
                    beside.append(generate(ctx, a.tokens))
                    if beside[-1] > a.cap * 1e3:
                        break
                busy.end()
                timer = Busy(step, sync, sync_every=10)
                timer.start()
                time.sleep(1.0)
                timer.end()
                step_alone = statistics.median(timer.step_ms[1:] or timer.step_ms)
                stop = threading.Event()

                def keep_generating() -> None:
                    while not stop.is_set():
                        generate(ctx, a.tokens)
                gen = threading.Thread(target=keep_generating, daemon=True)
                gen.start()
                time.sleep(0.2)
                timer = Busy(step, sync, sync_every=10)
                timer.start()
                time.sleep(1.0)
                timer.end()
                stop.set()
                gen.join()
                step_beside = statistics.median(timer.step_ms[1:] or timer.step_ms)
                b = statistics.median(beside)
                print(f"| {lib} | {n}² | {'side' if side else 'default'} | {alone:.1f} | {b:.1f} | {b / alone:.2f}× "
                      f"| {step_alone:.3f} | {step_beside:.3f} | {step_beside / step_alone:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
