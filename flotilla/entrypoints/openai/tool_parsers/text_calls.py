"""Tool calls written inline in a model's text (``llama3_json``, ``pythonic``): one driver that finds the
candidate regions, streams the calls they hold and gives every other character back as content.

Contract: a parser supplies a ``CallSyntax``: ``find_start(buf)`` (the index where a candidate region may start,
or -1, and how many trailing characters to hold because they may begin one), ``segment()`` (a fresh scanner for
a region starting at the beginning of the text it is fed) and ``separators`` (characters allowed between two
calls, dropped when a call follows). A segment scanner consumes text (``feed`` returns how much; it stops at
the region's end), ends in ``state`` "done" or "failed", exposes its ``calls`` (objects with ``name`` and
``take_arguments()``, see ``json_calls.CallEmitter``), says with ``ready(strict)`` how many of them may be sent
and with ``giveback(text)`` how many leading characters of a region that turned out not to be calls are
content (the rest is scanned again; see ``giveback_failed``); ``close()`` tells it the output ended inside it.

``TextCallStream.feed(delta) -> chat delta`` (``content`` and/or ``tool_calls``); ``finish()`` flushes.
Streaming (``strict=False``), a call is sent once its region says so (its name known and one of the tools), so
a region that breaks after that stays a (truncated) call. ``strict=True`` sends calls only for regions that
ended well and validated whole; ``extract_calls`` runs it over a finished text, so on well-formed output the
streamed content and calls reassemble to the non-streamed ones, and malformed output is content. Content is
the text outside the calls with trailing whitespace removed (None when nothing is left), or, without calls,
the text unchanged.
"""

from __future__ import annotations

from typing import Protocol

from flotilla.entrypoints.openai.tool_parsers.json_calls import CallEmitter


class Segment(Protocol):
    state: str
    calls: list

    def feed(self, text: str) -> int: ...

    def ready(self, strict: bool) -> int: ...

    def giveback(self, text: str) -> int: ...

    def close(self) -> None: ...


class CallSyntax(Protocol):
    separators: str

    def find_start(self, buf: str) -> tuple[int, int]: ...

    def segment(self) -> Segment: ...


def finished(seg: Segment) -> bool:
    return seg.state in ("done", "failed")


class TextCallStream:
    """Incremental parsing of one choice (see the module contract)."""

    def __init__(self, syntax: CallSyntax, max_calls: int | None = None, strict: bool = False):
        self.syntax, self.strict = syntax, strict
        self.emitter = CallEmitter(max_calls)
        self.calls: list = []  # the calls sent or to send, in order
        self.buf = ""  # text not scanned yet
        self.seg: Segment | None = None
        self.seg_text = ""  # what the current segment consumed
        self.seg_sent = 0  # how many of its calls were handed to the emitter
        self.pending = ""  # separators after a call: dropped if another call follows, else content
        self.after_call = False
        self.held = ""  # trailing whitespace of the content, sent once more content follows

    @property
    def called(self) -> bool:
        return self.emitter.called

    def feed(self, text: str) -> dict:
        self.buf += text
        content: list[str] = []
        while self._advance(content):
            pass
        return self._delta("".join(content))

    def finish(self) -> dict:
        content = self.buf
        if self.seg is not None and self.seg_sent:
            self.seg.close()
        elif self.seg is not None:
            content = self.pending + self.seg_text + self.buf
        else:
            content = self.pending + self.buf
        self.seg, self.buf, self.pending = None, "", ""
        delta = self._delta(content)
        if not self.called and self.held:
            delta["content"] = delta.get("content", "") + self.held
        self.held = ""
        return delta

    def _advance(self, content: list[str]) -> bool:
        """One step of scanning; False when more text is needed."""
        if self.seg is not None:
            return self._in_segment(content)
        if self.after_call:
            rest = self.buf.lstrip(self.syntax.separators)
            self.pending += self.buf[:len(self.buf) - len(rest)]
            self.buf = rest
            start, keep = self.syntax.find_start(rest)
            if not rest or (start < 0 and keep == len(rest)):
                return False  # separators so far, or what may begin another call
            self.after_call = False
            if start != 0:
                content.append(self.pending)
                self.pending = ""
            return True
        start, keep = self.syntax.find_start(self.buf)
        if start < 0:
            cut = len(self.buf) - keep
            content.append(self.buf[:cut])
            self.buf = self.buf[cut:]
            return False
        content.append(self.buf[:start])
        self.buf = self.buf[start:]
        self.seg, self.seg_text, self.seg_sent = self.syntax.segment(), "", 0
        return True

    def _in_segment(self, content: list[str]) -> bool:
        seg = self.seg
        used = seg.feed(self.buf)
        self.seg_text += self.buf[:used]
        self.buf = self.buf[used:]
        ready = seg.ready(self.strict)
        if ready > self.seg_sent:
            self.calls.extend(seg.calls[self.seg_sent:ready])
            self.seg_sent, self.pending = ready, ""
        if not finished(seg):
            return False
        if self.seg_sent:  # its calls stand; a region that broke after them leaves the rest as text
            self.after_call = seg.state == "done"
        else:
            keep = seg.giveback(self.seg_text)
            content.append(self.pending + self.seg_text[:keep])
            self.buf = self.seg_text[keep:] + self.buf
            self.pending = ""
        self.seg = None
        return True

    def _delta(self, content: str) -> dict:
        delta = {}
        if content:
            text = self.held + content
            kept = text.rstrip()
            self.held = text[len(kept):]
            if kept:
                delta["content"] = kept
        calls = self.emitter.deltas(self.calls)
        if calls:
            delta["tool_calls"] = calls
        return delta


def extract_calls(syntax: CallSyntax, max_calls: int | None, text: str) -> tuple[str | None, list[dict]]:
    """``(content, tool_calls)`` of a finished output: the strict stream run over the whole text."""
    stream = TextCallStream(syntax, max_calls, strict=True)
    first, last = stream.feed(text), stream.finish()
    if not stream.called:
        return text, []
    content = first.get("content", "") + last.get("content", "")
    return content or None, stream.emitter.tool_calls()


def giveback_failed(text: str, starts: str) -> int:
    """How much of a region that broke is content: all of it up to where it broke, except a last character
    that may begin another region (scanned again). So every character is scanned a bounded number of times."""
    return len(text) - 1 if len(text) > 1 and text[-1] in starts else len(text)


def partial_suffix(text: str, tag: str) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
