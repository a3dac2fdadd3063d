#!/usr/bin/env python3
"""lamina next to other libraries, in both orders, each case in a fresh process.

"before": the other library is imported (and, for frameworks, holds an array on the GPU) before
`import lamina`; lamina then loads MODEL with n_gpu_layers=NGL and generates while that array is
still alive. "after": lamina loads and generates first, then the library is imported and puts an
array on the GPU, and lamina generates again. A case whose library is not installed says so.

usage: python ci/import_matrix.py MODEL [--ngl all] [--cases numpy,torch,...] [--timeout 180]
Exits 1 when any installed case fails (a signal, a hang or an exception).
"""
from __future__ import annotations

import argparse
import importlib.util
import signal
import subprocess
import sys

# name -> (module that must be installed, code that imports it and keeps a GPU array alive in `held`)
CASES = {
    "nothing": (None, "held = None"),
    "numpy": ("numpy", "import numpy; held = numpy.ones(1 << 20)"),
    "torch": ("torch", "import torch; held = torch.ones(4)"),
    "torch-gpu": ("torch", "import torch; held = torch.ones(1 << 26, device='cuda' if torch.cuda.is_available() else 'cpu'); "
                           "held.sum().item()"),
    "jax": ("jax", "import jax, jax.numpy as jnp; held = jnp.ones(1 << 26); held.block_until_ready()"),
    "cupy": ("cupy", "import cupy; held = cupy.ones(1 << 26); cupy.cuda.runtime.deviceSynchronize()"),
    "transformers": ("transformers", "import transformers; held = transformers.__version__"),
    "tokenizers": ("tokenizers", "import tokenizers; held = tokenizers.__version__"),
    "sentencepiece": ("sentencepiece", "import sentencepiece; held = sentencepiece.__version__"),
    "onnxruntime": ("onnxruntime", "import onnxruntime; held = onnxruntime.get_device()"),
}

LAMINA = """
import lamina
m = lamina.Model({model!r}, n_gpu_layers={ngl!r}, n_ctx=256)
ctx = m.context(n_ctx=256)
def gen():
    return list(ctx.complete("the sky is", max_tokens=4, ignore_eos=True).tokens)
first = gen()
"""


def run_case(name: str, order: str, model: str, ngl: object, timeout: float) -> str:
    _mod, setup = CASES[name]
    if order == "before":
        code = setup + "\n" + LAMINA.format(model=model, ngl=ngl) + "print('tokens', first, 'held', type(held).__name__)\n"
    else:
        code = (LAMINA.format(model=model, ngl=ngl) + setup + "\nsecond = gen()\n"
                "assert second == first, (first, second)\nprint('tokens', first, 'held', type(held).__name__)\n")
    try:
        flags = ["-S"] if sys.flags.no_site else []  # keep the caller's view of site-packages (vulkan_offload.sh)
        r = subprocess.run([sys.executable, *flags, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"HANG (> {timeout:.0f} s)"
    if r.returncode < 0:
        return f"SIGNAL {signal.Signals(-r.returncode).name}: " + " | ".join(r.stderr.strip().splitlines()[-3:])[:300]
    if r.returncode != 0:
        return f"FAILED rc={r.returncode}: " + (r.stderr.strip().splitlines() or ["?"])[-1][:300]
    return "ok " + r.stdout.strip().splitlines()[-1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--ngl", default="all")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--timeout", type=float, default=180)
    a = ap.parse_args()
    ngl: object = int(a.ngl) if a.ngl.isdigit() else a.ngl
    failed = 0
    for name in a.cases.split(","):
        mod = CASES[name][0]
        if mod is not None and importlib.util.find_spec(mod) is None:
            print(f"{name:14} {'':7} not installed")
            continue
        for order in ("before", "after"):
            res = run_case(name, order, a.model, ngl, a.timeout)
            failed += not res.startswith("ok")
            print(f"{name:14} {order:7} {res}", flush=True)
    print(f"import matrix: {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
