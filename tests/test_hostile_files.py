"""Model files are untrusted input: a malformed GGUF raises, it never kills the process.

Each class below made llama.cpp abort (GGML_ASSERT), read out of bounds, or fail with an unhelpful
error before lamina's validator (cpp/validate.cpp, which has the table of checks) refused it;
ci/fuzz.py finds them. The last test runs the fuzzer's fixed seed set.
"""
from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lamina

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "ci"))
from fuzz import ARR, BOOL, F32, STR, U32, gguf_str, kv_bytes, layout, relayout, targets  # noqa: E402
from tiny_gguf import write_tiny_llama  # noqa: E402


def patched(tmp_path: Path, what: str, value: float, fmt: str) -> Path:
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    (t,) = [t for t in targets(path) if t.what == what]
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, t.offset, value)
    path.write_bytes(bytes(data))
    return path


def with_kv(tmp_path: Path, add: dict[str, bytes] | None = None, drop: tuple[str, ...] = (), **kw: object) -> Path:
    """The tiny model with key/value pairs added or replaced (kv_bytes) and others dropped."""
    path = write_tiny_llama(tmp_path / "tiny.gguf", **kw)  # type: ignore[arg-type]
    lay = layout(path)
    pairs = {name: b for name, b in lay.pairs if name not in drop}
    pairs.update(add or {})
    out = tmp_path / "edited.gguf"
    out.write_bytes(relayout(path.read_bytes(), lay, list(pairs.values())))
    return out


def format_error(path: Path) -> lamina.ModelFormatError:
    with pytest.raises(lamina.ModelFormatError) as err:
        lamina.Model(path, gpu=False)
    assert isinstance(err.value, lamina.LoadError)
    return err.value


@pytest.mark.parametrize("n_layer", [0, 513, 2**31])
def test_a_layer_count_llama_cpp_cannot_hold_raises(tmp_path: Path, n_layer: int) -> None:
    path = patched(tmp_path, "llama.block_count[part 3]", n_layer, "<I")
    (t,) = [t for t in targets(path) if t.what == "llama.block_count[part 3]"]
    err = format_error(path)
    assert err.field == "llama.block_count" and "layers" in err.reason and str(n_layer) in err.reason
    assert err.offset == t.offset and f"at byte {t.offset}" in str(err)


@pytest.mark.parametrize("eps", [-1e-5, 0.0, float("nan"), float("inf")])
def test_a_bad_norm_epsilon_raises_before_the_first_decode(tmp_path: Path, eps: float) -> None:
    path = patched(tmp_path, "llama.attention.layer_norm_rms_epsilon[part 3]", eps, "<f")
    with pytest.raises(lamina.ModelFormatError, match="epsilon"):
        lamina.Model(path, gpu=False, n_gpu_layers="auto")  # before llama.cpp's memory fit too


