"""lamina.Tokenizer: a model's vocabulary alone (llama.cpp's vocab_only load: no weights read), and
the vocabulary methods Model shares with it."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from . import _core, _native
from .models import default_model_path
from .params import as_tokens


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


class Vocabulary(_core.NativeOwner[_native.Model]):
    """Text <-> tokens and chat templates over ``self.native`` (a loaded _native.Model), and its
    lifetime: close() and ``with``."""

    info: ModelInfo
    path: Path
    _what = "model"  # for the error when the native object was never made

    def close(self) -> None:
        """Release the model (contexts still open keep the weights alive until they close)."""
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

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], *, template: str | None = None,
                            add_assistant: bool = True) -> str:
        """Render chat messages ({"role": ..., "content": ...}) with llama.cpp's template support.

        template: a template string or a built-in name (lamina.chat_templates()); default: the
        model's own (tokenizer.chat_template). Raises ValueError if there is none llama.cpp supports.
        """
        tmpl = template if template is not None else self.info.chat_template
        if tmpl is None:
            raise ValueError(f"{self.info.name or self.path.name} has no chat template in its metadata; pass "
                             f"template= a template string or a built-in name from lamina.chat_templates()")
        msgs = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise TypeError(f"message {i} must be a mapping with str 'role' and 'content', got {m!r}")
            msgs.append((m["role"], m["content"]))
        return _native.chat_apply_template(tmpl, msgs, add_assistant).decode("utf-8", errors="replace")

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
