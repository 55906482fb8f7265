"""TUN offloads of the compiled pump, end to end, without root.

``Pump(..., offload=True)``: every read from and write to the TUN fd
carries a 10-byte virtio_net_hdr.  Egress cuts TSO/USO super-packets into
wire packets (``segment_packet``); ingress joins consecutive TCP segments of
one flow back into one GSO super-packet (``coalesce_and_write``).  As in
test_pump.py, one end of a SOCK_SEQPACKET socketpair stands in for the TUN
fd and loopback UDP sockets (or a TCP connection) are the network.  Every
test runs with both TUN I/O engines (io "syscalls" and "uring").

The expected bytes come from a small pure-Python reference in this file: an
RFC 1071 checksum, packet builders with correct checksums, a segmenter that
does what the kernel's GSO does, and a coalescer that follows the rules of
Linux's TCP GRO.  Every coalesced write is also cut up again with the
reference segmenter: that must give back exactly the packets sent.

Determinism: ingress datagrams are queued on the pump's socket before the
pump starts, so one recvmmsg (batch larger than the script) sees them all
and the grouping is fixed.  Nothing can hang: test-side sockets have
timeouts, waits have deadlines, and the ``rig`` fixture stops every pump
before closing any fd.
"""

from __future__ import annotations

import math
import socket
import struct
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pumprig import BUFFER, Rig, assert_quiet, drops, errors, recv_exactly, recv_n, wait_for

from conftest import load_fastpath
from tunrelay.framing import validate

MTU = 1500

VNET_HDR = struct.Struct("<BBHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_LEN = VNET_HDR.size
NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_UDP_UFO, GSO_TCPV6, GSO_UDP_L4, GSO_ECN = 0, 1, 3, 4, 5, 0x80
UDP_SEGMENT = 103      # linux/udp.h
ZERO_VNET = bytes(VNET_LEN)

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
TCP, UDP = 6, 17
DF, MF = 0x4000, 0x2000

V4_ADDRS = (bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2)))
V6_ADDRS = (bytes.fromhex("fd000000000000000000000000000001"),
            bytes.fromhex("fd000000000000000000000000000002"))
#: NOP, NOP, timestamps: what a Linux TCP segment carries (12 bytes, thl 32).
TIMESTAMPS = b"\x01\x01\x08\x0a" + struct.pack("!II", 0x01020304, 0x0A0B0C0D)
VERSIONS = [pytest.param(4, id="ipv4"), pytest.param(6, id="ipv6")]


# ================================================================ reference: checksums

def fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ones_sum(data: bytes, initial: int = 0) -> int:
    """RFC 1071 ones' complement sum of big-endian 16-bit words, folded (not
    inverted); an odd last byte is the high byte of a zero-padded word."""
    data = bytes(data)
    if len(data) % 2:
        data += b"\0"
    return fold(initial + sum(struct.unpack(f"!{len(data) // 2}H", data)))


def pseudo_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """The TCP/UDP pseudo-header's sum: RFC 793/768 for IPv4, RFC 8200 for IPv6."""
    if len(src) == 4:
        return ones_sum(src + dst + struct.pack("!BBH", 0, proto, length))
    return ones_sum(src + dst + struct.pack("!I3xB", length, proto))


def l4_checksum(src: bytes, dst: bytes, proto: int, segment: bytes) -> int:
    """The value for a TCP/UDP checksum field (segment's field zeroed)."""
    csum = ~ones_sum(segment, pseudo_sum(src, dst, proto, len(segment))) & 0xFFFF
    return 0xFFFF if proto == UDP and csum == 0 else csum


def be16(data, offset: int) -> int:
    return (data[offset] << 8) | data[offset + 1]


def be32(data, offset: int) -> int:
    return int.from_bytes(data[offset:offset + 4], "big")


def addrs_of(packet: bytes) -> tuple[bytes, bytes]:
    if packet[0] >> 4 == 4:
        return bytes(packet[12:16]), bytes(packet[16:20])
    return bytes(packet[8:24]), bytes(packet[24:40])


def ip_header_len(packet: bytes) -> int:
    return (packet[0] & 0x0F) * 4 if packet[0] >> 4 == 4 else 40


# ================================================================ reference: builders

def ip_header(version: int, proto: int, l4_length: int, *, ident: int = 0x1234,
              tos: int = 0, ttl: int = 64, frag: int = DF, ip_options: bytes = b"",
              flow_label: int = 0, ip_csum: str = "valid") -> bytes:
    src, dst = V4_ADDRS if version == 4 else V6_ADDRS
    if version == 6:
        return struct.pack("!IHBB", (6 << 28) | (tos << 20) | flow_label, l4_length, proto,
                           ttl) + src + dst
    assert len(ip_options) % 4 == 0
    ihl = 5 + len(ip_options) // 4
    header = bytearray(struct.pack("!BBHHHBBH", 0x40 | ihl, tos, 4 * ihl + l4_length,
                                   ident & 0xFFFF, frag, ttl, proto, 0) + src + dst + ip_options)
    csum = ~ones_sum(header) & 0xFFFF
    if ip_csum == "bad":
        csum ^= 0x0101
    header[10:12] = csum.to_bytes(2, "big")
    return bytes(header)


def with_l4_checksum(ip: bytes, l4: bytearray, offset: int, proto: int, mode: str) -> bytes:
    """ip + l4 with the checksum at l4[offset] set: "valid", "bad",
    "partial" (the pseudo-header sum, not inverted: CHECKSUM_PARTIAL as the
    kernel hands it over) or "keep" (as it is)."""
    src, dst = addrs_of(ip)
    if mode != "keep":
        l4[offset:offset + 2] = b"\0\0"
        if mode == "partial":
            csum = pseudo_sum(src, dst, proto, len(l4))
        else:
            csum = l4_checksum(src, dst, proto, bytes(l4))
            if mode == "bad":
                csum ^= 0x5555
        l4[offset:offset + 2] = csum.to_bytes(2, "big")
    return ip + bytes(l4)


def tcp_packet(version: int, payload: bytes, *, seq: int = 1000, ack: int = 77,
               flags: int = ACK, sport: int = 40000, dport: int = 5201, window: int = 502,
               options: bytes = TIMESTAMPS, reserved: int = 0, urgent: int = 0,
               csum: str = "valid", **ip) -> bytes:
    assert len(options) % 4 == 0
    thl = 5 + len(options) // 4
    l4 = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack,
                               (thl << 4) | reserved, flags, window, 0, urgent)
                   + options + payload)
    return with_l4_checksum(ip_header(version, TCP, len(l4), **ip), l4, 16, TCP, csum)


def udp_packet(version: int, payload: bytes, *, sport: int = 40001, dport: int = 4789,
               csum: str = "valid", **ip) -> bytes:
    l4 = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
    return with_l4_checksum(ip_header(version, UDP, len(l4), **ip), l4, 6, UDP, csum)


def pattern(size: int, salt: int = 0) -> bytes:
    """size bytes that differ from offset to offset (a misplaced byte shows)."""
    return bytes((i * 7 + (i >> 8) * 13 + salt) & 0xFF for i in range(size))


def vnet(flags: int = 0, gso_type: int = GSO_NONE, hdr_len: int = 0, gso_size: int = 0,
         csum_start: int = 0, csum_offset: int = 0) -> bytes:
    return VNET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def l4_header_len(packet: bytes) -> int:
    l4 = ip_header_len(packet)
    return (packet[l4 + 12] >> 4) * 4 if protocol(packet) == TCP else 8


def protocol(packet: bytes) -> int:
    return packet[9] if packet[0] >> 4 == 4 else packet[6]


def tso(version: int, payload: bytes, mss: int, *, ecn: bool = False, **tcp) -> tuple[bytes, bytes]:
    """A TCP super-packet as a TSO-capable TUN hands it over: its vnet header
    and the packet, the checksum field holding the pseudo-header sum."""
    packet = tcp_packet(version, payload, csum="partial", **tcp)
    l4 = ip_header_len(packet)
    gso = (GSO_TCPV4 if version == 4 else GSO_TCPV6) | (GSO_ECN if ecn else 0)
    return vnet(NEEDS_CSUM, gso, l4 + l4_header_len(packet), mss, l4, 16), packet


def uso(version: int, payload: bytes, mss: int, **udp) -> tuple[bytes, bytes]:
    packet = udp_packet(version, payload, csum="partial", **udp)
    l4 = ip_header_len(packet)
    return vnet(NEEDS_CSUM, GSO_UDP_L4, l4 + 8, mss, l4, 6), packet


