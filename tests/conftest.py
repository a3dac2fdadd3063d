"""Fixtures: tiny random GGUF models (fast) and the real Gemma 3 270M model (marked `model`)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_gguf import write_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_model(tiny_path: Path):
    """On the CPU whatever devices exist: the exact-logit tests compare decodes of different batch
    sizes, which GPU kernels compute with different (f16) arithmetic. Offload has its own tests."""
    import lamina

    with lamina.Model(tiny_path, gpu=False) as m:
        yield m


@pytest.fixture(scope="session")
def real_path() -> Path:
    """The Gemma 3 270M Q4_K_M file. CI sets LAMINA_REQUIRE_MODEL=1 so a missing package fails."""
    import lamina

    try:
        return lamina.default_model_path()
    except lamina.LaminaError as exc:
        if os.environ.get("LAMINA_REQUIRE_MODEL") == "1":
            raise
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def real_model(real_path: Path):
    import lamina

    with lamina.Model(real_path) as m:
        yield m
