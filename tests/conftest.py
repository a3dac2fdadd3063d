"""Fixtures: tiny random GGUF models (fast) and the real Gemma 3 270M model (marked `model`)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

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


@pytest.fixture
def sigint_raises() -> Iterator[None]:
    """Python's own SIGINT handler (KeyboardInterrupt) for one test. Python keeps SIGINT ignored when
    its process starts that way: a background job of a shell without job control (`cmd &` in a
    script, `nohup`, how CI and long runs are often started). Such a process never sees a Ctrl-C,
    so a test that raises SIGINT to check lamina's reaction to one asks for the handler itself, as
    a program that wants KeyboardInterrupt there would."""
    import signal

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _die_with_parent() -> None:
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@pytest.fixture(scope="session")
def rpc_endpoint() -> Iterator[str]:
    """A ggml-rpc-server on 127.0.0.1 serving the CPU: a real offload device without a GPU.

    The server as lamina runs it: with the same backends (a portable build's are not in bin/), and
    serving the CPU: byte-exact against local CPU runs, and on a GPU machine no remote CUDA device,
    to which ggml's RPC client sends ops it cannot run (its supports_op says yes to all: open). It
    outlives the tests and dies with this process (PR_SET_PDEATHSIG): a context that a failing
    test's traceback keeps alive until interpreter exit still finds it there (ggml's RPC client
    aborts the process when its server is gone)."""
    import lamina
    import requires

    requires.tool("ggml-rpc-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lamina.tools.popen("ggml-rpc-server", ["-H", "127.0.0.1", "-p", str(port), "-t", "1", "-d", "CPU"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    for _ in range(100):  # up to 10 s for the server to listen
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    yield f"127.0.0.1:{port}"
