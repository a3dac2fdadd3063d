"""Nothing done to a context from Python may crash or hang the process.

Each test is a case that aborted, corrupted the heap or hung before lamina checked llama.cpp's
preconditions and leased each context to one thread at a time: partial sequence copies across
KV streams, batches wider than n_batch, two threads on one context, set_threads during a
generation, fork(), numbers that overflow C types, and the rest of the context-safety issue.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import lamina
from tiny_gguf import write_tiny_llama

PROMPT = [1, 5, 6, 7, 8]


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Slow enough per token that two threads really overlap on one context."""
    path = write_tiny_llama(tmp_path_factory.mktemp("safety") / "wide.gguf", n_layer=4, n_embd=256, n_head=4,
                            n_head_kv=4, n_ff=1024)
    with lamina.Model(path, gpu=False) as m:
        yield m


def greedy(ctx: lamina.Context, n: int = 16, prompt: list[int] = PROMPT) -> list[int]:
    return [int(t) for t in ctx.complete(prompt, max_tokens=n, ignore_eos=True).tokens]


# -- llama.cpp's preconditions -----------------------------------------------------------------

def test_partial_seq_cp_across_kv_streams_raises(tiny_model: lamina.Model) -> None:
    with tiny_model.context(n_ctx=256, n_seq_max=2) as ctx:  # default KV: one stream per sequence
        ctx.decode(list(range(1, 21)))
        with pytest.raises(ValueError, match="unified"):
            ctx.kv.seq_cp(0, 1, 2, 10)
        ctx.kv.seq_cp(0, 1)  # whole sequences copy across streams
        assert ctx.kv.pos_range(1) == (0, 19)
        assert ctx.n_past == 20 and len(greedy(ctx, 4)) == 4  # and the context goes on working
    with tiny_model.context(n_ctx=256, n_seq_max=2, kv=lamina.KV(unified=True)) as ctx:
        ctx.decode(list(range(1, 21)))
        ctx.kv.seq_cp(0, 1, 2, 10)  # one stream: any part
        assert ctx.kv.pos_range(1) == (2, 9)


def test_more_sequences_than_n_batch_is_refused_and_a_full_batch_works(tiny_model: lamina.Model) -> None:
    # llama.cpp keeps an output row per sequence within n_batch rows: it asserted at creation
    with pytest.raises(ValueError, match="n_seq_max=4 needs n_batch"):
        tiny_model.context(n_ctx=512, n_seq_max=4, n_batch=2, n_ubatch=2)
    prompts = [[1, 5, 6], [1, 7, 8, 9], [1, 10], [1, 11, 12, 13, 14]]
    with tiny_model.context(n_ctx=512, n_seq_max=4, n_batch=4, n_ubatch=2) as ctx:
        rows = ctx.generate_batch(prompts, max_tokens=8, ignore_eos=True)
    for prompt, row in zip(prompts, rows):
        with tiny_model.context(n_ctx=128) as alone:
            assert list(row.tokens) == greedy(alone, 8, prompt)


def test_a_batch_wider_than_n_batch_is_refused_not_aborted(tiny_model: lamina.Model) -> None:
    with tiny_model.context(n_ctx=256, n_batch=4, n_ubatch=4) as ctx:
        with pytest.raises(ValueError, match="n_batch"):
            ctx.decode(list(range(1, 11)), logits="all")
        ctx.decode(list(range(1, 11)))  # split into batches of n_batch
        assert ctx.n_past == 10


