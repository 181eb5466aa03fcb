"""OpenAI's batch file format (the one ``vllm run-batch`` reads and writes), one JSON object a line.

Input line: ``{"custom_id": str, "method": "POST", "url": URL, "body": {...}}`` with URL one of
``SUPPORTED_URLS``; nothing else at the top level. Output line: ``{"id", "custom_id", "response":
{"status_code", "request_id", "body"}, "error"}``.

Contract of an output line (``BatchRequestOutput``):
- the request ran: ``response`` holds the server's status code and JSON body exactly as the online server
  answers it; a non-2xx answer (e.g. a 400 naming a bad field of ``body``) also sets ``error`` (``code``
  ``http_<status>``, the server's message and param), so **every failed line has a non-null ``error``**;
- the line never ran (invalid JSON, a missing or wrong field, an unsupported ``url`` or ``method``,
  ``stream: true``): ``response`` is null and ``error`` says why (``code`` one of ``invalid_json_line``,
  ``invalid_request``, ``invalid_url``, ``invalid_method``);
- ``error.line`` is the 1-based line number in the input (blank lines count). A line whose ``custom_id``
  cannot be read has ``custom_id`` null: ``--resume`` recognises it by ``error.line``.

``parse_line`` never raises: it turns one input line into a ``BatchRequestInput`` or a ready error line.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError

SUPPORTED_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


class BatchRequestInput(BaseModel):
    """One input line."""

    model_config = ConfigDict(extra="forbid")

    custom_id: StrictStr
    method: StrictStr
    url: StrictStr
    body: dict[str, Any]


class BatchError(BaseModel):
    """Why a line failed (OpenAI's batch error object: ``code``, ``message``, ``param``, ``line``)."""

    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchResponse(BaseModel):
    status_code: int
    request_id: str
    body: Any = None


class BatchRequestOutput(BaseModel):
    """One output line (see the module contract)."""

    id: str
    custom_id: str | None
    response: BatchResponse | None = None
    error: BatchError | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    def to_line(self) -> bytes:
        """The line as written: compact JSON (non-ASCII kept as UTF-8) and a newline."""
        return self.model_dump_json().encode() + b"\n"


@dataclass(frozen=True)
class ParsedLine:
    """An input line: ``request`` to send, or (``request`` None) the ``error`` line to write instead."""

    line: int
    request: BatchRequestInput | None = None
    error: BatchRequestOutput | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def error_output(custom_id: str | None, code: str, message: str, line: int, param: str | None = None,
                 response: BatchResponse | None = None) -> BatchRequestOutput:
    return BatchRequestOutput(id=new_id("batch_req"), custom_id=custom_id, response=response,
                              error=BatchError(code=code, message=message, param=param, line=line))


def parse_line(raw: bytes | str, line: int) -> ParsedLine:
    """One non-blank input line (see the module contract); ``line`` is its 1-based number."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as e:
        return ParsedLine(line, error=error_output(None, "invalid_json_line", f"line {line} is not valid JSON: {e}",
                                                    line))
    if not isinstance(obj, dict):
        return ParsedLine(line, error=error_output(None, "invalid_json_line",
                                                    f"line {line} must be a JSON object", line))
    custom_id = obj.get("custom_id") if isinstance(obj.get("custom_id"), str) else None
    try:
        req = BatchRequestInput.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(x) for x in first.get("loc", ())) or None
        what = "unknown field" if first.get("type") == "extra_forbidden" else first.get("msg", "invalid")
        return ParsedLine(line, error=error_output(custom_id, "invalid_request", f"line {line}: {field}: {what}",
                                                    line, field))
    problem = request_problem(req)
    if problem is not None:
        code, message, param = problem
        return ParsedLine(line, error=error_output(req.custom_id, code, f"line {line}: {message}", line, param))
    return ParsedLine(line, request=req)


def request_problem(req: BatchRequestInput) -> tuple[str, str, str] | None:
    """``(code, message, param)`` for a well-formed line flotilla cannot run, else None."""
    if not req.custom_id:
        return "invalid_request", "custom_id must not be empty", "custom_id"
    if req.method != "POST":
        return "invalid_method", f"method must be POST, got {req.method!r}", "method"
    if req.url not in SUPPORTED_URLS:
        return "invalid_url", f"url {req.url!r} is not supported (use one of {', '.join(SUPPORTED_URLS)})", "url"
    if req.body.get("stream"):
        return "invalid_request", "body.stream: a batch request cannot stream", "body.stream"
    return None


def response_output(custom_id: str, status: int, body: Any, line: int) -> BatchRequestOutput:
    """The output line of a request the server answered with ``status`` and JSON ``body``."""
    request_id = body.get("id") if isinstance(body, dict) and isinstance(body.get("id"), str) else new_id("req")
    response = BatchResponse(status_code=status, request_id=request_id, body=body)
    if 200 <= status < 300:
        return BatchRequestOutput(id=new_id("batch_req"), custom_id=custom_id, response=response)
    err = body.get("error") if isinstance(body, dict) else None
    message = err.get("message") if isinstance(err, dict) else None
    param = err.get("param") if isinstance(err, dict) else None
    return error_output(custom_id, f"http_{status}", str(message or f"the server answered {status}"), line,
                        str(param) if param is not None else None, response)


def output_tokens(body: Any) -> int:
    """``usage.completion_tokens`` of a response body (0 when it has none, e.g. embeddings)."""
    usage = body.get("usage") if isinstance(body, dict) else None
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) else 0


def read_output_line(raw: bytes) -> tuple[str | None, int | None, bool]:
    """``(custom_id, error line or None, failed)`` of one output line; ValueError when it is not one."""
    obj = json.loads(raw)
    if not isinstance(obj, dict) or "custom_id" not in obj or "id" not in obj:
        raise ValueError("not a batch output line")
    err = obj.get("error")
    line = err.get("line") if isinstance(err, dict) else None
    custom_id = obj["custom_id"]
    if custom_id is not None and not isinstance(custom_id, str):
        raise ValueError("custom_id is not a string")
    return custom_id, line if isinstance(line, int) else None, err is not None

