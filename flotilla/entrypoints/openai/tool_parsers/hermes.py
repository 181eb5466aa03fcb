"""The ``hermes`` tool parser (vLLM's name): tool calls as ``<tool_call>{"name": ..., "arguments": ...}
</tool_call>`` blocks in the model's text, as Hermes 2 Pro+ and Qwen2.5 emit them.

Contract: ``extract(text)`` (a finished, non-streamed output) returns ``(content, tool_calls)``: each block
whose body is a JSON object with a string ``name`` becomes a call (its ``arguments`` the raw JSON text of
the value, see ``json_calls``); blocks that do not parse stay in the content. Without calls the content is
the text unchanged; with calls it is the text outside the blocks, trailing whitespace removed, or None when
nothing else is left. ``HermesStream`` does the same incrementally (``feed`` delta text -> a delta dict with
``content`` and/or ``tool_calls``; ``finish()`` flushes): on well-formed output the streamed content and
calls reassemble to ``extract``'s. A call is streamed as soon as its name is known, so a block whose JSON
breaks after its name stays a (truncated) call when streamed.

Strict tools (``structural_tag``, used by ``tool_choice: auto`` when a tool has ``strict: true``): an xgrammar
structural tag over the output that leaves free text free and makes every call the parser reads, a
``<tool_call>`` block (triggered by ``<tool_call>``) or a bare call object (triggered by ``{"name": ``), name
one of the tools and carry arguments that follow its schema. A parser made with ``constrained=True`` reads a
bare call only when it starts with exactly that trigger, so every call it returns was constrained.
"""

from __future__ import annotations

import json
import re
from typing import Any

from flotilla.entrypoints.openai.tool_parsers.json_calls import CallEmitter, CallScanner

START, END = "<tool_call>", "</tool_call>"
BARE_START = '{"name": '  # a bare call object as Qwen2.5 writes it (the structural tag's second trigger)
_BLOCK = re.compile(re.escape(START) + r"(.*?)(?:" + re.escape(END) + r"|\Z)", re.DOTALL)


class HermesToolParser:
    name = "hermes"

    def __init__(self, max_calls: int | None = None, tool_names=(), constrained: bool = False):
        self.max_calls = max_calls
        self.tool_names = frozenset(tool_names)
        self.constrained = constrained  # the output follows structural_tag: read only the calls it constrains

    @staticmethod
    def structural_tag(functions: list[tuple[str, Any]], max_calls: int | None) -> dict:
        """The structural tag (see the module contract) for ``functions``: (name, arguments schema) pairs, a
        schema ``True`` for any JSON; at most one call when ``max_calls`` is 1."""
        tags = []
        for name, schema in functions:
            opening = BARE_START + json.dumps(name, ensure_ascii=False) + ', "arguments": '
            content = {"type": "json_schema", "json_schema": schema}
            tags.append({"type": "tag", "begin": START + "\n" + opening, "content": content, "end": "}\n" + END})
            tags.append({"type": "tag", "begin": opening, "content": content, "end": "}"})
        return {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": [START, BARE_START],
                                                     "tags": tags, "stop_after_first": max_calls == 1}}

    def extract(self, text: str) -> tuple[str | None, list[dict]]:
        emitter = CallEmitter(self.max_calls)
        scanners, content, pos = [], [], 0
        bare = _bare_call(text, self.tool_names, self.constrained)
        if bare is not None:
            scanners.append(bare[0])
            content.append(text[:bare[1]])
            pos = bare[2]
        for m in _BLOCK.finditer(text, pos):
            if not _is_call(m.group(1)):
                continue
            content.append(text[pos:m.start()])
            pos = m.end()
            scanner = CallScanner()
            scanner.feed(m.group(1).strip())
            scanners.append(scanner)
        emitter.deltas(scanners)
        if not emitter.called:
            return text, []
        rest = ("".join(content) + text[pos:]).rstrip()
        return rest or None, emitter.tool_calls()

    def stream(self) -> "HermesStream":
        return HermesStream(self.max_calls, self.tool_names, self.constrained)


