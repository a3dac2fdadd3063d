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

import pytest

import lamina

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "ci"))
from fuzz import ARR, F32, STR, U32, kv_bytes, layout, relayout, targets  # noqa: E402
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
