"""Settings from model.yml < LAMINA_* environment < arguments, each with its source; a stale
n_gpu_layers with the GPU off is inert and reported as such."""
from __future__ import annotations

from pathlib import Path

import pytest

import lamina


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "model.yml"
    p.write_text(text)
    return p


def test_precedence_and_sources(tmp_path: Path, tiny_path: Path) -> None:
    yml = write(tmp_path, f"model: {tiny_path}\nngl: 12\nctx_len: 1024\ncpu_threads: 1\ncache_type: q8_0\n"
                          "engine: llama-cpp\nfrobnicate: 3\n")
    cfg = lamina.load_config(yml, env={})
    assert cfg["n_gpu_layers"] == 12 and cfg.source("n_gpu_layers").startswith("model.yml")
    assert (cfg["n_ctx"], cfg["threads"], cfg["type_k"], cfg["type_v"]) == (1024, 1, "q8_0", "q8_0")
    assert cfg["n_batch"] == 2048 and cfg.source("n_batch") == "default"
    assert cfg.ignored == ["engine"] and cfg.unknown == ["frobnicate"]
    env = lamina.load_config(yml, env={"LAMINA_N_GPU_LAYERS": "3", "LAMINA_GPU": "0"})
    assert env["n_gpu_layers"] == 3 and env.source("n_gpu_layers") == "env LAMINA_N_GPU_LAYERS"
    arg = lamina.load_config(yml, env={"LAMINA_N_GPU_LAYERS": "3"}, n_gpu_layers="all")
    assert arg["n_gpu_layers"] == "all" and arg.source("n_gpu_layers") == "argument"
    text = str(env)
    assert "inert" in text and "frobnicate" in text and "LAMINA_GPU" in text
    with pytest.raises(ValueError, match="unknown keys"):
        lamina.load_config(yml, env={}, strict=True)


def test_stale_ngl_with_gpu_off_is_inert_and_says_where_it_came_from(tmp_path: Path, tiny_path: Path) -> None:
    yml = write(tmp_path, f"files: [{tiny_path.name}]\nngl: 99\ngpu: false\n")
    (tmp_path / tiny_path.name).write_bytes(tiny_path.read_bytes())  # a path relative to the model.yml
    with pytest.warns(lamina.InertSettingWarning, match="n_gpu_layers=99 is inert: gpu=False"):
        model = lamina.Model.from_config(lamina.load_config(yml, env={}))
    off = model.offload
    assert off.gpu is False and off.layers_effective == 0 and off.devices == []
    assert any("n_gpu_layers=99" in r and "model.yml" in r and "inert" in r for r in off.reasons), off.reasons
    with model.context() as ctx:
        mem = ctx.kv.memory()
        assert all(m["host"] for m in mem if m["model"] or m["context"] or m["compute"])
        assert ctx.n_ctx == 4096 and ctx.threads_config == lamina.load_config(yml, env={}).threads()


@pytest.mark.parametrize("text, match", [
    ("ngl: lots\n", "n_gpu_layers .*model.yml"),
    ("gpu: maybe\n", "gpu .*expected a boolean"),
    ("cache_type: q3\n", "type_k .*expected one of"),
    ("- a\n- b\n", "expected a mapping"),
    ("ngl: [\n", "not valid YAML"),
])
def test_bad_config_values_name_the_key_and_file(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lamina.load_config(write(tmp_path, text), env={})


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ValueError, match="LAMINA_THREADS"):
        lamina.load_config(env={"LAMINA_THREADS": "many"})
    with pytest.raises(TypeError, match="unknown setting"):
        lamina.load_config(env={}, ngll=3)


def test_cli_config_prints_sources(tmp_path: Path, tiny_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lamina.cli import main

    yml = write(tmp_path, f"model: {tiny_path}\nngl: 7\ngpu: false\n")
    assert main(["config", str(yml)]) == 0
    out = capsys.readouterr().out
    assert "n_gpu_layers" in out and "model.yml" in out and "inert" in out


def test_an_explicit_context_argument_wins_even_when_it_equals_the_default(tmp_path: Path, tiny_path: Path) -> None:
    yml = write(tmp_path, f"model: {tiny_path}\nn_batch: 512\nn_ubatch: 128\n")
    model = lamina.Model.from_config(lamina.load_config(yml, env={}))
    with model.context(n_ctx=256) as ctx:  # nothing given: the file's values
        assert (ctx.params["n_batch"], ctx.params["n_ubatch"]) == (256, 128)  # n_batch is capped at n_ctx
    with model.context(n_ctx=4096) as ctx:
        assert (ctx.params["n_batch"], ctx.params["n_ubatch"]) == (512, 128)
    with model.context(n_ctx=4096, n_batch=2048, n_ubatch=512) as ctx:  # Context's defaults, given explicitly
        assert (ctx.params["n_batch"], ctx.params["n_ubatch"]) == (2048, 512)
