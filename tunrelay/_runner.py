"""Thread management shared by the compiled and the pure-Python pump.

A pump has two loops (egress, ingress).  Each runs in its own thread until
the pump's stop signal fires or the loop ends on its own (the TCP peer went
away, the device vanished).  When one loop ends on its own it fires the
stop signal so the other follows: a pump is either running both
directions or none, and ``wait()`` reports why it ended.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from .errors import PumpStateError


class Reason(StrEnum):
    """Why a pump (or a relay's connection) ended.

    A ``str`` subclass whose ``str()`` and f-string form are the value, so
    ``outcome.reason == "stopped"``, logs and JSON read as before.
    """

    STOPPED = "stopped"                # stop() was called
    CLOSED = "closed"                  # TCP: the peer closed or reset the connection
    PROTOCOL_ERROR = "protocol_error"  # TCP: a len16 length of zero or over the maximum
    FATAL = "fatal"                    # the device or a descriptor is gone: do not restart
    REPLACED = "replaced"              # relay, TCP: a newly proven connection took its place


# The names the pumps and the relay have always imported.
STOPPED, CLOSED, PROTOCOL_ERROR, FATAL, REPLACED = (
    Reason.STOPPED, Reason.CLOSED, Reason.PROTOCOL_ERROR, Reason.FATAL, Reason.REPLACED)


@dataclass(frozen=True)
class Outcome:
    reason: Reason
    direction: str | None = None
    errno: int = 0
    message: str = ""

    def __post_init__(self) -> None:
        # Outcome("closed") still works, and is the enum member from here on;
        # a reason outside the enum is a bug, refused now rather than compared
        # against nothing later.
        object.__setattr__(self, "reason", Reason(self.reason))

    def __str__(self) -> str:
        text = self.reason.replace("_", " ")
        if self.direction:
            text = f"{self.direction} {text}"
        if self.errno:
            text += f": {os.strerror(self.errno)}"
        if self.message:
            text += f": {self.message}"
        return text

    @property
    def restartable(self) -> bool:
        """True when a new connection can carry on (TCP reconnect)."""
        return self.reason in (CLOSED, PROTOCOL_ERROR)


class LoopRunner:
    """Runs ``run_direction(d)`` for each of ``directions`` in a thread of its
    own: "egress" and "ingress", or "duplex" alone (one loop for both).
    ``signal_stop()`` must make every loop return promptly; ``reset_stop()``
    re-arms the signal before a restart."""

    def __init__(self, run_direction: Callable[[str], Outcome],
                 signal_stop: Callable[[], None],
                 reset_stop: Callable[[], None], name: str = "pump",
                 directions: tuple[str, ...] = ("egress", "ingress")) -> None:
        self._directions = directions
        self._run_direction = run_direction
        self._signal_stop = signal_stop
        self._reset_stop = reset_stop
        self._name = name
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._ended: list[Outcome] = []
        self._done = threading.Event()
        self._done.set()

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def start(self) -> None:
        if self.running:
            raise PumpStateError(f"{self._name} is already running: stop() or wait() for it first")
        self._reset_stop()
        self._ended = []
        self._done.clear()
        self._threads = [
            threading.Thread(target=self._body, args=(direction,),
                             name=f"{self._name}-{direction}", daemon=True)
            for direction in self._directions
        ]
        for thread in self._threads:
            thread.start()

    def _body(self, direction: str) -> None:
        try:
            outcome = self._run_direction(direction)
        except BaseException as exc:  # a bug must still stop the pair, and be reported
            outcome = Outcome(FATAL, direction, message=f"{type(exc).__name__}: {exc}")
        with self._lock:
            self._ended.append(outcome)
            if outcome.reason != STOPPED:
                self._signal_stop()
            if len(self._ended) == len(self._threads):
                self._done.set()

    def stop(self, timeout: float | None = None) -> Outcome | None:
        """Signal both loops, wait for them, and return how they ended."""
        self._signal_stop()
        return self.wait(timeout)

    def wait(self, timeout: float | None = None) -> Outcome | None:
        """Block until both loops have ended; ``None`` on timeout.  The
        result is the first loop that ended on its own, else STOPPED."""
        if not self._done.wait(timeout):
            return None
        for thread in self._threads:
            thread.join()
        for outcome in self._ended:
            if outcome.reason != STOPPED:
                return outcome
        return Outcome(STOPPED)