def _bare_call(text: str, names: frozenset, constrained: bool = False) -> tuple[CallScanner, int, int] | None:
    """A call object the text starts with (its scanner, start and end), if its name is a tool's (and, when
    ``constrained``, it opens with ``BARE_START``)."""
    start = len(text) - len(text.lstrip())
    if not text.startswith(BARE_START if constrained else "{", start):
        return None
    scanner = CallScanner()
    end = start + scanner.feed(text[start:])
    if scanner.state != "done" or scanner.name not in names or not _is_call(text[start:end]):
        return None
    return scanner, start, end


def _is_call(body: str) -> bool:
    try:
        value = json.loads(body)
    except ValueError:
        return False
    return isinstance(value, dict) and isinstance(value.get("name"), str)


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class HermesStream:
    """Incremental ``hermes`` parsing of one choice (see the module contract)."""

    def __init__(self, max_calls: int | None = None, tool_names=frozenset(), constrained: bool = False):
        self.tool_names = tool_names
        self.constrained = constrained
        self.bare_possible = True  # the output may start with a bare call object
        self.tag = START  # of the current block ("" for a bare call)
        self.emitter = CallEmitter(max_calls)
        self.scanners: list[CallScanner] = []
        self.buf = ""
        self.block = ""  # the current block's text so far (to give back as content if it is no call)
        self.in_block = False
        self.held = ""  # trailing whitespace of the content, sent once more content follows

    @property
    def called(self) -> bool:
        return self.emitter.called

    def feed(self, text: str) -> dict:
        self.buf += text
        content: list[str] = []
        while self.buf:
            if not self.in_block and self.bare_possible:
                stripped = self.buf.lstrip()
                if not stripped:
                    break  # only whitespace so far: wait
                self.bare_possible = False
                if stripped[0] == "{":
                    content.append(self.buf[:len(self.buf) - len(stripped)])
                    self.buf, self.block, self.tag, self.in_block = stripped, "", "", True
                    self.scanners.append(CallScanner())
                    continue
            if not self.in_block:
                i = self.buf.find(START)
                if i < 0:
                    keep = _partial_suffix(self.buf, START)
                    content.append(self.buf[:len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    break
                content.append(self.buf[:i])
                self.buf, self.block, self.tag, self.in_block = self.buf[i + len(START):], START, START, True
                self.scanners.append(CallScanner())
            elif not self._in_block(content):
                break
        return self._delta("".join(content))

    def _in_block(self, content: list[str]) -> bool:
        """Advance inside a block; False when more text is needed."""
        scanner = self.scanners[-1]
        if not scanner.finished:
            used = scanner.feed(self.buf)
            self.block += self.buf[:used]
            self.buf = self.buf[used:]
        bare = not self.tag
        if bare and self.constrained and not (self.block.startswith(BARE_START) or
                                              BARE_START.startswith(self.block)):
            self._give_back(content)  # not the opening the grammar constrains: content
            return True
        if bare and scanner.name is not None and scanner.name not in self.tool_names or (
                scanner.finished and scanner.name is None):  # no call: the block is content
            self._give_back(content)
            return True
        if not scanner.finished:
            return False
        if bare:
            self.in_block = False
            return True
        j = self.buf.find(END)
        if j < 0:
            keep = _partial_suffix(self.buf, END)
            self.buf = self.buf[len(self.buf) - keep:]
            return False
        self.buf, self.in_block = self.buf[j + len(END):], False
        return True

    def _give_back(self, content: list[str]) -> None:
        self.scanners.pop()
        self.buf, self.in_block = self.block[len(self.tag):] + self.buf, False
        content.append(self.tag)

    def finish(self) -> dict:
        if self.in_block and self.scanners[-1].name is None:  # an unfinished block that is no call
            self.scanners.pop()
            self.buf, self.in_block = self.block + self.buf, False
        rest, self.buf = ("" if self.in_block else self.buf), ""
        delta = self._delta(rest)
        if not self.called and self.held:
            delta["content"] = delta.get("content", "") + self.held
        self.held = ""
        return delta

    def _delta(self, content: str) -> dict:
        delta = {}
        if content:
            text = self.held + content
            kept = text.rstrip()
            self.held = text[len(kept):]
            if kept:
                delta["content"] = kept
        calls = self.emitter.deltas(self.scanners)
        if calls:
            delta["tool_calls"] = calls
        return delta
