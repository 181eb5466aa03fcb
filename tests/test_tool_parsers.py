"""Unit tests of tool calling's pure parts: the hermes, llama3_json and pythonic parsers (whole and streamed),
the JSON call scanners, the request plan (tool_choice -> constraint, errors; strict tools -> the hermes structural
tag, checked with xgrammar's own matcher on strings) and the server flags. Fast; no model."""

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
from flotilla.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser
from flotilla.entrypoints.openai.tool_parsers.pythonic import PythonicToolParser
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
    for name in ("pythonic", "llama3_json", "llama4_json"):
        assert server_config_from(serve_ns("--enable-auto-tool-choice", "--tool-call-parser", name),
                                  "m").tool_call_parser == name
    with pytest.raises(ValueError, match="'mistral' is not implemented.*available: hermes, llama3_json"):
        check_tool_parser("mistral")
    with pytest.raises(ValueError, match="'what' is unknown.*pythonic"):
        check_tool_parser("what")


# llama3_json and pythonic (the ``text_calls`` driver): whole, streamed at every split point, malformed.

LLAMA = Llama3JsonToolParser(None, NAMES)
PYTHONIC = PythonicToolParser(None, NAMES)
NESTED = '{"city": "Paris", "when": {"days": [1, 2], "note": "a } b ]"}, "units": null}'

LLAMA_CASES = [  # (model text, content, [(name, arguments)])
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", '{"city": "Paris"}')]),
    ('<|python_tag|>{"name": "get_weather", "arguments": ' + NESTED + '}', None, [("get_weather", NESTED)]),
    ('Let me check.\n<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}',
     "Let me check.", [("a", '{"x": 1}'), ("b", "{}")]),
    ('{"name": "a", "parameters": {"x": [1, {"y": "}\\""}]}}\n{"name": "f", "arguments": "{\\"q\\": 1}"} ok',
     " ok", [("a", '{"x": [1, {"y": "}\\""}]}'), ("f", '{"q": 1}')]),
    ('{"name": "f"}', None, [("f", "{}")]),
    ('{"name": "a", "parameters": {}} ;; then {"name": "Bob", "age": 3}', ' ;; then {"name": "Bob", "age": 3}',
     [("a", "{}")]),
    ('Use JSON: {"name": "Bob", "age": 3}', 'Use JSON: {"name": "Bob", "age": 3}', []),  # not a tool's name
    ('{"user": {"name": "a", "parameters": {}}}', '{"user": {"name": "a", "parameters": {}}}', []),  # nested
    ('function() { return {a: 1}; } <|python', 'function() { return {a: 1}; } <|python', []),
    ('<|python_tag|>brave_search.call(query="x")', '<|python_tag|>brave_search.call(query="x")', []),
    ("Hello there ", "Hello there ", []),
]

PY_NESTED = 'city="Paris", when={"days": [1, -2.5e3], "note": \'a ) b ], c\'}, flags=(True, False, None)'
PY_NESTED_JSON = '{"city": "Paris", "when": {"days": [1, -2500.0], "note": "a ) b ], c"}, "flags": [true, false, null]}'
PYTHONIC_CASES = [
    ('[get_weather(city="Paris")]', None, [("get_weather", '{"city": "Paris"}')]),
    (f"[get_weather({PY_NESTED})]", None, [("get_weather", PY_NESTED_JSON)]),
    ('I will call two.\n[a(x=1, y="""two\nlines"""), b()]\n', "I will call two.",
     [("a", '{"x": 1, "y": "two\\nlines"}'), ("b", "{}")]),
    ('[a( x = "é ✓" , ) ,\n b(q=[]),]  then [f(z={})]', "  then",
     [("a", '{"x": "é ✓"}'), ("b", '{"q": []}'), ("f", '{"z": {}}')]),
    ("see [1] and [the docs](x) or [a]", "see [1] and [the docs](x) or [a]", []),
    ('[nope(x=1)] [get_weather ]', '[nope(x=1)] [get_weather ]', []),  # not a tool; not a call
    ("", "", []),
]

# Malformed after a call's name: not a call when parsed whole; streamed, the call was sent before the break
# and stays one (pythonic closes its arguments), the text after the break is content.
BROKEN = [  # (parser, model text, streamed content, streamed calls)
    (LLAMA, '{"name": "a", "parameters": {"x": 1}', None, [("a", '{"x": 1}')]),  # cut short
    (LLAMA, '{"name": "a", "parameters": {"x": 1}, oops}', "ops}", [("a", '{"x": 1}')]),
    (PYTHONIC, "[a(1)]", "]", [("a", "{}")]),  # positional
    (PYTHONIC, "[a(x=y)]", "]", [("a", "{}")]),  # a name, not a literal
    (PYTHONIC, "[a(x=1, x=2)]", "]", [("a", '{"x": 1}')]),
    (PYTHONIC, "[a(x=1)", None, [("a", '{"x": 1}')]),  # cut short
    (PYTHONIC, '[a(x=1, y="unterminated)]', None, [("a", '{"x": 1}')]),
    (PYTHONIC, '[a(x=float("nan"))] [b(**k)] [f(x={1: 2})] [f(x=1e999)]', "] ] ] ]",
     [("a", "{}"), ("b", "{}"), ("f", "{}"), ("f", "{}")]),
]

