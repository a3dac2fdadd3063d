"""lamina: llama.cpp for performance-sensitive Python.

    import lamina
    model = lamina.Model()                       # the default model, or Model("path.gguf")
    ctx = model.context(n_ctx=2048)
    for piece in ctx.generate("The capital of France is", max_tokens=32):
        print(piece, end="")
"""
from ._core import logger
from .config import Config, load_config
from .context import Completion, Context, Generation
from .batcher import Batcher, Request
from .params import KV
from .threads import Threads
from .errors import (BusyError, ClosedError, ConfigWarning, DecodeError, ForkError, InertSettingWarning, LaminaError, LoadError,
                     ModelFormatError, OutOfMemoryError, StaleGenerationError)
from .memory import DeviceMemory, MemoryEstimate, Offload
from .model import Model, Ranked
from .lora import Lora
from .logprobs import Logprobs
from .chat import ChatDelta, ChatMessage, ChatParseError, ChatResult, ChatStream, ToolCall, ToolCallDelta
from .tokenizer import ModelInfo, Tokenizer
from .models import default_model_path
from .sampling import Sampler
from .speculative import Draft
from .addons import AddOn
from .system import Device, SystemInfo, addons, default_threads, devices, rpc_connect, system_info
from . import _native as _n
from . import tools


def chat_templates() -> list[str]:
    """Names of the chat templates llama.cpp has built in (usable as template=...)."""
    return list(_n.chat_builtin_templates())


def chat_template_steps(n: int | None = None) -> int:
    """How many steps (statements run, loop turns, values printed) one chat template render may
    take before it raises ValueError, and with ``n`` set it for the process (default 20,000,000,
    some seconds of work). A hostile template ends there instead of hanging; a real template that
    is quadratic in the number of messages (Gemma 4's needs millions for a few hundred turns) may
    need more. Ctrl-C stops a render in the main thread."""
    if n is not None and (not isinstance(n, int) or isinstance(n, bool)):
        raise TypeError(f"n must be an int, got {n!r}")
    return int(_n.template_max_steps(n))


__version__: str = _n.VERSION  # pyproject.toml's, compiled in

__all__ = [
    "Config", "load_config", "Model", "Ranked", "Lora", "ModelInfo", "Tokenizer", "Offload", "DeviceMemory", "MemoryEstimate", "Context", "Generation", "Completion", "Batcher", "Request", "Threads", "KV", "Sampler", "Draft",
    "Logprobs", "ChatMessage", "ToolCall", "ChatResult", "ChatStream", "ChatDelta", "ToolCallDelta", "ChatParseError", "Device", "SystemInfo", "AddOn", "addons", "devices", "rpc_connect", "system_info", "chat_templates", "chat_template_steps", "default_threads", "default_model_path",
    "LaminaError", "LoadError", "OutOfMemoryError", "DecodeError", "ClosedError", "BusyError", "ForkError", "StaleGenerationError", "ModelFormatError", "InertSettingWarning", "ConfigWarning", "logger", "__version__",
]
