"""A bounded wait for an exclusive file lock, given up early when the locked-for result has appeared.

Used where several processes may produce one file (the kernel build, a model assembled from parts): the first
takes the lock and produces it; the others wait, and take the finished file instead of producing it again.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable

POLL_S = 0.1


def lock_or_result(path: str, result_ready: Callable[[], bool], deadline: float,
                   timeout_error: Callable[[], BaseException], poll_s: float = POLL_S) -> int | None:
    """An fd holding an exclusive flock on ``path`` (close it to release), or None as soon as
    ``result_ready()`` is true while waiting. Polls a non-blocking flock, so the wait ends at ``deadline``
    (``time.monotonic()``): then ``timeout_error()`` is raised."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                pass
            if result_ready():
                os.close(fd)
                return None
            if time.monotonic() >= deadline:
                raise timeout_error()
            time.sleep(poll_s)
    except BaseException:
        os.close(fd)
        raise