def needs_csum(packet_with_partial: bytes) -> tuple[bytes, bytes]:
    """A single packet with NEEDS_CSUM, no GSO (checksum offload only)."""
    l4 = ip_header_len(packet_with_partial)
    offset = 16 if protocol(packet_with_partial) == TCP else 6
    return vnet(NEEDS_CSUM, GSO_NONE, 0, 0, l4, offset), packet_with_partial


# ================================================================ reference: segmenter

def ref_segment(header: bytes, packet: bytes) -> list[bytes]:
    """What the kernel's GSO makes of (vnet header, packet): the wire packets."""
    flags, gso_type, _, mss, csum_start, csum_offset = VNET_HDR.unpack(header)
    kind = gso_type & ~GSO_ECN
    if kind == GSO_NONE:
        if not flags & NEEDS_CSUM:
            return [packet]
        out = bytearray(packet)
        csum = ~ones_sum(out[csum_start:]) & 0xFFFF
        if csum == 0 and csum_offset == 6:
            csum = 0xFFFF
        out[csum_start + csum_offset:csum_start + csum_offset + 2] = csum.to_bytes(2, "big")
        return [bytes(out)]
    version = packet[0] >> 4
    l4 = csum_start
    tcp = kind in (GSO_TCPV4, GSO_TCPV6)
    hdrs = l4 + ((packet[l4 + 12] >> 4) * 4 if tcp else 8)
    payload = packet[hdrs:]
    pieces = [payload[i:i + mss] for i in range(0, len(payload), mss)] or [b""]
    src, dst = addrs_of(packet)
    segments = []
    for i, piece in enumerate(pieces):
        ip = bytearray(packet[:l4])
        head = bytearray(packet[l4:hdrs])
        if version == 4:
            ip[2:4] = (hdrs + len(piece)).to_bytes(2, "big")
            ip[4:6] = ((be16(packet, 4) + i) & 0xFFFF).to_bytes(2, "big")
            ip[10:12] = b"\0\0"
            ip[10:12] = (~ones_sum(ip) & 0xFFFF).to_bytes(2, "big")
        else:
            ip[4:6] = (hdrs - 40 + len(piece)).to_bytes(2, "big")
        if tcp:
            head[4:8] = ((be32(packet, l4 + 4) + i * mss) & 0xFFFFFFFF).to_bytes(4, "big")
            if i < len(pieces) - 1:
                head[13] &= ~(FIN | PSH) & 0xFF
            if i > 0:
                head[13] &= ~CWR & 0xFF
            offset, proto = 16, TCP
        else:
            head[4:6] = (8 + len(piece)).to_bytes(2, "big")
            offset, proto = 6, UDP
        head[offset:offset + 2] = b"\0\0"
        csum = l4_checksum(src, dst, proto, bytes(head) + piece)
        head[offset:offset + 2] = csum.to_bytes(2, "big")
        segments.append(bytes(ip + head + piece))
    return segments


# ================================================================ reference: checks

@dataclass
class Wire:
    """A parsed, verified packet."""
    version: int
    proto: int
    ident: int
    l4: int
    hdrs: int
    seq: int
    flags: int
    payload: bytes


def check_packet(packet: bytes, *, l4_valid: bool = True) -> Wire:
    """Parse a wire packet and assert that its lengths and checksums hold."""
    version = packet[0] >> 4
    assert version in (4, 6), packet[:8].hex()
    if version == 4:
        l4 = ip_header_len(packet)
        assert be16(packet, 2) == len(packet), "IPv4 total length"
        assert ones_sum(packet[:l4]) == 0xFFFF, "IPv4 header checksum"
        ident = be16(packet, 4)
    else:
        l4 = 40
        assert be16(packet, 4) + 40 == len(packet), "IPv6 payload length"
        ident = 0
    proto = protocol(packet)
    src, dst = addrs_of(packet)
    segment = packet[l4:]
    if proto == TCP:
        hdrs = l4 + (segment[12] >> 4) * 4
        seq, flags = be32(segment, 4), segment[13]
    else:
        assert proto == UDP
        hdrs = l4 + 8
        assert be16(segment, 4) == len(segment), "UDP length"
        assert be16(segment, 6) != 0, "UDP checksum left out"
        seq = flags = 0
    if l4_valid:
        assert ones_sum(segment, pseudo_sum(src, dst, proto, len(segment))) == 0xFFFF, \
            f"{'TCP' if proto == TCP else 'UDP'} checksum"
    return Wire(version, proto, ident, l4, hdrs, seq, flags, bytes(packet[hdrs:]))


def check_segments(header: bytes, packet: bytes, got: list[bytes]) -> None:
    """got are the wire packets of (header, packet): checked on their own
    (the brief's properties), then byte for byte against the reference."""
    _, gso_type, _, mss, _, _ = VNET_HDR.unpack(header)
    original = check_packet(packet, l4_valid=False)
    expected_count = max(1, math.ceil(len(original.payload) / mss))
    assert len(got) == expected_count
    wires = [check_packet(p) for p in got]
    assert b"".join(w.payload for w in wires) == original.payload
    for i, w in enumerate(wires):
        assert len(w.payload) == (mss if i < expected_count - 1 else
                                  len(original.payload) - mss * (expected_count - 1))
        if original.version == 4:
            assert w.ident == (original.ident + i) & 0xFFFF
        if original.proto == TCP:
            assert w.seq == (original.seq + i * mss) & 0xFFFFFFFF
            last, first = i == expected_count - 1, i == 0
            expected_flags = original.flags
            if not last:
                expected_flags &= ~(FIN | PSH)
            if not first:
                expected_flags &= ~CWR
            assert w.flags == expected_flags, f"segment {i}: flags {w.flags:#x}"
    assert got == ref_segment(header, packet)


# ================================================================ reference: coalescer

def candidate(packet: bytes) -> tuple[int, int] | None:
    """(IP header length, IP + TCP header length) of a segment TCP GRO may
    join: plain IPv4 (no options, no fragment, header checksum right) or
    IPv6 (no extension header), ACK or ACK|PSH only, with payload, TCP
    checksum right."""
    if packet[0] == 0x45:
        if packet[9] != TCP or be16(packet, 6) & 0x3FFF or ones_sum(packet[:20]) != 0xFFFF:
            return None
        l4 = 20
    elif packet[0] >> 4 == 6:
        if packet[6] != TCP:
            return None
        l4 = 40
    else:
        return None
    if len(packet) < l4 + 20:
        return None
    thl = (packet[l4 + 12] >> 4) * 4
    if thl < 20 or l4 + thl >= len(packet) or packet[l4 + 13] not in (ACK, ACK | PSH):
        return None
    src, dst = addrs_of(packet)
    if ones_sum(packet[l4:], pseudo_sum(src, dst, TCP, len(packet) - l4)) != 0xFFFF:
        return None
    return l4, l4 + thl


def flow_key(packet: bytes, l4: int, hdrs: int) -> tuple:
    """What must be equal for two segments to join (Linux's inet/ipv6/tcp
    GRO): IP fields other than length/ID/checksum, ports, ack, the data
    offset/reserved byte, window, options."""
    if l4 == 20:
        ip = (packet[1], packet[8], packet[6] & 0xE0, packet[12:20])
    else:
        ip = (packet[0:4], packet[7], packet[8:40])
    t = l4
    return (l4, hdrs, ip, packet[t:t + 4], packet[t + 8:t + 13], packet[t + 14:t + 16],
            packet[t + 20:hdrs])


def ref_coalesce(packets: list[bytes]) -> list[bytes]:
    """The TUN writes (vnet header + packet) for packets delivered in order."""
    writes: list[bytes] = []
    run: list[bytes] = []
    state: dict = {}

    def flush():
        if run:
            writes.append(super_packet(run, state.get("l4"), state.get("hdrs")))
            run.clear()

    for p in packets:
        c = candidate(p)
        if c and run and not state["closed"] and flow_key(p, *c) == state["key"] \
                and be32(p, c[0] + 4) == state["next_seq"]:
            payload = len(p) - c[1]
            limit = 0xFFFF + (40 if c[0] == 40 else 0)
            if payload <= state["mss"] and len(run) < 64 and state["total"] + payload <= limit:
                run.append(p)
                state["total"] += payload
                state["next_seq"] = (state["next_seq"] + payload) & 0xFFFFFFFF
                state["closed"] = payload < state["mss"] or bool(p[c[0] + 13] & PSH)
                continue
        flush()
        run.append(p)
        state = {"closed": True}
        if c:
            payload = len(p) - c[1]
            state = {"l4": c[0], "hdrs": c[1], "key": flow_key(p, *c), "mss": payload,
                     "total": len(p), "next_seq": (be32(p, c[0] + 4) + payload) & 0xFFFFFFFF,
                     "closed": bool(p[c[0] + 13] & PSH)}
    flush()
    return writes


