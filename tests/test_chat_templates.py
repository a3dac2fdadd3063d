"""Chat templates rendered by llama.cpp's Jinja engine (common/chat.h), byte for byte what
llama-server's /apply-template renders for the same messages, tools and template at the pin.

The templates are real models' ones, from the pinned llama.cpp source (models/templates/); the
server is llama-server built from the same source (-DLAMINA_EXTRA_TOOLS=llama-server, as CI)."""
from __future__ import annotations

import json
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
