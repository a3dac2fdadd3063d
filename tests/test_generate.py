"""Generation: greedy determinism, exact greedy fast path, seeded sampling, prefix reuse,
UTF-8-safe streaming, stop strings, and readable English from the real model."""
from __future__ import annotations

import re

import numpy as np
import pytest

import lamina
from lamina import _native


def greedy_tokens(model: lamina.Model, prompt: str, n: int, **ctx_kw: int) -> list[int]:
    with model.context(**ctx_kw) as ctx:
        gen = ctx.generate(prompt, max_tokens=n, ignore_eos=True)
        for _ in gen:
            pass
        return list(gen.tokens)


def test_greedy_is_deterministic_across_contexts(tiny_model: lamina.Model) -> None:
    a = greedy_tokens(tiny_model, "the sky is", 40, n_ctx=256)
    b = greedy_tokens(tiny_model, "the sky is", 40, n_ctx=256)
    assert len(a) == 40 and a == b


def test_argmax_fast_path_equals_llama_greedy_chain(tiny_model: lamina.Model) -> None:
    """The native argmax picks exactly what llama.cpp's greedy sampler picks."""
    ctx = tiny_model.context(n_ctx=256)
    greedy = _native.Sampler(tiny_model.native)
    assert greedy.greedy and greedy.describe() == ["greedy"]
    ctx.decode(tiny_model.tokenize("the capital of France"))
    for _ in range(30):
        fast = greedy.sample(ctx.native, use_chain=False)
        chain = greedy.sample(ctx.native, use_chain=True)
        assert fast == chain == int(np.argmax(ctx.logits[0]))
        ctx.decode([fast])


def _argmax_impls() -> list[str]:
    try:
        _native.argmax(np.zeros(1, np.float32), impl="avx2")
        return ["auto", "sse2", "avx2"]
    except ValueError:
        return ["auto", "sse2"]


@pytest.mark.parametrize("impl", _argmax_impls())
def test_argmax_ties_and_edges(impl: str) -> None:
    x = np.zeros(1000, dtype=np.float32)
    x[[17, 900]] = 3.0
    assert _native.argmax(x, impl=impl) == 17  # first of equal maxima, as llama.cpp's greedy
    x[[300, 301]] = 5.0
    assert _native.argmax(x, impl=impl) == 300
    rng = np.random.default_rng(0)
    for n in (1, 3, 15, 16, 17, 33, 63, 64, 65, 255, 256, 257, 1000, 262144, 262145):
        y = rng.standard_normal(n).astype(np.float32)
        assert _native.argmax(y, impl=impl) == int(np.argmax(y))
        y[-1] = 100.0  # the tail after the last whole block
        assert _native.argmax(y, impl=impl) == n - 1
        y[0] = 100.0
        assert _native.argmax(y, impl=impl) == 0
    y = np.full(5000, -np.inf, dtype=np.float32)
    assert _native.argmax(y, impl=impl) == 0  # all -inf: 0, as llama.cpp's greedy
    y = np.sort(rng.standard_normal(70000).astype(np.float32))  # rising: every block beats the last
    assert _native.argmax(y, impl=impl) == 69999


def test_argmax_impl_is_validated() -> None:
    with pytest.raises(ValueError, match="impl"):
        _native.argmax(np.zeros(4, np.float32), impl="avx9")


