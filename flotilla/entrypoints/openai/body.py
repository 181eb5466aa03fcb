"""Reading a JSON request body into a pydantic model, with a 400 for every way it can be wrong.

Contract: ``parse_body`` returns a validated model or raises ``APIError(400)`` whose message (and
``param``) names the problem: wrong content type, bytes that are not UTF-8 JSON (truncated included), NaN or
Infinity, a top-level value that is not an object, or a field of the wrong type or shape. A client that
disconnects before its body is complete gets ``APIError(499)`` (no one is left to read it; nothing is logged
as a server error).
"""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from flotilla.entrypoints.openai.errors import APIError

M = TypeVar("M", bound=BaseModel)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def decode_json_object(raw: bytes) -> dict:
    """The JSON object in ``raw``; APIError(400) for anything else."""
    if not raw.strip():
        raise APIError(400, "the request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")  # JSON over HTTP is UTF-8 (json.loads would also guess UTF-16/32)
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not valid UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        kind = "null" if value is None else type(value).__name__
        raise APIError(400, f"the request body must be a JSON object, got {kind}")
    return value


def validation_error(exc: ValidationError) -> APIError:
    """APIError(400) naming the first invalid field (``param`` is its top-level name)."""
    first = exc.errors()[0]
    loc = [x for x in first.get("loc", ()) if not _is_union_tag(x)]
    path = ".".join(str(x) for x in loc)
    param = str(loc[0]) if loc else None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        return APIError(400, f"{path} is required", param)
    return APIError(400, f"{path}: {msg}" if path else msg, param)


def _is_union_tag(x) -> bool:
    """pydantic puts the union member tried (e.g. 'str', 'list[int]') into an error's location."""
    return isinstance(x, str) and (x in ("str", "int", "float", "bool", "none", "dict", "list") or "[" in x
                                   or x.startswith(("function-", "literal", "nullable")))


def _check_content_type(request: Request) -> None:
    content_type = request.headers.get("content-type")
    if content_type is None:
        return  # curl -d without -H and many clients omit it; the body must still be JSON
    media = content_type.split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise APIError(400, f"unsupported content type {media!r}; send application/json")


CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; nobody reads it


async def parse_body(request: Request, model: type[M]) -> M:
    _check_content_type(request)
    try:
        raw = await request.body()
    except ClientDisconnect:  # the client left before sending its whole body: nothing to answer, no traceback
        message = "the client closed the connection before sending the whole body"
        raise APIError(CLIENT_CLOSED_REQUEST, message) from None
    data = decode_json_object(raw)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
