"""n_gpu_layers="auto" on a mixture of experts that does not fit a GPU whole: as llama.cpp's --fit,
the expert tensors go to host memory first and every layer to the GPU (lamina offloaded nothing
before). Runs on the first GPU device (ci/gpu_run.sh moe); greedy tokens must equal the CPU's."""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import lamina  # noqa: E402
from gguf import GGUFReader  # noqa: E402
from tiny_gguf import write_tiny_llama  # noqa: E402

(gpu, *_) = [d for d in lamina.devices(memory=False) if d.kind == "gpu"]
path = write_tiny_llama(Path(tempfile.mkdtemp()) / "moe.gguf", n_layer=8, n_embd=256, n_ff=1024, n_expert=32)
experts = sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if "_exps" in t.name)
with lamina.Model(path, gpu=False) as cpu, cpu.context(n_ctx=256) as ctx:
    reference = list(ctx.complete("the sky is", max_tokens=16, ignore_eos=True).tokens)
with lamina.Model(path, devices=[gpu.name], n_gpu_layers="all", n_ctx=256) as whole:
    (row,) = [d for d in whole.offload.per_device if d.device == gpu.name]
    need = row.model + row.context + row.compute
limit = need - experts // 2
model = lamina.Model(path, devices=[gpu.name], n_gpu_layers="auto", n_ctx=256, memory_limit={gpu.name: limit},
                     fit_margin=0)
print(model.offload)
(dev,) = [d for d in model.offload.per_device if d.device == gpu.name]
assert model.offload.layers_effective == 9 and dev.model + dev.context + dev.compute <= limit, model.offload
with model.context(n_ctx=256) as ctx:
    tokens = list(ctx.complete("the sky is", max_tokens=16, ignore_eos=True).tokens)
print(f"moe auto-fit on {gpu.name}: {model.offload.layers_effective}/9 layers on the GPU, experts "
      f"{experts / 2**20:.1f} MiB, limit {limit / 2**20:.1f} MiB; tokens {'equal' if tokens == reference else 'DIFFER'} "
      "to the CPU's")
