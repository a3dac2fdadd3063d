#!/usr/bin/env python3
"""Typed fuzzing of GGUF model files: which malformed files kill the process?

Each case mutates one typed field of a tiny valid model (tests/tiny_gguf.py), chosen and filled
from a seed, so a case number always makes the same file:
  count   string/array lengths, tensor and KV counts (u64)
  type    value types, array item types, tensor types (u32)
  dims    tensor n_dims and dimensions, tensor data offsets
  hparam  llama.* hyperparameters: 0, 1, huge, negative, NaN, inf
  vocab   token strings (byte tokens as <0xNN>, broken) and token types
  bytes   string bytes flipped; a truncated file; random byte flips
Every case runs in a forked child that loads the file with lamina.Model(path, gpu=False) and
generates 2 tokens, and is classified: loaded / raised (a Python exception) / signal / hang.

usage: python ci/fuzz.py [--cases 1000] [--seed 0] [--timeout 20] [--save DIR] [--jobs 2]
Exits 1 when any case ends in a signal or a hang; --save keeps those files with their
stderr tail for reproduction.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_gguf import write_tiny_llama  # noqa: E402


@dataclass(frozen=True)
class Target:
    offset: int
    fmt: str      # struct format of the field ('<Q', '<I', '<f', ...), or 'bytes'
    size: int
    kind: str
    what: str


def targets(path: Path) -> list[Target]:
    """Every typed field of the file with its byte offset, from gguf-py's reader."""
    import gguf

    r = gguf.GGUFReader(str(path))
    out: list[Target] = []
    fmts = {np.dtype("uint8"): "<B", np.dtype("int8"): "<b", np.dtype("uint16"): "<H", np.dtype("int16"): "<h",
            np.dtype("uint32"): "<I", np.dtype("int32"): "<i", np.dtype("float32"): "<f",
            np.dtype("uint64"): "<Q", np.dtype("int64"): "<q", np.dtype("float64"): "<d", np.dtype("bool"): "<?"}
    for name, field in r.fields.items():
        off = field.offset
        for i, part in enumerate(field.parts):
            nbytes = int(part.nbytes)
            if name.startswith("GGUF."):
                kind = "count" if name != "GGUF.version" else "type"
                out.append(Target(off, fmts[part.dtype], nbytes, kind, name))
            elif part.dtype == np.uint8 and nbytes > 1:
                kind = "vocab" if name == "tokenizer.ggml.tokens" else "bytes"
                out.append(Target(off, "bytes", nbytes, kind, f"{name}[part {i}] bytes"))
            elif part.size == 1:
                fmt = fmts[part.dtype]
                if name == "tokenizer.ggml.tokens" and part.dtype == np.uint8:
                    kind = "vocab"  # a one-byte token
                elif i == 0 or (part.dtype == np.uint64 and i in (3,)):
                    kind = "count"  # key length, array count
                elif i == 2:
                    kind = "type"   # value type
                elif name.startswith("llama."):
                    kind = "hparam"
                elif name == "tokenizer.ggml.token_type":
                    kind = "vocab"
                elif part.dtype == np.uint64:
                    kind = "count"  # string length inside a value
                else:
                    kind = "type" if i == 3 and field.types and field.types[0] == gguf.GGUFValueType.ARRAY else "hparam"
                out.append(Target(off, fmt, nbytes, kind, f"{name}[part {i}]"))
            off += nbytes
    for t in r.tensors:
        off = t.field.offset
        for i, part in enumerate(t.field.parts):
            nbytes = int(part.nbytes)
            if i == 0:
                out.append(Target(off, "<Q", 8, "count", f"tensor {t.name} name length"))
            elif i == 2:
                out.append(Target(off, "<I", 4, "dims", f"tensor {t.name} n_dims"))
            elif i == 3:
                for d in range(part.size):
                    out.append(Target(off + 8 * d, "<Q", 8, "dims", f"tensor {t.name} dim {d}"))
            elif i == 4:
                out.append(Target(off, "<I", 4, "type", f"tensor {t.name} type"))
            elif i == 5:
                out.append(Target(off, "<Q", 8, "dims", f"tensor {t.name} data offset"))
            off += nbytes
    return out


