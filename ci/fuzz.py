#!/usr/bin/env python3
"""Typed fuzzing of GGUF model files: which malformed files kill the process?

Each case mutates one tiny valid model (tests/tiny_gguf.py: llama with a SentencePiece vocabulary,
llama with a byte-level BPE one and merges, or Gemma 3), chosen and filled from a seed, so a case
number always makes the same file:
  count   string/array lengths, tensor and KV counts (u64)
  type    value types, array item types, tensor types (u32)
  dims    tensor n_dims and dimensions, tensor data offsets
  hparam  <arch>.* hyperparameters and token ids: 0, 1, huge, negative, NaN, inf
  vocab   token strings (byte tokens as <0xNN>, broken) and token types
  bytes   string bytes flipped; a truncated file; random byte flips
  kv      a key/value pair added (experts, rope scaling, per-layer head counts, tokenizer model,
          merges, alignment, ...), dropped, or given another type; the file is re-laid out
Every case runs in a forked child that loads the file with lamina.Model(path, gpu=False), then
generates 2 tokens from token ids and 2 from a text prompt (tokenizer and detokenizer), and is
classified: loaded / raised (a lamina.LaminaError) / foreign (any other Python exception: a
message nanobind could not convert, a bare C++ error) / signal / exit (another exit code, such as a
sanitizer's) / hang.

usage: python ci/fuzz.py [--cases 1000] [--seed 0] [--first 0] [--timeout 20] [--save DIR]
Exits 1 when any case ends in a foreign exception, a signal, an odd exit or a hang; --save keeps those files for
reproduction (python ci/fuzz.py --replay FILE runs one file the same way).
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
from typing import Callable

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
                elif not name.startswith(("general.", "tokenizer.")):
                    kind = "hparam"  # <arch>.*
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
    v = rng.choice(choices) & top  # wrapped to the field's width (old * 2 + 1 may not fit)
    if signed and v > (top >> 1):
        v -= top + 1
    return v


# GGUF value types (gguf.h)
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
SCALAR_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
              U64: "<Q", I64: "<q", F64: "<d"}


def gguf_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv_bytes(key: str, vtype: int, value: object, item: int = U32) -> bytes:
    out = gguf_str(key) + struct.pack("<I", vtype)
    if vtype == ARR:
        items = list(value)  # type: ignore[call-overload]
        out += struct.pack("<IQ", item, len(items))
        return out + b"".join(gguf_str(v) if item == STR else struct.pack(SCALAR_FMT[item], v) for v in items)
    if vtype == STR:
        return out + gguf_str(value)  # type: ignore[arg-type]
    return out + struct.pack(SCALAR_FMT[vtype], value)


@dataclass(frozen=True)
class Layout:
    """Where the key/value section of a file lies, and each pair's bytes, for re-laying it out."""
    kv_start: int
    kv_end: int
    pairs: tuple[tuple[str, bytes], ...]
    arch: str
    n_layer: int


def layout(path: Path) -> Layout:
    import gguf

    r = gguf.GGUFReader(str(path))
    fields = [f for name, f in r.fields.items() if not name.startswith("GGUF.")]
    ends = [f.offset for f in fields[1:]] + [r.tensors[0].field.offset]
    data = path.read_bytes()
    pairs = tuple((f.name, data[f.offset:e]) for f, e in zip(fields, ends))
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    n_layer = int(r.fields[f"{arch}.block_count"].parts[-1][0])
    return Layout(fields[0].offset, ends[-1], pairs, arch, n_layer)


def relayout(base: bytes, lay: Layout, pairs: list[bytes]) -> bytes:
    """The file with its key/value section replaced; a padding pair keeps the tensor data aligned."""
    body = b"".join(pairs)
    delta = len(body) - (lay.kv_end - lay.kv_start)
    pad_len = (-(delta + len(kv_bytes("fuzz.pad", STR, b"")))) % 32
    body += kv_bytes("fuzz.pad", STR, b"x" * pad_len)
    head = bytearray(base[:lay.kv_start])
    struct.pack_into("<Q", head, 16, len(pairs) + 1)  # n_kv
    return bytes(head) + body + base[lay.kv_end:]


