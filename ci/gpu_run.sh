#!/usr/bin/env bash
# GPU measurements on the device machine (no internet), in stages so one session fits in a few calls:
#   build   CUDA build from the carried llama.cpp tree (.device/llama.cpp.tgz: trimmed pinned source)
#   model   random Llama-3.2-1B-shaped and ~125M "small" models, quantized to Q4_K_M
#   bench   lamina vs llama-bench, every layer on GPU 0 (tg128, pp512)
#   probe   ci/tg_probe.cpp: where a generated token's time goes beyond llama-bench's loop
#   auto    n_gpu_layers="auto" on GPU 0: free memory, memory held by another process, memory_limit
#   ngl     tg128 / pp512 against n_gpu_layers 0, 25, 50, 75, 100 %
#   two     layer / row / tensor_split over two GPUs (needs a 2-GPU machine)
#   sweep   CPU thread sweep (gpu=False) on the small model, lamina vs llama-bench
#   cpuonly a CPU-only build of the same source: gpu=False in the CUDA build vs the CPU-only build
#   test    the fast test suite
# usage: bash ci/gpu_run.sh stage ...
set -uo pipefail
OUT=${OUT:-/tmp/lamina-out}; mkdir -p "$OUT"
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
mkdir -p /tmp/lcpp && [ -d /tmp/lcpp/src ] || { tar xzf .device/llama.cpp.tgz -C /tmp/lcpp && mv /tmp/lcpp/llama.cpp-* /tmp/lcpp/src; }
export LAMINA_LLAMA_CPP_DIR=/tmp/lcpp/src
export PYTHONPATH=/tmp/lcpp/src/gguf-py   # gguf for the models, from the same tree
py=$(command -v python3)
for stage in "$@"; do
  t0=$(date +%s); echo "### $stage"
  case $stage in
  build)
    $py -m pip install --no-build-isolation --no-deps . -Cbuild-dir=build/cuda \
       -Ccmake.define.GGML_CUDA=ON -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 \
       -Ccmake.define.LAMINA_EXTRA_TOOLS=llama-quantize > "$OUT/build.log" 2>&1 \
       || { tail -50 "$OUT/build.log"; exit 1; }
    (cd /tmp && $py -c "import lamina; print(lamina.system_info())") | tee "$OUT/system_info.txt" ;;
  model)
    bin=$($py -c "import lamina; print(lamina.system_info().llama_cpp['package_dir'])")/bin
    for m in llama-1b small; do
      $py tests/tiny_gguf.py /tmp/$m-f16.gguf $m > /dev/null
      "$bin/llama-quantize" /tmp/$m-f16.gguf /tmp/$m.gguf Q4_K_M "$(nproc)" > "$OUT/quantize.log" 2>&1 || { tail "$OUT/quantize.log"; exit 1; }
      echo "$m: $(stat -c %s /tmp/$m.gguf) bytes"
    done ;;
  bench)
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
    CUDA_VISIBLE_DEVICES=0 $py ci/bench_generate.py --model /tmp/llama-1b.gguf -n 128 -p 512 -r 1 --rounds 9 \
      --json "$OUT/bench_gpu.json"
    echo "with backend sampling (greedy argmax in the graph):"
    CUDA_VISIBLE_DEVICES=0 $py ci/bench_generate.py --model /tmp/llama-1b.gguf -n 128 -p 0 -r 1 --rounds 5 \
      --backend-sampling 2>/dev/null ;;
  probe)
    pkg=$($py -c "import lamina, os; print(os.path.dirname(lamina._native.__file__))")
    g++ -O2 -std=c++17 -I$LAMINA_LLAMA_CPP_DIR/include -I$LAMINA_LLAMA_CPP_DIR/ggml/include ci/tg_probe.cpp \
      -o /tmp/tg_probe -L"$pkg" -lllama -lggml -lggml-base -Wl,-rpath,"$pkg" || exit 1
    CUDA_VISIBLE_DEVICES=0 /tmp/tg_probe /tmp/llama-1b.gguf 128 10 3
    CUDA_VISIBLE_DEVICES=0 /tmp/tg_probe /tmp/llama-1b.gguf 128 10 7 | grep -E "argmax|bench" ;;
  auto)
    CUDA_VISIBLE_DEVICES=0 $py ci/gpu_offload.py auto /tmp/llama-1b.gguf ;;
  ngl)
    for ngl in 0 4 8 12 17; do
      CUDA_VISIBLE_DEVICES=0 $py ci/bench_generate.py --model /tmp/llama-1b.gguf -ngl $ngl -n 128 -p 512 -r 3 --rounds 1 2>/dev/null | grep -E "^\| "
    done ;;
  two)
    $py ci/gpu_offload.py two /tmp/llama-1b.gguf ;;
  sweep)
    # thread counts up to this machine's CPUs: 1 2 4 8 ... n/2 3n/4 n; paired samples (-r 1 --rounds N)
    ts=$($py -c "import os; n = len(os.sched_getaffinity(0)); print(','.join(map(str, sorted({t for t in (1, 2, 4, 8, n // 2, 3 * n // 4, n) if 0 < t <= n}))))")
    big=$($py -c "print(','.join(t for t in '$ts'.split(',') if int(t) >= 4))")
    echo "default threads: $($py -c 'import lamina; print(lamina.default_threads(), lamina.system_info().default_threads_batch)'); sweep $ts"
    CUDA_VISIBLE_DEVICES= $py ci/bench_generate.py --model /tmp/small.gguf --no-gpu -t $ts -n 128 -p 0 -r 1 --rounds 5 2>/dev/null
    CUDA_VISIBLE_DEVICES= $py ci/bench_generate.py --model /tmp/llama-1b.gguf --no-gpu -t $big -n 128 -p 0 -r 1 --rounds 3 2>/dev/null ;;
  sweep2)
    # the same sweeps with rounds alternating lamina and llama-bench (drift on a shared VM hits both)
    CUDA_VISIBLE_DEVICES= $py ci/bench_generate.py --model /tmp/small.gguf --no-gpu -t 8,16,24,32 -n 128 -p 0 -r 3 --rounds 4
    CUDA_VISIBLE_DEVICES= $py ci/bench_generate.py --model /tmp/llama-1b.gguf --no-gpu -t 8,16,24,32 -n 128 -p 0 -r 2 --rounds 2 ;;
  cpuonly)
    $py -m pip wheel --no-build-isolation --no-deps . -w /tmp/cpu_wheel -Cbuild-dir=build/cpu \
       -Ccmake.define.GGML_CUDA=OFF > "$OUT/build_cpu.log" 2>&1 || { tail -30 "$OUT/build_cpu.log"; exit 1; }
    $py -m pip install --no-deps --target /tmp/cpu_site /tmp/cpu_wheel/lamina-*.whl > /dev/null
    echo "built in $(( $(date +%s) - t0 )) s"
    for r in 1 2 3; do
      for kind in cuda-build cpu-build; do
        pp=""; [ $kind = cpu-build ] && pp=/tmp/cpu_site
        (cd /tmp && PYTHONPATH=$pp $py -c "
import lamina, lamina.bench as b, statistics as s
m = lamina.Model('/tmp/llama-1b.gguf', gpu=False)
t = 16
pp = b.lamina_pp(m, 512, t, 5); tg = b.lamina_tg(m, 128, t, 5)
print('$kind', [x['name'] for x in lamina.system_info().backends], 'threads', t, 'pp512 %.1f tg128 %.1f' % (s.median(pp), s.median(tg)))")
      done
    done ;;
  kv)
    CUDA_VISIBLE_DEVICES=0 $py -c "
