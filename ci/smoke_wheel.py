"""The check ci/smoke-wheel runs inside a fresh venv with one wheel installed (an import alone proves
nothing): the backend is registered, a device of it is listed, a model's layers are placed on it,
and tokens come out.

usage (inside the venv): python smoke_wheel.py [--backend CPU|CUDA|Vulkan|Metal] [--model PATH]
Prints one JSON line with what it saw; exits 1 with the reason when a check fails.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def fail(why: str, seen: dict[str, object]) -> None:
    print(json.dumps({**seen, "ok": False, "why": why}))
    sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="CPU", help="the ggml backend the wheel must bring")
    ap.add_argument("--model", type=Path, help="a GGUF file (default: the tiny test model, written here)")
    ap.add_argument("--tiny-gguf", type=Path, help="tests/tiny_gguf.py of the source tree")
    ap.add_argument("--import-first", action="append", default=[], help="modules imported before lamina (torch)")
    ap.add_argument("--expect-no-addons", action="store_true", help="fail if any GPU add-on is reported")
    a = ap.parse_args()
    seen: dict[str, object] = {}
    for name in a.import_first:
        mod = __import__(name)
        seen[f"imported {name}"] = getattr(mod, "__version__", "?")
    if "torch" in a.import_first:  # torch's CUDA context first, as in a user's training process
        import torch

        seen["torch cuda"] = torch.cuda.is_available() and float(torch.ones(4, device="cuda").sum())
    import lamina

    info = lamina.system_info()
    seen.update({"lamina": lamina.__file__, "version": lamina.__version__,
                 "backends": [b["name"] for b in info.backends], "cpu_variant": info.cpu_variant,
                 "addons": [str(x) for x in info.addons]})
    if a.expect_no_addons and info.addons:
        fail("add-ons are still reported", seen)
    broken = [x for x in info.addons if not x.loaded]
    if broken:
        fail(f"an installed add-on did not load: {broken[0]}", seen)
    if a.model is None:
        sys.path.insert(0, str(a.tiny_gguf.parent))
        from tiny_gguf import write_tiny_llama

        a.model = write_tiny_llama(Path(tempfile.mkdtemp()) / "tiny.gguf")
    if a.backend.lower() not in [str(b).lower() for b in seen["backends"]]:  # type: ignore[union-attr]
        fail(f"backend {a.backend} is not registered", seen)
    devs = [d for d in lamina.devices() if d.backend.lower() == a.backend.lower()]
    seen["devices"] = [f"{d.name} [{d.kind}]" for d in devs]
    if not devs:
        fail(f"no {a.backend} device listed", seen)
    gpu = a.backend.upper() != "CPU"
    with lamina.Model(a.model, gpu=gpu, n_gpu_layers="all" if gpu else 0) as m:
        off = m.offload
        seen["offload"] = str(off).splitlines()[0]
        if gpu:
            on = sum(off.layers_on(d.name) for d in devs)
            seen["layers_on_backend"] = on
            if on < m.info.n_layer:
                fail(f"{on} of {m.info.n_layer} layers on {a.backend}", seen)
        with m.context(n_ctx=128) as c:
            out = c.complete("The sky is", max_tokens=4, ignore_eos=True)
        seen["tokens"] = [int(t) for t in out.tokens]
        if len(out.tokens) != 4:
            fail("generation returned fewer tokens", seen)
    print(json.dumps({**seen, "ok": True}))


if __name__ == "__main__":
    main()
