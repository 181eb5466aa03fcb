"""Structured output over HTTP: a real ``flotilla serve`` (tiny random Llama) with the openai client.

A random model says nothing sensible, so the constraints here are ones whose every completion is short:
choices, a bounded regex, JSON schemas whose every string, array and number is bounded (the 20 of
``structured_schemas``, compact: free JSON whitespace would let a random model ramble), a Lark grammar. A
random model also takes odd paths through a grammar (escapes, Unicode, empty arrays), which the schemas must
still validate. Specs xgrammar rejects are served by llguidance (the default ``auto`` backend); invalid specs
are 400s naming the field and, when both backends reject one, both reasons.
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import openai
import pytest

from structured_schemas import GUIDANCE_ONLY, LARK, SCHEMAS, validate
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
    ({"guided_regex": "[a-z]", "guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
])
def test_invalid_structured_request_is_400_naming_the_field(server, body, param):
    r = httpx.post(f"{server.base_url}/chat/completions", timeout=60,
                   json={"model": "tiny", "messages": MESSAGES, "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


async def _post_all(server, bodies: list[tuple[str, dict]]) -> list[dict]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as http:
        responses = await asyncio.gather(*(http.post(path, json=body) for path, body in bodies))
    for r in responses:
        assert r.status_code == 200, r.text
    return [r.json() for r in responses]


def _text(response: dict) -> str:
    choice = response["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def test_twenty_json_schemas_at_once_every_output_validates(server):
    """All 20 schemas in flight together, alternating chat (greedy) and completions (seeded sampling); every
    output is complete (finish_reason stop, well inside max_tokens) and validates."""
    bodies = []
    for i, schema in enumerate(SCHEMAS):
        constraint = {"max_tokens": 128, "structured_outputs": {"json": schema, "disable_any_whitespace": True}}
        if i % 2 == 0:
            bodies.append(("/chat/completions", {"model": "tiny", "messages": MESSAGES, "temperature": 0,
                                                 **constraint}))
        else:
            bodies.append(("/completions", {"model": "tiny", "prompt": "JSON:", "temperature": 1.0, "seed": i,
                                            **constraint}))
    for i, (response, schema) in enumerate(zip(asyncio.run(_post_all(server, bodies)), SCHEMAS)):
        assert response["choices"][0]["finish_reason"] == "stop", (i, _text(response))
        validate(json.loads(_text(response)), schema)


def test_specs_xgrammar_rejects_are_served_with_llguidance(server):
    """The default auto backend: a draft-07 tuple schema, a Lark grammar, a regex with a scoped flag and a
    JSON whitespace pattern (each one xgrammar rejects) are served by llguidance and obeyed; asking for
    xgrammar alone is a 400 with its reason."""
    chat = {"model": "tiny", "messages": MESSAGES, "max_tokens": 64, "temperature": 0}
    responses = asyncio.run(_post_all(server, [
        ("/chat/completions", {**chat, "structured_outputs": {"json": GUIDANCE_ONLY, "disable_any_whitespace": True}}),
        ("/chat/completions", {**chat, "guided_grammar": LARK}),
        ("/completions", {"model": "tiny", "prompt": "x", "max_tokens": 16, "temperature": 1.0, "seed": 3,
                          "guided_regex": "(?i:yes|no)-[0-9]"}),
        ("/completions", {"model": "tiny", "prompt": "x", "max_tokens": 16, "temperature": 0,
                          "guided_json": {"type": "object", "properties": {"ok": {"type": "boolean"}},
                                          "required": ["ok"]}, "guided_whitespace_pattern": "[ ]?"}),
    ]))
    assert all(r["choices"][0]["finish_reason"] == "stop" for r in responses), [_text(r) for r in responses]
    validate(json.loads(_text(responses[0])), GUIDANCE_ONLY)
    assert re.fullmatch(r"The answer is (yes|no)\.", _text(responses[1]))
    assert re.fullmatch(r"(?i:yes|no)-[0-9]", _text(responses[2]))
    assert re.fullmatch(r'\{ ?"ok" ?: ?(true|false) ?\}', _text(responses[3])), _text(responses[3])
    r = httpx.post(f"{server.base_url}/chat/completions", timeout=60,
                   json={**chat, "guided_grammar": LARK, "guided_decoding_backend": "xgrammar"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_grammar", r.text
    assert "xgrammar: EBNF" in r.json()["error"]["message"] and "llguidance" not in r.json()["error"]["message"]


def test_schema_both_backends_reject_is_400_with_both_reasons(server):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10, "maximum": 1}},
              "required": ["n"]}
    r = httpx.post(f"{server.base_url}/chat/completions", timeout=60, json={
        "model": "tiny", "messages": MESSAGES, "max_tokens": 5,
        "response_format": {"type": "json_schema", "json_schema": {"name": "bad", "schema": schema}}})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format"
    assert re.search(r"xgrammar: .*minimum greater than maximum.*; llguidance: .*'n' is unsatisfiable",
                     error["message"]), error["message"]
