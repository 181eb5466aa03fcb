"""The streaming job runner: input lines in, result lines out, with a window of requests in flight.

Contract of ``run_job(lines, send, write, window=W)``:
- ``lines`` yields ``ParsedLine``s in input order (``parsed_lines`` makes them from a file, in chunks read
  on a worker thread, skipping what ``--resume`` found done); nothing is read ahead beyond one chunk and the
  W requests in flight, so memory does not grow with the input;
- at most W requests are in flight; each finished one is replaced at once by the next line, so the engine
  always has work queued (size W above the engine's ``max_num_seqs`` to keep its batch full);
- ``send(url, body)`` answers ``(status_code, json_body)``; every answer becomes one result line handed to
  ``write(output)`` as soon as it arrives (so the output's order is completion order, not input order;
  lines match by ``custom_id``); a bad line becomes an error line without being sent; an exception from
  ``send`` becomes an ``internal_error`` line: one request never stops the job;
- 429 is retried after a pause (the server is busy, not the request wrong);
- a 503 (the server is shutting down or its engine is gone) or a response whose ``finish_reason`` is
  ``abort`` (the server aborted it) is not a result: nothing is written for it, no new request is sent, the
  requests in flight finish, and the counts say ``interrupted`` (why): a resumed job runs the rest again;
- cancelling ``run_job`` cancels the requests in flight (the server aborts them) and writes nothing more.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from flotilla.batch.format import BatchRequestOutput, ParsedLine, error_output, output_tokens, parse_line, \
    response_output
from flotilla.batch.ids import DoneIds

logger = logging.getLogger(__name__)

Send = Callable[[str, dict], Awaitable[tuple[int, Any]]]
INTERRUPTING_STATUSES = frozenset({499, 503})
CHUNK_LINES = 256
MAX_RETRY_PAUSE_S = 30.0


@dataclass
class JobCounts:
    """What one ``run_job`` wrote: result lines, of which ``failed``, the output tokens they report, and
    ``interrupted``: why the job stopped early (None: every line was written)."""

    done: int = 0
    failed: int = 0
    output_tokens: int = 0
    interrupted: str | None = None


def aborted(body: Any) -> bool:
    """A generation response the server aborted (shutdown, drain timeout): a choice ended with "abort"."""
    choices = body.get("choices") if isinstance(body, dict) else None
    return isinstance(choices, list) and any(isinstance(c, dict) and c.get("finish_reason") == "abort"
                                             for c in choices)


async def run_job(lines: AsyncIterator[ParsedLine], send: Send, write: Callable[[BatchRequestOutput], None], *,
                  window: int, on_result: Callable[[BatchRequestOutput, int], None] | None = None,
                  retry_pause_s: float = 1.0) -> JobCounts:
    """Run every line (see the module contract); returns the counts of what was written."""
    if window < 1:
        raise ValueError(f"the window of requests in flight must be >= 1, got {window}")
    counts = JobCounts()
    interrupted: list[str] = []
    slots = asyncio.Semaphore(window)
    tasks: set[asyncio.Task] = set()

    def record(out: BatchRequestOutput, tokens: int) -> None:
        write(out)
        counts.done += 1
        counts.failed += int(out.failed)
        counts.output_tokens += tokens
        if on_result is not None:
            on_result(out, tokens)

    async def one(item: ParsedLine) -> None:
        req = item.request
        pause = retry_pause_s
        while True:
            try:
                status, body = await send(req.url, req.body)
            except Exception as e:  # noqa: BLE001 - a failure of this request only
                logger.error("batch request %r failed", req.custom_id, exc_info=e)
                record(error_output(req.custom_id, "internal_error", f"the request failed: {e}", item.line), 0)
                return
            if status == 429:
                await asyncio.sleep(pause)
                pause = min(2 * pause, MAX_RETRY_PAUSE_S)
                continue
            if status in INTERRUPTING_STATUSES or aborted(body):
                interrupted.append(_why(status, body))
                return
            record(response_output(req.custom_id, status, body, item.line), output_tokens(body))
            return

    def finished(task: asyncio.Task) -> None:
        tasks.discard(task)
        slots.release()

    try:
        async for item in lines:
            if interrupted:
                break
            if item.request is None:
                record(item.error, 0)
                continue
            await slots.acquire()
            if interrupted:
                slots.release()
                break
            task = asyncio.ensure_future(one(item))
            tasks.add(task)
            task.add_done_callback(finished)
        while tasks:
            await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    counts.interrupted = interrupted[0] if interrupted else None
    return counts


def _why(status: int, body: Any) -> str:
    if aborted(body):
        return "the server aborted a request (shutting down)"
    err = body.get("error") if isinstance(body, dict) else None
    message = err.get("message") if isinstance(err, dict) else None
    return f"the server answered {status}" + (f": {message}" if message else "")


def parse_unless_done(numbered: Iterator[tuple[int, bytes]], done: DoneIds | None,
                      limit: int) -> tuple[list[ParsedLine], int, bool]:
    """Up to ``limit`` lines from ``numbered`` parsed, leaving out those ``done`` has: ``(parsed, skipped,
    exhausted)``."""
    parsed: list[ParsedLine] = []
    skipped = 0
    for number, raw in numbered:
        item = parse_line(raw, number)
        custom_id = item.request.custom_id if item.request is not None else item.error.custom_id
        if done is not None and done.contains(custom_id, number):
            skipped += 1
        else:
            parsed.append(item)
        if len(parsed) + skipped >= limit:
            return parsed, skipped, False
    return parsed, skipped, True


async def parsed_lines(numbered: Iterator[tuple[int, bytes]], done: DoneIds | None = None,
                       on_skip: Callable[[int], None] | None = None,
                       chunk: int = CHUNK_LINES) -> AsyncIterator[ParsedLine]:
    """The ``ParsedLine``s of ``numbered`` (``(line number, bytes)``), read and parsed ``chunk`` lines at a time
    on a worker thread, without the lines ``done`` already has (``on_skip(count)`` is told of them)."""
    exhausted = False
    try:
        while not exhausted:
            items, skipped, exhausted = await asyncio.to_thread(parse_unless_done, numbered, done, chunk)
            if skipped and on_skip is not None:
                on_skip(skipped)
            for item in items:
                yield item
    finally:
        close = getattr(numbered, "close", None)
        if close is not None:
            try:
                close()
            except ValueError:  # still running on the worker thread (we were cancelled): it ends with it
                pass
