"""Warnings that a stranger can cause at will, logged at a bounded rate.

A refused connection is worth a WARNING, but one per refusal lets anyone who
reaches the port fill the disk.  ``RateLimitedLog`` logs the first of each
kind, then at most one per ``interval`` seconds; that one says how many were
left out since the last.  Counters (not the log) keep the exact totals.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

#: Seconds between two WARNINGs of one kind.
LOG_INTERVAL_S = 10.0


class RateLimitedLog:
    """At most one record per kind per ``interval`` seconds, on ``log``.

    Not thread-safe: each owner (a TcpServer) logs from one thread.
    """

    def __init__(self, log: logging.Logger, interval: float = LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = log
        self.interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}  # kind -> when it was last logged
        self._suppressed: dict[str, int] = {}  # kind -> left out since then

    def log_at(self, level: int, kind: str, message: str, *args: object) -> bool:
        """Log ``message % args`` unless ``kind`` was logged less than
        ``interval`` seconds ago (then count it).  True if it was logged."""
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            message += " (%d more like this in the last %.0f s, not logged)"
            args = (*args, suppressed, now - last)
        self._last[kind] = now
        self.log.log(level, message, *args)
        return True

    def warning(self, kind: str, message: str, *args: object) -> bool:
        return self.log_at(logging.WARNING, kind, message, *args)
