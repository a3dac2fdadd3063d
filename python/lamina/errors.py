"""lamina's exceptions. All derive from LaminaError (a RuntimeError); bad arguments raise
ValueError/TypeError, bad token ids IndexError, missing files FileNotFoundError."""
from ._native import ClosedError, DecodeError, LaminaError, LoadError, OutOfMemoryError

__all__ = ["LaminaError", "LoadError", "OutOfMemoryError", "DecodeError", "ClosedError"]
