"""system_info / devices: what was built, what is loaded, what the machine has."""
from __future__ import annotations

import os

import pytest
import subprocess
import sys
from pathlib import Path

import lamina
from lamina import system
import requires


def test_system_info_lists_backends_and_cpu_features() -> None:
    info = lamina.system_info()
    names = [b["name"] for b in info.backends]
    assert "CPU" in names
    assert info.llama_cpp["version"] and info.llama_cpp["commit"]
    if info.llama_cpp["source"] == "pin":
        assert info.llama_cpp["commit"] == "0c1e570"
    assert info.cpu_features_compiled, "the CPU backend reports the ISA it was compiled for"
    text = str(info)
    assert "backends:" in text and "cpu features present" in text


def test_devices_include_the_cpu() -> None:
    devs = lamina.devices()
    cpu = [d for d in devs if d.kind == "cpu"]
    assert cpu and cpu[0].memory_total > 0


def test_default_threads_are_physical_cores_in_affinity() -> None:
    cpus = system.allowed_cpus()
    assert cpus == sorted(os.sched_getaffinity(0))
    assert 1 <= lamina.default_threads() <= len(cpus)
    assert system.physical_cores(cpus) <= len(cpus)
    # one allowed CPU means one thread, whatever the machine has
    code = "import os, lamina; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); print(lamina.default_threads())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


def test_cpu_list_parsing() -> None:
    assert system._parse_cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}


def test_import_prints_nothing_and_cli_doctor_runs() -> None:
    out = subprocess.run([sys.executable, "-c", "import lamina"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""
    out = subprocess.run([sys.executable, "-m", "lamina", "doctor"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "backends:" in out.stdout


def test_tools_from_the_same_source_ship_with_the_package() -> None:
    requires.tool("llama-bench")  # built with -DLAMINA_BUILD_TOOLS=OFF, or a development tree
    out = lamina.tools.run("llama-bench", ["--help"], capture_output=True, timeout=60)
    assert out.returncode == 0 and "usage" in out.stdout.lower()
    # and it runs on the backends lamina has (a portable build's live outside bin/): the CPU at least
    out = lamina.tools.run("llama-bench", ["--list-devices"], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    names = {d.name for d in lamina.devices(memory=False) if d.kind in ("gpu", "igpu")}
    assert all(n in out.stdout for n in names), (names, out.stdout)


def test_installed_package_is_self_contained() -> None:
    """The module finds llama.cpp's libraries next to itself ($ORIGIN), without LD_LIBRARY_PATH."""
    from lamina import _native

    pkg = Path(_native.__file__).resolve().parent
    libs = {p.name for p in pkg.glob("*.so")}
    assert {"libllama.so", "libggml.so", "libggml-base.so"} <= libs, libs
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    out = subprocess.run([sys.executable, "-c", "import lamina; print(len(lamina.devices()))"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr


def test_llama_cpp_log_reaches_the_lamina_logger(tiny_path: Path, caplog: "pytest.LogCaptureFixture") -> None:
    import logging

    with caplog.at_level(logging.DEBUG, logger="lamina"):
        lamina.Model(tiny_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "lamina"]
    assert any("llama_model_loader" in l or "load_tensors" in l for l in lines), lines[:5]


def test_a_log_handler_may_use_the_context_whose_call_logged(tiny_model: lamina.Model) -> None:
    # llama.cpp logs inside lamina's calls (set_sampler at DEBUG when backend sampling attaches). The
    # handler ran right there, inside llama.cpp and the call's lease: the same context raised BusyError.
    # Lines now wait in a queue until the thread is outside every lease.
    import logging

    seen: list[int] = []
    errors: list[Exception] = []
    ctx = tiny_model.context(n_ctx=128)

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "set_sampler" in record.getMessage():
                try:
                    seen.append(ctx.n_past)
                except lamina.LaminaError as e:
                    errors.append(e)

    log = logging.getLogger("lamina")
    handler, level = Handler(), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    lamina._core.sync_log_level()
    try:
        "".join(ctx.generate([1, 5, 6, 7], max_tokens=4, ignore_eos=True, backend_sampling=True))
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        lamina._core.sync_log_level()
    assert seen and not errors, errors


def test_failed_load_explains_why(tiny_path: Path, tmp_path: Path) -> None:
    # a well-formed file llama.cpp cannot load (the validator passes it): llama.cpp's reason is kept
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ci"))
    from fuzz import STR, kv_bytes, layout, relayout

    lay = layout(tiny_path)
    pairs = dict(lay.pairs)
    pairs["general.architecture"] = kv_bytes("general.architecture", STR, "nosucharch")
    p = tmp_path / "unknown-arch.gguf"
    p.write_bytes(relayout(tiny_path.read_bytes(), lay, list(pairs.values())))
    with pytest.raises(lamina.LoadError) as err:
        lamina.Model(p)
    assert not isinstance(err.value, lamina.ModelFormatError)
    assert "failed to load model" in str(err.value) and "nosucharch" in str(err.value), str(err.value)


def test_a_forced_lower_cpu_variant_runs_and_an_unusable_one_is_refused(tiny_path: Path) -> None:
    requires.portable()  # a portable build ships the CPU variants
    # every variant this CPU can run gives the same tokens; one it cannot (or that does not exist)
    # is refused with a warning and the best variant is used: never an illegal instruction
    code = f"""
import warnings, lamina
with lamina.Model({str(tiny_path)!r}, gpu=False) as m, m.context(n_ctx=64) as c:
    print(lamina.system_info().cpu_variant, list(c.complete([1, 5, 6], max_tokens=4, ignore_eos=True).tokens))
"""
    runs = {}
    for variant in ("", "sse42", "x64", "nosuch"):
        env = dict(os.environ, LAMINA_CPU_VARIANT=variant)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        runs[variant] = (out.stdout.strip(), out.stderr)
    best = runs[""][0]
    assert "variant sse42" in runs["sse42"][0] and "variant x64" in runs["x64"][0]
    tokens = {v: r[0].split(" [", 1)[1] for v, r in runs.items()}
    assert len(set(tokens.values())) == 1, runs
    assert runs["nosuch"][0] == best and "LAMINA_CPU_VARIANT=nosuch" in runs["nosuch"][1]
