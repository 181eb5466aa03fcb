"""Incremental scanning of JSON tool calls, shared by the tool parsers and by ``tool_choice: required``.

Contract: ``CallScanner`` consumes the text of one JSON object ``{"name": str, "arguments" | "parameters":
value, ...}`` in pieces of any size and exposes the call's ``name`` once its string is complete and the raw
text of its arguments as it arrives (``take_arguments``): an object or array value streams character by
character, exactly as generated (inner whitespace included); a string value (a model that double-encodes)
is decoded when complete; a missing arguments key gives ``"{}"`` when the object closes. The concatenated
fragments equal the non-streamed arguments, so a streamed call reassembles to the non-streamed one.
``CallArrayScanner`` does the same for a JSON array of such objects (``tool_choice: required``).
``CallEmitter`` turns scanners into OpenAI tool-call deltas (``index``, ``id``, ``type``, ``function``) and
final ``tool_calls``; ids are ``chatcmpl-tool-<hex>`` as vLLM makes them.
"""

from __future__ import annotations

import json
import uuid

ARGUMENT_KEYS = ("arguments", "parameters")
_WS = " \t\n\r"


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


class CallScanner:
    """One JSON call object, fed incrementally (see the module contract). ``state`` ends in "done" or
    "failed" (the text is not such an object); ``feed`` returns how many characters it consumed (it stops
    after the closing brace)."""

    def __init__(self):
        self.state = "start"
        self.key: str | None = None
        self.raw: list[str] = []  # the current key or value
        self.kind = ""  # of the current value: "container" | "string" | "scalar"
        self.depth = 0
        self.in_string = self.escape = False
        self.name: str | None = None
        self.args_key: str | None = None  # the arguments key seen first
        self.arguments: list[str] = []  # every argument fragment so far
        self._taken = 0

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")

    def feed(self, text: str) -> int:
        for i, ch in enumerate(text):
            if self.finished:
                return i
            self._step(ch)
        return len(text)

    def take_arguments(self) -> str:
        """The argument text not taken before."""
        out = "".join(self.arguments[self._taken:])
        self._taken = len(self.arguments)
        return out

    @property
    def arguments_text(self) -> str:
        return "".join(self.arguments)

    def _fail(self) -> None:
        self.state = "failed"

    def _step(self, ch: str) -> None:  # noqa: C901 - one small state machine
        state = self.state
        if state == "value":
            self._value_char(ch)
        elif ch in _WS and state != "key":
            return
        elif state == "start":
            self.state = "key_or_end" if ch == "{" else "failed"
        elif state in ("key_or_end", "key_start"):
            if ch == '"':
                self.state, self.raw, self.escape = "key", [], False
            elif ch == "}" and state == "key_or_end":
                self._close()
            else:
                self._fail()
        elif state == "key":
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                self.key, self.state = _decode_string("".join(self.raw)), "colon"
                return
            self.raw.append(ch)
        elif state == "colon":
            self.state = "value_start" if ch == ":" else "failed"
        elif state == "value_start":
            self._start_value(ch)
        elif state == "after":
            if ch == ",":
                self.state = "key_start"
            elif ch == "}":
                self._close()
            else:
                self._fail()

    def _start_value(self, ch: str) -> None:
        self.raw, self.state, self.escape = [ch], "value", False
        if ch in "{[":
            self.kind, self.depth, self.in_string = "container", 1, False
        elif ch == '"':
            self.kind = "string"
        else:
            self.kind = "scalar"
        if self.kind == "container" and self._is_args():
            self.arguments.append(ch)

    def _is_args(self) -> bool:
        if self.key in ARGUMENT_KEYS and self.args_key in (None, self.key):
            self.args_key = self.key
            return True
        return False

    def _value_char(self, ch: str) -> None:
        if self.kind == "scalar":
            if ch in _WS or ch in ",}":
                self._end_value()
                self._step(ch)
                return
            self.raw.append(ch)
            return
        self.raw.append(ch)
        if self.kind == "string":
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                self._end_value()
            return
        if self.key == self.args_key:
            self.arguments.append(ch)
        if self.in_string:
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                self.in_string = False
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            if self.depth == 0:
                self._end_value()

    def _end_value(self) -> None:
        self.state = "after"
        text = "".join(self.raw)
        if self.key == "name" and self.kind == "string" and self.name is None:
            self.name = _decode_string(text[1:-1])
        elif self.kind != "container" and self._is_args():
            if self.kind == "string":
                self.arguments.append(_decode_string(text[1:-1]) or "{}")
            else:
                self.arguments.append(text)

    def _close(self) -> None:
        self.state = "done"
        if self.args_key is None:
            self.args_key = "arguments"
            self.arguments.append("{}")


def _decode_string(body: str) -> str:
    try:
        return json.loads(f'"{body}"')
    except ValueError:
        return body


class CallArrayScanner:
    """A JSON array of call objects, fed incrementally; ``scanners`` holds one ``CallScanner`` per element."""

    def __init__(self):
        self.state = "start"
        self.scanners: list[CallScanner] = []

    def feed(self, text: str) -> None:
        i = 0
        while i < len(text):
            ch = text[i]
            if self.state == "element":
                i += self.scanners[-1].feed(text[i:])
                if self.scanners[-1].finished:
                    self.state = "after" if self.scanners[-1].state == "done" else "failed"
                continue
            i += 1
            if ch in _WS or self.state in ("done", "failed"):
                continue
            if self.state == "start":
                self.state = "element_or_end" if ch == "[" else "failed"
            elif self.state in ("element_or_end", "element_start") and ch == "{":
                self.scanners.append(CallScanner())
                self.scanners[-1].feed(ch)
                self.state = "element"
            elif self.state == "element_or_end" and ch == "]":
                self.state = "done"
            elif self.state == "after" and ch in ",]":
                self.state = "element_start" if ch == "," else "done"
            else:
                self.state = "failed"


class CallEmitter:
    """OpenAI tool-call deltas for a list of scanners (one call each, in order); at most ``max_calls``
    calls (``parallel_tool_calls: false``: 1). A call is announced (index, id, type, name) once its name is
    known; its argument text follows in the same or later deltas."""

    def __init__(self, max_calls: int | None = None):
        self.max_calls = max_calls
        self.ids: list[str] = []
        self.names: list[str] = []
        self.arguments: list[list[str]] = []

    @property
    def called(self) -> bool:
        return bool(self.ids)

    def deltas(self, scanners: list[CallScanner]) -> list[dict]:
        out = []
        for index, scanner in enumerate(scanners):
            if self.max_calls is not None and index >= self.max_calls:
                break
            if scanner.name is None:
                break  # calls are announced in order
            if index == len(self.ids):
                self.ids.append(tool_call_id())
                self.names.append(scanner.name)
                self.arguments.append([])
                args = scanner.take_arguments()
                self.arguments[index].append(args)
                out.append({"index": index, "id": self.ids[index], "type": "function",
                            "function": {"name": scanner.name, "arguments": args}})
            else:
                args = scanner.take_arguments()
                if args:
                    self.arguments[index].append(args)
                    out.append({"index": index, "function": {"arguments": args}})
        return out

    def tool_calls(self) -> list[dict]:
        """The calls emitted so far, whole."""
        return [{"id": i, "type": "function", "function": {"name": n, "arguments": "".join(a)}}
                for i, n, a in zip(self.ids, self.names, self.arguments)]
