"""Progress of a batch job: a tqdm bar on a terminal (requests done, output tok/s, ETA), plain log lines
every ``interval_s`` seconds otherwise (a file, a pipe, a container log)."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

logger = logging.getLogger("flotilla.run_batch")


class Progress:
    """Counts requests as they finish. ``total``: the requests of the job (None: unknown); ``skipped``: those
    already in the output (``--resume``), shown as done from the start. ``stream``: where the bar or lines go
    (default stderr); a bar only when it is a terminal."""

    def __init__(self, total: int | None, skipped: int = 0, stream: TextIO | None = None,
                 interval_s: float = 10.0, clock=time.monotonic):
        self.total, self.skipped = total, skipped
        self.done = self.failed = self.tokens = 0
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s, self.clock = interval_s, clock
        self.start = self.last_log = clock()
        self._bar = None
        if _is_terminal(self.stream):
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=skipped, unit="req", desc="run-batch", file=self.stream,
                             dynamic_ncols=True)

    def update(self, failed: bool, output_tokens: int) -> None:
        self.done += 1
        self.failed += int(failed)
        self.tokens += output_tokens
        now = self.clock()
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.tok_per_s(now):.1f} tok/s, {self.failed} failed", refresh=False)
            self._bar.update(1)
        elif now - self.last_log >= self.interval_s:
            self.last_log = now
            logger.info("%s", self.line(now))

    def tok_per_s(self, now: float | None = None) -> float:
        elapsed = (now if now is not None else self.clock()) - self.start
        return self.tokens / elapsed if elapsed > 0 else 0.0

    def line(self, now: float | None = None) -> str:
        """``1200/5000 requests (24%), 3 failed, 812.3 output tok/s, ETA 0:04:10``."""
        now = now if now is not None else self.clock()
        finished = self.done + self.skipped
        text = f"{finished}/{self.total if self.total is not None else '?'} requests"
        if self.total:
            text += f" ({100 * finished // self.total}%)"
        text += f", {self.failed} failed, {self.tok_per_s(now):.1f} output tok/s"
        elapsed = now - self.start
        if self.total is not None and self.done and elapsed > 0:
            left = max(0, self.total - finished) * elapsed / self.done
            text += f", ETA {_hms(left)}"
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
