#!/usr/bin/env python3
"""lamina's default generation threads beside busy CPUs (issue 30), against every fixed count.

Conditions: alone; a Python thread spinning in this process; another process spinning (one per
--busy CPU). In each, tg of --tokens greedy tokens with lamina's default threads and with each
fixed count 1..n (n: the default's pool), runs interleaved, best and median of --reps. The
default's ratio to the best fixed count (of bests, and of medians) is the figure of merit.
usage: python ci/busy_cpu.py [--model PATH] [--tokens 96] [--reps 3] [--busy 1]
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import threading
import time
from typing import Any, Callable

import lamina
from lamina.models import default_model_path


def spin_process(stop: Any) -> None:
    while not stop.is_set():
        pass


def threads_of(count: str | None) -> lamina.Threads | None:
    """None (lamina's default), "N" (N threads) or "Np0" (N threads, poll 0)."""
    if count is None:
        return None
    n, _, poll = count.partition("p")
    return lamina.Threads(n=int(n), **({"poll": int(poll)} if poll else {}))


PARTS: dict[str | None, list[tuple[float, float]]] = {}  # per count: (prompt ms, generation t/s) of each run


def tg(model: lamina.Model, threads: str | None, tokens: int) -> tuple[float, str]:
    """(tokens per second, the context's generation threads) of one fresh context."""
    with model.context(n_ctx=512, threads=threads_of(threads)) as ctx:
        t0 = time.perf_counter()
        out = ctx.complete("The history of the city begins", max_tokens=tokens, ignore_eos=True)
        dt = time.perf_counter() - t0
        assert len(out.tokens) == tokens
        prompt_ms = 1e3 * out.n_prompt_eval / out.prompt_tokens_per_s if out.prompt_tokens_per_s else 0.0
        PARTS.setdefault(threads, []).append((prompt_ms, out.tokens_per_s))
        return tokens / dt, f"{ctx.threads[0]} ({ctx.threads_why})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a GGUF (default: Gemma 3 270M from the test cache)")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--busy", type=int, default=1, help="spinning threads / processes")
    ap.add_argument("--counts", default="", help="fixed counts to compare, N or Np0 (poll 0) (default: 1..the default pool)")
    ap.add_argument("--conditions", default="alone,thread,process")
    ap.add_argument("--gpu", action="store_true", help="load with the GPU on (default: gpu=False)")
    a = ap.parse_args()
    path = a.model or str(default_model_path())
    model = lamina.Model(path, gpu=a.gpu)
    n_default = lamina.Threads().resolve()[0]
    fixed = a.counts.split(",") if a.counts else [str(n) for n in range(1, n_default + 1)]
    counts: list[str | None] = [None, *fixed]
    tg(model, None, 8)  # warm-up
    PARTS.clear()

    def alone() -> Callable[[], None]:
        return lambda: None

    def python_thread() -> Callable[[], None]:
        stop = threading.Event()

        def spin() -> None:
            while not stop.is_set():
                pass
        ts = [threading.Thread(target=spin, daemon=True) for _ in range(a.busy)]
        for t in ts:
            t.start()
        return lambda: (stop.set(), [t.join() for t in ts])

    def other_process() -> Callable[[], None]:
        stop = multiprocessing.Event()
        ps = [multiprocessing.Process(target=spin_process, args=(stop,), daemon=True) for _ in range(a.busy)]
        for p in ps:
            p.start()
        return lambda: (stop.set(), [p.join() for p in ps])

    print(f"model {path}; {a.tokens} tokens; default pool {n_default} threads; best / median of {a.reps}; "
          f"{a.busy} busy")
    print("| condition | " + " | ".join("default" if c is None else f"{c} thr" for c in counts) +
          " | default / best fixed: best, median | the default's choice |")
    print("|---" * (len(counts) + 3) + "|")
    conditions = {"alone": ("alone", alone), "thread": ("a spinning Python thread", python_thread),
                  "process": ("a spinning process", other_process)}
    for name, start in (conditions[c] for c in a.conditions.split(",")):
        end = start()
        time.sleep(0.3)
        runs: dict[str | None, list[float]] = {c: [] for c in counts}
        choice = ""
        for _ in range(a.reps):
            for c in counts:
                ts, why = tg(model, c, a.tokens)
                runs[c].append(ts)
                if c is None:
                    choice = why
        end()
        parts = "; ".join(f"{c or 'default'}: " + ", ".join(f"{p:.0f} ms + {g:.1f} t/s" for p, g in PARTS.pop(c, []))
                          for c in counts)
        print(f"<!-- {name}: prompt ms + generation t/s per run: {parts} -->", flush=True)
        best_fixed = max(max(runs[c]) for c in counts if c is not None)
        best_median = max(statistics.median(runs[c]) for c in counts if c is not None)
        cells = " | ".join(f"{max(runs[c]):.1f} / {statistics.median(runs[c]):.1f}" for c in counts)
        print(f"| {name} | {cells} | {max(runs[None]) / best_fixed:.3f}, "
              f"{statistics.median(runs[None]) / best_median:.3f} | {choice} |", flush=True)


if __name__ == "__main__":
    main()
