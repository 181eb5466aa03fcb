"""Admission control: whether a new generation request may enter the engine.

``decide`` is a pure function of the server's state; ``RequestTracker`` holds the app's state (in-flight HTTP
requests, draining) and ``WaitingCount`` one model's admitted-but-waiting engine requests (each model has its
own queue bound). The waiting count is kept on the server side (an engine request waits from admission until
its first output or its end) because ``AsyncLLM.generate`` only adds a request when first iterated: counting
on the server closes the window in which many simultaneous requests could all pass a check of
``engine.num_queued_requests``. The engine's own count is used too, whichever is larger.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    """``status`` None: admitted; else the HTTP status to answer with, its message and headers."""

    status: int | None
    message: str = ""
    retry_after_s: int | None = None

    @property
    def admitted(self) -> bool:
        return self.status is None


ADMIT = Decision(None)


def decide(*, draining: bool, engine_dead: bool, num_waiting: int, max_waiting: int,
           retry_after_s: int = 1, dead_reason: str | None = None) -> Decision:
    """503 while draining or when the engine is dead (the message ends with ``dead_reason`` if given); 429
    (with Retry-After) when ``num_waiting`` requests already wait and that meets ``max_waiting``; otherwise
    admit."""
    if draining:
        return Decision(503, "the server is shutting down and admits no new requests")
    if engine_dead:
        return Decision(503, "the engine is not running" + (f": {dead_reason}" if dead_reason else ""))
    if num_waiting >= max_waiting:
        return Decision(429, f"too many requests waiting ({num_waiting}, limit {max_waiting}); retry later",
                        retry_after_s)
    return ADMIT


class RequestTracker:
    """The app's counters (event-loop thread only): ``in_flight`` HTTP requests (for the drain) and
    ``draining`` (set by the first SIGTERM: admit nothing more)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False


class WaitingCount:
    """One model's admitted engine requests without an output yet (event-loop thread only)."""

    def __init__(self) -> None:
        self.num_waiting = 0

    def add_waiting(self, count: int) -> None:
        self.num_waiting += count

    def done_waiting(self, count: int = 1) -> None:
        self.num_waiting = max(0, self.num_waiting - count)
