#!/usr/bin/env python3
"""An atheris (libFuzzer) target: GGUF model files patched by the fuzzer's bytes, loaded in-process.

usage: pip install atheris; python ci/fuzz_atheris.py [CORPUS_DIR] -runs=5000 [-max_len=256]
Each input picks one of ci/fuzz.py's base files and overwrites a stretch of its metadata (header,
key/value pairs, tensor infos) with the input's bytes, then loads it with lamina.Model(gpu=False)
and generates 2 tokens. A Python exception is the expected outcome; a signal ends the run with
libFuzzer's crash report and the input saved. The wheel's libFuzzer sees Python coverage only
(the native code is not built with -fsanitize=fuzzer), so ci/fuzz.py's typed mutations remain the
main search; this target adds byte-level splices the typed ones do not make.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
with atheris.instrument_imports():
    from fuzz import BASES, layout  # noqa: E402
    from tiny_gguf import write_tiny_llama  # noqa: E402

import lamina  # noqa: E402

WORK = Path(tempfile.mkdtemp(prefix="lamina-atheris-"))
FILES = []
for i, (_, kw) in enumerate(BASES):
    p = write_tiny_llama(WORK / f"base{i}.gguf", **kw)
    lay = layout(p)
    FILES.append((p.read_bytes(), lay.kv_end + 4096))  # the metadata, and some tensor infos
CASE = WORK / "case.gguf"


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    base, meta_end = FILES[fdp.ConsumeIntInRange(0, len(FILES) - 1)]
    at = fdp.ConsumeIntInRange(0, meta_end)
    patch = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64))
    CASE.write_bytes(base[:at] + patch + base[at + len(patch):])
    try:
        with lamina.Model(CASE, gpu=False) as m, m.context(n_ctx=64, threads=1) as c:
            c.complete("Hello\n wörld", max_tokens=2)
    except Exception:  # noqa: BLE001 - a Python exception is the good outcome
        pass


if __name__ == "__main__":
    lamina.logger.setLevel("CRITICAL")
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
