"""The ``pythonic`` tool parser (vLLM's name; Llama 3.2, Llama 4, ToolACE): calls as a Python list of calls
with keyword arguments, ``[get_weather(city="Paris"), get_time()]``.

Contract (the driver's rules are in ``text_calls``): a call region starts at any ``[``; it is a list of one or
more calls ``name(key=value, ...)`` (a trailing comma allowed), each ``name`` one of the request's tools and a
Python identifier, each argument a keyword (no positional, ``*`` or ``**`` arguments, no key twice) whose value
is a literal: strings, numbers (finite, signed), ``True``/``False``/``None``, lists and tuples (as JSON
arrays) and dicts with string keys, nested. A small lexer finds each argument's end (the ``,`` or ``)``
outside strings, comments and brackets) and ``ast.parse`` reads the argument (nothing is evaluated), once,
so the work is linear in the text. A call's arguments are
``json.dumps`` of the keyword dict (``ensure_ascii=False``), streamed as ``{`` when the call opens, then one
``"key": value`` piece per argument as it completes, then ``}``. A list that is not such calls is content
up to where it broke (the text after that is searched again); so is a call to a function that is not a
tool.
Streamed, a list that breaks after a call was sent keeps that call, closed with the arguments read before the
break (its arguments are always a JSON object); the text after the break is content.
vLLM differs in taking only an output that is one such list as a whole (anything else is content) and in
dropping positional arguments.
"""

from __future__ import annotations

import ast
import json
import keyword
import math

from flotilla.entrypoints.openai.tool_parsers.text_calls import TextCallStream, extract_calls, giveback_failed

_WS = " \t\r\n"
_FN = "_f"  # the stand-in callee an argument is parsed under


class _NotACall(Exception):
    pass


class _Syntax:
    separators = _WS

    def __init__(self, tool_names: frozenset[str]):
        self.tool_names = tool_names

    def find_start(self, buf: str) -> tuple[int, int]:
        return buf.find("["), 0

    def segment(self) -> "_CallList":
        return _CallList(self.tool_names)


class _Call:
    """One call: its name and its arguments' JSON text in pieces (``take_arguments`` as ``CallScanner``)."""

    def __init__(self, name: str):
        self.name = name
        self.keys: set[str] = set()
        self.arguments = ["{"]
        self._taken = 0

    def add(self, key: str, value) -> None:
        if key in self.keys:
            raise _NotACall(f"argument {key!r} given twice")
        sep = ", " if self.keys else ""
        self.keys.add(key)
        try:
            dumped = json.dumps(value, ensure_ascii=False, allow_nan=False)
        except ValueError as e:
            raise _NotACall(str(e)) from e
        self.arguments.append(f"{sep}{json.dumps(key, ensure_ascii=False)}: {dumped}")

    def take_arguments(self) -> str:
        out = "".join(self.arguments[self._taken:])
        self._taken = len(self.arguments)
        return out

    @property
    def arguments_text(self) -> str:
        return "".join(self.arguments)


class _CallList:
    """One region ``[call, ...]`` fed incrementally; ``state`` ends in "done" or "failed"."""

    def __init__(self, tool_names: frozenset[str]):
        self.tool_names = tool_names
        self.state = "start"
        self.calls: list[_Call] = []
        self.name: list[str] = []
        self.arg: list[str] = []  # the current argument's text
        self.lexer = _Lexer()

    def feed(self, text: str) -> int:
        for i, ch in enumerate(text):
            if self.state in ("done", "failed"):
                return i
            try:
                self._step(ch)
            except _NotACall:
                self.state = "failed"
                self.close()
        return len(text)

    def close(self) -> None:
        """The region ends here (it broke, or the output did): a call left open is closed with the
        arguments read so far, so streamed arguments are always a JSON object."""
        if self.calls and self.calls[-1].arguments[-1] != "}":
            self.calls[-1].arguments.append("}")

    def ready(self, strict: bool) -> int:
        if strict and self.state != "done":
            return 0
        return len(self.calls)

    def giveback(self, text: str) -> int:
        return giveback_failed(text, "[")

    def _step(self, ch: str) -> None:  # noqa: C901 - one small state machine
        state = self.state
        if state == "args":
            self._arg_char(ch)
        elif ch in _WS and state in ("first", "next", "paren", "after"):
            return
        elif state == "start":
            self._expect(ch == "[", "first")
        elif state in ("first", "next"):
            if ch == "]" and state == "next":
                self.state = "done"  # a trailing comma
            else:
                self._expect(ch.isidentifier(), "name")
                self.name = [ch]
        elif state == "name" and (ch == "(" or ch in _WS):
            self.state = "paren"
            self._step(ch)
        elif state == "name":
            self._expect(("a" + ch).isidentifier(), "name")
            self.name.append(ch)
        elif state == "paren":
            self._expect(ch == "(", "args")
            self._open_call()
        elif state == "after":
            self._expect(ch in ",]", "next" if ch == "," else "done")

    def _expect(self, ok: bool, next_state: str) -> None:
        if not ok:
            raise _NotACall("unexpected character")
        self.state = next_state

    def _open_call(self) -> None:
        name = "".join(self.name)
        if keyword.iskeyword(name) or name not in self.tool_names:
            raise _NotACall(f"{name!r} is not a tool")
        self.calls.append(_Call(name))
        self.arg, self.lexer = [], _Lexer()

    def _arg_char(self, ch: str) -> None:
        if not self.lexer.top_level(ch) or ch not in ",)]}":
            self.arg.append(ch)
            return
        if ch in "]}":
            raise _NotACall(f"unbalanced {ch!r}")
        text = "".join(self.arg)
        self.arg = []
        if text.strip():
            self.calls[-1].add(*_keyword_argument(text))
        elif ch == ",":
            raise _NotACall("an empty argument")  # "f(,", "f(a=1,,"; "f()" and "f(a=1,)" are fine
        if ch == ")":
            self.calls[-1].arguments.append("}")
            self.state = "after"


