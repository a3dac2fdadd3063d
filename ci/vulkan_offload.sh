#!/usr/bin/env bash
# Offload through a real Vulkan device without a GPU: Mesa's lavapipe (llvmpipe) on this CPU, with
# lamina as users install it: the lamina wheel and the lamina-vulkan add-on (ci/build-wheel), put in
# a private folder. For a tiny random model it checks that n_gpu_layers=k puts exactly k layers'
# bytes on Vulkan0, that greedy tokens do not change with placement, and that gpu=False leaves the
# device empty; then lamina next to numpy, torch, jax, ... with every layer on Vulkan0.
#   usage: bash ci/vulkan_offload.sh LAMINA_WHEEL LAMINA_VULKAN_WHEEL   (ci/wheels.sh builds them)
# The caller has installed lavapipe and the headers (ci/vulkan-headers.sh).
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: bash ci/vulkan_offload.sh LAMINA_WHEEL LAMINA_VULKAN_WHEEL" >&2; exit 2; }
rm -rf /tmp/lamina-vk-site && pip install -q --no-deps --target /tmp/lamina-vk-site "$1" "$2"
site=$(python3 -c "import site; print(site.getsitepackages()[0])")
# -S: an editable lamina in site-packages would otherwise shadow the wheel through its import hook
GGML_VK_VISIBLE_DEVICES=0 PYTHONPATH="/tmp/lamina-vk-site:$PWD/tests:$site" python3 -S - <<'PY'
from pathlib import Path
import tempfile

import lamina
from gguf import GGUFReader
from tiny_gguf import write_tiny_llama

(addon,) = lamina.addons()
assert addon.loaded and addon.backend == "Vulkan", addon
(dev,) = [d for d in lamina.devices() if d.backend == "Vulkan"]
print("device:", dev.name, dev.description, f"{dev.memory_total >> 20} MiB")
path = write_tiny_llama(Path(tempfile.mkdtemp()) / "tiny.gguf")
sizes = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
block = sum(v for k, v in sizes.items() if k.startswith("blk.0."))
output = sizes["output.weight"] + sizes["output_norm.weight"]
reference = None
for k in (0, 1, 2, 3):
    model = lamina.Model(path, n_gpu_layers=k)
    with model.context(256) as ctx:
        tokens = list(ctx.complete("the sky is", max_tokens=16, ignore_eos=True).tokens)
        on_dev = sum(int(r["model"]) for r in ctx.kv.memory() if r["device"] == dev.name)
    reference = reference or tokens
    want = 0 if k == 0 else output + (k - 1) * block
    assert model.offload.layers_effective == k and on_dev == want, (k, on_dev, want)
    assert tokens == reference, k
    print(f"n_gpu_layers={k}: {on_dev} bytes on {dev.name} (expected {want}), same greedy tokens")
off = lamina.Model(path, gpu=False, n_gpu_layers=99)
with off.context(256) as ctx:
    assert not any(r["device"] == dev.name and (r["model"] or r["context"] or r["compute"]) for r in ctx.kv.memory())
print("gpu=False with n_gpu_layers=99: nothing on", dev.name, "-", off.offload.reasons)
print(lamina.Model(path).offload)
# a model.yml on a machine with a GPU device: its ngl applies (not inert), and with gpu off it is
# inert, warned once, and nothing goes to the device
import warnings
yml = path.parent / "model.yml"
for text, layers, n_inert in ((f"model: {path}\nngl: 2\n", 2, 0), (f"model: {path}\nngl: 2\ngpu: false\n", 0, 1)):
    yml.write_text(text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = lamina.load_config(yml, env={})
        model = lamina.Model.from_config(cfg)
    inert = [w for w in caught if issubclass(w.category, lamina.InertSettingWarning)]
    assert cfg.gpu_off == ("" if layers else f"gpu is off ({yml}:3)"), cfg.gpu_off
    assert model.offload.layers_effective == layers and len(inert) == n_inert, (text, model.offload, inert)
    print(f"model.yml {text.splitlines()[1:]}: {layers} layers on {dev.name}, {n_inert} InertSettingWarning")
# one layer's K cache beyond what the device can use in one tensor (lavapipe: 128 MiB): llama.cpp
# would abort the process; lamina raises, naming the device and the bytes, and the model still runs
wide = write_tiny_llama(path.parent / "wide.gguf", n_layer=6, n_embd=512, n_head=8, n_head_kv=4, n_ff=2048)
model = lamina.Model(wide, n_gpu_layers="all")
for call in (lambda: model.context(n_ctx=1 << 20), lambda: model.estimate_memory(1 << 20),
             lambda: lamina.Model(wide, n_gpu_layers="auto", n_ctx=1 << 20)):  # before llama.cpp's fit
    try:
        call()
        raise AssertionError("a 512 MiB KV tensor on lavapipe did not raise")
    except lamina.OutOfMemoryError as exc:
        assert exc.device == dev.name and exc.bytes == 512 * 2**20, (exc.device, exc.bytes)
        print("n_ctx=1048576 raised:", exc)
with model.context(n_ctx=1 << 18) as ctx:  # 128 MiB per tensor: usable
    assert len(ctx.complete("the sky", max_tokens=4, ignore_eos=True).tokens) == 4
print("n_ctx=262144 (128 MiB per K/V tensor) created and ran on", dev.name)
PY
# lamina next to numpy and torch (CPU build), in both orders, every layer on Vulkan0
python3 -c "import torch" 2>/dev/null || pip install -q torch==2.13.0 || echo "vulkan_offload: torch not installable here"
model=$(PYTHONPATH="$PWD/tests" python3 -c "
import tempfile, pathlib; from tiny_gguf import write_tiny_llama
print(write_tiny_llama(pathlib.Path(tempfile.mkdtemp()) / 'tiny.gguf'))")
GGML_VK_VISIBLE_DEVICES=0 PYTHONPATH="/tmp/lamina-vk-site:$site" python3 -S ci/import_matrix.py "$model" --ngl all \
  --cases nothing,numpy,torch,torch-gpu,jax,cupy,tokenizers,transformers,sentencepiece,onnxruntime
