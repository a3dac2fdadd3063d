"""Offload for real without a GPU: ggml-rpc-server on 127.0.0.1 is the offload device.

Bytes per device come from llama.cpp's own memory breakdown and are checked exactly against
the tensor sizes in the GGUF file. CI builds with GGML_RPC and sets LAMINA_REQUIRE_TOOLS=1.
"""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

import lamina

from tiny_gguf import write_tiny_llama


@pytest.fixture(scope="session")
def rpc_device(rpc_endpoint: str) -> lamina.Device:
    (dev,) = lamina.rpc_connect(rpc_endpoint)
    assert dev.kind == "remote" and dev.backend == "RPC"
    return dev


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
    with pytest.warns(lamina.InertSettingWarning, match="n_gpu_layers=99 is inert: gpu=False"):
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


@pytest.fixture(scope="module")
def wide_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 layers of ~15 MiB each (f32): big enough that a layer is a measurable step in memory."""
    return write_tiny_llama(tmp_path_factory.mktemp("wide") / "wide.gguf", n_layer=6, n_embd=512, n_head=8,
                            n_head_kv=4, n_ff=2048, n_ctx=1024)


def device_row(model: lamina.Model, dev: lamina.Device) -> lamina.DeviceMemory:
    (row,) = [d for d in model.offload.per_device if d.device == dev.name]
    return row


def test_report_per_device_matches_what_a_context_allocates(tiny_path: Path, rpc_device: lamina.Device) -> None:
    sizes = tensor_bytes(tiny_path)
    model = lamina.Model(tiny_path, n_gpu_layers=2, devices=[rpc_device], n_ctx=256)
    row = device_row(model, rpc_device)
    assert row.layers == 2 and model.offload.layers_on(rpc_device.name) == 2
    assert row.model == sizes["output.weight"] + sizes["output_norm.weight"] + sum(
        v for k, v in sizes.items() if k.startswith("blk.1."))
    remote, host, _ = placement(model, rpc_device)  # a real context of 256 tokens
    assert (row.model, row.context, row.compute) == (remote["model"], remote["context"], remote["compute"])
    (h,) = [d for d in model.offload.per_device if d.device == "host"]
    assert h.layers == 1 and (h.model, h.context) == (host["model"], host["context"])
    text = str(model.offload)
    assert rpc_device.name in text and "layers" in text and "host" in text


def test_auto_takes_the_most_layers_that_fit_a_memory_limit(wide_path: Path, rpc_device: lamina.Device) -> None:
    need = {}
    for k in range(8):
        with lamina.Model(wide_path, n_gpu_layers=k, devices=[rpc_device.name], n_ctx=512) as m:
            need[k] = device_row(m, rpc_device).bytes
    assert all(need[k + 1] - need[k] > 10 * 2**20 for k in range(1, 7))  # each layer a clear step
    reference = None
    for k in (1, 3, 5):
        limit = (need[k] + need[k + 1]) // 2  # room for k layers, not k + 1
        model = lamina.Model(wide_path, n_gpu_layers="auto", devices=[rpc_device.name], n_ctx=512,
                             memory_limit={rpc_device.name: limit})
        assert model.offload.layers_effective == k, (k, model.offload)
        assert device_row(model, rpc_device).bytes <= limit
        assert any("memory fit chose" in r for r in model.offload.reasons)
        with model.context() as ctx:  # loads and runs: no out-of-memory
            tokens = list(ctx.complete("the sky", max_tokens=8, ignore_eos=True).tokens)
        reference = reference or tokens
        assert tokens == reference
    unlimited = lamina.Model(wide_path, n_gpu_layers="auto", devices=[rpc_device.name], n_ctx=512)
    assert unlimited.offload.layers_effective == 7


def test_tensor_overrides_keep_matching_tensors_on_the_cpu(tiny_path: Path, rpc_device: lamina.Device) -> None:
    sizes = tensor_bytes(tiny_path)
    ffn0 = sum(v for k, v in sizes.items() if k.startswith("blk.0.ffn_"))
    full = lamina.Model(tiny_path, n_gpu_layers="all", devices=[rpc_device.name])
    kept = lamina.Model(tiny_path, n_gpu_layers="all", devices=[rpc_device.name],
                        tensor_overrides=[(r"blk\.0\.ffn_.*", "cpu")])
    assert placement(kept, rpc_device)[0]["model"] == placement(full, rpc_device)[0]["model"] - ffn0
    assert placement(kept, rpc_device)[2] == placement(full, rpc_device)[2]
    with pytest.raises(ValueError, match="not a valid regex"):
        lamina.Model(tiny_path, devices=[rpc_device.name], n_gpu_layers="all", tensor_overrides=[("blk.(", "cpu")])
    with pytest.raises(ValueError, match="no GPU device"):
        lamina.Model(tiny_path, devices=[rpc_device.name], tensor_overrides=[("blk", "CUDA7")])
    off = lamina.Model(tiny_path, gpu=False, tensor_overrides=[("blk", rpc_device.name)])
    assert any("inert" in r for r in off.offload.reasons)


def _impossible_bytes() -> int:
    """More than this machine's memory and swap together: an allocation the kernel refuses up front
    (overcommit modes 0 and 2) instead of granting it and killing the RPC server when it is touched."""
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
        pytest.skip("vm.overcommit_memory=1 grants any allocation")
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return 2 * 1024 * sum(int(info[k].split()[0]) for k in ("MemTotal", "SwapTotal"))


def test_out_of_memory_names_the_device_and_the_bytes(wide_path: Path, rpc_device: lamina.Device) -> None:
    # the wide model's 6 KiB of KV per position keeps llama.cpp's per-cell host bookkeeping small
    model = lamina.Model(wide_path, n_gpu_layers="all", devices=[rpc_device.name])
    per_token = model.estimate_memory(1024).on(rpc_device.name).context // 1024  # KV bytes per position
    n_ctx = min(_impossible_bytes() // per_token + 256, 2**31 - 256) // 256 * 256
    with pytest.raises(lamina.OutOfMemoryError) as err:
        model.context(n_ctx=n_ctx)
    e = err.value
    assert e.device == rpc_device.name and e.bytes >= n_ctx * per_token * 0.9
    assert f"out of memory on {rpc_device.name}" in str(e) and f"{e.bytes:,} bytes" in str(e)
    with model.context(n_ctx=128) as ctx:  # nothing was lost: the model still runs on the device
        assert len(ctx.complete("the sky", max_tokens=4, ignore_eos=True).tokens) == 4


def test_kv_tensor_check_asks_the_device(wide_path: Path, rpc_device: lamina.Device) -> None:
    """The RPC device (a CPU backend) takes any tensor size; lavapipe's 128 MiB limit is checked in
    ci/vulkan_offload.sh, where llama.cpp would otherwise abort the process."""
    from lamina import _native

    model = lamina.Model(wide_path, n_gpu_layers="all", devices=[rpc_device.name])
    f16 = _native.ggml_type_from_name("f16")
    assert _native.kv_tensor_refusals(model.native, 1 << 20, f16, f16, [rpc_device.name]) == []
    with pytest.raises(ValueError, match="n_ctx"):
        _native.kv_tensor_refusals(model.native, 0, f16, f16, [rpc_device.name])
    with pytest.raises(ValueError, match="type"):
        _native.kv_tensor_refusals(model.native, 256, 999, f16, [rpc_device.name])
    # from the file's metadata, before a load (the "auto" fit); 0: the training context
    assert _native.kv_tensor_refusals_file(str(wide_path), 0, f16, f16, [rpc_device.name]) == []
    with pytest.raises(FileNotFoundError):
        _native.kv_tensor_refusals_file(str(wide_path) + ".missing", 256, f16, f16, [rpc_device.name])


@pytest.mark.parametrize("split, match", [
    ([1.0, 1.0], "2 entries for 1 device"),
    ([-1.0], ">= 0"),
    ([0.0], "all entries are zero"),
    ([float("nan")], "finite"),
])
def test_tensor_split_is_validated(tiny_path: Path, rpc_device: lamina.Device, split: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lamina.Model(tiny_path, devices=[rpc_device.name], n_gpu_layers="all", tensor_split=split)


def test_placement_settings_are_validated(tiny_path: Path, rpc_device: lamina.Device) -> None:
    with pytest.raises(ValueError, match="main_gpu"):
        lamina.Model(tiny_path, devices=[rpc_device.name], split_mode="none", main_gpu=3)
    with pytest.raises(ValueError, match="twice"):
        lamina.Model(tiny_path, devices=[rpc_device.name, rpc_device.index])
    with pytest.raises(ValueError, match="memory_limit applies"):
        lamina.Model(tiny_path, devices=[rpc_device.name], n_gpu_layers=1, memory_limit={rpc_device.name: 1})
    with pytest.raises(ValueError, match="expected an int >= 0, 'all' \\(or -1\\) or 'auto' for n_gpu_layers"):
        lamina.Model(tiny_path, n_gpu_layers=-3)


def test_connecting_where_nothing_listens_raises(rpc_device: lamina.Device) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening
    with pytest.raises(ConnectionError):
        lamina.rpc_connect(f"127.0.0.1:{port}")
    with pytest.raises(ValueError):
        lamina.rpc_connect("no-port")


def moe_auto_fit(device: str, folder: Path, n_layer: int = 4, **shape: int) -> tuple[lamina.Model, int, int, bool]:
    """A tiny random mixture of experts loaded with n_gpu_layers="auto" and a budget on ``device``
    of everything but half its experts: (model, expert bytes, budget, whether its greedy tokens
    equal the CPU's). Also run on a real GPU by ci/moe_fit.py."""
    from gguf import GGUFReader

    path = write_tiny_llama(folder / "moe.gguf", n_layer=n_layer, **shape)
    experts = sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if "_exps" in t.name)
    with lamina.Model(path, gpu=False) as cpu, cpu.context(n_ctx=256) as ctx:
        reference = list(ctx.complete("the sky is", max_tokens=8, ignore_eos=True).tokens)
    with lamina.Model(path, devices=[device], n_gpu_layers="all", n_ctx=256) as whole:
        (row,) = [d for d in whole.offload.per_device if d.device == device]
        limit = row.model + row.context + row.compute - experts // 2
    model = lamina.Model(path, devices=[device], n_gpu_layers="auto", n_ctx=256, memory_limit={device: limit},
                         fit_margin=0)
    with model.context(n_ctx=256) as ctx:
        same = list(ctx.complete("the sky is", max_tokens=8, ignore_eos=True).tokens) == reference
    return model, experts, limit, same


def test_auto_fit_of_a_mixture_of_experts_moves_experts_to_host_first(tmp_path: Path,
                                                                      rpc_device: lamina.Device) -> None:
    """n_gpu_layers="auto" on a MoE model that does not fit whole: as llama.cpp's --fit, the
    expert tensors go to host memory first and the layers to the device (it offloaded nothing)."""
    model, experts, limit, same = moe_auto_fit(rpc_device.name, tmp_path, n_ff=512, n_expert=16)
    off = model.offload
    (dev,) = [d for d in off.per_device if d.device == rpc_device.name]
    (host,) = [d for d in off.per_device if d.device == "host"]
    assert off.layers_effective == 5, str(off)  # every layer (4 + output) on the device
    assert host.model >= experts // 2 and dev.model + dev.context + dev.compute <= limit, str(off)
    assert any("mixture of experts" in r for r in off.reasons), off.reasons
    assert same  # the CPU's tokens
