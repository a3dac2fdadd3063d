"""lamina shares its process with numpy, torch, jax, cupy: what its shared libraries export.

Every shared library Python loads from the package may export only llama.cpp's and ggml's C API
(and lamina._native its init function). Anything else in the dynamic symbol table (C++ runtime
template instances, their static locals and guard variables, cuda::std objects) can interpose
with another extension's copy: the CUDA build crashed that way when torch was imported first.
The symbols are read from the ELF files themselves, so the check needs no binutils.
"""
from __future__ import annotations

import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import lamina
import lamina.cli.bench
from lamina._core import PACKAGE_DIR
import requires

C_API = re.compile(r"(ggml|gguf|llama)_\w*")
# ggml-base's quantization kernels (GGML_API in ggml-quants.h), called by the CPU backends
QUANTS = re.compile(r"(quantize|dequantize_row|iq2xs|iq3xs)_\w+")
# C++ names llama.cpp declares in its API (llama-ext.h's functions) or under its own prefixes
# (members of llama_* / gguf_* classes), with their vtables and typeinfo: _Z, then an optional
# nested-name or special prefix, then the length-prefixed first name. std::, cuda::std::,
# nlohmann:: and every other namespace fail.
MANGLED = re.compile(r"_Z(?:N[rVKRO]*|T[VIS]N?[rVK]*)?(\d+)(\w+)")

STB_LOCAL, SHN_UNDEF, SHT_DYNSYM = 0, 0, 11


def elf_exports(path: Path) -> list[tuple[str, int]]:
    """(name, binding) of every defined, non-local symbol in an ELF64 file's .dynsym."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, f"{path} is not an ELF64 file"
    end = "<" if data[5] == 1 else ">"
    shoff, = struct.unpack_from(end + "Q", data, 0x28)
    shentsize, shnum = struct.unpack_from(end + "HH", data, 0x3A)
    sections = [struct.unpack_from(end + "IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    out = []
    for _name, sh_type, _f, _a, off, size, link, _i, _al, entsize in sections:
        if sh_type != SHT_DYNSYM:
            continue
        stroff = sections[link][4]
        for k in range(size // entsize):
            st_name, st_info, _other, st_shndx, _v, _s = struct.unpack_from(end + "IBBHQQ", data, off + k * entsize)
            bind = st_info >> 4
            if st_shndx == SHN_UNDEF or bind == STB_LOCAL or st_name == 0:
                continue
            name = data[stroff + st_name:data.index(b"\0", stroff + st_name)].decode()
            out.append((name, bind))
    return out


def allowed(lib: Path, name: str) -> bool:
    if lib.name.startswith("_native"):
        return name == "PyInit__native"
    if C_API.fullmatch(name) or QUANTS.fullmatch(name):
        return True
    m = MANGLED.match(name)
    return bool(m) and C_API.match(m.group(2)[: int(m.group(1))]) is not None


def python_loaded_libraries() -> list[Path]:
    return sorted(p for p in PACKAGE_DIR.iterdir() if p.is_file() and ".so" in p.name)


def test_package_ships_the_module_and_llama_cpp_libraries() -> None:
    names = {p.name.split(".")[0] for p in python_loaded_libraries()}
    assert {"_native", "libllama", "libggml", "libggml-base"} <= names, names


@pytest.mark.parametrize("lib", python_loaded_libraries(), ids=lambda p: p.name)
def test_libraries_export_only_the_c_api(lib: Path) -> None:
    exports = elf_exports(lib)
    assert exports, f"{lib.name} exports nothing: the reader is broken"
    bad = sorted(name for name, _bind in exports if not allowed(lib, name))
    assert not bad, f"{lib.name} exports {len(bad)} symbols outside the C API, e.g. {bad[:8]}"


def test_the_reader_sees_what_a_plain_export_list_has() -> None:
    # the guard must be able to fail: libstdc++ exports C++ symbols (std::...) by the thousand
    import ctypes.util
    path = ctypes.util.find_library("stdc++")
    if path is None:
        pytest.skip("no libstdc++ found to read")
    maps = Path("/proc/self/maps").read_text()
    found = next((ln.split()[-1] for ln in maps.splitlines() if "libstdc++" in ln), None)
    assert found is not None
    names = [n for n, _b in elf_exports(Path(found))]
    assert len(names) > 1000 and any(n.startswith("_ZNSt") for n in names)
    assert not allowed(PACKAGE_DIR / "libllama.so", "_ZNSt6localeC1Ev")
    assert allowed(PACKAGE_DIR / "libllama.so", "_Z26llama_get_memory_breakdownPK13llama_context")


def test_import_and_load_map_no_tool_library(tiny_path: Path) -> None:
    # the programs in lamina/bin (llama-bench, ...) bring their own libraries; Python loads none
    code = ("import lamina, pathlib; m = lamina.Model(%r, gpu=False); c = m.context(n_ctx=64);"
            "print(pathlib.Path('/proc/self/maps').read_text())" % str(tiny_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    mapped = {ln.split()[-1] for ln in out.stdout.splitlines() if str(PACKAGE_DIR) in ln}
    assert any("libllama.so" in p for p in mapped)
    assert not [p for p in mapped if "/bin/" in p or "common" in Path(p).name], mapped


def test_tool_libraries_live_beside_the_tools() -> None:
    bin_dir = requires.tool("llama-bench").parent
    assert not (PACKAGE_DIR / "libllama-common.so").exists()
    out = subprocess.run([str(bin_dir / "llama-bench"), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage" in out.stdout.lower(), out.stderr[-500:]
    assert lamina.cli.bench.llama_bench_path() == bin_dir / "llama-bench"
