"""Model replicas that failed requests recently, as this process saw them: the request router avoids them.

``RemoteEngine`` (the ingress's view of a model deployment) marks a replica when a request fails on it (its
engine died, or its actor did); ``FlotillaRequestRouter`` (the same process's Serve request router) leaves
marked replicas out of its ranks while another replica remains, and forgets a replica once it leaves the
deployment. A mark expires after ``ttl_s``, so a replica that recovers (or a mistaken mark) is used again.
This module is pure Python (no Ray); ``FAILED_REPLICAS`` is the registry of this process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

FAILED_REPLICA_TTL_S = 30.0


class FailedReplicas:
    """Replica ids (Serve's unique ids) marked as failed, each until ``ttl_s`` after its last mark.

    Thread-safe: Serve may run the request router on an event loop of its own thread."""

    def __init__(self, ttl_s: float = FAILED_REPLICA_TTL_S, clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self.clock = ttl_s, clock
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def mark(self, replica_id: str) -> None:
        with self._lock:
            self._until[replica_id] = self.clock() + self.ttl_s

    def forget(self, replica_id: str) -> None:
        with self._lock:
            self._until.pop(replica_id, None)

    def is_failed(self, replica_id: str) -> bool:
        with self._lock:
            until = self._until.get(replica_id)
            if until is None:
                return False
            if until <= self.clock():
                del self._until[replica_id]
                return False
            return True

    def failed(self) -> set[str]:
        """The replica ids marked now."""
        with self._lock:
            now = self.clock()
            for rid in [rid for rid, until in self._until.items() if until <= now]:
                del self._until[rid]
            return set(self._until)


FAILED_REPLICAS = FailedReplicas()
