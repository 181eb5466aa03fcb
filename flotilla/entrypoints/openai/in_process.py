"""Calling the server's own ASGI app in-process: how batch jobs send their requests.

Contract: ``InProcessClient(app, api_key=None, priority=BATCH_PRIORITY).send(url, body)`` POSTs ``body`` (a
JSON object) to ``url`` on ``app`` (what ``build_app`` returns: the whole middleware stack, so a batch request
is validated, admitted, counted and answered exactly as the same request over HTTP) and returns
``(status_code, decoded JSON body)`` (a body that is not JSON, e.g. a 499's empty one, decodes to None). No
socket is involved. The ASGI scope carries ``"flotilla.priority"`` (the engine priority the serving code gives
the request; batch work runs below online traffic) and ``"flotilla.final_only"`` (a non-streaming request's
engine requests deliver one final output instead of one per token: the same answer for less of this process's
CPU, which the engine needs on a small machine). After the body, ``receive`` waits until the call is
cancelled, so the app never sees a disconnect while the batch wants the answer; cancelling ``send`` cancels
the app's handler, which aborts its engine requests.
"""

from __future__ import annotations

import asyncio
import json

from flotilla.entrypoints.openai.generation import FINAL_ONLY_SCOPE_KEY, PRIORITY_SCOPE_KEY
from flotilla.request import BATCH_PRIORITY



class InProcessClient:
    def __init__(self, app, api_key: str | None = None, priority: int | None = BATCH_PRIORITY):
        self.app, self.priority = app, priority
        self.headers = [(b"content-type", b"application/json")]
        if api_key:
            self.headers.append((b"authorization", b"Bearer " + api_key.encode()))

    async def send(self, url: str, body: dict) -> tuple[int, object]:
        raw = json.dumps(body).encode()  # ASCII escapes: a lone surrogate in the input stays valid JSON
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": url, "raw_path": url.encode(), "root_path": "",
                 "query_string": b"", "client": ("127.0.0.1", 0), "server": ("flotilla-batch", 0),
                 "headers": self.headers + [(b"content-length", str(len(raw)).encode())],
                 PRIORITY_SCOPE_KEY: self.priority, FINAL_ONLY_SCOPE_KEY: True}
        sent = False
        never = asyncio.Event()

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": raw, "more_body": False}
            await never.wait()  # no disconnect: the caller cancels instead
            return {"type": "http.disconnect"}

        status = 500
        chunks: list[bytes] = []

        async def send_message(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, send_message)
        data = b"".join(chunks)
        try:
            return status, json.loads(data) if data else None
        except ValueError:
            return status, None
