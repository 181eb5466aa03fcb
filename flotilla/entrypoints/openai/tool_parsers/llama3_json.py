"""The ``llama3_json`` tool parser (vLLM's name; Llama 3.1/3.2 JSON tool calling): calls are JSON objects
``{"name": ..., "parameters" | "arguments": {...}}`` in the model's text, optionally after ``<|python_tag|>``,
several of them separated by ``;`` (or whitespace).

Contract (the driver's rules are in ``text_calls``): a call region starts at any ``{`` or at ``<|python_tag|>``
(then whitespace, then ``{``). It is a call when the object's ``name`` is one of the request's tools; its
arguments are the raw JSON text of ``parameters`` or ``arguments`` (whichever comes first; a string value, as
models that double-encode write it, is decoded; none gives ``{}``). Non-streamed, the object must also parse
as JSON whole and its arguments be a JSON object. A complete object that is not a call is content as a whole
(the braces inside it are not searched again), and so is a region that breaks, up to where it broke (a
``<|python_tag|>`` not followed by a call, text that is not JSON); text before, between and after the calls is
content. Streamed, a call is sent once its name is known, so an object that breaks after that stays a call with
the argument text it had. Differences from vLLM: the text around the calls is kept (vLLM drops it, and streams
calls only when the output starts with one) and a call must name one of the tools (so JSON the user asked for
is not mistaken for a call).
"""

from __future__ import annotations

import json

from flotilla.entrypoints.openai.tool_parsers.json_calls import CallScanner
from flotilla.entrypoints.openai.tool_parsers.text_calls import (TextCallStream, extract_calls, giveback_failed,
                                                                  partial_suffix)

PYTHON_TAG = "<|python_tag|>"
_WS = " \t\r\n"


class _Syntax:
    separators = _WS + ";"

    def __init__(self, tool_names: frozenset[str]):
        self.tool_names = tool_names

    def find_start(self, buf: str) -> tuple[int, int]:
        starts = [i for i in (buf.find("{"), buf.find(PYTHON_TAG)) if i >= 0]
        if starts:
            return min(starts), 0
        return -1, partial_suffix(buf, PYTHON_TAG)

    def segment(self) -> "_CallObject":
        return _CallObject(self.tool_names)


class _CallObject:
    """One region: an optional ``<|python_tag|>`` and whitespace, then a JSON object (``CallScanner``)."""

    def __init__(self, tool_names: frozenset[str]):
        self.tool_names = tool_names
        self.scanner = CallScanner()
        self.prefix = ""  # the tag (or its start) and whitespace before the object
        self.tagged = False
        self.text: list[str] = []  # the object's text
        self.state = "start"
        self.calls = [self.scanner]

    def feed(self, text: str) -> int:
        used = 0
        if self.state == "start":
            used = self._feed_prefix(text)
            if self.state == "start":
                return used
        if self.state == "object":
            n = self.scanner.feed(text[used:])
            self.text.append(text[used:used + n])
            used += n
            if self.scanner.finished:
                self.state = self.scanner.state
        return used

    def _feed_prefix(self, text: str) -> int:
        """Consume the tag and whitespace before ``{``; ``state`` becomes "object" at the brace."""
        for i, ch in enumerate(text):
            if not self.tagged and not self.prefix and ch == "{":
                self.state = "object"
                return i
            if not self.tagged:
                self.prefix += ch
                if not PYTHON_TAG.startswith(self.prefix):
                    self.state = "failed"
                    return i + 1
                self.tagged = self.prefix == PYTHON_TAG
            elif ch in _WS:
                self.prefix += ch
            elif ch == "{":
                self.state = "object"
                return i
            else:
                self.state = "failed"
                return i + 1
        return len(text)

    def ready(self, strict: bool) -> int:
        name_ok = self.scanner.name in self.tool_names
        if not strict:
            return int(name_ok)
        return int(name_ok and self.state == "done" and _valid_json_call("".join(self.text), self.scanner))

    def giveback(self, text: str) -> int:
        if self.state == "done":
            return len(text)  # a whole object (tag included) that is no call
        return giveback_failed(text, "{<")

    def close(self) -> None:
        pass  # a call cut short keeps the raw argument text it had (as ``hermes`` does)


def _valid_json_call(text: str, scanner: CallScanner) -> bool:
    try:
        obj = json.loads(text)
        arguments = json.loads(scanner.arguments_text)
    except ValueError:
        return False
    return isinstance(obj, dict) and isinstance(arguments, dict)


class Llama3JsonToolParser:
    name = "llama3_json"

    def __init__(self, max_calls: int | None = None, tool_names=()):
        self.max_calls = max_calls
        self.syntax = _Syntax(frozenset(tool_names))

    def extract(self, text: str) -> tuple[str | None, list[dict]]:
        return extract_calls(self.syntax, self.max_calls, text)

    def stream(self) -> TextCallStream:
        return TextCallStream(self.syntax, self.max_calls)

