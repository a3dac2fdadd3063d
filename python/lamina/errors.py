"""lamina's exceptions. All derive from LaminaError (a RuntimeError); bad arguments raise
ValueError/TypeError, bad token ids IndexError, missing files FileNotFoundError."""
from ._native import (BusyError, ClosedError, DecodeError, ForkError, LaminaError, LoadError, ModelFormatError,
                      OutOfMemoryError)

__all__ = ["LaminaError", "LoadError", "OutOfMemoryError", "DecodeError", "ClosedError", "BusyError", "ForkError",
           "ModelFormatError"]
