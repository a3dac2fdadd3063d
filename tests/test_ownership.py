"""A context's sequences have one owner at a time: a generation owns sequence 0 from its prompt
evaluation until it ends, a Batcher request owns its slot. Anything else that changes that
sequence ends the owner with StaleGenerationError naming what changed it: never silently wrong text.
An interrupted prompt evaluation resumes at the next next().
"""
from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import lamina
from lamina import _native
from tiny_gguf import write_tiny_llama

PROMPT_A = [1, 5, 6, 7, 8, 9, 10]
PROMPT_B = [1, 20, 21, 22, 23]


def fresh(model: lamina.Model, prompt: list[int], n: int) -> list[int]:
    with model.context(n_ctx=256) as ctx:
        return [int(t) for t in ctx.complete(prompt, max_tokens=n, ignore_eos=True).tokens]


def test_a_second_generation_ends_the_first_instead_of_feeding_it_the_wrong_cache(tiny_model: lamina.Model) -> None:
    # the table's second row: g1 continued from g2's cache and printed g2's continuation
    with tiny_model.context(n_ctx=256) as ctx:
        g1 = ctx.generate(PROMPT_A, max_tokens=12, ignore_eos=True)
        g2 = ctx.generate(PROMPT_B, max_tokens=12, ignore_eos=True)
        next(g1)
        next(g2)
        with pytest.raises(lamina.StaleGenerationError, match="another generation"):
            next(g1)
        assert g1.finish_reason == "error"
        with pytest.raises(StopIteration):
            next(g1)
        "".join(g2)  # the new owner goes on undisturbed
        assert [int(t) for t in g2.tokens] == fresh(tiny_model, PROMPT_B, 12)


def test_a_generation_not_started_yet_takes_the_sequence_when_it_starts(tiny_model: lamina.Model) -> None:
    with tiny_model.context(n_ctx=256) as ctx:
        g1 = ctx.generate(PROMPT_A, max_tokens=8, ignore_eos=True)
        g2 = ctx.generate(PROMPT_B, max_tokens=8, ignore_eos=True)
        "".join(g2)  # g2 ended: it owns nothing any more
        "".join(g1)
        assert [int(t) for t in g1.tokens] == fresh(tiny_model, PROMPT_A, 8)


@pytest.mark.parametrize("change", ["kv.clear", "kv.seq_rm", "kv.seq_add", "decode", "load_state", "seq_state"])
def test_a_change_of_sequence_0_under_a_live_generation_ends_it_naming_the_change(
        tiny_model: lamina.Model, change: str) -> None:
    with tiny_model.context(n_ctx=256) as ctx:
        state = ctx.save_state()
        seq_state = ctx.save_state(seq=0)
        g = ctx.generate(PROMPT_A, max_tokens=12, ignore_eos=True)
        next(g)
        if change == "kv.clear":
            ctx.kv.clear()
        elif change == "kv.seq_rm":
            ctx.kv.seq_rm(0, 3, -1)
        elif change == "kv.seq_add":
            ctx.kv.seq_add(0, 2, -1, 5)
        elif change == "decode":
            ctx.decode([30, 31])
        elif change == "load_state":
            ctx.load_state(state)
        else:
            ctx.load_state(seq_state, seq=0)
        name = {"seq_state": "load_state(seq=...)", "decode": "ctx.decode()"}.get(change, change + "()")
        with pytest.raises(lamina.StaleGenerationError) as e:
            next(g)
        assert name in str(e.value)


def test_reads_and_other_sequences_leave_a_live_generation_alone(tiny_model: lamina.Model) -> None:
    with tiny_model.context(n_ctx=256, n_seq_max=2) as ctx:
        g = ctx.generate(PROMPT_A, max_tokens=12, ignore_eos=True)
        next(g)
        ctx.decode([30, 31, 32], seq=1)  # another sequence: not this generation's
        ctx.kv.seq_rm(1, -1, -1)
        ctx.kv.pos_range(0)
        ctx.save_state()
        "".join(g)
        assert [int(t) for t in g.tokens] == fresh(tiny_model, PROMPT_A, 12)


