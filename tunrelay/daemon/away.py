"""TCP: what happens to the packets the kernel queues in the TUN device
while no peer is connected.

Between two TCP connections (the client reconnecting, the server waiting
for its next peer, and before the first one) no pump reads the device, but
the device stays up, so the kernel keeps queueing the packets routed into
it: up to ``txqueuelen`` (500), beyond that it drops them and counts them
only in the device's ``tx_dropped``.  Left alone, the next connection's
pump would send that whole backlog, seconds or minutes old, to the new
peer ahead of fresh traffic: pings answered long after they were given up,
DNS queries long since retried, stale audio, TCP segments the sender has
already retransmitted.

So while no peer is connected an ``AwayDrain`` watches the device: when
the oldest packet waiting in a queue has waited ``[transport]
away_hold_ms``, it reads everything waiting in that queue and drops it,
each packet counted as the egress drop ``peer_away``.  The next peer
therefore never gets a packet older than the bound (plus a wake-up's
slack); a reconnect within the bound of the first packet queued loses
nothing.  A packet younger than the bound is dropped only together with an
older one ahead of it (a queue is drained whole: the device cannot be read
selectively, and a packet read cannot be put back).

It runs only in the gap: ``stop()`` returns once its thread has ended, and
the relay calls it before a pump starts on the device, so the two never
read the same fd at once.

When a connection ends the queue may already hold a backlog (the pump was
blocked behind a dead connection until TCP gave up on it).  Its age is not
known; ``note()``, called by the supervisor while a pump runs, remembers
the last moment the pump was seen reading or the device seen empty, and the
backlog counts as queued since then.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time

#: The egress drop counter of the packets dropped here.
PEER_AWAY = "peer_away"

#: Longest read: a virtio-net header and the largest IP packet (offloads).
_READ_SIZE = 10 + 65535 + 1
#: sizeof(struct virtio_net_hdr): the device's default header size.
_VNET_HDR_LEN = 10
#: Reads per drain before looking at the stop fd again (a queue fed as
#: fast as it is read still lets stop() through).
_DRAIN_LIMIT = 4096
_ERRORS = select.POLLERR | select.POLLHUP | select.POLLNVAL


def packets_in(read: bytes | memoryview, vnet_hdr: bool) -> int:
    """How many packets one read from the device carries: one, or with a
    virtio-net header of a GSO super-packet, the segments it stands for
    (as the pump counts packets on the wire)."""
    if not vnet_hdr or len(read) < _VNET_HDR_LEN:
        return 1
    gso_type, hdr_len = read[1], int.from_bytes(read[2:4], "little")
    gso_size = int.from_bytes(read[4:6], "little")
    payload = len(read) - _VNET_HDR_LEN - hdr_len
    if gso_type == 0 or gso_size == 0 or payload <= 0:
        return 1
    return -(-payload // gso_size)


class AwayDrain:
    """Drops what waits in the device's queues (``fds``) longer than
    ``hold_s`` seconds, while started.  ``dropped``: packets so far."""

    def __init__(self, fds: tuple[int, ...], hold_s: float, *, vnet_hdr: bool = False,
                 log: logging.Logger | None = None) -> None:
        self.fds = tuple(fds)
        self.hold_s = hold_s
        self.vnet_hdr = vnet_hdr
        self.log = log or logging.getLogger("tunrelay.daemon.away")
        self.dropped = 0
        self._gap = 0                        # dropped since start()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._seen: float | None = None      # note(): last moment the queues were known young
        self._reads: int | None = None       # note(): the pump's TUN reads at that moment

    @property
    def running(self) -> bool:
        return self._thread is not None

    def note(self, tun_reads: int) -> None:
        """While a pump runs (every supervisor slice): the pump's TUN reads
        so far.  Remembers now if they moved or the device is empty."""
        now = time.monotonic()
        if tun_reads != self._reads or not _readable(self.fds):
            self._seen = now
        self._reads = tun_reads

    def start(self) -> None:
        """Watch the device until stop().  A backlog already waiting counts
        as queued since the pump was last seen reading (or now)."""
        if self._thread is not None or self._wake_r < 0:
            return
        since = self._seen if self._seen is not None else time.monotonic()
        self._seen = self._reads = None
        self._thread = threading.Thread(target=self._run, args=(since,), name="away-drain",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> int:
        """End the watch and wait for it; returns what this gap dropped."""
        thread, self._thread = self._thread, None
        if thread is None:
            return 0
        os.write(self._wake_w, b"x")
        thread.join()
        try:
            os.read(self._wake_r, 64)
        except BlockingIOError:
            pass
        gap, self._gap = self._gap, 0
        return gap

    def close(self) -> None:
        """stop(), and close the wake-up pipe (idempotent; ``dropped`` stays)."""
        self.stop()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    # ------------------------------------------------------------ the thread

    def _run(self, since: float) -> None:
        # When the oldest packet waiting in each queue arrived; None: empty.
        heads: dict[int, float | None] = {fd: None for fd in self.fds}
        for fd in _readable(self.fds):
            heads[fd] = since
        try:
            while True:
                now = time.monotonic()
                for fd, head in heads.items():
                    if head is not None and now - head >= self.hold_s:
                        # Left non-empty (fed as fast as read): due again
                        # at once, after a look at the stop pipe.
                        heads[fd] = None if self._drain(fd) else now - self.hold_s
                waiting = [head for head in heads.values() if head is not None]
                timeout = (max(0.0, min(waiting) + self.hold_s - time.monotonic())
                           if waiting else None)
                poller = select.poll()
                poller.register(self._wake_r, select.POLLIN)
                for fd, head in heads.items():
                    # An empty queue: wake when a packet arrives (its time
                    # is the queue's head).  Else: wake when it is due.
                    poller.register(fd, select.POLLIN if head is None else 0)
                events = poller.poll(None if timeout is None else timeout * 1000)
                now = time.monotonic()
                for fd, event in events:
                    if fd == self._wake_r:
                        return
                    if event & _ERRORS:
                        return  # the device is gone: the relay's watcher says so
                    if heads.get(fd, 0) is None and event & select.POLLIN:
                        heads[fd] = now
        except OSError as exc:
            self.log.warning("device: no longer dropping what waits while no peer is connected "
                             "(%s): the next peer gets it however old", exc)

    def _drain(self, fd: int) -> bool:
        """Read and drop what waits in one queue (stopping at the limit).
        True when the queue was left empty."""
        buf = bytearray(_READ_SIZE)
        view = memoryview(buf)
        probe = select.poll()
        probe.register(fd, select.POLLIN)
        for _ in range(_DRAIN_LIMIT):
            if not probe.poll(0):
                return True
            try:
                n = os.readv(fd, [buf])
            except (BlockingIOError, InterruptedError):
                return True
            count = packets_in(view[:n], self.vnet_hdr)
            self.dropped += count
            self._gap += count
        return False


def _readable(fds: tuple[int, ...]) -> list[int]:
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, event in poller.poll(0) if event & select.POLLIN]
