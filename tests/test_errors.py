"""Bad input raises a clear Python exception and the interpreter keeps running."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lamina


def test_missing_path_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        lamina.Model(tmp_path / "nope.gguf")


def test_text_file_renamed_gguf_raises_load_error(tmp_path: Path) -> None:
    p = tmp_path / "notes.gguf"
    p.write_text("this is a text file, not a model\n" * 100)
    with pytest.raises(lamina.LoadError, match="not a GGUF file"):
        lamina.Model(p)


def test_empty_file_raises_load_error(tmp_path: Path) -> None:
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    with pytest.raises(lamina.LoadError):
        lamina.Model(p)


def test_directory_raises(tmp_path: Path) -> None:
    with pytest.raises((lamina.LoadError, IsADirectoryError, OSError)):
        lamina.Model(tmp_path)


@pytest.mark.parametrize("keep", [8, 100, 2000, 0.5, 0.999])
def test_truncated_tiny_model_raises_load_error(tiny_path: Path, tmp_path: Path, keep: float) -> None:
    data = tiny_path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    p = tmp_path / "truncated.gguf"
    p.write_bytes(data[:n])
    with pytest.raises(lamina.LoadError):
        lamina.Model(p)


@pytest.mark.model
def test_truncated_real_model_raises_load_error(real_path: Path, tmp_path: Path) -> None:
    p = tmp_path / "gemma-truncated.gguf"
    with open(real_path, "rb") as src, open(p, "wb") as dst:
        dst.write(src.read(real_path.stat().st_size // 2))
    with pytest.raises(lamina.ModelFormatError, match="past the end of the file") as err:
        lamina.Model(p)
    assert isinstance(err.value, lamina.LoadError) and err.value.field.startswith("tensor '")


def test_bad_arguments_raise_before_llama_cpp(tiny_path: Path) -> None:
    with pytest.raises(TypeError):
        lamina.Model(12345)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="split_mode"):
        lamina.Model(tiny_path, split_mode="diagonal")
    with pytest.raises(ValueError, match="n_gpu_layers"):
        lamina.Model(tiny_path, n_gpu_layers="most")  # type: ignore[arg-type]


def test_out_of_range_token_ids_raise_index_error(tiny_model: lamina.Model) -> None:
    n_vocab = tiny_model.info.n_vocab
    ctx = tiny_model.context(n_ctx=64)
    for bad in ([n_vocab], [-1], [1, 2, 10**9], np.array([2**40])):
        with pytest.raises(IndexError):
            ctx.decode(bad)
        with pytest.raises(IndexError):
            tiny_model.detokenize(bad)
    with pytest.raises(IndexError):
        ctx.generate([1, n_vocab + 5])
    with pytest.raises(TypeError):
        ctx.decode([1.5, 2.0])
    assert ctx.n_past == 0  # nothing reached the cache


def test_prompt_longer_than_context_raises_value_error(tiny_model: lamina.Model) -> None:
    ctx = tiny_model.context(n_ctx=32)
    too_long = [3 + i % 500 for i in range(ctx.n_ctx + 5)]  # n_ctx is what llama.cpp made of 32
    with pytest.raises(ValueError, match="n_ctx"):
        list(ctx.generate(too_long))
    with pytest.raises(ValueError, match="exceeds the context"):
        ctx.decode(too_long)
    # the context still works afterwards
    assert len(list(ctx.generate([1, 300, 301], max_tokens=4))) > 0


def test_bad_context_options_raise(tiny_model: lamina.Model) -> None:
    with pytest.raises(ValueError):
        tiny_model.context(n_ctx=-1)
    with pytest.raises(ValueError):
        tiny_model.context(n_batch=0)
    with pytest.raises(ValueError):
        tiny_model.context(threads=0)
    with pytest.raises(ValueError):
        tiny_model.context(flash_attn="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="KV cache takes"):
        lamina.KV(type_k="q9_9")
    with pytest.raises(ValueError, match="KV cache takes"):
        lamina.KV(type_v="q4_K")  # a ggml type, but not one the cache supports
    with pytest.raises(ValueError, match="needs flash attention"):
        tiny_model.context(kv=lamina.KV(type_v="q8_0"), flash_attn=False)
    ctx = tiny_model.context(n_ctx=64)
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(min_p=2.0), dict(repeat_penalty=0.0),
                dict(xtc_probability=1.5), dict(grammar="root ::= (")):
        with pytest.raises(ValueError):
            ctx.generate("the", sampler=lamina.Sampler(**bad))  # type: ignore[arg-type]
    with pytest.raises(IndexError):
        ctx.generate("the", sampler=lamina.Sampler(logit_bias={10**6: 1.0}))
    with pytest.raises(ValueError):
        lamina.Sampler(seed=-1)


def test_closed_objects_raise_closed_error(tiny_path: Path) -> None:
    m = lamina.Model(tiny_path)
    ctx = m.context(n_ctx=64)
    ctx.close()
    ctx.close()  # idempotent
    with pytest.raises(lamina.ClosedError):
        ctx.decode([1, 2])
    m.close()
    m.close()
    with pytest.raises(lamina.ClosedError):
        m.tokenize("hello")


def test_interpreter_survives_bad_inputs_in_subprocess(tiny_path: Path, tmp_path: Path) -> None:
    """Every failure above in one fresh process that must still exit normally."""
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    code = f"""
import lamina
for p in [{str(bad)!r}, {str(tmp_path / 'missing.gguf')!r}]:
    try:
        lamina.Model(p)
    except (lamina.LaminaError, OSError) as e:
        print(type(e).__name__)
m = lamina.Model({str(tiny_path)!r})
ctx = m.context(n_ctx=16)
for bad in ([10**6], [3] * (ctx.n_ctx + 1)):
    try:
        ctx.decode(bad)
    except (IndexError, ValueError) as e:
        print(type(e).__name__)
print("alive")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ModelFormatError", "FileNotFoundError", "IndexError", "ValueError", "alive"]
