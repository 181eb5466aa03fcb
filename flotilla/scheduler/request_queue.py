"""The scheduler's waiting queue: requests in ``(priority, arrival)`` order (pure Python).

Contract: ``head`` (None when empty) / ``pop()`` give the request with the smallest ``Request.queue_key``
(``(priority, arrival_seq)``: lower priority first, then earlier arrival); ``push`` puts a request at its place, so a
preempted request pushed back returns ahead of later arrivals of its priority. With every priority equal it is
first-in first-out. ``remove_finished`` drops finished requests (O(n), only when some are). Iteration and
``[i]`` are in service order (they copy: for tests and inspection, not the hot path).

Layout (what keeps the hot path as cheap as a deque): one deque per distinct priority, in arrival order,
and a heap of the distinct priorities present. ``head`` (an attribute) and ``pop`` are O(1) (plus O(log p)
when a priority's last request leaves, p = distinct priorities); ``push`` is O(1) at either end of its
priority's deque (new arrivals, and preempted requests, which arrived before every waiting request of their
priority), O(n) in the rare case between.
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque
from collections.abc import Iterator

from flotilla.request import Request


class WaitingQueue:
    __slots__ = ("head", "_levels", "_priorities", "_len")

    def __init__(self) -> None:
        self.head: Request | None = None  # the next request to serve
        self._levels: dict[int, deque[Request]] = {}  # priority -> its requests by arrival_seq
        self._priorities: list[int] = []  # heap of the keys of _levels
        self._len = 0

    def push(self, request: Request) -> None:
        level = self._levels.get(request.priority)
        if level is None:
            self._levels[request.priority] = deque((request,))
            heapq.heappush(self._priorities, request.priority)
        elif request.arrival_seq > level[-1].arrival_seq:
            level.append(request)
        elif request.arrival_seq < level[0].arrival_seq:
            level.appendleft(request)
        else:
            seqs = [r.arrival_seq for r in level]
            level.insert(bisect.bisect(seqs, request.arrival_seq), request)
        self._len += 1
        head = self.head
        if head is None or request.priority < head.priority or (
                request.priority == head.priority and request.arrival_seq < head.arrival_seq):
            self.head = request

    def pop(self) -> Request:
        """Remove and return ``head`` (IndexError when empty)."""
        request = self.head
        if request is None:
            raise IndexError("pop from an empty WaitingQueue")
        level = self._levels[request.priority]
        level.popleft()
        if level:
            self.head = level[0]
        else:
            heapq.heappop(self._priorities)
            del self._levels[request.priority]
            self.head = self._levels[self._priorities[0]][0] if self._priorities else None
        self._len -= 1
        return request

    def remove_finished(self) -> None:
        """Drop the finished requests (aborted or stopped while waiting)."""
        for priority in [p for p, level in self._levels.items() if any(r.is_finished() for r in level)]:
            kept = deque(r for r in self._levels[priority] if not r.is_finished())
            self._len -= len(self._levels[priority]) - len(kept)
            if kept:
                self._levels[priority] = kept
            else:
                del self._levels[priority]
                self._priorities.remove(priority)
                heapq.heapify(self._priorities)
        self.head = self._levels[self._priorities[0]][0] if self._priorities else None

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[Request]:
        return (r for p in sorted(self._levels) for r in list(self._levels[p]))

    def __getitem__(self, index: int) -> Request:
        return list(self)[index]
