#!/usr/bin/env bash
# The wheel every Python from 3.12 on installs: cp312-abi3, built with Python 3.12 against the 3.12
# limited API (nanobind's STABLE_ABI; wheel.py-api = "cp312"), as CI checks it:
#   1. ci/build-wheel cpu --python 3.12: the portable wheel (every CPU variant + RPC), repaired by
#      auditwheel; its name must carry cp312-abi3 and a manylinux tag
#   2. abi3audit: every Python symbol the module imports is in the stable ABI of 3.12
#   3. ci/smoke-wheel on Python 3.12 and 3.13: installed from binaries only (no compiler), generates
#   4. the whole test suite against that wheel, installed into a fresh Python 3.13 venv, with the
#      portable-build tests required (LAMINA_REQUIRE_PORTABLE=1)
# CI's wheel also carries llama-completion, llama-batched-bench, llama-speculative-simple and llama-server
# (-DLAMINA_EXTRA_TOOLS) for the parity, bench and chat-template tests; the release wheel does not.
# Pythons come from PATH or pyenv (ci/find-python).
set -euo pipefail
cd "$(dirname "$0")/.."
log=build/abi3-ci; mkdir -p "$log"
py312=$(ci/find-python 3.12)
py313=$(ci/find-python 3.13)
t0=$(date +%s)
tools="llama-completion;llama-batched-bench;llama-speculative-simple;llama-server"
whl=$(ci/build-wheel cpu --python "$py312" --out "$log/dist" -- -Ccmake.define.LAMINA_EXTRA_TOOLS="$tools" \
      2> "$log/build.log") || { tail -40 "$log/build.log"; exit 1; }
name=$(basename "$whl")
echo "abi3: $name, $(du -k "$whl" | cut -f1) KiB, built in $(( $(date +%s) - t0 )) s"
case "$name" in
  lamina-*-cp312-abi3-manylinux*_x86_64.whl|lamina-*-cp312-abi3-manylinux*_aarch64.whl) ;;
  *) echo "abi3: expected a cp312-abi3 manylinux wheel, got $name" >&2; exit 1 ;;
esac

# the symbols the module takes from libpython, against the stable ABI manifest of 3.12
venv=$(mktemp -d)
"$py312" -m venv "$venv/audit"
"$venv/audit/bin/pip" install -q abi3audit
"$venv/audit/bin/abi3audit" --strict --summary --report --output "$log/abi3audit.json" "$whl"

# no compiler involved: binaries only for lamina and what it pulls in
for py in "$py312" "$py313"; do
  PIP_ONLY_BINARY=:all: ci/smoke-wheel --python "$py" "$whl"
done

# the whole suite, from the source tree's tests/, against the installed wheel (the repository root
# holds no importable lamina: python/lamina is not on the path)
"$py313" -m venv "$venv/suite"
"$venv/suite/bin/pip" install -q "$whl[test]"
t1=$(date +%s)
LAMINA_REQUIRE_MODEL=1 LAMINA_REQUIRE_TOOLS=1 LAMINA_REQUIRE_PORTABLE=1 \
  "$venv/suite/bin/python" -m pytest -ra -p no:cacheprovider
# from the repository root, as pytest ran, `import lamina` finds the wheel (not python/lamina)
where=$("$venv/suite/bin/python" -c "import lamina, lamina._native as n; print(n.__file__)")
case "$where" in "$venv"/*) ;; *) echo "abi3: lamina resolves to $where here, not to the wheel" >&2; exit 1 ;; esac
echo "abi3: the suite on $("$venv/suite/bin/python" -V) against $name took $(( $(date +%s) - t1 )) s"
rm -rf "$venv"
