#!/usr/bin/env bash
# lamina's own C++ (cpp/*.cpp) compiles without a warning under Clang too: -Wall -Wextra -Werror,
# syntax and semantic checks only (-fsyntax-only), with the flags CMake gives the module. GCC gets the
# same flags in the real build (LAMINA_WERROR=ON in .ci/run). Only the configure step runs here
# (llama.cpp itself is not compiled), so this takes about a minute.
#   usage: bash ci/warnings.sh            (installs clang with apt when it is missing)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v clang++ >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq clang >/dev/null
fi
# the configure finds nanobind through this Python (pip's isolated build brings its own)
python3 -c "import nanobind" 2>/dev/null || python3 -m pip install -q "nanobind>=2.4"
build=$(mktemp -d /tmp/lamina-warnings.XXXXXX)
trap 'rm -rf "$build"' EXIT
# the same configure as the package build (scikit-build-core passes these), with Clang for C++
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
      -DLAMINA_WERROR=ON -DLAMINA_BUILD_TOOLS=OFF -DLAMINA_CCACHE=OFF \
      -DPython_EXECUTABLE="$(command -v python3)" -DSKBUILD_PROJECT_VERSION_FULL=0.0.0 > "$build/configure.log" 2>&1 \
  || { tail -30 "$build/configure.log"; exit 1; }
n=0; failed=0
while IFS= read -r cmd; do
  src=$(grep -o '[^ ]*/cpp/[a-z_]*\.cpp' <<<"$cmd" | tail -1)
  n=$((n + 1))
  if ! (cd "$build" && eval "${cmd/ -o / -fsyntax-only -o }") 2> "$build/out.txt"; then
    failed=$((failed + 1)); echo "warnings: $src"; cat "$build/out.txt"
  fi
done < <(ninja -C "$build" -t commands _native | grep -E ' -c [^ ]*/cpp/[a-z_]+\.cpp')
[ "$n" -gt 0 ] || { echo "warnings: found no cpp/ compile commands" >&2; exit 1; }
echo "warnings: $n files of cpp/ checked with $(clang++ --version | head -1): $failed with warnings"
[ "$failed" -eq 0 ]
