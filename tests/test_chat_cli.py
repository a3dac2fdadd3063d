"""Chat rendering through llama.cpp's templates, and the CLI commands."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import lamina

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def test_builtin_template_renders_messages(tiny_model: lamina.Model) -> None:
    assert "chatml" in lamina.chat_templates() and "gemma" in lamina.chat_templates()
    text = tiny_model.apply_chat_template(MESSAGES, template="chatml")
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_model_without_template_and_bad_messages_raise(tiny_model: lamina.Model) -> None:
    with pytest.raises(ValueError, match="no chat template"):
        tiny_model.apply_chat_template(MESSAGES)
    with pytest.raises(ValueError, match="does not support"):
        tiny_model.apply_chat_template(MESSAGES, template="{{ nothing llama.cpp knows }}")
    with pytest.raises(TypeError):
        tiny_model.apply_chat_template([{"role": "user"}], template="chatml")  # type: ignore[list-item]


def test_chat_turns_reuse_the_cache(tiny_model: lamina.Model) -> None:
    ctx = tiny_model.context(n_ctx=512)
    msgs = [{"role": "user", "content": "the sky is"}]
    first = ctx.chat(msgs, template="chatml", max_tokens=8, ignore_eos=True)
    reply = "".join(first)
    msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": "and the sea"}]
    second = ctx.chat(msgs, template="chatml", max_tokens=8, ignore_eos=True)
    list(second)
    assert second.stats["n_reused"] > 0


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lamina", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_cli_run_and_errors(tiny_path: Path) -> None:
    out = run_cli("run", "the sky is", "-m", str(tiny_path), "-n", "8")
    assert out.returncode == 0, out.stderr
    assert "generated: 8 tokens" in out.stderr or "[stop]" in out.stderr
    bad = run_cli("run", "x", "-m", str(tiny_path.parent / "missing.gguf"))
    assert bad.returncode == 1 and "lamina: error:" in bad.stderr


def test_cli_chat_reads_stdin(tiny_path: Path) -> None:
    out = run_cli("chat", "-m", str(tiny_path), "--template", "chatml", "-n", "4", stdin="hello\nworld\n")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip().splitlines()) == 2


def test_cli_bench_json(tiny_path: Path) -> None:
    out = run_cli("bench", "-m", str(tiny_path), "-p", "32", "-n", "16", "-r", "2", "-t", "1,2", "-o", "json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [(r["test"], r["threads"]) for r in rows] == [("pp32", 1), ("pp32", 2), ("tg16", 1), ("tg16", 2)]
    assert all(len(r["lamina_samples_ts"]) == 2 and r["lamina_median_ts"] > 0 for r in rows)


@pytest.mark.slow
def test_cli_bench_uses_the_config(tiny_path: Path, tmp_path: Path) -> None:
    yml = tmp_path / "model.yml"
    yml.write_text(f"model: {tiny_path}\ncpu_threads: 1\ngpu: false\n")
    out = run_cli("bench", "--config", str(yml), "-p", "0", "-n", "8", "-r", "1", "-o", "json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["threads"] for r in rows] == [1], rows  # the file's thread count (the default is the cores)
    out = run_cli("bench", "--config", str(yml), "-p", "0", "-n", "8", "-r", "1", "-t", "2", "-o", "json")
    assert [r["threads"] for r in json.loads(out.stdout)] == [2]  # a flag wins over the file


def test_cli_bench_compare_runs_llama_bench(tiny_path: Path) -> None:
    if lamina.bench.llama_bench_path() is None:
        pytest.skip("llama-bench not shipped in this build")
    out = run_cli("bench", "-m", str(tiny_path), "-p", "32", "-n", "16", "-r", "2", "--compare", "-o", "json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert all(r["llama_bench_median_ts"] > 0 and r["ratio"] > 0 for r in rows)


def test_bench_pairs_single_repetition_rounds() -> None:
    from lamina.bench import Result

    paired = Result("tg128", 2, lamina=[10.0, 20.0, 30.0], llama_bench=[10.0, 10.0, 40.0]).as_dict()
    assert paired["paired_ratio_median"] == 1.0  # ratios 1.0, 2.0, 0.75
    assert paired["ratio"] == 2.0  # medians 20 / 10: what drift between rounds does to unpaired figures
    assert "paired_ratio_median" not in Result("pp512", 2, lamina=[1.0, 2.0], llama_bench=[1.0]).as_dict()
