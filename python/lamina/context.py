"""lamina.Context: decode, logits, and text generation over a native decode loop."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Mapping, Sequence, Union, overload

import numpy as np
import numpy.typing as npt

from . import _core, _native
from .chat import ChatMessage, ChatResult, ChatStream, reply_parser
from .errors import BusyError, OutOfMemoryError
from .logprobs import Logprobs, logprobs_of, top_logprobs_arg
from .lora import Lora, LoraSpec, lora_items
from .params import (KV, LOGITS, POOLING, as_tokens, check_count, check_int, check_pos, check_seq, context_settings,
                     out_of_memory)
from .system import host_memory
from .sampling import Sampler, response_format_schema, schema_grammar
from .speculative import Draft
from .threads import Threads

if TYPE_CHECKING:
    from .model import Model

Prompt = Union[str, bytes, Sequence[int], npt.NDArray[np.integer[Any]]]  # text, or token ids

@dataclass(frozen=True)
class Completion:
    """Result of Context.complete()."""

    text: str
    tokens: npt.NDArray[np.int32]
    finish_reason: str
    n_prompt: int
    n_prompt_eval: int
    prompt_tokens_per_s: float
    tokens_per_s: float
    logprobs: Logprobs | None = None  # with logprobs=True


def stop_strings(stop: str | Sequence[str]) -> list[str]:
    """``stop`` as a list of strings (one string is one stop)."""
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) for s in stops):
        raise TypeError("stop must be a string or a sequence of strings")
    return stops


def completion_from_row(r: Mapping[str, Any]) -> Completion:
    """A Completion from a native batch request's result(): speeds of this request alone."""
    t_prompt = (r["t_first_us"] - r["t_admit_us"]) / 1e6
    t_gen = (r["t_end_us"] - r["t_first_us"]) / 1e6
    return Completion(text=r["text"], tokens=r["tokens"], finish_reason=r["finish_reason"],
                      n_prompt=int(r["n_prompt"]), n_prompt_eval=int(r["n_prompt"]),
                      prompt_tokens_per_s=r["n_prompt"] / t_prompt if t_prompt > 0 else 0.0,
                      tokens_per_s=r["n_generated"] / t_gen if t_gen > 0 else 0.0,
                      logprobs=logprobs_of(r["tokens"], r["logprobs"]))


class Generation(_core.Closing):
    """Iterator of text pieces from Context.generate(); stats are filled in as it runs. A
    context manager: leaving the block closes it (close() is final: no piece after it)."""

    def __init__(self, native: _native.Generator) -> None:
        self._native = native
        self._pieces: Iterator[str] = native

    def __iter__(self) -> Iterator[str]:
        # The native generator itself (stop strings included): no Python frame per token.
        return self._pieces

    def __next__(self) -> str:
        return next(self._pieces)

    def rest(self) -> str:
        """All the text still to come, in one native call: the GIL is taken back once, not per
        token (beside a Python thread that keeps the GIL, each taking waits up to its switch
        interval). What complete() uses."""
        if self._pieces is not self._native:  # closed
            return ""
        try:
            return str(self._native.rest())
        except StopIteration:
            return ""

    def close(self) -> None:
        """Stop early and hand the context back (with backend sampling, its logits again).
        Final: iterating afterwards yields nothing, not even text held back for a stop string."""
        self._native.close()
        self._pieces = iter(())

    @property
    def finish_reason(self) -> str | None:
        """'stop' (end-of-generation token or stop string), 'length' (max_tokens or context full), 'error'
        (its sequence was taken: StaleGenerationError), or None while running."""
        reason: str | None = self._native.stats()["finish_reason"]
        return reason

    @property
    def tokens(self) -> npt.NDArray[np.int32]:
        tokens: npt.NDArray[np.int32] = self._native.output[0]
        return tokens

    @property
    def logprobs(self) -> Logprobs | None:
        """The generated tokens' log-probabilities so far (generate(logprobs=True)), else None."""
        tokens, lp = self._native.output
        return logprobs_of(tokens, lp)

    @property
    def stats(self) -> dict[str, Any]:
        s: dict[str, Any] = self._native.stats()
        s["prompt_tokens_per_s"] = s["n_prompt_eval"] / (s["t_prompt_us"] / 1e6) if s["t_prompt_us"] else 0.0
        s["tokens_per_s"] = s["n_generated"] / (s["t_gen_us"] / 1e6) if s["t_gen_us"] else 0.0
        return s


