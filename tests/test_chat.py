"""Chat as agents use it: ctx.chat with tools, reasoning and streaming, on tiny models that carry
real templates (tests/tiny_gguf.py CHAT_FAMILIES, templates from the pinned llama.cpp source).

A random model does not call tools by itself: the tests force a call with the template's own
grammar (tool_choice="required" continuing an assistant message that opened a call, or a logit
bias on a lazy grammar's trigger token) or feed the parser written replies. Parsing is compared
with llama-server's, built from the same pin, on the same replies."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any, Iterator

import jsonschema
import pytest

import lamina
from lamina.chat import reply_parser
from test_chat_templates import llama_server, templates_dir
from tiny_gguf import CHAT_FAMILIES, write_tiny_chat

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now.",
                                           "parameters": SCHEMA}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, lamina.Model]]:
    """One tiny model per template family, loaded on first use."""
    folder, templates = tmp_path_factory.mktemp("chat"), templates_dir()
    models: dict[str, lamina.Model] = {}

    class Lazy(dict[str, lamina.Model]):
        def __missing__(self, family: str) -> lamina.Model:
            models[family] = lamina.Model(write_tiny_chat(folder / f"{family}.gguf", family, templates))
            return models[family]
    yield Lazy()
    for m in models.values():
        m.close()


def token(model: lamina.Model, text: str) -> int:
    ids = model.tokenize(text, add_special=False, special=True)
    assert len(ids) == 1, (text, ids)
    return int(ids[0])


def test_required_tool_call_is_held_to_the_tools_schema(chat_models: dict[str, lamina.Model]) -> None:
    model = chat_models["qwen3"]
    ctx = model.context(n_ctx=1024)
    opened = ASK + [{"role": "assistant", "content": "<tool_call>\n"}]  # the reply has begun a call
    res = ctx.chat(opened, tools=TOOLS, tool_choice="required", max_tokens=300)
    assert res.finish_reason == "tool_calls", res.text
    (call,) = res.tool_calls
    assert call.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(call.parsed_arguments(), SCHEMA)  # the grammar held a random model to the schema
    assert res.message.openai()["tool_calls"][0] == {"id": call.id, "type": "function", "function": {
        "name": "get_weather", "arguments": call.arguments}}


def test_a_lazy_grammar_waits_for_its_trigger(chat_models: dict[str, lamina.Model]) -> None:
    """Mistral's [TOOL_CALLS] is one token and the lazy grammar's trigger: biased to come first,
    it starts the grammar and the rest is a valid call; unbiased, the reply is free text."""
    model = chat_models["mistral"]
    ctx = model.context(n_ctx=1024)
    r = model.render_chat(ASK, tools=TOOLS)
    trigger = token(model, "[TOOL_CALLS]")
    assert r["grammar_lazy"] and r["grammar_trigger_tokens"] == [trigger] and trigger in r["preserved_token_ids"]
    biased = lamina.Sampler(logit_bias={trigger: 100.0})
    res = ctx.chat(ASK, tools=TOOLS, parallel_tool_calls=False, max_tokens=300, sampler=biased)
    assert res.text.startswith("[TOOL_CALLS]")  # a preserved token's text is shown, for the parser
    assert res.finish_reason == "tool_calls" and len(res.tool_calls) == 1, res.text
    jsonschema.validate(res.tool_calls[0].parsed_arguments(), SCHEMA)
    free = ctx.chat(ASK, tools=TOOLS, max_tokens=24)
    assert free.tool_calls == () and free.content == free.text and free.finish_reason == "length"


def test_a_streamed_tool_call_reassembles_to_the_whole_one(chat_models: dict[str, lamina.Model]) -> None:
    model = chat_models["mistral"]
    ctx = model.context(n_ctx=1024)
    kw: dict[str, Any] = dict(tools=TOOLS, max_tokens=400, sampler=lamina.Sampler(logit_bias={token(model, "[TOOL_CALLS]"): 100.0}))
    whole = ctx.chat(ASK, **kw)
    assert len(whole.tool_calls) >= 2  # parallel calls (the template supports them) until max_tokens
    calls: dict[int, dict[str, str]] = {}
    with ctx.chat(ASK, stream=True, **kw) as stream:
        deltas = list(stream)
        result = stream.result()
    for d in deltas:
        for c in d.tool_calls:
            if c.index not in calls:
                assert c.id and c.name, c  # id and name come once, with the call's first piece
                calls[c.index] = {"id": c.id, "name": c.name, "arguments": ""}
            else:
                assert c.id is None and c.name is None, c
            calls[c.index]["arguments"] += c.arguments
    assert len(deltas) > len(calls) + 1 and deltas[-1].finish_reason == whole.finish_reason == "length"
    assert [(c["id"], c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c.id, c.name, c.arguments) for c in result.tool_calls]
    assert [(c.name, c.arguments) for c in result.tool_calls] == [(c.name, c.arguments) for c in whole.tool_calls]
    assert result.text == whole.text and (result.tokens == whole.tokens).all()


def test_results_and_deltas_are_openai_objects(chat_models: dict[str, lamina.Model]) -> None:
    """ChatResult.openai() and ChatDelta.openai() validate as the official openai client's types,
    and the client's own streaming accumulation of the deltas gives the whole reply's calls."""
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    model = chat_models["mistral"]
    ctx = model.context(n_ctx=1024)
    kw: dict[str, Any] = dict(tools=TOOLS, max_tokens=200, logprobs=True, top_logprobs=2,
                              sampler=lamina.Sampler(logit_bias={token(model, "[TOOL_CALLS]"): 100.0}))
    whole = ChatCompletion.model_validate(ctx.chat(ASK, **kw).openai(model, "tiny"))
    assert whole.choices[0].message.tool_calls and whole.model == "tiny" and whole.usage is not None
    assert whole.choices[0].logprobs is not None and len(whole.choices[0].logprobs.content or []) == whole.usage.completion_tokens
    calls: dict[int, dict[str, str]] = {}
    for d in ctx.chat(ASK, stream=True, **kw):
        chunk = ChatCompletionChunk.model_validate({"id": "c", "object": "chat.completion.chunk", "created": 0,
                                                    "model": "tiny", "choices": [{"index": 0, "delta": d.openai(),
                                                                                  "finish_reason": d.finish_reason}]})
        for c in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(c.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += c.id or ""
            assert c.function is not None
            entry["name"] += c.function.name or ""
            entry["arguments"] += c.function.arguments or ""
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]


def test_reasoning_is_apart_from_content(chat_models: dict[str, lamina.Model]) -> None:
    model = chat_models["r1"]
    r = model.render_chat(ASK)
    assert r["generation_prompt"].endswith("<think>\n") and r["thinking_end_tags"] == ["</think>"]
    reply = "Let me see.\n</think>\n\nSunny."
    whole = reply_parser(r)
    whole.update(reply, True)
    content, reasoning, calls = whole.message
    assert (reasoning.strip(), content.strip(), calls) == ("Let me see.", "Sunny.", [])
    streamed = reply_parser(r)
    pieces = [streamed.update(ch, False) for ch in reply] + [streamed.update("", True)]
    kinds = [i[0] for p in pieces for i in p]
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning")  # all thinking first, then content
    assert "".join(i[1] for p in pieces for i in p if i[0] == "reasoning") == reasoning
    assert "".join(i[1] for p in pieces for i in p if i[0] == "content") == content
    none = model.render_chat(ASK, reasoning_format="none")
    left = reply_parser(none)
    left.update(reply, True)
    assert left.message[1] == "" and "Let me see." in left.message[0]  # "none": thinking stays in content


def test_the_reasoning_budget_forces_the_end_tag(chat_models: dict[str, lamina.Model]) -> None:
    model = chat_models["r1"]
    ctx = model.context(n_ctx=1024)
    end = token(model, "</think>")
    free = ctx.chat(ASK, max_tokens=40)
    assert end not in free.tokens.tolist() and free.content is None and free.reasoning_content
    res = ctx.chat(ASK, max_tokens=40, reasoning_budget=5)
    # the budget counts from <think> on, and the template's "<think>\n" has used one
    assert res.tokens.tolist().index(end) == 4, res.text
    assert res.reasoning_content and res.content and res.tokens[:4].tolist() == free.tokens[:4].tolist()
    said = ctx.chat(ASK, max_tokens=40, reasoning_budget=3, reasoning_message=" Enough.")
    assert said.reasoning_content is not None and said.reasoning_content.endswith(" Enough.")
    with pytest.raises(ValueError, match="thinking tags"):
        chat_models["mistral"].context().chat(ASK, reasoning_budget=5)


def test_tool_results_go_back_in(chat_models: dict[str, lamina.Model]) -> None:
    """The reply (a ChatMessage) and the tool's answer render into the next turn's prompt."""
    model = chat_models["qwen3"]
    call = lamina.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')
    turn = ASK + [lamina.ChatMessage(role="assistant", tool_calls=(call,)),
                  {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    prompt = model.apply_chat_template(turn, tools=TOOLS)
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in prompt
    res = model.context(n_ctx=1024).chat(turn, tools=TOOLS, max_tokens=4)
    assert res.n_prompt == len(model.tokenize(prompt, special=True))


def test_a_reply_that_is_all_thinking_goes_back_in(chat_models: dict[str, lamina.Model]) -> None:
    """max_tokens ran out while the model thought: the reply has no content, and the next turn
    takes it back (content None, as llama-server accepts); `lamina chat` does this."""
    ctx = chat_models["r1"].context(n_ctx=1024)
    first = ctx.chat(ASK, max_tokens=6)
    assert first.content is None and first.reasoning_content and first.finish_reason == "length"
    again = ctx.chat(ASK + [first.message, {"role": "user", "content": "And tomorrow?"}], max_tokens=4)
    assert again.finish_reason == "length" and again.n_prompt > first.n_prompt


def test_tool_choice_names_one_function(chat_models: dict[str, lamina.Model]) -> None:
    model = chat_models["qwen3"]
    other = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    one = model.render_chat(ASK, tools=TOOLS + [other], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert "get_time" in one["grammar"] and "get_weather" not in one["grammar"] and not one["grammar_lazy"]
    with pytest.raises(ValueError, match="not among the tools"):
        model.render_chat(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})


@pytest.mark.parametrize("bad, match", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "not a schema"}}]}, r"tool 0 \(f\): parameters must"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "array", "items": {"$ref": "#/nowhere"}}}}}}]}, r"tool 0 \(f\): parameters"),
    ({"tools": TOOLS, "sampler": lamina.Sampler(grammar='root ::= "x"')}, "grammar"),
    ({"tools": TOOLS, "json_schema": {"type": "array", "items": json.loads("[" * 80 + "]" * 80)}}, "deep"),
    ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice"),
    ({"reasoning_format": "loud"}, "reasoning_format"),
])
def test_bad_chat_input_is_a_value_error_naming_the_part(chat_models: dict[str, lamina.Model], bad: dict[str, Any],
                                                         match: str) -> None:
    ctx = chat_models["qwen3"].context(n_ctx=512)
    with pytest.raises(ValueError, match=match):
        ctx.chat(ASK, max_tokens=2, **bad)
    assert ctx.chat(ASK, max_tokens=2).finish_reason == "length"  # nothing lost


def test_the_reply_parser_survives_random_and_cut_replies(chat_models: dict[str, lamina.Model]) -> None:
    """10,000 replies: cut and spliced well-formed ones, tags in random order, random bytes. Each
    parses, partial or whole, or is a ValueError: never a crash."""
    rng = random.Random(0)
    good = {
        "qwen3": '<think>\nhm\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123def"}]',
        "llama3": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        "gpt-oss": '<|channel|>analysis<|message|>hm<|end|><|start|>assistant to=functions.get_weather<|channel|>'
                   'commentary <|constrain|>json<|message|>{"city": "Paris"}<|call|>',
        "r1": 'hm\n</think>\n\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n'
              '{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
    }
    parsed = failed = 0
    for family, text in good.items():
        r = chat_models[family].render_chat(ASK, tools=TOOLS)
        tags = [t for t, _ in CHAT_FAMILIES[family][1]] + ['{"', '"}', "```", "\n", '"name"', '":']
        for i in range(2000):
            kind = i % 4
            if kind == 0:
                reply = text[:rng.randrange(len(text) + 1)]
            elif kind == 1:
                a, b = sorted(rng.randrange(len(text) + 1) for _ in range(2))
                reply = text[:a] + text[b:] + text[a:b]
            elif kind == 2:
                reply = "".join(rng.choice(tags + list("{}[]\",: ab")) for _ in range(rng.randrange(40)))
            else:
                reply = bytes(rng.randrange(256) for _ in range(rng.randrange(60))).decode("utf-8", errors="replace")
            p = reply_parser(r)
            try:
                for k in range(0, len(reply), 7):
                    p.update(reply[k:k + 7], False)
                p.update("", True)
                parsed += 1
            except ValueError:
                failed += 1
    assert parsed + failed == 10_000 and parsed > 1000 and failed > 100, (parsed, failed)


# -- parity with llama-server -------------------------------------------------------------------

REPLIES = {  # written replies, continued as the last assistant message by both (llama-server's prefill)
    "qwen3": ["Hello there.",
              '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
              '<think>\nneed a tool\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
              '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>',
              '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'],
    "llama3": ['{"name": "get_weather", "parameters": {"city": "Paris"}}', "Hello.",
               '{"type": "function", "name": "get_weather", "parameters": {"city": "Par'],
    "mistral": ['[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123def"}]', "Hi there.",
                '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_weather", '
                '"arguments": {"city": "Rome"}}]'],
    "gpt-oss": ["<|channel|>final<|message|>Plain."],
}


FORCED = {  # replies a grammar forces (no tools): generated, then parsed, by both
    "r1": ["Let me see.\n</think>\n\nSunny.", "Still thinking"],
    "qwen3": ["<think>\nhm\n</think>\n\nHi.", "Hi."],
}


def literal(text: str) -> str:
    """A GBNF grammar that allows exactly ``text``."""
    return "root ::= " + json.dumps(text)


def server_message(port: int, body: dict[str, Any]) -> dict[str, Any] | str:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            message: dict[str, Any] = json.loads(r.read())["choices"][0]["message"]
            return message
    except urllib.error.HTTPError as e:
        return f"error: {json.loads(e.read())['error']['message']}"


def comparable(message: dict[str, Any]) -> tuple[Any, ...]:
    """Content, reasoning and calls (name, arguments, and an id only where the model wrote one)."""
    calls = [(c["function"]["name"], c["function"]["arguments"], c["id"] if c["id"] == "abc123def" else "")
             for c in message.get("tool_calls", [])]
    return message.get("content") or None, message.get("reasoning_content") or None, calls


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FORCED))
def test_generated_and_parsed_as_llama_server(chat_models: dict[str, lamina.Model], family: str) -> None:
    """A reply forced by a grammar of the caller's (which reads the reply only, not the template's
    start) comes out the same and parses into the same content and reasoning_content as
    llama-server's. llama-server shows the end-of-turn token's text where the template preserves it
    (DeepSeek's <｜end▁of▁sentence｜>); lamina ends the reply there without it."""
    model = chat_models[family]
    eos = CHAT_FAMILIES[family][2]
    with llama_server(model.path, "-c", 2048, "--jinja") as port:
        ctx = model.context(n_ctx=2048)
        for reply in FORCED[family]:
            theirs = server_message(port, {"messages": ASK, "grammar": literal(reply), "max_tokens": 64})
            assert isinstance(theirs, dict), theirs
            if isinstance(theirs.get("content"), str):
                theirs["content"] = theirs["content"].removesuffix(eos)
            ours = ctx.chat(ASK, sampler=lamina.Sampler(grammar=literal(reply)), max_tokens=64)
            assert ours.text == reply and ours.finish_reason == "stop"
            assert comparable(ours.message.openai()) == comparable(theirs), (reply, theirs)
            assert ours.reasoning_content or "</think>" not in reply  # thinking came apart from the answer


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(REPLIES))
def test_parsing_equals_llama_server(chat_models: dict[str, lamina.Model], family: str) -> None:
    """Each reply is a trailing assistant message: both continue it, the first token forced to be
    the end of the turn, and parse the template's generation prompt (which holds the reply) as the
    whole reply. Messages equal llama-server's /v1/chat/completions, errors included."""
    model = chat_models[family]
    eos = token(model, CHAT_FAMILIES[family][2])
    with llama_server(model.path, "-c", 2048, "--jinja") as port:
        ctx = model.context(n_ctx=2048)
        for reply in REPLIES[family]:
            messages = ASK + [{"role": "assistant", "content": reply}]
            theirs = server_message(port, {"messages": messages, "tools": TOOLS, "max_tokens": 4, "logit_bias": [[eos, 100]]})
            try:
                ours: Any = ctx.chat(messages, tools=TOOLS, max_tokens=4, sampler=lamina.Sampler(logit_bias={eos: 100.0}))
                ours = comparable(ours.message.openai())
            except ValueError as e:
                ours = "error" if "does not match the expected" in str(e) else str(e)
            assert ours == (comparable(theirs) if isinstance(theirs, dict) else "error"), (reply, theirs)


