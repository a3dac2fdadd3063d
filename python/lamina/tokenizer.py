"""lamina.Tokenizer: a model's vocabulary alone (llama.cpp's vocab_only load: no weights read), and
the vocabulary methods Model shares with it."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from . import _core, _native
from .chat import ChatMessage
from .models import default_model_path
from .params import as_tokens
from .sampling import schema_grammar


@dataclass(frozen=True)
class ModelInfo:
    """Facts about a loaded model (model.info)."""

    path: str
    arch: str
    name: str
    desc: str
    n_params: int
    size: int
    n_layer: int
    n_ctx_train: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_swa: int
    n_vocab: int
    bos: int
    eos: int
    eot: int
    add_bos: bool
    chat_template: str | None
    has_encoder: bool
    is_recurrent: bool


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")  # ipython: Llama 3.1's tool results


def chat_messages(messages: Sequence[Mapping[str, Any] | ChatMessage]) -> list[dict[str, Any]]:
    """Messages as JSON-ready dicts; TypeError / ValueError naming the message for a bad one."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a sequence of mappings, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, ChatMessage):
            m = m.openai()
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise TypeError(f"message {i} must be a mapping with a str 'role', got {m!r}")
        if m["role"] not in CHAT_ROLES:
            raise ValueError(f"message {i}: unknown role {m['role']!r} (one of {', '.join(CHAT_ROLES)})")
        content = m.get("content")
        if m["role"] != "assistant" and not isinstance(content, (str, list)):
            raise TypeError(f"message {i} ({m['role']}) must have a str 'content' (or a list of parts), got {content!r}")
        if m["role"] == "assistant" and "content" not in m and not m.get("tool_calls"):  # None: llama-server's too
            raise TypeError(f"message {i} (assistant) must have 'content' or 'tool_calls'")
        try:
            json.dumps(dict(m))
        except (TypeError, ValueError, RecursionError) as e:
            raise ValueError(f"message {i} is not JSON: {e}") from None
        out.append(dict(m))
    return out


