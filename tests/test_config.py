"""Settings from model.yml < LAMINA_* environment < arguments, each with its source (path:line);
inert settings warned once, unknown keys with a suggestion, errors with a position."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import lamina
from lamina.config import SETTINGS, Config


def write(tmp_path: Path, text: str, name: str = "model.yml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def quiet_load(path: Path | None, **kw: Any) -> Config:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lamina.load_config(path, **kw)


def test_each_layer_overrides_the_one_below_and_says_where_from(tmp_path: Path, tiny_path: Path) -> None:
    yml = write(tmp_path, f"model: {tiny_path}\nctx_len: 1024\ncpu_threads: 1\ncache_type: q8_0\n"
                          "engine: llama-cpp\nbatch_size: 256\n")
    cfg = quiet_load(yml, env={})
    assert (cfg["n_ctx"], cfg["threads"], cfg["type_k"], cfg["type_v"], cfg["n_batch"]) == (1024, 1, "q8_0", "q8_0", 256)
    assert cfg.source("n_ctx") == f"{yml}:2" and cfg.source("n_batch") == f"{yml}:6"
    assert cfg["n_ubatch"] == 512 and cfg.source("n_ubatch") == "default"
    assert cfg.ignored == ["engine"]
    env = quiet_load(yml, env={"LAMINA_N_CTX": "2048", "LAMINA_N_UBATCH": "64"})
    assert (env["n_ctx"], env.source("n_ctx"), env["n_ubatch"]) == (2048, "env LAMINA_N_CTX", 64)
    assert env.source("threads") == f"{yml}:3"  # the file's values the environment leaves alone stay
    arg = quiet_load(yml, env={"LAMINA_N_CTX": "2048"}, n_ctx=512)
    assert (arg["n_ctx"], arg.source("n_ctx")) == (512, "argument")
    text = env.explain()
    assert f"{yml}:2" not in text.split("n_ctx")[1].splitlines()[0]  # n_ctx comes from the environment now
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("threads "))
    assert line.split()[1] == "1" and line.rstrip().endswith(f"{yml}:3"), line
    assert "env LAMINA_N_UBATCH" in text and "temperature" in text and "default" in text


def test_jan_style_file_with_ngl_and_the_gpu_off_warns_once_and_puts_nothing_on_a_device(tmp_path: Path,
                                                                                         tiny_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.gguf").write_bytes(tiny_path.read_bytes())
    yml = write(tmp_path, "id: tiny\nname: Tiny\nengine: llama-cpp\nversion: 1\nfiles:\n  - models/tiny.gguf\n"
                          "ngl: 33\nctx_len: 512\ncpu_threads: 1\nprompt_template: '{prompt}'\ntemperature: 0.7\n"
                          "top_p: 0.9\nstop: ['</s>']\nmax_tokens: 8\nstream: true\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = lamina.load_config(yml, env={"LAMINA_GPU": "0"})
        model = lamina.Model.from_config(cfg)
        with model.context() as ctx:
            mem = ctx.kv.memory()
            text = "".join(ctx.generate("Hello", **cfg.generate_kwargs()))
    inert = [w for w in caught if issubclass(w.category, lamina.InertSettingWarning)]
    assert len(inert) == 1, [str(w.message) for w in caught]
    assert "n_gpu_layers=33" in str(inert[0].message) and f"{yml}:7" in str(inert[0].message)
    assert "LAMINA_GPU" in str(inert[0].message)
    assert not [w for w in caught if issubclass(w.category, lamina.ConfigWarning)]
    off = model.offload
    assert off.gpu is False and off.layers_effective == 0 and off.devices == [] and off.per_device == []
    assert all(m["host"] for m in mem if m["model"] or m["context"] or m["compute"]), mem
    assert any("n_gpu_layers=33" in r for r in off.reasons) and cfg.inert == [str(inert[0].message)]
    assert "inert" in cfg.explain() and isinstance(text, str)


def test_an_unknown_key_names_its_line_with_a_suggestion_and_strict_makes_it_an_error(tmp_path: Path) -> None:
    yml = write(tmp_path, "ctx_len: 512\ntemprature: 0.5\nngll: 3\nmmproj: x.gguf\n")
    with pytest.warns(lamina.ConfigWarning) as caught:
        cfg = lamina.load_config(yml, env={})
    messages = [str(w.message) for w in caught]
    assert f"{yml}:2: unknown key 'temprature' (did you mean 'temperature'?)" in messages
    assert f"{yml}:3: unknown key 'ngll' (did you mean 'ngl'?)" in messages
    assert any(f"{yml}:4: mmproj" in m and "not supported" in m for m in messages)
    assert len(cfg.unknown) == 2 and cfg["temperature"] == 0.8  # the misspelt key changed nothing
    with pytest.raises(ValueError, match=r"model.yml:2: unknown key 'temprature' \(did you mean 'temperature'\?\)"):
        lamina.load_config(yml, env={}, strict=True)


@pytest.mark.parametrize("text, match", [
    ("ctx_len: 512\nngl: lots\n", r"model.yml:2: n_gpu_layers: expected an int"),
    ("gpu: maybe\n", r"model.yml:1: gpu: expected a boolean"),
    ("cache_type: q3\n", r"model.yml:1: type_k: expected one of"),
    ("\n\ntop_p: 1.5\n", r"model.yml:3: top_p: expected a probability in \[0.0, 1.0\]"),
    ("cpu_threads: -5\n", r"model.yml:1: threads: expected a thread count"),
    ("mirostat: 3\n", r"model.yml:1: mirostat: expected 0 \(off\), 1 or 2"),
    ("ngl: 1\0\n", r"model.yml: not valid YAML: .*#x0000"),
    ("ngl: 3\nn_gpu_layers: 4\n", r"model.yml:2: n_gpu_layers sets n_gpu_layers, which ngl on line 1 sets already"),
    ("override_tensor: 'ffn_(=CPU'\n", r"model.yml:1: tensor_overrides: 'ffn_\(' is not a regular expression"),
    ("logit_bias: {x: 1}\n", r"model.yml:1: logit_bias: expected \{token: bias\}"),
    ("seed: -5\n", r"model.yml:1: seed: expected -1"),
    ("ctx_len: [1, 2]\n", r"model.yml:1: n_ctx: expected an integer"),
    ("- a\n- b\n", r"model.yml:1: expected a mapping of settings"),
    ("ngl: 3\nctx_len: [\n", r"model.yml:3:1: not valid YAML"),
    ("a: 1\n  b: 2\n", r"model.yml:2:4: not valid YAML"),
    ("ngl: 3\nngl: 4\n", r"model.yml:2: ngl sets n_gpu_layers, which ngl on line 1 sets already"),
    ("grammar: 'root ::= \"a\"'\njson_schema: {type: integer}\n", "give one of grammar"),
])
def test_bad_values_and_malformed_yaml_give_the_position(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        quiet_load(write(tmp_path, text), env={})


def test_relative_paths_resolve_next_to_the_file_and_a_missing_one_names_its_line(tmp_path: Path,
                                                                                  tiny_path: Path) -> None:
    sub = tmp_path / "cfg"
    sub.mkdir()
    (sub / "m.gguf").write_bytes(tiny_path.read_bytes())
    (sub / "g.gbnf").write_text('root ::= "yes" | "no"\n')
    cfg = quiet_load(write(sub, "ctx_len: 64\nmodel: m.gguf\ngrammar_file: g.gbnf\n"), env={})
    assert cfg["model"] == str(sub / "m.gguf") and cfg.grammar() == 'root ::= "yes" | "no"\n'
    with pytest.raises(FileNotFoundError, match=r"model.yml:2: model: 'nope.gguf' does not exist \(looked in "):
        quiet_load(write(sub, "ctx_len: 64\nmodel: nope.gguf\n"), env={})


def test_environment_and_argument_errors_name_their_source() -> None:
    with pytest.raises(ValueError, match="threads \\(env LAMINA_THREADS\\): expected an integer"):
        lamina.load_config(env={"LAMINA_THREADS": "many"})
    with pytest.raises(ValueError, match="top_k \\(argument\\)"):
        lamina.load_config(env={}, top_k=-1)
    with pytest.raises(TypeError, match="unknown setting 'ngll' \\(did you mean 'n_gpu_layers'\\?\\)|unknown setting 'ngll'"):
        lamina.load_config(env={}, ngll=3)


def test_jan_llama_cpp_keys_map_to_lamina_settings(tmp_path: Path, tiny_path: Path) -> None:
    yml = write(tmp_path, f"model: {tiny_path}\nthreads_batch: 1\nbatch_size: 256\nubatch_size: 64\n"
                          "flash_attn: 'off'\nno_kv_offload: true\nno_mmap: true\nmlock: false\ncache_type_k: q8_0\n"
                          "cache_type_v: f16\nrope_freq_base: 20000\nrope_freq_scale: 0.5\nrope_scaling: linear\n"
                          "fit: off\nfit_target: 512\nfit_ctx: 2048\nsplit_mode: layer\ndevice: none\n"
                          "ctx_shift: true\nn_parallel: 2\nctx_len: 256\n")
    cfg = quiet_load(yml, env={})
    expect = {"threads_batch": 1, "n_batch": 256, "n_ubatch": 64, "flash_attn": False, "kv_offload": False,
              "use_mmap": False, "use_mlock": False, "type_k": "q8_0", "type_v": "f16", "rope_freq_base": 20000.0,
              "rope_freq_scale": 0.5, "rope_scaling": "linear", "fit": False, "fit_target": 512 * 2**20,
              "fit_ctx": 2048, "split_mode": "layer", "devices": [], "ctx_shift": True, "n_seq_max": 2}
    assert {k: cfg[k] for k in expect} == expect
    kw = cfg.model_kwargs()
    assert (kw["fit_margin"], kw["fit_ctx"], kw["use_mmap"], kw["gpu"]) == (512 * 2**20, 2048, False, True)
    model = lamina.Model.from_config(cfg)
    assert model.offload.gpu is False  # device: none
    with model.context() as ctx:
        p = ctx.params
        assert (p["n_batch"], p["n_ubatch"], p["n_seq_max"]) == (256, 64, 2)
        assert ctx.threads_config.batch == 1
    assert cfg.generate_kwargs()["context_full"] == "shift"


def test_rope_settings_reach_llama_cpp(tmp_path: Path, real_path: Path) -> None:
    logits = {}
    for base in ("", "rope_freq_base: 20000\n", "rope_freq_base: 1000000\n"):  # Gemma 3's own base is 1e6
        cfg = quiet_load(write(tmp_path, f"model: {real_path}\nctx_len: 128\n{base}"), env={})
        model = lamina.Model.from_config(cfg)
        with model.context() as ctx:
            ctx.decode(model.tokenize("The quick brown fox jumps over the lazy dog and then"))
            logits[base] = np.array(ctx.logits)
    other, same = logits["rope_freq_base: 20000\n"], logits["rope_freq_base: 1000000\n"]
    assert not np.allclose(other, logits[""]) and np.array_equal(same, logits[""])


def test_inert_settings_each_warn_once_and_are_explained(tmp_path: Path) -> None:
    n_cpus = len(os.sched_getaffinity(0))
    yml = write(tmp_path, f"cpu_threads: {n_cpus + 3}\nflash_attn: false\ncache_type_v: q8_0\nn_keep: 4\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = lamina.load_config(yml, env={})
    inert = sorted(str(w.message).split("=")[0] for w in caught if issubclass(w.category, lamina.InertSettingWarning))
    assert inert == ["n_keep", "threads", "type_v"], [str(w.message) for w in caught]
    assert cfg["type_v"] == "f16" and "inert" in cfg.source("type_v")  # the V cache stays f16
    assert [ln.split()[1].split("=")[0] for ln in cfg.explain().splitlines() if ln.startswith("  inert:")] == \
        ["threads", "type_v", "n_keep"]
    # a context-dependent one: ctx_shift on a model whose cache cannot shift
    cfg2 = quiet_load(write(tmp_path, "ctx_shift: true\n", "shift.yml"), env={})
    fake = SimpleNamespace(kv=SimpleNamespace(can_shift=False), model=SimpleNamespace(info=SimpleNamespace(arch="mamba")))
    with pytest.warns(lamina.InertSettingWarning, match="ctx_shift=True .* cannot shift"):
        cfg2.check_context(fake)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg2.check_context(fake)  # type: ignore[arg-type]  # once per load
    assert len(cfg2.inert) == 1


def test_sampling_keys_reach_the_sampler(tmp_path: Path, real_path: Path) -> None:
    yml = write(tmp_path, f"model: {real_path}\nctx_len: 512\ntemperature: 1.3\ntop_k: 20\ntop_p: 0.9\nmin_p: 0.02\n"
                          "repeat_penalty: 1.2\nrepeat_last_n: 32\nseed: 1234\nmax_tokens: 24\n"
                          "frequency_penalty: 0.1\n")
    cfg = quiet_load(yml, env={})
    smp = cfg.sampler()
    assert (smp.temperature, smp.top_k, smp.top_p, smp.min_p, smp.repeat_penalty, smp.penalty_last_n, smp.seed,
            smp.frequency_penalty) == (1.3, 20, 0.9, 0.02, 1.2, 32, 1234, 0.1)
    model = lamina.Model.from_config(cfg)
    prompt = "Once upon a time"
    with model.context() as ctx:
        from_file = ctx.complete(prompt, **cfg.generate_kwargs())
        by_hand = ctx.complete(prompt, max_tokens=24, sampler=lamina.Sampler(
            temperature=1.3, top_k=20, top_p=0.9, min_p=0.02, repeat_penalty=1.2, penalty_last_n=32,
            frequency_penalty=0.1, seed=1234))
        other_seed = ctx.complete(prompt, max_tokens=24, sampler=lamina.Sampler(
            temperature=1.3, top_k=20, top_p=0.9, min_p=0.02, repeat_penalty=1.2, penalty_last_n=32,
            frequency_penalty=0.1, seed=1235))
        greedy = ctx.complete(prompt, max_tokens=24)
    assert len(from_file.tokens) == 24
    assert np.array_equal(from_file.tokens, by_hand.tokens)
    assert not np.array_equal(from_file.tokens, greedy.tokens) or not np.array_equal(from_file.tokens, other_seed.tokens)
    # unset or -1: a random seed per sampler, recorded on it
    seeds = {quiet_load(None, env={}).sampler().seed for _ in range(4)}
    assert len(seeds) > 1


def test_a_json_schema_file_constrains_the_output(tmp_path: Path, real_path: Path) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    cfg = quiet_load(write(tmp_path, f"model: {real_path}\nctx_len: 256\njson_schema_file: s.json\nseed: 7\n"
                                     "max_tokens: 40\n"), env={})
    model = lamina.Model.from_config(cfg)
    with model.context() as ctx:
        text = ctx.complete("A JSON object:", **cfg.generate_kwargs()).text
    value = json.loads(text)
    assert list(value) == ["n"] and isinstance(value["n"], int)
    with pytest.raises(ValueError, match="not valid JSON"):
        lamina._native.json_schema_to_grammar("{nope")


def test_mirostat_and_dynatemp_build_llama_cpp_chains(tiny_model: lamina.Model) -> None:
    chain = lamina.Sampler(temperature=0.8, mirostat=2, repeat_penalty=1.3).native(tiny_model).describe()
    assert chain == ["temp", "mirostat-v2"]  # as llama.cpp's common_sampler: no penalties with mirostat
    chain = lamina.Sampler(temperature=0.8, dynatemp_range=0.5).native(tiny_model).describe()
    assert chain[-2:] == ["temp-ext", "dist"]
    with pytest.raises(ValueError, match="mirostat must be"):
        lamina.Sampler(mirostat=3).native(tiny_model)


def test_context_and_model_context_default_the_same_way(tmp_path: Path, tiny_path: Path) -> None:
    cfg = quiet_load(write(tmp_path, f"model: {tiny_path}\nctx_len: 768\nn_batch: 128\ncpu_threads: 1\n"
                                     "cache_type: bf16\n"), env={})
    model = lamina.Model.from_config(cfg)
    with model.context() as a, lamina.Context(model) as b:
        assert a.params == b.params and a.threads_config == b.threads_config
        assert (a.n_ctx, a.params["n_batch"], a.threads[0]) == (768, 128, 1)
    plain = lamina.Model(tiny_path, n_ctx=1280)
    with plain.context() as a, lamina.Context(plain) as b:
        assert a.params == b.params and a.n_ctx == 1280


def test_an_explicit_context_argument_wins_even_when_it_equals_the_default(tmp_path: Path, tiny_path: Path) -> None:
    yml = write(tmp_path, f"model: {tiny_path}\nn_batch: 512\nn_ubatch: 128\n")
    model = lamina.Model.from_config(quiet_load(yml, env={}))
    with model.context(n_ctx=256) as ctx:  # nothing given: the file's values
        assert (ctx.params["n_batch"], ctx.params["n_ubatch"]) == (256, 128)  # n_batch is capped at n_ctx
    with model.context(n_ctx=4096) as ctx:
        assert (ctx.params["n_batch"], ctx.params["n_ubatch"]) == (512, 128)
    with model.context(n_ctx=4096, n_batch=2048, n_ubatch=512) as ctx:  # Context's defaults, given explicitly
        assert (ctx.params["n_batch"], ctx.params["n_ubatch"]) == (2048, 512)


def lamina_cli(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lamina", *args], capture_output=True, text=True, timeout=120, **kw)


def test_config_check_and_show_exit_codes(tmp_path: Path, tiny_path: Path) -> None:
    good = write(tmp_path, f"model: {tiny_path}\nngl: 3\n", "good.yml")
    typo = write(tmp_path, f"model: {tiny_path}\nctx_lenn: 3\n", "typo.yml")
    bad = write(tmp_path, "ctx_len: -4\n", "bad.yml")
    r = lamina_cli("config", "check", str(good))
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    r = lamina_cli("config", "check", str(typo))
    assert r.returncode == 0 and "typo.yml:2: unknown key 'ctx_lenn' (did you mean 'ctx_len'?)" in r.stderr
    r = lamina_cli("config", "check", "--strict", str(typo))
    assert r.returncode == 1 and "typo.yml:2" in r.stderr
    r = lamina_cli("config", "check", str(bad))
    assert r.returncode == 1 and "bad.yml:1: n_ctx:" in r.stderr
    r = lamina_cli("config", "check", str(tmp_path / "missing.yml"))
    assert r.returncode == 1
    assert lamina_cli("config", "check").returncode == 2
    r = lamina_cli("config", "show", str(good), "-t", "1")
    assert r.returncode == 0 and f"{good}:2" in r.stdout and "argument" in r.stdout
    r = lamina_cli("config", str(good))  # `show` is the default
    assert r.returncode == 0 and "n_gpu_layers" in r.stdout


def test_every_setting_has_a_default_its_parser_accepts() -> None:
    for name, spec in SETTINGS.items():
        if spec.default is not None and name != "fit_target":
            assert spec.parse(spec.default) == spec.default, name


def test_the_readme_lists_every_setting_and_model_yml_key() -> None:
    from lamina.config import COMBINED, NEGATED, TRANSFORMED, UNSUPPORTED

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme[readme.index("| lamina name |"):]
    table = table[:table.index("\n\n")]
    names = set(SETTINGS) | {a for s in SETTINGS.values() for a in s.aliases} | set(COMBINED) | set(NEGATED) | set(TRANSFORMED)
    missing = sorted(n for n in names if f"`{n}`" not in table)
    assert not missing, f"README's model.yml table lacks {missing}"
    assert all(f"`{k}`" in readme for k in UNSUPPORTED)


def test_cortex_and_jan_files_as_they_are_published(tmp_path: Path, tiny_path: Path) -> None:
    """Cortex's model.yml (model: is its id, files: the path; mirostat: false, tfs_z: 1 ...) and
    Jan's model.json layout (settings:/parameters: mappings) load without errors or noise."""
    (tmp_path / "m.gguf").write_bytes(tiny_path.read_bytes())
    cortex = write(tmp_path, "model: smollm2:135m\nname: SmolLM2\nversion: 1\nstop: []\nstream: true\ntop_p: 0.9\n"
                             "temperature: 0.7\nfrequency_penalty: 0\npresence_penalty: 0\nmax_tokens: 4096\nseed: -1\n"
                             "dynatemp_range: 0\ndynatemp_exponent: 1\ntop_k: 40\nmin_p: 0.05\ntfs_z: 1\ntyp_p: 1\n"
                             "repeat_last_n: 64\nrepeat_penalty: 1\nmirostat: false\nmirostat_tau: 5\nmirostat_eta: 0.1\n"
                             "penalize_nl: false\nignore_eos: false\nn_probs: 0\nmin_keep: 0\nengine: llama-cpp\n"
                             "prompt_template: '{prompt}'\nctx_len: 512\nngl: 0\nfiles:\n  - m.gguf\nsize: 1\n",
                   "cortex.yml")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConfigWarning, no InertSettingWarning (ngl: 0 with no GPU is the fix)
        cfg = lamina.load_config(cortex, env={})
    assert cfg["model"] == str(tmp_path / "m.gguf") and "model" in cfg.ignored
    assert (cfg["mirostat"], cfg["typical_p"], cfg["seed"], cfg["max_tokens"]) == (0, 1.0, None, 4096)
    jan = write(tmp_path, json.dumps({"id": "m", "settings": {"ctx_len": 256, "ngl": 0, "llama_model_path": "m.gguf"},
                                      "parameters": {"temperature": 0.3, "stop": ["<end>"], "max_tokens": 9}}),
                "model.json")
    cfg = quiet_load(jan, env={})
    assert (cfg["n_ctx"], cfg["temperature"], cfg["stop"], cfg["max_tokens"]) == (256, 0.3, ["<end>"], 9)
    assert cfg["model"] == str(tmp_path / "m.gguf") and cfg.source("temperature") == f"{jan}:1"
    noisy = write(tmp_path, "tfs_z: 0.9\nmirostat: true\n", "noisy.yml")
    with pytest.warns(lamina.ConfigWarning, match="noisy.yml:1: tfs_z: tail-free sampling was removed"):
        assert lamina.load_config(noisy, env={})["mirostat"] == 1


