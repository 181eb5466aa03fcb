"""Pure ASGI middlewares: request body size limit, API key check, in-flight request counting.

They wrap the whole FastAPI app (outermost first: in-flight counter, API key, body limit), so a rejected
request never reaches a route and nothing here buffers a body.
"""

from __future__ import annotations

import hmac
import json

from flotilla.entrypoints.openai.errors import PayloadTooLarge, error_body_for

# No API key and not counted in flight: health checks (OpenAI side and KServe v2) and metrics.
PUBLIC_PATHS = frozenset({"/health", "/metrics", "/v2/health/live", "/v2/health/ready"})


async def send_json_error(send, status: int, message: str, extra_headers: list | None = None,
                          path: str = "") -> None:
    body = json.dumps(error_body_for(path, status, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


class BodySizeLimitMiddleware:
    """413 for bodies over ``max_bytes``: at once from Content-Length, else while the body streams in
    (``receive`` raises ``PayloadTooLarge``, which the app maps to 413). Memory stays bounded."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                return await send_json_error(send, 400, "invalid Content-Length header", path=scope["path"])
            if length > self.max_bytes:
                return await send_json_error(send, 413, f"request body of {length} bytes exceeds the limit of "
                                                        f"{self.max_bytes} bytes", [(b"connection", b"close")],
                                             path=scope["path"])
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


class ApiKeyMiddleware:
    """401 unless ``Authorization: Bearer <key>`` (constant-time compare); the ``PUBLIC_PATHS`` (health and
    metrics) need none."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = b"Bearer " + api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        given = _header(scope, b"authorization") or b""
        if not hmac.compare_digest(given, self.expected):
            return await send_json_error(send, 401, "invalid or missing API key (Authorization: Bearer <key>)",
                                         [(b"www-authenticate", b"Bearer")], path=scope["path"])
        await self.app(scope, receive, send)


class InFlightMiddleware:
    """Counts HTTP requests in progress (streams until their last byte), except /health and /metrics, so the
    drain on SIGTERM knows when the server is idle. ``tracker`` has ``in_flight`` (an int attribute)."""

    def __init__(self, app, tracker):
        self.app, self.tracker = app, tracker

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        self.tracker.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.tracker.in_flight -= 1
