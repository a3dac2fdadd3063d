"""llama.cpp's own programs shipped with lamina (lamina/bin/: llama-bench, ggml-rpc-server, and any
-DLAMINA_EXTRA_TOOLS), built from the same source, run with the backends lamina runs with.

A program finds backend libraries that are linked in, or, in a portable build (the wheel), looks for
them next to itself and in its working directory. lamina's CPU variants and RPC backend live one
folder up (the package folder, which becomes the working directory) and a GPU add-on's library in
its own package: the first loaded add-on is named in GGML_BACKEND_PATH (ggml takes one), with the
folders of its runtime libraries (the nvidia-* pip packages) on LD_LIBRARY_PATH.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import _core, _native
from ._core import PACKAGE_DIR


def path(name: str) -> Path | None:
    """lamina/bin/<name> when this build ships it, else None."""
    p = PACKAGE_DIR / "bin" / name
    return p if p.exists() else None


def environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a shipped program needs to see lamina's backends (``base``: os.environ)."""
    env = dict(os.environ if base is None else base)
    if not _native.BACKEND_DL:
        return env  # backends are linked into the libraries the programs load
    loaded = [a for a in _core.ADDONS if a.loaded]
    if loaded and "GGML_BACKEND_PATH" not in env:
        env["GGML_BACKEND_PATH"] = loaded[0].library
        dirs = list(dict.fromkeys(str(Path(p).parent) for p in loaded[0].preloaded))
        if dirs:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(dirs + [d for d in [env.get("LD_LIBRARY_PATH", "")] if d])
    return env


def _command(name: str, args: Sequence[str]) -> list[str]:
    p = path(name)
    if p is None:
        raise FileNotFoundError(f"{name} is not shipped in this lamina build ({PACKAGE_DIR / 'bin'})")
    return [str(p), *map(str, args)]


def run(name: str, args: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """subprocess.run of a shipped program with lamina's backends (paths in args must be absolute)."""
    kwargs.setdefault("cwd", PACKAGE_DIR)
    kwargs.setdefault("text", True)
    return subprocess.run(_command(name, args), env=environment(kwargs.pop("env", None)), **kwargs)


def popen(name: str, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """subprocess.Popen of a shipped program with lamina's backends (paths in args must be absolute)."""
    kwargs.setdefault("cwd", PACKAGE_DIR)
    return subprocess.Popen(_command(name, args), env=environment(kwargs.pop("env", None)), **kwargs)
