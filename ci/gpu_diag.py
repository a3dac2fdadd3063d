#!/usr/bin/env python3
"""Load variants of the tiny test model on a GPU machine, each in its own process: which crash?
usage: python ci/gpu_diag.py OUTDIR   (prints one line per variant; writes the tiny models to OUTDIR)"""
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_gguf import write_tiny_llama  # noqa: E402

out = Path(sys.argv[1])
models = {
    "tiny-f32": write_tiny_llama(out / "tiny.gguf"),
    "tiny-f16": write_tiny_llama(out / "tiny16.gguf", f16=True),
    "wide-f32": write_tiny_llama(out / "wide.gguf", n_embd=256, n_head=4, n_head_kv=4, n_ff=512),
}
variants = [("tiny-f32", "gpu=False"), ("tiny-f32", "n_gpu_layers=0"), ("tiny-f32", "n_gpu_layers=1"),
            ("tiny-f32", "n_gpu_layers='all'"), ("tiny-f32", "use_mmap=False"), ("tiny-f16", "n_gpu_layers='all'"),
            ("wide-f32", "n_gpu_layers='all'")]
for name, kw in variants:
    code = (f"import lamina; m = lamina.Model({str(models[name])!r}, {kw}); "
            f"c = m.context(n_ctx=64); print(repr(c.complete('the sky', max_tokens=4).text))")
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True, timeout=120)
    print(f"{name:9} {kw:22} rc={r.returncode} {r.stdout.strip()[:40]} {r.stderr.strip().splitlines()[-1][:120] if r.returncode else ''}")