def test_misuse_is_an_error_not_a_crash(chat_models: dict[str, lamina.Model]) -> None:
    """What a misuse hunt killed the process with, each now a ValueError (or BusyError); run in a
    child so a regression fails this test rather than the run."""
    script = f"""
import threading, lamina
from lamina.chat import reply_parser
m = lamina.Model({str(chat_models["qwen3"].path)!r})
ctx = m.context(n_ctx=512)
def attempt(name, f):
    try:
        f()
        print(name, "ok", flush=True)
    except (ValueError, lamina.BusyError) as e:
        print(name, type(e).__name__, flush=True)
user = [{{"role": "user", "content": "hi"}}]
# an end-of-generation token in the reply's start, read by a grammar (llama.cpp aborted)
attempt("eog prefill", lambda: lamina.Sampler(grammar='root ::= "a"', generation_prompt="<|im_end|>",
                                            grammar_prefill=True).native(m))
attempt("eog prefill chat", lambda: ctx.chat(user + [{{"role": "assistant", "content": "<|im_end|>"}}],
                                            enable_thinking=False, json_schema={{"type": "object"}}, max_tokens=2))
# a reply nested deeper than llama.cpp's parser can recurse
p = reply_parser(m.render_chat(user, tools={TOOLS!r}))
attempt("deep reply", lambda: p.update('<tool_call>\\n{{"name": "f", "arguments": {{"a": ' + '[' * 4000, False))
# tool-call arguments nested 100,000 deep in the messages
deep = '{{"a": ' + '[' * 100000 + ']' * 100000 + '}}'
attempt("deep arguments", lambda: m.apply_chat_template(user + [{{"role": "assistant", "tool_calls": [{{"id": "c1",
    "type": "function", "function": {{"name": "f", "arguments": deep}}}}]}}], tools={TOOLS!r}))
attempt("bad trigger regex", lambda: lamina.Sampler(grammar='root ::= "a"', grammar_lazy=True,
                                                   grammar_trigger_patterns=["("]).native(m))
attempt("budget without an end", lambda: lamina.Sampler(reasoning_budget=4, reasoning_start="<think>").native(m))
# one parser, three threads (update releases the GIL)
q = reply_parser(m.render_chat(user, tools={TOOLS!r}))
busy = []
def hammer():
    for i in range(300):
        try:
            q.update("x" * 50, False); q.message; q.text
        except lamina.BusyError:
            busy.append(1)
threads = [threading.Thread(target=hammer) for _ in range(3)]
for t in threads: t.start()
for t in threads: t.join()
print("threads ok", flush=True)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    said = dict(line.rsplit(" ", 1) for line in out.stdout.splitlines())
    assert said == {"eog prefill": "ValueError", "eog prefill chat": "ValueError", "deep reply": "ValueError",
                    "deep arguments": "ValueError", "bad trigger regex": "ValueError",
                    "budget without an end": "ValueError", "threads": "ok"}, out.stdout
