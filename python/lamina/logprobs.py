"""lamina.Logprobs: the log-probabilities of generated tokens, computed natively per step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import numpy as np
import numpy.typing as npt


class _Pieces(Protocol):
    def token_to_piece(self, token: int, *, special: bool = False) -> bytes: ...


@dataclass(frozen=True)
class Logprobs:
    """Per generated token: its log-probability and the ``top_logprobs`` most likely tokens with
    theirs, most likely first (ties: the lower id first). They are the log-softmax of the token's
    logits row as the model gave it, before the sampler chain: no temperature, penalties, logit
    bias or grammar (what llama-server reports by default, and OpenAI's logprobs). Computed in the
    decode loop, no copy of the vocabulary per token."""

    tokens: npt.NDArray[np.int32]        # (n,) the generated tokens
    logprob: npt.NDArray[np.float32]     # (n,) each one's log-probability
    top_ids: npt.NDArray[np.int32]       # (n, top_logprobs) the most likely tokens at each step
    top_logprob: npt.NDArray[np.float32]  # (n, top_logprobs) theirs

    def openai(self, model: _Pieces) -> list[dict[str, Any]]:
        """OpenAI's ``choices[i].logprobs.content``: token text, logprob, UTF-8 bytes, top_logprobs."""
        def entry(t: int, lp: float) -> dict[str, Any]:
            b = model.token_to_piece(t, special=True)
            return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}
        return [{**entry(int(t), float(lp)), "top_logprobs": [entry(int(i), float(v)) for i, v in zip(ids, vals)]}
                for t, lp, ids, vals in zip(self.tokens, self.logprob, self.top_ids, self.top_logprob)]


def top_logprobs_arg(logprobs: bool, top_logprobs: int) -> int:
    """The native engine's top_logprobs: -1 (off) or 0..20, as OpenAI's API takes them."""
    if not isinstance(logprobs, bool):
        raise TypeError(f"logprobs must be True or False, got {logprobs!r}")
    if not isinstance(top_logprobs, int) or isinstance(top_logprobs, bool) or not 0 <= top_logprobs <= 20:
        raise ValueError(f"top_logprobs must be an int 0..20, got {top_logprobs!r}")
    if top_logprobs and not logprobs:
        raise ValueError("top_logprobs needs logprobs=True")
    return top_logprobs if logprobs else -1


def logprobs_of(tokens: npt.NDArray[np.int32], native: Mapping[str, Any] | None) -> Logprobs | None:
    """A Logprobs from the engine's arrays (None when not asked for)."""
    return None if native is None else Logprobs(tokens, native["logprob"], native["top_ids"], native["top_logprob"])
