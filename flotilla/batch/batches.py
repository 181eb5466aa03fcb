"""The Batch API's batches: OpenAI's status machine over the Files store, run with the job runner.

Status machine (OpenAI's)::

    validating -> in_progress -> finalizing -> completed
         |             |
         v             v
       failed      cancelling -> cancelled      (cancel from validating or in_progress)

- ``validating``: the input file is checked (``inspect_batch_file``: every line valid, ``url`` equal to the
  batch's ``endpoint``, ids unique); problems -> ``failed`` with ``errors`` (code, message, param, line).
- ``in_progress``: the requests run through ``run_job`` with ``send`` (the server's own app, set by the
  entrypoints layer), ``window`` requests in flight over *all* running batches together; successes go to
  the working ``output.jsonl``, failures (non-2xx answers) to ``errors.jsonl``; ``request_counts`` follow
  (persisted at most every ``persist_interval_s``, and exactly at each change of status).
- ``finalizing``: the working files become the ``batch_output`` files ``output_file_id`` / ``error_file_id``
  (each only when it has lines; their ids derive from the batch id, so finalizing again after a crash is a
  no-op), then ``completed``. A cancelled batch is finalized the same way with what it finished.
- ``expired`` is never entered: ``expires_at`` (24 h after creation) is reported, batches run to the end.

Restart: ``start()`` picks every unfinished batch up where its state file says it was; an ``in_progress``
batch resumes like ``run-batch --resume`` (the ids already in its working files are skipped, a torn last
line is cut off), so no record is lost or duplicated. A job interrupted by the server (shutdown, engine
gone: ``JobCounts.interrupted``) stays ``in_progress`` for the next start. ``close()`` stops the running
batches without changing their status.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Mapping

from flotilla.batch.format import SUPPORTED_URLS, BatchRequestOutput
from flotilla.batch.io import InputFile, open_output
from flotilla.batch.job import check_input, inspect_batch_file, scan_outputs
from flotilla.batch.runner import JobCounts, Send, parsed_lines, run_job
from flotilla.batch.store import DataDir, FileStore, StoreError, atomic_write_json, page, read_json

logger = logging.getLogger("flotilla.batches")
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
COMPLETION_WINDOW = "24h"
WINDOW_S = 24 * 3600
MAX_METADATA_KEYS, MAX_KEY_CHARS, MAX_VALUE_CHARS = 16, 64, 512


class BatchManager:
    """Batches over one data directory (see the module contract). Event-loop thread only; ``send`` must be
    set before ``start()``."""

    def __init__(self, root: str, window: int, persist_interval_s: float = 1.0):
        if window < 1:
            raise ValueError(f"the batch window must be >= 1, got {window}")
        self.data = DataDir(root)
        self.files = FileStore(self.data)
        self.window = window
        self.persist_interval_s = persist_interval_s
        self.send: Send | None = None
        self._slots: asyncio.Semaphore | None = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._batches: dict[str, dict] = {}
        for name in sorted(os.listdir(self.data.batches)):
            if name.endswith(".json") and not name.startswith(".tmp-"):
                obj = read_json(os.path.join(self.data.batches, name))
                self._batches[obj["id"]] = obj

    # ---- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Resume every unfinished batch (in creation order)."""
        if self.send is None:
            raise RuntimeError("BatchManager.send is not set")
        self._slots = asyncio.Semaphore(self.window)
        for batch in sorted(self._batches.values(), key=lambda b: (b["created_at"], b["id"])):
            if batch["status"] in UNFINISHED:
                logger.info("resuming batch %s (%s)", batch["id"], batch["status"])
                self._schedule(batch["id"])

    async def close(self) -> None:
        """Stop the running batches (their status stays; ``start()`` of the next server resumes them)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.data.close()

    # ---- API -------------------------------------------------------------------------------------------

    def create(self, input_file_id: str, endpoint: str, completion_window: str,
               metadata: Mapping[str, str] | None = None) -> dict:
        """A new batch in ``validating`` (StoreError 400/404 naming the bad argument); it then runs."""
        if endpoint not in SUPPORTED_URLS:
            raise StoreError(400, f"endpoint must be one of {', '.join(SUPPORTED_URLS)}, got {endpoint!r}",
                             "endpoint")
        if completion_window != COMPLETION_WINDOW:
            raise StoreError(400, f"completion_window must be {COMPLETION_WINDOW!r}, got {completion_window!r}",
                             "completion_window")
        _check_metadata(metadata)
        try:
            source = self.files.get(input_file_id)
        except StoreError as e:
            raise StoreError(e.status, e.message, "input_file_id") from None
        if source["purpose"] != "batch":
            raise StoreError(400, f"input_file_id {input_file_id} has purpose {source['purpose']!r}; upload the "
                                  f"input with purpose 'batch'", "input_file_id")
        now = int(time.time())
        batch = {"id": f"batch_{sortable_hex()}", "object": "batch", "endpoint": endpoint, "errors": None,
                 "input_file_id": input_file_id, "completion_window": completion_window, "status": "validating",
                 "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
                 "expires_at": now + WINDOW_S, "finalizing_at": None, "completed_at": None, "failed_at": None,
                 "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                 "request_counts": {"total": 0, "completed": 0, "failed": 0},
                 "metadata": dict(metadata) if metadata is not None else None}
        self._batches[batch["id"]] = batch
        self._persist(batch)
        self._schedule(batch["id"])
        return batch

    def get(self, batch_id: str) -> dict:
        batch = self._batches.get(batch_id)
        if batch is None:
            raise StoreError(404, f"No such Batch object: {batch_id}", "batch_id")
        return batch

    def list(self, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        """``(batches, has_more)``, newest first, from the one after ``after``."""
        items = sorted(self._batches.values(), key=lambda b: (b["created_at"], b["id"]), reverse=True)
        return page(items, after, limit)

    async def cancel(self, batch_id: str) -> dict:
        """Cancel a ``validating`` or ``in_progress`` batch: ``cancelling`` at once, then (its requests in
        flight aborted) ``cancelled`` with the results it finished; StoreError 400 in any other status."""
        batch = self.get(batch_id)
        if batch["status"] not in ("validating", "in_progress"):
            raise StoreError(400, f"cannot cancel batch {batch_id}: its status is {batch['status']}", "batch_id")
        self._set(batch, "cancelling")
        task = self._tasks.get(batch_id)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if batch_id not in self._tasks or self._tasks[batch_id].done():
            self._schedule(batch_id)  # finishes the cancellation (and survives a restart if interrupted)
        return batch

    def file_in_use(self, file_id: str) -> str | None:
        """The id of an unfinished batch reading ``file_id``, if any."""
        for batch in self._batches.values():
            if batch["input_file_id"] == file_id and batch["status"] in UNFINISHED:
                return batch["id"]
        return None

    # ---- running ---------------------------------------------------------------------------------------

    def _schedule(self, batch_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._drive(batch_id), name=f"flotilla-{batch_id}")
        self._tasks[batch_id] = task
        task.add_done_callback(lambda t: self._tasks.pop(batch_id, None) if self._tasks.get(batch_id) is t
                               else None)

    async def _drive(self, batch_id: str) -> None:
        """Move one batch through the status machine from wherever it is."""
        batch = self._batches[batch_id]
        try:
            if batch["status"] == "validating":
                await self._validate(batch)
            if batch["status"] == "in_progress":
                counts = await self._execute(batch)
                if counts.interrupted:
                    logger.warning("batch %s stopped: %s; it resumes when the server starts again", batch_id,
                                   counts.interrupted)
                    return
                self._set(batch, "finalizing")
            if batch["status"] in ("finalizing", "cancelling"):
                await asyncio.to_thread(self._finalize, batch)
                self._set(batch, "completed" if batch["status"] == "finalizing" else "cancelled")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the batch fails, the server goes on
            logger.error("batch %s failed", batch_id, exc_info=e)
            batch["errors"] = {"object": "list", "data": [{"code": "internal_error", "message": str(e),
                                                           "param": None, "line": None}]}
            self._set(batch, "failed")

    async def _validate(self, batch: dict) -> None:
        source = InputFile(self.files.content_path(batch["input_file_id"]))
        checked, problems = await asyncio.to_thread(inspect_batch_file, source, batch["endpoint"])
        if problems:
            batch["errors"] = {"object": "list", "data": problems}
            self._set(batch, "failed")
            return
        batch["request_counts"]["total"] = checked.requests
        self._set(batch, "in_progress")

    def _work_paths(self, batch: dict) -> tuple[str, str]:
        work = os.path.join(self.data.batches, batch["id"])
        os.makedirs(work, exist_ok=True)
        return os.path.join(work, "output.jsonl"), os.path.join(work, "errors.jsonl")

    async def _execute(self, batch: dict) -> JobCounts:
        out_path, err_path = self._work_paths(batch)
        source = InputFile(self.files.content_path(batch["input_file_id"]))
        checked = await asyncio.to_thread(check_input, source)
        state = await asyncio.to_thread(scan_outputs, [out_path, err_path], checked.colliding)
        counts = batch["request_counts"]
        counts.update(total=checked.requests, completed=state.succeeded, failed=state.failed)
        writers = {False: open_output(out_path, append=True), True: open_output(err_path, append=True)}
        last = [time.monotonic()]

        def on_result(out: BatchRequestOutput, _tokens: int) -> None:
            counts["failed" if out.failed else "completed"] += 1
            if time.monotonic() - last[0] >= self.persist_interval_s:
                last[0] = time.monotonic()
                self._persist(batch)
        try:
            return await run_job(parsed_lines(source.lines(), state.done), self._limited_send,
                                 lambda out: writers[out.failed].write(out.to_line()), window=self.window,
                                 on_result=on_result)
        finally:
            for w in writers.values():
                w.close()
            self._persist(batch)

    async def _limited_send(self, url: str, body: dict):
        async with self._slots:
            return await self.send(url, body)

    def _finalize(self, batch: dict) -> None:
        """Working files -> batch_output files (idempotent: their ids are fixed by the batch id, and a file
        moved before a crash is found again); final request counts from what the files hold."""
        hex_id = batch["id"].removeprefix("batch_")
        final = []
        for key, path, suffix in zip(("output_file_id", "error_file_id"), self._work_paths(batch),
                                     ("output", "errors")):
            file_id = f"file-{hex_id}-{suffix}"
            stored = self.files.content_path(file_id)
            if os.path.exists(path) and os.path.getsize(path) > 0 or os.path.exists(stored):
                self.files.add(path, f"{batch['id']}_{suffix}.jsonl", "batch_output", file_id=file_id)
                batch[key] = file_id
                final.append(stored)
            elif os.path.exists(path):
                os.unlink(path)  # empty
        state = scan_outputs(final, set())
        batch["request_counts"].update(completed=state.succeeded, failed=state.failed)
        work = os.path.join(self.data.batches, batch["id"])
        if os.path.isdir(work) and not os.listdir(work):
            os.rmdir(work)

    def _set(self, batch: dict, status: str) -> None:
        batch["status"] = status
        batch[f"{status}_at"] = int(time.time())
        self._persist(batch)

    def _persist(self, batch: dict) -> None:
        atomic_write_json(os.path.join(self.data.batches, f"{batch['id']}.json"), batch)


def sortable_hex() -> str:
    """A unique hex id that sorts by creation time (ties within a second keep their order)."""
    return f"{time.time_ns():016x}{uuid.uuid4().hex[:16]}"


def _check_metadata(metadata) -> None:
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_KEYS:
        raise StoreError(400, f"metadata: at most {MAX_METADATA_KEYS} keys, got {len(metadata)}", "metadata")
    for key, value in metadata.items():
        if len(key) > MAX_KEY_CHARS or len(value) > MAX_VALUE_CHARS:
            raise StoreError(400, f"metadata: keys are at most {MAX_KEY_CHARS} characters and values at most "
                                  f"{MAX_VALUE_CHARS} (key {key[:80]!r})", "metadata")