def test_numbers_that_overflow_c_types_get_lamina_errors(tiny_model: lamina.Model) -> None:
    with tiny_model.context(n_ctx=128, n_seq_max=2) as ctx:
        for call in (lambda: ctx.generate(PROMPT, max_tokens=10**12),
                     lambda: ctx.generate_batch([PROMPT], max_tokens=2**40),
                     lambda: ctx.kv.seq_rm(0, 2**40, -1),
                     lambda: ctx.kv.seq_cp(0, 2**33),
                     lambda: ctx.kv.seq_add(0, 0, -1, -2**40),
                     lambda: ctx.decode(PROMPT, seq=2**35),
                     lambda: ctx.generate(PROMPT, context_full="shift", n_keep=2**40)):
            with pytest.raises(ValueError, match=r"must be in \["):
                call()
        with pytest.raises(ValueError, match="n_ctx must be in"):
            tiny_model.context(n_ctx=2**40)
        assert len(greedy(ctx, 2)) == 2


def test_non_causal_embeddings_wider_than_n_ubatch_raise(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "bidir.gguf", causal=False)
    with lamina.Model(path, gpu=False) as m, lamina.Context(m, n_ctx=256, n_batch=64, n_ubatch=16, embeddings=True,
                                                             pooling="mean") as ctx:
        with pytest.raises(ValueError, match="non-causal.*n_ubatch"):
            ctx.decode(list(range(1, 41)))
        ctx.kv_clear()
        ctx.decode(list(range(1, 11)))
        assert ctx.native.embedding(0).shape == (m.info.n_embd,)


def test_failed_multi_ubatch_decode_leaves_cache_and_tokens_agreeing(wide_model: lamina.Model) -> None:
    with wide_model.context(n_ctx=1024, n_batch=512, n_ubatch=8) as ctx:
        ctx.decode(PROMPT)
        for delay in (0.002, 0.01, 0.03):
            timer = threading.Timer(delay, ctx.abort)
            timer.start()
            try:
                ctx.decode(list(range(1, 400)))
            except lamina.DecodeError:
                pass
            timer.join()
            lo, hi = ctx.kv.pos_range(0)
            assert hi + 1 == ctx.n_past, (delay, hi, ctx.n_past)
            assert list(ctx.tokens[: len(PROMPT)]) == PROMPT
            ctx.kv.seq_rm(0, len(PROMPT), -1)
        assert len(greedy(ctx, 4)) == 4


def test_an_abort_when_nothing_runs_never_stops_a_later_call(tiny_model: lamina.Model) -> None:
    # the race the timer test above can hit on a fast machine: abort() lands after the decode ended
    with tiny_model.context(n_ctx=256) as ctx:
        ctx.decode(PROMPT)
        ctx.abort()
        ctx.decode([5, 6, 7])
        ctx.abort()
        assert len(greedy(ctx, 4)) == 4
        # a generation between two tokens is running: its next token stops
        gen = ctx.generate(PROMPT, max_tokens=8, ignore_eos=True)
        next(gen)
        ctx.abort()
        assert ctx.n_past > 0 and len(ctx.tokens) > 0  # read-only calls between tokens keep the request
        with pytest.raises(lamina.DecodeError, match="aborted"):
            for _ in gen:
                pass
        assert len(greedy(ctx, 4)) == 4
        # a generation refused before it ran, then an abort while nothing runs, then a generation
        with pytest.raises(ValueError):
            ctx.generate(list(range(1, 400)), max_tokens=4)
        ctx.abort()
        assert len(greedy(ctx, 4)) == 4


def test_a_logits_view_blocks_backend_sampling_from_reallocating_it(tiny_model: lamina.Model) -> None:
    with tiny_model.context(n_ctx=128) as ctx:
        ctx.decode(PROMPT)
        view = ctx.logits
        before = np.array(view)
        gen = ctx.generate(PROMPT, max_tokens=4, backend_sampling=True, ignore_eos=True)
        with pytest.raises(lamina.LaminaError, match="views"):
            next(gen)
        assert np.array_equal(view, before)  # still the same, valid memory
        del view
        list(gen)
        with tiny_model.context(n_ctx=128) as fresh:  # the refused generator goes on, prompt and all
            assert list(gen.tokens) == greedy(fresh, 4)
        assert len(list(ctx.generate(PROMPT, max_tokens=4, backend_sampling=True, ignore_eos=True))) > 0