class KVCache:
    """ctx.kv: sequence operations on the KV cache (positions p0..p1, -1 for an open end)."""

    def __init__(self, ctx: "Context") -> None:
        self._ctx = ctx

    def clear(self) -> None:
        self._ctx.native.kv_clear()

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove [p0, p1) of sequence ``seq`` (-1: every sequence); False if the cache can't."""
        return bool(_native.kv_seq_rm(self._ctx.native, check_seq("seq", seq, True), check_pos("p0", p0),
                                      check_pos("p1", p1)))

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Make ``dst`` share ``src``'s cells in [p0, p1). Without a unified cache (each sequence its
        own stream) only whole sequences can be copied: a part raises ValueError."""
        _native.kv_seq_cp(self._ctx.native, check_seq("src", src), check_seq("dst", dst), check_pos("p0", p0),
                          check_pos("p1", p1))

    def seq_keep(self, seq: int) -> None:
        _native.kv_seq_keep(self._ctx.native, check_seq("seq", seq))

    def seq_add(self, seq: int, p0: int, p1: int, delta: int) -> None:
        """Shift positions [p0, p1) by delta (context shifting)."""
        _native.kv_seq_add(self._ctx.native, check_seq("seq", seq), check_pos("p0", p0), check_pos("p1", p1),
                           check_int("delta", delta, -2**31))

    def seq_div(self, seq: int, p0: int, p1: int, d: int) -> None:
        _native.kv_seq_div(self._ctx.native, check_seq("seq", seq), check_pos("p0", p0), check_pos("p1", p1),
                           check_int("d", d, 1))

    def pos_range(self, seq: int = 0) -> tuple[int, int]:
        """(pos_min, pos_max) of a sequence; (-1, -1) when it holds nothing."""
        lo, hi = _native.kv_pos_range(self._ctx.native, check_seq("seq", seq))
        return int(lo), int(hi)

    def used(self, seq: int = 0) -> int:
        """Positions a sequence holds in the cache (0 when empty)."""
        lo, hi = self.pos_range(seq)
        return 0 if hi < 0 else hi - lo + 1

    @property
    def capacity(self) -> int:
        """Positions one sequence can hold: n_ctx, or n_ctx / n_seq_max unless the cache is unified."""
        return int(self._ctx.params["n_ctx_seq"])

    @property
    def can_shift(self) -> bool:
        return bool(_native.kv_can_shift(self._ctx.native))

    def memory(self) -> list[dict[str, Any]]:
        """llama.cpp's memory breakdown per buffer type (device or host): bytes of model weights,
        of this context (KV cache and outputs) and of compute buffers."""
        return list(_native.memory_breakdown(self._ctx.native))

    @property
    def bytes(self) -> int:
        """Bytes this context holds (KV cache and outputs), on every device."""
        return sum(int(m["context"]) for m in self.memory())


def _as_threads(threads: int | Threads | None) -> Threads:
    if threads is None:
        return Threads()
    if isinstance(threads, Threads):
        return threads
    if isinstance(threads, int) and not isinstance(threads, bool):
        return Threads(n=threads)
    raise TypeError(f"threads must be an int or lamina.Threads, got {threads!r}")


def _check_memory(model: "Model", kv: KV, n_batch: int, n_ubatch: int, n_seq_max: int,
                  flash_attn: bool | Literal["auto"]) -> None:
    """n_ctx=0 asks for the training context, which can be far larger than this machine: refuse
    it up front, naming the device and the bytes, instead of letting the allocation fail or swap."""
    try:
        est = model.estimate_memory(0, kv=kv, n_seq_max=n_seq_max, n_batch=n_batch, n_ubatch=n_ubatch,
                                    flash_attn=flash_attn)
    except OutOfMemoryError as exc:
        raise out_of_memory(f"n_ctx=0 means the model's training context, {model.info.n_ctx_train} tokens: "
                            f"even sizing it ran out of memory ({exc}); give a smaller n_ctx", exc.device,
                            exc.bytes) from None
    host_available = host_memory()[1]  # system_info() would open every device
    for d in est.devices:  # the weights are loaded already: the context adds its KV cache and buffers
        need = d.context + d.compute
        available = host_available if d.device == "host" else d.free
        if available and need > available:
            where = "host memory" if d.device == "host" else f"{d.device} memory"
            raise out_of_memory(
                f"n_ctx=0 means the model's training context, {est.n_ctx} tokens: its KV cache and buffers need "
                f"{need / 2**20:,.0f} MiB of {where}, {available / 2**20:,.0f} MiB are available; "
                f"give a smaller n_ctx (see Model.estimate_memory)", "CPU" if d.device == "host" else d.device, need)


_NATIVE = _native.ContextParams()  # the one home of the defaults: cpp/lamina.h, context_params


class Context(_core.NativeOwner[_native.Context]):
    """A llama.cpp context: KV cache, batch decoding and generation.

    ``Context(model, ...)`` and ``model.context(...)`` are the same call. An argument given wins
    (even one equal to the default); then, for a model loaded from a config, the config's value;
    then the defaults: n_ctx the model's planned n_ctx (Model(n_ctx=...), 4096), kv the model's
    KV, n_batch 2048, n_ubatch 512, n_seq_max 1, threads lamina.Threads() (physical cores),
    flash_attn "auto", rope from the model's metadata (rope_scaling None, frequencies 0), and the
    config's LoRA adapters (else none; see set_lora).
    """

    _what = "context"
    DEFAULTS: dict[str, Any] = {"n_batch": _NATIVE.n_batch, "n_ubatch": _NATIVE.n_ubatch,
                                "n_seq_max": _NATIVE.n_seq_max, "threads": None, "flash_attn": "auto",
                                "rope_scaling": None, "rope_freq_base": float(_NATIVE.rope_freq_base),
                                "rope_freq_scale": float(_NATIVE.rope_freq_scale)}

    def __init__(self, model: "Model", *, n_ctx: int | None = None, n_batch: int | None = None,
                 n_ubatch: int | None = None, n_seq_max: int | None = None, threads: int | Threads | None = None,
                 kv: KV | None = None, flash_attn: bool | Literal["auto"] | None = None, embeddings: bool = False,
                 pooling: Literal["none", "mean", "cls", "last", "rank"] | None = None,
                 rope_scaling: Literal["none", "linear", "yarn", "longrope"] | None = None,
                 rope_freq_base: float | None = None, rope_freq_scale: float | None = None,
                 lora: LoraSpec = None) -> None:
        self._native: _native.Context | None = None
        self._lora: dict[Lora, float] = {}
        if pooling not in POOLING:
            raise ValueError(f"pooling must be None (the model's), 'none', 'mean', 'cls', 'last' or 'rank', got {pooling!r}")
        given: dict[str, Any] = {"n_batch": n_batch, "n_ubatch": n_ubatch, "n_seq_max": n_seq_max, "threads": threads,
                 "flash_attn": flash_attn, "rope_scaling": rope_scaling, "rope_freq_base": rope_freq_base,
                 "rope_freq_scale": rope_freq_scale}
        cfg: dict[str, Any] = model.config.context_kwargs() if model.config is not None else {}
        o: dict[str, Any] = {k: v if v is not None else cfg.get(k, self.DEFAULTS[k]) for k, v in given.items()}
        n_ctx = model.n_ctx if n_ctx is None else n_ctx
        kv = kv or model.kv
        self.threads_config = _as_threads(o["threads"])
        self._threads = self.threads_config.resolve()
        self.model = model
        settings = context_settings(n_ctx, o["n_batch"], o["n_ubatch"], o["n_seq_max"], kv, o["flash_attn"],
                                    model.on_gpu, embeddings=embeddings, pooling=pooling,
                                    rope_scaling=o["rope_scaling"], rope_freq_base=o["rope_freq_base"],
                                    rope_freq_scale=o["rope_freq_scale"])
        model.check_kv_tensors(n_ctx, kv)  # returns at once without a GPU or KV offload
        if n_ctx == 0:
            _check_memory(model, kv, o["n_batch"], o["n_ubatch"], o["n_seq_max"], o["flash_attn"])
        _core.sync_log_level()
        self._native = _native.Context(model.native, settings, *self.threads_config.pools())
        self.params = self._native.params()
        self.n_ctx = int(self.params["n_ctx"])
        if model.config is not None:
            model.config.check_context(self)
        adapters = lora if lora is not None else model.config_lora
        if adapters:
            self.set_lora(adapters)

    # -- low level -----------------------------------------------------------------------
    def decode(self, tokens: Any, *, logits: Literal["last", "all", "none"] = "last", seq: int = 0) -> None:
        """Append tokens to a sequence in the KV cache and evaluate them (GIL released); returns
        when the evaluation is done, on a GPU too."""
        if logits not in LOGITS:
            raise ValueError(f"logits must be 'last', 'all' or 'none', got {logits!r}")
        self.native.decode(as_tokens(tokens, self.model.info.n_vocab), LOGITS[logits], check_seq("seq", seq))

    @property
    def logits(self) -> npt.NDArray[np.float32]:
        """Read-only view (outputs, n_vocab) of the latest decode's logits: no copy; its values
        change with the next decode (np.array(ctx.logits) to keep them)."""
        return self.native.logits

    @property
    def n_past(self) -> int:
        """Tokens held in the KV cache."""
        return int(self.native.n_past)

    @property
    def tokens(self) -> npt.NDArray[np.int32]:
        return self.native.tokens

    def kv_clear(self) -> None:
        self.native.kv_clear()

    def abort(self) -> None:
        """Stop the decode running on this context in another thread (it raises DecodeError), or
        the generation (its next token). Safe from any thread; the context stays usable. Called
        when nothing runs, it does nothing: it never stops a later call."""
        self.native.abort()

    @property
    def kv(self) -> "KVCache":
        """Sequence operations on this context's KV cache."""
        return KVCache(self)

    def save_state(self, path: str | os.PathLike[str] | None = None, *, seq: int | None = None) -> bytes | None:
        """The whole context (KV cache, logits, token list), or with ``seq`` one sequence's KV
        cache, as bytes, or written to ``path``."""
        data: bytes = _native.state_get(self.native) if seq is None else \
            _native.seq_state_get(self.native, check_seq("seq", seq))
        if path is None:
            return data
        tmp = Path(f"{os.fspath(path)}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return None

    def load_state(self, state: bytes | str | os.PathLike[str], *, seq: int | None = None) -> None:
        """Restore save_state() output (bytes or a path). A whole-context state needs the same
        settings (ValueError names the one that differs); a sequence state (``seq``: the
        sequence to replace, any of this context's) needs the same model and K/V types."""
        data = state if isinstance(state, bytes) else Path(state).read_bytes()
        if seq is None:
            _native.state_set(self.native, data)
        else:
            _native.seq_state_set(self.native, data, check_seq("seq", seq))

    # -- LoRA adapters -------------------------------------------------------------------
    def set_lora(self, lora: LoraSpec) -> None:
        """Apply LoRA adapters of this context's model (model.load_lora) with scales: a Lora
        (scale 1), {lora: scale, ...} or [(lora, scale), ...]; None or {} removes them. Only the
        adapters change, not the model. A change clears the KV cache (every sequence: it was
        computed with the old weights); the set applied now again keeps it. A scale of 0 is the
        same as leaving the adapter out. A generation still open on this context raises LaminaError
        at its next piece after a change (its cache is gone): finish or close it first."""
        items = lora_items(lora)
        _native.set_lora(self.native, [(a.native, s) for a, s in items])
        self._lora = {a: s for a, s in items if s != 0.0}

    @property
    def lora(self) -> dict[Lora, float]:
        """The adapters this context applies, with their scales."""
        return dict(self._lora)

    def set_threads(self, threads: int | Threads, batch: int | None = None) -> None:
        """Change thread counts, pinning or priority on the live context (new threadpools, no reload)."""
        if batch is not None and not (isinstance(threads, int) and not isinstance(threads, bool)):
            raise TypeError("batch goes with an int thread count; put it inside the Threads object otherwise")
        cfg = Threads(n=threads, batch=batch) if isinstance(threads, int) and batch is not None else _as_threads(threads)
        self.native.set_threads(*cfg.pools())
        self.threads_config, self._threads = cfg, cfg.resolve()
        self.params = self.native.params()

    @property
    def threads(self) -> tuple[int, int]:
        """(generation, batch) thread counts now. lamina's default generation count adapts: when
        a CPU is busy with other work its threads stall at ggml's barriers, fewer can be faster,
        and the context moves there (threads_why says why; README "Running beside other work");
        a default batch count leaves out as many.
        An explicit count is obeyed as given. The count does not change the output: the CPU's ops
        give the same bits with any number of threads."""
        n, batch, _ = self._threads_now()
        return n, batch

    @property
    def threads_why(self) -> str:
        """Why the generation thread count is what it is."""
        if self.threads_config.n is not None:
            return f"given: {self._threads[0]} threads"
        return self._threads_now()[2]

    def _threads_now(self) -> tuple[int, int, str]:
        try:
            n, batch, why = self.native.threads_now()
            return int(n), int(batch), str(why)
        except BusyError:  # a decode runs in another thread: the counts it was made with
            return *self._threads, "a decode is running: the count chosen when the context was made"

    # -- generation ----------------------------------------------------------------------
    def _prompt_tokens(self, prompt: Prompt) -> npt.NDArray[np.int32]:
        if isinstance(prompt, (str, bytes)):
            return self.model.tokenize(prompt, add_special=True, special=True)
        return as_tokens(prompt, self.model.info.n_vocab)

    def generate(self, prompt: Prompt, *, max_tokens: int = 256, sampler: Sampler | None = None,
                 stop: str | Sequence[str] = (), ignore_eos: bool = False,
                 context_full: Literal["stop", "shift"] = "stop", n_keep: int = 0, backend_sampling: bool = False,
                 draft: "Draft | Literal['ngram'] | None" = None, json_schema: Mapping[str, Any] | str | None = None,
                 response_format: Mapping[str, Any] | None = None, logprobs: bool = False,
                 top_logprobs: int = 0) -> Generation:
        """Stream text pieces for ``prompt`` (text, or token ids).

        Greedy when no sampler is given. The KV cache keeps the longest common prefix with the
        previous generation. Pieces are always whole UTF-8 characters; ``stop`` strings end the
        stream and are not included. When the context fills up, "stop" ends with finish reason
        "length"; "shift" keeps the first ``n_keep`` tokens, drops half of the rest and goes on
        (models whose cache can shift positions only). backend_sampling=True (greedy only,
        llama.cpp's experimental backend sampling) picks the token inside the graph on the device
        that holds the output layer, so only a token id comes back per step, not the logits.
        draft: speculative decoding with a lamina.Draft (a small model with the same vocabulary)
        or "ngram" (prompt lookup, no second model); greedy output stays token for token the same,
        and stats gain n_drafted, n_accepted and acceptance.
        json_schema (a dict or JSON text) constrains the output to JSON valid against it, through
        llama.cpp's schema-to-grammar converter; response_format={"type": "json_object"} to any
        JSON object ({"type": "json_schema", "json_schema": {"schema": ...}} as OpenAI's API).
        logprobs=True: each generated token's log-probability, and with top_logprobs=k (0..20) the
        k most likely tokens' at each step (Generation.logprobs, Completion.logprobs; see
        lamina.Logprobs). Not with backend_sampling, which keeps the logits on the device.
        """
        if context_full not in ("stop", "shift"):
            raise ValueError(f"context_full must be 'stop' or 'shift', got {context_full!r}")
        if not isinstance(n_keep, int) or n_keep < 0:
            raise ValueError(f"n_keep must be an int >= 0, got {n_keep!r}")
        check_int("n_keep", n_keep, 0)
        check_count("max_tokens", max_tokens)
        top = top_logprobs_arg(logprobs, top_logprobs)
        stops = stop_strings(stop)
        tokens = self._prompt_tokens(prompt)
        sampler = sampler or Sampler()
        if response_format is not None:
            if json_schema is not None:
                raise ValueError("give json_schema or response_format, not both")
            json_schema = response_format_schema(response_format)
        if json_schema is not None:
            if sampler.grammar is not None or sampler.json_schema is not None:
                raise ValueError("the sampler has a grammar already: give json_schema there or here, not both")
            sampler = replace(sampler, json_schema=json_schema)
        draft = Draft() if draft == "ngram" else draft
        if draft is not None and not isinstance(draft, Draft):
            raise TypeError(f"draft must be a lamina.Draft or 'ngram', got {draft!r}")
        draft_ctx = draft.context_for(self) if draft is not None else None
        return Generation(_native.Generator(
            self.native, tokens, sampler.params(self.n_ctx), max_tokens, ignore_eos,
            n_keep if context_full == "shift" else -1, backend_sampling, draft.params() if draft is not None else None,
            draft_ctx.native if draft_ctx is not None else None, stops, top))

    if TYPE_CHECKING:  # for type checkers only: typing's overload registry would keep this module alive past
        # nanobind's teardown at exit (Python 3.13 then reports its native objects as leaked)
        @overload
        def chat(self, messages: Sequence[Mapping[str, Any] | ChatMessage], *, stream: Literal[False] = False,
                 **kwargs: Any) -> ChatResult: ...

        @overload
        def chat(self, messages: Sequence[Mapping[str, Any] | ChatMessage], *, stream: Literal[True],
                 **kwargs: Any) -> ChatStream: ...

    def chat(self, messages: Sequence[Mapping[str, Any] | ChatMessage], *, stream: bool = False,
             template: str | None = None, tools: Sequence[Mapping[str, Any]] | None = None,
             tool_choice: str | Mapping[str, Any] = "auto", parallel_tool_calls: bool | None = None,
             enable_thinking: bool | None = None, reasoning_format: str = "deepseek", reasoning_budget: int = -1,
             reasoning_message: str = "", chat_template_kwargs: Mapping[str, Any] | None = None,
             **kwargs: Any) -> ChatResult | ChatStream:
        """The assistant's reply to chat messages (dicts in OpenAI's shape, or ChatMessage), as
        llama-server's /v1/chat/completions makes it: rendered by the model's own template (or
        ``template``, see Model.apply_chat_template), generated, and parsed by the template's parser
        into content, ``reasoning_content`` and ``tool_calls``. A ChatResult, or with stream=True a
        ChatStream of ChatDelta (content, reasoning and tool-call argument fragments).

        tools (OpenAI's function tools), tool_choice ("auto", "none", "required" or one function)
        and parallel_tool_calls: where the template wants it, a tool call is held to its grammar
        from the template's trigger on (a lazy grammar); "required" holds the whole reply to it.
        Put the reply (result.message) and each tool's answer ({"role": "tool", "tool_call_id",
        "content"}) back into ``messages`` for the next turn. enable_thinking: None (on where the
        template supports it), True, False. reasoning_format: "deepseek" (thinking goes to
        reasoning_content), "none" (left in content). reasoning_budget: at most this many tokens
        of thinking, then reasoning_message and the end tag are forced (-1: no limit).
        Other keywords are generate()'s (max_tokens, sampler, stop, json_schema, response_format,
        logprobs, ...). A json_schema goes through the template as llama-server's does (its grammar
        lets the model think first); a sampler's own grammar holds the reply from its first token.
        Earlier turns are reused from the KV cache.
        """
        sampler: Sampler = kwargs.pop("sampler", None) or Sampler()
        schema = kwargs.pop("json_schema", None)
        response_format = kwargs.pop("response_format", None)
        if response_format is not None:
            if schema is not None:
                raise ValueError("give json_schema or response_format, not both")
            schema = response_format_schema(response_format)
        if sampler.json_schema is not None:
            if schema is not None:
                raise ValueError("the sampler has a json_schema already: give it there or here, not both")
            schema = sampler.json_schema
        if schema is not None:
            schema_grammar(schema)  # an invalid or too deeply nested schema fails here, naming its part
            schema = json.loads(schema) if isinstance(schema, str) else dict(schema)
            schema = schema or {"type": "object"}  # as llama-server: an empty schema means any object
        if sampler.grammar is not None and sampler.grammar_root != "root":
            raise ValueError("chat takes a grammar whose root rule is 'root'")
        r = self.model.render_chat(
            messages, template=template, tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls,
            enable_thinking=enable_thinking, chat_template_kwargs=chat_template_kwargs,
            reasoning_format=reasoning_format, json_schema=schema, grammar=sampler.grammar)
        thinking = bool(r["thinking_end_tags"])
        if reasoning_budget != -1 and not thinking:
            raise ValueError("reasoning_budget needs a template with thinking tags (this one has none)")
        # the template's grammar (tools, a json_schema) reads the reply's start it wrote; a grammar
        # of the caller's own the template leaves alone, and it reads the reply only (llama-server's)
        sampler = replace(
            sampler, grammar=r["grammar"] or sampler.grammar, grammar_prefill=bool(r["grammar"]), json_schema=None,
            grammar_lazy=r["grammar_lazy"] and bool(r["grammar"]),
            grammar_trigger_patterns=tuple(r["grammar_trigger_patterns"]),
            grammar_trigger_tokens=tuple(r["grammar_trigger_tokens"]), generation_prompt=r["generation_prompt"],
            preserved_tokens=tuple(r["preserved_token_ids"]), reasoning_budget=reasoning_budget,
            reasoning_start=r["thinking_start_tag"] if thinking else "",
            reasoning_end=tuple(r["thinking_end_tags"]), reasoning_message=reasoning_message)
        stop = stop_strings(kwargs.pop("stop", ())) + list(r["additional_stops"])
        replies = ChatStream(self.generate(bytes(r["prompt"]), sampler=sampler, stop=stop, **kwargs), reply_parser(r))
        return replies if stream else replies.result()

    def complete(self, prompt: Prompt, **kwargs: Any) -> Completion:
        """Generate to the end and return text, tokens, finish reason and speeds."""
        gen = self.generate(prompt, **kwargs)
        text = gen.rest()
        s = gen.stats  # the other fields of a Completion, by their names
        tokens, lp = gen._native.output  # one copy of both
        return Completion(text=text, tokens=tokens, logprobs=logprobs_of(tokens, lp), **{k: s[k] for k in (
            "finish_reason", "n_prompt", "n_prompt_eval", "prompt_tokens_per_s", "tokens_per_s")})

    def generate_batch(self, prompts: Sequence[Prompt], *, max_tokens: int = 256,
                       sampler: Sampler | Sequence[Sampler] | None = None, stop: str | Sequence[str] = (),
                       ignore_eos: bool = False, logprobs: bool = False, top_logprobs: int = 0) -> list[Completion]:
        """Generate for several prompts together, in this thread, over this context's
        n_seq_max sequences: the native loop of lamina.Batcher (one batch per step, a token of
        every running sequence plus prompt chunks of the next ones; more prompts than sequences
        wait for a free one). Each sequence holds n_ctx / n_seq_max tokens unless
        KV(unified=True). One sampler for all (prompt i seeded with seed + i) or one per prompt.
        The sequences used are empty afterwards. tokens_per_s of each result is the combined
        generation speed of the batch. logprobs, top_logprobs: as generate's."""
        if isinstance(prompts, (str, bytes)):
            raise TypeError("prompts must be a sequence of prompts; use generate() for one")
        toks = [self._prompt_tokens(p) for p in prompts]
        if not toks:
            raise ValueError("no prompts")
        check_count("max_tokens", max_tokens, 1)
        if sampler is None or isinstance(sampler, Sampler):
            base = sampler or Sampler()
            samplers = [replace(base, seed=(base.seed + i) % 2**32) for i in range(len(toks))]
        else:
            samplers = list(sampler)
            if len(samplers) != len(toks) or not all(isinstance(x, Sampler) for x in samplers):
                raise ValueError("sampler must be one Sampler or one per prompt")
        stops = stop_strings(stop)
        top = top_logprobs_arg(logprobs, top_logprobs)
        engine = _native.Batcher(self.native, 0, self.model.output_on_gpu)
        reqs = []
        try:
            for i, (t, s) in enumerate(zip(toks, samplers)):
                try:
                    reqs.append(engine.submit(t, s.params(self.n_ctx), max_tokens, ignore_eos, stops, top))
                except ValueError as e:
                    raise ValueError(f"prompt {i}: {e}") from None
            engine.run(True)
        finally:
            engine.close()  # requests left by a refused prompt or a Ctrl-C leave the context's engine
        for r in reqs:
            r.raise_if_failed()
        rows = [r.result() for r in reqs]
        t_first = min(r["t_first_us"] for r in rows)
        t_gen = (max(r["t_end_us"] for r in rows) - t_first) / 1e6
        t_prompt = (t_first - min(r["t_admit_us"] for r in rows)) / 1e6
        n_gen = sum(int(r["n_generated"]) for r in rows)
        n_prompt = sum(int(r["n_prompt"]) for r in rows)
        return [replace(completion_from_row(r), prompt_tokens_per_s=n_prompt / t_prompt if t_prompt > 0 else 0.0,
                        tokens_per_s=n_gen / t_gen if t_gen > 0 else 0.0) for r in rows]

    def __repr__(self) -> str:
        return f"<lamina.Context n_ctx={self.n_ctx} threads={self.threads} n_past={self.n_past}>"
