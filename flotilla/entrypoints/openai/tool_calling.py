"""Tool calling on chat completions (OpenAI's ``tools``, ``tool_choice``, ``parallel_tool_calls``), as vLLM does it.

Contract of ``ToolFields.tool_plan(enable_auto, parser_name)`` (request validation; ``InvalidRequestError``
naming the field):
- ``tool_choice`` left out means ``auto`` when ``tools`` are given, else ``none``; ``none`` (or no tools)
  generates plain text (the tools still reach the chat template, as in vLLM).
- ``auto`` with tools needs ``--enable-auto-tool-choice`` and ``--tool-call-parser`` (else 400, as vLLM); the
  parser extracts calls from free text. When a tool has ``strict: true`` (OpenAI's structured outputs for
  function calling; vLLM enforces it the same way) the output is constrained by the parser's structural tag:
  text stays free, and every call the parser reads names a tool and has arguments that follow the schema of
  a strict tool (any JSON for the other tools).
- ``required`` constrains the output (structured output) to vLLM's schema: a JSON array (``minItems`` 1;
  ``maxItems`` 1 with ``parallel_tool_calls: false``) of ``{"name": <one tool's name>, "parameters": <its
  parameters schema>}`` (``anyOf`` over the tools); with ``tools: []`` it means ``none`` (OpenAI, vLLM).
- ``{"type": "function", "function": {"name": N}}`` constrains the output to N's parameters schema; N must
  be one of ``tools``.
- Every tool's ``parameters`` must be a JSON schema xgrammar accepts (400 naming ``tools``). ``strict`` changes
  nothing for ``required`` and named choices: they are always constrained.
The response (``ChoiceTools``): calls as ``tool_calls`` with ids ``chatcmpl-tool-<hex>``, ``arguments`` the
JSON text generated; ``content`` None for ``required`` and named (the text outside the calls for ``auto``);
``finish_reason`` ``tool_calls`` when ``required`` or ``auto`` produced calls and generation stopped
normally (a length stop stays ``length``), and the engine's for a named function (OpenAI, vLLM: ``stop``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flotilla.entrypoints.openai.tool_parsers import TOOL_PARSERS
from flotilla.entrypoints.openai.tool_parsers.json_calls import CallArrayScanner, CallEmitter, tool_call_id
from flotilla.errors import InvalidRequestError
from flotilla.sampling_params import StructuredOutputsParams
from flotilla.structured.grammar import validate_structured


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class FunctionDefinition(_Strict):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


@dataclass(frozen=True)
class ToolPlan:
    """What a request asks of tools: ``mode`` "none" | "auto" | "required" | "named"; ``name`` the named
    function; ``constraint`` the structured output that enforces it; ``template_tools`` for the chat
    template; ``max_calls`` 1 with ``parallel_tool_calls: false``."""

    mode: str = "none"  # "auto" with ``constraint``: strict tools
    name: str | None = None
    constraint: StructuredOutputsParams | None = None
    template_tools: list[dict] | None = None
    max_calls: int | None = None
    parser: str | None = None
    tool_names: tuple[str, ...] = ()

    def choice(self) -> "ChoiceTools":
        return ChoiceTools(self)


class ToolFields(BaseModel):
    """The tool fields of a chat completion request (mixed into ``ChatCompletionRequest``)."""

    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True

    def tool_plan(self, enable_auto: bool, parser: str | None) -> ToolPlan:
        tools = self.tools or []
        choice = self.tool_choice if self.tool_choice is not None else ("auto" if tools else "none")
        if self.tools is None and choice not in ("none", "auto"):
            raise InvalidRequestError("tool_choice needs tools", "tool_choice")
        names = [t.function.name for t in tools]
        if len(set(names)) != len(names):
            raise InvalidRequestError("tools have duplicate function names", "tools")
        for i, tool in enumerate(tools):
            _check_schema(tool.function.parameters, f"tools[{i}].function.parameters")
        max_calls = 1 if self.parallel_tool_calls is False else None
        plan = dict(template_tools=template_tools(tools), max_calls=max_calls)
        if isinstance(choice, NamedToolChoice):
            tool = next((t for t in tools if t.function.name == choice.function.name), None)
            if tool is None:
                raise InvalidRequestError(f"tool_choice names function {choice.function.name!r}, which is not "
                                          f"in tools ({', '.join(names) or 'none'})", "tool_choice")
            return ToolPlan("named", tool.function.name, _json(_parameters(tool.function)), **plan)
        if choice == "required" and tools:
            return ToolPlan("required", None, _json(_required_schema(tools, max_calls)), **plan)
        if choice == "auto" and tools:
            if not enable_auto or parser not in TOOL_PARSERS:
                raise InvalidRequestError('"auto" tool choice requires --enable-auto-tool-choice and '
                                          "--tool-call-parser to be set", "tool_choice")
            return ToolPlan("auto", None, _strict_tag(tools, parser, max_calls), parser=parser,
                            tool_names=tuple(names), **plan)
        return ToolPlan("none", **plan)


def template_tools(tools: list[ChatTool] | None) -> list[dict] | None:
    """``tools`` as the chat template gets them (chat completions and ``/tokenize`` alike); None for none."""
    return [t.model_dump(exclude_none=True) for t in tools or []] or None


def _strict_tag(tools: list[ChatTool], parser: str, max_calls: int | None) -> StructuredOutputsParams | None:
    """The structural tag that enforces the tools' schemas under ``auto`` when any tool is strict, else None."""
    if not any(t.function.strict for t in tools):
        return None
    build = getattr(TOOL_PARSERS[parser], "structural_tag", None)
    if build is None:
        raise InvalidRequestError(f"strict tools are not supported with --tool-call-parser {parser} (it has no "
                                  "structural tag); leave strict out or use tool_choice required", "tools")
    functions = [(t.function.name, _parameters(t.function) if t.function.strict else True) for t in tools]
    tag = build(functions, max_calls)
    params = StructuredOutputsParams(structural_tag=json.dumps(tag, ensure_ascii=False))
    validate_structured(params, "tools")
    return params