def test_duplicate_token_texts_raise(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    data = bytearray(path.read_bytes())
    words = [t for t in targets(path) if t.what.startswith("tokenizer.ggml.tokens") and t.fmt == "bytes"]
    by_len: dict[int, list] = {}
    for t in words:
        by_len.setdefault(t.size, []).append(t)
    a, b = next(v for v in by_len.values() if len(v) >= 2)[:2]
    data[b.offset:b.offset + b.size] = data[a.offset:a.offset + a.size]
    path.write_bytes(bytes(data))
    with pytest.raises(lamina.ModelFormatError, match="same text"):
        lamina.Model(path, gpu=False)


def with_tokens(tmp_path: Path, edit: dict[int, str]) -> Path:
    """The tiny model with some token texts replaced."""
    from tiny_gguf import vocab

    tokens, _, _ = vocab()
    for i, text in edit.items():
        tokens[i] = text
    return with_kv(tmp_path, {"tokenizer.ggml.tokens": kv_bytes("tokenizer.ggml.tokens", ARR, tokens, STR)})


@pytest.mark.parametrize("text", ["<0xZZ>", "<0x0a>", "<0x0A", "<>", "<0x0A>x"])
def test_a_malformed_byte_token_raises(tmp_path: Path, text: str) -> None:
    # SentencePiece byte fallback looks tokens up as "<0x%02X>": llama.cpp raised a bare IndexError
    # ("unordered_map::at") at the first tokenize, or failed the load with "basic_string::substr"
    err = format_error(with_tokens(tmp_path, {13: text}))  # token 13 is <0x0A>, a byte token (type 6)
    assert err.field == "tokenizer.ggml.tokens[13]" and "<0xNN>" in err.reason and err.offset > 0


def test_two_byte_tokens_for_one_byte_raise(tmp_path: Path) -> None:
    err = format_error(with_tokens(tmp_path, {13: "<0x0B>"}))  # token 14 is <0x0B>
    assert err.field == "tokenizer.ggml.tokens[14]" and "second byte token" in err.reason


def test_file_text_that_is_not_utf8_is_escaped_in_the_error(tmp_path: Path) -> None:
    """A message quoting a key, a token or a string value that is not UTF-8 raised
    RuntimeError('nanobind::str(): conversion error!') instead of ModelFormatError (8 of 10,000
    fuzzed files): every invalid byte, and a control character, is written as \\xNN."""
    bad_key = gguf_str(b"general.\xff\xfe\x01name") + struct.pack("<I", 99)  # and a value type that does not exist
    err = format_error(with_kv(tmp_path, {"bad": bad_key}))
    assert err.field == "general.\\xff\\xfe\\x01name" and "value type 99" in err.reason
    assert "general.\\xff\\xfe\\x01name" in str(err)
    err = format_error(with_tokens(tmp_path, {13: b"<0x\xc3>"}))  # type: ignore[dict-item]
    assert err.field == "tokenizer.ggml.tokens[13]" and "'<0x\\xc3>'" in err.reason
    rope = kv_bytes("llama.rope.scaling.type", STR, b"y\xe9arn\xf0\x9f\x98")  # a truncated 4-byte sequence too
    err = format_error(with_kv(tmp_path, {"llama.rope.scaling.type": rope}))
    assert "'y\\xe9arn\\xf0\\x9f\\x98'" in err.reason
    ok = kv_bytes("llama.rope.scaling.type", STR, "ünknöwn ✓".encode())  # valid UTF-8 is kept as it is
    assert "'ünknöwn ✓'" in format_error(with_kv(tmp_path, {"llama.rope.scaling.type": ok})).reason
    # a file that loads: its strings reach model.info and model.metadata the same way
    name = kv_bytes("general.name", STR, b"lam\xc2na\n")
    with lamina.Model(with_kv(tmp_path, {"general.name": name}), gpu=False) as m:
        assert m.info.name == "lam\\xc2na\n" and m.metadata["general.name"] == "lam\\xc2na\n"
    # llama.cpp's own refusal quotes the file too (its log line becomes the message)
    lay = layout(write_tiny_llama(tmp_path / "arch.gguf"))
    pairs = dict(lay.pairs)
    pairs["general.architecture"] = kv_bytes("general.architecture", STR, b"no\xffarch")
    p = tmp_path / "unknown-arch.gguf"
    p.write_bytes(relayout((tmp_path / "arch.gguf").read_bytes(), lay, list(pairs.values())))
    with pytest.raises(lamina.LoadError) as load:
        lamina.Model(p, gpu=False)
    assert "unknown model architecture: 'no\\xffarch'" in str(load.value), str(load.value)


def test_rope_scaling_type_llama_cpp_does_not_know_raises(tmp_path: Path) -> None:
    # llama_model::load_hparams: GGML_ASSERT(rope_scaling_type_train != UNSPECIFIED)
    err = format_error(with_kv(tmp_path, {"llama.rope.scaling.type": kv_bytes("llama.rope.scaling.type", STR, "bogus")}))
    assert err.field == "llama.rope.scaling.type" and "yarn" in err.reason


@pytest.mark.parametrize("experts, used, field", [(4, None, "llama.expert_used_count"), (4, 5, "llama.expert_used_count"),
                                                  (None, 2, "llama.expert_used_count"),
                                                  (2000, 2, "llama.expert_count")])
def test_expert_counts_llama_cpp_asserts_on_raise(tmp_path: Path, experts: int | None, used: int | None,
                                                  field: str) -> None:
    add = {}
    if experts is not None:
        add["llama.expert_count"] = kv_bytes("llama.expert_count", U32, experts)
    if used is not None:
        add["llama.expert_used_count"] = kv_bytes("llama.expert_used_count", U32, used)
    err = format_error(with_kv(tmp_path, add))
    assert err.field == field


def test_kv_heads_that_do_not_divide_the_heads_raise(tmp_path: Path) -> None:
    err = format_error(with_kv(tmp_path, {"llama.attention.head_count_kv": kv_bytes("llama.attention.head_count_kv", U32, 3)}))
    assert err.field == "llama.attention.head_count_kv" and "divide" in err.reason
    # per layer: an array with one bad layer
    heads = kv_bytes("llama.attention.head_count_kv", ARR, [2, 3], U32)
    err = format_error(with_kv(tmp_path, {"llama.attention.head_count_kv": heads}))
    assert "layer 1" in err.reason


def test_an_epsilon_of_another_architecture_key_is_checked_too(tmp_path: Path) -> None:
    eps = kv_bytes("gemma3.attention.layer_norm_epsilon", F32, float("nan"))
    err = format_error(with_kv(tmp_path, {"gemma3.attention.layer_norm_epsilon": eps}, arch="gemma3"))
    assert err.field == "gemma3.attention.layer_norm_epsilon"


def test_an_empty_token_is_named_as_llama_cpp_renames_it(tmp_path: Path) -> None:
    # llama_vocab::load renames an empty token i to "[EMPTY_i]": a token with that text collides
    err = format_error(with_tokens(tmp_path, {300: "", 301: "[EMPTY_300]"}))
    assert "tokens 300 and 301" in err.reason


def test_a_nul_inside_a_token_ends_its_text_as_llama_cpp_reads_it(tmp_path: Path) -> None:
    # gguf_get_arr_str returns a C string: "3\0" is "3", a second token "3" (found by ci/fuzz.py)
    err = format_error(with_tokens(tmp_path, {300: "3\0x"}))
    assert "same text '3'" in err.reason


def test_a_byte_token_in_a_wordpiece_vocabulary_raises(tmp_path: Path) -> None:
    # token_to_byte: GGML_ABORT("fatal error") for WPM (found by ci/fuzz.py)
    model = kv_bytes("tokenizer.ggml.model", STR, "bert")
    err = format_error(with_kv(tmp_path, {"tokenizer.ggml.model": model}))
    assert err.field == "tokenizer.ggml.tokens[3]" and "WordPiece" in err.reason


@pytest.mark.parametrize("pattern", [[], [0, 0], 1])
def test_a_sliding_window_pattern_without_sliding_layers_raises(tmp_path: Path, pattern: list[int] | int) -> None:
    # context creation: GGML_ASSERT(hparams.is_swa_any()) (found by ci/fuzz.py)
    key = "gemma3.attention.sliding_window_pattern"
    value = kv_bytes(key, ARR, pattern, BOOL) if isinstance(pattern, list) else kv_bytes(key, U32, pattern)
    err = format_error(with_kv(tmp_path, {key: value}, arch="gemma3"))
    assert err.field == key and "none of the 2 layers" in err.reason


def test_a_layer_without_kv_heads_raises(tmp_path: Path) -> None:
    # ggml_mul_mat: GGML_ASSERT(a->ne[0] == b->ne[0]) at the first decode (found by ci/fuzz.py)
    heads = kv_bytes("llama.attention.head_count_kv", ARR, [2, 0], U32)
    err = format_error(with_kv(tmp_path, {"llama.attention.head_count_kv": heads}))
    assert err.field == "llama.attention.head_count_kv" and "layer 1" in err.reason


def test_tensor_data_ggml_cannot_map_aligned_raises(tmp_path: Path) -> None:
    # general.alignment 8: mmap'd tensors at addresses ggml-backend asserts on (found by ci/fuzz.py)
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path)
    import gguf

    r = gguf.GGUFReader(str(path))
    out = tmp_path / "align8.gguf"
    w = gguf.GGUFWriter(str(out), "llama")
    w.data_alignment = 8
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = field.contents()
        w.add_key_value(name, value, field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
    w.add_uint32("general.alignment", 8)
    for t in r.tensors:
        w.add_tensor(t.name, t.data[:-1] if t.name == "output_norm.weight" else t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    err = format_error(out)
    assert "multiple of 32" in err.reason and err.field.startswith("tensor '")


def test_a_key_with_a_nul_is_checked_as_llama_cpp_finds_it(tmp_path: Path) -> None:
    # gguf_find_key compares with strcmp: "llama.block_count\0x" is llama.block_count (reviewer)
    key = "llama.block_count\0x"
    err = format_error(with_kv(tmp_path, {key: kv_bytes(key, U32, 1000)}, drop=("llama.block_count",)))
    assert err.field == "llama.block_count"


def test_an_rwkv_vocabulary_the_tokenizer_would_loop_on_raises(tmp_path: Path) -> None:
    # llm_tokenizer_rwkv_session: "\n\n" is a token but "\n" is not: tokenize("\n") at load never ends
    from tiny_gguf import vocab

    tokens, _, _ = vocab()
    tokens[300] = "\\n\\n"  # RWKV escapes: the two bytes 0x0A 0x0A
    add = {"tokenizer.ggml.model": kv_bytes("tokenizer.ggml.model", STR, "rwkv"),
           "tokenizer.ggml.tokens": kv_bytes("tokenizer.ggml.tokens", ARR, tokens, STR)}
    err = format_error(with_kv(tmp_path, add))
    assert err.field == "tokenizer.ggml.tokens" and "RWKV" in err.reason


def test_a_model_without_vocabulary_raises_on_text_not_aborts(tmp_path: Path, tiny_path: Path) -> None:
    # llama.cpp asserts a tokenizer in tokenize/detokenize and aborts in token_to_piece; a
    # tokenizer.ggml.model "none" file loads only vocab_only (its weights want n_vocab rows)
    path = with_kv(tmp_path, {"tokenizer.ggml.model": kv_bytes("tokenizer.ggml.model", STR, "none")})
    with lamina.Model(tiny_path, gpu=False) as tiny:
        m = lamina._native.Model(str(path), tiny._placement, vocab_only=True)
    for call in (lambda: m.tokenize(b"hello", True, False), lambda: m.detokenize(np.array([1, 2], dtype=np.int32)),
                 lambda: m.token_to_piece(1, False)):
        with pytest.raises(lamina.LaminaError, match="no vocabulary"):
            call()
    m.close()


def test_a_missing_special_token_the_vocabulary_asks_for_raises(tmp_path: Path) -> None:
    # Unigram (t5) with add_bos_token and no BOS id: GGML_ASSERT(special_bos_id != LLAMA_TOKEN_NULL)
    add = {"tokenizer.ggml.model": kv_bytes("tokenizer.ggml.model", STR, "t5")}
    path = with_kv(tmp_path, add, drop=("tokenizer.ggml.bos_token_id",))
    with lamina.Model(path, gpu=False) as m:
        with pytest.raises(ValueError, match="BOS"):
            m.tokenize("hello")
        assert len(m.tokenize("hello", add_special=False)) > 0


def test_a_truncated_file_names_the_tensor_that_ends_past_it(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:size - 100])
    err = format_error(path)
    assert err.field == "tensor 'output.weight'" and "past the end of the file" in err.reason


def test_a_count_the_file_cannot_hold_raises_without_allocating_it(tmp_path: Path) -> None:
    (t,) = [t for t in targets(write_tiny_llama(tmp_path / "t.gguf")) if t.what == "tokenizer.ggml.tokens[part 4]"]
    path = patched(tmp_path, "tokenizer.ggml.tokens[part 4]", 2**62, "<Q")
    err = format_error(path)
    assert err.field == "tokenizer.ggml.tokens" and err.offset == t.offset and "items" in err.reason


def test_a_file_changed_after_validation_is_validated_again(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    lamina._native.validate_gguf(str(path))
    good = path.read_bytes()
    (t,) = [t for t in targets(path) if t.what == "llama.block_count[part 3]"]
    data = bytearray(good)
    struct.pack_into("<I", data, t.offset, 0)
    import os
    import time

    time.sleep(0.01)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(time.time_ns(), time.time_ns()))
    with pytest.raises(lamina.ModelFormatError):
        lamina._native.validate_gguf(str(path))


def test_a_valid_file_passes_the_validator(tiny_path: Path) -> None:
    lamina._native.validate_gguf(str(tiny_path))
    with lamina.Model(tiny_path, gpu=False) as m, m.context(n_ctx=64) as c:
        assert len(c.complete([1, 5, 6], max_tokens=2, ignore_eos=True).tokens) == 2


def test_the_fuzz_seed_set_kills_nothing() -> None:
    # 1000 typed mutations, one forked child each: loaded or raised, never a signal or a hang
    out = subprocess.run([sys.executable, str(ROOT / "ci" / "fuzz.py"), "--cases", "1000", "--seed", "0"],
                         capture_output=True, text=True, timeout=600)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-500:]
    assert out.returncode == 0, out.stdout[-2000:]
    assert "signal" not in summary and "hang" not in summary, summary


