"""lamina.Sampler: sampling settings, run by llama.cpp's sampler chain inside the native loop."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Mapping, Sequence

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

    Chat templates (set by ctx.chat): grammar_lazy applies the grammar from the first match of
    a trigger (grammar_trigger_patterns: regexes over the text so far; grammar_trigger_tokens);
    generation_prompt, the reply's start the template wrote, is read first by the reasoning
    budget, and by the grammar with grammar_prefill (a template's own, non-lazy); preserved_tokens are special tokens whose text is shown (tool-call
    tags). reasoning_budget: tokens of thinking between reasoning_start and an end in
    reasoning_end before reasoning_message and the first end are forced (-1: no limit), as
    llama-server's reasoning budget.
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
    json_schema: Mapping[str, Any] | str | None = None
    seed: int = _D.seed
    # What a chat template asks of generation; ctx.chat sets these from the template (as
    # llama-server passes them to its sampler), and they are here for a Batcher request to do the same.
    grammar_lazy: bool = _D.grammar_lazy
    grammar_trigger_patterns: Sequence[str] = tuple(_D.grammar_trigger_patterns)
    grammar_trigger_tokens: Sequence[int] = tuple(_D.grammar_trigger_tokens)
    generation_prompt: str = _D.generation_prompt
    grammar_prefill: bool = _D.grammar_prefill
    preserved_tokens: Sequence[int] = tuple(_D.preserved_tokens)
    reasoning_budget: int = _D.reasoning_budget
    reasoning_start: str = _D.reasoning_start
    reasoning_end: Sequence[str] = tuple(_D.reasoning_end)
    reasoning_message: str = _D.reasoning_message

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
        for name in ("top_k", "penalty_last_n", "dry_allowed_length", "dry_penalty_last_n", "mirostat", "min_keep",
                     "reasoning_budget"):
            if not isinstance(getattr(self, name), int):
                raise TypeError(f"{name} must be an int, got {getattr(self, name)!r}")
        for name in ("dry_sequence_breakers", "grammar_trigger_patterns", "reasoning_end"):
            if isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a sequence of strings, not one string")
        if self.json_schema is not None:
            if self.grammar is not None:
                raise ValueError("give grammar or json_schema, not both")
            schema_grammar(self.json_schema)  # an invalid schema fails here, naming its part

    def native(self, model: "Model", n_ctx: int = 0) -> _native.Sampler:
        """A fresh llama.cpp chain for ``model``; last_n = -1 covers ``n_ctx`` tokens
        (0: the model's training context). Raises ValueError/IndexError on bad settings."""
        return _native.Sampler(model.native, self.params(n_ctx))

    def params(self, n_ctx: int = 0) -> _native.SamplerParams:
        """These settings as the native struct (a Batcher builds each request's chain from it)."""
        p = _native.SamplerParams()
        for f in fields(self):
            if f.name == "json_schema":
                continue
            value = getattr(self, f.name)
            if f.name in ("dry_sequence_breakers", "grammar_trigger_patterns", "grammar_trigger_tokens",
                          "preserved_tokens", "reasoning_end"):
                value = list(value)
            elif f.name == "logit_bias":
                value = {int(k): float(v) for k, v in value.items()}
            try:
                setattr(p, f.name, value)
            except TypeError:  # nanobind's message names no field: a value the C field cannot hold
                raise TypeError(f"Sampler.{f.name}={value!r}: not a value of this field's C type "
                                f"({type(getattr(p, f.name)).__name__}, in range)") from None
        p.n_ctx = n_ctx
        if self.json_schema is not None:
            p.grammar, p.grammar_root = schema_grammar(self.json_schema), "root"
        return p


def schema_grammar(schema: Mapping[str, Any] | str) -> str:
    """A JSON schema (a dict, or its JSON text) as a GBNF grammar, by llama.cpp's own converter
    (common/json-schema-to-grammar). ValueError names the part of the schema it cannot use."""
    if not isinstance(schema, (str, Mapping)):
        raise TypeError(f"json_schema must be a dict or JSON text, got {type(schema).__name__}")
    text = schema if isinstance(schema, str) else json.dumps(schema)
    return str(_native.json_schema_to_grammar(text))


def response_format_schema(response_format: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The schema behind an OpenAI-style response_format: {"type": "json_object"} (any JSON
    object; a "schema" key narrows it, as llama-server allows), {"type": "json_schema",
    "json_schema": {"schema": {...}}}, or {"type": "text"} (None: no constraint)."""
    if not isinstance(response_format, Mapping):
        raise TypeError(f"response_format must be a dict, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema", {"type": "object"})
    elif kind == "json_schema":
        inner = response_format.get("json_schema")
        schema = inner.get("schema") if isinstance(inner, Mapping) else None
        if schema is None:
            raise ValueError('response_format {"type": "json_schema"} needs {"json_schema": {"schema": {...}}}')
    else:
        raise ValueError(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    if not isinstance(schema, Mapping):
        raise TypeError("the response_format's schema must be a dict")
    return schema
