"""logprobs / top_logprobs: computed natively from each generated token's logits row, before the
sampler chain, on every way of generating (generate, complete, chat, generate_batch, Batcher,
speculative decoding), cut with the tokens at a stop string."""
from __future__ import annotations

import numpy as np
import pytest

import lamina


def log_softmax(row: np.ndarray) -> np.ndarray:
    x = np.asarray(row, dtype=np.float64)
    m = x.max()
    out: np.ndarray = x - (m + np.log(np.exp(x - m).sum()))
    return out


def replayed(model: lamina.Model, prompt: str, tokens: np.ndarray, **ctx_kw: object) -> list[np.ndarray]:
    """log_softmax of ctx.logits before each token, decoding as generation does (the prompt, then
    one token at a time)."""
    rows = []
    with model.context(n_ctx=512, **ctx_kw) as ctx:
        ctx.decode(model.tokenize(prompt))
        for t in tokens:
            rows.append(log_softmax(ctx.logits[-1]))
            ctx.decode([int(t)])
    return rows


def check_against(rows: list[np.ndarray], lp: lamina.Logprobs, k: int, tol: float) -> None:
    assert lp.logprob.shape == (len(rows),) and lp.top_ids.shape == lp.top_logprob.shape == (len(rows), k)
    for i, ls in enumerate(rows):
        assert abs(ls[lp.tokens[i]] - lp.logprob[i]) < tol, i
        top = np.argsort(-ls, kind="stable")[:k]  # most likely first, ties by the lower id
        assert list(lp.top_ids[i]) == list(top), i
        assert np.abs(ls[top] - lp.top_logprob[i]).max() < tol, i


@pytest.mark.model
def test_greedy_logprobs_on_gemma_equal_log_softmax_of_the_logits(real_model: lamina.Model) -> None:
    prompt = "The capital of France is"
    with real_model.context(n_ctx=512) as ctx:
        out = ctx.complete(prompt, max_tokens=32, logprobs=True, top_logprobs=5)
    assert out.logprobs is not None and len(out.tokens) == 32
    assert list(out.logprobs.tokens) == list(out.tokens)
    assert list(out.logprobs.top_ids[:, 0]) == list(out.tokens)  # greedy: the most likely token
    check_against(replayed(real_model, prompt, out.tokens), out.logprobs, 5, 1e-4)


def test_sampled_tokens_get_the_models_logprobs_not_the_samplers(tiny_model: lamina.Model) -> None:
    """With temperature and top-k the token is drawn from the chain's distribution; its logprob
    is still the model's (before the chain), as llama-server and OpenAI report it."""
    prompt = "the sky is"
    sampler = lamina.Sampler(temperature=1.5, top_k=40, seed=7)
    with tiny_model.context(n_ctx=512) as ctx:
        out = ctx.complete(prompt, max_tokens=40, sampler=sampler, ignore_eos=True, logprobs=True, top_logprobs=3)
    assert out.logprobs is not None
    assert list(out.logprobs.top_ids[:, 0]) != list(out.tokens)  # not greedy
    check_against(replayed(tiny_model, prompt, out.tokens), out.logprobs, 3, 1e-4)