PARSERS = [(LLAMA, case) for case in LLAMA_CASES] + [(PYTHONIC, case) for case in PYTHONIC_CASES]
PARSER_IDS = [f"{p.name}-{i}" for i, (p, _) in enumerate(PARSERS)]


def calls_of(calls: list[dict]) -> list[tuple[str, str]]:
    for c in calls:
        assert c["id"].startswith("chatcmpl-tool-") and c["type"] == "function"
        assert isinstance(json.loads(c["function"]["arguments"]), dict)
    return [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


@pytest.mark.parametrize("parser,case", PARSERS, ids=PARSER_IDS)
def test_inline_parsers_extract(parser, case):
    text, content, calls = case
    got_content, got_calls = parser.extract(text)
    assert (got_content, calls_of(got_calls)) == (content, calls)
    if parser is PYTHONIC:  # arguments are json.dumps of the keyword arguments
        assert all(json.dumps(json.loads(a), ensure_ascii=False) == a for _, a in calls)


def split_stream(parser, pieces: list[str]) -> tuple[str | None, list[tuple[str, str]], list[dict]]:
    s = parser.stream()
    content, calls, deltas = "", {}, []
    for d in [s.feed(p) for p in pieces] + [s.finish()]:
        assert set(d) <= {"content", "tool_calls"}
        content += d.get("content", "")
        for tc in d.get("tool_calls", []):
            deltas.append(tc)
            if "id" in tc:
                assert tc["index"] == len(calls) and tc["type"] == "function" and tc["function"]["name"]
                calls[tc["index"]] = [tc["function"]["name"], ""]
            else:
                assert tc["index"] in calls and set(tc["function"]) == {"arguments"}
            calls[tc["index"]][1] += tc["function"]["arguments"]
    return (content or None) if calls else content, [tuple(calls[i]) for i in sorted(calls)], deltas


@pytest.mark.parametrize("parser,case", PARSERS, ids=PARSER_IDS)
def test_inline_parsers_stream_equals_extract_at_every_split_point(parser, case):
    text, content, calls = case
    for i in range(len(text) + 1):
        assert split_stream(parser, [text[:i], text[i:]])[:2] == (content, calls), i
    for step in (1, 3, 7):
        pieces = [text[i:i + step] for i in range(0, len(text), step)]
        assert split_stream(parser, pieces)[:2] == (content, calls), step


@pytest.mark.parametrize("parser,text", [(LLAMA, LLAMA_CASES[2][0]), (PYTHONIC, PYTHONIC_CASES[2][0])])
def test_inline_parsers_stream_equals_extract_for_every_pair_of_split_points(parser, text):
    content, calls = parser.extract(text)
    want = (content, calls_of(calls))
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            assert split_stream(parser, [text[:i], text[i:j], text[j:]])[:2] == want, (i, j)


@pytest.mark.parametrize("parser,text", [
    (LLAMA, '<|python_tag|>{"name": "get_weather", "parameters": ' + NESTED + "}"),
    (PYTHONIC, f"[get_weather({PY_NESTED})]")])
def test_inline_parsers_send_id_and_name_first_then_argument_pieces(parser, text):
    _, [(name, arguments)], deltas = split_stream(parser, list(text))
    assert deltas[0]["id"].startswith("chatcmpl-tool-") and deltas[0]["function"]["name"] == name
    assert len(deltas) >= 4 and all("id" not in d for d in deltas[1:])
    assert json.loads(arguments)["when"]["days"][0] == 1


@pytest.mark.parametrize("parser,text,content,calls", BROKEN)
def test_inline_parsers_malformed_output_is_content_and_streams_valid_json(parser, text, content, calls):
    assert parser.extract(text) == (text, [])
    for i in range(len(text) + 1):
        got_content, got_calls, _ = split_stream(parser, [text[:i], text[i:]])
        assert got_content == content and [n for n, _ in got_calls] == [n for n, _ in calls], i
        if parser is PYTHONIC:
            assert got_calls == calls, i


@pytest.mark.parametrize("parser,case", PARSERS + [(p, (text, None, None)) for p, text, _, _ in BROKEN],
                         ids=PARSER_IDS + [f"broken-{p.name}-{i}" for i, (p, *_) in enumerate(BROKEN)])
def test_inline_parsers_never_raise_on_truncated_or_mangled_output(parser, case):
    """Every prefix (a max_tokens stop) and every one-character deletion: content or calls, never an error;
    text without calls comes back unchanged."""
    text = case[0]
    variants = [text[:i] for i in range(len(text))] + [text[:i] + text[i + 1:] for i in range(len(text))]
    for variant in variants:
        content, calls = parser.extract(variant)
        if not calls:
            assert content == variant
        split_stream(parser, [variant[:len(variant) // 2], variant[len(variant) // 2:]])


def test_inline_parsers_at_most_one_call_without_parallel_calls():
    for parser, text in [(Llama3JsonToolParser, '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {}}'),
                         (PythonicToolParser, "[a(), b()]")]:
        _, calls = parser(1, NAMES).extract(text)
        assert [c["function"]["name"] for c in calls] == ["a"]
        assert split_stream(parser(1, NAMES), list(text))[1] == [("a", "{}")]


def test_pythonic_never_evaluates():
    """Calls that would have effects if evaluated are not calls (a name, an attribute, a call, a lambda)."""
    for arg in ("__import__('os').system('true')", "open('/etc/passwd').read()", "(lambda: 1)()", "x.y", "f'{x}'"):
        text = f"[a(x={arg})]"
        assert PYTHONIC.extract(text) == (text, [])


ORACLE_LISTS = [  # pythonic lists whose strings, comments and brackets the lexer must see through
    "[a(x='', y='''it's \"q\", ok''', z=\"\\\"),\", w=r'\\'', v=\"\"\"\"\"\")]",
    "[a(x=[('(', ')'), {'k': '#,]'}], # a comment, with ) and ]\n y=-1_000, z=0x1F, t=\"\\u00e9\\n\", u='a' 'b')]",
    "[b(q={'a': {'b': [[], {}]}}), f(), a(x=.5e-3, y=+7,)]",
]


@pytest.mark.parametrize("text", ORACLE_LISTS)
def test_pythonic_arguments_equal_pythons_own_reading(text):
    """The oracle: Python's parser on the whole list, values by ``ast.literal_eval`` (which evaluates nothing)."""
    import ast
    want = [(call.func.id, json.dumps({k.arg: ast.literal_eval(k.value) for k in call.keywords}, ensure_ascii=False))
            for call in ast.parse(text, mode="eval").body.elts]
    content, calls = PYTHONIC.extract(text)
    assert (content, calls_of(calls)) == (None, want)
    assert split_stream(PYTHONIC, list(text))[:2] == (None, want)


def test_inline_parsers_stay_linear_on_long_and_deep_output():
    """A long argument full of commas and deeply nested unfinished or broken JSON parse once, not again
    from every brace (the stream is fed one character at a time, as the slowest client would get it)."""
    long_arg = "a, (b)] " * 4000
    text = f'[get_weather(city="{long_arg}")]'
    assert calls_of(PYTHONIC.extract(text)[1]) == [("get_weather", json.dumps({"city": long_arg}))]
    assert split_stream(PYTHONIC, list(text))[1] == [("get_weather", json.dumps({"city": long_arg}))]
    for deep in ('{"a": ' * 3000 + "1" + "}" * 2999 + " x", "[a(x=" + "[" * 3000, "{" * 5000):
        assert LLAMA.extract(deep) == (deep, []) and PYTHONIC.extract(deep) == (deep, [])
        assert split_stream(LLAMA, [deep])[:2] == (deep, [])


@pytest.mark.parametrize("parser,text", [("pythonic", 'Checking. [get_weather(city="Paris")]'),
                                         ("llama3_json", 'Checking. {"name": "get_weather", "parameters": '
                                                         '{"city": "Paris"}}')])
def test_auto_plan_uses_the_servers_parser(parser, text):
    """``ChoiceTools`` (what chat completions run per choice) with the server's parser, whole and streamed."""
    tools = plan(parser=parser, tools=[TOOL])
    assert tools.parser == parser
    whole = tools.choice()
    message = whole.message(text)
    assert message["content"] == "Checking." and whole.finish_reason("stop") == "tool_calls"
    assert calls_of(message["tool_calls"]) == [("get_weather", '{"city": "Paris"}')]
    streamed = tools.choice()
    deltas = [streamed.feed(ch) for ch in text] + [streamed.finish()]
    assert "".join(d.get("content", "") for d in deltas) == "Checking."
    assert "".join(tc["function"]["arguments"] for d in deltas for tc in d.get("tool_calls", [])) == \
        '{"city": "Paris"}'
    assert streamed.finish_reason("stop") == "tool_calls" and streamed.finish_reason("length") == "length"
