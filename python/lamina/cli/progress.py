"""A load progress bar for the command line: on stderr, and only when stderr is a terminal."""
from __future__ import annotations

import sys
from typing import Callable, TextIO


class LoadBar:
    """Model(progress=LoadBar(...)): draws ``label [#####-----]  50%`` in place, erased at 100%."""

    def __init__(self, stream: TextIO, label: str = "loading", width: int = 30) -> None:
        self.stream, self.label, self.width = stream, label, width
        self._shown = -1

    def __call__(self, fraction: float) -> bool:
        pct = max(0, min(100, int(fraction * 100)))
        if pct != self._shown:
            self._shown = pct
            done = self.width * pct // 100
            self.stream.write(f"\r{self.label} [{'#' * done}{'-' * (self.width - done)}] {pct:3d}%")
            if pct == 100:
                self.stream.write("\r\033[K")  # the bar goes; what follows starts on a clean line
            self.stream.flush()
        return True


def load_bar(label: str = "loading", stream: TextIO | None = None) -> Callable[[float], bool] | None:
    """A LoadBar on ``stream`` (default stderr) if it is a terminal, else None (no output)."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return LoadBar(stream, label) if isatty is not None and isatty() else None