def test_generator_close_is_final(tiny_model: lamina.Model) -> None:
    with tiny_model.context(n_ctx=128) as ctx:
        gen = ctx.generate(PROMPT, max_tokens=50, ignore_eos=True)
        next(gen)
        gen.close()
        gen.close()
        assert list(gen) == []


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")
def test_a_signal_handler_reentering_the_context_gets_busy_error(wide_model: lamina.Model) -> None:
    # Python signal handlers run inside a main-thread decode (lamina's abort callback calls them),
    # so a handler can call back into the very context that is decoding: it must be refused
    seen: list[tuple[str, ...]] = []

    with wide_model.context(n_ctx=2048, n_batch=2048) as ctx:
        gen = ctx.generate(PROMPT, max_tokens=8, ignore_eos=True)

        def reenter(signum: int, frame: object) -> None:
            got = []
            for call in (lambda: next(gen), lambda: ctx.decode([5]), lambda: ctx.kv.seq_rm(0, 0, -1)):
                try:
                    call()
                    got.append("ran")  # the timer fired between decodes: allowed
                except StopIteration:
                    got.append("ran")
                except lamina.BusyError:
                    got.append("busy")
                except lamina.StaleGenerationError:  # between decodes, after an earlier handler's decode took
                    got.append("ran")                # sequence 0 from the generation: its defined answer
            seen.append(tuple(got))

        old = signal.signal(signal.SIGALRM, reenter)
        signal.setitimer(signal.ITIMER_REAL, 0.06, 0.06)
        try:
            for _ in range(20):
                ctx.kv_clear()
                ctx.decode([1 + i % 1000 for i in range(1500)])
                if ("busy",) * 3 in seen:
                    break
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        # inside a decode every call is refused; no call ever ran half-way into one
        assert ("busy",) * 3 in seen and set(seen) <= {("busy",) * 3, ("ran",) * 3}, seen[:12]
        ctx.kv_clear()
        assert len(greedy(ctx, 4)) == 4


# -- threads -----------------------------------------------------------------------------------

def hammer(ctx: lamina.Context, work, n_threads: int = 4, rounds: int = 20):  # type: ignore[no-untyped-def]
    """Run work(ctx) from n_threads threads at once; returns (results, BusyErrors, other errors)."""
    results, busy, other = [], [], []
    start = threading.Barrier(n_threads)

    def run() -> None:
        start.wait()
        for _ in range(rounds):
            try:
                results.append(work(ctx))
            except lamina.BusyError as exc:
                busy.append(exc)
            except Exception as exc:  # noqa: BLE001 - collected and asserted on below
                other.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a thread hung on a shared context"
    return results, busy, other


def test_threads_generating_on_one_context_get_busy_errors_or_right_tokens(wide_model: lamina.Model) -> None:
    with wide_model.context(n_ctx=256) as ctx:
        want = greedy(ctx, 24)
        results, busy, other = hammer(ctx, lambda c: greedy(c, 24))
    assert not other, other[:3]
    assert busy, "four threads on one context never collided: the test proves nothing"
    assert results and all(r == want for r in results)


def test_threads_decoding_on_one_context_never_corrupt_it(wide_model: lamina.Model) -> None:
    def work(c: lamina.Context) -> int:
        c.kv_clear()
        c.decode(list(range(1, 60)))
        return int(np.argmax(np.array(c.logits[-1])))

    with wide_model.context(n_ctx=256) as ctx:
        want = work(ctx)
        results, busy, other = hammer(ctx, work)
        assert not other, other[:3]
        assert busy and results and set(results) == {want}
        assert len(greedy(ctx, 4)) == 4