def super_packet(run: list[bytes], l4: int | None, hdrs: int | None) -> bytes:
    if len(run) == 1:
        return ZERO_VNET + run[0]
    first = bytearray(run[0][:hdrs])
    payload = b"".join(p[hdrs:] for p in run)
    total = hdrs + len(payload)
    if l4 == 20:
        first[2:4] = total.to_bytes(2, "big")
        first[10:12] = b"\0\0"
        first[10:12] = (~ones_sum(first[:20]) & 0xFFFF).to_bytes(2, "big")
        gso = GSO_TCPV4
    else:
        first[4:6] = (total - 40).to_bytes(2, "big")
        gso = GSO_TCPV6
    first[l4 + 13] |= run[-1][l4 + 13] & PSH
    src, dst = addrs_of(run[0])
    first[l4 + 16:l4 + 18] = pseudo_sum(src, dst, TCP, total - l4).to_bytes(2, "big")
    mss = len(run[0]) - hdrs
    return vnet(NEEDS_CSUM, gso, hdrs, mss, l4, 16) + bytes(first) + payload


def check_write(write: bytes) -> list[bytes]:
    """One TUN write of the ingress side, checked on its own terms: a zero
    vnet header and one packet, or a GSO super-packet whose header fields,
    lengths and CHECKSUM_PARTIAL field are right.  Returns the wire packets
    it stands for (a super-packet cut up by the reference segmenter)."""
    assert len(write) > VNET_LEN
    header, packet = write[:VNET_LEN], write[VNET_LEN:]
    if header == ZERO_VNET:
        return [packet]
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack(header)
    version = packet[0] >> 4
    l4 = 20 if version == 4 else 40
    assert packet[0] == 0x45 if version == 4 else version == 6
    hdrs = l4 + (packet[l4 + 12] >> 4) * 4
    assert (flags, gso_type, hdr_len, csum_start, csum_offset) == \
        (NEEDS_CSUM, GSO_TCPV4 if version == 4 else GSO_TCPV6, hdrs, l4, 16)
    if version == 4:
        assert be16(packet, 2) == len(packet)
        assert ones_sum(packet[:20]) == 0xFFFF
    else:
        assert be16(packet, 4) + 40 == len(packet)
    payload = len(packet) - hdrs
    assert gso_size < payload, "a super-packet carries more than one segment"
    src, dst = addrs_of(packet)
    assert be16(packet, l4 + 16) == pseudo_sum(src, dst, TCP, len(packet) - l4), \
        "the TCP checksum field must hold the pseudo-header sum (CHECKSUM_PARTIAL)"
    return ref_segment(header, packet)


# ================================================================ flows

@dataclass
class Flow:
    """One direction of a TCP connection: builds its next segments."""
    version: int = 4
    sport: int = 40000
    dport: int = 5201
    seq: int = 1000
    ident: int = 0x100
    options: bytes = TIMESTAMPS
    extra: dict = field(default_factory=dict)

    @property
    def hdrs(self) -> int:
        return (20 if self.version == 4 else 40) + 20 + len(self.options)

    def segment(self, size: int, *, flags: int = ACK, gap: int = 0, **overrides) -> bytes:
        """The next segment with `size` bytes of payload (sequence numbers
        and IPv4 IDs advance)."""
        self.seq = (self.seq + gap) & 0xFFFFFFFF
        options = dict(self.extra, **overrides)
        options.setdefault("options", self.options)
        packet = tcp_packet(self.version, pattern(size, self.seq), seq=self.seq, flags=flags,
                            sport=self.sport, dport=self.dport, ident=self.ident, **options)
        self.seq = (self.seq + size + (1 if flags & (SYN | FIN) else 0)) & 0xFFFFFFFF
        self.ident = (self.ident + 1) & 0xFFFF
        return packet

    def run(self, count: int, size: int, *, psh_last: bool = True) -> list[bytes]:
        return [self.segment(size, flags=ACK | PSH if psh_last and i == count - 1 else ACK)
                for i in range(count)]


# ================================================================ rig

class OffloadRig(Rig):
    """The shared rig with compiled pumps, offloads on by default, room in
    the stand-in for 64 KiB super-packets, and ready-made pump set-ups."""

    def __init__(self, io: str = "syscalls") -> None:
        super().__init__(load_fastpath().Pump, tun_buffer=BUFFER, mtu=MTU, offload=True, io=io)

    def udp_pump(self, family=socket.AF_INET, **options):
        """tun test end, peer socket, pump socket, pump (not started)."""
        tun, tun_end = self.tun()
        peer = self.udp(family)
        sock = self.udp(family, timeout=None)
        pump = self.pump(tun_end, sock, peer=peer.getsockname()[:2], **options)
        return tun, peer, sock, pump

    def tcp_pump(self, **options):
        tun, tun_end = self.tun()
        peer, sock = self.tcp()
        return tun, peer, self.pump(tun_end, sock, **options)


@pytest.fixture(params=["syscalls", "uring"])
def rig(request):
    """The rig, its pumps on one TUN I/O engine (each test runs with both)."""
    rig = OffloadRig(request.param)
    yield rig
    rig.close()


# ================================================================ helpers







def wait_packets(pump, direction: str, n: int) -> dict:
    wait_for(lambda: pump.stats()[direction]["packets"] >= n, f"{n} {direction} packets",
             lambda: pump.stats()[direction])
    return pump.stats()[direction]






def parse_len16(stream: bytes) -> list[bytes]:
    frames, offset = [], 0
    while offset < len(stream):
        length = be16(stream, offset)
        frames.append(stream[offset + 2:offset + 2 + length])
        offset += 2 + length
    assert offset == len(stream), "the stream ends inside a frame"
    return frames


def len16(packet: bytes) -> bytes:
    return len(packet).to_bytes(2, "big") + packet




def write_tun(tun: socket.socket, header: bytes, packet: bytes = b"") -> None:
    tun.send(header + packet)


def send_all(peer: socket.socket, address, packets) -> None:
    for packet in packets:
        peer.sendto(packet, address)


# ================================================================ the reference itself

def test_reference_checksums():
    """Known answers, so the reference is not just agreeing with itself."""
    # RFC 1071's example words.
    assert ones_sum(bytes.fromhex("0001f203f4f5f6f7")) == 0xDDF2
    # A real IPv4 header (from Wikipedia's checksum example): checksum 0xB861.
    header = bytearray.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert ~ones_sum(header) & 0xFFFF == 0xB861
    # Every builder's output verifies.
    for version in (4, 6):
        for packet in (tcp_packet(version, pattern(1001)), udp_packet(version, pattern(999)),
                       tcp_packet(version, b"", flags=SYN)):
            check_packet(packet)
        assert candidate(tcp_packet(version, pattern(100))) is not None
        assert candidate(tcp_packet(version, pattern(100), csum="bad")) is None
    # A super-packet's partial field, completed, is a valid checksum.
    header, packet = needs_csum(tcp_packet(4, pattern(501), csum="partial"))
    check_packet(ref_segment(header, packet)[0])


# ================================================================ set-up

def test_offloads_reported(rig):
    tun, tun_end = rig.tun()
    udp = rig.udp(timeout=None)
    pump = rig.pump(tun_end, udp, peer=("127.0.0.1", 9))
    assert pump.offload
    assert pump.offloads == {"vnet_hdr": True, "gso": True, "gro": True}
    _, tcp = rig.tcp()
    assert rig.pump(tun_end, tcp).offloads == {"vnet_hdr": True, "gso": False, "gro": False}
    # Without TUN offloads a UDP pump still sends equal-sized runs with GSO,
    # unless told not to.
    plain = rig.pump(tun_end, udp, peer=("127.0.0.1", 9), offload=False)
    assert plain.offloads == {"vnet_hdr": False, "gso": True, "gro": False}
    no_gso = rig.pump(tun_end, udp, peer=("127.0.0.1", 9), offload=False, gso=False)
    assert no_gso.offloads == {"vnet_hdr": False, "gso": False, "gro": False}
    with pytest.raises(ValueError):
        rig.pump(tun_end, udp, mode="tap")


