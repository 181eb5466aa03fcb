"""The Batch API: ``POST /v1/batches``, ``GET /v1/batches[/{id}]``, ``POST /v1/batches/{id}/cancel``.

Contract: OpenAI's ``batch`` objects and status machine (``flotilla.batch.batches``); the files routes are in
``serving_files``. ``BatchAPI`` is what ``build_app(batches=...)`` takes: a ``BatchManager`` over the data
directory, or the reason the Batch API is off (every files and batches route then answers 503 with it).
``open_batch_api`` makes it for ``flotilla serve``: its window (batch requests in flight over all batches)
is twice the models' ``max_num_seqs`` but at most half of ``--max-queued-requests``, so online requests always
find admission slots; batch requests carry the lower engine priority (``flotilla.batch.BATCH_PRIORITY``).
Request bodies are strict (unknown fields such as ``output_expires_after`` are a 400 naming them).
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, StrictStr

from flotilla.entrypoints.openai.body import parse_body
from flotilla.entrypoints.openai.errors import APIError

logger = logging.getLogger("flotilla.serve")


class BatchAPI:
    """The app's Batch API: ``manager`` (a ``flotilla.batch.batches.BatchManager``) or ``off_reason``."""

    def __init__(self, manager=None, off_reason: str | None = None):
        self._manager, self.off_reason = manager, off_reason

    @property
    def manager(self):
        if self._manager is None:
            raise APIError(503, f"the Batch API is off: {self.off_reason}")
        return self._manager

    @property
    def running(self):
        """The manager, or None when the Batch API is off."""
        return self._manager


def open_batch_api(data_dir: str, window: int) -> BatchAPI:
    """The Batch API over ``data_dir`` (created if missing); off, with a logged warning, when another server
    holds the directory or it cannot be used."""
    from flotilla.batch.batches import BatchManager
    from flotilla.batch.store import DataDirBusy
    try:
        return BatchAPI(BatchManager(data_dir, window))
    except (DataDirBusy, OSError, ValueError) as e:
        logger.warning("the Batch API (/v1/files, /v1/batches) is off: %s", e)
        return BatchAPI(off_reason=str(e))


def batch_window(max_num_seqs_total: int, max_queued_requests: int) -> int:
    """Batch requests in flight on a server (see the module contract)."""
    return max(1, min(2 * max_num_seqs_total, max_queued_requests // 2))


def store_errors(fn, *args):
    """``fn(*args)`` with the store's errors as APIErrors."""
    from flotilla.batch.store import StoreError
    try:
        return fn(*args)
    except StoreError as e:
        raise APIError(e.status, e.message, e.param) from None


class BatchCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: StrictStr
    endpoint: StrictStr
    completion_window: StrictStr
    metadata: dict[StrictStr, StrictStr] | None = None


def list_body(items: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": has_more}


def batches_router(api: BatchAPI) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/batches")
    async def create_batch(request: Request) -> Response:
        manager = api.manager
        req = await parse_body(request, BatchCreateRequest)
        return JSONResponse(store_errors(manager.create, req.input_file_id, req.endpoint, req.completion_window,
                                         req.metadata))

    @router.get("/v1/batches")
    async def list_batches(after: str | None = None, limit: int = Query(20, ge=1, le=100)) -> Response:
        items, has_more = store_errors(api.manager.list, after, limit)
        return JSONResponse(list_body(items, has_more))

    @router.get("/v1/batches/{batch_id}")
    async def retrieve_batch(batch_id: str) -> Response:
        return JSONResponse(store_errors(api.manager.get, batch_id))

    @router.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str) -> Response:
        from flotilla.batch.store import StoreError
        try:
            return JSONResponse(await api.manager.cancel(batch_id))
        except StoreError as e:
            raise APIError(e.status, e.message, e.param) from None

    return router
