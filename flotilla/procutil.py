"""Small process helpers shared by the engine-core and worker processes."""

from __future__ import annotations

import logging
import os
import threading
import time

logger = logging.getLogger(__name__)


def exit_with_parent(parent_pid: int, check_s: float = 1.0) -> None:
    """Exit this process as soon as ``parent_pid`` is no longer its parent, even mid-load.

    A watchdog thread rather than PR_SET_PDEATHSIG: that signal fires when the parent *thread* that
    started us exits, not the parent process.
    """
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(check_s)
        logger.warning("parent process %d is gone, exiting", parent_pid)
        os._exit(1)

    threading.Thread(target=watch, name="flotilla-parent-watch", daemon=True).start()
