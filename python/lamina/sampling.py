"""lamina.Sampler: sampling settings, run by llama.cpp's sampler chain inside the native loop."""
from __future__ import annotations

from dataclasses import dataclass

from . import _native


@dataclass(frozen=True)
class Sampler:
    """Sampling settings. The default (temperature 0) is greedy and deterministic.

    A native llama.cpp chain is built per generation, so a seeded sampler gives the same
    text every time for the same prompt and context settings.
    """

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        self.native(1)  # validates every value with the messages of the native chain

    def native(self, n_vocab: int) -> _native.Sampler:
        """A fresh llama.cpp chain for a model with ``n_vocab`` tokens."""
        return _native.Sampler(
            n_vocab, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
            typical_p=self.typical_p, repeat_penalty=self.repeat_penalty,
            frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
            penalty_last_n=self.penalty_last_n, seed=self.seed)