def test_set_threads_while_another_thread_generates_never_hangs(wide_model: lamina.Model) -> None:
    with wide_model.context(n_ctx=512, threads=2) as ctx:
        want = greedy(ctx, 200)
        done = threading.Event()
        out: list[list[int]] = []
        gen_thread = threading.Thread(target=lambda: (out.append(greedy(ctx, 200)), done.set()))
        gen_thread.start()
        busy = 0
        while not done.is_set():
            try:
                ctx.set_threads(1)
                ctx.set_threads(2)
            except lamina.BusyError:
                busy += 1
            time.sleep(0.001)
        gen_thread.join(timeout=60)
        assert not gen_thread.is_alive()
        assert busy > 0 and out == [want]
        ctx.set_threads(1)
        assert greedy(ctx, 200) == want


def test_eight_threads_with_their_own_contexts_share_one_model(wide_model: lamina.Model) -> None:
    with wide_model.context(n_ctx=128) as ctx:
        prompts = [[1, 5 + k, 6, 7] for k in range(8)]
        want = [greedy(ctx, 12, p) for p in prompts]
    errors: list[BaseException] = []
    mismatches: list[int] = []

    def worker(k: int) -> None:
        try:
            with wide_model.context(n_ctx=128, threads=1) as mine:
                for _ in range(50):
                    if greedy(mine, 12, prompts[k]) != want[k]:
                        mismatches.append(k)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads)
    assert not errors and not mismatches, (errors[:3], mismatches[:5])


# -- fork --------------------------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_gets_fork_error_not_a_hang(tiny_model: lamina.Model) -> None:
    with tiny_model.context(n_ctx=128, threads=2) as ctx:
        greedy(ctx, 8)  # the context has run its thread pools
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, then exit without running the parent's test machinery
            os.close(r)
            try:
                greedy(ctx, 8)
                msg = b"generated"
            except lamina.ForkError as exc:
                msg = b"ForkError " + str(exc).encode()[:200]
            except BaseException as exc:  # noqa: BLE001
                msg = repr(exc).encode()[:200]
            try:
                tiny_model.context(n_ctx=64)
                msg += b" | context created"
            except lamina.ForkError:
                msg += b" | ForkError for the model too"
            os.write(w, msg)
            os._exit(0)
        os.close(w)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        msg = os.read(r, 4096).decode()
        os.close(r)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        assert msg.startswith("ForkError") and "ForkError for the model too" in msg, msg
        assert len(greedy(ctx, 8)) == 8  # the parent's context is untouched


_POOL_CTX: lamina.Context | None = None


def _pool_worker(k: int) -> str:
    assert _POOL_CTX is not None
    try:
        _POOL_CTX.complete(PROMPT, max_tokens=4)
        return "generated"
    except lamina.ForkError:
        return "ForkError"


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method")
def test_a_multiprocessing_fork_pool_returns(tiny_model: lamina.Model) -> None:
    global _POOL_CTX
    with tiny_model.context(n_ctx=128, threads=2) as ctx:
        greedy(ctx, 8)
        _POOL_CTX = ctx
        try:
            with multiprocessing.get_context("fork").Pool(2) as pool:
                result = pool.map_async(_pool_worker, range(4))
                out = result.get(timeout=60)
        finally:
            _POOL_CTX = None
        assert out == ["ForkError"] * 4
        assert len(greedy(ctx, 8)) == 8


