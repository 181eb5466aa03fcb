"""The clients people already use, unchanged, against a real ``flotilla serve`` (issue 13): the openai SDK's
``chat.completions.parse`` with pydantic models, and LangChain's ``ChatOpenAI`` (``with_structured_output`` in
its ``json_schema``, ``function_calling`` and ``json_mode`` methods; ``bind_tools`` with auto, required and
named tool choices, streaming, and a tool result sent back).

The server is the session's Qwen2.5-Coder-0.5B-Instruct with ``--enable-auto-tool-choice --tool-call-parser
hermes`` (``qwen_server.py``, shared with ``test_tool_calling.py``). Every request is greedy, so each answer is
fixed: the tests assert what the model says (Paris is in France, Alice's basket holds a red and a green item,
6 times 7 is ``multiply(a=6, b=7)``), which a server that dropped ``response_format`` or ``tools`` would not
return as a parsed object. Each LangChain test also checks, on the wire, that LangChain used the mechanism the
method names (an httpx hook records the request bodies), so a LangChain release that changed its requests
could not pass by accident.
"""

from __future__ import annotations

import enum
import json
from typing import Annotated

import httpx
import openai
import pytest
from pydantic import BaseModel, Field, ValidationError

from qwen_server import QWEN_MODEL

pytestmark = pytest.mark.slow
langchain_openai = pytest.importorskip("langchain_openai")  # the test extra installs it (pyproject.toml)


class Town(BaseModel):
    """A flat model (its name is the tool's under ``function_calling``: "City" would compete with ``name``)."""

    name: str
    country: str
    is_capital: bool


