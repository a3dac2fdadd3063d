"""lamina's greedy generation gives exactly what llama.cpp's own CLI gives (same pinned build).

Needs llama-completion in the package (-Ccmake.define.LAMINA_EXTRA_TOOLS=llama-completion, as CI
builds it); CI sets LAMINA_REQUIRE_TOOLS=1 so a missing tool fails instead of skipping."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import lamina


def tool(name: str) -> str:
    if lamina.tools.path(name) is None:
        if os.environ.get("LAMINA_REQUIRE_TOOLS") == "1":
            raise FileNotFoundError(f"{name} missing: build with -DLAMINA_EXTRA_TOOLS={name}")
        pytest.skip(f"{name} not shipped in this build")
    return name


@pytest.mark.model
@pytest.mark.parametrize("prompt", ["The three primary colors are", "Once upon a time, in a small village,"])
def test_greedy_64_tokens_equal_llama_completion(real_model: lamina.Model, prompt: str) -> None:
    cmd = ["-m", str(real_model.path.resolve()), "-p", prompt, "-n", "64", "--temp", "0",
           "--ignore-eos", "-no-cnv", "--no-display-prompt", "--simple-io", "-t", "2", "-c", "4096"]
    ref = lamina.tools.run(tool("llama-completion"), cmd, capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
    assert ref.returncode == 0, ref.stderr[-2000:]
    with real_model.context(n_ctx=4096, threads=2) as ctx:
        ours = ctx.complete(prompt, max_tokens=64, ignore_eos=True)
    assert len(ours.tokens) == 64
    assert ours.text == ref.stdout.rstrip("\n")
