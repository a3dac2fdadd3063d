"""lamina.Sampler: sampling settings, run by llama.cpp's sampler chain inside the native loop."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Mapping, Sequence

from . import _native

if TYPE_CHECKING:
    from .model import Model

_D = _native.SamplerParams()  # the one home of the defaults: cpp/sampler.h


def _f(x: float) -> float:
    """A C float default as the decimal it was written as (0.95f reads back as 0.949999988)."""
    return float(f"{x:.7g}")


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

    temperature: float = _f(_D.temperature)
    top_k: int = _D.top_k
    top_p: float = _f(_D.top_p)
    min_p: float = _f(_D.min_p)
    typical_p: float = _f(_D.typical_p)
    top_n_sigma: float = _f(_D.top_n_sigma)
    repeat_penalty: float = _f(_D.repeat_penalty)
    frequency_penalty: float = _f(_D.frequency_penalty)
    presence_penalty: float = _f(_D.presence_penalty)
    penalty_last_n: int = _D.penalty_last_n
    dry_multiplier: float = _f(_D.dry_multiplier)
    dry_base: float = _f(_D.dry_base)
    dry_allowed_length: int = _D.dry_allowed_length
    dry_penalty_last_n: int = _D.dry_penalty_last_n
    dry_sequence_breakers: Sequence[str] = tuple(_D.dry_sequence_breakers)
    xtc_probability: float = _f(_D.xtc_probability)
    xtc_threshold: float = _f(_D.xtc_threshold)
    dynatemp_range: float = _f(_D.dynatemp_range)
    dynatemp_exponent: float = _f(_D.dynatemp_exponent)
    mirostat: int = _D.mirostat
    mirostat_tau: float = _f(_D.mirostat_tau)
    mirostat_eta: float = _f(_D.mirostat_eta)
    min_keep: int = _D.min_keep
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    grammar: str | None = None
    grammar_root: str = _D.grammar_root
    seed: int = _D.seed

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
        return _native.Sampler(model.native, self.params(n_ctx))

    def params(self, n_ctx: int = 0) -> _native.SamplerParams:
        """These settings as the native struct (a Batcher builds each request's chain from it)."""
        p = _native.SamplerParams()
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "dry_sequence_breakers":
                value = list(value)
            elif f.name == "logit_bias":
                value = {int(k): float(v) for k, v in value.items()}
            try:
                setattr(p, f.name, value)
            except TypeError:  # nanobind's message names no field: a value the C field cannot hold
                raise TypeError(f"Sampler.{f.name}={value!r}: not a value of this field's C type "
                                f"({type(getattr(p, f.name)).__name__}, in range)") from None
        p.n_ctx = n_ctx
        return p
