"""systemd's notification protocol (sd_notify), for ``Type=notify`` units.

systemd hands a service the address of a datagram socket in
``$NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for an abstract
socket); the service sends it newline-separated ``KEY=value`` lines:
``READY=1`` once it serves, ``STATUS=`` one line for ``systemctl
status``, ``STOPPING=1`` when it begins to stop, and ``WATCHDOG=1``
every half of ``$WATCHDOG_USEC`` while it is healthy (systemd kills and,
with ``Restart=on-failure``, restarts a service whose pings stop).

The protocol is one ``send()`` of a datagram, so it is written here
rather than taken from a library (python-systemd needs libsystemd and a
C build; the pure-Python ports add a dependency for these few lines).

Without ``$NOTIFY_SOCKET`` (not started by systemd) every call does
nothing.  A failed send is logged once and never raised: being watched
is a service to the operator, not a condition for relaying packets.

The socket is connected when the ``Notifier`` is made, before the relay
drops privileges: a connected datagram socket goes on working after the
process has become a user that could not reach the socket's path.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

__all__ = ["Notifier", "Watchdog"]

log = logging.getLogger("tunrelay.daemon.notify")

#: Errors after which the connected socket is dropped and the next message
#: connects again (systemd's socket went away and may come back).
_RECONNECT = (errno.ECONNREFUSED, errno.ENOTCONN, errno.ECONNRESET, errno.ENOENT)


class Notifier:
    """The sending side of ``$NOTIFY_SOCKET``; ``Notifier(None)`` (or
    ``from_environ()`` outside systemd) is disabled and does nothing.

    ``watchdog_usec``/``watchdog_pid`` are ``$WATCHDOG_USEC`` and
    ``$WATCHDOG_PID`` as text: the watchdog is on when the first is a
    positive integer and the second, if set, is this process's pid.
    Thread-safe: the watchdog thread and the main thread both send.
    """

    def __init__(self, address: str | None, *, watchdog_usec: str | None = None,
                 watchdog_pid: str | None = None) -> None:
        self.address = address or None
        self.failures = 0           # sends that failed (the first one is logged)
        self.sent = 0
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False
        self._status: str | None = None
        self._target: str | None = None
        if self.address is not None:
            if self.address.startswith("@"):
                self._target = "\0" + self.address[1:]
            elif self.address.startswith("/"):
                self._target = self.address
            else:
                log.warning("NOTIFY_SOCKET=%r: expected an absolute path or @abstract name; "
                            "not notifying systemd", self.address)
                self.address = None
        self._period = self._watchdog_period(watchdog_usec, watchdog_pid) if self.address else None
        if self._target is not None:
            with self._lock:
                self._connect()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"), watchdog_usec=env.get("WATCHDOG_USEC"),
                   watchdog_pid=env.get("WATCHDOG_PID"))

    @property
    def enabled(self) -> bool:
        return self._target is not None

    # ------------------------------------------------------------ messages

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``, with the first ``STATUS=`` line in the same datagram."""
        return self._send_with_status(["READY=1"], status)

    def status(self, text: str) -> bool:
        """``STATUS=text``, sent only when it differs from the last one."""
        line = _one_line(text)
        if line == self._status:
            return True
        return self._send_with_status([], line)

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: the service begins to shut down."""
        return self._send_with_status(["STOPPING=1"], status)

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (``Type=notify-reload``,
        systemd 253+); send ``ready()`` once the new configuration applies."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send_with_status(["RELOADING=1", f"MONOTONIC_USEC={usec}"], status)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: alive (sent by ``Watchdog``, only while healthy)."""
        return self.send("WATCHDOG=1")

    def watchdog_period(self) -> float | None:
        """Seconds between watchdog pings (half of ``$WATCHDOG_USEC``), or
        None when systemd does not watch this process."""
        return self._period

    def _send_with_status(self, lines: list[str], status: str | None) -> bool:
        if status is not None:
            status = _one_line(status)
            lines = [*lines, f"STATUS={status}"]
        ok = self.send(*lines)
        if ok and status is not None:
            self._status = status
        return ok

    def send(self, *lines: str) -> bool:
        """One datagram of ``KEY=value`` lines; False when disabled or the
        send failed (logged the first time, counted in ``failures``)."""
        if self._target is None or not lines:
            return False
        data = "\n".join(lines).encode()
        with self._lock:
            try:
                if self._sock is None and not self._connect():
                    return False
                assert self._sock is not None
                self._sock.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except OSError as exc:
                if exc.errno in _RECONNECT and self._sock is not None:
                    self._sock.close()
                    self._sock = None
                self._failed(exc)
                return False
            self.sent += 1
            return True

    def _connect(self) -> bool:
        """Connect to the target (lock held); False (logged once) on failure."""
        assert self._target is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self._target)
        except OSError as exc:
            sock.close()
            self._failed(exc)
            return False
        self._sock = sock
        return True

    def _failed(self, exc: OSError) -> None:
        self.failures += 1
        if not self._warned:
            self._warned = True
            log.warning("systemd notification socket %s: %s (systemd will not hear from the "
                        "relay; this is logged once)", self.address,
                        exc.strerror or exc)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            self._target = None

    @staticmethod
    def _watchdog_period(usec: str | None, pid: str | None) -> float | None:
        if not usec:
            return None
        if pid and (not pid.isdigit() or int(pid) != os.getpid()):
            return None  # meant for another process (a parent, a wrapper)
        if not usec.isdigit() or int(usec) == 0:
            log.warning("WATCHDOG_USEC=%r: expected a positive number of microseconds; "
                        "no watchdog pings", usec)
            return None
        return int(usec) / 2 / 1_000_000