def test_seeded_sampling_is_reproducible(tiny_model: lamina.Model) -> None:
    def run(seed: int) -> list[int]:
        with tiny_model.context(n_ctx=256) as ctx:
            gen = ctx.generate("the sky is", max_tokens=30, ignore_eos=True,
                               sampler=lamina.Sampler(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=seed))
            list(gen)
            return list(gen.tokens)

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_sampler_chain_order(tiny_model: lamina.Model) -> None:
    s = lamina.Sampler(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.1, seed=3).native(tiny_model)
    assert s.describe() == ["penalties", "top-k", "top-p", "min-p", "temp", "dist"]
    assert not s.greedy
    full = lamina.Sampler(temperature=0.7, logit_bias={5: -1.0}, dry_multiplier=0.8, xtc_probability=0.5,
                          top_n_sigma=1.0, typical_p=0.9, grammar='root ::= "a"').native(tiny_model)
    assert full.describe() == ["grammar", "logit-bias", "dry", "top-n-sigma", "top-k", "typical", "top-p",
                               "min-p", "xtc", "temp", "dist"]
    assert lamina.Sampler().native(tiny_model).greedy
    # llama.cpp turns last_n=-1 into "disabled"; lamina makes it the whole context
    assert "dry" in lamina.Sampler(dry_multiplier=0.8, dry_penalty_last_n=-1).native(tiny_model, 256).describe()
    assert "penalties" in lamina.Sampler(repeat_penalty=1.1, penalty_last_n=-1).native(tiny_model).describe()
    for shaped in (lamina.Sampler(repeat_penalty=1.2), lamina.Sampler(logit_bias={3: 2.0}),
                   lamina.Sampler(grammar='root ::= "a"')):
        assert not shaped.native(tiny_model).greedy  # these change the argmax: the chain must run


def test_prefix_reuse_gives_the_same_tokens_as_a_fresh_context(tiny_model: lamina.Model) -> None:
    prompt = "the capital of France is Paris and the sky is"
    fresh = greedy_tokens(tiny_model, prompt, 20, n_ctx=256)
    ctx = tiny_model.context(n_ctx=256)
    list(ctx.generate("the capital of France is", max_tokens=10))
    gen = ctx.generate(prompt, max_tokens=20, ignore_eos=True)
    list(gen)
    assert gen.stats["n_reused"] > 0
    assert gen.stats["n_prompt_eval"] < gen.stats["n_prompt"]
    assert list(gen.tokens) == fresh
    # same prompt again: everything but the last prompt token is reused
    gen = ctx.generate(prompt, max_tokens=20, ignore_eos=True)
    list(gen)
    assert gen.stats["n_prompt_eval"] == 1 and list(gen.tokens) == fresh


def test_pieces_are_whole_utf8_and_join_to_the_detokenized_text(tiny_model: lamina.Model) -> None:
    ctx = tiny_model.context(n_ctx=512)
    # high temperature over a vocab full of byte tokens: many multi-byte sequences split across tokens
    gen = ctx.generate("é 🙂", max_tokens=200, ignore_eos=True,
                       sampler=lamina.Sampler(temperature=3.0, top_k=0, top_p=1.0, min_p=0.0, seed=7))
    pieces = list(gen)
    assert all(isinstance(p, str) and p for p in pieces)
    text = "".join(pieces)
    assert text == tiny_model.detokenize(gen.tokens)


def test_max_tokens_and_finish_reasons(tiny_model: lamina.Model) -> None:
    ctx = tiny_model.context(n_ctx=256)
    gen = ctx.generate("the sky", max_tokens=5, ignore_eos=True)
    assert gen.finish_reason is None
    list(gen)
    assert gen.finish_reason == "length" and len(gen.tokens) == 5
    gen = ctx.generate("the sky", max_tokens=0)
    assert list(gen) == [] and gen.finish_reason == "length"


def test_context_full_stops_with_length(tiny_model: lamina.Model) -> None:
    ctx = tiny_model.context(n_ctx=64)
    n_ctx = ctx.n_ctx
    prompt = [1] + [300] * (n_ctx - 10)
    gen = ctx.generate(prompt, max_tokens=1000, ignore_eos=True)
    list(gen)
    assert gen.finish_reason == "length"
    assert len(prompt) + len(gen.tokens) == n_ctx + 1  # the last sampled token needs no slot


