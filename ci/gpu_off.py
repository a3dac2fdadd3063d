#!/usr/bin/env python3
"""gpu=False must not touch the GPU: a process whose model has the GPU off holds 0 MiB on it.

A child process imports lamina, loads MODEL with gpu=False and a leftover n_gpu_layers=99,
generates, and waits; meanwhile this process reads nvidia-smi: the child's own entry among the
GPU's compute processes (a CUDA context; the check) and the device's memory in use (for context:
initialising the driver, which ggml's CUDA backend does when it registers, moves it by a few MiB
without giving the process a context). A child that calls lamina.devices() (which asks every
device for its memory) is the control: it must show up.
usage: python ci/gpu_off.py MODEL      (exits 1 when the gpu=False child holds GPU memory)
"""
from __future__ import annotations

import subprocess
import sys
import time

CHILDREN = {
    "baseline: import numpy": "import numpy",
    "driver only: cuInit(0) through libcuda": "import ctypes; assert ctypes.CDLL('libcuda.so.1').cuInit(0) == 0",
    "import lamina": "import lamina",
    "gpu=False, n_gpu_layers=99, generate": (
        "import numpy, lamina; m = lamina.Model({model!r}, gpu=False, n_gpu_layers=99); c = m.context(n_ctx=512);"
        "r = c.complete('the sky is', max_tokens=16, ignore_eos=True); print(len(r.tokens), m.offload.reasons)"),
    "lamina.devices() (control: opens every device)": (
        "import lamina; print([(d.name, d.memory_free) for d in lamina.devices()])"),
    "lamina.devices(memory=False) + system_info-free listing": (
        "import lamina; print([d.name for d in lamina.devices(memory=False)])"),
}


def smi(query: str) -> list[str]:
    r = subprocess.run(["nvidia-smi", f"--query-{query}", "--format=csv,noheader,nounits"],
                       capture_output=True, text=True)
    return [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]


def main() -> int:
    model = sys.argv[1]
    bad = 0
    for name, code in CHILDREN.items():
        base = smi("gpu=memory.used")
        child = subprocess.Popen([sys.executable, "-c", code.format(model=model) + "; print('READY', flush=True); input()"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdin is not None
        lines = []
        for line in child.stdout:
            lines.append(line.strip())
            if line.startswith("READY"):
                break
        time.sleep(1.0)
        during = smi("gpu=memory.used")
        apps = [a for a in smi("compute-apps=pid,used_memory") if a.split(",")[0].strip() == str(child.pid)]
        child.stdin.write("\n")
        child.stdin.flush()
        child.wait(timeout=60)
        held = [int(d) - int(b) for b, d in zip(base, during)]
        print(f"{name}: {' / '.join(lines[:-1])[:160]}")
        print(f"   memory.used MiB before {base} during {during} (delta {held}); child's compute-app entry: {apps or 'none'}")
        if name.startswith("gpu=False") and apps:
            bad += 1
        if name.startswith("lamina.devices()") and not apps:
            print("   the control did not show up: this nvidia-smi cannot see per-process contexts")
            bad += 1
    print("gpu_off:", "FAILED" if bad else "ok: the gpu=False process has no CUDA context (nvidia-smi lists no memory for it)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