class _Lexer:
    """Where an argument list stands, one character at a time: inside a string (single or triple quoted,
    backslash escapes), a comment, or brackets."""

    def __init__(self):
        self.depth = 0
        self.quote = ""  # the open string's quote: ', ", ''' or """; "" outside strings
        self.escape = self.comment = False
        self.run = 0  # 1 right after a single quote opened; in a triple-quoted string, closing quotes in a row
        self.maybe_triple = ""  # an empty string '' just closed: one more quote makes it a triple quote

    def top_level(self, ch: str) -> bool:
        """Take ``ch``; True when it stands outside every string, comment and bracket."""
        if self.maybe_triple:
            quote, self.maybe_triple = self.maybe_triple, ""
            if ch == quote:
                self.quote, self.run = quote * 3, 0
                return False
        if self.comment:
            self.comment = ch != "\n"
            return False
        if self.quote:
            self._in_string(ch)
            return False
        if ch in "'\"":
            self.quote, self.run = ch, 1
        elif ch == "#":
            self.comment = True
        elif ch in "([{":
            self.depth += 1
        elif ch in ")]}" and self.depth:
            self.depth -= 1
        else:
            return self.depth == 0
        return False

    def _in_string(self, ch: str) -> None:
        quote = self.quote
        if self.escape or ch == "\\":
            self.escape, self.run = not self.escape, 0
        elif len(quote) == 1:
            if ch == quote:
                self.maybe_triple = quote if self.run == 1 else ""
                self.quote = ""
            self.run = 0
        elif ch == quote[0]:
            self.run += 1
            if self.run == 3:
                self.quote, self.run = "", 0
        else:
            self.run = 0


def _keyword_argument(text: str) -> tuple[str, object]:
    """``(key, value)`` of one complete ``key=literal`` argument; ``_NotACall`` for anything else."""
    try:
        tree = ast.parse(f"{_FN}({text})", mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise _NotACall(f"not an argument: {e}") from e
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == _FN
            and not call.args and len(call.keywords) == 1 and call.keywords[0].arg is not None):
        raise _NotACall("not one keyword argument")
    return call.keywords[0].arg, _literal(call.keywords[0].value)


def _literal(node: ast.expr):
    """The JSON value of a literal expression (see the module contract); ``_NotACall`` otherwise."""
    if isinstance(node, ast.Constant):
        return _constant(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) and \
            isinstance(node.operand, ast.Constant) and type(node.operand.value) in (int, float):
        value = _constant(node.operand.value)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values):
            if not (isinstance(k, ast.Constant) and isinstance(k.value, str)):
                raise _NotACall("dict keys must be strings")
            out[k.value] = _literal(v)
        return out
    raise _NotACall(f"{type(node).__name__} is not a literal")


def _constant(value):
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise _NotACall(f"{value!r} is not a JSON value")


class PythonicToolParser:
    name = "pythonic"

    def __init__(self, max_calls: int | None = None, tool_names=()):
        self.max_calls = max_calls
        self.syntax = _Syntax(frozenset(tool_names))

    def extract(self, text: str) -> tuple[str | None, list[dict]]:
        return extract_calls(self.syntax, self.max_calls, text)

    def stream(self) -> TextCallStream:
        return TextCallStream(self.syntax, self.max_calls)