def numeric_values(fmt: str, old: float, rng: random.Random) -> float:
    if fmt in ("<f", "<d"):
        return rng.choice([0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"), -float("inf"), old * 1000, -old])
    bits = struct.calcsize(fmt) * 8
    top = (1 << bits) - 1
    signed = fmt[1].islower() and fmt[1] != "?"
    choices = [0, 1, 2, top, top - 1, top >> 1, (top >> 1) + 1, int(old) * 2 + 1, int(old) + 1,
               max(0, int(old) - 1), rng.randrange(0, top + 1), 1 << (bits // 2), 1 << (bits - 8)]
    v = rng.choice(choices)
    if signed and v > (top >> 1):
        v -= top + 1
    return v


def mutate(base: bytes, fields: list[Target], case: int, seed: int) -> tuple[bytes, str]:
    rng = random.Random(seed * 1_000_003 + case)
    data = bytearray(base)
    roll = rng.random()
    if roll < 0.04:
        cut = rng.randrange(0, len(data))
        return bytes(data[:cut]), f"truncated to {cut} bytes"
    if roll < 0.08:
        flips = [rng.randrange(0, len(data)) for _ in range(rng.randint(1, 8))]
        for i in flips:
            data[i] ^= 1 << rng.randrange(8)
        return bytes(data), f"bit flips at {flips}"
    kinds = sorted({f.kind for f in fields})
    kind = rng.choice(kinds)
    t = rng.choice([f for f in fields if f.kind == kind])
    if t.fmt == "bytes":
        chunk = bytearray(data[t.offset:t.offset + t.size])
        if kind == "vocab" and rng.random() < 0.5:
            fake = rng.choice([b"<0x", b"<0xZZ>", b"<0x1>", b"<0x100>", b"<0xG0>", b"<>", b"\xff\xfe", b"<0x0A"])
            chunk[:len(fake)] = fake[:len(chunk)]
        else:
            for _ in range(rng.randint(1, 3)):
                chunk[rng.randrange(len(chunk))] = rng.randrange(256)
        data[t.offset:t.offset + t.size] = chunk[:t.size]
        return bytes(data), f"{t.what}: bytes -> {bytes(chunk[:16])!r}"
    (old,) = struct.unpack_from(t.fmt, data, t.offset)
    new = numeric_values(t.fmt, old, rng)
    struct.pack_into(t.fmt, data, t.offset, new)
    return bytes(data), f"{t.what} ({t.kind}): {old} -> {new}"


def run_case(path: Path, timeout: float) -> tuple[str, str]:
    err = tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:  # the child: load, generate, report by exit code
        os.dup2(err.fileno(), 2)
        os.environ["GGML_NO_BACKTRACE"] = "1"  # ggml's abort handler would run gdb
        code = 3
        try:
            import lamina

            with lamina.Model(path, gpu=False) as m, m.context(n_ctx=64, threads=1) as c:
                c.complete([1, 5, 6], max_tokens=2)
            code = 0
        except Exception:  # noqa: BLE001 - any Python exception is the good outcome
            code = 1
        os._exit(code)
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
            break
        time.sleep(0.005)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        outcome = "hang"
    elif os.WIFSIGNALED(status):
        outcome = "signal " + signal.Signals(os.WTERMSIG(status)).name
    else:
        outcome = {0: "loaded", 1: "raised"}.get(os.WEXITSTATUS(status), f"exit {os.WEXITSTATUS(status)}")
    err.seek(0)
    lines = [ln for ln in err.read().decode(errors="replace").splitlines() if ln.strip()]
    err.close()
    asserts = [ln for ln in lines if "GGML_ASSERT" in ln or "GGML_ABORT" in ln or "terminate" in ln or "error" in ln]
    return outcome, (asserts or lines or [""])[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--first", type=int, default=0, help="first case number")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--save", type=Path, help="keep files that end in a signal or a hang here")
    a = ap.parse_args()
    import lamina  # noqa: F401 - imported once in the parent; each child loads a model of its own

    work = Path(tempfile.mkdtemp(prefix="lamina-fuzz-"))
    base_path = write_tiny_llama(work / "base.gguf")
    base = base_path.read_bytes()
    fields = targets(base_path)
    counts: Counter[str] = Counter()
    bad: list[str] = []
    t0 = time.monotonic()
    for case in range(a.first, a.first + a.cases):
        data, what = mutate(base, fields, case, a.seed)
        path = work / "case.gguf"
        path.write_bytes(data)
        outcome, tail = run_case(path, a.timeout)
        counts[outcome.split()[0]] += 1
        if outcome.startswith(("signal", "hang")):
            line = f"case {case}: {outcome}: {what} | {tail[:200]}"
            bad.append(line)
            print(line, flush=True)
            if a.save:
                a.save.mkdir(parents=True, exist_ok=True)
                (a.save / f"case{case}.gguf").write_bytes(data)
    dt = time.monotonic() - t0
    print(f"fuzz: {a.cases} cases (seed {a.seed}, from {a.first}) in {dt:.0f} s: " +
          ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f"; {len(fields)} typed fields")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