# ================================================================ egress: segmentation

def egress_udp(rig, reads, *, family=socket.AF_INET, **options):
    """Queue (vnet header, packet) reads, start, receive what the reference
    says they become; returns (pump, datagrams)."""
    tun, peer, _, pump = rig.udp_pump(family, **options)
    for header, packet in reads:
        write_tun(tun, header, packet)
    pump.start()
    expected = sum(len(ref_segment(h, p)) for h, p in reads)
    got = recv_n(peer, expected)
    assert_quiet(peer)
    return pump, got


TSO_CASES = [
    pytest.param(4, 10000, None, ACK | PSH, False, id="v4-10000"),
    pytest.param(4, 64000, None, ACK | PSH | FIN | CWR, True, id="v4-64000-fin-cwr-ecn"),
    pytest.param(4, 30000, 536, ACK | CWR | ECE, True, id="v4-mss536"),
    pytest.param(6, 10000, None, ACK | PSH, False, id="v6-10000"),
    pytest.param(6, 64000, None, ACK | PSH | FIN | CWR, True, id="v6-64000-fin-cwr-ecn"),
    pytest.param(6, 65000 - 1, 1000, ACK, False, id="v6-odd-tail"),
]


@pytest.mark.parametrize("version,size,mss,flags,ecn", TSO_CASES)
def test_egress_tso_udp(rig, version, size, mss, flags, ecn):
    flow = Flow(version)
    mss = mss or MTU - flow.hdrs
    header, packet = tso(version, pattern(size), mss, ecn=ecn, seq=0xFFFF0000, flags=flags,
                         ident=0xFFF0)
    pump, got = egress_udp(rig, [(header, packet)])
    check_segments(header, packet, got)        # seq and IPv4 ID wrap on the way
    egress = wait_packets(pump, "egress", len(got))
    assert egress["packets"] == len(got) == math.ceil(size / mss)
    assert egress["bytes"] == sum(map(len, got))
    assert egress["tun_io"] == 1
    assert 1 <= egress["batches"] <= 2, egress      # UDP_SEGMENT: a few sends, not one per segment
    assert drops(pump, "egress") == errors(pump, "egress") == {}
    assert pump.offloads["gso"]


def test_egress_tso_ipv4_options(rig):
    """IPv4 options: csum_start says where TCP starts; options are copied
    into every segment (and the header checksum covers them)."""
    options = b"\x94\x04\x00\x00"            # Router Alert
    header, packet = tso(4, pattern(5000), 1000, ip_options=options)
    assert VNET_HDR.unpack(header)[4] == 24
    _, got = egress_udp(rig, [(header, packet)])
    check_segments(header, packet, got)
    assert all(p[20:24] == options for p in got)


def test_egress_tso_single_segment_and_empty(rig):
    """A super-packet no longer than one MSS, and one without payload (a
    FIN with a GSO header): one segment each, checksums completed."""
    reads = [tso(4, pattern(700), 1000, flags=ACK | PSH),
             tso(6, b"", 1000, flags=ACK | FIN)]
    pump, got = egress_udp(rig, reads)
    check_segments(*reads[0], got[:1])
    check_segments(*reads[1], got[1:])
    assert wait_packets(pump, "egress", 2)["tun_io"] == 2


@pytest.mark.parametrize("version", VERSIONS)
def test_egress_uso_udp(rig, version):
    mss = MTU - (28 if version == 4 else 48)
    header, packet = uso(version, pattern(20000), mss, ident=77)
    pump, got = egress_udp(rig, [(header, packet)])
    check_segments(header, packet, got)
    for datagram in got:
        wire = check_packet(datagram)
        assert be16(datagram, wire.l4 + 4) == 8 + len(wire.payload)
    egress = wait_packets(pump, "egress", len(got))
    assert egress["packets"] == len(got) == math.ceil(20000 / mss)
    assert egress["tun_io"] == 1
    assert drops(pump, "egress") == {}


def zero_sum_udp(version: int, size: int, *, tail: int) -> bytes:
    """A UDP payload of `size` (even) bytes whose segment of the last `tail`
    bytes sums to 0xFFFF: its checksum computes to 0, sent as 0xFFFF."""
    assert size % 2 == 0 and tail % 2 == 0
    payload = bytearray(pattern(size))
    payload[-2:] = b"\0\0"
    src, dst = V4_ADDRS if version == 4 else V6_ADDRS
    udp = struct.pack("!HHHH", 40001, 4789, 8 + tail, 0) + payload[-tail:]
    partial = ones_sum(udp, pseudo_sum(src, dst, UDP, len(udp)))
    payload[-2:] = (0xFFFF - partial).to_bytes(2, "big")
    return bytes(payload)


@pytest.mark.parametrize("version", VERSIONS)
def test_egress_udp_zero_checksum_becomes_ffff(rig, version):
    """UDP: a computed checksum of 0 means "none" on the wire; 0xFFFF is sent."""
    single = udp_packet(version, zero_sum_udp(version, 600, tail=600), csum="partial")
    reads = [needs_csum(single),
             uso(version, zero_sum_udp(version, 3000, tail=1000), 1000)]
    _, got = egress_udp(rig, reads)
    assert len(got) == 4
    l4 = 20 if version == 4 else 40
    assert be16(got[0], l4 + 6) == 0xFFFF
    assert be16(got[3], l4 + 6) == 0xFFFF
    for datagram in got:
        check_packet(datagram)
    assert got == ref_segment(*reads[0]) + ref_segment(*reads[1])


@pytest.mark.parametrize("version", VERSIONS)
def test_egress_needs_csum_without_gso(rig, version):
    """gso NONE: with NEEDS_CSUM the checksum is completed (TCP and UDP);
    without it the packet goes out byte for byte as read."""
    tcp_partial = tcp_packet(version, pattern(999), csum="partial", flags=ACK | PSH)
    udp_partial = udp_packet(version, pattern(1001), csum="partial")
    untouched = [tcp_packet(version, pattern(300), csum="bad"),   # not ours to fix
                 udp_packet(version, pattern(301), csum="partial"),
                 tcp_packet(version, b"", flags=SYN)]
    reads = [needs_csum(tcp_partial), needs_csum(udp_partial)] + [(ZERO_VNET, p) for p in untouched]
    pump, got = egress_udp(rig, reads)
    check_packet(got[0])
    check_packet(got[1])
    assert got[0] == tcp_packet(version, pattern(999), flags=ACK | PSH)
    assert got[1] == udp_packet(version, pattern(1001))
    assert got[2:] == untouched
    egress = wait_packets(pump, "egress", len(reads))
    assert (egress["packets"], egress["tun_io"]) == (5, 5)
    assert egress["bytes"] == sum(map(len, got))
    assert drops(pump, "egress") == {}


@pytest.mark.parametrize("version", VERSIONS)
def test_egress_tcp_transport_len16(rig, version):
    """Over TCP each segment is one len16 frame, byte for byte the reference's."""
    tun, peer, pump = rig.tcp_pump()
    flow = Flow(version)
    reads = [tso(version, pattern(40000), MTU - flow.hdrs, flags=ACK | PSH | FIN | CWR),
             needs_csum(udp_packet(version, pattern(100), csum="partial")),
             uso(version, pattern(7000), 1000),
             (ZERO_VNET, tcp_packet(version, b"", flags=SYN))]
    for header, packet in reads:
        write_tun(tun, header, packet)
    pump.start()
    expected = [seg for read in reads for seg in ref_segment(*read)]
    stream = recv_exactly(peer, sum(2 + len(p) for p in expected))
    frames = parse_len16(stream)
    assert frames == expected
    check_segments(*reads[0], frames[:len(ref_segment(*reads[0]))])
    egress = wait_packets(pump, "egress", len(expected))
    assert egress["packets"] == len(expected)
    assert egress["bytes"] == sum(map(len, expected))       # framing not counted
    assert egress["tun_io"] == len(reads)
    assert drops(pump, "egress") == {}
    assert_quiet(peer)