def test_generate_batch_and_a_live_generation_share_the_engine(tiny_model: lamina.Model) -> None:
    # one engine per context: generate_batch's requests take the free sequences, the live generation
    # keeps sequence 0 (with one sequence they wait for it), and each text is what it is alone
    for n_seq_max in (1, 2):
        with tiny_model.context(n_ctx=512, n_seq_max=n_seq_max) as ctx:
            want_a = ctx.complete(PROMPT_A, max_tokens=12, ignore_eos=True).tokens
            want_b = ctx.complete(PROMPT_B, max_tokens=4, ignore_eos=True).tokens
            g = ctx.generate(PROMPT_A, max_tokens=12, ignore_eos=True)
            next(g)
            [b] = ctx.generate_batch([PROMPT_B], max_tokens=4, ignore_eos=True)
            "".join(g)
            assert list(b.tokens) == list(want_b) and list(g.tokens) == list(want_a)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Slow enough per token (about a millisecond) that a request is still running when the test acts."""
    path = write_tiny_llama(tmp_path_factory.mktemp("own") / "wide.gguf", n_layer=4, n_embd=256, n_head=4,
                            n_head_kv=4, n_ff=1024, n_ctx=4096)
    with lamina.Model(path, gpu=False) as m:
        yield m


def test_a_batcher_request_whose_sequence_is_changed_between_steps_ends_with_the_error(
        wide_model: lamina.Model) -> None:
    with wide_model.context(n_ctx=8192, n_seq_max=2) as ctx:
        eng = _native.Batcher(ctx.native, 0, False)
        loop = threading.Thread(target=eng.run, args=(False,), daemon=True)
        loop.start()
        try:
            req = eng.submit(np.array(PROMPT_A, dtype=np.int32), lamina.Sampler().params(8192), 4000, True, [])
            req.next(30.0)  # running: its sequence holds its prompt and first tokens
            deadline = time.monotonic() + 30
            while True:  # between two steps (a step holds the context: BusyError meanwhile)
                try:
                    ctx.kv.clear()
                    break
                except lamina.BusyError:
                    assert time.monotonic() < deadline
            assert req.wait(30.0)
            with pytest.raises(lamina.StaleGenerationError, match=r"kv\.clear\(\)"):
                req.raise_if_failed()
            r = req.result()
            assert r["finish_reason"] == "error" and len(r["tokens"]) < 4000
        finally:
            eng.close()
            loop.join(30)


RESUME = """
import os, signal, sys, threading, time
import numpy as np
import lamina
signal.signal(signal.SIGINT, signal.default_int_handler)
model = lamina.Model(sys.argv[1], gpu=False)
prompt = [int(t) for t in np.random.default_rng(0).integers(3, 200, size=3000)]
ctx = model.context(n_ctx=4096, n_batch=64, n_ubatch=64, threads=1)
# the interrupt lands at a third of this machine's evaluation time, inside the prompt
t0 = time.monotonic()
model.context(n_ctx=4096, n_batch=64, n_ubatch=64, threads=1).complete(prompt, max_tokens=1)
t_eval = time.monotonic() - t0
g = ctx.generate(prompt, max_tokens=6, ignore_eos=True)
threading.Timer(t_eval / 3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
try:
    first = next(g)
    print("not interrupted")
    sys.exit(3)
except KeyboardInterrupt:
    pass
held = len(ctx.tokens)
assert 0 < held < len(prompt), held  # a prefix of the prompt is in the cache
"".join(g)  # the notebook cell run again: the evaluation resumes from that prefix
got = [int(t) for t in g.tokens]
want = [int(t) for t in model.context(n_ctx=4096, threads=1).complete(prompt, max_tokens=6, ignore_eos=True).tokens]
assert got == want, (got, want)
s = g.stats
# one evaluation of the whole prompt, in two parts: nothing was reused or evaluated twice
assert s["n_reused"] == 0 and s["n_prompt_eval"] == len(prompt) and s["finish_reason"] == "length", s
print("resumed", held)
"""


@pytest.mark.timeout(180)
def test_a_prompt_evaluation_interrupted_by_ctrl_c_resumes_at_the_next_next(tmp_path: Path) -> None:
    # the table's first row: a segmentation fault (the generation sampled from logits it never had)
    path = write_tiny_llama(tmp_path / "wide.gguf", n_layer=4, n_embd=256, n_head=4, n_head_kv=4, n_ff=1024,
                            n_ctx=4096)
    r = subprocess.run([sys.executable, "-c", RESUME, str(path)], capture_output=True, text=True, timeout=150)
    assert r.returncode == 0 and "resumed" in r.stdout, (r.returncode, r.stdout, r.stderr[-2000:])


DEADLOCK = """
import logging, sys, threading
import numpy as np
import lamina
from lamina import _native
model = lamina.Model(sys.argv[1], gpu=False)
ctx = model.context(n_ctx=256, n_seq_max=2)
eng = _native.Batcher(ctx.native, 0, True)  # backend sampling: admission attaches a sampler, which logs
reqs = []
seen = []

class Reader(logging.Handler):
    def emit(self, record):
        # a reader in the loop's own thread, at a llama.cpp log line (the same as another thread
        # holding the GIL while the loop logs): before the fix, the loop held the engine's mutex here
        if "set_sampler" in record.getMessage() and reqs:
            seen.append((eng.stats()["running"], reqs[0].result()["finish_reason"], reqs[0].poll()))

log = logging.getLogger("lamina")
log.setLevel(logging.DEBUG)
log.addHandler(Reader())
lamina._core.sync_log_level()
reqs.append(eng.submit(np.array([1, 5, 6, 7], dtype=np.int32), lamina.Sampler().params(256), 4, True, []))
eng.run(True)
assert seen, "llama.cpp logged no set_sampler line: the test did not test"
print("ok", len(seen))
"""


@pytest.mark.timeout(120)
def test_a_reader_during_a_llama_log_line_never_deadlocks_the_batcher(tiny_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", DEADLOCK, str(tiny_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ok" in r.stdout, (r.returncode, r.stdout, r.stderr[-2000:])


CLOSE_DURING_TOKENIZE = """
import sys, threading, time
import lamina
path = sys.argv[1]
tok = lamina.Tokenizer(path)
ref = lamina.Tokenizer(path)
text = "the quick brown fox jumps over the lazy dog " * 400_000  # a few seconds of tokenizing
out = []
t = threading.Thread(target=lambda: out.append(tok.tokenize(text)))
t.start()
time.sleep(0.2)
if not t.is_alive():
    print("tokenizing ended before close(): the test did not test")
    sys.exit(3)
tok.close()  # another thread: the vocabulary must outlive the running call
t.join()
want = ref.tokenize(text)
assert len(out) == 1 and (out[0] == want).all(), "the tokens differ"
print("ok", len(want))
"""


@pytest.mark.timeout(180)
def test_closing_a_tokenizer_while_another_thread_tokenizes_keeps_the_vocabulary(tiny_path: Path) -> None:
    # tokenize held a reference to the model state across the GIL release; close() freed the vocabulary
    r = subprocess.run([sys.executable, "-c", CLOSE_DURING_TOKENIZE, str(tiny_path)], capture_output=True, text=True,
                       timeout=150)
    assert r.returncode == 0 and "ok" in r.stdout, (r.returncode, r.stdout, r.stderr[-2000:])


def test_a_finished_generation_reads_its_stats_while_another_thread_uses_the_context(
        wide_model: lamina.Model) -> None:
    # stats and tokens take the context's lease while the generation runs (next() appends with the GIL
    # released); once it ended they read without one, so another thread's work never makes them busy
    with wide_model.context(n_ctx=2048) as ctx:
        first = ctx.generate(PROMPT_A, max_tokens=5, ignore_eos=True)
        "".join(first)
        want = ([int(t) for t in first.tokens], first.stats["n_generated"], first.finish_reason)
        second = ctx.generate(PROMPT_B, max_tokens=1500, ignore_eos=True)
        t = threading.Thread(target=lambda: "".join(second))
        t.start()
        busy_seen, reads = 0, 0
        try:
            deadline = time.monotonic() + 20
            while t.is_alive() and time.monotonic() < deadline and (busy_seen < 5 or reads < 50):
                try:
                    ctx.n_past  # the other thread's generation holds the context
                except lamina.BusyError:
                    busy_seen += 1
                assert ([int(x) for x in first.tokens], first.stats["n_generated"], first.finish_reason) == want
                reads += 1
        finally:
            t.join(120)  # the other generation runs to its end (a few seconds)
        assert busy_seen > 0, "the other thread never held the context: the test did not test"


def test_a_closed_batcher_leaves_alone_the_sequence_a_generation_took_from_it(wide_model: lamina.Model) -> None:
    # closing frees the slots of the requests it ends, except one that another client has taken since
    with wide_model.context(n_ctx=4096, n_seq_max=2) as ctx:
        eng = _native.Batcher(ctx.native, 0, False)
        loop = threading.Thread(target=eng.run, args=(False,), daemon=True)
        loop.start()
        req = eng.submit(np.array(PROMPT_A, dtype=np.int32), lamina.Sampler().params(4096), 1800, True, [])
        req.next(30.0)
        deadline = time.monotonic() + 30
        g = None
        while True:  # between two steps: the generation takes sequence 0 from the request
            try:
                g = g or ctx.generate(PROMPT_B, max_tokens=12, ignore_eos=True)
                first = next(g)
                break
            except lamina.BusyError:
                assert time.monotonic() < deadline
        eng.close()
        loop.join(30)
        rest = "".join(g)
        assert (first + rest) and [int(t) for t in g.tokens] == fresh(wide_model, PROMPT_B, 12)


DETACH_BUSY = """
import sys, threading, time
import numpy as np
import lamina
from lamina import _native
model = lamina.Model(sys.argv[1], gpu=False)
ctx = model.context(n_ctx=512, n_seq_max=2)
stop = threading.Event()
def hammer():  # keeps the context busy at random moments, the Batcher's own last lease among them
    while not stop.is_set():
        try:
            ctx.native.decode(np.array([1, 5, 6], dtype=np.int32), 1)
            ctx.kv_clear()
        except (lamina.BusyError, lamina.StaleGenerationError):
            pass
        time.sleep(0.0002)  # the others get the GIL while the context is free too
h = threading.Thread(target=hammer, daemon=True)
for i in range(15):
    while True:
        try:
            eng = _native.Batcher(ctx.native, 0, True)  # backend sampling: greedy chains on its sequences
            break
        except lamina.BusyError:
            pass
    loop = threading.Thread(target=eng.run, args=(False,), daemon=True)
    loop.start()
    if i == 0:
        h.start()
    reqs = [eng.submit(np.array([1, 5 + k, 6, 7], dtype=np.int32), lamina.Sampler().params(512), 6, True, [])
            for k in range(3)]
    for r in reqs:
        r.wait(30)
    eng.close()
    loop.join(30)
    del eng, reqs  # the Batcher goes; the context keeps the chains llama.cpp points to until detached
stop.set()
h.join(30)
ctx.native.decode(np.array([1, 5, 6], dtype=np.int32), 1)
assert np.isfinite(np.asarray(ctx.logits)).all()
print("ok", len(ctx.complete([1, 5, 6], max_tokens=4, ignore_eos=True).tokens))
"""


@pytest.mark.timeout(180)
def test_backend_samplers_outlive_a_batcher_that_could_not_detach_them(tiny_path: Path) -> None:
    # review item: the Batcher's loop swallowed a BusyError when detaching its samplers at the end,
    # then freed the chains llama.cpp still pointed to. The context owns them now (detached by the
    # next lease of another client): nothing dangles whatever thread holds the context then.
    r = subprocess.run([sys.executable, "-c", DETACH_BUSY, str(tiny_path)], capture_output=True, text=True,
                       timeout=150)
    assert r.returncode == 0 and "ok 4" in r.stdout, (r.returncode, r.stdout, r.stderr[-2000:])


def test_a_refused_generate_batch_leaves_nothing_in_the_engine(tiny_model: lamina.Model) -> None:
    # review: prompt 0's request stayed queued after prompt 1 was refused, and the next generation
    # ran it, then reused a prefix its admission had wiped (silently wrong text)
    want = fresh(tiny_model, PROMPT_A + [11, 12, 13], 6)
    with tiny_model.context(n_ctx=512, n_seq_max=2) as ctx:
        ctx.complete(PROMPT_A, max_tokens=0)  # the cache holds PROMPT_A
        with pytest.raises(ValueError, match="prompt 1"):
            ctx.generate_batch([PROMPT_B, list(range(1, 400))], max_tokens=3)
        got = ctx.complete(PROMPT_A + [11, 12, 13], max_tokens=6, ignore_eos=True)
        assert [int(t) for t in got.tokens] == want and got.n_prompt_eval == 3


def test_a_speculative_generation_leaves_room_in_the_batch_for_the_others(tiny_model: lamina.Model) -> None:
    # review: a draft filled the batch and the next sequence's token was written past its end (a crash)
    with tiny_model.context(n_ctx=1024, n_seq_max=2, n_batch=16) as ctx:
        g = ctx.generate(PROMPT_A, max_tokens=200, ignore_eos=True, draft=lamina.Draft(n_max=16, ngram_n=1))
        next(g)
        [b] = ctx.generate_batch([PROMPT_B], max_tokens=100, ignore_eos=True)
        "".join(g)
    assert [int(t) for t in b.tokens] == fresh(tiny_model, PROMPT_B, 100)
    with tiny_model.context(n_ctx=1024) as ctx:
        assert list(g.tokens) == list(ctx.complete(PROMPT_A, max_tokens=200, ignore_eos=True).tokens)


def test_a_stop_string_after_a_context_shift_cuts_the_cache_there(tiny_model: lamina.Model) -> None:
    with tiny_model.context(n_ctx=256) as ctx:
        kw = dict(max_tokens=600, ignore_eos=True, context_full="shift", n_keep=4)
        text = ctx.complete(PROMPT_A, **kw).text  # type: ignore[arg-type]
        # a stop string whose first occurrence is late in the text (after the first shift)
        at = next(i for i in range(len(text) - 10, 0, -1) if text.find(text[i:i + 6]) == i and i > len(text) * 0.7)
        stop = text[at:at + 6]
        g = ctx.generate(PROMPT_A, stop=stop, **kw)  # type: ignore[arg-type]
        out = "".join(g)
        assert g.stats["n_shifts"] > 0 and g.finish_reason == "stop" and stop not in out
        held, gen = [int(t) for t in ctx.tokens], [int(t) for t in g.tokens]
        # the cache ends with the text before the stop (its last token may be sampled, not decoded)
        assert held[-50:] == gen[-50:] or held[-50:] == gen[-51:-1]