def test_defaults_written_out_and_ngl_0_are_not_inert(tmp_path: Path) -> None:
    yml = write(tmp_path, "ngl: 0\nmain_gpu: 0\nsplit_mode: layer\ndevice: ''\nkv_offload: true\ngpu: false\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = lamina.load_config(yml, env={})
    assert cfg["devices"] is None and cfg.inert == []


def test_threads_beyond_the_cpus_are_inert_and_not_used(tmp_path: Path) -> None:
    n_cpus = len(os.sched_getaffinity(0))
    cfg = quiet_load(write(tmp_path, f"cpu_threads: {n_cpus + 62}\nthreads_batch: -1\n"), env={})
    assert cfg["threads"] == n_cpus and cfg.threads().resolve()[0] == n_cpus and cfg["threads_batch"] is None
    assert "inert above" in cfg.source("threads")


def test_yaml_features_and_hostile_yaml(tmp_path: Path) -> None:
    merged = quiet_load(write(tmp_path, "base: &b {ctx_len: 256, top_k: 7}\n<<: *b\ntop_k: 9\n"), env={})
    assert (merged["n_ctx"], merged["top_k"]) == (256, 9)  # merge keys, and a key given beside them wins
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "stop: *i\n"
    import time
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="expands to .* values"):
        quiet_load(write(tmp_path, bomb, "bomb.yml"), env={})
    assert time.monotonic() - t0 < 5
    with pytest.raises(ValueError, match=r"nests more than 64 levels"):
        lamina._native.json_schema_to_grammar('{"properties":{"a":' * 5000 + "{}" + "}}" * 5000)
    deep = write(tmp_path, "json_schema_file: s.json\n", "deep.yml")
    (tmp_path / "s.json").write_text('{"items":' * 3000 + "{}" + "}" * 3000)
    with pytest.raises(ValueError, match=r"deep.yml:1: json_schema_file: "):
        quiet_load(deep, env={}).sampler()


