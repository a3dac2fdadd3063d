"""n_gpu_layers="auto" on a mixture of experts that does not fit a GPU whole: as llama.cpp's --fit,
the expert tensors go to host memory first and every layer to the GPU (lamina offloaded nothing
before). Runs on the first GPU device (ci/gpu_run.sh moe), with the check tests/test_offload_rpc.py
runs over RPC."""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import lamina  # noqa: E402
from test_offload_rpc import moe_auto_fit  # noqa: E402

(gpu, *_) = [d for d in lamina.devices(memory=False) if d.kind == "gpu"]
model, experts, limit, same = moe_auto_fit(gpu.name, Path(tempfile.mkdtemp()), n_layer=8, n_embd=256, n_ff=1024,
                                           n_expert=32)
print(model.offload)
(dev,) = [d for d in model.offload.per_device if d.device == gpu.name]
assert model.offload.layers_effective == 9 and dev.model + dev.context + dev.compute <= limit, model.offload
print(f"moe auto-fit on {gpu.name}: {model.offload.layers_effective}/9 layers on the GPU, experts "
      f"{experts / 2**20:.1f} MiB, budget {limit / 2**20:.1f} MiB; greedy tokens {'equal' if same else 'DIFFER'} "
      "to the CPU's")
