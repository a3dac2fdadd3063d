#!/usr/bin/env bash
# Build lamina and llama.cpp with sanitizers (default address,undefined) into a venv of their own,
# then run the fast test suite and the CI fuzz seeds (model files and saved states) under them.
#   bash ci/sanitize.sh [pytest args...]       LAMINA_SANITIZE=address bash ci/sanitize.sh
# A finding fails the run: an ASan report ends the process (exit 86), a UBSan one is counted
# from the log (pytest, recovering, so one run lists them all) or ends a fuzz child (exit 87).
# Leak checking is off: CPython itself does not free everything at exit; tests/test_leaks.py
# measures lamina's own (RSS over many load/generate/close cycles).
set -euo pipefail
cd "$(dirname "$0")/.."
san="${LAMINA_SANITIZE:-address,undefined}"
venv=build/sanitize-venv
log=build/sanitize.log
# a venv of its own, without the system site-packages: an editable lamina installed there would be
# imported instead of this build (its import hook runs before the venv's path)
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q numpy PyYAML pytest pytest-timeout gguf nanobind scikit-build-core
export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/ccache}"
# the build imports the module (stub generation) without the runtime preloaded
ASAN_OPTIONS=verify_asan_link_order=0:detect_leaks=0 \
CMAKE_ARGS="-DLAMINA_SANITIZE=$san -DGGML_RPC=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo ${CMAKE_ARGS:-}" \
  "$venv/bin/pip" install -q --no-build-isolation --no-deps -Cbuild-dir=build/sanitize .

# the ASan runtime first, and libstdc++ with it: Python itself is C, and without it ASan's
# __cxa_throw interceptor finds no real function when the module throws its first exception
preload=""
case "$san" in *address*) preload="$(cc -print-file-name=libasan.so):$(cc -print-file-name=libstdc++.so)";; esac
export LD_PRELOAD="$preload"
export ASAN_OPTIONS="detect_leaks=0:exitcode=86:abort_on_error=0:allocator_may_return_null=1"
export UBSAN_OPTIONS="print_stacktrace=1:report_error_type=1:suppressions=$PWD/ci/ubsan.supp"
cd build  # import the installed package, not python/lamina
"../$venv/bin/python" -c "import lamina, sys; assert 'sanitize-venv' in lamina.__file__, lamina.__file__"
set +e
"../$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" --timeout=900 "${@:-../tests}" 2>&1 | tee "../$log"
rc_tests=${PIPESTATUS[0]}
UBSAN_OPTIONS="$UBSAN_OPTIONS:halt_on_error=1:exitcode=87" \
  "../$venv/bin/python" ../ci/fuzz.py --cases 1000 --seed 0 --timeout 120 2>&1 | tee -a "../$log"
rc_fuzz=${PIPESTATUS[0]}
UBSAN_OPTIONS="$UBSAN_OPTIONS:halt_on_error=1:exitcode=87" \
  "../$venv/bin/python" ../ci/fuzz.py --state --cases 300 --seed 0 --timeout 120 2>&1 | tee -a "../$log"
[ "${PIPESTATUS[0]}" = 0 ] || rc_fuzz=1
set -e
cd ..
ubsan=$(grep -c "runtime error:" "$log" || true)
asan=$(grep -c "ERROR: AddressSanitizer" "$log" || true)
echo "sanitize ($san): pytest rc=$rc_tests, fuzz rc=$rc_fuzz, UBSan reports $ubsan, ASan reports $asan (log: $log)"
grep "runtime error:" "$log" | sed 's/^.*\(llama.cpp[^ ]*\|cpp\/[^ ]*\)/\1/' | sort | uniq -c | sort -rn | head -20 || true
[ "$rc_tests" = 0 ] && [ "$rc_fuzz" = 0 ] && [ "$ubsan" = 0 ] && [ "$asan" = 0 ]
