"""Chat templates rendered by llama.cpp's Jinja engine (common/chat.h), byte for byte what
llama-server's /apply-template renders for the same messages, tools and template at the pin.

The templates are real models' ones, from the pinned llama.cpp source (models/templates/); the
server is llama-server built from the same source (-DLAMINA_EXTRA_TOOLS=llama-server, as CI)."""
from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

import lamina
import requires

TEMPLATES = [  # tool calls in several formats, thinking, channels
    "Qwen-Qwen3-0.6B",                          # <tool_call> (Hermes style), <think>
    "meta-llama-Llama-3.2-3B-Instruct",         # Llama 3.x JSON tool calls, the date
    "mistralai-Mistral-Nemo-Instruct-2407",     # [TOOL_CALLS]
    "openai-gpt-oss-120b",                      # channels
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",  # <think>
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use",
]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

CASES: dict[str, dict[str, Any]] = {
    "plain": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]},
    "turns": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                           {"role": "user", "content": "Tell me a joke."}]},
    "tools": {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS},
    "tool round trip": {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 21}"}], "tools": TOOLS},
    "no thinking": {"messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": {"enable_thinking": False}},
    "continued": {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour"}]},
}


def templates_dir() -> Path:
    """models/templates of the pinned llama.cpp source (fetched and verified by vendor/llama.cpp/fetch.py)."""
    fetch = Path(__file__).parents[1] / "vendor" / "llama.cpp" / "fetch.py"
    run = subprocess.run([sys.executable, str(fetch)], capture_output=True, text=True, timeout=600) if fetch.exists() else None
    if run is None or run.returncode != 0:
        requires.lacking("the pinned llama.cpp source (vendor/llama.cpp/fetch.py) is not at hand", "LAMINA_REQUIRE_TOOLS")
    return Path(run.stdout.strip()) / "models" / "templates"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(port: int, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@contextlib.contextmanager
def llama_server(model: Path, *extra: object) -> Iterator[int]:
    """llama-server (built from the pin) serving ``model`` on 127.0.0.1 while the block runs: its port.
    Its log goes beside the model, and is shown when it exits early."""
    requires.tool("llama-server")
    port, log_path = free_port(), model.with_suffix(".server.log")
    with open(log_path, "w") as log:
        server = lamina.tools.popen("llama-server", ["-m", model, "--host", "127.0.0.1", "--port", port, "-t", 1,
                                                     "--no-webui", *extra], stdout=subprocess.DEVNULL, stderr=log)
    try:
        until = time.monotonic() + 60
        while True:
            assert server.poll() is None, f"llama-server exited: {log_path.read_text()[-2000:]}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < until, "llama-server did not start in 60 s"
                time.sleep(0.2)
        yield port
    finally:
        server.kill()
        server.wait()


@pytest.fixture(scope="module")
def server_for(tiny_path: Path) -> Iterator[Any]:
    """A function that starts llama-server with one template (one at a time) and gives its port."""
    requires.tool("llama-server")
    procs: list[subprocess.Popen[bytes]] = []
    log = tempfile.TemporaryFile()  # its stderr (a pipe nobody reads could fill and stop it)

    def start(template: Path) -> int:
        for p in procs:
            p.kill()
            p.wait()
        procs.clear()
        port = free_port()
        log.seek(0)
        log.truncate()
        # with lamina's backends (a portable build loads them from the package folder)
        procs.append(lamina.tools.popen("llama-server", [
            "-m", tiny_path, "--host", "127.0.0.1", "--port", port, "-c", 256, "-t", 1, "--jinja",
            "--chat-template-file", template, "--no-webui"], stdout=subprocess.DEVNULL, stderr=log))
        until = time.monotonic() + 60
        while time.monotonic() < until:
            if procs[0].poll() is not None:
                log.seek(0)
                raise AssertionError(f"llama-server exited: {log.read().decode(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        return port
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("llama-server did not start in 60 s")

    yield start
    for p in procs:
        p.kill()
        p.wait()
    log.close()


@pytest.mark.slow
@pytest.mark.parametrize("name", TEMPLATES)
def test_rendering_equals_llama_server(tiny_model: lamina.Model, server_for: Any, name: str) -> None:
    path = templates_dir() / f"{name}.jinja"
    source = path.read_text()
    port = server_for(path)
    for case, body in CASES.items():
        status, reply = post(port, "/apply-template", body)
        kwargs = body.get("chat_template_kwargs", {})

        def render() -> str:
            return tiny_model.apply_chat_template(body["messages"], template=source, tools=body.get("tools"),
                                                  enable_thinking=kwargs.get("enable_thinking"))
        if status != 200:  # the template refuses (e.g. Mistral's 9-character tool call ids): so does lamina
            with pytest.raises(ValueError, match="did not render"):
                render()
            continue
        got, want = render(), reply["prompt"]
        assert got == want, f"{name}, {case}:\nlamina: {got!r}\nserver: {want!r}"


def test_bad_chat_input_raises_value_errors_naming_the_part(tiny_model: lamina.Model) -> None:
    src = templates_dir() / "Qwen-Qwen3-0.6B.jinja"
    tmpl = src.read_text()
    user = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="message 1: unknown role 'robot'"):
        tiny_model.apply_chat_template(user + [{"role": "robot", "content": "x"}], template=tmpl)
    with pytest.raises(TypeError, match="message 0"):
        tiny_model.apply_chat_template([{"role": "user", "content": 3}], template=tmpl)
    with pytest.raises(ValueError, match="does not parse: .+") as e:
        tiny_model.apply_chat_template(user, template="{% if %}")
    assert "std::exception" not in str(e.value)  # llama.cpp's reason, not a sliced exception
    with pytest.raises(ValueError, match="did not render"):
        tiny_model.apply_chat_template(user, template="{{ raise_exception('no users here') }}")
    with pytest.raises(ValueError, match="tool 0 must be"):
        tiny_model.apply_chat_template(user, template=tmpl, tools=[{"type": "function", "function": {"name": object()}}])
    with pytest.raises(ValueError, match="not JSON"):
        tiny_model.apply_chat_template(user, template=tmpl, tools=[{"type": "function", "function": {
            "name": "f", "description": object()}}])
    with pytest.raises(ValueError, match="built-in template"):
        tiny_model.apply_chat_template(user, template="chatml", tools=TOOLS)
    with pytest.raises(ValueError):
        tiny_model.apply_chat_template(user, template=tmpl, tools=[{"type": "function"}])  # no function
    with pytest.raises(ValueError, match="two assistant messages"):
        tiny_model.apply_chat_template(user + [{"role": "assistant", "content": "a"}] * 2, template=tmpl)
    with pytest.raises(ValueError, match="tool_choice must be"):
        tiny_model.apply_chat_template(user, template=tmpl, tools=TOOLS, tool_choice={"type": "tool"})
    with pytest.raises(ValueError, match="not among the tools"):
        tiny_model.apply_chat_template(user, template=tmpl, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    with pytest.raises(ValueError, match="enable_thinking"):
        tiny_model.apply_chat_template(user, template=tmpl, chat_template_kwargs={"enable_thinking": "no"})
    assert "Hi" in tiny_model.apply_chat_template(user, template=tmpl)  # the model still renders


def test_a_closed_model_renders_no_more(tiny_path: Path) -> None:
    """The parsed templates keep no reference to the model: close() frees it, and rendering then
    raises ClosedError as the model's other methods do."""
    with lamina.Model(tiny_path, gpu=False) as model:
        assert "<|im_start|>" in model.apply_chat_template([{"role": "user", "content": "Hi"}], template="chatml")
    with pytest.raises(lamina.ClosedError):
        model.apply_chat_template([{"role": "user", "content": "Hi"}], template="chatml")


def test_templates_nested_thousands_deep_are_refused_not_a_stack_overflow(tiny_model: lamina.Model) -> None:
    """llama.cpp's Jinja parser recurses once per level: 50,000 brackets or 20,000 nested ifs (a
    hostile GGUF's template) overflowed the stack. Every template of llama.cpp's models/templates
    nests far less than the limit (256)."""
    user = [{"role": "user", "content": "Hi"}]
    for deep in ["{{ " + "(" * 50000 + "1" + ")" * 50000 + " }}", "{{ " + "[" * 50000 + "]" * 50000 + " }}",
                 "{% if true %}" * 20000 + "x" + "{% endif %}" * 20000]:
        with pytest.raises(ValueError, match="nests deeper than 256 levels"):
            tiny_model.apply_chat_template(user, template=deep)
    for path in sorted(templates_dir().glob("*.jinja")):
        try:
            tiny_model.apply_chat_template(user, template=path.read_text())
        except ValueError as e:  # a template's own raise_exception is fine here; the limit is not
            assert "nests deeper" not in str(e), path.name
    with pytest.raises(ValueError, match="no chat template"):
        tiny_model.apply_chat_template(user, template="")  # as None: the tiny model has none
    with pytest.raises(TypeError, match="tools must be a list"):
        tiny_model.apply_chat_template(user, template="chatml", tools="get_weather")  # type: ignore[arg-type]


HOSTILE = [  # (template, what the ValueError says): each killed or hung the process before patch 0005
    ("{{ 1 is divisibleby(0) }}", "division by zero"),                        # SIGFPE
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "nests deeper"),       # stack overflow
    ("{% macro f() %}{% call f() %}{% endcall %}{% endmacro %}{{ f() }}", "nests deeper"),
    ("{% set a = [] %}{% set _ = a.append(a) %}{{ a }}", "nests deeper"),     # a list holding itself, printed
    ("{% set a = [] %}{% set _ = a.append(a) %}{{ a | tojson }}", "nests deeper"),
    ("{% set n = namespace(a=[1]) %}{% for i in range(60) %}{% set n.a = [n.a, n.a] %}{% endfor %}{{ n.a }}",
     "steps"),                                                                   # 2**60 items printed
    ("{% set n = namespace(s='ab') %}{% for i in range(64) %}{% set n.s = n.s ~ n.s %}{% endfor %}", "more text"),
    ("{{ 'x' * 1000000000000 }}", "more text"),                                # memory until the kernel kills
    ("{% for i in range(1000000000000) %}{% endfor %}", "list longer"),
    ("{% for i in range(4000) %}{% for j in range(4000) %}{% endfor %}{% endfor %}", "steps"),
    ("{% set n = namespace(s='ab') %}{% for i in range(64) %}{% set n.s = '{}{}'|format(n.s, n.s) %}{% endfor %}",
     "more text"),
    ("{{ ('a,' * 30000000)|split(',')|length }}", "list longer|steps"),  # split was quadratic, unbounded
    # the parser recursed once per level of these (a stack overflow at 100,000)
    ("{% if false %}" + "{% elif false %}" * 100000 + "{% endif %}", "nests deeper than 1000"),
    ("{{ " + "not " * 100000 + "1 }}", "nests deeper than 1000"),
    ("{{ " + "- " * 100000 + "1 }}", "nests deeper than 1000"),
    ("{{ " + "1 if false else " * 100000 + "1 }}", "nests deeper than 1000"),
    ("{% set a %}" * 20000 + "{% endset %}" * 20000, "nests deeper than 1000"),
    # freeing a tree this deep overflowed the stack
    ("{{ " + "1 + " * 1000000 + "1 }}", "nests deeper than 1000"),
    ("{{ messages" + ".x" * 1000000 + " }}", "nests deeper than 1000"),
]


def test_hostile_templates_raise_and_end(tiny_path: Path) -> None:
    """Templates that run wild inside llama.cpp's Jinja runtime (a GGUF's own template can be any
    of these) end with a ValueError, in bounded time; the process lives on. Run in a child so a
    regression fails this test rather than killing the run."""
    script = f"""
import json, sys, time, lamina
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_chat_templates import HOSTILE
model = lamina.Model({str(tiny_path)!r}, gpu=False)
assert lamina.chat_template_steps() == 20_000_000
lamina.chat_template_steps(300_000)  # the default's seconds, for each case, are more than a test needs
for template, _ in HOSTILE:
    t = time.monotonic()
    try:
        model.apply_chat_template([{{"role": "user", "content": "Hi"}}], template=template)
        print(json.dumps(["rendered", 0]), flush=True)
    except ValueError as e:
        print(json.dumps([str(e), time.monotonic() - t]), flush=True)
print(json.dumps(["alive", model.apply_chat_template([{{"role": "user", "content": "Hi"}}], template="chatml")]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    for (template, why), (said, seconds) in zip(HOSTILE, rows):
        assert re.search(why, said), (template, said)
        assert seconds < 20, (template, seconds)
    assert rows[-1][0] == "alive" and len(rows) == len(HOSTILE) + 1


def test_ctrl_c_stops_a_render(tiny_path: Path) -> None:
    """A render in the main thread (the GIL released) stops at Ctrl-C with KeyboardInterrupt, in
    well under the step bound's time, and the process renders on."""
    script = f"""
import os, signal, threading, time, lamina
model = lamina.Model({str(tiny_path)!r}, gpu=False)
slow = "{{% for i in range(4000) %}}{{% for j in range(4000) %}}{{% endfor %}}{{% endfor %}}"
threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
t = time.monotonic()
try:
    model.apply_chat_template([{{"role": "user", "content": "Hi"}}], template=slow)
    print("rendered")
except KeyboardInterrupt:
    print("interrupted", time.monotonic() - t)
print(model.apply_chat_template([{{"role": "user", "content": "Hi"}}], template="chatml").count("Hi"))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    said, seconds, hi = out.stdout.split()
    assert said == "interrupted" and float(seconds) < 5 and hi == "1", out.stdout
