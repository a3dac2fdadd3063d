"""lamina.Sampler: sampling settings, run by llama.cpp's sampler chain inside the native loop."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

from . import _native

if TYPE_CHECKING:
    from .model import Model


@dataclass(frozen=True)
class Sampler:
    """Sampling settings; the default (temperature 0) is greedy and deterministic.

    Chain order: grammar, logit_bias, penalties, DRY, top-n-sigma, top-k, typical, top-p,
    min-p, XTC, temperature (dynamic when dynatemp_range > 0), seeded draw. mirostat=1 or 2
    replaces everything after the logit bias with temperature + mirostat (v1/v2), as llama.cpp
    does. min_keep: the fewest candidates typical, top-p, min-p and XTC leave. A fresh
    llama.cpp chain is built for every generation, so a seeded sampler gives the same text for the same prompt and settings.
    Greedy without penalties, bias or grammar takes an exact argmax fast path instead of
    the chain's vocab-sized candidate array.
    """

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    top_n_sigma: float = -1.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: Sequence[str] = ("\n", ":", '"', "*")
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    min_keep: int = 0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    grammar: str | None = None
    grammar_root: str = "root"
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
        for name in ("top_k", "penalty_last_n", "dry_allowed_length", "dry_penalty_last_n", "mirostat", "min_keep"):
            if not isinstance(getattr(self, name), int):
                raise TypeError(f"{name} must be an int, got {getattr(self, name)!r}")
        if isinstance(self.dry_sequence_breakers, str):
            raise TypeError("dry_sequence_breakers must be a sequence of strings, not one string")

    def native(self, model: "Model", n_ctx: int = 0) -> _native.Sampler:
        """A fresh llama.cpp chain for ``model``; last_n = -1 covers ``n_ctx`` tokens
        (0: the model's training context). Raises ValueError/IndexError on bad settings."""
        return _native.Sampler(
            model.native, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
            typical_p=self.typical_p, top_n_sigma=self.top_n_sigma, repeat_penalty=self.repeat_penalty,
            frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
            penalty_last_n=self.penalty_last_n, dry_multiplier=self.dry_multiplier, dry_base=self.dry_base,
            dry_allowed_length=self.dry_allowed_length, dry_penalty_last_n=self.dry_penalty_last_n,
            dry_sequence_breakers=list(self.dry_sequence_breakers), xtc_probability=self.xtc_probability,
            xtc_threshold=self.xtc_threshold, logit_bias={int(k): float(v) for k, v in self.logit_bias.items()},
            grammar=self.grammar, grammar_root=self.grammar_root, seed=self.seed, n_ctx=n_ctx,
            dynatemp_range=self.dynatemp_range, dynatemp_exponent=self.dynatemp_exponent, mirostat=self.mirostat,
            mirostat_tau=self.mirostat_tau, mirostat_eta=self.mirostat_eta, min_keep=self.min_keep)
