"""lamina.Draft: speculative decoding settings (llama.cpp's common/speculative in the native loop)."""
from __future__ import annotations

import threading
from dataclasses import replace
from typing import TYPE_CHECKING

from . import _native
from .params import check_int

if TYPE_CHECKING:
    from .context import Context
    from .model import Model

_D = _native.DraftParams()  # the one home of the defaults: cpp/lamina.h


class Draft:
    """What proposes tokens for the target to check in one batch.

    Draft(model=small_model): a model with the target's vocabulary drafts up to ``n_max`` tokens,
    stopping at one it gives less than ``p_min`` probability (llama.cpp's draft-simple). Draft()
    with no model (or draft="ngram"): n-gram lookup: the tokens that followed the last
    ``ngram_n`` tokens where they occurred before (prompt or output) are proposed, up to n_max
    (llama.cpp's ngram-simple); it pays on repetitive text (code, lists, edits of the prompt).
    Drafts shorter than ``n_min`` are not used. The target's own sampler keeps each drafted token
    it picks itself, so greedy output is the plain greedy output, token for token, as far as the
    kernels round a batch as they round one token: exact with f32 weights; with quantized CPU
    weights a near-tie can go the other way and the text part from plain greedy (README).

    A Draft with a model holds one context of that model per target context size: use one Draft
    per thread (a second concurrent generation with it raises BusyError).
    """

    def __init__(self, model: "Model | None" = None, *, n_max: int = _D.n_max, n_min: int = _D.n_min,
                 p_min: float = float(f"{_D.p_min:.7g}"), ngram_n: int = _D.ngram_n) -> None:
        check_int("n_max", n_max, 1, 256)
        check_int("n_min", n_min, 0, n_max)
        check_int("ngram_n", ngram_n, 1, 1024)
        if isinstance(p_min, bool) or not isinstance(p_min, (int, float)) or not 0.0 <= p_min <= 1.0:
            raise ValueError(f"p_min must be a number in [0, 1], got {p_min!r}")
        self.model = model
        self.n_max, self.n_min, self.p_min, self.ngram_n = n_max, n_min, float(p_min), ngram_n
        self._lock = threading.Lock()
        self._contexts: dict[tuple[int, int], "Context"] = {}

    def params(self) -> _native.DraftParams:
        p = _native.DraftParams()
        p.n_max, p.n_min, p.p_min, p.ngram_n = self.n_max, self.n_min, self.p_min, self.ngram_n
        return p

    def context_for(self, target: "Context") -> "Context | None":
        """The draft model's context for a target context (made once per size), or None (n-gram)."""
        if self.model is None:
            return None
        n_batch = int(target.params["n_batch"])
        key = (target.n_ctx, n_batch)
        with self._lock:
            ctx = self._contexts.get(key)
            if ctx is None:
                # the target's threads, sleeping as soon as a decode ends (poll 0): the two pools take
                # turns, and a pool spinning while the other works would take its cores
                ctx = self.model.context(n_ctx=target.n_ctx, n_batch=n_batch, n_seq_max=1,
                                         threads=replace(target.threads_config, poll=0))
                self._contexts[key] = ctx
            return ctx

    def close(self) -> None:
        """Free the draft contexts (the model stays the caller's)."""
        with self._lock:
            for ctx in self._contexts.values():
                ctx.close()
            self._contexts.clear()

    def __repr__(self) -> str:
        what = "ngram" if self.model is None else repr(self.model)
        return f"<lamina.Draft {what} n_max={self.n_max} p_min={self.p_min}>"
