"""Speculative decoding: a draft model or n-gram lookup proposes, the target keeps what it would pick."""
from __future__ import annotations

from pathlib import Path

import pytest

import lamina
from tiny_gguf import write_tiny_llama

pytestmark = pytest.mark.timeout(120)

REPETITIVE = "def add(a, b):\n    return a + b\n\n" * 6 + "def add(a, b):\n"


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory: pytest.TempPathFactory):
    """Different random weights, the same vocabulary: its drafts are mostly wrong."""
    path = write_tiny_llama(tmp_path_factory.mktemp("draft") / "draft.gguf", seed=7, n_layer=1)
    with lamina.Model(path, gpu=False) as m:
        yield m


def plain(ctx: lamina.Context, prompt: str, n: int, **kw: object) -> list[int]:
    return list(ctx.complete(prompt, max_tokens=n, ignore_eos=True, **kw).tokens)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [1, 2, 5, 40])
def test_greedy_with_a_draft_model_is_plain_greedy(tiny_model: lamina.Model, n: int) -> None:
    """The target drafting for itself (p_min 0: every draft is n_max long) has its drafts accepted."""
    with tiny_model.context(n_ctx=512) as ctx:
        want = plain(ctx, "the sky is", n)
        ctx.kv_clear()
        gen = ctx.generate("the sky is", max_tokens=n, ignore_eos=True, draft=lamina.Draft(tiny_model, n_max=6, p_min=0.0))
        text = "".join(gen)
        assert list(gen.tokens) == want and text == tiny_model.detokenize(want)
        s = gen.stats
        if n > 2:
            assert s["n_drafted"] > 0 and s["acceptance"] > 0.9, s
        # the cache holds the prompt and every token out but the last: the next prompt reuses it
        assert list(ctx.tokens) == list(tiny_model.tokenize("the sky is", add_special=True, special=True)) + want[:-1]
        assert plain(ctx, "the sky is", n) == want


def test_greedy_with_a_wrong_draft_is_plain_greedy(tiny_model: lamina.Model, other_draft: lamina.Model) -> None:
    draft = lamina.Draft(other_draft, n_max=8, p_min=0.0)
    with tiny_model.context(n_ctx=512) as ctx:
        for prompt in ("hello world", REPETITIVE):
            want = plain(ctx, prompt, 48)
            gen = ctx.generate(prompt, max_tokens=48, ignore_eos=True, draft=draft)
            "".join(gen)
            assert list(gen.tokens) == want
            assert gen.stats["n_drafted"] > 0 and gen.stats["n_accepted"] < gen.stats["n_drafted"]
    draft.close()


def test_greedy_with_ngram_lookup_is_plain_greedy(tiny_model: lamina.Model) -> None:
    with tiny_model.context(n_ctx=1024) as ctx:
        want = plain(ctx, REPETITIVE, 64)
        for d in ("ngram", lamina.Draft(ngram_n=2, n_max=4), lamina.Draft(ngram_n=1, n_max=16)):
            gen = ctx.generate(REPETITIVE, max_tokens=64, ignore_eos=True, draft=d)  # type: ignore[arg-type]
            "".join(gen)
            assert list(gen.tokens) == want, d
        assert gen.stats["n_drafted"] > 0  # a 1-token key finds matches in any text


