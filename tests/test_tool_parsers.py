"""Unit tests of tool calling's pure parts: the hermes parser (whole and streamed), the JSON call scanners,
the request plan (tool_choice -> constraint, errors; strict tools -> the hermes structural tag, checked with
xgrammar's own matcher on strings) and the server flags. Fast; no model."""

from __future__ import annotations

import argparse
import json

import pytest

from flotilla.entrypoints.openai.cli_args import add_serve_args, server_config_from
from flotilla.entrypoints.openai.protocol import ChatCompletionRequest
from flotilla.entrypoints.openai.tool_calling import ToolPlan
from flotilla.entrypoints.openai.tool_parsers import check_tool_parser
from flotilla.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from flotilla.entrypoints.openai.tool_parsers.json_calls import CallArrayScanner
from flotilla.errors import InvalidRequestError
from flotilla.structured.grammar import build_grammar

NAMES = ["get_weather", "a", "b", "f"]
PARSER = HermesToolParser(None, NAMES)

CASES = [  # (model text, content, [(name, arguments)])
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None,
     [("get_weather", '{"city": "Paris"}')]),
    ('Sure.\n<tool_call>\n{"name": "a", "arguments": {"x": [1, {"y": "}\\""}]}}\n</tool_call>\n<tool_call>\n'
     '{"arguments": "{\\"q\\": 1}", "name": "b"}\n</tool_call>\nDone <', "Sure.\n\n\nDone <",
     [("a", '{"x": [1, {"y": "}\\""}]}'), ("b", '{"q": 1}')]),
    ("no tools here <tool", "no tools here <tool", []),
    ("<tool_call>{bad}</tool_call> hi", "<tool_call>{bad}</tool_call> hi", []),
    ('<tool_call>{"x": 1}</tool_call> y', '<tool_call>{"x": 1}</tool_call> y', []),
    ('<tool_call>{"name": "f"}</tool_call>', None, [("f", "{}")]),
    ('<tool_call>{"na', '<tool_call>{"na', []),  # cut short: no call
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', None, [("get_weather", '{"city": "Paris"}')]),
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}\nok', "\nok", [("get_weather", '{"city": "Paris"}')]),
    (' {"name": "nope", "arguments": {}} x', ' {"name": "nope", "arguments": {}} x', []),  # not a tool
    ('{"a": 1}', '{"a": 1}', []),
    ("  ", "  ", []),
    ("Hello there ", "Hello there ", []),
]


def stream_parse(text: str, step: int, parser=PARSER) -> tuple[str | None, list[tuple[str, str]], list[dict]]:
    """Feed ``text`` in pieces of ``step`` characters; reassemble as an OpenAI client does."""
    s = parser.stream()
    content, calls, deltas = "", {}, []
    pieces = [text[i:i + step] for i in range(0, len(text), step)]
    for d in [s.feed(p) for p in pieces] + [s.finish()]:
        content += d.get("content", "")
        for tc in d.get("tool_calls", []):
            deltas.append(tc)
            if "id" in tc:
                assert tc["index"] not in calls and tc["type"] == "function"
                calls[tc["index"]] = [tc["function"]["name"], ""]
            calls[tc["index"]][1] += tc["function"]["arguments"]
    return content or None, [tuple(calls[i]) for i in sorted(calls)], deltas


@pytest.mark.parametrize("text,content,calls", CASES)
def test_hermes_extract(text, content, calls):
    got_content, got_calls = PARSER.extract(text)
    assert got_content == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in got_calls] == calls
    for c in got_calls:
        assert c["id"].startswith("chatcmpl-tool-") and c["type"] == "function"
        json.loads(c["function"]["arguments"])


@pytest.mark.parametrize("step", [1, 2, 5, 10_000])
@pytest.mark.parametrize("text,content,calls", CASES)
def test_hermes_stream_reassembles_to_extract(text, content, calls, step):
    got_content, got_calls, _ = stream_parse(text, step)
    assert (got_content, got_calls) == (content, calls)


def test_hermes_stream_sends_the_name_first_then_argument_fragments():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    _, _, deltas = stream_parse(text, 1)
    assert deltas[0]["id"].startswith("chatcmpl-tool-") and deltas[0]["function"]["name"] == "get_weather"
    assert len(deltas) > 5 and all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                                   for d in deltas[1:])


def test_hermes_at_most_one_call_without_parallel_calls():
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}</tool_call>'
    _, calls = HermesToolParser(1, NAMES).extract(text)
    assert [c["function"]["name"] for c in calls] == ["a"]
    assert stream_parse(text, 3, HermesToolParser(1, NAMES))[1] == [("a", "{}")]


def test_required_array_scanner():
    text = '[{"name": "a", "parameters": {"x": "]}"}}, {"name": "b", "parameters": {}}]'
    scanner = CallArrayScanner()
    for ch in text:
        scanner.feed(ch)
    assert scanner.state == "done"
    assert [(s.name, s.arguments_text) for s in scanner.scanners] == [("a", '{"x": "]}"}'), ("b", "{}")]


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def plan(auto=True, parser="hermes", **body) -> ToolPlan:
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **body})
    return req.tool_plan(auto, parser)