def test_stop_strings_end_the_stream_and_are_cut(tiny_model: lamina.Model) -> None:
    ctx = tiny_model.context(n_ctx=256)
    full = "".join(ctx.generate("the sky is", max_tokens=40, ignore_eos=True))
    stop = full[10:13]
    cut = "".join(ctx.generate("the sky is", max_tokens=40, ignore_eos=True, stop=[stop, "\x00never"]))
    assert cut == full[: full.index(stop)]
    gen = ctx.generate("the sky is", max_tokens=40, ignore_eos=True, stop=stop)
    list(gen)
    assert gen.finish_reason == "stop"
    # the tokens past the stop leave the token list and the KV cache: what is kept is the text
    # before the stop, and the cache holds the prompt and those tokens only
    kept = b"".join(tiny_model.token_to_piece(int(t)) for t in gen.tokens).decode("utf-8", errors="replace")
    assert cut.startswith(kept) and len(cut) - len(kept) < 16, (cut, kept)
    prompt = list(tiny_model.tokenize("the sky is", special=True))
    assert list(ctx.tokens) == prompt + list(gen.tokens) and ctx.kv.used() == len(prompt) + len(gen.tokens)
    again = ctx.generate(prompt + list(gen.tokens) + [300], max_tokens=4, ignore_eos=True)
    list(again)
    assert again.stats["n_reused"] == len(prompt) + len(gen.tokens)  # all of it, and only it, is reused


def test_a_closed_generation_yields_nothing_more_and_is_a_context_manager(tiny_model: lamina.Model) -> None:
    ctx = tiny_model.context(n_ctx=256)
    for stop in ((), ("\x00never",)):  # the native iterator, and the stop-string stream holding text back
        gen = ctx.generate("the sky is", max_tokens=40, ignore_eos=True, stop=stop)
        next(iter(gen))
        gen.close()
        assert list(gen) == [] and len(gen.tokens) < 40
    with ctx.generate("the sky is", max_tokens=40, ignore_eos=True) as gen:
        first = next(iter(gen))
    assert first and list(gen) == []


def test_complete_returns_text_tokens_and_speeds(tiny_model: lamina.Model) -> None:
    ctx = tiny_model.context(n_ctx=256)
    res = ctx.complete("the sky is", max_tokens=16, ignore_eos=True)
    assert res.finish_reason == "length" and len(res.tokens) == 16
    assert res.text == tiny_model.detokenize(res.tokens)
    assert res.tokens_per_s > 0 and res.prompt_tokens_per_s > 0


@pytest.mark.model
def test_real_model_greedy_is_readable_english_and_deterministic(real_model: lamina.Model) -> None:
    ctx = real_model.context(n_ctx=1024)
    first = ctx.complete("The three primary colors are", max_tokens=24)
    ctx.kv_clear()
    second = ctx.complete("The three primary colors are", max_tokens=24)
    assert first.text == second.text and list(first.tokens) == list(second.tokens)
    sentence = first.text.split(".")[0].lower()
    assert all(c in sentence for c in ("red", "blue", "yellow")), first.text
    words = re.findall(r"[a-z]+", first.text.lower())
    assert len(words) >= 10


@pytest.mark.model
def test_real_model_greedy_fast_path_equals_chain(real_model: lamina.Model) -> None:
    ctx = real_model.context(n_ctx=512)
    greedy = _native.Sampler(real_model.native)
    ctx.decode(real_model.tokenize("Once upon a time"))
    for _ in range(16):
        fast = greedy.sample(ctx.native, use_chain=False)
        assert fast == greedy.sample(ctx.native, use_chain=True)
        ctx.decode([fast])


