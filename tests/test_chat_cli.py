"""Chat rendering through llama.cpp's templates, and the CLI commands."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import lamina
import requires

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def test_builtin_template_renders_messages(tiny_model: lamina.Model) -> None:
    assert "chatml" in lamina.chat_templates() and "gemma" in lamina.chat_templates()
    text = tiny_model.apply_chat_template(MESSAGES, template="chatml")
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_model_without_template_and_bad_messages_raise(tiny_model: lamina.Model) -> None:
    with pytest.raises(ValueError, match="no chat template"):
        tiny_model.apply_chat_template(MESSAGES)
    with pytest.raises(ValueError, match="does not parse"):
        tiny_model.apply_chat_template(MESSAGES, template="{{ nothing llama.cpp knows }}")
    with pytest.raises(TypeError):
        tiny_model.apply_chat_template([{"role": "user"}], template="chatml")  # type: ignore[list-item]


def test_chat_turns_reuse_the_cache(tiny_model: lamina.Model) -> None:
    ctx = tiny_model.context(n_ctx=512)
    msgs = [{"role": "user", "content": "the sky is"}]
    first = ctx.chat(msgs, template="chatml", max_tokens=8, ignore_eos=True)
    msgs += [first.message.openai(), {"role": "user", "content": "and the sea"}]
    second = ctx.chat(msgs, template="chatml", max_tokens=8, ignore_eos=True, stream=True)
    assert "".join(d.content for d in second) == second.result().content
    assert 0 < second.result().n_prompt_eval < second.result().n_prompt - 8


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
    requires.tool("llama-bench")
    out = run_cli("bench", "-m", str(tiny_path), "-p", "32", "-n", "16", "-r", "2", "--compare", "-o", "json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert all(r["llama_bench_median_ts"] > 0 and r["ratio"] > 0 for r in rows)


def test_bench_pairs_single_repetition_rounds() -> None:
    from lamina.cli.bench import Result

    paired = Result("tg128", 2, lamina=[10.0, 20.0, 30.0], llama_bench=[10.0, 10.0, 40.0]).as_dict()
    assert paired["paired_ratio_median"] == 1.0  # ratios 1.0, 2.0, 0.75
    assert paired["ratio"] == 2.0  # medians 20 / 10: what drift between rounds does to unpaired figures
    assert "paired_ratio_median" not in Result("pp512", 2, lamina=[1.0, 2.0], llama_bench=[1.0]).as_dict()
    # -r 2 --rounds 1: two repetitions of each side, not pairs run back to back
    assert "paired_ratio_median" not in Result("pp512", 2, lamina=[1.0, 2.0], llama_bench=[1.0, 2.0],
                                               reps_per_round=2).as_dict()


def test_cli_run_samples_as_llama_cpp_does_and_temp_0_is_greedy(real_path: Path) -> None:
    """lamina run defaults to llama.cpp's CLI sampling (temperature 0.8, top-k 40, top-p 0.95,
    min-p 0.05); --temp 0 is greedy. The text must equal the API's with the same settings."""
    model = lamina.Model(real_path, n_ctx=4096)
    prompt = "The three primary colors are"
    with model.context() as ctx:
        sampled = ctx.complete(prompt, max_tokens=24, sampler=lamina.Sampler(
            temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, seed=42)).text
        greedy = ctx.complete(prompt, max_tokens=24).text
    out = run_cli("run", prompt, "-m", str(real_path), "-n", "24", "--seed", "42")
    assert out.returncode == 0, out.stderr
    assert out.stdout == sampled + "\n" and "temperature 0.8, seed 42" in out.stderr
    out = run_cli("run", prompt, "-m", str(real_path), "-n", "24", "--temp", "0")
    assert out.returncode == 0 and out.stdout == greedy + "\n" and "greedy" in out.stderr
    assert sampled != greedy
    # unset seed: random per run, and printed so a run can be repeated
    seeds = {run_cli("run", prompt, "-m", str(real_path), "-n", "2").stderr.split("seed ")[1].split(";")[0]
             for _ in range(2)}
    assert len(seeds) == 2


def _run_in_pty(*args: str) -> bytes:
    import os
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin/stdout/stderr are the terminal
        os.execv(sys.executable, [sys.executable, "-m", "lamina", *args])
    out = b""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        out += data
    os.waitpid(pid, 0)
    os.close(fd)
    return out


@pytest.mark.timeout(120)
def test_load_progress_bar_on_a_terminal_and_not_in_a_pipe(real_path: Path) -> None:
    tty = _run_in_pty("info", "-m", str(real_path))
    assert b"loading gemma-3-270m-q4_k_m.gguf [" in tty and b"100%" in tty and b"\x1b[K" in tty
    piped = run_cli("info", "-m", str(real_path))
    assert piped.returncode == 0 and "loading" not in piped.stderr and "[" not in piped.stderr
