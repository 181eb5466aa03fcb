"""Triton's dynamic batcher as a pure policy: queue state + a clock reading -> the next batch, the requests that
timed out, and how long to wait. No threads, no asyncio, no numpy; the caller passes ``now`` (seconds).

Semantics (Triton's ``DynamicBatchScheduler::GetDynamicBatch`` and ``PriorityQueue``):
- Requests are taken in order: priority level 1 first (1 is the highest), within a level in arrival order,
  then that level's delayed requests (timed out under a DELAY policy). A request counts with its batch size.
- The batch grows while it fits ``max_batch_size`` and the requests share a batch key (equal shapes of
  non-ragged variable-size inputs). If the requests in the queue can make a preferred batch size, the largest
  one reachable is sent at once; if the next request would pass the largest preferred size, what is pending
  is sent. Otherwise the batch waits until its oldest request has waited ``max_queue_delay`` (then everything
  pending, up to ``max_batch_size``, is sent) or until a new request completes a preferred size.
  Without preferred sizes the largest preferred size is ``max_batch_size``. A delay of 0 never waits.
- A request's timeout is its level's ``default_timeout`` (a smaller per-request timeout replaces it when the
  policy has ``allow_timeout_override``; as in Triton, an override is ignored when the default is 0). Once
  ``now >= deadline`` the request is rejected (REJECT, Triton's "Request timeout expired") or moved behind its
  level's other requests (DELAY). ``max_queue_size`` bounds each level's queue; past it ``enqueue`` raises
  Triton's "Exceeds maximum queue size" at once.
- Without ``dynamic_batching`` in the config (or with ``max_batch_size: 0``) every request is a batch alone.
- ``OrderedRelease`` hands results back in arrival order for ``preserve_ordering``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterator, Mapping

from tritonclient.grpc import model_config_pb2 as mc

from flotilla.repository.config import ModelConfig
from flotilla.repository.errors import queue_full

_US = 1e-6


@dataclass(frozen=True)
class QueuePolicy:
    """Triton's ModelQueuePolicy, in seconds."""
    timeout_action: str = "REJECT"          # "REJECT" | "DELAY"
    default_timeout_s: float = 0.0          # 0: requests never time out
    allow_timeout_override: bool = False
    max_queue_size: int = 0                 # 0: unbounded

    @classmethod
    def from_proto(cls, p: mc.ModelQueuePolicy) -> "QueuePolicy":
        return cls(mc.ModelQueuePolicy.TimeoutAction.Name(p.timeout_action), p.default_timeout_microseconds * _US,
                   p.allow_timeout_override, p.max_queue_size)

    def timeout_s(self, requested_us: int) -> float:
        """The request's timeout (0 = none) given its own timeout in microseconds (0 = not set)."""
        timeout = self.default_timeout_s
        if self.allow_timeout_override and requested_us and requested_us * _US < timeout:
            timeout = requested_us * _US
        return timeout


@dataclass(frozen=True)
class BatcherSettings:
    """What the dynamic batcher reads from a ModelConfig."""
    model: str
    max_batch_size: int = 0
    dynamic: bool = False                   # a dynamic_batching block is present
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_s: float = 0.0
    preserve_ordering: bool = False
    priority_levels: int = 0
    default_priority_level: int = 0
    default_queue_policy: QueuePolicy = QueuePolicy()
    priority_queue_policy: Mapping[int, QueuePolicy] = field(default_factory=dict)
    # flotilla's extension (not a Triton field; 0: none): a batch's rows x its longest request's ``length``
    # stays within this (an embedding model's ``max_num_batched_tokens``, padded tokens); a lone request that
    # exceeds it still runs, alone.
    max_batch_padded_tokens: int = 0

    @classmethod
    def from_config(cls, config: ModelConfig) -> "BatcherSettings":
        if not config.HasField("dynamic_batching"):
            return cls(config.name, config.max_batch_size)
        db = config.dynamic_batching
        return cls(config.name, config.max_batch_size, True, tuple(sorted(set(db.preferred_batch_size))),
                   db.max_queue_delay_microseconds * _US, db.preserve_ordering, db.priority_levels,
                   db.default_priority_level, QueuePolicy.from_proto(db.default_queue_policy),
                   {level: QueuePolicy.from_proto(p) for level, p in db.priority_queue_policy.items()})

    @property
    def batches(self) -> bool:
        """Whether several requests may share one execution."""
        return self.dynamic and self.max_batch_size > 0

    @property
    def max_preferred(self) -> int:
        return max(self.preferred_batch_sizes) if self.preferred_batch_sizes else self.max_batch_size

    def level_of(self, priority: int) -> int:
        """Triton's SetPriority: 0 or beyond ``priority_levels`` means the default level."""
        if not self.dynamic or self.priority_levels == 0:
            return 0
        return priority if 1 <= priority <= self.priority_levels else self.default_priority_level

    def policy_of(self, level: int) -> QueuePolicy:
        if not self.dynamic:
            return QueuePolicy()
        return self.priority_queue_policy.get(level, self.default_queue_policy)