def test_egress_tcp_partial_writes(rig):
    """A send buffer far smaller than a super-packet: sendmsg comes back
    short in the middle of a header or a payload iovec, the pump resumes
    there; the stream is exact and every segment counted once."""
    tun, tun_end = rig.tun()
    peer, sock = rig.tcp()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    pump = rig.pump(tun_end, sock)
    reads = [tso(4, pattern(50000, 1), 1448, flags=ACK | PSH), uso(6, pattern(9000, 2), 999),
             tso(6, pattern(30001, 3), 777)]
    for header, packet in reads:
        write_tun(tun, header, packet)
    pump.start()
    expected = [seg for read in reads for seg in ref_segment(*read)]
    total = sum(2 + len(p) for p in expected)
    stream = bytearray()
    while len(stream) < total:
        chunk = peer.recv(1000)
        assert chunk, "the pump closed the connection"
        stream += chunk
    assert parse_len16(bytes(stream)) == expected
    egress = wait_packets(pump, "egress", len(expected))
    assert egress["packets"] == len(expected)
    assert egress["bytes"] == sum(map(len, expected))
    assert drops(pump, "egress") == errors(pump, "egress") == {}


def test_egress_over_ipv6_socket(rig):
    """UDP_SEGMENT on an AF_INET6 socket (inner packets of both versions)."""
    reads = [tso(4, pattern(30000), 1448, flags=ACK | PSH), uso(6, pattern(20000), 1452)]
    pump, got = egress_udp(rig, reads, family=socket.AF_INET6)
    n = len(ref_segment(*reads[0]))
    check_segments(*reads[0], got[:n])
    check_segments(*reads[1], got[n:])
    assert errors(pump, "egress") == {}
    assert pump.offloads == {"vnet_hdr": True, "gso": True, "gro": True}


def test_egress_len16_over_udp(rig):
    """len16 framing on UDP: each datagram is a len16 header and a segment
    (the GSO size counts the header)."""
    reads = [tso(4, pattern(12000), 1000, flags=ACK | PSH), uso(6, pattern(5000), 1200),
             needs_csum(tcp_packet(6, pattern(10), csum="partial"))]
    pump, got = egress_udp(rig, reads, framing="len16")
    expected = [seg for read in reads for seg in ref_segment(*read)]
    assert got == [len16(p) for p in expected]
    egress = wait_packets(pump, "egress", len(expected))
    assert egress["bytes"] == sum(map(len, expected))


def test_egress_pool_full_smallest_mss(rig):
    """Two 60 KB super-packets at the smallest MSS Linux uses (48 bytes):
    2500 segments overflow the segment pool of one batch; the pump sends
    what it holds and goes on, losing and reordering nothing."""
    tun, peer, pump = rig.tcp_pump()
    reads = [tso(4, pattern(60000, 1), 48, seq=1), tso(6, pattern(60000, 2), 48, seq=2)]
    for header, packet in reads:
        write_tun(tun, header, packet)
    pump.start()
    expected = [seg for read in reads for seg in ref_segment(*read)]
    assert len(expected) == 2500
    frames = parse_len16(recv_exactly(peer, sum(2 + len(p) for p in expected)))
    check_segments(*reads[0], frames[:1250])
    check_segments(*reads[1], frames[1250:])
    egress = wait_packets(pump, "egress", 2500)
    assert (egress["packets"], egress["tun_io"]) == (2500, 2)
    assert drops(pump, "egress") == {}


def test_egress_order_across_a_batch(rig):
    """Super-packets and plain packets read in one batch go out in the order
    read, each super-packet's segments together and in sequence."""
    reads = [tso(4, pattern(9000, 1), 1000, seq=10, sport=1),
             (ZERO_VNET, udp_packet(4, pattern(50, 2))),
             uso(6, pattern(4000, 3), 1100),
             needs_csum(tcp_packet(6, pattern(70, 4), csum="partial", sport=2)),
             tso(6, pattern(20000, 5), 1400, seq=20, sport=3, flags=ACK | PSH),
             (ZERO_VNET, tcp_packet(4, b"", flags=RST | ACK))]
    pump, got = egress_udp(rig, reads)
    assert got == [seg for read in reads for seg in ref_segment(*read)]
    egress = wait_packets(pump, "egress", len(got))
    assert egress["tun_io"] == len(reads)
    assert egress["batches"] <= 2


def test_egress_gso_refused_falls_back_for_that_send_then_probes_again(rig):
    """SO_NO_CHECK makes the kernel refuse UDP_SEGMENT (EINVAL): the pump
    counts one gso_fallback and sends the rest of that batch segment by
    segment.  GSO is off only for a while (GSO_RETRY_S): the next batch
    after it tries GSO again, and once the kernel takes it, GSO is back."""
    tun, peer, sock, pump = rig.udp_pump()
    sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_NO_CHECK", 11), 1)
    reads = [tso(4, pattern(20000), 1000, flags=ACK | PSH), uso(4, pattern(3000), 1000)]
    for header, packet in reads:
        write_tun(tun, header, packet)
    pump.start()
    expected = [seg for read in reads for seg in ref_segment(*read)]
    got = recv_n(peer, len(expected))
    assert got == expected
    egress = wait_packets(pump, "egress", len(expected))
    assert egress["packets"] == len(expected)
    assert errors(pump, "egress") == {"gso_fallback": 1}
    assert drops(pump, "egress") == {}
    assert pump.offloads["gso"] is False          # suspended, not given up
    assert pump.offloads["gro"] is True
    # Still refused after the pause: probed again (a second fallback), and
    # every segment still arrives.
    wait_for(lambda: pump.offloads["gso"], "GSO to be retried", lambda: pump.offloads)
    write_tun(tun, *reads[1])
    assert recv_n(peer, len(ref_segment(*reads[1]))) == ref_segment(*reads[1])
    wait_packets(pump, "egress", len(expected) + len(ref_segment(*reads[1])))
    assert errors(pump, "egress") == {"gso_fallback": 2}
    # The route takes GSO again: after the pause it is used, no new fallback.
    sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_NO_CHECK", 11), 0)
    wait_for(lambda: pump.offloads["gso"], "GSO to be retried", lambda: pump.offloads)
    write_tun(tun, *reads[0])
    assert recv_n(peer, len(ref_segment(*reads[0]))) == ref_segment(*reads[0])
    assert errors(pump, "egress") == {"gso_fallback": 2}
    assert pump.offloads["gso"] is True
    assert drops(pump, "egress") == {}


# ---------------------------------------------------------------- egress: hostile headers

def _v4_tcp_super(size=3000, **kw):
    return tcp_packet(4, pattern(size), csum="partial", **kw)


def _tso_header(packet, **fields):
    l4 = ip_header_len(packet)
    values = dict(flags=NEEDS_CSUM, gso_type=GSO_TCPV4 if packet[0] >> 4 == 4 else GSO_TCPV6,
                  hdr_len=l4 + 32, gso_size=1000, csum_start=l4, csum_offset=16)
    values.update(fields)
    return vnet(**values)


def _bad_doff(doff):
    packet = bytearray(_v4_tcp_super(100, options=b""))
    packet[32] = (doff << 4)
    return bytes(packet)