def test_jan_placement_and_sampling_extras(tmp_path: Path) -> None:
    cfg = quiet_load(write(tmp_path, "override_tensor_buffer_t: 'blk\\.1\\.ffn=CPU,attn_q=CUDA0'\nn_cpu_moe: 2\n"
                                     "rope_scale: 4\nlogit_bias: {15: -100}\n"
                                     "dry_sequence_breakers: [\"\\n\", x]\nkv_unified: true\nswa_full: false\n"),
                     env={})
    kw = cfg.model_kwargs()
    assert ("blk\\.1\\.ffn", "cpu") in cfg["tensor_overrides"] and ("attn_q", "CUDA0") in cfg["tensor_overrides"]
    assert cfg["rope_freq_scale"] == 0.25 and cfg.kv().unified and not cfg.kv().swa_full
    smp = cfg.sampler()
    assert smp.logit_bias == {15: -100.0} and tuple(smp.dry_sequence_breakers) == ("\n", "x")
    if "tensor_overrides" in kw:  # with a GPU (or RPC): llama.cpp's --n-cpu-moe 2 patterns follow the file's
        assert kw["tensor_overrides"][-2:] == [(r"blk\.0\.ffn_(up|down|gate|gate_up)_(ch|)exps", "cpu"),
                                               (r"blk\.1\.ffn_(up|down|gate|gate_up)_(ch|)exps", "cpu")]


