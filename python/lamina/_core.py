"""Loads lamina._native once: backends shipped in the package, log routing to `logging`; and the
base of the objects that own a native handle."""
from __future__ import annotations

import atexit
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from . import _native
from .addons import AddOn, load_all

logger = logging.getLogger("lamina")
logger.addHandler(logging.NullHandler())  # quiet unless the application configures logging

# ggml log levels -> logging levels
_GGML_TO_LOGGING = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}


def _sink(level: int, line: str) -> None:
    logger.log(_GGML_TO_LOGGING.get(level, logging.INFO), "%s", line)


def sync_log_level() -> None:
    """Forward only the llama.cpp lines the 'lamina' logger would keep (cheap: no GIL otherwise)."""
    eff = logger.getEffectiveLevel()
    ggml_level = 1 if eff <= logging.DEBUG else 2 if eff <= logging.INFO else 3 if eff <= logging.WARNING else 4
    _native.log_set_level(ggml_level)


PACKAGE_DIR = Path(_native.__file__).resolve().parent
# LAMINA_CPU_VARIANT=haswell (a libggml-cpu-<variant> of a portable build) replaces the best CPU variant
_warning = _native.backends_load(str(PACKAGE_DIR), os.environ.get("LAMINA_CPU_VARIANT", ""))
if _warning:
    warnings.warn(_warning, RuntimeWarning, stacklevel=2)
_native.log_set_sink(_sink, 3)
sync_log_level()
# GPU add-ons (lamina-cuda13, lamina-vulkan, ...): one that is installed but cannot load says why
ADDONS: list[AddOn] = load_all()
for _addon in ADDONS:
    if not _addon.loaded:
        logger.warning("%s", _addon)
        warnings.warn(f"lamina: GPU add-on {_addon}", RuntimeWarning, stacklevel=2)
# No Python callbacks from llama.cpp threads once the interpreter is going away.
atexit.register(_native.log_set_sink, None, 5)


def _prepare_exit() -> None:
    """Daemon threads' llama.cpp calls end and their threads park before the interpreter finalizes
    (cpp/exit.cpp). Registered at lamina's import, before lamina.batcher's handler, so it runs
    after the Batchers closed. atexit handlers registered before lamina's import run after it:
    lamina work in them runs in the main thread, other threads' lamina calls park."""
    others = any(t is not threading.main_thread() and t.is_alive() for t in threading.enumerate())
    _native.prepare_exit(10.0, others)


atexit.register(_prepare_exit)


class _Handle(Protocol):
    def close(self) -> None: ...


_Self = TypeVar("_Self", bound="Closing")
_H = TypeVar("_H", bound=_Handle)


class Closing:
    """Leaving a ``with`` block calls close()."""

    def close(self) -> None:
        """Release what this object holds (idempotent)."""

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NativeOwner(Closing, Generic[_H]):
    """An object that owns one native handle, made last in its constructor: ``native`` raises
    RuntimeError when the constructor failed before making it; close() closes it (idempotent)."""

    _native: _H | None
    _what = "object"  # names it in that error

    @property
    def native(self) -> _H:
        if self._native is None:
            raise RuntimeError(f"{self._what} failed to initialise")
        return self._native

    def close(self) -> None:
        if self._native is not None:
            self._native.close()
