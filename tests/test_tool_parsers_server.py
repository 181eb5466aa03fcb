"""The ``pythonic`` tool parser in a real ``flotilla serve`` (issue 13 item 3), and ``/tokenize`` with ``tools``.

No model here was trained for pythonic calls, so the server gets a ``--chat-template`` that renders the tools as
Python signatures and shows one example call; the embedded SmolLM2-135M-Instruct then answers "What time is it
in Tokyo?" with ``[get_time(timezone="Asia/Tokyo")]`` (greedy), which the parser must turn into ``tool_calls``,
whole and streamed token by token. A structured-output regex (vLLM allows one with ``tool_choice: auto``) makes
the model write two calls whose values it picks itself, so parallel calls are exercised on real output too.
``required`` and a named function are enforced by structured output (vLLM's JSON schemas, whatever the parser)
and must come back as ``tool_calls``. ``/tokenize`` with the same messages and tools must count exactly the
chat completion's ``usage.prompt_tokens``.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from test_server_helpers import ServerProcess

pytestmark = pytest.mark.slow

TEMPLATE = """<|im_start|>system
You are a helpful assistant that can call functions. To call functions, answer with only a Python list of calls \
with keyword arguments, like [get_time(timezone="Europe/Paris")]. To call several, list them all: [f(a=1), g(b="x")].
{%- if tools %}
Functions:
{%- for tool in tools %}
{%- set params = tool.function.parameters or {} %}
- {{ tool.function.name }}({% for name, p in (params.properties or {}).items() %}{{ name }}=<{{ p.type }}>\
{% if not loop.last %}, {% endif %}{% endfor %}): {{ tool.function.description }}
{%- endfor %}
{%- endif %}<|im_end|>
<|im_start|>user
What time is it in London?<|im_end|>
<|im_start|>assistant
[get_time(timezone="Europe/London")]<|im_end|>
{% for message in messages -%}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% endif -%}
"""
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the current local time in a time zone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
TOKYO = [{"role": "user", "content": "What time is it in Tokyo?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    template = tmp_path_factory.mktemp("templates") / "pythonic.jinja"
    template.write_text(TEMPLATE)
    srv = ServerProcess(None, "--dtype", "float32", "--max-model-len", "1024", "--num-kv-blocks", "128", "--served-model-name", "smol",
                        "--chat-template", str(template), "--enable-auto-tool-choice", "--tool-call-parser",
                        "pythonic")
    yield srv
    assert srv.stop() == 0, srv.output()


def chat(server, **body) -> dict:
    body = {"model": "smol", "temperature": 0, "max_tokens": 40, "tools": TOOLS, **body}
    r = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def chat_stream(server, **body) -> tuple[str | None, list[tuple[str, str]], str, int]:
    """(content, [(name, arguments)], finish_reason, tool-call chunks) reassembled as OpenAI clients do."""
    body = {"model": "smol", "temperature": 0, "max_tokens": 40, "tools": TOOLS, "stream": True, **body}
    content, calls, finish, chunks = "", {}, None, 0
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            content += choice["delta"].get("content") or ""
            for tc in choice["delta"].get("tool_calls") or []:
                chunks += 1
                if "id" in tc:
                    assert tc["index"] not in calls and tc["id"].startswith("chatcmpl-tool-")
                    calls[tc["index"]] = [tc["function"]["name"], ""]
                calls[tc["index"]][1] += tc["function"].get("arguments") or ""
            finish = choice["finish_reason"] or finish
    return content or None, [tuple(calls[i]) for i in sorted(calls)], finish, chunks


def calls_of(choice: dict) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in choice["message"].get("tool_calls") or []]


def test_auto_parses_the_models_pythonic_call(server):
    choice = chat(server, messages=TOKYO)["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
    [(name, arguments)] = calls_of(choice)
    assert name == "get_time" and json.loads(arguments) == {"timezone": "Asia/Tokyo"}
    assert chat_stream(server, messages=TOKYO)[:3] == (None, [(name, arguments)], "tool_calls")


def test_auto_parses_parallel_calls_the_model_writes_under_a_regex(server):
    regex = r'\[get_weather\(city="[A-Z][a-z]{2,12}"\), get_time\(timezone="[A-Z][a-z]{2,12}/[A-Z][a-z]{2,12}"\)\]'
    ask = [{"role": "user", "content": "What is the weather in Rome, and the time there?"}]
    choice = chat(server, messages=ask, structured_outputs={"regex": regex})["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
    calls = calls_of(choice)
    assert [name for name, _ in calls] == ["get_weather", "get_time"]
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    content, s_calls, finish, chunks = chat_stream(server, messages=ask, structured_outputs={"regex": regex})
    assert (content, s_calls, finish) == (None, calls, "tool_calls") and chunks >= 4


def test_auto_without_a_call_is_content(server):
    ask = [{"role": "user", "content": "Say hello in French, one word."}]
    choice = chat(server, messages=ask, max_tokens=12)["choices"][0]
    assert "tool_calls" not in choice["message"] and choice["message"]["content"], choice
    assert choice["finish_reason"] in ("stop", "length")
    assert chat_stream(server, messages=ask, max_tokens=12)[:3] == (choice["message"]["content"], [],
                                                                    choice["finish_reason"])


@pytest.mark.parametrize("tool_choice,finish", [
    ("required", "tool_calls"), ({"type": "function", "function": {"name": "get_weather"}}, "stop")])
def test_required_and_named_come_back_as_tool_calls(server, tool_choice, finish):
    # one call (the 135M model would repeat calls up to max_tokens): vLLM's schema with "maxItems": 1
    fields = dict(messages=TOKYO, tool_choice=tool_choice, parallel_tool_calls=False, max_tokens=160)
    choice = chat(server, **fields)["choices"][0]
    assert choice["finish_reason"] == finish and choice["message"]["content"] is None, choice
    calls = calls_of(choice)
    assert len(calls) == 1 and calls[0][0] in SCHEMAS
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    if isinstance(tool_choice, dict):
        assert [name for name, _ in calls] == ["get_weather"]
    assert chat_stream(server, **fields)[:3] == (None, calls, finish)


def test_tokenize_with_tools_counts_the_chat_prompt(server):
    messages = [{"role": "system", "content": "Be brief."}] + TOKYO
    usage = chat(server, messages=messages, max_tokens=1)["usage"]
    r = httpx.post(f"{server.url}/tokenize", json={"model": "smol", "messages": messages, "tools": TOOLS}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["count"] == usage["prompt_tokens"] == len(r.json()["tokens"])
    without = httpx.post(f"{server.url}/tokenize", json={"model": "smol", "messages": messages}, timeout=60).json()
    assert without["count"] < usage["prompt_tokens"]  # the tools are rendered
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": r.json()["tokens"]}, timeout=60).json()["prompt"]
    assert "- get_weather(city=<string>): Get the current weather in a city" in text


@pytest.mark.parametrize("body,param", [
    ({"prompt": "hi", "tools": TOOLS}, "tools"),
    ({"messages": TOKYO, "tools": [{"type": "function", "function": {"name": "f", "bogus": 1}}]}, "tools"),
])
def test_tokenize_with_bad_tools_is_400(server, body, param):
    r = httpx.post(f"{server.url}/tokenize", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param), r.json()