def test_plans():
    assert plan(tools=[TOOL]).mode == "auto" and plan(tools=[TOOL]).tool_names == ("get_weather",)
    assert plan().mode == "none" and plan(tools=[TOOL], tool_choice="none").mode == "none"
    assert plan(tools=[], tool_choice="required").mode == "none"  # OpenAI / vLLM: required without tools
    named = plan(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.mode == "named" and named.constraint.json == TOOL["function"]["parameters"]
    required = plan(tools=[TOOL], tool_choice="required", parallel_tool_calls=False)
    schema = required.constraint.json
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    assert schema["items"]["anyOf"][0]["properties"]["name"] == {"type": "string", "enum": ["get_weather"]}
    assert "maxItems" not in plan(tools=[TOOL], tool_choice="required").constraint.json


@pytest.mark.parametrize("kw,param,words", [
    ({"auto": False, "tools": [TOOL]}, "tool_choice", "--enable-auto-tool-choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "x"}}}, "tool_choice", "'x'"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [TOOL, TOOL]}, "tools", "duplicate"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]}, "tools",
     "not a valid JSON schema"),
])
def test_plan_errors(kw, param, words):
    with pytest.raises(InvalidRequestError) as info:
        plan(**kw)
    assert info.value.param == param and words in info.value.message


STRICT = {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["paris", "rome"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 3}},
    "required": ["city", "days"], "additionalProperties": False}}}
LOOSE = {"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}


def grammar_accepts(params, text: str) -> bool:
    """Whether the whole of ``text`` is an output the constraint allows (xgrammar's matcher, on characters)."""
    import xgrammar
    compiled = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo([])).compile_grammar(build_grammar(params))
    matcher = xgrammar.GrammarMatcher(compiled, terminate_without_stop_token=True)
    return matcher.accept_string(text) and matcher.is_completed()


def test_strict_tools_constrain_auto_calls():
    assert plan(tools=[TOOL]).constraint is None  # no strict tool: free text, the parser reads what comes
    p = plan(tools=[STRICT, LOOSE])
    assert p.mode == "auto" and p.constraint.kind() == "structural_tag"
    call = '{"name": "get_weather", "arguments": {"city": "paris", "days": 2}}'
    allowed = ["Hello there", "", call, call + "\nok", f"Sure. <tool_call>\n{call}\n</tool_call> and more",
               '<tool_call>\n{"name": "f", "arguments": {"y": [1]}}\n</tool_call>']  # f is not strict
    refused = ['{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}',  # not in the enum
               '<tool_call>\n{"name": "get_weather", "arguments": {"city": "rome", "days": 9}}\n</tool_call>',
               '<tool_call>\n{"name": "get_weather", "arguments": {"city": "rome"}}\n</tool_call>',
               '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',
               '<tool_call>{"name": "f", "arguments": {}}</tool_call>']  # a block opens as the template says
    assert [t for t in allowed if not grammar_accepts(p.constraint, t)] == []
    assert [t for t in refused if grammar_accepts(p.constraint, t)] == []
    one = plan(tools=[STRICT], parallel_tool_calls=False).constraint
    assert grammar_accepts(one, call) and not grammar_accepts(one, call + call)


def test_a_constrained_parser_reads_only_the_calls_the_grammar_constrains():
    """A bare object that does not open as the grammar's trigger was not constrained: it stays content."""
    names = ["get_weather", "f"]
    free = '{"name":"get_weather","arguments":{"city":"Paris"}}'
    assert grammar_accepts(plan(tools=[STRICT, LOOSE]).constraint, free)  # the grammar leaves it free ...
    constrained = HermesToolParser(None, names, constrained=True)
    assert constrained.extract(free) == (free, [])  # ... so it is no call
    assert HermesToolParser(None, names).extract(free)[1]  # (the unconstrained parser reads it)
    for step in (1, 3, 10_000):
        assert stream_parse(free, step, constrained)[:2] == (free, [])
    call = '{"name": "get_weather", "arguments": {"city": "paris", "days": 2}}'
    for text in (call, f"<tool_call>\n{call}\n</tool_call>"):
        content, calls = constrained.extract(text)
        assert content is None and [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == \
            [("get_weather", '{"city": "paris", "days": 2}')]
        assert stream_parse(text, 2, constrained)[:2] == (None, [("get_weather", '{"city": "paris", "days": 2}')])


def test_strict_tools_need_a_parser_with_a_structural_tag(monkeypatch):
    from flotilla.entrypoints.openai import tool_calling

    class Plain(HermesToolParser):
        structural_tag = None
    monkeypatch.setitem(tool_calling.TOOL_PARSERS, "plain", Plain)
    assert plan(parser="plain", tools=[TOOL]).mode == "auto"
    with pytest.raises(InvalidRequestError) as info:
        plan(parser="plain", tools=[STRICT])
    assert info.value.param == "tools" and "--tool-call-parser plain" in info.value.message


def test_strict_tools_with_another_constraint_are_400():
    from flotilla.entrypoints.openai.serving_chat import with_tool_constraint
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "tools": [STRICT],
                                                "response_format": {"type": "json_object"}})
    with pytest.raises(InvalidRequestError) as info:
        with_tool_constraint(req.to_sampling_params(), req.tool_plan(True, "hermes"))
    assert info.value.param == "tool_choice" and "strict tools" in info.value.message


def test_assistant_tool_calls_reach_the_template_with_dict_arguments():
    from flotilla.entrypoints.openai.protocol import template_messages
    req = ChatCompletionRequest.model_validate({"messages": [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}]})
    msgs = template_messages(req.messages, 100)
    assert msgs[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert msgs[1]["tool_call_id"] == "c1"


def serve_ns(*argv):
    p = argparse.ArgumentParser()
    add_serve_args(p)
    return p.parse_args(list(argv))


def test_server_flags():
    cfg = server_config_from(serve_ns("--enable-auto-tool-choice", "--tool-call-parser", "hermes"), "m")
    assert cfg.enable_auto_tool_choice and cfg.tool_call_parser == "hermes"
    with pytest.raises(ValueError, match="needs --tool-call-parser"):
        server_config_from(serve_ns("--enable-auto-tool-choice"), "m")
    for name in ("pythonic", "llama3_json", "what"):
        with pytest.raises(ValueError, match="available: hermes"):
            check_tool_parser(name)
