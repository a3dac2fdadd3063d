#!/usr/bin/env python3
"""What swapping LoRA adapters costs on Gemma 3 270M (the default model), on the CPU.

Two random rank-16 f16 adapters over attn_q/k/v/output and ffn_gate/up/down of every layer
(tests/tiny_gguf.py write_tiny_lora), loaded once; then, 9 times: set_lora (the swap: llama.cpp's
adapter set, and the KV cache cleared), the prompt decoded right after it (llama.cpp reserves its
graph again on the first decode after a change), the same prompt again with the adapter in place,
and tg of 32 tokens with and without an adapter. Medians.

usage: python ci/lora_swap.py [-t THREADS]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import lamina  # noqa: E402
from tiny_gguf import write_tiny_lora  # noqa: E402

TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-t", "--threads", type=int, default=lamina.default_threads())
    args = ap.parse_args()
    path = lamina.default_model_path()
    med = statistics.median
    with tempfile.TemporaryDirectory() as d:
        a, b = (write_tiny_lora(Path(d) / f"{n}.gguf", path, rank=16, targets=TARGETS, scale=0.01, f16=True, seed=s)
                for n, s in (("a", 1), ("b", 2)))
        with lamina.Model(path, gpu=False) as model:
            t = time.perf_counter()
            la = model.load_lora(a)
            t_load = time.perf_counter() - t
            lb = model.load_lora(b)
            ctx = model.context(n_ctx=1024, threads=args.threads)
            toks = model.tokenize("The quick brown fox jumps over the lazy dog. " * 4)

            def tg() -> float:
                ctx.kv_clear()
                g = ctx.generate(toks, max_tokens=32, ignore_eos=True)
                "".join(g)
                return float(g.stats["tokens_per_s"])

            def prompt() -> float:
                ctx.kv_clear()
                t = time.perf_counter()
                ctx.decode(toks)
                return time.perf_counter() - t

            tg()
            swap, after, steady, plain, tg_plain, tg_lora = [], [], [], [], [], []
            for i in range(9):
                ctx.set_lora(None)
                prompt()
                plain.append(prompt())
                tg_plain.append(tg())
                t = time.perf_counter()
                ctx.set_lora({la if i % 2 else lb: 1.0})
                swap.append(time.perf_counter() - t)
                t = time.perf_counter()
                ctx.decode(toks)  # the cache was cleared by the swap
                after.append(time.perf_counter() - t)
                steady.append(prompt())
                tg_lora.append(tg())
            ctx.close()
        size = a.stat().st_size
    print(f"{size / 1e6:.1f} MB adapters (rank 16, f16); threads {args.threads}")
    print(f"load_lora {t_load * 1e3:.1f} ms; set_lora (swap) {med(swap) * 1e3:.2f} ms")
    print(f"prompt of {len(toks)} tokens: {med(after) * 1e3:.1f} ms right after a swap, {med(steady) * 1e3:.1f} ms "
          f"with the adapter in place, {med(plain) * 1e3:.1f} ms without an adapter")
    print(f"tg32 t/s: {med(tg_plain):.1f} without an adapter, {med(tg_lora):.1f} with one")


if __name__ == "__main__":
    main()
