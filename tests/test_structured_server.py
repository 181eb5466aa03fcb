"""Structured output over HTTP: a real ``flotilla serve`` (tiny random Llama) with the openai client.

A random model says nothing sensible, so the constraints here are ones whose every completion is short:
choices, a bounded regex, an enum-only JSON schema. Invalid specs are 400s naming the field.
"""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from test_server_helpers import ServerProcess

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "user", "content": "Pick one."}]
ENUM_SCHEMA = {"type": "object", "properties": {"c": {"enum": ["a", "b"]}}, "required": ["c"],
               "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tiny_llama):
    srv = ServerProcess(tiny_llama[0], "--max-model-len", "512", "--num-kv-blocks", "256",
                        "--served-model-name", "tiny")
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)


def test_chat_response_format_json_schema(client):
    r = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": ENUM_SCHEMA}})
    # The random model may spend its tokens on the whitespace JSON allows: what it wrote is a prefix of the
    # only two documents the schema admits (whitespace aside), complete and valid when it stopped.
    compact = re.sub(r"\s", "", r.choices[0].message.content)
    assert any(doc.startswith(compact) for doc in ('{"c":"a"}', '{"c":"b"}')), compact
    if r.choices[0].finish_reason == "stop":
        assert json.loads(r.choices[0].message.content)["c"] in ("a", "b")
    compact_req = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=40, temperature=0,
        extra_body={"structured_outputs": {"json": ENUM_SCHEMA, "disable_any_whitespace": True}})
    assert json.loads(compact_req.choices[0].message.content)["c"] in ("a", "b")
    assert compact_req.choices[0].finish_reason == "stop"


def test_completion_guided_choice_and_regex_streamed_and_n2(client):
    r = client.completions.create(model="tiny", prompt="x", max_tokens=10, n=2, temperature=1.0, seed=1,
                                  extra_body={"guided_choice": ["alpha", "beta"]})
    assert sorted({c.text for c in r.choices}) <= ["alpha", "beta"] and len(r.choices) == 2
    stream = client.completions.create(model="tiny", prompt="x", max_tokens=10, temperature=0, stream=True,
                                       extra_body={"structured_outputs": {"regex": "[0-9]{2}-[a-c]"}})
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert re.fullmatch(r"[0-9]{2}-[a-c]", text)


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"guided_regex": "([a-"}, "guided_regex"),
    ({"structured_outputs": {"grammar": "root ::= missing"}}, "structured_outputs"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex"),
    ({"guided_choice": ["a"], "guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
])
def test_invalid_structured_request_is_400_naming_the_field(server, body, param):
    r = httpx.post(f"{server.base_url}/chat/completions", timeout=60,
                   json={"model": "tiny", "messages": MESSAGES, "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
