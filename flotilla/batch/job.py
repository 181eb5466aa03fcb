"""A batch file job (``flotilla run-batch``): plan it before anything runs, then run it.

``plan_job`` makes the first pass over the input (counts the requests, refuses duplicate ``custom_id``s with
``DuplicateIdsError`` naming them and their lines) and looks at the output: without ``resume`` an existing,
non-empty output is refused (results are never overwritten); with ``resume`` the output must be a local file,
a torn last line is cut off and every ``custom_id`` already there is skipped. ``run_planned`` then streams the
job through ``run_job`` with a progress display and returns a ``JobSummary``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO, TextIO

from flotilla.batch.format import parse_line
from flotilla.batch.ids import DoneIds, IdHashes, find_duplicates
from flotilla.batch.io import BatchIOError, InputFile, local_path, open_output, output_size, scan_output
from flotilla.batch.progress import Progress
from flotilla.batch.runner import Send, parsed_lines, run_job


class DuplicateIdsError(BatchIOError):
    """Two or more input lines share a ``custom_id``."""


@dataclass
class InputCheck:
    """The first pass over an input: ``requests`` (non-blank lines) and the id hashes shared by different
    ids (``colliding``; see ``flotilla.batch.ids``)."""

    requests: int
    colliding: set[int] = field(default_factory=set)


@dataclass
class OutputState:
    """What an output already holds: the ids done, and how many of its lines succeeded or failed."""

    done: DoneIds
    succeeded: int = 0
    failed: int = 0


@dataclass
class JobPlan:
    input_url: str
    output_url: str
    resume: bool
    requests: int
    state: OutputState


def line_custom_id(raw: bytes) -> str | None:
    """The ``custom_id`` of a raw input line, None when it has none that can be read."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    value = obj.get("custom_id") if isinstance(obj, dict) else None
    return value if isinstance(value, str) else None


def ids_with_lines(lines: Iterable[tuple[int, bytes]]) -> Iterable[tuple[str, int]]:
    for number, raw in lines:
        custom_id = line_custom_id(raw)
        if custom_id is not None:
            yield custom_id, number


def check_input(source: InputFile) -> InputCheck:
    """Count the requests and refuse duplicate ids (``DuplicateIdsError`` naming up to 10 of them)."""
    hashes = IdHashes()
    requests = 0
    for _, raw in source.lines():
        requests += 1
        custom_id = line_custom_id(raw)
        if custom_id is not None:
            hashes.add(custom_id)
    duplicates, colliding = find_duplicates(hashes, lambda: ids_with_lines(source.lines()))
    if duplicates:
        shown = "; ".join(f"{cid!r} on lines {', '.join(map(str, where))}" for cid, where in duplicates.items())
        raise DuplicateIdsError(f"duplicate custom_id in {source.url} (each must be unique; nothing was run): "
                                f"{shown}")
    return InputCheck(requests, colliding)


def scan_outputs(paths: Iterable[str], colliding: set[int]) -> OutputState:
    """The ids already written to the local outputs ``paths`` (torn last lines are cut off first)."""
    state = OutputState(DoneIds(colliding))
    for path in paths:
        for custom_id, line, failed in scan_output(path):
            state.done.add(custom_id, line)
            state.failed += int(failed)
            state.succeeded += int(not failed)
    return state


def plan_job(source: InputFile, output_url: str, resume: bool) -> JobPlan:
    """The first pass and the output check (see the module docstring); BatchIOError says what is wrong."""
    checked = check_input(source)
    if resume:
        path = local_path(output_url)
        if path is None:
            raise BatchIOError(f"--resume needs a local output file it can append to and repair; {output_url} is "
                               f"{'stdout' if output_url == '-' else 'not local'}")
        state = scan_outputs([path], checked.colliding)
    else:
        if output_size(output_url) > 0:
            raise BatchIOError(f"{output_url} already holds results: pass --resume to continue that job, or remove "
                               f"it to start over")
        state = OutputState(DoneIds(checked.colliding))
    return JobPlan(source.url, output_url, resume, checked.requests, state)