def _one_line(text: str) -> str:
    return " ".join(text.split("\n")).strip()


class Watchdog:
    """Sends ``WATCHDOG=1`` every ``notifier.watchdog_period()`` seconds
    while ``trouble()`` returns None; ``trouble()`` returns why the service
    is not healthy (a pump ended, the supervisor stopped looking...), and
    then no ping goes out, so systemd's watchdog ends the service if that
    lasts.  A ping skipped for a trouble is retried every ``retry`` s, so a
    trouble of a moment (a pump being replaced) costs no more than that.

    Driven by a thread (``start()``/``stop()``) or by an asyncio task
    (``await run_async()``, cancelled to stop: a blocked event loop then
    stops the pings too).  Without a watchdog both do nothing.
    """

    def __init__(self, notifier: Notifier, trouble: Callable[[], str | None], *,
                 retry: float = 0.2) -> None:
        self.notifier = notifier
        self.period = notifier.watchdog_period()
        self.trouble = trouble
        self.retry = retry if self.period is None else min(retry, self.period)
        self.pings = 0
        self._due: float | None = None
        self._late_logged = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.period is not None and self.notifier.enabled

    def step(self, now: float) -> float:
        """Ping if due and healthy; return how long to wait until the next look."""
        assert self.period is not None
        if self._due is None:
            self._due = now
        if now < self._due:
            return self._due - now
        try:
            trouble = self.trouble()
        except Exception as exc:  # a bug in the check must not look like health
            trouble = f"the health check failed: {exc!r}"
        if trouble is None:
            self.notifier.watchdog()
            self.pings += 1
            if self._late_logged:
                log.info("watchdog: healthy again, pinging systemd")
            self._late_logged = False
            self._due = now + self.period
            return self.period
        if now - self._due >= self.period and not self._late_logged:
            # Half of WATCHDOG_USEC without a ping: systemd acts soon; say why.
            self._late_logged = True
            log.warning("watchdog: not pinging systemd: %s", trouble)
        return self.retry

    # ------------------------------------------------------------ drivers

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        wait = 0.0
        while not self._stop.wait(wait):
            wait = self.step(time.monotonic())

    def stop(self) -> None:
        """End the thread (joined): no ping goes out after this returns."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    async def run_async(self) -> None:
        """The same on the running event loop, until cancelled."""
        if not self.enabled:
            return
        while True:
            await asyncio.sleep(self.step(time.monotonic()))
