"""The package's shape: every module imports on its own, at top level, with no import cycle
(value types live in the leaf module lamina.params, so the YAML loader does not need the runtime
and no module imports another lazily to dodge a cycle); native objects take one named parameter
struct each, never positional tuples, and the defaults live once, in those structs."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lamina

PACKAGE = Path(lamina.__file__).parent


def module_name(path: Path) -> str:
    """"config" for lamina/config.py, "cli" for lamina/cli/__init__.py, "cli.bench" for lamina/cli/bench.py."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if p.stem != "__main__" and p != PACKAGE / "__init__.py"}
MODULES = sorted(FILES)


def lamina_imports(path: Path) -> tuple[set[str], list[str]]:
    """(modules of lamina imported at run time at top level, imports of lamina inside functions)."""
    tree = ast.parse(path.read_text())
    top: set[str] = set()
    nested: list[str] = []
    package = list(path.relative_to(PACKAGE).parts[:-1])  # the package a relative import starts from

    def names(node: ast.ImportFrom) -> set[str]:
        if node.level == 0:
            return set()
        base = package[:len(package) - (node.level - 1)]
        if node.module:
            return {".".join(base + [node.module.split(".")[0]])}
        return {".".join(base + [a.name]) for a in node.names}

    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            top |= names(node)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue  # annotations only: not a run-time import
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and names(inner):
                    nested.append(f"{path.name}:{inner.lineno} {ast.unparse(inner)}")
    return top - {"_native"}, nested


def test_no_module_imports_lamina_inside_a_function() -> None:
    nested = [n for m in MODULES for n in lamina_imports(FILES[m])[1]]
    assert not nested, nested


def test_the_import_graph_has_no_cycle() -> None:
    graph = {m: lamina_imports(FILES[m])[0] & set(MODULES) for m in MODULES}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for dep in sorted(graph[m]):
            visit(dep, path + [m])
        state[m] = 2

    for m in MODULES:
        visit(m, [])
    assert graph["params"] <= {"errors"}, graph["params"]  # the leaf
    assert "context" not in graph["config"] and "model" not in graph["config"]
    # the top level is the API; the command line (lamina.cli) is one of its clients, never a dependency
    api_needs_cli = {m: sorted(d for d in graph[m] if d.split(".")[0] == "cli") for m in MODULES if not m.startswith("cli")}
    assert not any(api_needs_cli.values()), api_needs_cli


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_on_its_own(module: str) -> None:
    r = subprocess.run([sys.executable, "-c", f"import lamina.{module}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("cls, params", [("Model", "Placement"), ("Context", "ContextParams"),
                                         ("Sampler", "SamplerParams")])
def test_native_objects_take_named_parameter_structs(cls: str, params: str) -> None:
    init = getattr(lamina._native, cls).__init__.__doc__ or ""
    signature = next(line for line in init.splitlines() if line.startswith("__init__("))
    assert params in signature and "tuple[" not in signature, signature
    assert "PoolParams" in signature or cls != "Context", signature


def test_defaults_live_once_in_the_native_structs() -> None:
    native = lamina._native.SamplerParams()
    for name, value in vars(lamina.Sampler()).items():
        if name in ("logit_bias", "grammar", "json_schema"):
            continue
        expect = getattr(native, name)
        expect = tuple(expect) if isinstance(expect, list) else expect
        assert value == pytest.approx(expect) if isinstance(value, float) else value == expect, name
    ctx = lamina._native.ContextParams()
    assert {k: lamina.Context.DEFAULTS[k] for k in ("n_batch", "n_ubatch", "n_seq_max")} == \
        {"n_batch": ctx.n_batch, "n_ubatch": ctx.n_ubatch, "n_seq_max": ctx.n_seq_max}


def test_the_llama_cpp_log_lines_lamina_reads_are_still_there(tiny_path: Path) -> None:
    """llama.cpp has no API for where each layer went: lamina reads its "layer N assigned to
    device X" lines (cpp/logging.cpp, the one file that parses llama.cpp's log). A llama.cpp bump
    that changes the text fails here, loudly, instead of reporting no layers anywhere. (The
    "failed to allocate DEV buffer of size N" line is checked, device and bytes, by
    test_offload_rpc.py's out-of-memory test.)"""
    with lamina.Model(tiny_path, gpu=False) as model:
        layers = model.native.layer_devices()
        assert sorted(i for i, _ in layers) == list(range(model.info.n_layer + 1)), (
            f"llama.cpp's 'layer N assigned to device X' log lines changed: cpp/logging.cpp read {layers}")
        assert {d for _, d in layers} == {"CPU"}


def test_the_context_padding_lamina_assumes_is_llama_cpps(tiny_path: Path) -> None:
    """cpp/fit.cpp sizes a layer's KV tensor before any context exists (a device that cannot
    use it would make llama.cpp abort), assuming llama.cpp pads n_ctx to 256 cells."""
    with lamina.Model(tiny_path, gpu=False) as model:
        for asked, padded in ((1, 256), (300, 512), (512, 512)):
            with model.context(n_ctx=asked) as ctx:
                assert ctx.n_ctx == padded, "llama.cpp pads the context differently now: update kv_cell_pad in cpp/fit.cpp"
