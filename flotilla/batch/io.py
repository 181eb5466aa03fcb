"""Reading batch inputs and writing outputs: ``-`` (stdin/stdout), local paths and any ``fsspec`` URL.

- ``InputFile``: the input, read line by line (never whole) and read twice (the first pass counts lines and
  checks ids before anything runs); stdin is copied to a temporary file during the first pass.
- ``LineWriter``: every output line is one ``write`` followed by a flush, so a killed job leaves at most a
  torn *last* line (a write cut short never ends with the newline).
- ``scan_output``: ``--resume``'s view of an output: it truncates a torn last line and yields what every
  complete line records. Resuming needs a local file (appendable and truncatable); object-store URLs are
  written once, from the start.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from flotilla.batch.format import read_output_line

logger = logging.getLogger(__name__)
STDIO = "-"


class BatchIOError(Exception):
    """An input or output that cannot be used as asked (the message says why and what to do)."""


def local_path(url: str) -> str | None:
    """The local filesystem path of ``url`` (a plain path or ``file://``), None for stdio or other stores."""
    if url == STDIO:
        return None
    fs, path = fsspec.core.url_to_fs(url)
    return path if isinstance(fs, LocalFileSystem) else None


def output_size(url: str) -> int:
    """The size of an existing output in bytes (0 when it does not exist or is stdout)."""
    if url == STDIO:
        return 0
    fs, path = fsspec.core.url_to_fs(url)
    try:
        return int(fs.size(path)) if fs.exists(path) else 0
    except (OSError, ValueError):
        return 0


class InputFile:
    """The input at ``url`` (``-``: ``stdin``, a binary stream). ``lines()`` yields ``(line number, stripped
    bytes)`` for every non-blank line (numbers count blank lines too); call it as often as needed: stdin is
    spooled to a temporary file by the first call, later calls read the spool. ``close()`` removes it."""

    def __init__(self, url: str, stdin: BinaryIO | None = None):
        self.url = url
        self._stdin = stdin if stdin is not None else (sys.stdin.buffer if url == STDIO else None)
        self._spool: str | None = None
        if url != STDIO:
            fs, path = fsspec.core.url_to_fs(url)
            if not fs.exists(path):
                raise BatchIOError(f"input {url} does not exist")

    def lines(self) -> Iterator[tuple[int, bytes]]:
        if self.url == STDIO and self._spool is None:
            yield from self._spool_stdin()
            return
        opener = open(self._spool, "rb") if self._spool else fsspec.open(self.url, "rb")
        with opener as f:
            yield from _numbered(f)

    def _spool_stdin(self) -> Iterator[tuple[int, bytes]]:
        fd, path = tempfile.mkstemp(prefix="flotilla-run-batch-", suffix=".jsonl")
        with os.fdopen(fd, "wb") as spool:
            for raw in self._stdin:
                spool.write(raw)
                if not raw.endswith(b"\n"):
                    spool.write(b"\n")
        self._spool = path
        yield from self.lines()

    def close(self) -> None:
        if self._spool:
            os.unlink(self._spool)
            self._spool = None


def _numbered(f) -> Iterator[tuple[int, bytes]]:
    for number, raw in enumerate(f, start=1):
        raw = raw.strip()
        if raw:
            yield number, raw


class LineWriter:
    """Whole lines to one output: each ``write(line)`` is a single write then a flush."""

    def __init__(self, f: BinaryIO, close: bool = True):
        self._f, self._close = f, close

    def write(self, line: bytes) -> None:
        self._f.write(line)
        self._f.flush()

    def close(self) -> None:
        if self._close:
            self._f.close()
        else:
            self._f.flush()


def open_output(url: str, append: bool, stdout: BinaryIO | None = None) -> LineWriter:
    """The writer of ``url``: stdout for ``-``; a local file unbuffered (appended to with ``append``);
    otherwise an fsspec file written from the start (its object appears when the job closes it)."""
    if url == STDIO:
        return LineWriter(stdout if stdout is not None else sys.stdout.buffer, close=False)
    path = local_path(url)
    if path is not None:
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        return LineWriter(open(path, "ab" if append else "wb", buffering=0))
    if append:
        raise BatchIOError(f"cannot append to {url}: --resume needs a local output file")
    return LineWriter(fsspec.open(url, "wb").open())


def repair_torn_line(path: str) -> int:
    """Cut a torn last line (bytes after the last newline) off the file at ``path``; returns the bytes cut."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        block = 1 << 16
        end = size
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start)
            if start + len(chunk) == size and chunk.endswith(b"\n"):
                return 0
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                f.truncate(keep)
                return size - keep
            end = start
        f.truncate(0)
        return size


def scan_output(path: str) -> Iterator[tuple[str | None, int | None, bool]]:
    """``(custom_id, error line, failed)`` of every line of the local output ``path`` (missing: none), after
    cutting off a torn last line; BatchIOError for a complete line that is not a batch output line."""
    if not os.path.exists(path):
        return
    cut = repair_torn_line(path)
    if cut:
        logger.warning("%s: removed a torn last line (%d bytes) left by an interrupted job", path, cut)
    with open(path, "rb") as f:
        for number, raw in _numbered(f):
            try:
                yield read_output_line(raw)
            except ValueError:
                raise BatchIOError(f"{path} line {number} is not a batch output line; refusing to resume into "
                                   f"it") from None
