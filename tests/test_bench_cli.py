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
from lamina import cli
from lamina.cli import bench
import requires

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


@pytest.mark.parametrize("flag, value", [("-ngl", "3,x"), ("-ngl", "-2"), ("-ngl", "2,,4"), ("-t", "1,x"),
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


# -- --parallel (llama-batched-bench) and --draft (llama-speculative-simple) -------------------
from lamina.cli import bench_batch  # noqa: E402

PARALLEL = ("-npp", "8", "-ntg", "4", "-t", "1")  # a few milliseconds per level on the tiny model
SPEC_PROMPT = "the city of the world is the capital of the country " * 4  # repeats: n-grams find drafts


def test_lamina_parallel_times_one_prompt_step_and_ntg_generation_steps(tiny_model: lamina.Model) -> None:
    # lamina_parallel raises when the engine's counters are not pl*npp prompt tokens and pl*ntg
    # generation tokens: every prompt in the first step, then ntg steps of one token per sequence
    n_ctx, samples = bench_batch.lamina_parallel(tiny_model, 3, 8, 5, 1, 2)
    assert n_ctx >= 3 * (8 + 5)
    assert len(samples) == 2 and all(pp > 0 and tg > 0 and step >= after >= 0 and 0 <= reused <= 1
                                        for pp, tg, step, after, reused in samples)


@pytest.mark.timeout(180)
def test_bench_parallel_against_llama_batched_bench(tiny_path: Path) -> None:
    requires.tool("llama-batched-bench")
    out = run_cli("-m", str(tiny_path), "--parallel", "1,3", *PARALLEL, "-r", "1", "--rounds", "2", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["pl"] for r in rows] == [1, 3]
    for r in rows:
        for side in ("lamina_pp", "llama_pp", "lamina_tg", "llama_tg"):
            assert len(r[f"{side}_samples_ts"]) == 2 and r[f"{side}_median_ts"] > 0, (side, r)
        assert r["pp_ratio"] > 0 and r["tg_ratio"] > 0 and r["tg_paired_ratio_median"] > 0
        # the same context on both sides: n_seq_max = pl, pl * (npp + ntg) cells as llama.cpp pads them
        assert r["n_ctx"] == r["n_kv_max"] >= r["pl"] * 12 and r["n_batch"] == r["pl"] * 8
    md = run_cli("-m", str(tiny_path), "--parallel", "2", *PARALLEL, "-r", "2")
    assert md.returncode == 0, md.stderr
    lines = md.stdout.splitlines()
    assert lines[0].startswith("| model | threads | pl | n_ctx | lamina pp t/s | llama pp t/s | pp ratio |")
    assert len([ln for ln in lines if re.match(r"\| .* \| 1 \| 2 \| \d+ \|", ln)]) == 1, md.stdout


def test_parse_batched_bench_reads_jsonl_and_refuses_rows_without_speeds() -> None:
    text = ('main: n_kv_max = 1024\n{"n_kv_max": 1024, "pp": 32, "tg": 16, "pl": 4, "t_pp": 0.17, '
            '"speed_pp": 716.7, "t_tg": 0.49, "speed_tg": 129.7}\n')
    assert bench_batch.parse_batched_bench(text)[0]["speed_tg"] == 129.7
    with pytest.raises(ValueError, match="speed_tg"):
        bench_batch.parse_batched_bench('{"n_kv_max": 1, "pp": 1, "tg": 1, "pl": 1, "speed_pp": 1.0}')


def test_parse_speculative_reads_the_summary_and_refuses_a_log_without_it() -> None:
    log = ("0.05.5 I encoded  301 tokens in    1.108 seconds, speed:  271.673 t/s\n"
           "0.05.5 I decoded   81 tokens in    2.686 seconds, speed:   30.155 t/s\n"
           "0.05.5 I n_draft   = 16\n0.05.5 I n_predict = 81\n0.05.5 I n_drafted = 76\n"
           "0.05.5 I n_accept  = 70\n0.05.5 I accept    = 92.105%\n")
    s = bench_batch.parse_speculative(log)
    assert (s["n_prompt"], s["n_predict"], s["n_drafted"], s["n_accept"]) == (301, 81, 76, 70)
    assert s["tg_ts"] == 30.155  # the printed speed (its seconds are rounded to ms)
    with pytest.raises(ValueError, match="decoded"):
        bench_batch.parse_speculative(log.replace("decoded", "done"))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("drafter", ["ngram", "self"])
def test_llama_speculative_simple_runs_with_lamina_settings(tiny_model: lamina.Model, drafter: str) -> None:
    requires.tool("llama-speculative-simple")
    n_prompt = len(tiny_model.tokenize(SPEC_PROMPT))
    draft = tiny_model if drafter == "self" else None
    s = bench_batch.run_speculative(tiny_model, draft, SPEC_PROMPT, 24, 1,
                                    n_ctx=bench_batch.spec_n_ctx(n_prompt, 24, 8), n_batch=512, n_ubatch=512,
                                    n_max=8, p_min=0.0, ngram_n=2)
    assert s["n_prompt"] == n_prompt  # the same tokens as lamina's tokenizer gives
    assert s["n_predict"] > 24 and s["tg_ts"] > 0
    if drafter == "self":  # the target drafting for itself: greedy drafts it then accepts
        assert s["n_drafted"] > 0 and s["n_accept"] >= 0.8 * s["n_drafted"], s


@pytest.mark.timeout(240)
def test_bench_draft_against_llama_speculative_simple(tiny_path: Path) -> None:
    requires.tool("llama-speculative-simple")
    # on the CPU: a GPU's batched and one-token kernels round a random model's near-ties apart, so
    # even a self-draft is rejected there (4% on the H200); the CPU's f32 kernels agree
    out = run_cli("-m", str(tiny_path), "--no-gpu", "--draft", str(tiny_path), "--prompt", SPEC_PROMPT, "-n", "24",
                  "-t", "1", "--draft-max", "8", "--draft-p-min", "0", "-r", "1", "--rounds", "2", "--json")
    assert out.returncode == 0, out.stderr
    [row] = json.loads(out.stdout)
    assert row["draft"] == tiny_path.name and row["n_prompt"] == row["llama_n_prompt"]
    for side in ("lamina_plain", "lamina_spec", "llama_spec"):
        assert len(row[f"{side}_samples_ts"]) == 2 and row[f"{side}_median_ts"] > 0, (side, row)
    assert row["speedup"] > 0 and row["ratio"] > 0 and row["paired_ratio_median"] > 0
    # the target drafting for itself, p_min 0: drafts every step, and greedy accepts them
    assert row["lamina_n_drafted"] > 0 and row["lamina_acceptance"] >= 0.8, row
    assert row["llama_n_drafted"] > 0 and row["llama_acceptance"] >= 0.8, row
    md = run_cli("-m", str(tiny_path), "--draft", "ngram", "--ngram-n", "2", "--prompt", SPEC_PROMPT, "-n", "24",
                 "-t", "1", "-r", "1")
    assert md.returncode == 0, md.stderr
    assert md.stdout.startswith("| model | draft | threads | lamina plain t/s | lamina spec t/s | speedup |")
    row = re.search(r"\| ngram \| 1 \| [\d.]+ ± [\d.]+ \| [\d.]+ ± [\d.]+ \| [\d.]+x \| ([\d.]+)% \|"
                    r" [\d.]+ ± [\d.]+ \| ([\d.]+)% \| [\d.]+ \|", md.stdout)
    assert row, md.stdout


@pytest.mark.parametrize("args", [["--parallel", "0"], ["--parallel", "1,x"], ["--parallel", "1", "-npp", "0"],
                                  ["--draft-p-min", "1.5"], ["--parallel", "1", "--draft", "ngram"],
                                  ["--parallel", "1", "--plot", "x.png"], ["--draft", "ngram", "--compare"],
                                  ["--draft", "/nonexistent/draft.gguf"], ["--draft", "ngram", "-n", "0"]])
def test_bad_parallel_or_draft_arguments_are_usage_errors(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err


@pytest.mark.model
@pytest.mark.timeout(300)
def test_bench_parallel_on_the_real_model(real_path: Path) -> None:
    requires.tool("llama-batched-bench")
    out = run_cli("-m", str(real_path), "--parallel", "1,2", "-npp", "16", "-ntg", "8", "-t", "2", "-r", "1", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["pl"] for r in rows] == [1, 2]
    assert all(r["n_ctx"] == r["n_kv_max"] and r["pp_ratio"] > 0 and r["tg_ratio"] > 0 for r in rows)
