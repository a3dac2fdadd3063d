#!/usr/bin/env python3
"""Memory over many load -> context -> generate -> close cycles: RSS, and device memory on a GPU.

usage: python ci/leaks.py [--model PATH] [--cycles 200] [--warmup 10] [--gpu] [--n-ctx 512]
Prints RSS (and the free memory of each GPU as lamina.devices() reports it) after the warm-up and
every 50 cycles, then the growth per cycle. The default model is the tiny test model.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def gpu_free() -> list[int]:
    import lamina

    return [d.memory_free for d in lamina.devices() if d.kind == "gpu"]


def cycle(path: Path, gpu: bool, n_ctx: int) -> None:
    import lamina

    with lamina.Model(path, gpu=gpu, n_gpu_layers="all" if gpu else 0) as m, \
            m.context(n_ctx=n_ctx, threads=2) as c:
        c.complete("Hello world, the capital of France is", max_tokens=8, ignore_eos=True)
        c.save_state()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--n-ctx", type=int, default=512)
    a = ap.parse_args()
    import lamina

    lamina.logger.setLevel("ERROR")
    path = a.model
    if path is None:
        from tiny_gguf import write_tiny_llama

        path = write_tiny_llama(Path(tempfile.mkdtemp()) / "tiny.gguf")
    free0 = gpu_free() if a.gpu else []
    for _ in range(a.warmup):
        cycle(path, a.gpu, a.n_ctx)
    gc.collect()
    r0 = rss_bytes()
    free_w = gpu_free() if a.gpu else []
    print(f"after {a.warmup} warm-up cycles: RSS {r0 / 2**20:.1f} MiB" +
          (f"; GPU free {[f >> 20 for f in free_w]} MiB (before any load {[f >> 20 for f in free0]})" if a.gpu else ""))
    for i in range(1, a.cycles + 1):
        cycle(path, a.gpu, a.n_ctx)
        if i % 50 == 0 or i == a.cycles:
            gc.collect()
            extra = f"; GPU free {[f >> 20 for f in gpu_free()]} MiB" if a.gpu else ""
            print(f"cycle {i}: RSS {rss_bytes() / 2**20:.1f} MiB{extra}", flush=True)
    r1 = rss_bytes()
    print(f"RSS growth over {a.cycles} cycles: {(r1 - r0) / 2**20:+.2f} MiB ({(r1 - r0) / a.cycles / 1024:+.1f} KiB/cycle)")
    if a.gpu:
        free1 = gpu_free()
        print(f"GPU free after the last close vs before the first load: "
              f"{[(b - f) >> 20 for f, b in zip(free0, free1)]} MiB difference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