def test_context_shift_keeps_generating_past_n_ctx(tiny_model: lamina.Model) -> None:
    ctx = tiny_model.context(n_ctx=64)
    n_ctx = ctx.n_ctx
    prompt = [1] + [300 + i % 50 for i in range(20)]
    gen = ctx.generate(prompt, max_tokens=n_ctx * 2, ignore_eos=True, context_full="shift", n_keep=4)
    list(gen)
    assert gen.finish_reason == "length" and len(gen.tokens) == n_ctx * 2
    assert gen.stats["n_shifts"] >= 2
    assert list(ctx.tokens[:4]) == prompt[:4]             # the kept prefix survives every shift
    assert ctx.kv.pos_range(0) == (0, ctx.n_past - 1)      # positions stay contiguous
    with pytest.raises(ValueError, match="n_keep"):
        ctx.generate(prompt, context_full="shift", n_keep=n_ctx)
    with pytest.raises(ValueError, match="context_full"):
        ctx.generate(prompt, context_full="wrap")  # type: ignore[arg-type]


def test_backend_sampling_gives_the_host_greedy_tokens(tiny_model: lamina.Model) -> None:
    with tiny_model.context(n_ctx=256) as ctx:
        host = ctx.complete("the sky is", max_tokens=40, ignore_eos=True).tokens
        ctx.kv_clear()
        gen = ctx.generate("the sky is", max_tokens=40, ignore_eos=True, backend_sampling=True)
        "".join(gen)
        assert list(gen.tokens) == list(host)
        ctx.decode([5, 6])  # the sampler is detached again: logits come back
        assert ctx.logits.shape == (1, tiny_model.info.n_vocab)
        with pytest.raises(ValueError, match="greedy sampler only"):
            ctx.generate("x", sampler=lamina.Sampler(temperature=0.8), backend_sampling=True)
        early = ctx.generate("the sky is", max_tokens=40, ignore_eos=True, backend_sampling=True)
        next(early)
        early.close()
        ctx.decode([7])
        assert ctx.logits.shape == (1, tiny_model.info.n_vocab)


PROMPTS = ["the sky is", "hello world", "Paris is the capital of"]


def test_batch_generation_equals_one_prompt_at_a_time(tiny_model: lamina.Model) -> None:
    with tiny_model.context(n_ctx=256) as one:
        singles = [list(one.complete(p, max_tokens=24, ignore_eos=True).tokens) for p in PROMPTS]
    with tiny_model.context(n_ctx=768, n_seq_max=3) as ctx:
        results = ctx.generate_batch(PROMPTS, max_tokens=24, ignore_eos=True)
        assert [list(r.tokens) for r in results] == singles
        assert all(r.finish_reason == "length" and r.tokens_per_s > 0 for r in results)
        assert [r.text for r in results] == [tiny_model.detokenize(s) for s in singles]
        # sequence 0 stays usable for single-sequence generation afterwards
        assert list(ctx.complete(PROMPTS[0], max_tokens=24, ignore_eos=True).tokens) == singles[0]


def test_batch_generation_queues_prompts_beyond_its_sequences(tiny_model: lamina.Model) -> None:
    """More prompts than n_seq_max: the rest wait for a free sequence, and each gets the tokens it
    would get alone."""
    with tiny_model.context(n_ctx=256) as one:
        singles = [list(one.complete(p, max_tokens=12, ignore_eos=True).tokens) for p in PROMPTS * 2]
    with tiny_model.context(n_ctx=512, n_seq_max=2) as ctx:
        results = ctx.generate_batch(PROMPTS * 2, max_tokens=12, ignore_eos=True)
        assert [list(r.tokens) for r in results] == singles