def test_stop_strings_and_eos_with_a_draft(tiny_model: lamina.Model) -> None:
    with tiny_model.context(n_ctx=512) as ctx:
        full = ctx.complete("hello world", max_tokens=40, ignore_eos=True).text
        stop = full[12:15]
        want = ctx.complete("hello world", max_tokens=40, ignore_eos=True, stop=stop)
        got = ctx.complete("hello world", max_tokens=40, ignore_eos=True, stop=stop,
                           draft=lamina.Draft(tiny_model, n_max=8, p_min=0.0))
        assert (got.text, list(got.tokens), got.finish_reason) == (want.text, list(want.tokens), "stop")
        # the tokens from the stop on leave the cache too, as without a draft (a stop inside a step's
        # accepted drafts used to leave them there, or cut one token too many)
        n_prompt = len(tiny_model.tokenize("hello world", special=True))
        assert ctx.n_past == n_prompt + len(got.tokens)
        assert [int(t) for t in ctx.tokens][n_prompt:] == [int(t) for t in got.tokens]
        for stop in (full[20:22], full[30:31]):
            for d in ("ngram", lamina.Draft(tiny_model, n_max=8, p_min=0.0)):
                c = ctx.complete("hello world", max_tokens=40, ignore_eos=True, stop=stop, draft=d)  # type: ignore[arg-type]
                assert [int(t) for t in ctx.tokens][n_prompt:] == [int(t) for t in c.tokens], (stop, d)
        # without ignore_eos the end-of-generation token ends it the same way
        a = ctx.complete("the sky is", max_tokens=64)
        b = ctx.complete("the sky is", max_tokens=64, draft=lamina.Draft(tiny_model, n_max=8, p_min=0.0))
        assert (list(a.tokens), a.finish_reason) == (list(b.tokens), b.finish_reason)


def test_sampling_with_a_draft_is_seeded(tiny_model: lamina.Model) -> None:
    hot = lamina.Sampler(temperature=0.9, seed=11)
    draft = lamina.Draft(tiny_model, n_max=4, p_min=0.0)
    with tiny_model.context(n_ctx=512) as ctx:
        a = ctx.complete("the sky is", max_tokens=30, ignore_eos=True, sampler=hot, draft=draft)
        b = ctx.complete("the sky is", max_tokens=30, ignore_eos=True, sampler=hot, draft=draft)
        assert list(a.tokens) == list(b.tokens) and len(a.tokens) == 30


def test_a_full_context_ends_with_length(tiny_model: lamina.Model) -> None:
    with tiny_model.context(n_ctx=256) as ctx:
        want = ctx.complete("the sky is", max_tokens=1000, ignore_eos=True)
        got = ctx.complete("the sky is", max_tokens=1000, ignore_eos=True, draft=lamina.Draft(tiny_model, n_max=16, p_min=0.0))
        assert got.finish_reason == want.finish_reason == "length" and list(got.tokens) == list(want.tokens)


def test_misuse(tiny_model: lamina.Model, tmp_path: Path) -> None:
    with tiny_model.context(n_ctx=256) as ctx:
        with pytest.raises(TypeError):
            ctx.generate("x", draft="lookup")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="context_full"):
            ctx.generate("x", draft="ngram", context_full="shift")
        with pytest.raises(ValueError, match="backend_sampling"):
            ctx.generate("x", draft="ngram", backend_sampling=True)
        for bad in ({"n_max": 0}, {"n_min": 5, "n_max": 4}, {"p_min": 1.5}, {"ngram_n": 0}):
            with pytest.raises(ValueError):
                lamina.Draft(**bad)  # type: ignore[arg-type]
        other = write_tiny_llama(tmp_path / "big-vocab.gguf", n_vocab=tiny_model.info.n_vocab + 100)
        with lamina.Model(other, gpu=False) as m:
            with pytest.raises(ValueError, match="vocabulary"):
                ctx.generate("x", draft=lamina.Draft(m))
        assert plain(ctx, "the sky is", 4)  # the context is fine



def test_a_recurrent_model_is_refused_as_target_or_draft(tiny_model: lamina.Model, tmp_path: Path) -> None:
    # a step cuts rejected drafts out of the cache; a recurrent state (Mamba) cannot drop tokens and
    # would keep them: silently wrong text. Refused up front, the context untouched.
    mamba = write_tiny_llama(tmp_path / "mamba.gguf", arch="mamba")
    with lamina.Model(mamba, gpu=False) as m:
        with m.context(n_ctx=256) as ctx:
            want = plain(ctx, "hello world", 6)
            with pytest.raises(ValueError, match="target model is recurrent"):
                ctx.generate("hello world", draft="ngram")
            assert plain(ctx, "hello world", 6) == want
        with tiny_model.context(n_ctx=256) as ctx:
            with pytest.raises(ValueError, match="draft model is recurrent"):
                ctx.generate("hello world", draft=lamina.Draft(m))
