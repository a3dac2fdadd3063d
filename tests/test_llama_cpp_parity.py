"""lamina's greedy generation gives exactly what llama.cpp's own CLI gives (same pinned build).

Needs llama-completion in the package (-Ccmake.define.LAMINA_EXTRA_TOOLS=llama-completion, as CI
builds it); CI sets LAMINA_REQUIRE_TOOLS=1 so a missing tool fails instead of skipping."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import lamina
import requires


def tool(name: str) -> str:
    requires.tool(name)
    return name


@pytest.mark.model
@pytest.mark.parametrize("prompt", ["The three primary colors are", "Once upon a time, in a small village,"])
def test_greedy_64_tokens_equal_llama_completion(real_model: lamina.Model, prompt: str) -> None:
    cmd = ["-m", str(real_model.path.resolve()), "-p", prompt, "-n", "64", "--temp", "0",
           "--ignore-eos", "-no-cnv", "--no-display-prompt", "--simple-io", "-t", "2", "-c", "4096"]
    ref = lamina.tools.run(tool("llama-completion"), cmd, capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
    assert ref.returncode == 0, ref.stderr[-2000:]
    with real_model.context(n_ctx=4096, threads=2) as ctx:
        ours = ctx.complete(prompt, max_tokens=64, ignore_eos=True)
    assert len(ours.tokens) == 64
    assert ours.text == ref.stdout.rstrip("\n")


PENALTIES = [  # (llama-completion flags, the same settings as a lamina.Sampler)
    (["--temp", "0", "--repeat-penalty", "1.5", "--repeat-last-n", "64", "--presence-penalty", "0.4",
      "--frequency-penalty", "0.3"],
     lamina.Sampler(temperature=0, repeat_penalty=1.5, penalty_last_n=64, presence_penalty=0.4,
                    frequency_penalty=0.3)),
    (["--temp", "0.9", "--seed", "1234", "--top-k", "40", "--top-p", "0.95", "--min-p", "0.05",
      "--repeat-penalty", "1.3", "--repeat-last-n", "128", "--dry-multiplier", "0.8"],
     lamina.Sampler(temperature=0.9, seed=1234, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.3,
                    penalty_last_n=128, dry_multiplier=0.8)),
]


@pytest.mark.model
@pytest.mark.parametrize("flags, sampler", PENALTIES, ids=["greedy-penalties", "seeded-penalties-dry"])
def test_penalties_see_the_prompt_as_in_llama_completion(real_model: lamina.Model, flags: list[str],
                                                         sampler: lamina.Sampler) -> None:
    """llama-completion feeds the prompt to the penalty and DRY samplers (not the grammar): with
    the same settings and seed, lamina's tokens are llama.cpp's."""
    prompt = "List the colors: red, green, blue, red, green, blue, red, green,"
    cmd = ["-m", str(real_model.path.resolve()), "-p", prompt, "-n", "48", *flags, "--ignore-eos", "-no-cnv",
           "--no-display-prompt", "--simple-io", "-t", "2", "-c", "4096"]
    ref = lamina.tools.run(tool("llama-completion"), cmd, capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
    assert ref.returncode == 0, ref.stderr[-2000:]
    with real_model.context(n_ctx=4096, threads=2) as ctx:
        ours = ctx.complete(prompt, max_tokens=48, ignore_eos=True, sampler=sampler)
    assert ours.text == ref.stdout.rstrip("\n")


@pytest.mark.model
def test_generate_batch_text_equals_generate_text(real_model: lamina.Model) -> None:
    """The same tokens give the same text: generate_batch joins the pieces generate() yields
    (it used detokenize). One prompt runs the same decodes as generate(): the same tokens too;
    several prompts share batches, whose arithmetic may pick other greedy tokens."""
    prompts = ["The three primary colors are", "Once upon a time", "def fibonacci(n):"]
    with real_model.context(n_ctx=4096, threads=2) as ctx:
        one = ctx.complete(prompts[0], max_tokens=24)
        (alone,) = ctx.generate_batch(prompts[:1], max_tokens=24)
    assert list(alone.tokens) == list(one.tokens) and alone.text == one.text
    with real_model.context(n_ctx=4096, n_seq_max=len(prompts), threads=2) as ctx:
        for b in ctx.generate_batch(prompts, max_tokens=24):
            pieces = b"".join(real_model.token_to_piece(int(t)) for t in b.tokens)
            assert b.text == pieces.decode("utf-8", errors="replace")


def test_pieces_longer_than_256_bytes_as_llama_completion_prints_them(tmp_path: Path) -> None:
    """A token whose text is 298 bytes (llama.cpp's token_to_piece needs a second, larger buffer)
    comes out whole, as llama-completion prints it, from generate(), complete() and generate_batch()."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_gguf import write_tiny_llama

    path = write_tiny_llama(tmp_path / "long.gguf", long_piece=300)
    with lamina.Model(path, gpu=False) as model:
        long_id = model.info.n_vocab - 1
        assert model.token_to_piece(long_id) == b" " + b"x" * 297  # SentencePiece's "\u2581" is a space
        sampler = lamina.Sampler(logit_bias={long_id: 100.0})
        with model.context(n_ctx=256) as ctx:
            pieces = list(ctx.generate("the sky is", max_tokens=3, sampler=sampler, ignore_eos=True))
            ours = "".join(pieces)
            (batch,) = ctx.generate_batch(["the sky is"], max_tokens=3, sampler=sampler, ignore_eos=True)
    assert ours == (" " + "x" * 297) * 3 and batch.text == ours
    cmd = ["-m", str(path), "-p", "the sky is", "-n", "3", "--temp", "0", "--logit-bias", f"{long_id}+100",
           "--ignore-eos", "-no-cnv", "--no-display-prompt", "--simple-io", "-t", "2", "-c", "256"]
    ref = lamina.tools.run(tool("llama-completion"), cmd, capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert ours == ref.stdout.rstrip("\n")