def test_batch_generation_samples_each_sequence_with_its_own_seed(tiny_model: lamina.Model) -> None:
    hot = lamina.Sampler(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    with tiny_model.context(n_ctx=512, n_seq_max=2) as ctx:
        a = ctx.generate_batch([PROMPTS[0]] * 2, max_tokens=16, sampler=hot, ignore_eos=True)
        b = ctx.generate_batch([PROMPTS[0]] * 2, max_tokens=16, sampler=hot, ignore_eos=True)
        assert [list(r.tokens) for r in a] == [list(r.tokens) for r in b]  # reproducible
        assert list(a[0].tokens) != list(a[1].tokens)  # seeds 7 and 8 differ
        same = ctx.generate_batch([PROMPTS[0]] * 2, max_tokens=16, sampler=[hot, hot], ignore_eos=True)
        assert list(same[0].tokens) == list(same[1].tokens) == list(a[0].tokens)


def test_batch_generation_checks_its_inputs(tiny_model: lamina.Model) -> None:
    with tiny_model.context(n_ctx=256, n_seq_max=2) as ctx:
        with pytest.raises(ValueError, match="one per prompt"):
            ctx.generate_batch(PROMPTS[:2], sampler=[lamina.Sampler()])
        with pytest.raises(ValueError, match="prompt 1: .*n_ctx / n_seq_max"):
            ctx.generate_batch(["hi", "the " * 2000])
        with pytest.raises(TypeError):
            ctx.generate_batch("one prompt")  # type: ignore[arg-type]
        with pytest.raises(IndexError):
            ctx.generate_batch([[1, 2], [10**6]])
        # the context is fine after every refusal
        assert len(ctx.generate_batch(["hi", "sky"], max_tokens=4, ignore_eos=True)) == 2


@pytest.mark.parametrize("stop", ["after", "capita"])
def test_a_stop_after_invalid_utf8_trims_the_tokens_at_the_stop(tiny_model: lamina.Model, stop: str) -> None:
    """Random weights emit byte tokens that are not UTF-8 (each becomes one U+FFFD character, three
    bytes of text): the stop is found by characters, so the tokens kept end before it."""
    ctx = tiny_model.context(n_ctx=256)
    gen = ctx.generate("hello world", max_tokens=40, stop=stop)
    text = "".join(gen)
    tokens = list(gen.tokens)
    kept = b"".join(tiny_model.token_to_piece(t) for t in tokens).decode("utf-8", errors="replace")
    assert gen.finish_reason == "stop" and stop not in kept and text.startswith(kept), (text, kept)
    assert ctx.n_past == len(tiny_model.tokenize("hello world", special=True)) + len(tokens)
    if stop == "after":
        assert "\ufffd" in text  # the case this test is for


def test_native_text_decoding_is_pythons_replace_decoding() -> None:
    # stop strings are matched natively in the text as yielded: the native decoder must see every
    # byte sequence as Python's bytes.decode("utf-8", "replace") does
    import random
    from lamina import _native
    rng = random.Random(7)
    pieces = [b"\xc3", b"\xa9", b"\xe2\x82", b"\xac", b"\xf0\x9f\x98", b"\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
              b"\xe0\x80\xaf", b"\xc0\xaf", b"\xff", b"a", b"\xf0\x90", b"\xef\xbf\xbd"]
    cases = [bytes(rng.randrange(256) for _ in range(rng.randrange(12))) for _ in range(20000)]
    cases += [b"".join(rng.choice(pieces) for _ in range(rng.randrange(8))) for _ in range(20000)]
    for data in cases:
        assert _native.utf8_replace(data) == data.decode("utf-8", "replace").encode(), data


@pytest.mark.parametrize("stop", ["after", "\ufffd", "capita"])
def test_generate_and_generate_batch_stop_at_the_same_character(tiny_model: lamina.Model, stop: str) -> None:
    # one stop-string matcher: the Batcher used to match bytes (a U+FFFD the user sees in the text never
    # matched the invalid bytes behind it), generate matched characters in Python
    ctx = tiny_model.context(n_ctx=256)
    gen = ctx.generate("hello world", max_tokens=40, stop=stop)
    text = "".join(gen)
    (c,) = ctx.generate_batch(["hello world"], max_tokens=40, stop=stop)
    assert gen.finish_reason == c.finish_reason == "stop"
    assert c.text == text and stop not in text
    assert [int(t) for t in c.tokens] == [int(t) for t in gen.tokens]