HOSTILE = {
    # name: (read bytes, drop reason)
    "shorter-than-vnet-header": (b"\x00" * 5, "bad_offload"),
    "vnet-header-only": (vnet(NEEDS_CSUM, GSO_TCPV4, 52, 1000, 20, 16), "bad_offload"),
    "csum_start-past-ip-header-v4": (_tso_header(_v4_tcp_super(), csum_start=24)
                                     + _v4_tcp_super(), "bad_offload"),
    "csum_start-short-v4": (_tso_header(_v4_tcp_super(), csum_start=16)
                            + _v4_tcp_super(), "bad_offload"),
    "csum_start-lies-v6": (_tso_header(tcp_packet(6, pattern(3000)), csum_start=20)
                           + tcp_packet(6, pattern(3000)), "bad_offload"),
    "csum_start-beyond-packet": (_tso_header(_v4_tcp_super(), csum_start=4000)
                                 + _v4_tcp_super(), "bad_offload"),
    "gso_size-zero": (_tso_header(_v4_tcp_super(), gso_size=0) + _v4_tcp_super(),
                      "bad_offload"),
    "gso_type-2": (_tso_header(_v4_tcp_super(), gso_type=2) + _v4_tcp_super(), "bad_offload"),
    "gso_type-ufo": (_tso_header(_v4_tcp_super(), gso_type=GSO_UDP_UFO) + _v4_tcp_super(),
                     "bad_offload"),
    "gso_type-7f": (_tso_header(_v4_tcp_super(), gso_type=0x7F) + _v4_tcp_super(),
                    "bad_offload"),
    # GSO_NONE|ECN is GSO_NONE: passes, its checksum completed.
    "ecn-bit-without-gso": (_tso_header(_v4_tcp_super(500), gso_type=GSO_ECN)
                            + _v4_tcp_super(500), "none"),
    "ipv4-options-csum_start-20": (
        _tso_header(_v4_tcp_super(ip_options=b"\x01\x01\x01\x00"), csum_start=20)
        + _v4_tcp_super(ip_options=b"\x01\x01\x01\x00"), "bad_offload"),
    "tcpv4-on-udp": (_tso_header(udp_packet(4, pattern(3000))) + udp_packet(4, pattern(3000)),
                     "bad_offload"),
    "udp_l4-on-tcp": (_tso_header(_v4_tcp_super(), gso_type=GSO_UDP_L4, csum_offset=6)
                      + _v4_tcp_super(), "bad_offload"),
    "tcp-data-offset-4": (_tso_header(_bad_doff(4)) + _bad_doff(4), "bad_offload"),
    "tcp-data-offset-past-end": (_tso_header(_v4_tcp_super(8, options=b""))
                                 + _v4_tcp_super(8, options=b"")[:20] + bytes(12)
                                 + b"\xf0" + bytes(15), "bad_offload"),
    "truncated-headers": (_tso_header(_v4_tcp_super())
                          + _v4_tcp_super()[:30], "bad_offload"),
    "not-ip": (_tso_header(_v4_tcp_super()) + b"\x55" + _v4_tcp_super()[1:], "bad_offload"),
    "too-many-segments": (_tso_header(_v4_tcp_super(6000), gso_size=2)
                          + _v4_tcp_super(6000), "bad_offload"),
    "segments-over-mtu": (_tso_header(_v4_tcp_super(6000), gso_size=MTU - 52 + 1)
                          + _v4_tcp_super(6000), "oversize"),
    "gso-none-over-mtu": (ZERO_VNET + tcp_packet(4, pattern(MTU - 51)), "oversize"),
    "needs-csum-offset-beyond": (vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 200)
                                 + udp_packet(4, pattern(100)), "bad_offload"),
    "needs-csum-start-at-end": (vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 128, 0)
                                + udp_packet(4, pattern(100)), "bad_offload"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_egress_hostile_vnet_headers(rig, name):
    read, reason = HOSTILE[name]
    tun, peer, _, pump = rig.udp_pump()
    pump.start()
    tun.send(read)
    good = tso(6, pattern(5000), 1000, flags=ACK | PSH)
    write_tun(tun, *good)
    expected = ref_segment(*good)
    if reason == "none":
        expected = ref_segment(read[:VNET_LEN], read[VNET_LEN:]) + expected
    got = recv_n(peer, len(expected))
    assert got == expected
    assert_quiet(peer)
    wait_for(lambda: pump.stats()["egress"]["tun_io"] == 2, "both reads")
    assert drops(pump, "egress") == ({} if reason == "none" else {reason: 1})
    assert pump.running
    assert wait_packets(pump, "egress", len(expected))["packets"] == len(expected)


def test_egress_hostile_flood_keeps_running(rig):
    """All the hostile reads queued in one batch, good ones between them:
    every good one passes, in order, every bad one is counted."""
    tun, peer, _, pump = rig.udp_pump(batch=128)
    expected, counts = [], {}
    for i, name in enumerate(sorted(HOSTILE)):
        read, reason = HOSTILE[name]
        tun.send(read)
        if reason == "none":
            expected += ref_segment(read[:VNET_LEN], read[VNET_LEN:])
        else:
            counts[reason] = counts.get(reason, 0) + 1
        good = tso(4, pattern(2500, i), 1000, seq=i * 10000)
        write_tun(tun, *good)
        expected += ref_segment(*good)
    pump.start()
    assert recv_n(peer, len(expected)) == expected
    assert_quiet(peer)
    wait_for(lambda: drops(pump, "egress") == counts, f"drops {counts}",
             lambda: drops(pump, "egress"))
    assert pump.stats()["egress"]["tun_io"] == 2 * len(HOSTILE)


# ================================================================ ingress: coalescing

def ingress_udp(rig, packets, *, family=socket.AF_INET, **options):
    """Queue datagrams on the pump's socket, start it (one recvmmsg sees
    them all), wait until every one is written or dropped, and read the
    TUN writes that made."""
    options.setdefault("batch", 256)
    tun, peer, sock, pump = rig.udp_pump(family, **options)
    send_all(peer, sock.getsockname(), packets)
    pump.start()

    def counted():
        ingress = pump.stats()["ingress"]
        return ingress["packets"] + sum(ingress["drops"].values())
    wait_for(lambda: counted() == len(packets), f"{len(packets)} ingress packets counted",
             lambda: pump.stats()["ingress"])
    got = recv_n(tun, pump.stats()["ingress"]["tun_io"])
    assert_quiet(tun)
    return pump, got


def valid_ip(packet: bytes) -> bool:
    """The pump's own ingress check (framing.validate's rules), for MTU."""
    return validate(packet, "tun", MTU) is None


def check_ingress(sent: list[bytes], got: list[bytes], groups: list[int] | None = None) -> None:
    """got are the TUN writes for the valid packets of sent: each is valid
    on its own, together they stand for exactly what was sent (so every
    flow's bytes arrive in order), and they are the reference's writes."""
    delivered = [p for p in sent if valid_ip(p)]
    expanded = [check_write(w) for w in got]
    assert [p for group in expanded for p in group] == delivered
    if groups is not None:
        assert [len(g) for g in expanded] == groups
        for write, group in zip(got, expanded):
            assert (write[:VNET_LEN] == ZERO_VNET) == (len(group) == 1)
    assert got == ref_coalesce(delivered)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("seq", [1000, 0xFFFFF000], ids=["seq", "seq-wraps"])
def test_ingress_coalesce_udp(rig, version, seq):
    flow = Flow(version, seq=seq)
    mss = 1000
    sent = flow.run(12, mss)
    pump, got = ingress_udp(rig, sent)
    assert len(got) == 1
    header, packet = got[0][:VNET_LEN], got[0][VNET_LEN:]
    l4 = 20 if version == 4 else 40
    hdrs = flow.hdrs
    assert VNET_HDR.unpack(header) == (NEEDS_CSUM, GSO_TCPV4 if version == 4 else GSO_TCPV6,
                                       hdrs, mss, l4, 16)
    total = hdrs + 12 * mss
    assert len(packet) == total
    assert (be16(packet, 2) if version == 4 else be16(packet, 4) + 40) == total
    assert packet[hdrs:] == b"".join(p[hdrs:] for p in sent)
    assert packet[l4 + 13] == ACK | PSH
    assert be32(packet, l4 + 4) == seq
    src, dst = addrs_of(packet)
    assert be16(packet, l4 + 16) == pseudo_sum(src, dst, TCP, total - l4)   # not inverted
    check_ingress(sent, got, [12])
    ingress = wait_packets(pump, "ingress", 12)
    assert (ingress["packets"], ingress["tun_io"]) == (12, 1)
    assert ingress["bytes"] == sum(map(len, sent))
    assert drops(pump, "ingress") == {}


@pytest.mark.parametrize("version", VERSIONS)
def test_ingress_coalesce_tcp_transport(rig, version):
    """len16 over TCP: the frames of one read are coalesced the same way."""
    tun, peer, pump = rig.tcp_pump()
    a, b = Flow(version, sport=1), Flow(version, sport=2)
    sent = a.run(10, 1200) + b.run(5, 800) + a.run(3, 1200, psh_last=False)
    peer.sendall(b"".join(len16(p) for p in sent))
    time.sleep(0.05)           # all of it in the pump's socket before it wakes
    pump.start()
    flat: list[bytes] = []
    got = []
    while len(flat) < len(sent):
        got.append(tun.recv(1 << 17))
        flat += check_write(got[-1])
    assert flat == sent
    assert_quiet(tun)
    check_ingress(sent, got, [10, 5, 3])       # one recv held every frame
    ingress = wait_packets(pump, "ingress", len(sent))
    assert (ingress["tun_io"], ingress["batches"]) == (3, 1)