def chat_tools(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI function tools checked: ValueError naming the tool and its part for a bad one."""
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, Mapping) else None
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if not isinstance(t, Mapping) or t.get("type") != "function" or not isinstance(name, str) or not name:
            raise ValueError(f'tool {i} must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}, '
                             f"got {t!r:.200}")
        assert isinstance(fn, Mapping)
        params = fn.get("parameters", {})
        if not isinstance(params, Mapping):
            raise ValueError(f"tool {i} ({name}): parameters must be a JSON schema object, got {params!r:.100}")
        try:
            schema_grammar(params)  # llama.cpp's converter names the part it cannot use
        except ValueError as e:
            raise ValueError(f"tool {i} ({name}): parameters: {e}") from None
        out.append(dict(t))
    return out


class Vocabulary(_core.NativeOwner[_native.Model]):
    """Text <-> tokens and chat templates over ``self.native`` (a loaded _native.Model), and its
    lifetime: close() and ``with``."""

    info: ModelInfo
    path: Path
    _what = "model"  # for the error when the native object was never made

    def close(self) -> None:
        """Release the model (contexts still open keep the weights alive until they close)."""
        self.__dict__.pop("_templates", None)
        super().close()

    def tokenize(self, text: str | bytes, *, add_special: bool = True, special: bool = False) -> npt.NDArray[np.int32]:
        """Text -> int32 token ids. add_special adds BOS/EOS as the model wants; special parses
        markup such as ``<start_of_turn>`` into control tokens."""
        data = text.encode("utf-8") if isinstance(text, str) else text
        if not isinstance(data, bytes):
            raise TypeError(f"text must be str or bytes, got {type(text).__name__}")
        return self.native.tokenize(data, add_special, special)

    def detokenize(self, tokens: Any, *, special: bool = False) -> str:
        """Token ids -> text (invalid UTF-8 at the edges becomes U+FFFD)."""
        arr = as_tokens(tokens, self.info.n_vocab)
        return self.native.detokenize(arr, False, special).decode("utf-8", errors="replace")

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        return self.native.token_to_piece(int(token), special)

    def is_eog(self, token: int) -> bool:
        return self.native.is_eog(int(token))

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any] | ChatMessage], *, template: str | None = None,
                            add_assistant: bool = True, tools: Sequence[Mapping[str, Any]] | None = None,
                            tool_choice: str | Mapping[str, Any] = "auto", parallel_tool_calls: bool | None = None,
                            enable_thinking: bool | None = None,
                            chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
        """Render chat messages in OpenAI's shape ({"role", "content"}; assistant "tool_calls",
        "reasoning_content"; tool "tool_call_id") with llama.cpp's chat support, as llama-server
        renders them: the model's own Jinja template (or ``template``: Jinja source, or a built-in
        name from lamina.chat_templates()) run by llama.cpp's sandboxed Jinja engine.

        tools (OpenAI's function tools), tool_choice and parallel_tool_calls go into the prompt
        where the template takes them. enable_thinking: None (on where the template supports it),
        True or False. A trailing assistant message is continued, not closed. Raises ValueError
        naming the part for bad messages, a template that does not parse or render, or tools with
        a built-in template.
        """
        out = self.render_chat(messages, template=template, add_assistant=add_assistant, tools=tools,
                               tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls,
                               enable_thinking=enable_thinking, chat_template_kwargs=chat_template_kwargs)
        return bytes(out["prompt"]).decode("utf-8", errors="replace")

    def render_chat(self, messages: Sequence[Mapping[str, Any] | ChatMessage], *, template: str | None = None,
                    add_assistant: bool = True, tools: Sequence[Mapping[str, Any]] | None = None,
                    tool_choice: str | Mapping[str, Any] = "auto", parallel_tool_calls: bool | None = None,
                    enable_thinking: bool | None = None, chat_template_kwargs: Mapping[str, Any] | None = None,
                    reasoning_format: str = "deepseek", json_schema: Mapping[str, Any] | None = None,
                    grammar: str | None = None) -> dict[str, Any]:
        """What apply_chat_template renders, with everything generation and the reply's parser
        need, as llama-server makes them: prompt (bytes), format, grammar (tools' or json_schema's
        or grammar's), grammar_lazy and its triggers, preserved tokens, additional stops,
        generation_prompt, thinking tags, parser. tool_choice may also be OpenAI's
        {"type": "function", "function": {"name": ...}}: that tool, required."""
        if tools is not None and (isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence)):
            raise TypeError(f"tools must be a list of OpenAI tool objects, got {type(tools).__name__}")
        tools = chat_tools(tools or [])
        if isinstance(tool_choice, Mapping):  # one named function, required (the pin's chat.h parses names only)
            fn = tool_choice.get("function")
            name = fn.get("name") if isinstance(fn, Mapping) else None
            if tool_choice.get("type") != "function" or not isinstance(name, str):
                raise ValueError(f'tool_choice must be "auto", "none", "required" or {{"type": "function", '
                                 f'"function": {{"name": ...}}}}, got {tool_choice!r}')
            tools = [t for t in tools if isinstance(t, Mapping) and isinstance(t.get("function"), Mapping)
                     and t["function"].get("name") == name]
            if not tools:
                raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
            tool_choice = "required"
        if not isinstance(tool_choice, str):
            raise ValueError(f"tool_choice must be 'auto', 'none' or 'required', got {tool_choice!r}")
        request: dict[str, Any] = {"messages": chat_messages(messages), "add_generation_prompt": add_assistant,
                                   "tools": tools, "tool_choice": tool_choice, "reasoning_format": reasoning_format}
        if parallel_tool_calls is not None:
            request["parallel_tool_calls"] = bool(parallel_tool_calls)
        if enable_thinking is not None:
            request["enable_thinking"] = bool(enable_thinking)
        if chat_template_kwargs:
            request["chat_template_kwargs"] = dict(chat_template_kwargs)
        if json_schema is not None:
            request["json_schema"] = json_schema
        if grammar is not None:
            request["grammar"] = grammar
        try:
            body = json.dumps(request)
        except (TypeError, ValueError, RecursionError) as e:
            raise ValueError(f"tools, json_schema or chat_template_kwargs are not JSON: {e}") from None
        out: dict[str, Any] = self._chat_templates(template).render(self.native, body)
        return out

    def _chat_templates(self, template: str | None) -> _native.ChatTemplates:
        """The native templates for ``template`` (None: the model's own), parsed once per model."""
        cache = self.__dict__.setdefault("_templates", {})
        if template not in cache:
            if not template and self.info.chat_template is None:
                raise ValueError(f"{self.info.name or self.path.name} has no chat template in its metadata; pass "
                                 f"template= a Jinja template or a built-in name from lamina.chat_templates()")
            if template is not None and not isinstance(template, str):
                raise TypeError(f"template must be a str, got {type(template).__name__}")
            builtin = template in _native.chat_builtin_templates()
            cache[template] = _native.ChatTemplates(self.native, template or "", not builtin)
        templates: _native.ChatTemplates = cache[template]
        return templates

    @property
    def metadata(self) -> dict[str, str]:
        """Every GGUF metadata key/value (values as strings)."""
        return self.native.metadata()


class Tokenizer(Vocabulary):
    """A GGUF model's tokenizer without its weights: llama.cpp reads the metadata and vocabulary
    only (vocab_only), so it loads in a fraction of a full load's time and memory. tokenize,
    detokenize, token_to_piece, is_eog and apply_chat_template give what Model's give.

        tok = lamina.Tokenizer("model.gguf")     # or Tokenizer() for the default model
        ids = tok.tokenize("Hello")
    """

    _what = "tokenizer"

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self._native: _native.Model | None = None
        if path is None:
            path = default_model_path()
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        self.path = Path(path)
        _native.validate_gguf(os.fspath(self.path))  # what llama.cpp would abort on: ModelFormatError
        placement = _native.Placement()
        placement.devices = []  # no device: nothing but the vocabulary is loaded
        _core.sync_log_level()
        self._native = _native.Model(os.fspath(self.path), placement, vocab_only=True)
        info = self._native.info()
        self.info = ModelInfo(**{k: info[k] for k in ModelInfo.__dataclass_fields__})

    def __repr__(self) -> str:
        return f"<lamina.Tokenizer {self.info.n_vocab} tokens from {str(self.path)!r}>"