def _parameters(fn: FunctionDefinition) -> dict:
    return fn.parameters if fn.parameters is not None else {"type": "object", "properties": {}}


def _check_schema(schema: dict | None, where: str) -> None:
    if schema is None:
        return
    try:
        validate_structured(StructuredOutputsParams(json=schema), "tools")
    except InvalidRequestError as e:
        raise InvalidRequestError(f"{where} is not a valid JSON schema: {e.message}", "tools") from e


def _json(schema: dict) -> StructuredOutputsParams:
    return StructuredOutputsParams(json=schema)


def _required_schema(tools: list[ChatTool], max_calls: int | None) -> dict:
    """vLLM's schema for ``tool_choice: required`` (their ``$defs`` hoisted to the top, as vLLM does)."""
    defs: dict[str, Any] = {}
    items = []
    for tool in tools:
        params = dict(_parameters(tool.function))
        for name, schema in params.pop("$defs", {}).items():
            if defs.get(name, schema) != schema:
                raise InvalidRequestError(f"tools define $defs {name!r} twice, differently", "tools")
            defs[name] = schema
        items.append({"properties": {"name": {"type": "string", "enum": [tool.function.name]},
                                     "parameters": params}, "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": items}}
    if max_calls is not None:
        schema["maxItems"] = max_calls
    if defs:
        schema["$defs"] = defs
    return schema


class ChoiceTools:
    """The tool-call output of one choice: ``feed`` delta text -> a chat delta (``content`` and/or
    ``tool_calls``), ``finish()`` the last one, or ``message(text)`` for a whole non-streamed output."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.emitter = CallEmitter(plan.max_calls)
        self.array = CallArrayScanner() if plan.mode == "required" else None
        self.parser = None
        if plan.mode == "auto":  # a constraint under auto: strict tools' structural tag
            parser = TOOL_PARSERS[plan.parser]
            # Only parsers with a structural tag can be constrained (strict tools with another parser are a
            # 400 in the plan), and only they take ``constrained``.
            constrained = {"constrained": True} if plan.constraint is not None else {}
            self.parser = parser(plan.max_calls, plan.tool_names, **constrained)
        self.stream = self.parser.stream() if self.parser is not None else None
        self.named_id: str | None = None
        self.extracted = False  # message() found calls

    @property
    def called(self) -> bool:
        streamed = self.stream is not None and self.stream.called
        return self.extracted or streamed or self.named_id is not None or self.emitter.called

    def feed(self, text: str) -> dict:
        mode = self.plan.mode
        if mode == "none":
            return {"content": text} if text else {}
        if mode == "auto":
            return self.stream.feed(text)
        if mode == "named":
            if self.named_id is None:
                self.named_id = tool_call_id()
                return {"tool_calls": [{"index": 0, "id": self.named_id, "type": "function",
                                        "function": {"name": self.plan.name, "arguments": text}}]}
            return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else {}
        self.array.feed(text)
        calls = self.emitter.deltas(self.array.scanners)
        return {"tool_calls": calls} if calls else {}

    def finish(self) -> dict:
        return self.stream.finish() if self.stream is not None else {}

    def message(self, text: str) -> dict:
        """The assistant message of a finished, non-streamed output."""
        mode = self.plan.mode
        if mode == "none":
            return {"role": "assistant", "content": text}
        if mode == "auto":
            content, calls = self.parser.extract(text)
        elif mode == "named":
            self.named_id = tool_call_id()
            content, calls = None, [{"id": self.named_id, "type": "function",
                                     "function": {"name": self.plan.name, "arguments": text}}]
        else:
            content, calls = _required_calls(text, self.emitter)
        if not calls:
            return {"role": "assistant", "content": content}
        self.extracted = True
        return {"role": "assistant", "content": content, "tool_calls": calls}

    def finish_reason(self, engine_reason: str | None) -> str | None:
        if self.plan.mode in ("auto", "required") and self.called and engine_reason == "stop":
            return "tool_calls"
        return engine_reason


def _required_calls(text: str, emitter: CallEmitter) -> tuple[str | None, list[dict]]:
    try:
        json.loads(text)
    except ValueError:  # cut short (max_tokens): no calls, the text as content
        return text, []
    array = CallArrayScanner()
    array.feed(text)
    emitter.deltas(array.scanners)
    return None, emitter.tool_calls()
