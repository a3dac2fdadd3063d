"""lamina.Tokenizer: the vocabulary alone, the same tokens as the model, far fewer bytes read."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import lamina
from tiny_gguf import write_tiny_llama

TEXTS = ["Hello, world!", "  leading spaces and\ttabs\n", "naïve café — 東京 🚀", "<start_of_turn>user\nhi", ""]


def test_tokens_and_text_equal_the_models(tiny_path: Path, tiny_model: lamina.Model) -> None:
    with lamina.Tokenizer(tiny_path) as tok:
        assert tok.info.n_vocab == tiny_model.info.n_vocab and tok.info.bos == tiny_model.info.bos
        for text in TEXTS:
            for special in (False, True):
                ids = tok.tokenize(text, special=special)
                assert list(ids) == list(tiny_model.tokenize(text, special=special)), text
                assert tok.detokenize(ids) == tiny_model.detokenize(ids)
        assert tok.token_to_piece(5) == tiny_model.token_to_piece(5)
        assert tok.is_eog(tok.info.eos) and not tok.is_eog(5)
    with pytest.raises(lamina.ClosedError):
        tok.tokenize("x")


def test_the_real_tokenizer_and_its_chat_template(real_path: Path, real_model: lamina.Model) -> None:
    tok = lamina.Tokenizer(real_path)
    for text in TEXTS:
        assert list(tok.tokenize(text, special=True)) == list(real_model.tokenize(text, special=True))
    msgs = [{"role": "user", "content": "Hi there"}]
    assert tok.info.chat_template == real_model.info.chat_template
    tmpl = tok.info.chat_template or "gemma"  # this file has none: a built-in one
    assert tok.apply_chat_template(msgs, template=tmpl) == real_model.apply_chat_template(msgs, template=tmpl)
    assert "Tokenizer" in repr(tok)


def _bytes_read(code: str) -> int:
    """Bytes a fresh interpreter reads (/proc/self/io rchar) while running ``code``."""
    probe = ("import lamina, sys\n"
             "def rchar():\n"
             "    return int(next(l.split()[1] for l in open('/proc/self/io') if l.startswith('rchar')))\n"
             f"before = rchar()\n{code}\nprint(rchar() - before)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_it_reads_far_fewer_bytes_than_a_full_load(real_path: Path) -> None:
    size = real_path.stat().st_size
    vocab = _bytes_read(f"lamina.Tokenizer({str(real_path)!r})")
    full = _bytes_read(f"lamina.Model({str(real_path)!r}, gpu=False, use_mmap=False)")
    assert full > 0.9 * size  # read without mmap: every weight byte
    assert vocab < 0.1 * full, (vocab, full)


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        lamina.Tokenizer(tmp_path / "missing.gguf")
    with pytest.raises(TypeError):
        lamina.Tokenizer(42)  # type: ignore[arg-type]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(lamina.LoadError):
        lamina.Tokenizer(bad)


def test_a_vocabulary_only_model_refuses_what_needs_weights(tiny_path: Path) -> None:
    """llama.cpp aborts on hyperparameters a vocab-only load never read: lamina refuses first."""
    native = lamina._native.Model(str(tiny_path), lamina._native.Placement(), vocab_only=True)
    info = native.info()
    assert info["n_vocab"] > 0 and info["n_layer"] == 0
    with pytest.raises(ValueError, match="vocabulary-only"):
        lamina._native.Context(native, lamina._native.ContextParams(), lamina._native.PoolParams(),
                               lamina._native.PoolParams())
    with pytest.raises(ValueError, match="vocabulary-only"):
        lamina._native.kv_tensor_refusals(native, 256, 1, 1, [])
    assert lamina._native.Sampler(native, lamina._native.SamplerParams()) is not None


def test_the_files_chat_template(tmp_path: Path) -> None:
    """A vocab-only load keeps no metadata in llama.cpp: lamina reads the template from the file."""
    path = write_tiny_llama(tmp_path / "chat.gguf", chat_template="{{ bos_token }}chatml-ish <|im_start|>")
    with lamina.Model(path, gpu=False) as m, lamina.Tokenizer(path) as tok:
        assert tok.info.chat_template == m.info.chat_template == "{{ bos_token }}chatml-ish <|im_start|>"