def random_value(rng: random.Random, n_layer: int) -> tuple[int, object, int]:
    """A (type, value, array item type) of any shape, with values near the edges."""
    kind = rng.choice(["int", "int", "float", "bool", "str", "arr_int", "arr_str", "arr_f32"])
    ints = [0, 1, 2, 3, 7, 8, 64, 255, 256, 512, 513, 1024, 1025, 2**16, 2**31 - 1, 2**32 - 1]
    if kind == "int":
        t = rng.choice([U32, I32, U64, I64, U8, U16])
        v = rng.choice(ints) % (1 << (struct.calcsize(SCALAR_FMT[t]) * 8 - (1 if t in (I32, I64) else 0)))
        return t, (-v if t in (I32, I64) and rng.random() < 0.2 else v), U32
    if kind == "float":
        return F32, rng.choice([0.0, -1.0, 1e-6, 1.0, 1e30, float("nan"), float("inf")]), U32
    if kind == "bool":
        return BOOL, rng.random() < 0.5, U32
    if kind == "str":
        return STR, rng.choice(["", "none", "linear", "yarn", "longrope", "bogus", "gpt2", "llama", "bert", "t5",
                                "rwkv", "plamo2", "default", "llama3", "<0x0A>", "x" * 300]), U32
    n = rng.choice([0, 1, n_layer - 1, n_layer, n_layer + 1, 600])
    if kind == "arr_int":
        return ARR, [rng.choice(ints[:12]) for _ in range(max(n, 0))], rng.choice([U32, I32])
    if kind == "arr_f32":
        return ARR, [rng.choice([0.0, 1.0, -1.0, float("nan")]) for _ in range(max(n, 0))], F32
    return ARR, [rng.choice(["a b", "ab", " ", "", "Ġ t", "<0xZZ>"]) for _ in range(max(n, 0))], STR


# keys llama.cpp reads (for the base files' architectures), to add or retype
EXTRA_KEYS = ["expert_count", "expert_used_count", "expert_group_count", "expert_group_used_count",
              "nextn_predict_layers", "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
              "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
              "attention.sliding_window", "attention.sliding_window_pattern", "rope.dimension_count",
              "rope.freq_base", "rope.freq_base_swa", "final_logit_softcapping", "attn_logit_softcapping",
              "attention.layer_norm_epsilon", "attention.layer_norm_rms_epsilon", "attention.causal",
              "pooling_type", "embedding_length_out", "vocab_size", "feed_forward_length", "context_length",
              "embedding_length", "block_count", "attention.clamp_kqv", "attention.scale", "logit_scale"]
GLOBAL_KEYS = ["general.alignment", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.merges",
               "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
               "tokenizer.ggml.padding_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.add_bos_token",
               "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
               "tokenizer.ggml.suppress_tokens", "tokenizer.ggml.precompiled_charsmap", "tokenizer.chat_template",
               "general.architecture", "tokenizer.ggml.remove_extra_whitespaces"]


def mutate_kv(base: bytes, lay: Layout, rng: random.Random) -> tuple[bytes, str]:
    pairs = [b for _, b in lay.pairs]
    names = [n for n, _ in lay.pairs]
    op = rng.choice(["add", "add", "drop", "retype"])
    if op == "drop":
        i = rng.randrange(len(pairs))
        del pairs[i]
        return relayout(base, lay, pairs), f"kv: dropped {names[i]}"
    key = rng.choice([f"{lay.arch}.{k}" for k in EXTRA_KEYS] + GLOBAL_KEYS)
    t, v, item = random_value(rng, lay.n_layer)
    new = kv_bytes(key, t, v, item)
    if key in names:
        pairs[names.index(key)] = new
        op = "retype"
    else:
        pairs.insert(rng.randrange(len(pairs) + 1), new)
    shown = f"{v[:8]!r}{'...' if len(v) > 8 else ''} ({len(v)} items)" if isinstance(v, list) else repr(v)[:40]
    return relayout(base, lay, pairs), f"kv: {op} {key} = {shown} (type {t})"


def mutate(base: bytes, fields: list[Target], lay: Layout, case: int, seed: int) -> tuple[bytes, str]:
    rng = random.Random(seed * 1_000_003 + case)
    rng.random()  # the first draw picked the base file
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
    if roll < 0.30:
        return mutate_kv(base, lay, rng)
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


def load_and_generate(path: Path) -> None:
    import lamina

    with lamina.Model(path, gpu=False) as m, m.context(n_ctx=64, threads=1) as c:
        c.complete([1, 5, 6], max_tokens=2)
        c.complete("Hello\n wörld ✓ <0x0A> 12", max_tokens=2)  # tokenizer, detokenizer


