#!/usr/bin/env bash
# The wheel route, as CI checks it on this machine kind (Linux x86_64, no GPU):
#   1. ci/build-wheel cpu: lamina's wheel (every CPU variant + RPC), repaired by auditwheel
#   2. ci/smoke-wheel on it in a fresh venv, and again with a lower CPU variant forced
#   3. the add-on and CPU-variant tests against that wheel (the test build links its backends in)
#   4. ci/build-wheel vulkan and ci/smoke-wheel with lavapipe: layers on Vulkan0, then uninstalled
#   5. ci/vulkan_offload.sh: exact offload on Vulkan0 through the wheel + add-on, next to torch & co
# When the machine cannot get lavapipe or the Vulkan headers (apt fails), 4-5 are skipped with a
# message: that is the environment, not lamina. Any failure after that exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
log=build/wheels-ci; mkdir -p "$log"
t0=$(date +%s)
base=$(ci/build-wheel cpu --out build/wheels-ci/dist 2> "$log/cpu.log") || { tail -40 "$log/cpu.log"; exit 1; }
echo "wheels: $(basename "$base"), $(du -k "$base" | cut -f1) KiB, built in $(( $(date +%s) - t0 )) s"
{ grep -A1 "is consistent" "$log/cpu.log" || true; } | tr -s ' \n' ' '; echo
ci/smoke-wheel "$base"
# a variant below the best one for this CPU (every x86-64 CPU has SSE4.2): must run, never SIGILL
LAMINA_CPU_VARIANT=sse42 ci/smoke-wheel "$base" | tee "$log/variant.txt"
grep -q '"cpu_variant": "portable, variant sse42' "$log/variant.txt"
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/pip" install -q "$base" pytest pytest-timeout gguf
(cd tests && "$venv/bin/python" -m pytest -q -p no:cacheprovider test_addons.py test_system.py)
rm -rf "$(dirname "$venv")"

if ! inc=$(bash ci/vulkan-headers.sh 2>/dev/null | tail -1) || [ ! -f "$inc/vulkan/vulkan.hpp" ]; then
  echo "wheels: Vulkan SKIPPED: could not install lavapipe and the Vulkan headers (apt)"
  exit 0
fi
t0=$(date +%s)
addon=$(ci/build-wheel vulkan --out build/wheels-ci/dist -- -Ccmake.define.Vulkan_INCLUDE_DIR="$inc" \
        2> "$log/vulkan.log") || { tail -40 "$log/vulkan.log"; exit 1; }
echo "wheels: $(basename "$addon"), $(du -k "$addon" | cut -f1) KiB, built in $(( $(date +%s) - t0 )) s"
GGML_VK_VISIBLE_DEVICES=0 ci/smoke-wheel --backend Vulkan --with "$base" "$addon"
bash ci/vulkan_offload.sh "$base" "$addon"
