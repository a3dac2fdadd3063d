"""Model.embed: shapes, normalisation, determinism, pooling choices, errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lamina
from tiny_gguf import write_tiny_bert


def test_embed_shapes_and_normalisation(tiny_model: lamina.Model) -> None:
    e = tiny_model.embed(["the sky is blue", "Paris is the capital of France", "hello"])
    assert e.shape == (3, tiny_model.info.n_embd) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    one = tiny_model.embed("the sky is blue")
    assert one.shape == (tiny_model.info.n_embd,)
    np.testing.assert_allclose(one, e[0], rtol=1e-4, atol=1e-5)  # batch order and cache reuse change nothing
    assert not np.allclose(e[0], e[1])


def test_embed_pooling_choices(tiny_model: lamina.Model) -> None:
    text = "the capital of France"
    last = tiny_model.embed(text)  # generative model without pooling: last token
    assert np.allclose(last, tiny_model.embed(text, pooling="last"), atol=1e-5)
    mean = tiny_model.embed(text, pooling="mean")
    assert not np.allclose(last, mean)
    raw = tiny_model.embed(text, pooling="mean", normalize=False)
    assert abs(np.linalg.norm(raw) - 1.0) > 1e-3


def test_embed_bad_input(tiny_model: lamina.Model) -> None:
    with pytest.raises(TypeError):
        tiny_model.embed([])
    with pytest.raises(TypeError):
        tiny_model.embed([1, 2])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="pooling"):
        tiny_model.embed("x", pooling="max")  # type: ignore[arg-type]
    ctx = tiny_model.context(n_ctx=64)
    ctx.decode([1, 300])
    with pytest.raises(lamina.LaminaError, match="embeddings=True"):
        ctx.native.embedding(0)


def test_an_encoder_without_a_cache_numbers_each_chunk_from_zero(tmp_path: Path) -> None:
    """A decode longer than n_batch on a model llama.cpp runs without a KV cache (BERT) goes in
    chunks, each a decode of its own: positions start at 0 in each, as llama.cpp numbers them. Had
    the second chunk continued the first's positions (64..127), the learned position table of 64
    rows would be read past its end (a GGML_ASSERT abort)."""
    path = write_tiny_bert(tmp_path / "bert.gguf", n_ctx_train=64)
    script = f"""
import numpy as np, lamina
m = lamina.Model({str(path)!r}, gpu=False)
with m.context(n_ctx=128, n_batch=64, n_ubatch=64, embeddings=True) as c:
    c.decode(np.arange(3, 131, dtype=np.int32))
print("survived")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "survived" in r.stdout, (r.returncode, r.stdout, r.stderr[-2000:])