def run_case(path: Path, timeout: float, action: Callable[[], None] | None = None,
             expected: tuple[type[BaseException], ...] = (ValueError, IndexError)) -> tuple[str, str]:
    """Run action (default: load path and generate) in a forked child and classify how it ended.
    A lamina.LaminaError, or one of ``expected`` (lamina's errors for bad input), is "raised"; any
    other exception is "foreign": a message nanobind could not convert (RuntimeError), text that
    could not be decoded (UnicodeError), or a bare C++ error that escaped lamina."""
    import lamina

    err = tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:  # the child: load, generate, report by exit code
        os.dup2(err.fileno(), 2)
        os.environ["GGML_NO_BACKTRACE"] = "1"  # ggml's abort handler would run gdb
        code = 3
        try:
            (action or (lambda: load_and_generate(path)))()
            code = 0
        except lamina.LaminaError:
            code = 1
        except UnicodeError as e:  # a ValueError, but never the right one: text lamina could not convert
            print(f"foreign exception {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            code = 4
        except expected:
            code = 1
        except Exception as e:  # noqa: BLE001 - reported as the case's last line
            print(f"foreign exception {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            code = 4
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
        outcome = {0: "loaded", 1: "raised", 4: "foreign"}.get(os.WEXITSTATUS(status), f"exit {os.WEXITSTATUS(status)}")
    err.seek(0)
    lines = [ln for ln in err.read().decode(errors="replace").splitlines() if ln.strip()]
    err.close()
    foreign = [ln for ln in lines if ln.startswith("foreign exception ")]
    asserts = foreign or [ln for ln in lines if "GGML_ASSERT" in ln or "GGML_ABORT" in ln or "terminate" in ln or "error" in ln]
    return outcome, (asserts or lines or [""])[-1]


# ---- saved state ------------------------------------------------------------------------------
# lamina's header (cpp/memory.cpp): magic, 15 int64 fields, the token mirror, then llama.cpp's bytes
STATE_FIELDS = ("n_vocab", "n_layer", "n_embd", "n_params", "model_size", "n_ctx", "n_seq_max", "type_k", "type_v",
                "embeddings", "last_outputs", "n_tokens", "src_seq", "payload_size", "adapters")


def state_targets(blob: bytes) -> list[Target]:
    """The typed fields of a saved state: lamina's header, the tokens, and llama.cpp's KV cache
    layout (llama_kv_cache::state_write: arch, streams, cells, then per layer type and row size)."""
    out = [Target(8 + 8 * i, "<q", 8, "header", f"header {name}") for i, name in enumerate(STATE_FIELDS)]
    n_tokens = struct.unpack_from("<q", blob, 8 + 8 * 11)[0]
    pos = 8 + 8 * len(STATE_FIELDS)
    out += [Target(pos + 4 * i, "<i", 4, "tokens", f"token {i}") for i in range(n_tokens)]
    pos += 4 * n_tokens
    try:
        if blob[pos:pos + 4] == struct.pack("<I", 0xAF143CD8):  # a sequence state: magic, seq id
            out += [Target(pos, "<I", 4, "payload", "seq magic"), Target(pos + 4, "<i", 4, "payload", "seq id")]
            pos += 8
        else:
            (n,) = struct.unpack_from("<I", blob, pos)  # llama_io_write_i::write_string: u32 length
            out.append(Target(pos, "<I", 4, "payload", "arch length"))
            pos += 4 + n
        out.append(Target(pos, "<I", 4, "payload", "n_stream"))
        (n_stream,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        for s_ in range(n_stream):
            (cells,) = struct.unpack_from("<I", blob, pos)
            out.append(Target(pos, "<I", 4, "payload", f"stream {s_} cell_count"))
            pos += 4
            if cells == 0:
                continue
            for c in range(cells):
                out.append(Target(pos, "<i", 4, "payload", f"cell {c} pos"))
                (n_seq,) = struct.unpack_from("<I", blob, pos + 4)
                out.append(Target(pos + 4, "<I", 4, "payload", f"cell {c} n_seq_id"))
                out += [Target(pos + 8 + 4 * k, "<i", 4, "payload", f"cell {c} seq_id {k}") for k in range(n_seq)]
                pos += 8 + 4 * n_seq
            (v_trans,) = struct.unpack_from("<I", blob, pos)
            out += [Target(pos, "<I", 4, "payload", "v_trans"), Target(pos + 4, "<I", 4, "payload", "n_layer")]
            (n_layer,) = struct.unpack_from("<I", blob, pos + 4)
            pos += 8
            for part in ("k", "v"):
                for il in range(n_layer):
                    out.append(Target(pos, "<i", 4, "payload", f"layer {il} {part} type"))
                    if part == "v" and v_trans:
                        (el,) = struct.unpack_from("<I", blob, pos + 4)
                        (ne,) = struct.unpack_from("<I", blob, pos + 8)
                        out += [Target(pos + 4, "<I", 4, "payload", f"layer {il} v element size"),
                                Target(pos + 8, "<I", 4, "payload", f"layer {il} n_embd_v_gqa")]
                        pos += 12 + el * ne * cells
                    else:
                        (row,) = struct.unpack_from("<Q", blob, pos + 4)
                        out.append(Target(pos + 4, "<Q", 8, "payload", f"layer {il} {part} row size"))
                        pos += 12 + row * cells
    except struct.error:
        pass  # a layout this walk does not know: the fields found so far
    return [t for t in out if t.offset + t.size <= len(blob)]


def mutate_state(blob: bytes, fields: list[Target], case: int, seed: int) -> tuple[bytes, str]:
    rng = random.Random(seed * 1_000_003 + case)
    data = bytearray(blob)
    head = 8 + 8 * len(STATE_FIELDS)
    roll = rng.random()
    if roll < 0.1:  # truncated; half the time with the header's payload size made to agree
        n_tokens = struct.unpack_from("<q", blob, 8 + 8 * 11)[0]
        start = head + 4 * n_tokens
        cut = rng.randrange(start, len(data))
        data = data[:cut]
        if rng.random() < 0.5:
            struct.pack_into("<q", data, head - 8, cut - start)
            return bytes(data), f"truncated to {cut} bytes, payload size fixed"
        return bytes(data), f"truncated to {cut} bytes"
    if roll < 0.2:  # bytes flipped in llama.cpp's part (payload size unchanged)
        flips = [rng.randrange(head, len(data)) for _ in range(rng.randint(1, 8))]
        for i in flips:
            data[i] ^= 1 << rng.randrange(8)
        return bytes(data), f"bit flips at {flips}"
    kind = rng.choices(["header", "tokens", "payload"], weights=[2, 1, 5])[0]
    pool = [f for f in fields if f.kind == kind] or fields
    t = rng.choice(pool)
    (old,) = struct.unpack_from(t.fmt, data, t.offset)
    new = numeric_values(t.fmt, old, rng)
    struct.pack_into(t.fmt, data, t.offset, new)
    return bytes(data), f"{t.what}: {old} -> {new}"


def record(counts: Counter[str] | None, bad: list[str], outcome: str, line: str, save: Path | None | bool,
           data: bytes) -> None:
    """Count an outcome; a signal, odd exit or hang is printed, listed and (with --save) kept."""
    if counts is not None:
        counts[outcome.split()[0]] += 1
    if outcome in ("loaded", "raised"):
        return
    bad.append(line)
    print(line, flush=True)
    if isinstance(save, Path):
        save.parent.mkdir(parents=True, exist_ok=True)
        save.write_bytes(data)


def state_fuzz(a: argparse.Namespace, work: Path) -> int:
    """--state: mutate saved states (whole context and one sequence) and load them into a fresh context."""
    import lamina

    model_path = write_tiny_llama(work / "base.gguf")
    blobs = []
    with lamina.Model(model_path, gpu=False) as m, m.context(n_ctx=64, threads=1, n_seq_max=2) as c:
        c.complete("Hello world, the capital", max_tokens=4, ignore_eos=True)
        blobs.append(("whole", c.save_state()))
        blobs.append(("seq", c.save_state(seq=0)))
    fields = [state_targets(b) for _, b in blobs]

    def load(kind: str, blob: bytes) -> None:
        with lamina.Model(model_path, gpu=False) as m, m.context(n_ctx=64, threads=1, n_seq_max=2) as c:
            try:
                c.load_state(blob, seq=1 if kind == "seq" else None)
            finally:
                c.complete([1, 5, 6], max_tokens=2)  # the context must stay usable either way

    counts: Counter[str] = Counter()
    bad: list[str] = []
    t0 = time.monotonic()
    for case in range(a.first, a.first + a.cases):
        k = case % 2
        data, what = mutate_state(blobs[k][1], fields[k], case, a.seed)
        outcome, tail = run_case(model_path, a.timeout, lambda: load(blobs[k][0], data))
        record(counts, bad, outcome, f"case {case} ({blobs[k][0]} state): {outcome}: {what} | {tail[:200]}",
               a.save and a.save / f"state-seed{a.seed}-case{case}.bin", data)
    print(f"fuzz --state: {a.cases} cases (seed {a.seed}, from {a.first}) in {time.monotonic() - t0:.0f} s: " +
          ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) +
          f"; {len(fields[0])} and {len(fields[1])} typed fields")
    return 1 if bad else 0


BASES = (  # (share of the cases, tiny_gguf arguments)
    (0.5, {}),
    (0.2, {"tokenizer": "gpt2"}),
    (0.3, {"arch": "gemma3"}),
)


def pick_base(case: int, seed: int) -> int:
    x = random.Random(seed * 1_000_003 + case).random()  # mutate() skips this draw
    for i, (share, _) in enumerate(BASES):
        if x < share:
            return i
        x -= share
    return len(BASES) - 1


def run_tool(tool: Path, path: Path, timeout: float) -> str:
    """The same file through a llama.cpp program built from the pin (llama-completion), for comparison."""
    import subprocess

    cmd = [str(tool), "-m", str(path), "-p", "Hello\n wörld ✓", "-n", "2", "-t", "1", "-c", "64", "--no-warmup",
           "-no-cnv", "--temp", "0"]
    env = dict(os.environ, GGML_NO_BACKTRACE="1")
    try:
        rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, env=env).returncode
    except subprocess.TimeoutExpired:
        return "hang"
    if rc < 0:
        return "signal " + signal.Signals(-rc).name
    return "loaded" if rc == 0 else "raised"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--first", type=int, default=0, help="first case number")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--save", type=Path, help="keep files that end in a signal, odd exit or hang here")
    ap.add_argument("--replay", type=Path, help="run this one file as a case, and print its outcome")
    ap.add_argument("--state", action="store_true", help="fuzz saved states (load_state) instead of model files")
    ap.add_argument("--against", type=Path, metavar="TOOL",
                    help="also run each case through this llama.cpp program (lamina/bin/llama-completion from a "
                         "build with -DLAMINA_EXTRA_TOOLS=llama-completion) and count its outcomes")
    a = ap.parse_args()
    import lamina  # noqa: F401 - imported once in the parent; each child loads a model of its own

    if a.replay:
        outcome, tail = run_case(a.replay, a.timeout)
        print(f"{a.replay}: {outcome} | {tail}")
        return 0 if outcome in ("loaded", "raised") else 1
    work = Path(tempfile.mkdtemp(prefix="lamina-fuzz-"))
    if a.state:
        return state_fuzz(a, work)
    bases = []
    for i, (_, kw) in enumerate(BASES):
        p = write_tiny_llama(work / f"base{i}.gguf", **kw)
        bases.append((p.read_bytes(), targets(p), layout(p)))
    counts: Counter[str] = Counter()
    tool_counts: Counter[str] = Counter()
    bad: list[str] = []
    t0 = time.monotonic()
    for case in range(a.first, a.first + a.cases):
        base, fields, lay = bases[pick_base(case, a.seed)]
        data, what = mutate(base, fields, lay, case, a.seed)
        path = work / "case.gguf"
        path.write_bytes(data)
        outcome, tail = run_case(path, a.timeout)
        counts[outcome.split()[0]] += 1
        if a.against:
            tool_outcome = run_tool(a.against, path, a.timeout)
            tool_counts[tool_outcome] += 1
            if tool_outcome not in ("loaded", "raised"):
                print(f"case {case} ({lay.arch}): {a.against.name}: {tool_outcome}: {what}", flush=True)
        record(None, bad, outcome, f"case {case} ({lay.arch}): {outcome}: {what} | {tail[:200]}",
               a.save and a.save / f"seed{a.seed}-case{case}.gguf", data)
    dt = time.monotonic() - t0
    print(f"fuzz: {a.cases} cases (seed {a.seed}, from {a.first}) in {dt:.0f} s: " +
          ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) +
          f"; bases {', '.join(lay.arch + '/' + str(len(f)) + ' fields' for _, f, lay in bases)}")
    if a.against:
        print(f"{a.against.name} on the same cases: " + ", ".join(f"{k} {v}" for k, v in sorted(tool_counts.items())))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
