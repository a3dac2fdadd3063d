"""GPU add-ons: lamina-cuda12, lamina-cuda13, lamina-vulkan, lamina-rocm.

Each is a distribution of its own holding one ggml backend library, built from the same llama.cpp
as lamina's wheel, in a package of its own (``lamina_cuda13/``): uninstalling it leaves lamina as it
was. It declares an entry point in the group ``lamina.backends`` naming that package, whose constants
say which library to load and which runtime libraries to load first (the CUDA runtime and cuBLAS
from the ``nvidia-*`` pip packages, as CuPy and JAX take them). lamina loads every add-on at import;
one that cannot load (no driver, no runtime, another lamina version) is reported with its reason:
a RuntimeWarning at import, ``lamina.addons()`` and ``lamina doctor``.

Environment: ``LAMINA_ADDONS=none`` loads none, ``LAMINA_ADDONS=cuda13,vulkan`` only those;
``LAMINA_CUDA_RUNTIME=system`` takes the CUDA runtime from the system's library path (a local
toolkit) instead of the pip packages.
"""
from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

from . import _native

GROUP = "lamina.backends"


@dataclass(frozen=True)
class AddOn:
    """One installed add-on and what became of it at import."""

    name: str  # the entry point's name: cuda13, vulkan, ...
    distribution: str  # lamina-cuda13
    version: str
    library: str  # the backend library's path ('' when the package could not be read)
    backend: str  # ggml's name for it once loaded (CUDA, Vulkan), else what the add-on declares
    n_devices: int
    preloaded: tuple[str, ...]  # runtime libraries loaded first, with their paths
    error: str  # '' when the backend is registered with at least one device

    @property
    def loaded(self) -> bool:
        return not self.error

    def __str__(self) -> str:
        head = f"{self.distribution} {self.version} ({self.name})"
        if self.loaded:
            return f"{head}: {self.backend}, {self.n_devices} device{'s' if self.n_devices != 1 else ''} ({self.library})"
        return f"{head}: NOT LOADED: {self.error}"


def _pip_library(soname: str) -> str | None:
    """``soname`` in an nvidia-* pip package on sys.path (nvidia/cu13/lib/, nvidia/cublas/lib/, ...)."""
    for entry in sys.path:
        folder = Path(entry or ".") / "nvidia"
        if folder.is_dir():
            for candidate in sorted(folder.glob(f"*/lib/{soname}")):
                return str(candidate)
    return None


# handles of preloaded runtime libraries: kept so that they stay loaded for the process's life
_handles: list[ctypes.CDLL] = []


def _preload(mod: ModuleType) -> tuple[tuple[str, ...], list[str]]:
    """Load the add-on's runtime libraries from pip packages; returns (loaded paths, not found)."""
    env = getattr(mod, "RUNTIME_ENV", "")
    if env and os.environ.get(env, "").lower() == "system":
        return (), []
    loaded, missing = [], []
    for soname in getattr(mod, "PRELOAD", ()):
        path = _pip_library(soname)
        if path is None:
            missing.append(soname)  # the system's library path may still have it
            continue
        try:
            # RTLD_LOCAL: the backend library finds it by its soname, nothing else in the process binds to it
            _handles.append(ctypes.CDLL(path, mode=getattr(os, "RTLD_LOCAL", 0) | getattr(os, "RTLD_NOW", 0)))
            loaded.append(path)
        except OSError as exc:
            missing.append(f"{soname} ({exc})")
    return tuple(loaded), missing


def _try_load(ep: object, loaded: dict[str, str]) -> AddOn:
    name = getattr(ep, "name", "?")
    dist = getattr(ep, "dist", None)
    dist_name = dist.name if dist is not None else f"lamina-{name}"
    version = dist.version if dist is not None else "?"

    def failed(why: str, library: str = "", backend: str = "", preloaded: tuple[str, ...] = ()) -> AddOn:
        return AddOn(name, dist_name, version, library, backend, 0, preloaded, why)

    try:
        mod = import_module(getattr(ep, "value", "").split(":")[0])
        library, backend = str(mod.LIBRARY), str(mod.BACKEND)
    except Exception as exc:  # a broken add-on must not break `import lamina`
        return failed(f"its package could not be read: {type(exc).__name__}: {exc}")
    built_for = (getattr(mod, "LAMINA_VERSION", "?"), getattr(mod, "LLAMA_CPP_COMMIT", "?"))
    if built_for != (_native.VERSION, _native.LLAMA_CPP_COMMIT):
        return failed(f"built for lamina {built_for[0]} (llama.cpp {built_for[1]}), this is lamina {_native.VERSION} "
                      f"(llama.cpp {_native.LLAMA_CPP_COMMIT}): install {dist_name}=={_native.VERSION}",
                      library, backend)
    # ggml registers a backend as often as it is loaded, and lists its devices once per registration
    # (one registered without devices, whose runtime found none, lists nothing: another may try)
    have = {str(b["name"]).lower() for b in _native.backends() if int(b["n_devices"]) > 0}
    if backend.lower() in have:
        owner = loaded.get(backend.lower(), "lamina itself")
        return failed(f"ggml already has the {backend} backend, from {owner}: loading {dist_name} too would list "
                      f"its devices twice (keep one: pip uninstall {dist_name})", library, backend)
    if not Path(library).is_file():
        return failed(f"{library} is missing (a broken install: reinstall {dist_name})", library, backend)
    preloaded, missing = _preload(mod)
    res = _native.backend_load_file(library)
    error = str(res["error"])
    if error:
        if missing:
            error += f" [not found in pip packages: {', '.join(missing)}]"
        error += f"; {dist_name} {getattr(mod, 'NEEDS', '')}".rstrip("; ")
    return AddOn(name, dist_name, version, library, str(res["name"]) or backend, int(res["n_devices"]),
                 preloaded, error)


def load_all() -> list[AddOn]:
    """Find the installed add-ons and load each (once, at import: ggml cannot unload a backend)."""
    wanted = os.environ.get("LAMINA_ADDONS", "").strip()
    if wanted.lower() in ("none", "0", "off"):
        return []
    names = {w.strip() for w in wanted.split(",") if w.strip()} if wanted else None
    found = [ep for ep in entry_points(group=GROUP) if names is None or ep.name in names]
    # two add-ons for one backend (lamina-cuda12 and lamina-cuda13): the newer runtime is tried first,
    # and the other loads only when it did not
    loaded: dict[str, str] = {}
    out = []
    for ep in sorted(found, key=lambda e: e.name, reverse=True):
        try:
            a = _try_load(ep, loaded)
        except Exception as exc:  # a broken add-on must not break `import lamina`
            why = f"could not be loaded: {type(exc).__name__}: {exc}"
            a = AddOn(ep.name, f"lamina-{ep.name}", "?", "", "", 0, (), why)
        if a.loaded:
            loaded[a.backend.lower()] = a.distribution
        out.append(a)
    return sorted(out, key=lambda a: a.name)
