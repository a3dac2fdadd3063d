"""lamina.Batcher: continuous batching. Requests join and leave while others run; one native loop
decodes one batch per step for all of them (cpp/batcher.cpp)."""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, AsyncIterator, Generator, Iterator, Sequence

import numpy as np
import numpy.typing as npt

from . import _core, _native
from .context import Completion, completion_from_row, stop_strings
from .logprobs import top_logprobs_arg
from .params import check_int
from .sampling import Sampler

if TYPE_CHECKING:
    from .context import Context
    from .model import Model

_log = logging.getLogger("lamina")
_live: "weakref.WeakSet[Batcher]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # the loop threads end before the interpreter does
    for b in list(_live):
        b.close()


def _serve(native: _native.Batcher) -> None:
    try:
        native.run(False)
    except Exception:  # every request already ended with this error
        _log.exception("lamina.Batcher: the batch loop stopped")


class Request:
    """One prompt submitted to a Batcher. Iterate it for text pieces as they come (blocking),
    ``await`` it (or call result()) for the Completion, ``async for`` its pieces, or cancel() it:
    its sequence is freed at the next step. finish_reason: "stop" (end of generation or a stop
    string), "length" (max_tokens or its share of the cache), "cancelled", "error" (result() raises)."""

    def __init__(self, native: _native.BatchRequest, batcher: "Batcher") -> None:
        self._native = native
        self._batcher = batcher

    @property
    def id(self) -> int:
        return int(self._native.id)

    def __iter__(self) -> Iterator[str]:
        while True:
            try:
                piece = self._native.next(-1.0)
            except StopIteration:
                return
            if isinstance(piece, str) and piece:
                yield piece

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the end (TimeoutError after ``timeout`` seconds) and return the whole text;
        raises the request's error if it failed."""
        if not self._native.wait(-1.0 if timeout is None else float(timeout)):
            raise TimeoutError(f"request {self.id} still runs after {timeout} s")
        self._native.raise_if_failed()
        return completion_from_row(self._native.result())

    def cancel(self) -> None:
        self._native.cancel()

    @property
    def done(self) -> bool:
        return self._native.finish_reason is not None  # no copy of the tokens or text: asyncio asks every step

    @property
    def finish_reason(self) -> str | None:
        return self._native.finish_reason

    @property
    def tokens(self) -> npt.NDArray[np.int32]:
        """Tokens generated so far (a copy)."""
        tokens: npt.NDArray[np.int32] = self._native.result()["tokens"]
        return tokens

    def __await__(self) -> Generator[Any, None, Completion]:
        return self._batcher._wait_async(self).__await__()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._batcher._pieces_async(self)

    def __repr__(self) -> str:
        return f"<lamina.Request {self.id} finish_reason={self.finish_reason}>"