@dataclass(eq=False)
class _Entry:
    rid: Hashable
    batch_size: int
    key: tuple
    enqueued: float
    deadline: float | None                  # absolute; None once delayed or when there is no timeout
    level: int
    length: int = 0                         # per-row length for ``max_batch_padded_tokens``


@dataclass
class _Level:
    policy: QueuePolicy
    live: deque = field(default_factory=deque)       # of _Entry, arrival order
    delayed: deque = field(default_factory=deque)    # timed out under DELAY, in the order they timed out

    def __len__(self) -> int:
        return len(self.live) + len(self.delayed)


def _remove(level: _Level, entry: _Entry) -> None:
    try:
        level.live.remove(entry)
    except ValueError:
        level.delayed.remove(entry)


@dataclass(frozen=True)
class Decision:
    """The outcome of one ``BatchQueue.poll``. ``batch`` and ``rejected`` are already out of the queue."""
    batch: tuple = ()                       # request ids forming the next batch, in queue order
    rejected: tuple = ()                    # request ids that timed out under REJECT
    wait_s: float | None = None             # no batch: poll again after at most this long (None: on an event)
    wake_at: float | None = None            # the same as a clock reading (now + wait_s, exactly as compared)


class BatchQueue:
    """The queue of one model's dynamic batcher. Not thread-safe: one owner calls it."""

    def __init__(self, settings: BatcherSettings):
        self.settings = settings
        self._levels: dict[int, _Level] = {}
        self._entries: dict[Hashable, _Entry] = {}
        self._next_deadline: float | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, rid: Hashable) -> bool:
        return rid in self._entries

    @property
    def queued_batch_size(self) -> int:
        return sum(e.batch_size for e in self._entries.values())

    def enqueue(self, rid: Hashable, batch_size: int, now: float, *, priority: int = 0, timeout_us: int = 0,
                key: tuple = (), length: int = 0) -> None:
        """Queue a checked request (``length``: its rows' length, for ``max_batch_padded_tokens``). Raises InferError (UNAVAILABLE, "Exceeds maximum queue size") when its
        level's queue is full, ValueError on a duplicate id or a batch size outside [1, max_batch_size]."""
        if rid in self._entries:
            raise ValueError(f"request id {rid!r} is already queued")
        limit = max(self.settings.max_batch_size, 1)
        if not 1 <= batch_size <= limit:
            raise ValueError(f"batch size {batch_size} outside [1, {limit}]")
        level = self.settings.level_of(priority)
        queue = self._levels.get(level)
        if queue is None:
            queue = self._levels[level] = _Level(self.settings.policy_of(level))
        if queue.policy.max_queue_size and len(queue) >= queue.policy.max_queue_size:
            raise queue_full()
        timeout = queue.policy.timeout_s(timeout_us)
        deadline = now + timeout if timeout > 0 else None
        entry = _Entry(rid, batch_size, key, now, deadline, level, length)
        queue.live.append(entry)
        self._entries[rid] = entry
        if deadline is not None and (self._next_deadline is None or deadline < self._next_deadline):
            self._next_deadline = deadline

    def cancel(self, rid: Hashable) -> bool:
        """Remove a queued request (its client went away); False if it is not queued."""
        entry = self._entries.pop(rid, None)
        if entry is None:
            return False
        _remove(self._levels[entry.level], entry)
        return True

    def _ordered(self) -> Iterator[_Entry]:
        for level in sorted(self._levels):
            yield from self._levels[level].live
            yield from self._levels[level].delayed

    def _expire(self, now: float) -> list[Hashable]:
        """Apply the queue policies: REJECT timed-out requests (returned), DELAY moves them back."""
        if self._next_deadline is None or now < self._next_deadline:
            return []
        rejected, nearest = [], None
        for queue in self._levels.values():
            keep = deque()
            for e in queue.live:
                if e.deadline is not None and now >= e.deadline:
                    if queue.policy.timeout_action == "DELAY":
                        e.deadline = None
                        queue.delayed.append(e)
                    else:
                        rejected.append(e.rid)
                        del self._entries[e.rid]
                    continue
                keep.append(e)
                if e.deadline is not None and (nearest is None or e.deadline < nearest):
                    nearest = e.deadline
            queue.live = keep
        self._next_deadline = nearest
        return rejected

    def _take(self, entries: list[_Entry]) -> tuple:
        for e in entries:
            del self._entries[e.rid]
            _remove(self._levels[e.level], e)
        return tuple(e.rid for e in entries)

    def poll(self, now: float, can_execute: bool = True, flush: bool = False) -> Decision:
        """Expire timed-out requests; then, if ``can_execute`` (an instance is free), form the next batch or
        say how long to wait for it. Never waits past a request's delay or deadline. ``flush`` (draining
        before an unload) sends what is pending without waiting for the delay."""
        rejected = tuple(self._expire(now))
        if not self._entries:
            return Decision(rejected=rejected)
        wake_at = self._next_deadline
        if can_execute:
            if not self.settings.batches:
                return Decision(self._take([next(self._ordered())]), rejected)
            pending, ready_at = self._form(now, flush)
            if pending is not None:
                return Decision(self._take(pending), rejected)
            wake_at = ready_at if wake_at is None else min(wake_at, ready_at)
        if wake_at is None:
            return Decision(rejected=rejected)
        return Decision(rejected=rejected, wait_s=max(wake_at - now, 0.0), wake_at=wake_at)

    def _form(self, now: float, flush: bool) -> tuple[list[_Entry] | None, float]:
        """(entries to send now, 0) or (None, the clock time at which the oldest pending request's delay
        is over)."""
        s = self.settings
        preferred, max_pref = set(s.preferred_batch_sizes), s.max_preferred
        pending: list[_Entry] = []
        size, best, send_now, longest = 0, 0, False, 0
        budget = s.max_batch_padded_tokens
        for e in self._ordered():
            if pending:
                if size + e.batch_size > max_pref and best == 0:
                    best = len(pending)           # cannot reach a preferred size past this point
                if (size + e.batch_size > s.max_batch_size or e.key != pending[0].key
                        or (budget and (size + e.batch_size) * max(longest, e.length) > budget)):
                    send_now = True
                    break
            pending.append(e)
            size += e.batch_size
            longest = max(longest, e.length)
            if size in preferred:
                best = len(pending)
        oldest = min(e.enqueued for e in pending)
        delay = s.max_queue_delay_s
        ready_at = oldest + delay          # compared as computed here, so a clock set to it is exactly "over"
        delay_exceeded = delay > 0 and now >= ready_at
        if best and not delay_exceeded:
            return pending[:best], 0.0
        if send_now or size >= max_pref or delay_exceeded or delay == 0 or flush:
            return pending, 0.0
        return None, ready_at


class OrderedRelease:
    """Releases completed results in admission order (``preserve_ordering``): a result waits until every
    request admitted before it has completed or been discarded."""

    _DISCARDED = object()

    def __init__(self) -> None:
        self._order: deque = deque()
        self._done: dict[Hashable, Any] = {}

    def __len__(self) -> int:
        return len(self._order)

    def admit(self, rid: Hashable) -> None:
        self._order.append(rid)

    def complete(self, rid: Hashable, value: Any) -> list[tuple[Hashable, Any]]:
        """Record ``rid``'s result; return the (id, result) pairs now releasable, in order."""
        self._done[rid] = value
        return self._release()

    def discard(self, rid: Hashable) -> list[tuple[Hashable, Any]]:
        """``rid`` will never complete (cancelled): stop holding later results behind it."""
        if rid in self._done or rid not in self._order:
            return []
        self._done[rid] = self._DISCARDED
        return self._release()

    def _release(self) -> list[tuple[Hashable, Any]]:
        out = []
        while self._order and self._order[0] in self._done:
            rid = self._order.popleft()
            value = self._done.pop(rid)
            if value is not self._DISCARDED:
                out.append((rid, value))
        return out