@dataclass
class JobSummary:
    """The outcome of a job: ``requests`` in the input; ``succeeded`` and ``failed`` lines in the output (those
    of earlier runs included); ``skipped``: lines already done before this run; ``interrupted``: why it stopped
    early, if it did."""

    plan: JobPlan
    succeeded: int
    failed: int
    written: int
    output_tokens: int
    elapsed_s: float
    interrupted: str | None = None

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.interrupted is None

    @property
    def skipped(self) -> int:
        return self.plan.state.succeeded + self.plan.state.failed

    def line(self) -> str:
        tok_s = self.output_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0
        text = (f"run-batch: {self.plan.requests} requests: {self.succeeded} succeeded, {self.failed} failed "
                f"(this run: {self.written} written in {self.elapsed_s:.1f} s, {tok_s:.1f} output tok/s")
        if self.skipped:
            text += f"; {self.skipped} already in {self.plan.output_url}"
        text += ")"
        if self.interrupted:
            text += f"; INTERRUPTED: {self.interrupted}; rerun with --resume to finish"
        elif self.failed:
            text += f"; the failed lines have a non-null \"error\" in {self.plan.output_url}"
        return text


async def run_planned(plan: JobPlan, source: InputFile, send: Send, *, window: int,
                      progress_stream: TextIO | None = None, stdout: BinaryIO | None = None,
                      progress_interval_s: float = 10.0) -> JobSummary:
    """Run the planned job (``send`` answers each request) with ``window`` requests in flight."""
    writer = open_output(plan.output_url, append=plan.resume, stdout=stdout)
    progress = Progress(plan.requests, skipped=plan.state.succeeded + plan.state.failed, stream=progress_stream,
                        interval_s=progress_interval_s)
    start = time.monotonic()
    try:
        counts = await run_job(parsed_lines(source.lines(), plan.state.done if plan.resume else None),
                               send, lambda out: writer.write(out.to_line()), window=window,
                               on_result=lambda out, tokens: progress.update(out.failed, tokens))
    finally:
        progress.close()
        writer.close()
    failed = plan.state.failed + counts.failed
    succeeded = plan.state.succeeded + counts.done - counts.failed
    return JobSummary(plan, succeeded, failed, counts.done, counts.output_tokens, time.monotonic() - start,
                      counts.interrupted)


def inspect_batch_file(source: InputFile, endpoint: str | None = None,
                       max_problems: int = 100) -> tuple[InputCheck | None, list[dict]]:
    """Validate a Batch API input file as OpenAI does before running it: every line a valid request (see
    ``flotilla.batch.format``), with ``url`` equal to ``endpoint`` when given, ids unique, at least one
    request. Returns ``(check, problems)``: ``problems`` are OpenAI batch error objects (``code``,
    ``message``, ``param``, ``line``), at most ``max_problems``; ``check`` is None when there are any."""
    problems: list[dict] = []
    for number, raw in source.lines():
        item = parse_line(raw, number)
        if item.error is not None:
            problems.append(item.error.error.model_dump())
        elif endpoint is not None and item.request.url != endpoint:
            problems.append({"code": "invalid_url", "param": "url", "line": number,
                             "message": f"line {number}: url {item.request.url} does not match the batch's "
                                        f"endpoint {endpoint}"})
        if len(problems) >= max_problems:
            break
    if problems:
        return None, problems
    try:
        checked = check_input(source)
    except DuplicateIdsError as e:
        return None, [{"code": "duplicate_custom_id", "message": str(e), "param": "custom_id", "line": None}]
    if checked.requests == 0:
        return None, [{"code": "empty_file", "message": "the file holds no requests", "param": None,
                       "line": None}]
    return checked, []
