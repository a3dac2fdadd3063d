"""Ctrl-C (and any signal handler that raises) stops a running decode promptly; the context
stays usable afterwards."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import lamina


class Stop(Exception):
    pass


@pytest.mark.model
def test_signal_handler_exception_stops_a_long_prompt_decode(real_model: lamina.Model) -> None:
    ctx = real_model.context(n_ctx=4096, n_batch=4096)
    toks = np.random.default_rng(0).integers(10, 20000, 3000, dtype=np.int32)

    def raise_stop(signum: int, frame: object) -> None:
        raise Stop()

    old = signal.signal(signal.SIGUSR1, raise_stop)
    try:
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1))
        t0 = time.perf_counter()
        timer.start()
        with pytest.raises(Stop):
            ctx.decode(toks)  # one llama_decode of 3000 tokens: several seconds on 2 cores
        elapsed = time.perf_counter() - t0
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert elapsed < 2.0, f"decode kept running {elapsed:.2f}s after the signal"
    assert ctx.n_past < len(toks)  # the cache only holds what was fully processed
    # the context works afterwards and gives the same text as a fresh one
    text = ctx.complete("The three primary colors are", max_tokens=8).text
    with real_model.context(n_ctx=4096) as fresh:
        assert text == fresh.complete("The three primary colors are", max_tokens=8).text


def test_ctrl_c_during_generation_in_a_subprocess(tiny_path: Path) -> None:
    code = f"""
import faulthandler, os, signal, threading, time, lamina
faulthandler.dump_traceback_later(60, exit=True)  # a hang shows where every thread is, then ends
# Python leaves SIGINT ignored when it starts that way (a background job of a shell without job
# control: how CI scripts and nohup'd runs start): the program asks for KeyboardInterrupt itself
signal.signal(signal.SIGINT, signal.default_int_handler)
m = lamina.Model({str(tiny_path)!r})
ctx = m.context(n_ctx=512)
n = 0
def run():
    global n
    while True:   # generate until interrupted, 0.2 s after the first piece (not before it on a busy machine)
        for piece in ctx.generate("the sky is", max_tokens=400, ignore_eos=True):
            n += 1
            if n == 1:
                threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
# the loop runs in a function: Python 3.13 can skip a handler in the same frame for a
# KeyboardInterrupt raised at this loop's back edge (CPython gh-130279; itertools.count() does it too)
try:
    run()
except KeyboardInterrupt:
    print("interrupted", n > 0)
print("again", len(ctx.complete("the sky is", max_tokens=5, ignore_eos=True).tokens))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert out.stdout.split()[-4:] == ["interrupted", "True", "again", "5"], out.stdout


@pytest.mark.parametrize("stop", [(), ("\u00a7never\u00a7",)], ids=["plain", "stop-strings"])
def test_ctrl_c_is_raised_by_the_next_piece_and_loses_no_text(tiny_model: lamina.Model, sigint_raises: None,
                                                              stop: tuple[str, ...]) -> None:
    """A Ctrl-C that arrives while a token is decoded is raised by the iterator's __next__, and the
    piece waits for the next call (with stop strings too, whose held-back text stays). deque.extend
    iterates in C: no bytecode of this test runs between pieces, so only lamina can raise it there
    (and a for loop's except clause sees it on Python 3.13 too)."""
    import collections

    with tiny_model.context(n_ctx=4096) as ctx:
        want = ctx.complete("the sky is", max_tokens=4000, ignore_eos=True).text
    with tiny_model.context(n_ctx=4096) as ctx:
        g = ctx.generate("the sky is", max_tokens=4000, ignore_eos=True, stop=list(stop))
        pieces: collections.deque[str] = collections.deque([next(g)])
        timer = threading.Timer(0.02, signal.raise_signal, (signal.SIGINT,))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            pieces.extend(g)
        timer.join()
        assert len(g.tokens) < 4000 and g.finish_reason is None
        pieces.extend(g)  # the rest, from the piece decoded when the signal came
        assert "".join(pieces) == want and g.finish_reason == "length"


def _wide(tmp_path: Path) -> lamina.Model:
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_gguf import write_tiny_llama

    path = write_tiny_llama(tmp_path / "wide.gguf", n_layer=4, n_embd=256, n_head=4, n_head_kv=4, n_ff=1024)
    return lamina.Model(path, gpu=False)


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")
def test_signals_during_a_decode_reach_python_and_the_previous_wakeup_fd(tmp_path: Path) -> None:
    # lamina routes Python's signal wakeup fd to its own pipe during a decode; a handler that does
    # not raise runs and the decode goes on; the application's wakeup fd (asyncio's, say) is
    # restored afterwards and still receives the signal numbers
    import socket

    model = _wide(tmp_path)
    ran: list[int] = []
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    old_fd = signal.set_wakeup_fd(b.fileno())
    old = signal.signal(signal.SIGALRM, lambda signum, frame: ran.append(signum))
    try:
        with model, model.context(n_ctx=2048, n_batch=2048, threads=1) as ctx:
            signal.setitimer(signal.ITIMER_REAL, 0.03, 0.03)
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 0.5:
                ctx.kv_clear()
                ctx.decode([1 + i % 1000 for i in range(1500)])
            signal.setitimer(signal.ITIMER_REAL, 0)
            assert ctx.n_past == 1500
        assert signal.set_wakeup_fd(b.fileno()) == b.fileno()  # restored after every decode
        got = a.recv(4096)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        signal.set_wakeup_fd(old_fd)
        a.close()
        b.close()
    assert ran and set(ran) == {signal.SIGALRM}
    assert got and set(got) == {signal.SIGALRM}


def test_a_decode_takes_the_gil_only_when_a_signal_arrived(tmp_path: Path) -> None:
    """The abort callback takes the GIL only when a signal arrived (lamina's wakeup pipe says so), so
    a decode never waits inside graph compute for a GIL another thread holds. It used to ask every
    50 ms: next to a thread spinning in Python, about twice as slow. Counted, not timed: a timing
    of this on a shared 2-core machine failed 2 runs in 8 with nothing wrong."""
    model = _wide(tmp_path)
    toks = [1 + i % 1000 for i in range(1500)]
    with model, model.context(n_ctx=2048, n_batch=2048, threads=1) as ctx:
        stop = threading.Event()

        def spin() -> None:
            while not stop.is_set():
                pass

        spinner = threading.Thread(target=spin)
        spinner.start()
        try:
            before = lamina._native.abort_gil_takes()
            t0 = time.perf_counter()
            ctx.decode(toks)
            elapsed = time.perf_counter() - t0
            assert lamina._native.abort_gil_takes() == before, "graph compute asked for the GIL with no signal"
        finally:
            stop.set()
            spinner.join()
        assert elapsed > 0.1, f"the decode ({elapsed:.3f} s) is too short to show anything"
        # the counter counts: a signal during a decode makes the callback take the GIL (and run the handler)
        seen: list[int] = []
        old = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
        try:
            ctx.kv_clear()
            timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1))
            timer.start()
            ctx.decode(toks)
            timer.join()
        finally:
            signal.signal(signal.SIGUSR1, old)
        assert seen == [signal.SIGUSR1] and lamina._native.abort_gil_takes() > before