def gso_send(peer: socket.socket, address, datagrams: list[bytes]) -> None:
    """One UDP_SEGMENT message: datagrams of one size, the last may be shorter."""
    peer.sendmsg([b"".join(datagrams)],
                 [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(datagrams[0])))],
                 0, address)


@pytest.mark.parametrize("framing", ["raw", "len16"])
@pytest.mark.parametrize("version", VERSIONS)
def test_ingress_gro_receive(rig, version, framing):
    """The peer sends one UDP_SEGMENT message of 20 segments (the last one
    shorter): with UDP_GRO the pump gets them in one receive (8 slots
    would not hold 20 datagrams), splits them and joins them again."""
    tun, peer, sock, pump = rig.udp_pump(batch=8, framing=framing)
    flow = Flow(version)
    sent = flow.run(19, 1000, psh_last=False) + [flow.segment(500, flags=ACK | PSH)]
    gso_send(peer, sock.getsockname(), [len16(p) if framing == "len16" else p for p in sent])
    pump.start()
    got = [tun.recv(1 << 17)]
    check_ingress(sent, got, [20])
    assert_quiet(tun)
    ingress = wait_packets(pump, "ingress", 20)
    assert (ingress["tun_io"], ingress["batches"]) == (1, 1)
    assert ingress["bytes"] == sum(map(len, sent))
    assert drops(pump, "ingress") == {}
    assert pump.offloads["gro"]


def test_ingress_gro_overflows_packet_pool(rig):
    """40 GRO receives of 64 small segments in one recvmmsg: 2560 packets,
    more than the coalescer's pool (2048) holds; it writes what it has and
    goes on.  Runs of 64 (the most per super-packet), none lost."""
    tun, peer, sock, pump = rig.udp_pump(batch=64)
    flow = Flow(4)
    sent = flow.run(2560, 48, psh_last=False)
    for i in range(0, len(sent), 64):
        gso_send(peer, sock.getsockname(), sent[i:i + 64])
    pump.start()
    got = recv_n(tun, 40)
    check_ingress(sent, got, [64] * 40)
    assert_quiet(tun)
    ingress = wait_packets(pump, "ingress", len(sent))
    assert (ingress["packets"], ingress["tun_io"], ingress["batches"]) == (2560, 40, 1)


def scenario_flows(version=4):
    return Flow(version, sport=1000), Flow(version, sport=2000)


def _scenarios():
    """name -> (packets, groups of the writes, extra pump options)."""
    s = {}
    for version in (4, 6):
        a, _ = scenario_flows(version)
        s[f"bad-tcp-checksum-v{version}"] = (
            a.run(3, 900, psh_last=False) + [a.segment(900, csum="bad")] + a.run(4, 900),
            [3, 1, 4], {})
    a, _ = scenario_flows()
    s["bad-ipv4-header-checksum"] = (
        a.run(2, 900, psh_last=False) + [a.segment(900, ip_csum="bad")] + a.run(3, 900),
        [2, 1, 3], {})
    a, _ = scenario_flows()
    s["bad-ipv4-header-checksum-first"] = (
        [a.segment(900, ip_csum="bad")] + a.run(5, 900), [1, 5], {})

    a, _ = scenario_flows(6)
    s["seq-gap"] = (a.run(4, 900, psh_last=False) + [a.segment(900, gap=1)]
                    + a.run(3, 900), [4, 4], {})
    a, _ = scenario_flows()
    s["seq-retransmit"] = (a.run(3, 900, psh_last=False) + [a.segment(900, gap=-900)]
                           + a.run(2, 900), [3, 3], {})
    a, b = scenario_flows()
    s["interleaved"] = ([p for pair in zip(a.run(5, 900), b.run(5, 700)) for p in pair],
                        [1] * 10, {})
    a, b = scenario_flows(6)
    c = Flow(4, sport=3000)
    s["flows-in-blocks"] = (a.run(4, 900, psh_last=False) + b.run(3, 700) + a.run(2, 900)
                            + c.run(5, 1000), [4, 3, 2, 5], {})
    a, _ = scenario_flows()
    s["syn-fin-rst"] = ([a.segment(0, flags=SYN)] + a.run(3, 900, psh_last=False)
                        + [a.segment(900, flags=ACK | FIN)] + [a.segment(0, flags=RST)],
                        [1, 3, 1, 1], {})
    a, _ = scenario_flows()
    s["fin-with-data-ends"] = (a.run(3, 900, psh_last=False)
                               + [a.segment(500, flags=ACK | PSH | FIN)], [3, 1], {})
    a, _ = scenario_flows()
    s["urg-ece-cwr"] = (a.run(2, 900, psh_last=False)
                        + [a.segment(900, flags=ACK | URG, urgent=5),
                           a.segment(900, flags=ACK | ECE), a.segment(900, flags=ACK | CWR)]
                        + a.run(2, 900), [2, 1, 1, 1, 2], {})
    a, _ = scenario_flows()
    s["ipv4-options"] = (a.run(2, 900, psh_last=False)
                         + [a.segment(900, ip_options=b"\x01\x01\x01\x00")]
                         + [a.segment(900, ip_options=b"\x01\x01\x01\x00")]
                         + a.run(2, 900), [2, 1, 1, 2], {})
    a, _ = scenario_flows()
    s["fragments"] = (a.run(2, 900, psh_last=False)
                      + [a.segment(900, frag=MF), a.segment(904, frag=0x0010)]
                      + a.run(2, 900), [2, 1, 1, 2], {})
    a, b = scenario_flows()
    s["pure-acks"] = (a.run(3, 900, psh_last=False) + [a.segment(0), b.segment(0)]
                      + a.run(3, 900), [3, 1, 1, 3], {})
    a, _ = scenario_flows(6)
    s["shorter-ends-run"] = (a.run(3, 1000, psh_last=False) + [a.segment(400)]
                             + a.run(3, 1000, psh_last=False), [4, 3], {})
    a, _ = scenario_flows()
    s["longer-starts-run"] = (a.run(3, 500, psh_last=False) + a.run(3, 1000),
                              [3, 3], {})
    a, _ = scenario_flows()
    s["psh-in-the-middle"] = (a.run(3, 900) + a.run(4, 900), [3, 4], {})
    a, _ = scenario_flows()
    s["single-segments"] = ([a.segment(900, flags=ACK | PSH) for _ in range(4)], [1] * 4, {})
    fields = {"tos": {"tos": 1}, "ttl": {"ttl": 63}, "ack": {"ack": 78},
              "window": {"window": 501}, "df": {"frag": 0},
              "options": {"options": TIMESTAMPS[:-1] + b"\x0e"}, "no-options": {"options": b""},
              "reserved-bits": {"reserved": 1}}
    for name, change in fields.items():
        a, _ = scenario_flows()
        s[f"{name}-differs"] = (a.run(3, 900, psh_last=False) + [a.segment(900, **change)]
                                + a.run(2, 900), [3, 1, 2], {})
    for name, change in {"traffic-class": {"tos": 2}, "flow-label": {"flow_label": 7},
                         "hop-limit": {"ttl": 1}}.items():
        a, _ = scenario_flows(6)
        s[f"v6-{name}-differs"] = (a.run(3, 900, psh_last=False) + [a.segment(900, **change)]
                                   + a.run(2, 900), [3, 1, 2], {})
    a, _ = scenario_flows()
    s["sixty-four-at-most"] = (a.run(70, 500), [64, 6], {"batch": 128})
    a, _ = scenario_flows()
    s["ipv4-length-limit"] = (a.run(50, MTU - 52), [45, 5], {})
    a, _ = scenario_flows(6)
    s["ipv6-length-limit"] = (a.run(50, MTU - 72), [45, 5], {})
    a, _ = scenario_flows()
    run = a.run(6, 900)
    junk = bytearray(run[2])
    junk[2:4] = (len(junk) + 1).to_bytes(2, "big")     # bad_length: never reaches the coalescer
    s["invalid-datagram-between"] = (run[:2] + [bytes(junk)] + run[2:], [6], {})
    return s


SCENARIOS = _scenarios()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ingress_grouping(rig, name):
    """What joins and what is written alone (zero vnet header), in order."""
    sent, groups, options = SCENARIOS[name]
    pump, got = ingress_udp(rig, sent, **options)
    check_ingress(sent, got, groups)
    delivered = [p for p in sent if valid_ip(p)]
    ingress = wait_packets(pump, "ingress", len(delivered))
    assert ingress["packets"] == len(delivered)
    assert ingress["tun_io"] == len(groups)
    assert ingress["bytes"] == sum(map(len, delivered))
    assert drops(pump, "ingress") == ({"bad_length": 1} if name == "invalid-datagram-between"
                                      else {})


