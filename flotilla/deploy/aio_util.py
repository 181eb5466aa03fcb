"""asyncio helpers shared by the Ray Serve front-end handles and replicas.

- ``gather_or_cancel(coros)``: every result in order; when one fails (or the caller is cancelled) the others are
  cancelled and awaited before the error propagates, so no orphan task keeps running.
- ``PeriodicStats``: a mixin whose ``ensure_stats_task()`` starts ``refresh_stats()`` every ``_stats_period_s``
  seconds on the running loop (every ``NOT_READY_PERIOD_S`` while ``_ready`` is False, so ``/health`` turns 200
  soon after a replica is up). The class provides ``_stats_task`` (None at first), ``_stats_period_s``,
  ``_ready`` and ``async refresh_stats()``; a failed refresh is retried at the next period.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterable

NOT_READY_PERIOD_S = 0.5


async def gather_or_cancel(coros: Iterable[Awaitable]) -> list:
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class PeriodicStats:
    _stats_task: asyncio.Task | None
    _stats_period_s: float
    _ready: bool

    async def refresh_stats(self):  # pragma: no cover - provided by the class
        raise NotImplementedError

    def ensure_stats_task(self) -> None:
        """Start the periodic stats refresh on the running event loop (once; no-op without a loop)."""
        if self._stats_task is not None and not self._stats_task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._stats_task = loop.create_task(self._stats_loop())

    async def _stats_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.refresh_stats()
            await asyncio.sleep(self._stats_period_s if self._ready else min(self._stats_period_s, NOT_READY_PERIOD_S))
