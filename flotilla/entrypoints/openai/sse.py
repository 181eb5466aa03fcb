"""Server-sent events: encoding and a response that stops (and cleans up) when the client leaves.

Contract: ``SSEResponse(events, on_close)`` sends status 200 with ``text/event-stream``, then each item of
``events`` (already-encoded ``bytes``) as it comes. It listens for ``http.disconnect`` the whole time, whatever
the ASGI spec version: a client that leaves cancels the stream at once (even while no event is due, e.g. a
request still queued). In every case ``events`` is closed and ``on_close()`` awaited before returning.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.responses import Response

from flotilla.entrypoints.openai.cancellation import run_unless_disconnected

SSE_DONE = b"data: [DONE]\n\n"
_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]


def sse_data(obj) -> bytes:
    """One ``data: {json}`` event; the JSON is compact UTF-8 (never split inside a character)."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + text.encode("utf-8", errors="replace") + b"\n\n"


class SSEResponse(Response):
    """A starlette Response (so routes can return it) with its own ASGI ``__call__``."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]] | None = None):
        super().__init__(status_code=200, media_type="text/event-stream")
        self.events, self.on_close = events, on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await run_unless_disconnected(receive, self._stream(send))
        except OSError:  # the client went away while we were writing (ASGI spec >= 2.4 servers)
            pass
        finally:
            try:
                await self.events.aclose()
            finally:
                if self.on_close is not None:
                    await self.on_close()

    async def _stream(self, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
        async for event in self.events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
