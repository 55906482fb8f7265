"""The rig the socketpair-level pump tests share.

A ``Rig`` makes the sockets and pumps of one test and tears them down in
the only safe order: stop the pumps first, then close the fds (never one a
pump thread may still be blocked on).  The TUN stand-in is one end of a
SOCK_SEQPACKET socketpair; the network is loopback UDP or TCP.  The helpers
read a pump's counters and wait for them without ever hanging a test.
"""

from __future__ import annotations

import select
import socket
import time

import pytest

TIMEOUT = 5.0       # one test-side socket operation
WAIT = 15.0         # counters to reach a value, a pump to stop
BUFFER = 4 << 20    # socket buffers, as the relay's
LOOPBACK = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}


class Rig:
    """Sockets and pumps of one test.  ``defaults`` are pump options every
    ``pump()`` call starts from (mtu, offload...); ``tun_buffer`` sets
    SO_SNDBUF on both ends of the stand-in (room to queue super-packets)."""

    def __init__(self, pump_class, *, tun_buffer: int | None = None, **defaults) -> None:
        self.pump_class = pump_class
        self.tun_buffer = tun_buffer
        self.defaults = defaults
        self.pumps: list = []
        self.sockets: list[socket.socket] = []

    def keep(self, sock: socket.socket) -> socket.socket:
        self.sockets.append(sock)
        return sock

    def tun(self):
        """(test end, pump end) of the TUN stand-in."""
        test_end, pump_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if self.tun_buffer:
            for end in (test_end, pump_end):
                end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.tun_buffer)
        test_end.settimeout(TIMEOUT)
        return self.keep(test_end), self.keep(pump_end)

    def udp(self, family=socket.AF_INET, *, host=None, port=0, timeout=TIMEOUT) -> socket.socket:
        """A UDP socket bound on loopback; ``timeout=None`` for a pump's own."""
        sock = self.keep(socket.socket(family, socket.SOCK_DGRAM))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
        sock.bind((host or LOOPBACK[family], port))
        sock.settimeout(timeout)
        return sock

    def tcp(self):
        """(test end, pump end) of a TCP connection on 127.0.0.1."""
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            listener.settimeout(TIMEOUT)
            test_end = self.keep(socket.create_connection(listener.getsockname(), TIMEOUT))
            pump_end, _ = listener.accept()
        self.keep(pump_end).setblocking(True)
        test_end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return test_end, pump_end

    def pump(self, tun_end, sock, **options):
        pump = self.pump_class(tun_end, sock, **{**self.defaults, **options})
        self.pumps.append(pump)
        return pump

    def close(self) -> None:
        stuck = [pump for pump in self.pumps if pump.stop(WAIT) is None]
        if stuck:
            # Leave the fds open: a loop may still be blocked on them.
            pytest.fail(f"{len(stuck)} pump(s) did not stop within {WAIT} s")
        for sock in self.sockets:
            sock.close()
        self.pumps.clear()
        self.sockets.clear()


def wait_for(predicate, what: str, show=None) -> None:
    """Poll predicate until true; fail after WAIT s, with show() if given."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            seen = f" (got {show()})" if show else ""
            pytest.fail(f"gave up after {WAIT} s waiting for {what}{seen}")
        time.sleep(0.002)


def drops(pump, direction: str = "ingress") -> dict:
    """The non-zero drop counters of a direction."""
    return {k: v for k, v in pump.stats()[direction]["drops"].items() if v}


def errors(pump, direction: str = "ingress") -> dict:
    return {k: v for k, v in pump.stats()[direction]["errors"].items() if v}


def counted(pump, direction: str = "ingress") -> int:
    """Packets a direction has dealt with: moved or dropped."""
    c = pump.stats()[direction]
    return c["packets"] + sum(c["drops"].values())


def recv_n(sock: socket.socket, n: int) -> list[bytes]:
    return [sock.recv(1 << 17) for _ in range(n)]


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"stream ended after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def assert_quiet(sock: socket.socket, wait: float = 0.05) -> None:
    """Nothing (more) is waiting on sock."""
    readable, _, _ = select.select([sock], [], [], wait)
    assert not readable, f"unexpected data: {sock.recv(1 << 17)[:40]!r}"
