"""Racing work against the client's disconnect (vLLM's ``with_cancellation``, as a helper).

Contract: ``run_unless_disconnected(receive, coro)`` runs ``coro`` as a task while listening for
``http.disconnect`` on the ASGI ``receive`` channel (call it only once the request body has been read). If
the work finishes first its result (or exception) is returned (raised); if the client leaves first the work
is cancelled and awaited (so its ``finally`` blocks, e.g. engine aborts, have run) and ``Disconnected`` is
returned. Cancelling the caller cancels both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

Receive = Callable[[], Awaitable[dict]]


class _Disconnected:
    def __repr__(self) -> str:
        return "Disconnected"


Disconnected = _Disconnected()


async def listen_for_disconnect(receive: Receive) -> None:
    """Return once the client has disconnected (other messages, e.g. a trailing empty body, are skipped)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_unless_disconnected(receive: Receive, coro: Awaitable) -> Any:
    work = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(listen_for_disconnect(receive))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
        await asyncio.gather(work, watcher, return_exceptions=True)
    if work.cancelled():
        return Disconnected
    return work.result()
