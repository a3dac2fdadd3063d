#!/usr/bin/env bash
# The oldest Python lamina claims (requires-python in pyproject.toml): a source build with it, as a
# user's `pip install ".[test]"` does it (a version-specific module: no stable ABI below 3.12),
# installed into a fresh venv, and the fast tests (not `model`, not `slow`) run against it.
# CMAKE_ARGS of the caller (CI's test build) apply, so llama.cpp comes from ccache.
set -euo pipefail
cd "$(dirname "$0")/.."
oldest=$(sed -n 's/^requires-python = ">=\([0-9.]*\)"/\1/p' pyproject.toml)
[ -n "$oldest" ] || { echo "oldest-python: no requires-python = \">=X.Y\" in pyproject.toml" >&2; exit 1; }
py=$(ci/find-python "$oldest")
venv=$(mktemp -d)/venv
"$py" -m venv "$venv"
t0=$(date +%s)
mkdir -p build
"$venv/bin/pip" install -q ".[test]" > build/oldest-python.log 2>&1 || { tail -40 build/oldest-python.log; exit 1; }
echo "oldest-python: $("$venv/bin/python" -V): built and installed in $(( $(date +%s) - t0 )) s"
t1=$(date +%s)
"$venv/bin/python" -m pytest -ra -p no:cacheprovider -m "not model and not slow"
# from the repository root, as pytest ran, `import lamina` finds the venv's build (not python/lamina)
where=$("$venv/bin/python" -c "import lamina._native as n; print(n.__file__)")
case "$where" in "$(dirname "$venv")"/*) ;; *) echo "oldest-python: lamina resolves to $where here" >&2; exit 1 ;; esac
echo "oldest-python: fast tests on $("$venv/bin/python" -V) took $(( $(date +%s) - t1 )) s"
rm -rf "$(dirname "$venv")"