EXIT_CASES = {
    # a daemon thread generating when the main thread ends: 2 exits in 10 segfaulted (the thread
    # was inside llama.cpp while C++'s static objects were destroyed) and others printed ggml's
    # terminate handler (Python 3.11 ends a thread taking the GIL back with pthread_exit)
    "generate": """
        def work():
            while True:
                for _ in ctx.generate("the cat sat", max_tokens=50, ignore_eos=True):
                    pass
    """,
    # a daemon thread decoding long batches, and one reading a Batcher's request
    "decode": """
        def work():
            toks = m.tokenize("the cat sat on the mat " * 20)
            while True:
                ctx.kv_clear()
                ctx.decode(toks)
    """,
    # a daemon thread loading a model (the load's progress callback must not park inside it: the
    # exit waited its full 10 s), and one freeing LoRA adapters while another decodes (it parked
    # holding the adapters' lock: the exit hung)
    "load": """
        def work():
            while True:
                lamina.Model(m.path, gpu=False).close()
    """,
    "lora": """
        import sys
        sys.path.insert(0, TESTS)
        from tiny_gguf import write_tiny_lora
        adapter = write_tiny_lora(__import__("pathlib").Path(DIR) / "a.gguf", m.path)
        ctx.set_lora(m.load_lora(adapter))
        def churn():
            while True:
                m.load_lora(adapter).close()
        threading.Thread(target=churn, daemon=True).start()
        def work():
            toks = m.tokenize("the cat sat on the mat " * 8)
            while True:
                ctx.kv_clear()
                ctx.decode(toks)
    """,
    # llama.cpp logging at DEBUG into a Python handler while daemon threads load and generate: the log
    # callback took the GIL from inside llama.cpp (and could park there holding the adapters' lock)
    "log": """
        import logging, os
        logging.basicConfig(level=logging.DEBUG, stream=open(os.devnull, "w"))
        lamina._core.sync_log_level()
        def churn():
            while True:
                lamina.Model(m.path, gpu=False).close()
        threading.Thread(target=churn, daemon=True).start()
        def work():
            while True:
                for _ in ctx.generate("the cat sat", max_tokens=50, ignore_eos=True):
                    pass
    """,
    "batcher": """
        b = lamina.Batcher(m, n_seq_max=2, n_ctx=1024)
        def work():  # the Batcher closes at exit: its requests end, a new one is refused
            try:
                while True:
                    for _ in b.submit("the cat sat", max_tokens=200, ignore_eos=True):
                        pass
            except lamina.ClosedError:
                pass
    """,
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", sorted(EXIT_CASES))
def test_exit_with_a_daemon_thread_in_lamina(case: str, tmp_path: Path) -> None:
    import subprocess
    import sys
    import textwrap

    model = write_tiny_llama(tmp_path / "m.gguf", n_layer=4, n_embd=256, n_head=4, n_head_kv=4, n_ff=1024)
    code = textwrap.dedent(f"""
        import threading, time, lamina
        TESTS, DIR = {str(Path(__file__).parent)!r}, {str(tmp_path)!r}
        m = lamina.Model({str(model)!r}, gpu=False)
        ctx = m.context(n_ctx=512)
    """) + textwrap.dedent(EXIT_CASES[case]) + textwrap.dedent("""
        threading.Thread(target=work, daemon=True).start()
        time.sleep(0.3)
        print("exiting")
    """)
    for _ in range(6):
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        bad = [ln for ln in r.stderr.splitlines() if "terminate" in ln or "ptrace" in ln or "Traceback" in ln]
        assert r.returncode == 0 and r.stdout.strip() == "exiting" and not bad, (r.returncode, r.stderr[-3000:])
        assert time.monotonic() - t0 < 8, "the exit waited for lamina's 10 s timeout"


@pytest.mark.timeout(120)
def test_a_forked_child_exits_at_once(tmp_path: Path) -> None:
    """The child inherits the parent's count of running llama.cpp calls: its exit waited 10 s."""
    import subprocess
    import sys
    import textwrap

    model = write_tiny_llama(tmp_path / "m.gguf")
    code = textwrap.dedent(f"""
        import os, sys, threading, time, lamina
        m = lamina.Model({str(model)!r}, gpu=False)
        ctx = m.context(n_ctx=512)
        toks = m.tokenize("the cat sat on the mat " * 20)
        def work():
            while True:
                ctx.kv_clear()
                ctx.decode(toks)
        threading.Thread(target=work, daemon=True).start()
        time.sleep(0.2)
        pid = os.fork()
        if pid == 0:
            t0 = time.monotonic()
            sys.exit(0)  # atexit runs in the child
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        """)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "child 0" in r.stdout, r.stderr[-2000:]
    assert time.monotonic() - t0 < 8
