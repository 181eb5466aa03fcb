"""The Files API of the Batch API: ``POST /v1/files``, ``GET /v1/files[/{id}[/content]]``, ``DELETE
/v1/files/{id}``.

Contract: OpenAI's ``file`` objects (``flotilla.batch.store``). An upload is multipart (``file``, ``purpose``)
with purpose ``batch`` (the only one flotilla stores; outputs have ``batch_output``); its lines are validated
up front (``inspect_batch_file``: every line a valid batch request, ids unique): the first problems are a 400
naming the line, and nothing is stored. Uploads are bounded by ``--max-request-body-bytes``. The upload is
streamed to disk and validated on a worker thread, so the event loop keeps serving. A file that an unfinished
batch reads cannot be deleted (400). ``GET /v1/files`` lists newest first (``order``, ``limit``, ``after``,
``purpose`` as OpenAI's).
"""

from __future__ import annotations

import asyncio
import os
from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import UploadFile

from flotilla.entrypoints.openai.errors import APIError
from flotilla.entrypoints.openai.serving_batches import BatchAPI, list_body, store_errors

FORM_FIELDS = ("file", "purpose")


async def _read_form(request: Request):
    try:
        return await request.form(max_files=1, max_fields=len(FORM_FIELDS))
    except Exception as e:  # noqa: BLE001 - starlette's MultiPartException and malformed bodies alike
        raise APIError(400, f"expected a multipart/form-data body with 'file' and 'purpose': {e}") from None


async def create_file(api: BatchAPI, request: Request) -> dict:
    from flotilla.batch.io import InputFile
    from flotilla.batch.job import inspect_batch_file
    from flotilla.batch.store import copy_into
    manager = api.manager
    form = await _read_form(request)
    try:
        unknown = [k for k in form.keys() if k not in FORM_FIELDS]
        if unknown:
            raise APIError(400, f"{unknown[0]}: unknown field; flotilla accepts only file and purpose", unknown[0])
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "file is required (a multipart file part)", "file")
        if purpose != "batch":
            raise APIError(400, f"purpose must be 'batch' (flotilla stores Batch API inputs), got {purpose!r}",
                           "purpose")
        tmp = manager.files.new_upload()
        try:
            await asyncio.to_thread(copy_into, upload.file, tmp)
            _, problems = await asyncio.to_thread(inspect_batch_file, InputFile(tmp), None, 10)
            if problems:
                more = f" ({len(problems) - 1} more problem(s) in the first lines)" if len(problems) > 1 else ""
                raise APIError(400, f"the file is not a valid batch input: {problems[0]['message']}{more}", "file")
            return manager.files.add(tmp, upload.filename or "upload.jsonl", "batch")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    finally:
        await form.close()


def files_router(api: BatchAPI) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/files")
    async def upload(request: Request) -> Response:
        return JSONResponse(await create_file(api, request))

    @router.get("/v1/files")
    async def list_files(purpose: str | None = None, limit: int = Query(10000, ge=1, le=10000),
                         order: Literal["asc", "desc"] = "desc", after: str | None = None) -> Response:
        items, has_more = store_errors(api.manager.files.list, purpose, limit, order, after)
        return JSONResponse(list_body(items, has_more))

    @router.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str) -> Response:
        return JSONResponse(store_errors(api.manager.files.get, file_id))

    @router.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str) -> Response:
        files = api.manager.files
        obj = store_errors(files.get, file_id)
        return FileResponse(files.content_path(file_id), media_type="application/octet-stream",
                            filename=obj["filename"])

    @router.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str) -> Response:
        manager = api.manager
        user = manager.file_in_use(file_id)
        if user is not None:
            raise APIError(400, f"file {file_id} is the input of batch {user}, which has not finished; cancel it "
                                f"or wait for it", "file_id")
        return JSONResponse(store_errors(manager.files.delete, file_id))

    return router