def test_the_state_fuzz_seed_set_kills_nothing() -> None:
    # saved states mutated (lamina's header, the token mirror, llama.cpp's KV cache layout, bit
    # flips, truncations) and loaded into a fresh context, which must stay usable
    out = subprocess.run([sys.executable, str(ROOT / "ci" / "fuzz.py"), "--state", "--cases", "300", "--seed", "0"],
                         capture_output=True, text=True, timeout=600)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-500:]
    assert out.returncode == 0, out.stdout[-2000:]
    assert summary.startswith("fuzz --state: 300 cases") and "signal" not in summary and "hang" not in summary


def test_the_other_files_of_a_split_model_are_checked_too(tmp_path: Path, tiny_path: Path) -> None:
    # llama.cpp maps every split's tensor data: a truncated second file is refused up front
    import gguf

    r = gguf.GGUFReader(str(tiny_path))
    w = gguf.GGUFWriter(str(tmp_path / "split.gguf"), "llama", split_max_tensors=10)
    for name, field in r.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            w.add_key_value(name, field.contents(), field.types[0],
                            sub_type=field.types[-1] if len(field.types) > 1 else None)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    files = sorted(tmp_path.glob("split-*-of-*.gguf"))
    assert len(files) >= 2
    with lamina.Model(files[0], gpu=False) as m, m.context(n_ctx=64) as c:
        assert len(c.complete([1, 5], max_tokens=2, ignore_eos=True).tokens) == 2  # the split model loads
    files[1].write_bytes(files[1].read_bytes()[:-64])
    err = format_error(files[0])
    assert files[1].name in str(err) and "past the end of the file" in err.reason