def test_logprobs_stream_with_the_tokens_and_are_cut_at_a_stop(tiny_model: lamina.Model) -> None:
    with tiny_model.context(n_ctx=512) as ctx:
        whole = ctx.complete("the sky is", max_tokens=30, ignore_eos=True, logprobs=True)
        assert whole.logprobs is not None and whole.logprobs.top_ids.shape == (30, 0)
        text = whole.text
        stop = text[len(text) // 2:len(text) // 2 + 3]
        gen = ctx.generate("the sky is", max_tokens=30, ignore_eos=True, stop=stop, logprobs=True)
        for _ in gen:
            lp = gen.logprobs
            assert lp is not None and len(lp.logprob) == len(gen.tokens)
        lp = gen.logprobs
        assert lp is not None and gen.finish_reason == "stop" and 0 < len(gen.tokens) < 30
        assert len(lp.logprob) == len(lp.tokens) == len(gen.tokens)
        assert np.allclose(lp.logprob, whole.logprobs.logprob[:len(lp.logprob)], atol=1e-4)  # prompt reused: not bitwise
        assert ctx.complete("the sky is", max_tokens=4).logprobs is None


def test_every_client_of_the_engine_reports_the_same_logprobs(tiny_model: lamina.Model) -> None:
    """generate, generate_batch, the Batcher and speculative decoding (several rows per step)."""
    prompts = ["the sky is", "once upon a time", "the sky is blue and"]
    with tiny_model.context(n_ctx=512) as ctx:
        alone = [ctx.complete(p, max_tokens=24, ignore_eos=True, logprobs=True, top_logprobs=4) for p in prompts]
        drafted = ctx.complete(prompts[0], max_tokens=24, ignore_eos=True, logprobs=True, top_logprobs=4,
                               draft=lamina.Draft(tiny_model, n_max=6, p_min=0.0))
    with tiny_model.context(n_ctx=1536, n_seq_max=3) as ctx:
        batch = ctx.generate_batch(prompts, max_tokens=24, ignore_eos=True, logprobs=True, top_logprobs=4)
    with lamina.Batcher(tiny_model, n_ctx=1536, n_seq_max=3) as b:
        served = b.generate(prompts, max_tokens=24, ignore_eos=True, logprobs=True, top_logprobs=4)
    for a, others in zip(alone, zip(batch, served, [drafted] + [None] * 2)):
        for o in others:
            if o is None:
                continue
            assert a.logprobs is not None and o.logprobs is not None
            assert list(o.tokens) == list(a.tokens)
            # a step of several rows (other sequences, a draft's) multiplies other shapes: the logits
            # themselves differ by up to ~5e-4 here; each client's exactness is checked above
            assert np.allclose(o.logprobs.logprob, a.logprobs.logprob, atol=2e-3)
            assert np.array_equal(o.logprobs.top_ids, a.logprobs.top_ids)


def test_openai_shape(tiny_model: lamina.Model) -> None:
    with tiny_model.context(n_ctx=256) as ctx:
        out = ctx.complete("the sky is", max_tokens=3, ignore_eos=True, logprobs=True, top_logprobs=2)
    assert out.logprobs is not None
    content = out.logprobs.openai(tiny_model)
    assert len(content) == 3 and set(content[0]) == {"token", "logprob", "bytes", "top_logprobs"}
    assert bytes(content[0]["bytes"]) == tiny_model.token_to_piece(int(out.tokens[0]), special=True)
    assert [e["logprob"] for e in content[0]["top_logprobs"]] == [float(v) for v in out.logprobs.top_logprob[0]]


def test_bad_logprobs_arguments_raise(tiny_model: lamina.Model) -> None:
    with tiny_model.context(n_ctx=256) as ctx:
        with pytest.raises(ValueError, match="top_logprobs needs logprobs=True"):
            ctx.generate("a", top_logprobs=3)
        with pytest.raises(ValueError, match="0..20"):
            ctx.generate("a", logprobs=True, top_logprobs=21)
        with pytest.raises(ValueError, match="0..20"):
            ctx.generate("a", logprobs=True, top_logprobs=-1)
        with pytest.raises(TypeError, match="logprobs must be"):
            ctx.generate("a", logprobs="yes")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="backend_sampling"):
            ctx.generate("a", logprobs=True, backend_sampling=True)
        assert ctx.complete("the sky is", max_tokens=2).text is not None  # the context still works


def test_a_stop_found_when_generation_ends_cuts_the_logprobs_too(tiny_model: lamina.Model) -> None:
    """A text ending in an incomplete character shows it as U+FFFD when the generation ends
    (max_tokens here), which can complete a stop string then: the tokens from it on leave, and
    their logprobs with them (the end-of-generation cut once shortened the tokens only)."""
    cases = 0
    for prompt in ["hello world", "the sky is", "once upon a time", "abc", "x y z"]:
        with tiny_model.context(n_ctx=256) as ctx:
            toks = list(ctx.complete(prompt, max_tokens=60, ignore_eos=True).tokens)
            for n in range(1, 61):  # the first prefix ending inside a character, with none replaced before
                text = b"".join(tiny_model.token_to_piece(t) for t in toks[:n])
                if "\ufffd" in text[:-4].decode("utf-8", "replace"):
                    break
                if "\ufffd" in text.decode("utf-8", "replace") and text[-1] >= 0xC0:
                    out = ctx.complete(prompt, max_tokens=n, ignore_eos=True, stop="\ufffd", logprobs=True)
                    assert out.finish_reason == "stop" and len(out.tokens) == n - 1
                    assert out.logprobs is not None and len(out.logprobs.logprob) == n - 1
                    cases += 1
                    break
    assert cases >= 1
