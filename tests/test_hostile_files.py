"""Model files are untrusted input: a malformed GGUF raises, it never kills the process.

Each class below made llama.cpp abort (GGML_ASSERT) before lamina's validator (cpp/validate.cpp)
checked it; ci/fuzz.py found them. The last test runs the fuzzer's fixed seed set.
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
from fuzz import targets  # noqa: E402
from tiny_gguf import write_tiny_llama  # noqa: E402


def patched(tmp_path: Path, what: str, value: float, fmt: str) -> Path:
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    (t,) = [t for t in targets(path) if t.what == what]
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, t.offset, value)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("n_layer", [0, 513, 2**31])
def test_a_layer_count_llama_cpp_cannot_hold_raises(tmp_path: Path, n_layer: int) -> None:
    path = patched(tmp_path, "llama.block_count[part 3]", n_layer, "<I")
    with pytest.raises(lamina.ModelFormatError, match="block_count") as err:
        lamina.Model(path, gpu=False)
    assert err.value.field == "llama.block_count" and "layers" in err.value.reason
    assert isinstance(err.value, lamina.LoadError)


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