class Color(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Item(BaseModel):
    name: str
    color: Color


class Basket(BaseModel):
    """A nested model: a list of objects with an enum ($defs and $refs in the SDKs' schemas)."""

    owner: str
    items: list[Item]


TOWN_ASK = "Describe Paris. Answer in JSON with the keys name, country and is_capital."
BASKET_ASK = ("Alice has a red apple and a green pear. Answer in JSON with keys owner and items "
              "(each item has name and color).")
CASES = {"flat": (Town, TOWN_ASK), "nested": (Basket, BASKET_ASK)}


def check_answer(obj) -> None:
    """The content greedy decoding gives for each case (what an unconstrained or ignored request would not)."""
    if isinstance(obj, Town):
        assert (obj.name, obj.country, obj.is_capital) == ("Paris", "France", True), obj
    else:
        assert isinstance(obj, Basket) and obj.owner == "Alice", obj
        assert [i.color for i in obj.items] == [Color.red, Color.green], obj


@pytest.mark.parametrize("case", list(CASES))
def test_openai_parse_returns_the_pydantic_model(qwen_client, case):
    model, ask = CASES[case]
    r = qwen_client.chat.completions.parse(model=QWEN_MODEL, messages=[{"role": "user", "content": ask}],
                                           response_format=model, temperature=0, max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    parsed = choice.message.parsed
    assert isinstance(parsed, model) and choice.message.refusal is None
    assert model.model_validate_json(choice.message.content) == parsed
    check_answer(parsed)


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: Annotated[str, Field(pattern="^[a-z]+$")]  # lower case: not what the model writes on its own


WEATHER_ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


def test_openai_parse_strict_tool_arguments(qwen_client):
    """``pydantic_function_tool`` marks the tool ``strict``: under ``auto`` its arguments follow the schema, and
    the SDK parses them into the model. Without ``strict`` the same request gets the model's own arguments,
    which the schema refuses: the constraint is what made the parsed call valid."""
    tool = openai.pydantic_function_tool(GetWeather)
    assert tool["function"]["strict"] is True
    r = qwen_client.chat.completions.parse(model=QWEN_MODEL, messages=WEATHER_ASK, tools=[tool], temperature=0,
                                           max_tokens=64)
    choice = r.choices[0]
    [call] = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and call.function.name == "GetWeather"
    assert call.function.parsed_arguments == GetWeather(city="paris")
    loose = {"type": "function", "function": dict(tool["function"], strict=False)}
    r = qwen_client.chat.completions.create(model=QWEN_MODEL, messages=WEATHER_ASK, tools=[loose], temperature=0,
                                            max_tokens=64)
    [call] = r.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    with pytest.raises(ValidationError):
        GetWeather.model_validate_json(call.function.arguments)


class Recorder:
    """The JSON bodies of the requests an httpx client sends (an event hook)."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.client = httpx.Client(timeout=300, event_hooks={"request": [self.record]})

    def record(self, request: httpx.Request) -> None:
        request.read()
        self.bodies.append(json.loads(request.content))

    def last(self) -> dict:
        return self.bodies[-1]


@pytest.fixture
def chat(qwen_server):
    """(ChatOpenAI on the server, greedy; the recorder of its requests)."""
    rec = Recorder()
    llm = langchain_openai.ChatOpenAI(base_url=qwen_server.base_url, api_key="x", model=QWEN_MODEL,
                                      temperature=0, max_tokens=200, max_retries=0, http_client=rec.client)
    yield llm, rec
    rec.client.close()


def sent_json_schema(body: dict, model) -> bool:
    rf = body.get("response_format") or {}
    return rf.get("type") == "json_schema" and rf["json_schema"]["name"] == model.__name__


def sent_named_tool(body: dict, model) -> bool:
    return body.get("tool_choice") == {"type": "function", "function": {"name": model.__name__}} and \
        [t["function"]["name"] for t in body["tools"]] == [model.__name__]


def sent_json_object(body: dict, model) -> bool:
    return body.get("response_format") == {"type": "json_object"} and "tools" not in body


SENT = {"json_schema": sent_json_schema, "function_calling": sent_named_tool, "json_mode": sent_json_object}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", list(SENT))
def test_langchain_with_structured_output(chat, method, case):
    llm, rec = chat
    model, ask = CASES[case]
    out = llm.with_structured_output(model, method=method).invoke(ask)  # json_mode: the prompt asks for JSON
    assert SENT[method](rec.last(), model), rec.last()
    assert isinstance(out, model)
    check_answer(out)


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return "sunny"


TOOLS = [get_weather, multiply]


def calls(message) -> list[tuple[str, dict]]:
    return [(c["name"], c["args"]) for c in message.tool_calls]


@pytest.mark.parametrize("tool_choice,sent,strict", [
    (None, None, None), (None, None, True), ("any", "required", None),
    ("multiply", {"type": "function", "function": {"name": "multiply"}}, None)])
def test_langchain_bind_tools_returns_tool_calls(chat, tool_choice, sent, strict):
    llm, rec = chat
    msg = llm.bind_tools(TOOLS, tool_choice=tool_choice, strict=strict).invoke("What is 6 times 7?")
    body = rec.last()
    assert body.get("tool_choice") == sent and [t["function"]["name"] for t in body["tools"]] == \
        ["get_weather", "multiply"], body
    assert [t["function"].get("strict") for t in body["tools"]] == [strict, strict]
    assert calls(msg) == [("multiply", {"a": 6, "b": 7})], msg
    assert msg.content == "" and msg.response_metadata["finish_reason"] in ("tool_calls", "stop")
    assert msg.tool_calls[0]["id"].startswith("chatcmpl-tool-")


def test_langchain_streamed_tool_call_matches_the_invoked_one(chat):
    llm, rec = chat
    bound = llm.bind_tools(TOOLS)
    chunks = list(bound.stream("What is 6 times 7?"))
    assert rec.last()["stream"] is True and len(chunks) > 2
    whole = chunks[0]
    for c in chunks[1:]:
        whole = whole + c  # LangChain joins the tool-call deltas by index
    assert calls(whole) == calls(bound.invoke("What is 6 times 7?")) == [("multiply", {"a": 6, "b": 7})]


def test_langchain_tool_result_reaches_the_model(chat):
    from langchain_core.messages import HumanMessage, ToolMessage
    llm, rec = chat
    history = [HumanMessage("What is the weather like in Paris right now?")]
    ai = llm.bind_tools(TOOLS, tool_choice="get_weather").invoke(history)
    assert calls(ai) == [("get_weather", {"city": "Paris"})]
    history += [ai, ToolMessage(json.dumps({"temperature_c": 21, "sky": "sunny"}), tool_call_id=ai.tool_calls[0]["id"])]
    answer = llm.bind_tools(TOOLS, tool_choice="none").invoke(history)
    sent = rec.last()["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"] and sent[1]["tool_calls"], sent
    # "21" is in the tool's result only: the answer can only have it from there (as in test_tool_calling.py).
    assert not answer.tool_calls and "21" in answer.content, answer