def test_unknown_lamina_variables_and_alias_arguments() -> None:
    with pytest.warns(lamina.ConfigWarning, match=r"env LAMINA_NGL: not a lamina setting \(did you mean "
                                                  r"LAMINA_N_GPU_LAYERS\?\)"):
        lamina.load_config(env={"LAMINA_NGL": "3", "LAMINA_REQUIRE_MODEL": "1"})
    assert quiet_load(None, env={}, ngl=3, ctx_len=512)["n_gpu_layers"] == 3


@pytest.mark.filterwarnings("ignore::lamina.InertSettingWarning")
@pytest.mark.parametrize("value", ["0", "7", "all", "ALL", " auto ", "-1", "-2", "x", "1.5", "", "most", "\u00b2", "--1"])
def test_every_reader_of_n_gpu_layers_agrees_on_every_value(tiny_path: Path, value: str) -> None:
    # model.yml / LAMINA_N_GPU_LAYERS, -ngl, bench's -ngl list and Model: one parser, one answer
    import argparse
    from lamina.cli import args, bench
    from lamina.params import parse_ngl
    try:
        want: object = parse_ngl(value)
    except ValueError as e:
        want = str(e)
    assert want in ("all", "auto", 0, 7) or (isinstance(want, str) and want.startswith("expected an int >= 0"))

    def outcome(f: Any) -> object:
        try:
            return f()
        except (ValueError, argparse.ArgumentTypeError) as e:
            return str(e)

    def from_config() -> object:
        return lamina.load_config(None, env={"LAMINA_N_GPU_LAYERS": value})["n_gpu_layers"]

    got_config = outcome(from_config)
    assert got_config == want or (isinstance(want, str) and want in str(got_config)), got_config
    assert outcome(lambda: args.ngl(value)) == want
    got_list = outcome(lambda: bench._ngl_list(value))
    assert got_list == [want] or (isinstance(want, str) and isinstance(got_list, str) and got_list.startswith(want))
    if isinstance(want, str) and want.startswith("expected an int >= 0"):
        with pytest.raises(ValueError) as e:
            lamina.Model(tiny_path, gpu=False, n_gpu_layers=value)  # type: ignore[arg-type]
        assert str(e.value) == want
