#!/usr/bin/env python3
"""lamina vs llama-bench from the same pinned source, side by side (a wrapper over `lamina bench --compare`).

usage: python ci/bench_generate.py [--model PATH|tiny] [-t 2] [-n 128] [-p 512] [-r 5] [--rounds 2] [--json F]
       --model tiny writes the 2-layer, 64-wide random model of the tests (per-token overhead).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import lamina
from lamina.cli import bench


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("-t", "--threads", default=str(lamina.default_threads()), help="comma list")
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-r", "--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--llama-bench", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("-ngl", "--n-gpu-layers", default="auto", help="int, 'all' or 'auto'")
    ap.add_argument("--no-gpu", action="store_true")
    ap.add_argument("--backend-sampling", action="store_true", help="greedy argmax inside the graph (experimental)")
    args = ap.parse_args()
    if args.model == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny_gguf import write_tiny_llama

        path = write_tiny_llama(Path(tempfile.mkdtemp()) / "tiny.gguf")
    else:
        path = Path(args.model) if args.model else lamina.default_model_path()
    ngl = args.n_gpu_layers if args.n_gpu_layers in ("all", "auto") else int(args.n_gpu_layers)
    model = lamina.Model(path, gpu=not args.no_gpu, n_gpu_layers=ngl)
    print(model.offload, file=sys.stderr)
    results = bench.run(model, n_prompt=args.n_prompt, n_gen=args.n_gen,
                        threads=[int(t) for t in args.threads.split(",")], reps=args.reps, compare=True,
                        rounds=args.rounds, bench=Path(args.llama_bench) if args.llama_bench else None,
                        backend_sampling=args.backend_sampling)
    print(bench.markdown(model, results))
    if args.json:
        Path(args.json).write_text(json.dumps([r.as_dict() for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
