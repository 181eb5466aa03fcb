"""Small process helpers shared by the engine-core, worker and server processes."""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


def exit_with_parent(parent_pid: int, check_s: float = 1.0, on_exit: Callable[[], None] | None = None) -> None:
    """Exit this process as soon as ``parent_pid`` is no longer its parent, even mid-load; ``on_exit`` runs
    first (errors ignored), e.g. to remove what the dead parent can no longer clean up.

    A watchdog thread rather than PR_SET_PDEATHSIG: that signal fires when the parent *thread* that
    started us exits, not the parent process.
    """
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(check_s)
        logger.warning("parent process %d is gone, exiting", parent_pid)
        if on_exit is not None:
            try:
                on_exit()
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
        os._exit(1)

    threading.Thread(target=watch, name="flotilla-parent-watch", daemon=True).start()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def release_free_memory() -> None:
    """Hand memory that the C allocator holds but no longer uses back to the operating system.

    glibc keeps freed blocks in its arenas (one per thread that allocated) and raises its mmap threshold
    after large frees, so a burst of big temporary objects (a huge request body, a tokenizer's encodings)
    would otherwise stay in the process's RSS. ``malloc_trim(0)`` trims every arena; a no-op where the C
    library is not glibc.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)
