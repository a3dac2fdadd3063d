"""Chat as agents use it: replies parsed into content, reasoning and tool calls by the model's own
template (llama.cpp's common/chat.h), whole (ChatResult) or streamed (ChatStream of ChatDelta)."""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Protocol

import numpy as np
import numpy.typing as npt

from . import _core, _native
from .logprobs import Logprobs, logprobs_of

if TYPE_CHECKING:
    from .context import Generation


class _Pieces(Protocol):
    def token_to_piece(self, token: int, *, special: bool = False) -> bytes: ...


@dataclass(frozen=True)
class ToolCall:
    """A call the model asked for: OpenAI's ``tool_calls[i]`` (``arguments`` is JSON text)."""

    id: str
    name: str
    arguments: str

    def parsed_arguments(self) -> Any:
        """The arguments as Python objects; ValueError when the model's text is not JSON."""
        try:
            return json.loads(self.arguments)
        except ValueError as e:
            raise ValueError(f"tool call {self.name!r}: its arguments are not JSON: {e}") from None

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ChatMessage:
    """One chat message; ``messages`` take these or plain dicts in OpenAI's shape. A reply's
    ``reasoning_content`` is the model's thinking, apart from ``content``."""

    role: str
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None  # a "tool" message: the call it answers
    name: str | None = None

    def openai(self) -> dict[str, Any]:
        """The message as OpenAI's API has it (what goes back into ``messages``)."""
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.reasoning_content:
            d["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            d["tool_calls"] = [c.openai() for c in self.tool_calls]
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            d["name"] = self.name
        return d


@dataclass(frozen=True)
class ChatResult:
    """A whole reply: the parsed message, why it ended ("stop", "length", or "tool_calls" when
    it asks for tools), the raw generated text and the generation's figures."""

    message: ChatMessage
    finish_reason: str
    text: str
    tokens: npt.NDArray[np.int32]
    n_prompt: int
    n_prompt_eval: int
    prompt_tokens_per_s: float
    tokens_per_s: float
    logprobs: Logprobs | None = None

    @property
    def content(self) -> str | None:
        return self.message.content

    @property
    def reasoning_content(self) -> str | None:
        return self.message.reasoning_content

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        return self.message.tool_calls

    def openai(self, model: _Pieces, name: str = "lamina", id: str | None = None) -> dict[str, Any]:
        """The reply as OpenAI's chat.completion object (``model`` gives the logprobs' token text;
        ``name`` is its "model" field)."""
        message = self.message.openai()
        if "tool_calls" in message and not message["content"]:
            message["content"] = None
        return {
            "id": id or f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion", "created": int(time.time()),
            "model": name,
            "choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason,
                         "logprobs": {"content": self.logprobs.openai(model)} if self.logprobs is not None else None}],
            "usage": {"prompt_tokens": self.n_prompt, "completion_tokens": len(self.tokens),
                      "total_tokens": self.n_prompt + len(self.tokens)},
        }


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a streamed tool call: ``id`` and ``name`` come once, with its first piece;
    ``arguments`` fragments add up to the call's JSON text (OpenAI's streamed ``tool_calls``)."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True)
class ChatDelta:
    """What one streamed step added (OpenAI's ``choices[0].delta``); the last one carries
    ``finish_reason``."""

    content: str = ""
    reasoning_content: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = field(default=())
    finish_reason: str | None = None

    def openai(self) -> dict[str, Any]:
        """OpenAI's ``choices[0].delta`` of a chat.completion.chunk (the fields this step has)."""
        d: dict[str, Any] = {}
        if self.content:
            d["content"] = self.content
        if self.reasoning_content:
            d["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            d["tool_calls"] = [{"index": c.index, **({"id": c.id, "type": "function"} if c.id else {}),
                                "function": {**({"name": c.name} if c.name else {}), "arguments": c.arguments}}
                               for c in self.tool_calls]
        return d


class ChatParseError(ValueError):
    """The finished reply does not match the template's format (as llama-server's error); ``text``
    holds what the model wrote."""

    def __init__(self, message: str, text: str) -> None:
        super().__init__(message)
        self.text = text


def reply_parser(render: Mapping[str, Any]) -> _native.ChatParser:
    """A fresh parser for a reply to a ChatTemplates.render result."""
    parser: _native.ChatParser = render["reply"].parser()
    return parser


def _message(parser: _native.ChatParser) -> ChatMessage:
    content, reasoning, calls = parser.message
    return ChatMessage(role="assistant", content=content or None, reasoning_content=reasoning or None,
                       tool_calls=tuple(ToolCall(*c) for c in calls))


def _delta(items: list[tuple[Any, ...]], finish_reason: str | None = None) -> ChatDelta:
    content = "".join(i[1] for i in items if i[0] == "content")
    reasoning = "".join(i[1] for i in items if i[0] == "reasoning")
    calls = tuple(ToolCallDelta(i[1], i[2] or None, i[3] or None, i[4]) for i in items if i[0] == "tool")
    return ChatDelta(content, reasoning, calls, finish_reason)


def _finish_reason(gen_reason: str | None, message: ChatMessage) -> str:
    return "tool_calls" if message.tool_calls and gen_reason == "stop" else gen_reason or "stop"


class ChatStream(_core.Closing):
    """Iterator of ChatDelta for a streamed reply (ctx.chat(..., stream=True)); ``result()`` runs
    it to the end and gives the ChatResult. A context manager: leaving the block closes it."""

    def __init__(self, gen: "Generation", parser: _native.ChatParser) -> None:
        self._gen, self._parser = gen, parser
        self._result: ChatResult | None = None
        self._steps = self._run()

    def __iter__(self) -> Iterator[ChatDelta]:
        return self._steps

    def __next__(self) -> ChatDelta:
        return next(self._steps)

    def _run(self) -> Iterator[ChatDelta]:
        for piece in self._gen:
            items = self._parser.update(piece, False)
            if items:
                yield _delta(items)
        items = self._finish("")
        yield _delta(items, self.result().finish_reason)

    def _finish(self, rest: str) -> list[tuple[Any, ...]]:
        """The last text in, parsed as the whole reply; the result made."""
        try:
            items: list[tuple[Any, ...]] = self._parser.update(rest, True)
        except ValueError as e:
            raise ChatParseError(str(e), self.text) from None
        message = _message(self._parser)
        s = self._gen.stats
        tokens, lp = self._gen._native.output
        self._result = ChatResult(
            message=message, finish_reason=_finish_reason(s["finish_reason"], message), text=self.text, tokens=tokens,
            n_prompt=s["n_prompt"], n_prompt_eval=s["n_prompt_eval"], prompt_tokens_per_s=s["prompt_tokens_per_s"],
            tokens_per_s=s["tokens_per_s"], logprobs=logprobs_of(tokens, lp))
        return items

    def result(self) -> ChatResult:
        """The whole reply (what is left generated in one native call, then parsed once)."""
        if self._result is None:
            self._steps = iter(())
            self._finish(self._gen.rest())
        assert self._result is not None
        return self._result

    def close(self) -> None:
        """Stop early; final, as Generation.close()."""
        self._gen.close()
        self._steps = iter(())

    @property
    def message(self) -> ChatMessage:
        """The reply as parsed so far."""
        return _message(self._parser)

    @property
    def text(self) -> str:
        """The generated text so far."""
        return bytes(self._parser.text).decode("utf-8", errors="replace")