import lamina, time
m = lamina.Model('/tmp/llama-1b.gguf')
for t in ('f16', 'q8_0', 'q4_0'):
    for fa in (False, True):
        if t != 'f16' and not fa: continue
        with m.context(4096, kv=lamina.KV(type_k=t, type_v=t), flash_attn=fa) as c:
            sp = []
            for r in range(3):  # the prompt is evaluated once, then reused from the cache
                g = c.generate(list(range(1, 3900)), max_tokens=128, ignore_eos=True); ''.join(g)
                sp.append(g.stats['tokens_per_s'])
            print(f'kv {t:5} flash_attn={fa!s:5} KV {c.kv.bytes / 2**20:7.1f} MiB  tg128 after 3899 tokens: {sorted(sp)[1]:.1f} t/s')
" ;;
  test)
    # lamina imported before pytest's plugins: the import segfaults inside this venv's pytest otherwise
    $py -X faulthandler -c "import lamina, sys, pytest; sys.exit(pytest.main(['-q', '-m', 'not model', '-p', 'no:cacheprovider', 'tests']))" > "$OUT/tests.txt" 2>&1
    grep -E "passed|failed|Fatal|Segmentation|^FAILED|^ERROR" "$OUT/tests.txt" | tail -15 ;;
  esac
  echo "### $stage: $(( $(date +%s) - t0 )) s"
done
