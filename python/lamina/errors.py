"""lamina's exceptions. All derive from LaminaError (a RuntimeError); bad arguments raise
ValueError/TypeError, bad token ids IndexError, missing files FileNotFoundError."""
from ._native import (BusyError, ClosedError, DecodeError, ForkError, LaminaError, LoadError, ModelFormatError,
                      OutOfMemoryError, StaleGenerationError)

__all__ = ["LaminaError", "LoadError", "OutOfMemoryError", "DecodeError", "ClosedError", "BusyError", "ForkError",
           "StaleGenerationError", "ModelFormatError", "InertSettingWarning", "ConfigWarning"]


class InertSettingWarning(UserWarning):
    """A setting given explicitly that cannot take effect (n_gpu_layers with no GPU to offload to)."""


class ConfigWarning(UserWarning):
    """A model.yml key lamina does not know (with a suggestion), or one it knows but cannot act on."""
