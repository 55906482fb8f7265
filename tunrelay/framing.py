"""Wire framings, the limits of a pump, and ingress validation, in plain
Python.

This is the reference the compiled pump (``_validate.pxi``) is tested
against, and what the pure-Python pump uses.  Both return the same drop
reason (a name from ``counters.DROP_REASONS``) for the same bytes.

The names below are the one definition of each: both pumps and the
configuration import them (the compiled pump's C enums that repeat one
are checked against it by tests/test_api.py).
"""

from __future__ import annotations

from typing import Literal, get_args

#: The type checker's view and the runtime tuple are one definition.
Framing = Literal["raw", "len16", "aead"]
#: What a pump with a PeerTable speaks: "session" carries the sessions the
#: caller's control plane installs (WireGuard's transport data message).
PeerFraming = Literal["raw", "len16", "session"]
Mode = Literal["tun", "tap"]
FRAMINGS: tuple[Framing, ...] = get_args(Framing)
PEER_FRAMINGS: tuple[PeerFraming, ...] = get_args(PeerFraming)
MODES: tuple[Mode, ...] = get_args(Mode)
#: The TUN I/O engines (a pump's ``io=``, ``[relay] io``): "uring" puts a
#: receive batch's TUN writes into one io_uring_enter (TUN reads stay
#: read() calls: batched, they did not pay); "syscalls" makes a writev per
#: packet;
#: "auto" runs the compiled pump's preferred one
#: (``tunrelay._fastpath.AUTO_IO``) where io_uring can be set up, else
#: "syscalls".  The Python pump has "syscalls" only.
IoEngine = Literal["auto", "uring", "syscalls"]
IO_ENGINES: tuple[IoEngine, ...] = get_args(IoEngine)

#: The MTUs a pump accepts.  RFC 791: every IPv4 link carries at least 68
#: bytes; an IP length field counts at most 65535.
MIN_MTU = 68
MAX_MTU = 65535
DEFAULT_MTU = 1400
#: The most packets one system call of a pump moves (``batch=``).
MAX_BATCH = 1024
#: The longest busy-polling budget a pump takes (``busy_poll_us``): one
#: second.  Spinning is for the microseconds between a packet and its
#: answer; a budget this long already spins through a slow ping's interval.
MAX_BUSY_POLL_US = 1_000_000

ETHERNET_HEADER = 14
VLAN_TAG = 4
LEN16_HEADER = 2
#: The largest length a len16 header can carry.
LEN16_LIMIT = 0xFFFF


def max_frame(mode: str, mtu: int) -> int:
    """The longest packet the device can take: the MTU for TUN; for TAP the
    MTU plus an Ethernet header and one VLAN tag."""
    if mode == "tap":
        return mtu + ETHERNET_HEADER + VLAN_TAG
    return mtu


def validate(packet: bytes | memoryview, mode: str, limit: int) -> str | None:
    """Return ``None`` if ``packet`` may be written to the device, else the
    drop reason.  ``limit`` is ``max_frame(mode, mtu)``."""
    length = len(packet)
    if length == 0:
        return "empty"
    if length > limit:
        return "oversize"
    if mode == "tap":
        return "truncated" if length < ETHERNET_HEADER else None
    version = packet[0] >> 4
    if version == 4:
        if length < 20:
            return "truncated"
        header = (packet[0] & 0x0F) * 4
        total = (packet[2] << 8) | packet[3]
        if header < 20 or total != length or header > total:
            return "bad_length"
        return None
    if version == 6:
        if length < 40:
            return "truncated"
        if 40 + ((packet[4] << 8) | packet[5]) != length:
            return "bad_length"
        return None
    return "bad_version"


class Len16Parser:
    """Split a TCP byte stream into len16 frames, keeping partial frames
    across reads."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._pending = bytearray()

    def feed(self, data: bytes) -> tuple[list[bytes], bool]:
        """Return the complete frames in what was pending plus ``data``, and
        whether a length of zero or over ``limit`` was met.  After a bad
        length the stream is out of sync: the frames before it are good,
        nothing after it can be trusted, and the connection must close."""
        self._pending += data
        frames = []
        offset = 0
        pending = self._pending
        bad = False
        while len(pending) - offset >= LEN16_HEADER:
            length = (pending[offset] << 8) | pending[offset + 1]
            if length == 0 or length > self.limit:
                bad = True
                break
            end = offset + LEN16_HEADER + length
            if end > len(pending):
                break
            frames.append(bytes(pending[offset + LEN16_HEADER:end]))
            offset = end
        del pending[:offset]
        return frames, bad

    @property
    def buffered(self) -> int:
        return len(self._pending)


def len16_encode(packet: bytes) -> bytes:
    if not 0 < len(packet) <= LEN16_LIMIT:
        raise ValueError(f"len16 carries 1..{LEN16_LIMIT} bytes, got {len(packet)}")
    return len(packet).to_bytes(2, "big") + packet
