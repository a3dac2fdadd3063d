#!/usr/bin/env bash
# Packs the pinned llama.cpp source (fetched by vendor/llama.cpp/fetch.py) into .device/llama.cpp.tgz,
# trimmed to what the build needs, for ci/gpu_run.sh on the device machine (no internet there).
#   usage: bash ci/device_pack.sh     (then carry .device in the device call)
set -euo pipefail
cd "$(dirname "$0")/.."
src=$(python3 vendor/llama.cpp/fetch.py); b=$(basename "$src")
mkdir -p .device
tar czf .device/llama.cpp.tgz -C "$(dirname "$src")" \
  --anchored --exclude="$b/models" --exclude="$b/docs" --exclude="$b/media" --exclude="$b/benches" --exclude="$b/.github" \
  --exclude="$b/tools/server/webui" --exclude="$b/tools/ui" --no-anchored --exclude='*.gguf' --exclude='*.png' \
  "$(basename "$src")"
ls -l .device/llama.cpp.tgz
