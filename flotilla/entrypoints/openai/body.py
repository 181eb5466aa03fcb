"""Reading a JSON request body into a pydantic model, with a 400 for every way it can be wrong.

Contract: ``parse_body`` returns a validated model or raises ``APIError(400)`` whose message (and
``param``) names the problem: wrong content type, bytes that are not UTF-8 JSON (truncated included), a
number that is not finite anywhere in the body (the ``NaN`` / ``Infinity`` / ``-Infinity`` literals Python's
json accepts, or a literal such as ``1e999`` that overflows to infinity; the message names its path, e.g.
``messages.0.content``, and ``param`` its top-level field), a top-level value that is not an object, or a
field of the wrong type or shape. A client that
disconnects before its body is complete gets ``APIError(499)`` (no one is left to read it; nothing is logged
as a server error).
"""

from __future__ import annotations

import json
import math
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from flotilla.entrypoints.openai.errors import APIError

M = TypeVar("M", bound=BaseModel)


class _NonFinite:
    """Stands in for a non-finite JSON number while decoding, so its path can be reported."""

    def __init__(self, literal: str):
        self.literal = literal


def decode_json_object(raw: bytes) -> dict:
    """The JSON object in ``raw``; APIError(400) for anything else (see the module contract)."""
    if not raw.strip():
        raise APIError(400, "the request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")  # JSON over HTTP is UTF-8 (json.loads would also guess UTF-16/32)
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not valid UTF-8") from None
    non_finite: list[_NonFinite] = []

    def non_finite_marker(literal: str) -> _NonFinite:
        non_finite.append(_NonFinite(literal))
        return non_finite[-1]

    def parse_float(literal: str):
        value = float(literal)
        return value if math.isfinite(value) else non_finite_marker(literal)
    try:
        value = json.loads(text, parse_float=parse_float, parse_constant=non_finite_marker)
    except (json.JSONDecodeError, ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        kind = "null" if value is None else type(value).__name__
        raise APIError(400, f"the request body must be a JSON object, got {kind}")
    if non_finite:
        raise _non_finite_error(value, non_finite[0])
    return value


def _non_finite_error(value, marker: _NonFinite) -> APIError:
    path = _path_to(value, marker, [])
    where = ".".join(str(p) for p in path) if path else "the request body"
    param = str(path[0]) if path else None
    return APIError(400, f"{where}: {marker.literal} is not a finite number (JSON numbers must be finite)", param)


def _path_to(value, marker: _NonFinite, path: list) -> list | None:
    """The keys and indexes leading to ``marker`` inside ``value`` (iteratively: bodies can nest deep)."""
    stack = [(value, path)]
    while stack:
        node, where = stack.pop()
        if node is marker:
            return where
        if isinstance(node, dict):
            stack.extend((v, where + [k]) for k, v in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend((v, where + [i]) for i, v in reversed(list(enumerate(node))))
    return None


def validation_error(exc: ValidationError) -> APIError:
    """APIError(400) naming the first invalid field (``param`` is its top-level name) and, for a short
    scalar, the value given; an unknown field is named as such."""
    errors = exc.errors()
    # In a union (e.g. content: str | list[part]) an unknown field is the informative error, not "not a str".
    first = next((e for e in errors if e.get("type") == "extra_forbidden"), errors[0])
    loc = [x for x in first.get("loc", ()) if not _is_union_tag(x)]
    path = ".".join(str(x) for x in loc)
    param = str(loc[0]) if loc else None
    msg = first.get("msg", "invalid value")
    kind, ctx = first.get("type"), first.get("ctx") or {}
    if kind == "missing":
        return APIError(400, f"{path} is required", param)
    if kind == "extra_forbidden":
        return APIError(400, f"{path}: unknown field; flotilla rejects fields it does not implement (see the "
                             "README's 'Request fields')", param)
    if "param" in ctx:  # a custom error that names its own field (request_fields)
        return APIError(400, msg, ctx["param"])
    given = first.get("input")
    if isinstance(given, (str, int, float)) and len(repr(given)) <= 80:
        msg = f"{msg}, got {given!r}"
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