def test_ingress_order_over_many_wakeups(rig):
    """Datagrams sent while the pump runs (grouping depends on timing):
    every flow's bytes still arrive in order, every write is valid."""
    tun, peer, sock, pump = rig.udp_pump()
    pump.start()
    flows = [Flow(4, sport=1), Flow(6, sport=2), Flow(4, sport=3)]
    sent = []
    for round_ in range(30):
        for i, flow in enumerate(flows):
            sent += flow.run(1 + (round_ + i) % 5, 600 + 100 * i, psh_last=round_ % 3 == 0)
    address = sock.getsockname()
    flat = []

    def receive_all():
        while len(flat) < len(sent):
            flat.extend(check_write(tun.recv(1 << 17)))

    for start in range(0, len(sent), 17):
        send_all(peer, address, sent[start:start + 17])
    receive_all()
    assert flat == sent
    assert_quiet(tun)
    assert wait_packets(pump, "ingress", len(sent))["packets"] == len(sent)


def test_back_to_back_pumps(rig):
    """A's TUN -> segments -> UDP (GSO) -> B's socket (GRO) -> coalesced ->
    B's TUN: the payload of each super-packet comes out whole, in order."""
    tun_a, end_a = rig.tun()
    tun_b, end_b = rig.tun()
    sock_a, sock_b = rig.udp(timeout=None), rig.udp(timeout=None)
    a = rig.pump(end_a, sock_a, peer=sock_b.getsockname())
    b = rig.pump(end_b, sock_b, peer=sock_a.getsockname(), batch=256)
    b.start()
    a.start()
    reads = [tso(4, pattern(60000, 1), 1448, seq=5, flags=ACK | PSH, sport=1),
             tso(6, pattern(30000, 2), 1428, seq=7, flags=ACK | PSH, sport=2)]
    expected = []
    for header, packet in reads:
        write_tun(tun_a, header, packet)
        expected += ref_segment(header, packet)
    flat = []
    while len(flat) < len(expected):
        flat += check_write(tun_b.recv(1 << 17))
    assert flat == expected
    assert_quiet(tun_b)
    assert b.stats()["ingress"]["tun_io"] < len(expected)


# ================================================================ hypothesis

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def super_packets(draw):
    version = draw(st.sampled_from([4, 6]))
    options = draw(st.sampled_from([b"", TIMESTAMPS, TIMESTAMPS * 3 + b"\x01\x01\x01\x00"]))
    hdrs = (20 if version == 4 else 40) + 20 + len(options)
    transport = draw(st.sampled_from(["udp", "tcp"]))
    mss = draw(st.integers(48, MTU - hdrs))
    # UDP: at most a few hundred datagrams; TCP (lossless): anything.
    most = 65535 - hdrs if transport == "tcp" else min(65535 - hdrs, 300 * mss)
    size = draw(st.one_of(st.integers(0, most), st.integers(most // 2, most),
                          st.sampled_from([0, mss, mss + 1, most])))
    flags = ACK | draw(st.sampled_from([0, PSH, FIN, PSH | FIN, CWR, CWR | ECE | PSH, URG]))
    seq = draw(st.integers(0, 0xFFFFFFFF))
    ident = draw(st.integers(0, 0xFFFF))
    ecn = draw(st.booleans())
    return transport, tso(version, pattern(size, seq & 0xFF), mss, ecn=ecn, seq=seq,
                          flags=flags, ident=ident, options=options, urgent=0)


@PROPERTY
@given(super_packets())
def test_property_egress_segmentation(case):
    transport, (header, packet) = case
    rig = OffloadRig()
    try:
        expected = ref_segment(header, packet)
        if transport == "udp":
            tun, peer, _, pump = rig.udp_pump()
            write_tun(tun, header, packet)
            pump.start()
            got = recv_n(peer, len(expected))
        else:
            tun, peer, pump = rig.tcp_pump()
            write_tun(tun, header, packet)
            pump.start()
            got = parse_len16(recv_exactly(peer, sum(2 + len(p) for p in expected)))
        check_segments(header, packet, got)
        assert_quiet(peer, 0.01)
        egress = wait_packets(pump, "egress", len(expected))
        assert egress["packets"] == len(expected)
        assert egress["tun_io"] == 1
        assert drops(pump, "egress") == {}
    finally:
        rig.close()


EVENTS = ["none", "full", "short", "psh", "gap", "bad_csum", "bad_ip_csum", "syn", "fin",
          "rst", "pure_ack", "tos", "ip_options", "fragment", "invalid", "longer", "window",
          "reserved", "other_flow"]


@st.composite
def segment_scripts(draw):
    """Bursts of in-sequence full segments of a few flows (v4/v6), each
    burst ended by an event that may or may not break a run."""
    nflows = draw(st.integers(1, 3))
    flows = []
    for i in range(nflows):
        version = draw(st.sampled_from([4, 6]))
        options = draw(st.sampled_from([b"", TIMESTAMPS]))
        flow = Flow(version, sport=1000 + i, seq=draw(st.integers(0, 0xFFFFFFFF)),
                    ident=draw(st.integers(0, 0xFFFF)), options=options)
        mss = draw(st.integers(1, 400)) * 3
        flows.append((flow, min(mss, MTU - flow.hdrs - 8)))
    bursts = draw(st.lists(st.tuples(st.integers(0, nflows - 1), st.integers(0, 24),
                                     st.sampled_from(EVENTS)), min_size=1, max_size=10))
    packets = []
    for index, burst, event in bursts:
        flow, mss = flows[index]
        packets += [flow.segment(mss) for _ in range(burst)]
        if event == "full":
            packets.append(flow.segment(mss))
        elif event == "short":
            packets.append(flow.segment(draw(st.integers(1, mss))))
        elif event == "psh":
            packets.append(flow.segment(mss, flags=ACK | PSH))
        elif event == "gap":
            packets.append(flow.segment(mss, gap=draw(st.sampled_from([-mss, 1, mss]))))
        elif event == "bad_csum":
            packets.append(flow.segment(mss, csum="bad"))
        elif event == "bad_ip_csum":
            packets.append(flow.segment(mss, ip_csum="bad") if flow.version == 4
                           else flow.segment(mss, ttl=9))
        elif event in ("syn", "fin", "rst"):
            flag = {"syn": SYN, "fin": FIN | ACK, "rst": RST}[event]
            packets.append(flow.segment(draw(st.integers(0, mss)), flags=flag))
        elif event == "pure_ack":
            packets.append(flow.segment(0))
        elif event == "tos":
            packets.append(flow.segment(mss, tos=draw(st.integers(1, 255))))
        elif event == "ip_options":
            packets.append(flow.segment(mss, ip_options=b"\x01\x01\x01\x00")
                           if flow.version == 4 else flow.segment(mss, flow_label=3))
        elif event == "fragment":
            packets.append(flow.segment(mss, frag=MF) if flow.version == 4
                           else flow.segment(mss, ttl=1))
        elif event == "invalid":
            junk = bytearray(flow.segment(mss))
            junk[0] = 0x50                       # bad_version: dropped before coalescing
            packets.append(bytes(junk))
        elif event == "longer":
            packets.append(flow.segment(mss + 8))
        elif event == "window":
            packets.append(flow.segment(mss, window=draw(st.integers(0, 0xFFFF))))
        elif event == "reserved":
            packets.append(flow.segment(mss, reserved=draw(st.integers(1, 15))))
        elif event == "other_flow":
            other, other_mss = flows[(index + 1) % nflows]
            packets.append(other.segment(other_mss))
    if not packets:
        flow, mss = flows[0]
        packets.append(flow.segment(mss))
    return packets[:200]


@PROPERTY
@given(segment_scripts())
def test_property_ingress_coalescing(packets):
    rig = OffloadRig()
    try:
        pump, got = ingress_udp(rig, packets)
        check_ingress(packets, got)
        delivered = [p for p in packets if valid_ip(p)]
        ingress = wait_packets(pump, "ingress", len(delivered))
        assert ingress["packets"] == len(delivered)
        assert ingress["tun_io"] == len(got)
        assert sum(drops(pump, "ingress").values()) == len(packets) - len(delivered)
    finally:
        rig.close()
