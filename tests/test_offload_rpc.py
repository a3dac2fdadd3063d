"""Offload for real without a GPU: ggml-rpc-server on 127.0.0.1 is the offload device.

Bytes per device come from llama.cpp's own memory breakdown and are checked exactly against
the tensor sizes in the GGUF file. CI builds with GGML_RPC and sets LAMINA_REQUIRE_TOOLS=1.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

import lamina


@pytest.fixture(scope="session")
def rpc_device() -> Iterator[lamina.Device]:
    server = Path(lamina.system_info().llama_cpp["package_dir"]) / "bin" / "ggml-rpc-server"
    if not server.exists():
        if os.environ.get("LAMINA_REQUIRE_TOOLS") == "1":
            raise FileNotFoundError(f"{server} missing: build with -Ccmake.define.GGML_RPC=ON")
        pytest.skip("built without GGML_RPC")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):  # up to 10 s for the server to listen
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        (dev,) = lamina.rpc_connect(f"127.0.0.1:{port}")
        assert dev.kind == "remote" and dev.backend == "RPC"
        yield dev
    finally:
        import gc

        gc.collect()  # nothing may hold buffers on the server when it stops (session end)
        proc.terminate()
        proc.wait(timeout=10)


def tensor_bytes(path: Path) -> dict[str, int]:
    from gguf import GGUFReader

    return {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}


def placement(model: lamina.Model, dev: lamina.Device) -> tuple[dict[str, int], dict[str, int], list[int]]:
    """(bytes on the RPC device, bytes on the host, greedy tokens)."""
    with model.context(n_ctx=256) as ctx:
        mem = ctx.kv.memory()
        tokens = list(ctx.complete("the sky is", max_tokens=16, ignore_eos=True).tokens)
    remote = [m for m in mem if m["device"] == dev.name]
    host = [m for m in mem if m["host"]]
    total = lambda rows, k: sum(int(r[k]) for r in rows)  # noqa: E731
    return ({k: total(remote, k) for k in ("model", "context", "compute")},
            {k: total(host, k) for k in ("model", "context", "compute")}, tokens)


def test_rpc_device_is_listed(rpc_device: lamina.Device) -> None:
    assert rpc_device in [d for d in lamina.devices() if d.kind == "remote"]
    assert rpc_device.memory_total > 0


def test_gpu_off_puts_nothing_on_the_device_and_ngl_is_inert(tiny_path: Path, rpc_device: lamina.Device) -> None:
    model = lamina.Model(tiny_path, gpu=False, n_gpu_layers=99)
    assert model.offload.gpu is False and model.offload.layers_effective == 0
    assert any("inert" in r for r in model.offload.reasons)
    remote, host, _ = placement(model, rpc_device)
    assert remote == {"model": 0, "context": 0, "compute": 0}
    assert host["model"] == sum(tensor_bytes(tiny_path).values())


def test_ngl_k_puts_exactly_k_layers_on_the_device(tiny_path: Path, rpc_device: lamina.Device) -> None:
    sizes = tensor_bytes(tiny_path)
    block = sum(v for k, v in sizes.items() if k.startswith("blk.0."))
    output = sizes["output.weight"] + sizes["output_norm.weight"]
    n_layer = 2
    with lamina.Model(tiny_path, gpu=False) as cpu_model:
        _, cpu_host, reference = placement(cpu_model, rpc_device)
    kv_total = cpu_host["context"]
    # llama.cpp offloads the output layer first, then blocks from the top: n_layer + 1 "layers"
    for k in range(1, n_layer + 2):
        model = lamina.Model(tiny_path, n_gpu_layers=k, devices=[rpc_device.name])
        assert model.offload.gpu and model.offload.layers_effective == k
        remote, _, tokens = placement(model, rpc_device)
        assert remote["model"] == output + (k - 1) * block, k
        assert remote["context"] == kv_total * (k - 1) // n_layer, k
        assert tokens == reference, k  # greedy output identical across placements
    everything = lamina.Model(tiny_path, n_gpu_layers="all", devices=[rpc_device.name])
    assert placement(everything, rpc_device)[0]["model"] == output + n_layer * block


def test_ngl_above_layers_is_clamped_with_a_note(tiny_path: Path, rpc_device: lamina.Device) -> None:
    model = lamina.Model(tiny_path, n_gpu_layers=40, devices=[rpc_device.name])
    assert model.offload.layers_effective == 3
    assert any("clamped" in r for r in model.offload.reasons)



def test_connecting_where_nothing_listens_raises(rpc_device: lamina.Device) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening
    with pytest.raises(ConnectionError):
        lamina.rpc_connect(f"127.0.0.1:{port}")
    with pytest.raises(ValueError):
        lamina.rpc_connect("no-port")
