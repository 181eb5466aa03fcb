"""Runs inside Ray Serve's HTTP proxy: the errors Serve answers by itself become OpenAI JSON errors.

Serve's proxy answers some failures on its own, in text/plain or not at all: the ingress replica serving a
request died (no response, so uvicorn's text/plain ``500 Internal Server Error``; or a stream cut short), no
ingress replica is available or all are full (503), the proxy's request timeout (408). flotilla's app
answers every error (status >= 400) as JSON, so an error response that is not JSON came from Serve.

Contract of ``OpenAIErrorsInProxy`` (a pure ASGI middleware around the proxy's app; Serve's own ``/-/``
routes pass untouched):
- a non-JSON error response becomes ``{"error": {...}}`` with the same status (and ``Retry-After``), with a
  message of ours (never Ray internals; Serve logs its own);
- a request that got no response at all gets a JSON 500 ("retry it": nothing else was sent);
- an event stream (``text/event-stream``) cut short ends as flotilla ends a failed stream: an ``{"error"}``
  event, then ``data: [DONE]``; any other response cut short stays cut (the client sees a broken body,
  never a truncated one that looks whole).

``proxy_middlewares`` is the callback Serve's proxy calls at start-up; ``run_on_ray`` installs it through
``flotilla.distributed.ray_compat.proxy_callback_env``.
"""

from __future__ import annotations

import contextlib
import json
import logging

from flotilla.entrypoints.openai.errors import error_body
from flotilla.entrypoints.openai.sse import SSE_DONE, sse_data

logger = logging.getLogger(__name__)

IMPORT_PATH = "flotilla.entrypoints.openai.ray_proxy.proxy_middlewares"
MESSAGES = {404: "no application serves this path (the server may still be starting)",
            408: "the request timed out before the server answered",
            429: "too many requests are in flight; retry later",
            503: "no server replica can take the request now; retry later"}
FAILED = "the server replica handling this request stopped before answering; retry it"
CUT = "the server replica handling this request stopped; the response is incomplete"


def proxy_middlewares() -> list:
    """The middlewares Serve's proxy applies (the value of its proxy-callback setting)."""
    from starlette.middleware import Middleware
    return [Middleware(OpenAIErrorsInProxy)]


def _headers(message: dict) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in message.get("headers", ())}


class OpenAIErrorsInProxy:
    """See the module contract."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path", "").startswith("/-/"):
            return await self.app(scope, receive, send)
        response = _ResponseState(send)
        try:
            await self.app(scope, receive, response.send)
        finally:
            with contextlib.suppress(Exception):  # the client may be gone already
                await response.finish()


class _ResponseState:
    """Watches (and where needed rewrites) one response on its way to the client."""

    def __init__(self, send):
        self._send = send
        self.started = self.ended = self.event_stream = False
        self.held: dict | None = None  # the start of a non-JSON error response, answered as JSON instead

    async def send(self, message: dict) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            content_type = _headers(message).get(b"content-type", b"")
            if message["status"] >= 400 and not content_type.startswith(b"application/json"):
                self.held = message
                return
            self.started = True
            self.event_stream = content_type.startswith(b"text/event-stream")
        elif kind == "http.response.body":
            if self.held is not None:
                if not message.get("more_body", False):
                    await self._json_error(self.held["status"], _headers(self.held).get(b"retry-after"))
                return
            if not message.get("more_body", False):
                self.ended = True
        await self._send(message)

    async def finish(self) -> None:
        """After the app returned: complete what Serve left unanswered or cut."""
        if self.ended:
            return
        if self.held is not None or not self.started:
            status = self.held["status"] if self.held is not None else 500
            await self._json_error(status, None)
        elif self.event_stream:
            body = sse_data(error_body(500, CUT)) + SSE_DONE
            await self._send({"type": "http.response.body", "body": body, "more_body": False})
            self.ended = True

    async def _json_error(self, status: int, retry_after: bytes | None) -> None:
        body = json.dumps(error_body(status, MESSAGES.get(status, FAILED))).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if retry_after is not None:
            headers.append((b"retry-after", retry_after))
        self.started, self.held = True, None
        await self._send({"type": "http.response.start", "status": status, "headers": headers})
        await self._send({"type": "http.response.body", "body": body, "more_body": False})
        self.ended = True
