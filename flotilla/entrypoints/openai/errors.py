"""OpenAI's error shape and the mapping from exceptions to HTTP statuses.

Contract: every error response is ``{"error": {"message", "type", "param", "code"}}`` with ``code`` the HTTP
status (on the KServe v2 routes, ``/v2...``, Triton's ``{"error": "<message>"}`` instead); a client error is
never a 500; an unexpected exception is a 500 with a generic message (the stack trace goes to the server log,
never to the client).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from flotilla.errors import EngineDeadError, InvalidRequestError

logger = logging.getLogger(__name__)

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               405: "MethodNotAllowedError", 408: "RequestTimeoutError", 413: "RequestEntityTooLargeError",
               415: "UnsupportedMediaTypeError", 429: "RateLimitError", 500: "InternalServerError",
               503: "ServiceUnavailableError"}


class APIError(Exception):
    """An error answered to the client as-is: ``status`` plus OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


class PayloadTooLarge(Exception):
    """Raised while reading a request body that exceeds the configured limit (see middleware)."""

    def __init__(self, limit: int):
        super().__init__(f"request body exceeds the limit of {limit} bytes")
        self.limit = limit


KSERVE_PREFIX = "/v2"


def is_kserve_path(path: str) -> bool:
    """Paths of the KServe v2 routes, whose errors use Triton's shape ``{"error": "<message>"}``."""
    return path == KSERVE_PREFIX or path.startswith(KSERVE_PREFIX + "/")


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "APIError"), "param": param,
                      "code": status}}


def error_body_for(path: str, status: int, message: str, param: str | None = None) -> dict:
    """Triton's error shape on the KServe v2 routes, OpenAI's everywhere else."""
    return {"error": message} if is_kserve_path(path) else error_body(status, message, param)


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def to_api_error(exc: BaseException) -> APIError:
    """The APIError a (non-cancellation) exception raised while serving a request stands for."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return APIError(400, exc.message, exc.param)
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"the engine is unavailable: {exc}")
    if isinstance(exc, PayloadTooLarge):
        return APIError(413, str(exc))
    logger.error("unexpected error while serving a request", exc_info=exc)
    return APIError(500, "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception class a request can raise to an OpenAI-shaped JSON response."""

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        err = to_api_error(exc)
        return JSONResponse(error_body_for(request.url.path, err.status, err.message, err.param),
                            status_code=err.status, headers=err.headers)

    async def on_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if is_kserve_path(request.url.path):   # Triton's texts for unknown routes and methods
            message = {404: "Not Found", 405: "Method Not Allowed"}.get(exc.status_code, message)
        elif exc.status_code == 404:
            message = f"no route {request.url.path}"
        return JSONResponse(error_body_for(request.url.path, exc.status_code, message),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        loc = [str(x) for x in errors[0].get("loc", ()) if x != "body"] if errors else []
        msg = errors[0].get("msg", "invalid request") if errors else "invalid request"
        return error_response(400, f"{'.'.join(loc)}: {msg}" if loc else msg, loc[0] if loc else None)

    for cls in (APIError, InvalidRequestError, EngineDeadError, PayloadTooLarge, Exception):
        app.add_exception_handler(cls, on_error)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)
    app.add_exception_handler(RequestValidationError, on_validation_error)
