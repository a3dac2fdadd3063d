#!/usr/bin/env bash
# One GPU session on the device machine (no internet): CUDA build from a carried llama.cpp tree,
# the fast tests, a random Llama-3.2-1B-shaped Q4_K_M model, and lamina vs llama-bench in one run.
#   carry: .device/llama.cpp.tgz (trimmed pinned source: docs, models, tools/ui, tests, examples left out)
#   usage: bash ci/gpu_run.sh [stage ...]   stages: build test model bench (default: all)
set -uo pipefail
OUT=${OUT:-/tmp/lamina-out}; mkdir -p "$OUT"
stages=${*:-build test model bench}
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
mkdir -p /tmp/lcpp && [ -d /tmp/lcpp/src ] || { tar xzf .device/llama.cpp.tgz -C /tmp/lcpp && mv /tmp/lcpp/llama.cpp-* /tmp/lcpp/src; }
export LAMINA_LLAMA_CPP_DIR=/tmp/lcpp/src
export PYTHONPATH=/tmp/lcpp/src/gguf-py   # gguf for the test fixtures, from the same tree
py=$(command -v python3)

if [[ " $stages " == *" build "* ]]; then
  t0=$(date +%s)
  $py -m pip install --no-build-isolation --no-deps . -Cbuild-dir=build/cuda \
     -Ccmake.define.GGML_CUDA=ON -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 \
     -Ccmake.define.LAMINA_EXTRA_TOOLS=llama-quantize > "$OUT/build.log" 2>&1 \
     || { tail -50 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s"
  (cd /tmp && $py -c "import lamina; print(lamina.system_info())") | tee "$OUT/system_info.txt"
fi
if [[ " $stages " == *" test "* ]]; then
  $py -m pytest -v -m "not model" -p no:cacheprovider tests > "$OUT/tests.txt" 2>&1
  grep -E "passed|failed|Fatal|Segmentation|File .*tests/" "$OUT/tests.txt" | tail -15
fi
bin=$($py -c "import lamina; print(lamina.system_info().llama_cpp['package_dir'])")/bin
if [[ " $stages " == *" model "* ]]; then
  t0=$(date +%s)
  $py tests/tiny_gguf.py /tmp/l1b-f16.gguf llama-1b > /dev/null
  "$bin/llama-quantize" /tmp/l1b-f16.gguf /tmp/l1b-q4km.gguf Q4_K_M "$(nproc)" > "$OUT/quantize.log" 2>&1 || { tail "$OUT/quantize.log"; exit 1; }
  echo "model: $(( $(date +%s) - t0 )) s, $(stat -c %s /tmp/l1b-q4km.gguf) bytes"
fi
if [[ " $stages " == *" bench "* ]]; then
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/gpu.txt"
  $py ci/bench_generate.py --model /tmp/l1b-q4km.gguf -n 128 -p 512 -r 5 --rounds 2 --json "$OUT/bench_gpu.json" \
    | tee "$OUT/bench_gpu.md"
  # thread sweep of tg: with every layer on the GPU, CPU threads only wake for the few host ops
  $py ci/bench_generate.py --model /tmp/l1b-q4km.gguf -n 128 -p 0 -t 1,4,16 -r 5 --rounds 2 | tee "$OUT/bench_gpu_threads.md"
fi
