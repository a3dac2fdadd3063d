"""lamina.Batcher: requests join and leave a running batch and get what they would get alone."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

import lamina

pytestmark = pytest.mark.timeout(120)

PROMPTS = ["the sky is", "hello world", "Paris is the capital of", "one two three four five six seven"]


def alone(model: lamina.Model, prompt: str, n: int) -> list[int]:
    with model.context(n_ctx=256) as ctx:
        return list(ctx.complete(prompt, max_tokens=n, ignore_eos=True).tokens)


def test_requests_that_join_and_leave_mid_run_get_their_tokens_alone(tiny_model: lamina.Model) -> None:
    lengths = [60, 5, 20, 9]
    want = [alone(tiny_model, p, n) for p, n in zip(PROMPTS, lengths)]
    with lamina.Batcher(tiny_model, n_seq_max=3, n_ctx=3 * 256, chunk=4) as b:
        first = b.submit(PROMPTS[0], max_tokens=lengths[0], ignore_eos=True)
        pieces = iter(first)
        head = next(pieces)  # the first request is generating before the others join
        second = b.submit(PROMPTS[1], max_tokens=lengths[1], ignore_eos=True)
        third = b.submit(PROMPTS[2], max_tokens=lengths[2], ignore_eos=True)
        assert second.result(timeout=60).finish_reason == "length"  # leaves while the others run
        fourth = b.submit(PROMPTS[3], max_tokens=lengths[3], ignore_eos=True)  # takes its sequence
        got = [r.result(timeout=60) for r in (first, second, third, fourth)]
        assert [list(c.tokens) for c in got] == want
        assert first.finish_reason == "length" and head + "".join(pieces) == got[0].text
        s = b.stats
        assert s["finished"] == 4 and s["running"] == 0 and s["waiting"] == 0
        assert 2 <= s["max_running"] <= 3


def test_the_stream_is_the_text(tiny_model: lamina.Model) -> None:
    with lamina.Batcher(tiny_model, n_seq_max=2, n_ctx=512) as b:
        r = b.submit(PROMPTS[0], max_tokens=30, ignore_eos=True)
        text = "".join(r)
        c = r.result()
        assert text == c.text == tiny_model.detokenize(c.tokens) and len(c.tokens) == 30


def test_more_requests_than_sequences_wait_in_order(tiny_model: lamina.Model) -> None:
    want = [alone(tiny_model, p, 8) for p in PROMPTS]
    with lamina.Batcher(tiny_model, n_seq_max=1, n_ctx=256) as b:
        assert [list(c.tokens) for c in b.generate(PROMPTS, max_tokens=8, ignore_eos=True)] == want
        assert b.stats["max_running"] == 1


def test_cancel_frees_the_sequence(tiny_model: lamina.Model) -> None:
    with lamina.Batcher(tiny_model, n_seq_max=1, n_ctx=256) as b:
        long = b.submit(PROMPTS[0], max_tokens=10_000, ignore_eos=True)  # would hold the only sequence
        queued = b.submit(PROMPTS[1], max_tokens=4, ignore_eos=True)
        queued.cancel()  # never admitted: ends at once
        assert queued.finish_reason == "cancelled"
        next(iter(long))
        long.cancel()
        assert long.result(timeout=30).finish_reason == "cancelled"
        after = b.submit(PROMPTS[2], max_tokens=12, ignore_eos=True)  # needs the freed sequence
        assert list(after.result(timeout=30).tokens) == alone(tiny_model, PROMPTS[2], 12)
        long.cancel()  # cancelling an ended request does nothing
        assert long.finish_reason == "cancelled"


def test_stop_strings_end_a_request_and_free_it(tiny_model: lamina.Model) -> None:
    full = "".join(lamina.Batcher(tiny_model, n_seq_max=1, n_ctx=256).submit(PROMPTS[0], max_tokens=40, ignore_eos=True))
    stop = full[10:14]
    with lamina.Batcher(tiny_model, n_seq_max=1, n_ctx=256) as b:
        r = b.submit(PROMPTS[0], max_tokens=40, ignore_eos=True, stop=stop)
        text = "".join(r)
        c = r.result()
        assert c.finish_reason == "stop" and text == c.text == full[: full.index(stop)]
        kept = b"".join(tiny_model.token_to_piece(t) for t in c.tokens).decode("utf-8", errors="replace")
        assert text.startswith(kept) and stop not in kept


def test_asyncio(tiny_model: lamina.Model) -> None:
    want = [alone(tiny_model, p, 10) for p in PROMPTS]

    async def main(b: lamina.Batcher) -> None:
        results = await asyncio.gather(*(b.submit(p, max_tokens=10, ignore_eos=True) for p in PROMPTS))
        assert [list(c.tokens) for c in results] == want
        pieces = [p async for p in b.submit(PROMPTS[0], max_tokens=10, ignore_eos=True)]
        assert "".join(pieces) == results[0].text
        # a cancelled task cancels its request, which frees its sequence
        long = b.submit(PROMPTS[1], max_tokens=10_000, ignore_eos=True)
        task = asyncio.ensure_future(_await(long))
        await asyncio.sleep(0)  # the task starts awaiting (a task cancelled before it ran never awaited the request)
        while len(long.tokens) == 0:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert long.result(timeout=30).finish_reason == "cancelled"

    async def _await(r: lamina.Request) -> lamina.Completion:
        return await r

    with lamina.Batcher(tiny_model, n_seq_max=4, n_ctx=4 * 4096) as b:  # the long request runs for seconds
        asyncio.run(main(b))
        asyncio.run(main(b))  # a second event loop works too


def test_submit_from_many_threads(tiny_model: lamina.Model) -> None:
    want = {p: alone(tiny_model, p, 12) for p in PROMPTS}
    got: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    with lamina.Batcher(tiny_model, n_seq_max=2, n_ctx=512) as b:
        def worker(p: str) -> None:
            try:
                got[p] = list(b.submit(p, max_tokens=12, ignore_eos=True).result(timeout=60).tokens)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=worker, args=(p,)) for p in PROMPTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and got == want


def test_a_full_unified_cache_ends_the_longest_request(tiny_model: lamina.Model) -> None:
    with lamina.Batcher(tiny_model, n_seq_max=2, n_ctx=256, kv=lamina.KV(unified=True)) as b:
        rs = [b.submit(p, max_tokens=200, ignore_eos=True) for p in PROMPTS[:2]]
        done = [r.result(timeout=60) for r in rs]
        assert [c.finish_reason for c in done] == ["length", "length"]
        n = [len(c.tokens) + c.n_prompt for c in done]
        assert min(n) < 200 < max(n)  # the longest ended when the shared cache was full, the other ran on
        assert list(done[0].tokens[:20]) == alone(tiny_model, PROMPTS[0], 20)
        # the cache is free again
        assert len(b.submit(PROMPTS[2], max_tokens=4, ignore_eos=True).result(timeout=30).tokens) == 4


def test_misuse_raises(tiny_model: lamina.Model) -> None:
    b = lamina.Batcher(tiny_model, n_seq_max=2, n_ctx=256)
    with pytest.raises(ValueError, match="n_ctx / n_seq_max"):
        b.submit("the " * 400)
    with pytest.raises(ValueError):
        b.submit("hi", max_tokens=0)
    with pytest.raises(TypeError):
        b.submit("hi", sampler="greedy")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        b.submit("hi", stop=[1])  # type: ignore[list-item]
    with pytest.raises(IndexError):
        b.submit([1, 10**6])
    with pytest.raises(ValueError):
        b.submit("hi", stop=[""])
    r = b.submit(PROMPTS[0], max_tokens=10_000, ignore_eos=True)
    with pytest.raises(TimeoutError):
        r.result(timeout=0)
    queued = [b.submit(PROMPTS[1], max_tokens=10_000, ignore_eos=True) for _ in range(3)]
    b.close()
    b.close()
    assert queued[-1].finish_reason == "cancelled" and r.done
    with pytest.raises(lamina.ClosedError):
        b.submit("hi")
    with pytest.raises(ValueError):
        lamina.Batcher(tiny_model, n_seq_max=0)


def test_sampled_requests_are_reproducible(tiny_model: lamina.Model) -> None:
    hot = lamina.Sampler(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=3, repeat_penalty=1.2)
    with tiny_model.context(n_ctx=256) as one:
        want = list(one.complete(PROMPTS[0], max_tokens=16, sampler=hot, ignore_eos=True).tokens)
    with lamina.Batcher(tiny_model, n_seq_max=2, n_ctx=512) as b:
        other = b.submit(PROMPTS[1], max_tokens=30, ignore_eos=True)
        time.sleep(0.01)
        r = b.submit(PROMPTS[0], max_tokens=16, sampler=hot, ignore_eos=True)
        assert list(r.result(timeout=30).tokens) == want
        other.result(timeout=30)


def test_a_batcher_nobody_holds_is_collected(tiny_model: lamina.Model) -> None:
    """Requests hold their Batcher; when neither is held, the Batcher goes and its loop thread ends."""
    import gc
    import weakref

    b = lamina.Batcher(tiny_model, n_seq_max=1, n_ctx=256)
    b.submit(PROMPTS[0], max_tokens=10_000, ignore_eos=True)
    thread, ref = b._thread, weakref.ref(b)
    del b
    gc.collect()
    assert ref() is None
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_greedy_tokens_from_backend_sampling_are_the_same(tiny_model: lamina.Model) -> None:
    """With the logits on a GPU, greedy requests take their token from llama.cpp's backend sampling
    (the argmax in the graph); forced here on the CPU: the same tokens, sampled requests mixed in."""
    prompts = [f"{p} {i}" for i in range(2) for p in PROMPTS]
    want = [alone(tiny_model, p, 12) for p in prompts]
    hot = lamina.Sampler(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=3)
    with tiny_model.context(n_ctx=256) as one:  # each request's sampler has its own seeded chain
        want_hot = [list(one.complete(p, max_tokens=12, sampler=hot, ignore_eos=True).tokens) for p in prompts]
    with tiny_model.context(n_ctx=8 * 64, n_seq_max=8) as ctx:
        for round_ in range(2):  # slots change hands between greedy and sampled requests
            eng = lamina._native.Batcher(ctx.native, 0, True)
            samplers = [hot if (i == 1) == (round_ == 0) else lamina.Sampler() for i in range(len(prompts))]
            reqs = [eng.submit(ctx._prompt_tokens(p), s.params(), 12, True, []) for p, s in zip(prompts, samplers)]
            eng.run(True)
            got = [list(r.result()["tokens"]) for r in reqs]
            for i, (g, s) in enumerate(zip(got, samplers)):
                assert g == (want_hot[i] if s is hot else want[i]), (round_, i)
        ctx.decode([1, 2, 3], logits="all")  # the samplers are detached: logits rows are back
        assert ctx.logits.shape == (3, tiny_model.info.n_vocab)


def test_ctrl_c_stops_generate_batch_between_steps(tiny_model: lamina.Model, sigint_raises: None) -> None:
    import signal

    with tiny_model.context(n_ctx=2 * 16384, n_seq_max=2) as ctx:
        timer = threading.Timer(0.2, lambda: signal.raise_signal(signal.SIGINT))
        timer.start()
        t0 = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            ctx.generate_batch(["hello world"] * 2, max_tokens=16000, ignore_eos=True)  # seconds without it
        assert time.perf_counter() - t0 < 2.0
        timer.join()
        assert len(ctx.generate_batch(["hi"], max_tokens=3, ignore_eos=True)[0].tokens) == 3  # usable after


def test_a_forked_child_gets_fork_error_not_a_hang(tiny_model: lamina.Model) -> None:
    import os

    with lamina.Batcher(tiny_model, n_seq_max=1, n_ctx=16384) as b:
        r = b.submit("hello world", max_tokens=16000, ignore_eos=True)
        pid = os.fork()
        if pid == 0:  # the loop thread is the parent's: waiting on it here would never end
            code = 1
            try:
                r.result()
            except lamina.ForkError:
                code = 0
            except BaseException:  # noqa: BLE001 - the exit code says it
                code = 2
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        r.cancel()


def test_a_closed_event_loop_does_not_swallow_later_wake_ups(tiny_model: lamina.Model) -> None:
    with lamina.Batcher(tiny_model, n_seq_max=4, n_ctx=4 * 4096) as b:
        stale = [b.submit(p, max_tokens=4000, ignore_eos=True) for p in PROMPTS]
        loop = asyncio.new_event_loop()

        async def wait(r: lamina.Request) -> lamina.Completion:
            return await r

        tasks = [loop.create_task(wait(r)) for r in stale]
        loop.run_until_complete(asyncio.sleep(0.05))
        loop.close()  # the tasks' awaits never end
        for r in stale:
            r.cancel()

        async def one() -> lamina.Completion:
            return await asyncio.wait_for(b.submit("hello", max_tokens=1), 10)

        for _ in range(5):
            assert len(asyncio.run(one()).tokens) == 1
        assert len(b._events) == 0
        del tasks
