"""What a test needs from the build under test, and a skip that becomes a failure where CI requires it.

A build may lack a program (-DLAMINA_BUILD_TOOLS=OFF, GGML_RPC off, no -DLAMINA_EXTRA_TOOLS) or be
the development build rather than the portable one (the wheel). Such a test skips, except when the
environment says the build under test must have it:
  LAMINA_REQUIRE_TOOLS=1     every program the tests use (CI's test build and the wheel CI tests)
  LAMINA_REQUIRE_PORTABLE=1  a portable build: CPU variants and backends loaded at run time (the wheel)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

import lamina


def lacking(what: str, flag: str) -> NoReturn:
    """Skip for ``what`` this build lacks, or fail when ``flag`` (LAMINA_REQUIRE_...) is 1."""
    if os.environ.get(flag) == "1":
        pytest.fail(f"{what}, and {flag}=1 requires it", pytrace=False)
    pytest.skip(what)


def tool(name: str) -> Path:
    """lamina/bin/<name> of the build under test (LAMINA_REQUIRE_TOOLS)."""
    p = lamina.tools.path(name)
    if p is None:
        lacking(f"{name} is not shipped in this build (GGML_RPC, LAMINA_BUILD_TOOLS or -DLAMINA_EXTRA_TOOLS={name})",
                "LAMINA_REQUIRE_TOOLS")
    return p


def portable() -> None:
    """A portable build (LAMINA_PORTABLE=ON, the wheel): CPU variants and GGML_BACKEND_DL (LAMINA_REQUIRE_PORTABLE)."""
    if not (lamina._native.PORTABLE and lamina._native.BACKEND_DL):
        lacking("not a portable build (LAMINA_PORTABLE=ON: the wheel's CPU variants, backends loaded at run time)",
                "LAMINA_REQUIRE_PORTABLE")


def pinned_source() -> None:
    """llama.cpp from the pin, with lamina's patches (LAMINA_REQUIRE_TOOLS: CI builds the pin)."""
    if lamina.system_info().llama_cpp["source"] != "pin":
        lacking("a user llama.cpp tree (LAMINA_LLAMA_CPP_DIR) does not carry lamina's patches", "LAMINA_REQUIRE_TOOLS")