class Batcher(_core.Closing):
    """Continuous batching over a context of its own with ``n_seq_max`` sequences.

    submit() queues a prompt and returns a Request at once; a background thread runs the native
    loop. Each step decodes one batch: one token of every generating sequence first, then prompt
    chunks of newly admitted requests in the room left (n_batch tokens; at most ``chunk`` per
    request and step, default n_batch), in order of arrival. At most n_seq_max requests run; the
    others wait in arrival order, and a finished request's sequence (its KV cells) goes to the
    next one. ``n_ctx`` is the whole cache, as in llama.cpp: each sequence holds
    n_ctx / n_seq_max tokens unless KV(unified=True) (then they share it, and when it is full
    the longest request ends with "length"). Thread-safe: submit, iterate and cancel from any
    thread; asyncio: ``await request``, ``async for piece in request``. Other keyword
    arguments go to Model.context (threads, kv, n_batch, flash_attn, ...).
    """

    def __init__(self, model: "Model", *, n_seq_max: int = 8, n_ctx: int | None = None, chunk: int | None = None,
                 **context_kwargs: Any) -> None:
        check_int("n_seq_max", n_seq_max, 1)
        if chunk is not None:
            check_int("chunk", chunk, 1)
        self._context: Context = model.context(n_ctx=n_ctx, n_seq_max=n_seq_max, **context_kwargs)
        try:
            # greedy tokens come from the graph when the logits live on a GPU (no row copied per request)
            self._native = _native.Batcher(self._context.native, chunk or 0, model.output_on_gpu)
        except BaseException:
            self._context.close()
            raise
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[asyncio.Event, asyncio.AbstractEventLoop] = {}  # each with its coroutine's loop
        # the thread holds the native loop, not this object: a Batcher nobody holds is collected
        self._thread = threading.Thread(target=_serve, args=(self._native,), name="lamina-batcher", daemon=True)
        self._thread.start()
        _live.add(self)

    def submit(self, prompt: Any, *, max_tokens: int = 256, sampler: Sampler | None = None,
               stop: str | Sequence[str] = (), ignore_eos: bool = False, logprobs: bool = False,
               top_logprobs: int = 0) -> Request:
        """Queue ``prompt`` (text or token ids); greedy when no sampler is given. logprobs and
        top_logprobs as Context.generate's (the result's Completion.logprobs)."""
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            raise TypeError(f"max_tokens must be an int, got {max_tokens!r}")
        check_int("max_tokens", max_tokens, 1)
        if sampler is not None and not isinstance(sampler, Sampler):
            raise TypeError(f"sampler must be a lamina.Sampler, got {type(sampler).__name__}")
        top = top_logprobs_arg(logprobs, top_logprobs)
        tokens = self._context._prompt_tokens(prompt)
        params = (sampler or Sampler()).params(self._context.n_ctx)
        return Request(self._native.submit(tokens, params, max_tokens, ignore_eos, stop_strings(stop), top), self)

    def generate(self, prompts: Sequence[Any], **kwargs: Any) -> list[Completion]:
        """Submit every prompt and wait for all of them (in order)."""
        return [r.result() for r in [self.submit(p, **kwargs) for p in prompts]]

    @property
    def stats(self) -> dict[str, Any]:
        """waiting, running, steps, finished, max_running, prompt and generation tokens and the
        time of the steps that decoded them (us; a step with any prompt token counts as prompt)."""
        return dict(self._native.stats())

    def close(self) -> None:
        """Cancel every request, stop the loop and free the context. Idempotent."""
        self._native.close()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self._unwatch()
        self._loop = None
        self._context.close()
        _live.discard(self)

    def __del__(self) -> None:
        native = getattr(self, "_native", None)
        if native is not None:
            native.close()  # requests end "cancelled"; the loop thread ends by itself

    # -- asyncio: the loop writes a byte to a pipe after each step with news; the event loop's
    # reader wakes the coroutines waiting on this Batcher, which then poll without blocking.
    def _unwatch(self) -> None:
        """Remove the reader from the event loop it was added to (a closed loop has none)."""
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError, ValueError):
                self._loop.remove_reader(self._fd)

    @contextlib.contextmanager
    def _waiting(self, req: Request) -> Iterator[asyncio.Event]:
        """An event set after each step with news, for a coroutine of the running event loop that
        waits on ``req``; cancelling that coroutine cancels the request."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._fd < 0:
                self._fd = self._native.wake_fd()
            self._unwatch()
            loop.add_reader(self._fd, self._wake)
            self._loop = loop
        ev = asyncio.Event()
        self._events[ev] = loop
        try:
            yield ev
        except asyncio.CancelledError:
            req.cancel()
            raise
        finally:
            self._events.pop(ev, None)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._fd, 4096)
        for ev, loop in list(self._events.items()):
            if loop.is_closed():  # closed while a coroutine waited on it: that wait never ends
                self._events.pop(ev, None)
                continue
            try:
                ev.set()
            except RuntimeError:  # closed between the check and set()
                self._events.pop(ev, None)

    async def _wait_async(self, req: Request) -> Completion:
        with self._waiting(req) as ev:
            while True:
                ev.clear()
                if req.done:
                    return req.result(0)
                await ev.wait()

    async def _pieces_async(self, req: Request) -> AsyncIterator[str]:
        with self._waiting(req) as ev:
            while True:
                ev.clear()
                text, ended = req._native.poll()
                if text:
                    yield text
                elif ended:
                    return
                else:
                    await ev.wait()

    def __repr__(self) -> str:
        s = self.stats
        return f"<lamina.Batcher running={s['running']} waiting={s['waiting']} n_seq_max={s['n_seq_max']}>"
