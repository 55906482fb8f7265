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

from .errors import PumpArgumentError

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

#: MSS clamping (``mss_clamp=``): an explicit clamp is 536..65495 bytes.
#: 536 is the MSS a host assumes of a peer whose SYN carries no MSS option
#: (RFC 9293 3.7.1), which a clamp cannot lower (it rewrites the option,
#: never adds one); 65495 is what the largest IPv4 packet holds.
MIN_MSS = 536
MAX_MSS = 65495
#: What "auto" leaves room for: IP and TCP headers without options.
MSS_OVERHEAD = {4: 20 + 20, 6: 40 + 20}
#: IPv6 needs links of at least this MTU (RFC 8200): below it "auto"
#: clamps no IPv6 (no IPv6 crosses such a device).
IPV6_MIN_MTU = 1280
#: What ``mss_clamp=`` takes: None/False/0 (off), "auto" (from the MTU),
#: one MSS for both families, or (IPv4, IPv6) with 0 for "not this one".
MssClamp = int | tuple[int, int] | Literal["auto"] | None
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


# ---------------------------------------------------------------- MSS clamping

def mss_clamps(mss_clamp: object, mtu: int) -> tuple[int, int]:
    """The (IPv4, IPv6) MSS a pump clamps SYNs to, 0 for off, from its
    ``mss_clamp=`` argument and MTU.  "auto": what fits a packet of the
    device's MTU, mtu - 40 (IPv4) and mtu - 60 (IPv6).  PumpArgumentError
    for anything else."""
    expected = (f'None, "auto", an MSS of {MIN_MSS}..{MAX_MSS} or a pair of them '
                f'(IPv4, IPv6; 0 = not that family)')
    if mss_clamp is None or mss_clamp is False:
        return 0, 0
    if mss_clamp == "auto":
        return (mtu - MSS_OVERHEAD[4],
                mtu - MSS_OVERHEAD[6] if mtu >= IPV6_MIN_MTU else 0)
    if isinstance(mss_clamp, tuple) and len(mss_clamp) == 2:
        values = mss_clamp
    elif isinstance(mss_clamp, int) and not isinstance(mss_clamp, bool):
        values = (mss_clamp, mss_clamp)
    else:
        raise PumpArgumentError(f"mss_clamp must be {expected}, got {mss_clamp!r}")
    for value in values:
        if (isinstance(value, bool) or not isinstance(value, int)
                or not (value == 0 or MIN_MSS <= value <= MAX_MSS)):
            raise PumpArgumentError(f"mss_clamp must be {expected}, got {mss_clamp!r}")
    return values[0], values[1]


_TCP_SYN = 0x02
_OPT_EOL, _OPT_NOP, _OPT_MSS = 0, 1, 2


def clamp_mss(packet: bytes | bytearray | memoryview, v4: int, v6: int, mode: str = "tun",
              partial: bool = False) -> bytes | None:
    """Lower the MSS option of a TCP SYN (or SYN-ACK) to ``v4`` (IPv4) or
    ``v6`` (IPv6) where it is larger (0: leave that family alone).  Returns
    the rewritten packet, or None when nothing changed.

    The TCP checksum is updated for the change (RFC 1624, eqn. 3), unless
    ``partial``: then the checksum field holds only the pseudo-header sum
    (a TUN read with VIRTIO_NET_HDR_F_NEEDS_CSUM), and whoever completes it
    sums the new bytes anyway; updating it too would cancel the change.

    Left alone: anything but TCP in IPv4 or IPv6 (TAP: in Ethernet II, with
    at most one VLAN tag), IPv4 fragments, IPv6 with extension headers,
    headers that do not fit the packet.  Options are read as a receiver
    does (Linux's tcp_parse_options): an MSS option (kind 2, length 4)
    counts wherever it is; the walk stops at the end of the header, at
    end-of-list, or at an option whose length is below 2 or runs past the
    header, and the options before that point stand."""
    data = bytearray(packet)
    ip = 0
    if mode == "tap":
        if len(data) < ETHERNET_HEADER:
            return None
        ethertype, ip = int.from_bytes(data[12:14], "big"), ETHERNET_HEADER
        if ethertype in (0x8100, 0x88A8):
            if len(data) < ETHERNET_HEADER + VLAN_TAG:
                return None
            ethertype, ip = int.from_bytes(data[16:18], "big"), ETHERNET_HEADER + VLAN_TAG
        if ethertype not in (0x0800, 0x86DD):
            return None
    if len(data) - ip < 20:
        return None
    version = data[ip] >> 4
    if version == 4:
        clamp = v4
        header = (data[ip] & 0x0F) * 4
        total = int.from_bytes(data[ip + 2:ip + 4], "big")
        fragment = int.from_bytes(data[ip + 6:ip + 8], "big") & 0x3FFF
        if data[ip + 9] != 6 or fragment or header < 20 or not header <= total <= len(data) - ip:
            return None
    elif version == 6:
        clamp = v6
        if len(data) - ip < 40 or data[ip + 6] != 6:
            return None
        header = 40
        total = 40 + int.from_bytes(data[ip + 4:ip + 6], "big")
        if total > len(data) - ip:
            return None
    else:
        return None
    tcp, end = ip + header, ip + total
    if not clamp or end - tcp < 20 or not data[tcp + 13] & _TCP_SYN:
        return None
    options_end = tcp + (data[tcp + 12] >> 4) * 4
    if options_end < tcp + 20 or options_end > end:
        return None
    changed = False
    at = tcp + 20
    while at < options_end:
        kind = data[at]
        if kind == _OPT_EOL:
            break
        if kind == _OPT_NOP:
            at += 1
            continue
        if options_end - at < 2 or not 2 <= data[at + 1] <= options_end - at:
            break   # a receiver stops here too
        length = data[at + 1]
        if kind == _OPT_MSS and length == 4:
            mss = int.from_bytes(data[at + 2:at + 4], "big")
            if mss > clamp:
                data[at + 2:at + 4] = clamp.to_bytes(2, "big")
                if not partial:
                    _update_checksum(data, tcp + 16, at + 2 - tcp, mss, clamp)
                changed = True
        at += length
    return bytes(data) if changed else None


def _update_checksum(data: bytearray, where: int, offset: int, old: int, new: int) -> None:
    """RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'), for a 16-bit field at
    ``offset`` in the checksummed data: at an odd offset its bytes sit in
    two words, which in ones' complement is the field byte-swapped."""
    if offset % 2:
        old, new = _swap16(old), _swap16(new)
    check = int.from_bytes(data[where:where + 2], "big")
    total = (~check & 0xFFFF) + (~old & 0xFFFF) + new
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    data[where:where + 2] = (~total & 0xFFFF).to_bytes(2, "big")


def _swap16(value: int) -> int:
    return ((value & 0xFF) << 8) | (value >> 8)
