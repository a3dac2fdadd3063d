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
import os, signal, threading, time, lamina
m = lamina.Model({str(tiny_path)!r})
ctx = m.context(n_ctx=512)
threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
n = 0
try:
    while True:   # generate until interrupted
        for piece in ctx.generate("the sky is", max_tokens=400, ignore_eos=True):
            n += 1
except KeyboardInterrupt:
    print("interrupted", n > 0)
print("again", len(ctx.complete("the sky is", max_tokens=5, ignore_eos=True).tokens))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["interrupted", "True", "again", "5"]
