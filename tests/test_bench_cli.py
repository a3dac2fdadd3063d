"""`lamina bench`: -t and -ngl sweeps, and --plot (a PNG of t/s against threads or layers)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lamina
from lamina import bench, cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHORT = ("-p", "8", "-n", "4", "-r", "1")  # a few milliseconds of measuring on the tiny model


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lamina", "bench", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def no_gpu() -> bool:
    return not any(d.kind in ("gpu", "igpu") for d in lamina.devices(memory=False))


@pytest.mark.timeout(120)
def test_bench_plot_renders_a_png_of_a_thread_sweep(tiny_path: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "sweep.png"
    out = run_cli("-m", str(tiny_path), *SHORT, "-t", "1,2", "--plot", str(png))
    assert out.returncode == 0, out.stderr
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000  # axes, labels and two subplots, not an empty canvas
    assert "| 1 |" in out.stdout and "| 2 |" in out.stdout  # the table is still printed


@pytest.mark.timeout(120)
def test_bench_ngl_list_loads_each_value_and_says_the_layers_stayed_on_the_cpu(tiny_path: Path) -> None:
    if not no_gpu():
        pytest.skip("a GPU is present: the -ngl values would not be inert")
    out = run_cli("-m", str(tiny_path), *SHORT, "-t", "1", "-ngl", "0,2,all", "-o", "json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [(r["test"], r["n_gpu_layers"]) for r in rows] == [
        ("pp8", 0), ("pp8", 2), ("pp8", "all"), ("tg4", 0), ("tg4", 2), ("tg4", "all")]
    assert all(r["layers_offloaded"] == 0 and r["devices"] == [] and r["lamina_median_ts"] > 0 for r in rows)
    for ngl in ("2", "'all'"):  # each load warns that its value is inert
        assert re.search(rf"InertSettingWarning: n_gpu_layers={re.escape(ngl)}[ :(].*inert", out.stderr), out.stderr
    md = run_cli("-m", str(tiny_path), *SHORT, "-t", "1", "-ngl", "0,all")
    assert md.returncode == 0, md.stderr
    assert "| 0 (CPU only) |" in md.stdout and "| all (inert: CPU only) |" in md.stdout
    assert "every layer stayed on the CPU" in md.stdout


def test_plot_without_matplotlib_fails_before_measuring(tiny_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError

    def measured(*_: object, **__: object) -> None:
        raise AssertionError("the model was loaded before the plot's requirement was checked")

    monkeypatch.setattr(cli, "load_model", measured)
    monkeypatch.setattr(bench, "run", measured)
    rc = cli.main(["bench", "-m", str(tiny_path), *SHORT, "--plot", str(tmp_path / "x.png")])
    assert rc == 1
    assert 'pip install "lamina[plot]"' in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("flag, value", [("-ngl", "3,x"), ("-ngl", "-1"), ("-ngl", "2,,4"), ("-t", "1,x"),
                                         ("-t", "0")])
def test_bad_sweep_list_is_a_usage_error(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and repr(value) in err and "Traceback" not in err


# -- a real offload: ggml-rpc-server on 127.0.0.1 (conftest's rpc_endpoint) is the device --------
@pytest.mark.timeout(180)
def test_bench_ngl_sweep_over_rpc_offloads_per_value(tiny_path: Path, rpc_endpoint: str) -> None:
    env = dict(os.environ, LAMINA_RPC=rpc_endpoint)
    out = run_cli("-m", str(tiny_path), *SHORT, "-t", "1", "-ngl", "0,all", "-o", "json", env=env)
    assert out.returncode == 0, out.stderr
    rows = {(r["test"], r["n_gpu_layers"]): r for r in json.loads(out.stdout)}
    assert rows[("tg4", 0)]["layers_offloaded"] == 0
    assert rows[("tg4", "all")]["layers_offloaded"] == 3  # 2 blocks + the output layer
    assert any(d.startswith("RPC") for d in rows[("tg4", "all")]["devices"])
