"""Hostile input (issue 4, section 2): nothing forged reaches the device,
every drop is counted by its reason, and the legitimate tunnel carries on.

Mostly unit level, like test_pump.py: the TUN fd is one end of a
SOCK_SEQPACKET socketpair, the network a loopback UDP socket pair or a TCP
connection on 127.0.0.1, and every case runs against the compiled pump
and the pure-Python twin (``pump_class``).  Legitimate packets are
interleaved with the garbage and must come out unchanged and in order.

Root tests (a real tunnel, ``RelayPair``): a flood of connection attempts
on the TCP server, a hostile TCP server feeding the relay client bad len16
lengths (the client closes, counts, reconnects), and forged TCP checksums
through an offloading relay (the kernel, not the coalescer, judges them).

Nothing can hang: test-side sockets have timeouts, waits have deadlines,
and the ``rig`` fixture stops every pump before closing any fd.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import subprocess
import sys
import time
from collections import Counter

import pytest
from _root import bed, make_pair, python, wait_for  # noqa: F401 (bed, make_pair: fixtures)
from pumprig import BUFFER, WAIT, Rig, assert_quiet, recv_exactly, recv_n
from pumprig import drops as pump_drops
from pumprig import errors as pump_errors
from pumprig import wait_for as pump_wait_for
from test_faults import assert_alive, assert_ping, drops, nstat, ping, relay_state

from conftest import ip_packet, ipv4_packet, ipv6_packet, load_fastpath, ones_sum
from tunrelay.framing import len16_encode
from tunrelay.testrig.pair import PORT, TUNNEL_A, TUNNEL_B

MTU = 1400
STOP_BOUND = 2.0    # stop() must return within this, however hostile the peer
FAMILIES = [pytest.param(socket.AF_INET, id="ipv4"), pytest.param(socket.AF_INET6, id="ipv6")]
TRANSPORTS = ["udp", "tcp"]


# ================================================================ rig

class HostileRig(Rig):
    """The shared rig, with room in the stand-in for bursts, and the peer's
    side of either transport as one function."""

    def transport(self, transport: str, **options):
        """(tun test end, send(datagram), pump) with the peer's side as one
        function: a datagram from the peer (UDP), or a len16 frame (TCP)."""
        tun, tun_end = self.tun()
        if transport == "udp":
            peer = self.udp()
            sock = self.udp(timeout=None)
            pump = self.pump(tun_end, sock, peer=peer.getsockname(), **options)
            address = sock.getsockname()
            return tun, lambda data: peer.sendto(data, address), pump
        peer, sock = self.tcp()
        pump = self.pump(tun_end, sock, **options)
        return tun, lambda data: peer.sendall(len16_encode(data)), pump


@pytest.fixture
def rig(pump_class):
    rig = HostileRig(pump_class, tun_buffer=BUFFER, mtu=MTU)
    yield rig
    rig.close()


# ================================================================ helpers







def wait_drops(pump, expected: dict, direction: str = "ingress") -> None:
    pump_wait_for(lambda: pump_drops(pump, direction) == expected,
                  f"{direction} drops {expected}", lambda: pump_drops(pump, direction))








def with_total(packet: bytes, total: int) -> bytes:
    """An IPv4 packet whose total length field says ``total``."""
    return packet[:2] + total.to_bytes(2, "big") + packet[4:]


def with_payload_length(packet: bytes, length: int) -> bytes:
    """An IPv6 packet whose payload length field says ``length``."""
    return packet[:4] + length.to_bytes(2, "big") + packet[6:]


def with_ihl(packet: bytes, ihl: int) -> bytes:
    return bytes([0x40 | ihl]) + packet[1:]


def interleave(legit: list[bytes], garbage: list[bytes], seed: int) -> list[bytes]:
    """Every garbage datagram at a random place among the legitimate ones
    (which keep their order)."""
    rng = random.Random(seed)
    script = list(legit)
    for g in garbage:
        script.insert(rng.randrange(len(script) + 1), g)
    return script


def run_script(rig, transport: str, garbage: dict[str, tuple[bytes, str]], *, legit_count: int = 40,
               seed: int = 0) -> None:
    """Send legitimate packets with ``garbage`` (name -> (datagram, reason))
    interleaved, from the peer itself; check that exactly the legitimate
    ones reach the TUN, unchanged and in order, and that each garbage
    datagram is counted under its reason, the pump still running."""
    tun, send, pump = rig.transport(transport)
    pump.start()
    legit = [ip_packet(20 + (i * 97) % (MTU - 19), i) for i in range(legit_count)]
    for datagram in interleave(legit, [g for g, _ in garbage.values()], seed):
        send(datagram)
    assert recv_n(tun, len(legit)) == legit
    expected = dict(Counter(reason for _, reason in garbage.values()))
    wait_drops(pump, expected)
    assert_quiet(tun)
    ingress = pump.stats()["ingress"]
    assert (ingress["packets"], ingress["bytes"]) == (len(legit), sum(map(len, legit)))
    assert pump_errors(pump, "ingress") == {}
    assert pump.running
    # And afterwards, both ways still work.
    last = ipv6_packet(MTU, 99999)
    send(last)
    assert tun.recv(1 << 17) == last


# ================================================================ strangers

@pytest.mark.parametrize("family", FAMILIES)
def test_strangers_interleaved_with_the_peer(rig, family):
    """Raw UDP from addresses other than the peer's, valid-looking packets
    and random bytes alike, interleaved with the peer's own traffic: every
    stranger's datagram is counted as not_peer (before any validation), the
    peer's pass unchanged and in order, and the peer stays the peer."""
    tun, tun_end = rig.tun()
    peer = rig.udp(family)
    sock = rig.udp(family, timeout=None)
    pump = rig.pump(tun_end, sock, peer=peer.getsockname())
    address = sock.getsockname()
    peer_port = peer.getsockname()[1]
    strangers = [rig.udp(family), rig.udp(family)]          # same host, other ports
    if family == socket.AF_INET:
        # The peer's port from another address, and a third host.
        strangers += [rig.udp(family, host="127.0.0.2", port=peer_port),
                      rig.udp(family, host="127.0.0.3")]
    pump.start()

    rng = random.Random(1)
    legit = [ip_packet(40 + (i * 131) % (MTU - 39), i) for i in range(60)]
    forged = 0
    for i, packet in enumerate(legit):
        stranger = strangers[i % len(strangers)]
        # A copy of the peer's packet (a spoofing attempt at the tunnel's
        # content), a fresh valid packet, and noise.
        for datagram in (packet, ipv4_packet(100, 1000 + i), rng.randbytes(rng.randrange(0, 200))):
            stranger.sendto(datagram, address)
            forged += 1
        peer.sendto(packet, address)
    assert recv_n(tun, len(legit)) == legit
    wait_drops(pump, {"not_peer": forged})
    assert_quiet(tun)
    assert pump.stats()["ingress"]["packets"] == len(legit)
    assert pump.peer[:2] == peer.getsockname()[:2]
    out = ip_packet(300, 7)
    tun.send(out)                       # replies go to the peer only
    assert peer.recv(1 << 17) == out
    for stranger in strangers:
        assert_quiet(stranger)


def test_strangers_cannot_choose_a_learned_peer(rig):
    """Without a configured peer only a *valid* packet may choose it: a
    flood of garbage from strangers first is counted by reason, chooses
    nobody, and cannot displace the peer chosen afterwards."""
    tun, tun_end = rig.tun()
    sock = rig.udp(timeout=None)
    pump = rig.pump(tun_end, sock)
    address = sock.getsockname()
    strangers = [rig.udp(), rig.udp(host="127.0.0.2")]
    peer = rig.udp()
    pump.start()
    garbage = {"bad_version": b"\x01" + bytes(147), "truncated": b"\x45" + bytes(10),
               "bad_length": with_total(ipv4_packet(100), 101), "empty": b""}
    for stranger in strangers:
        for datagram in garbage.values():
            stranger.sendto(datagram, address)
    wait_drops(pump, {reason: len(strangers) for reason in garbage})
    assert pump.peer is None
    first = ip_packet(100, 1)
    peer.sendto(first, address)
    assert tun.recv(1 << 17) == first
    for stranger in strangers:
        stranger.sendto(ip_packet(100, 2), address)   # valid, but too late
    last = ip_packet(200, 3)
    peer.sendto(last, address)
    assert tun.recv(1 << 17) == last
    wait_drops(pump, {**{reason: len(strangers) for reason in garbage}, "not_peer": len(strangers)})
    assert pump.peer[:2] == peer.getsockname()[:2]
    assert_quiet(tun)


# ================================================================ foreign protocols from the peer

def _foreign() -> dict[str, tuple[bytes, str]]:
    """Other tunnels' messages, as they look on the wire: name ->
    (datagram, drop reason).  The first byte decides: WireGuard's message
    types 1..4 and most OpenVPN opcodes are IP version 0..3 or 5 (bad
    version); OpenVPN opcodes 8 and 9 (0x40, 0x48) and QUIC short headers
    (0x40..0x7f) look like IPv4 or IPv6 and fail on the length fields."""
    rng = random.Random(4)
    noise = rng.randbytes
    return {
        # WireGuard: type, 3 reserved zero bytes, then the message body.
        "wg-handshake-initiation": (b"\x01\0\0\0" + noise(144), "bad_version"),
        "wg-handshake-response": (b"\x02\0\0\0" + noise(88), "bad_version"),
        "wg-cookie-reply": (b"\x03\0\0\0" + noise(60), "bad_version"),
        "wg-keepalive": (b"\x04\0\0\0" + noise(28), "bad_version"),
        "wg-transport-data": (b"\x04\0\0\0" + noise(1200), "bad_version"),
        # OpenVPN: opcode << 3 | key id, session id (8), ack array, packet id...
        "ovpn-hard-reset-client-v2": (b"\x38" + noise(8) + b"\0" + b"\0\0\0\0", "bad_version"),
        "ovpn-hard-reset-client-v3": (b"\x50" + noise(8) + b"\0" + b"\0\0\0\0" + noise(40), "bad_version"),
        "ovpn-control-v1": (b"\x20" + noise(8) + b"\x01" + noise(12) + b"\0\0\0\x01" + noise(100),
                            "bad_version"),
        "ovpn-ack-v1": (b"\x28" + noise(8) + b"\x01" + noise(4) + noise(8), "bad_version"),
        "ovpn-data-v1": (b"\x30" + noise(300), "bad_version"),
        # 0x40: "IPv4" with a header length of 0.
        "ovpn-hard-reset-server-v2": (b"\x40" + noise(8) + b"\x01\0\0\0\0" + noise(8) + b"\0\0\0\0",
                                      "bad_length"),
        # 0x48 + 24-bit peer id 1: "IPv4", IHL 8, total length 1.
        "ovpn-data-v2": (b"\x48\x00\x00\x01" + noise(200), "bad_length"),
        "ovpn-data-v2-short": (b"\x48\x00\x00\x01" + noise(10), "truncated"),
        # QUIC short header 0x6b: "IPv6" whose payload length (bytes 4-5) lies.
        "quic-short-header": (b"\x6b" + noise(3) + b"\xff\xff" + noise(60), "bad_length"),
        "quic-long-header": (b"\xc3\x00\x00\x00\x01" + noise(1195), "bad_version"),
        "dtls-client-hello": (b"\x16\xfe\xfd" + noise(120), "bad_version"),
        "stun-binding-request": (b"\x00\x01\x00\x00\x21\x12\xa4\x42" + noise(12), "bad_version"),
        "ike-non-esp-marker": (b"\0\0\0\0" + noise(300), "bad_version"),
    }


FOREIGN = _foreign()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_foreign_tunnel_messages_from_the_peer(rig, transport):
    """The peer's own address sends another tunnel's control and data
    messages (a misconfigured neighbour, or probing): over UDP as
    datagrams, over TCP as len16 frames (which is exactly how OpenVPN
    frames its TCP stream).  Each is dropped by its reason; the TCP
    connection is not closed for it (the framing itself is intact)."""
    run_script(rig, transport, FOREIGN, seed=2)


# ================================================================ lying headers

def _lies() -> dict[str, tuple[bytes, str]]:
    v4, v6 = ipv4_packet(100, 5), ipv6_packet(100, 6)
    return {
        "v4-one-byte": (b"\x45", "truncated"),
        "v4-19-bytes": (ipv4_packet(20)[:19], "truncated"),
        "v6-one-byte": (b"\x60", "truncated"),
        "v6-39-bytes": (ipv6_packet(40)[:39], "truncated"),
        "v4-total-longer": (with_total(v4, 101), "bad_length"),
        "v4-total-max": (with_total(v4, 0xFFFF), "bad_length"),
        "v4-total-shorter": (with_total(v4, 60), "bad_length"),    # 40 bytes smuggled behind
        "v4-total-zero": (with_total(v4, 0), "bad_length"),
        "v4-total-header-only": (with_total(v4, 20), "bad_length"),
        "v4-cut-in-transit": (ipv4_packet(300)[:200], "bad_length"),
        **{f"v4-ihl-{ihl}": (with_ihl(v4, ihl), "bad_length") for ihl in range(5)},
        "v4-ihl-over-total": (with_ihl(with_total(ipv4_packet(40), 40), 15), "bad_length"),
        "v4-ihl-6-in-20": (with_ihl(ipv4_packet(20), 6), "bad_length"),
        "v6-payload-longer": (with_payload_length(v6, 61), "bad_length"),
        "v6-payload-shorter": (with_payload_length(v6, 10), "bad_length"),
        "v6-payload-zero": (with_payload_length(v6, 0), "bad_length"),   # a "jumbogram"
        "v6-payload-max": (with_payload_length(v6, 0xFFFF), "bad_length"),
        "v6-cut-in-transit": (ipv6_packet(300)[:200], "bad_length"),
    }


LIES = _lies()
#: Valid, at the edges of what the check allows: must pass.
EDGES = [ipv4_packet(20, 1), ipv6_packet(40, 2), with_ihl(ipv4_packet(60, 3), 15),
         ipv4_packet(MTU, 4), ipv6_packet(MTU, 5)]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_truncated_and_lying_headers(rig, transport):
    """Truncated IP headers and length fields that lie, from the peer,
    among legitimate packets: each dropped as truncated or bad_length."""
    garbage = dict(LIES)
    if transport == "udp":       # not expressible in len16 (a protocol error there)
        garbage["empty"] = (b"", "empty")
        garbage["oversize"] = (ipv4_packet(MTU + 1), "oversize")
        garbage["oversize-v6"] = (ipv6_packet(MTU + 1), "oversize")
    run_script(rig, transport, garbage, seed=3)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_valid_edge_packets_pass(rig, transport):
    tun, send, pump = rig.transport(transport)
    pump.start()
    for packet in EDGES:
        send(packet)
    assert recv_n(tun, len(EDGES)) == EDGES
    assert pump_drops(pump) == {}


# ================================================================ len16 over TCP

@pytest.mark.parametrize("header", [0, MTU + 1, 0xFFFF], ids=["zero", "mtu+1", "max"])
def test_len16_bad_length_split_across_reads(rig, header):
    """The bad length's two bytes arrive in separate reads (the first one
    alone is harmless): the frames before it pass, the connection is closed
    as a protocol error and counted, nothing after it is written."""
    tun, tun_end = rig.tun()
    peer, sock = rig.tcp()
    pump = rig.pump(tun_end, sock)
    pump.start()
    before = [ip_packet(100, 1), ip_packet(MTU, 2)]
    raw = header.to_bytes(2, "big")
    peer.sendall(b"".join(map(len16_encode, before)) + raw[:1])
    assert recv_n(tun, 2) == before
    time.sleep(0.1)
    assert pump.running, "the first byte of a length alone must not end anything"
    peer.sendall(raw[1:] + ip_packet(60, 3))
    outcome = pump.wait(WAIT)
    assert outcome is not None and outcome.reason == "protocol_error", outcome
    assert outcome.restartable
    assert_quiet(tun)
    assert pump_drops(pump) == {"bad_frame": 1}
    assert pump_errors(pump, "ingress") == {"disconnect": 1}
    assert pump.stats()["ingress"]["packets"] == 2


# ================================================================ slowloris

SLOW_INTERVAL = 0.5


def test_slowloris_tcp_peer(rig):
    """A TCP peer dribbling one byte every 0.5 s: the partial frame is
    kept across reads (the packet arrives whole once the rest comes), the
    pump is not spinning (a wake-up per byte, no more), egress keeps
    flowing meanwhile, and stop() in the middle of a frame is prompt."""
    tun, tun_end = rig.tun()
    peer, sock = rig.tcp()
    pump = rig.pump(tun_end, sock)
    pump.start()
    packet = ip_packet(100, 1)
    frame = len16_encode(packet)
    slow = 4                      # header and two bytes of the packet: 2 s
    wakeups = pump.stats()["ingress"]["wakeups"]
    for i in range(slow):
        peer.sendall(frame[i:i + 1])
        out = ip_packet(200, 100 + i)   # the other direction is unaffected
        tun.send(out)
        assert recv_exactly(peer, 2 + len(out)) == len16_encode(out)
        time.sleep(SLOW_INTERVAL)
    assert_quiet(tun)
    ingress = pump.stats()["ingress"]
    assert ingress["packets"] == 0 and pump_drops(pump) == {}
    woke = ingress["wakeups"] - wakeups
    assert woke <= 2 * slow, f"{woke} wake-ups for {slow} bytes: spinning?"

    peer.sendall(frame[slow:])
    assert tun.recv(1 << 17) == packet   # whole, from the bytes kept
    pump_wait_for(lambda: pump.stats()["ingress"]["packets"] == 1, "the packet counted")

    frame = len16_encode(ip_packet(300, 2))   # then stop while one is half-way
    for i in range(2):
        peer.sendall(frame[i:i + 1])
        time.sleep(SLOW_INTERVAL)
    started = time.monotonic()
    outcome = pump.stop(WAIT)
    elapsed = time.monotonic() - started
    assert outcome is not None and outcome.reason == "stopped"
    assert elapsed < STOP_BOUND, f"stop() took {elapsed:.2f} s"
    assert_quiet(tun)
    stats = pump.stats()
    assert stats["ingress"]["packets"] == 1 and pump_drops(pump) == {}
    assert stats["egress"]["packets"] == slow


# ================================================================ offload: forged TCP checksums

VNET = struct.Struct("<BBHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
ZERO_VNET = bytes(VNET.size)
GSO_TCPV4, GSO_TCPV6 = 1, 4
ACK, PSH = 0x10, 0x08
OFFLOAD_MTU = 1500


class TcpFlow:
    """One direction of a TCP flow: the next segment, checksums right unless
    told otherwise."""

    def __init__(self, version: int, sport: int = 40000, dst: str | None = None,
                 src: str | None = None, dport: int = 5201) -> None:
        self.version, self.sport, self.dport = version, sport, dport
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        self.src = socket.inet_pton(family, src or ("10.0.0.1" if version == 4 else "fd00::1"))
        self.dst = socket.inet_pton(family, dst or ("10.0.0.2" if version == 4 else "fd00::2"))
        self.seq = 1000
        self.ident = 1

    def segment(self, size: int, *, flags: int = ACK, csum_delta: int = 0, zero_csum: bool = False,
                alter_payload: bool = False) -> bytes:
        payload = bytes((self.seq + i * 7) & 0xFF for i in range(size))
        tcp = bytearray(struct.pack("!HHIIBBHHH", self.sport, self.dport, self.seq, 77, 5 << 4,
                                    flags, 502, 0, 0) + payload)
        if self.version == 4:
            pseudo = self.src + self.dst + struct.pack("!BBH", 0, 6, len(tcp))
        else:
            pseudo = self.src + self.dst + struct.pack("!I3xB", len(tcp), 6)
        csum = ~ones_sum(bytes(tcp), ones_sum(pseudo)) & 0xFFFF
        # csum_delta: a ones'-complement shift of the field (a sum shifted
        # by +d on one segment and -d on the next cancels out over both).
        csum = ones_sum(struct.pack("!HH", csum, csum_delta % 0xFFFF)) if csum_delta else csum
        tcp[16:18] = (0 if zero_csum else csum).to_bytes(2, "big")
        if alter_payload:                       # changed after the sum: an injected byte
            tcp[20] ^= 0x20
        if self.version == 4:
            ip = bytearray(struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(tcp), self.ident, 0x4000, 64, 6, 0)
                           + self.src + self.dst)
            ip[10:12] = (~ones_sum(bytes(ip)) & 0xFFFF).to_bytes(2, "big")
        else:
            ip = bytearray(struct.pack("!IHBB", 6 << 28, len(tcp), 6, 64) + self.src + self.dst)
        self.seq += size
        self.ident += 1
        return bytes(ip + tcp)

    def run(self, count: int, size: int) -> list[bytes]:
        return [self.segment(size) for _ in range(count)]


def l4_valid(packet: bytes) -> bool:
    l4 = 20 if packet[0] >> 4 == 4 else 40
    if l4 == 20:
        pseudo = packet[12:20] + struct.pack("!BBH", 0, 6, len(packet) - l4)
    else:
        pseudo = packet[8:40] + struct.pack("!I3xB", len(packet) - l4, 6)
    return ones_sum(packet[l4:], ones_sum(pseudo)) == 0xFFFF


def forged_script(version: int) -> tuple[list[bytes], list[int]]:
    """Segments of one flow, some forged, and the TUN writes they must
    make: runs of valid segments join, every forged one is written alone."""
    f = TcpFlow(version)
    size = 1000
    sent = (f.run(3, size)
            + [f.segment(size, csum_delta=0x0100)]             # a wrong checksum
            + f.run(2, size)
            + [f.segment(size, zero_csum=True)]                 # TCP has no "no checksum"
            + [f.segment(size, alter_payload=True)]             # payload changed after the sum
            + f.run(2, size)
            + [f.segment(size, csum_delta=0x1234),              # errors that cancel out
               f.segment(size, csum_delta=-0x1234)]             #   over the pair
            + [f.segment(size, csum_delta=1) for _ in range(4)]  # a forged run
            + f.run(3, size))
    groups = [3, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 3]
    return sent, groups


def split_write(write: bytes) -> list[bytes]:
    """A TUN write (vnet header + packet) -> the wire segments it stands
    for (payload slices with the super-packet's header; checksums not
    recomputed, only the payload bytes matter here)."""
    flags, gso_type, hdr_len, gso_size, _, _ = VNET.unpack(write[:VNET.size])
    packet = write[VNET.size:]
    if gso_type == 0:
        return [packet]
    assert gso_type in (GSO_TCPV4, GSO_TCPV6) and flags == 1, VNET.unpack(write[:VNET.size])
    payload = packet[hdr_len:]
    return [packet[:hdr_len] + payload[i:i + gso_size] for i in range(0, len(payload), gso_size)]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("version", [4, 6], ids=["ipv4", "ipv6"])
def test_offload_forged_checksums_are_not_coalesced(transport, version):
    """Offload ingress (compiled pump): a coalesced super-packet goes up
    with CHECKSUM_PARTIAL, which the kernel trusts; so a segment whose TCP
    checksum does not verify must never join one.  Each forged segment is
    written alone, byte for byte, with a zero vnet header (the kernel
    verifies and drops it); valid neighbours still coalesce."""
    Pump = load_fastpath().Pump
    sent, groups = forged_script(version)
    forged = [p for p in sent if not l4_valid(p)]
    assert len(forged) == 9
    rig = HostileRig(Pump, tun_buffer=BUFFER, mtu=MTU)
    try:
        tun, tun_end = rig.tun()
        if transport == "udp":
            peer, sock = rig.udp(), rig.udp(timeout=None)
            pump = rig.pump(tun_end, sock, peer=peer.getsockname(), mtu=OFFLOAD_MTU,
                            offload=True, batch=256)
            for packet in sent:           # all queued: one receive sees them all
                peer.sendto(packet, sock.getsockname())
        else:
            peer, sock = rig.tcp()
            pump = rig.pump(tun_end, sock, mtu=OFFLOAD_MTU, offload=True)
            peer.sendall(b"".join(map(len16_encode, sent)))
            time.sleep(0.05)              # all of it in the socket before the first read
        pump.start()
        got = recv_n(tun, len(groups))
        assert_quiet(tun)
        assert [len(split_write(w)) for w in got] == groups
        flat = [s for w in got for s in split_write(w)]
        assert [s[-1000:] for s in flat] == [p[-1000:] for p in sent]   # every payload, in order
        start = 0
        for write, size in zip(got, groups):
            members = sent[start:start + size]
            start += size
            if size == 1:         # the script has forged segments alone only
                assert not l4_valid(members[0])
                # Alone, byte for byte, no offload claim: the kernel checks it.
                assert write == ZERO_VNET + members[0]
            else:
                assert all(l4_valid(p) for p in members), "a forged segment was coalesced"
        pump_wait_for(lambda: pump.stats()["ingress"]["packets"] == len(sent), "ingress counted")
        assert pump.stats()["ingress"]["tun_io"] == len(groups)
    finally:
        rig.close()


# ================================================================ real tunnel (root)

# Opens N connections to the TCP server, at most P at a time, each waiting
# for the server's verdict; prints a Counter of the outcomes as JSON.
FLOOD = r"""
import json, socket, sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
host, port, n, parallel = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

def attempt(_):
    try:
        sock = socket.create_connection((host, port), timeout=10)
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:   # reset before connect() even returned
        return "reset"
    except OSError as exc:
        return f"connect: {exc}"
    sock.settimeout(10)
    try:
        return "eof" if not sock.recv(65536) else "data"
    except ConnectionResetError:
        return "reset"
    except socket.timeout:
        return "timeout"
    finally:
        sock.close()

with ThreadPoolExecutor(parallel) as pool:
    print(json.dumps(Counter(pool.map(attempt, range(n)))))
"""


@pytest.mark.root
@pytest.mark.parametrize("attempts", [pytest.param(200, id="200"),
                                      pytest.param(1000, id="1000", marks=pytest.mark.slow)])
def test_tcp_connection_flood(bed, make_pair, attempts):
    """While the real client is connected, ns b fires ``attempts``
    connections at the server: every one is refused (reset), counted in
    "rejected", and the tunnel keeps passing ping meanwhile."""
    pair = make_pair(protocol="tcp")
    pair.start()
    assert_ping(bed, bed.ns_b, TUNNEL_A)
    rejected = pair.stats("a")["rejected"]
    flood = bed.popen(bed.ns_b, [sys.executable, "-c", FLOOD, bed.addr_a, str(PORT), str(attempts), "8"],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: pair.stats("a")["rejected"] > rejected, 10, "the flood to start")
        during = ping(bed, bed.ns_b, TUNNEL_A, count=10, interval=0.1)
        out, err = flood.communicate(timeout=120)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait()
    outcomes = json.loads(out)
    assert outcomes == {"reset": attempts}, (outcomes, err)
    assert during.returncode == 0 and " 0% packet loss" in during.stdout, during.stdout
    wait_for(lambda: pair.stats("a")["rejected"] == rejected + attempts, 5,
             f"{attempts} refusals counted (have {pair.stats('a')['rejected'] - rejected})")
    assert pair.stats("a")["connections"] == pair.stats("b")["connections"] == 1
    assert relay_state(pair, "a") == relay_state(pair, "b") == "connected"
    assert_ping(bed, bed.ns_b, TUNNEL_A)
    assert_ping(bed, bed.ns_a, TUNNEL_B)
    for name in ("a", "b"):
        assert pair.stop(name) == 0, pair.log(name)


def ipv4_udp(src: str, dst: str, payload: bytes) -> bytes:
    """A well-formed IPv4/UDP packet (header checksum right, UDP checksum 0)."""
    header = bytearray(struct.pack("!BBHHHBBH", 0x45, 0, 28 + len(payload), 1, 0x4000, 64, 17, 0)
                       + socket.inet_aton(src) + socket.inet_aton(dst))
    header[10:12] = (~ones_sum(bytes(header)) & 0xFFFF).to_bytes(2, "big")
    return bytes(header) + struct.pack("!HHHH", 40000, 9, 8 + len(payload), 0) + payload


# A TCP server that is not a relay: for each payload (hex), accepts one
# connection, sends the payload and reports how the client ended it; then
# accepts once more (the client came back) and exits.
HOSTILE_SERVER = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(4)
srv.settimeout(20)
print("ready", flush=True)
for payload in sys.argv[3:]:
    conn, _ = srv.accept()
    conn.settimeout(10)
    conn.sendall(bytes.fromhex(payload))
    try:
        while conn.recv(65536):   # whatever the client sends, until it closes
            pass
        print("closed", flush=True)
    except ConnectionResetError:
        print("reset", flush=True)
    except socket.timeout:
        print("timeout", flush=True)
    conn.close()
conn, _ = srv.accept()
print("back", flush=True)
conn.close()
"""


@pytest.mark.root
def test_relay_client_closes_bad_len16_and_reconnects(bed, make_pair):
    """A hostile server (relay a replaced by a script on its address) sends
    the relay client a good frame, then a len16 length of zero, or over the
    maximum: each time the client writes the good packet, closes the
    connection, counts bad_frame, and reconnects.  Then the real server is
    back and the tunnel works."""
    pair = make_pair(protocol="tcp")
    pair.start()
    assert_ping(bed, bed.ns_b, TUNNEL_A)
    assert pair.stop("a") == 0, pair.log("a")
    before = pair.stats("b")
    good = len16_encode(ipv4_udp(TUNNEL_A, TUNNEL_B, b"hello"))
    payloads = [good + b"\x00\x00" + good,                               # zero
                good + (MTU + 1).to_bytes(2, "big") + bytes(MTU + 1),     # one over the maximum
                b"\xff\xff" + bytes(64)]                                  # the largest
    server = bed.popen(bed.ns_a, [sys.executable, "-c", HOSTILE_SERVER, bed.addr_a, str(PORT),
                                  *[p.hex() for p in payloads]],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready", server.stderr.read()
        out, err = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    verdicts = out.split()
    assert len(verdicts) == len(payloads) + 1 and verdicts[-1] == "back", out + err
    assert set(verdicts[:-1]) <= {"closed", "reset"}, out   # the client hung up every time
    wait_for(lambda: pair.stats("b")["ingress"]["drops"]["bad_frame"]
             == before["ingress"]["drops"]["bad_frame"] + len(payloads), 5, "the bad frames counted")
    # The server sees the last connection ("back") a moment before the
    # client's supervisor counts it.
    wait_for(lambda: pair.stats("b")["connections"] - before["connections"] >= len(payloads) + 1,
             5, "every connection counted")
    after = pair.stats("b")
    assert after["ingress"]["packets"] - before["ingress"]["packets"] == 2   # the good ones
    assert pair.log("b").count("connection lost (ingress protocol error)") == len(payloads)
    assert_alive(pair, "b")

    pair.start_side("a", wait=False)
    pair.wait_ready("a", "b")
    assert_ping(bed, bed.ns_b, TUNNEL_A)
    assert_ping(bed, bed.ns_a, TUNNEL_B)
    for name in ("a", "b"):
        assert pair.stop(name) == 0, pair.log(name)


# Sends TCP segments (hex) from the relay's own address and port, as relay
# b would: the datagrams are the peer's, their content forged.
DATAGRAMS = r"""
import socket, sys
bind_host, bind_port, host, port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((bind_host, bind_port))
for payload in sys.argv[5:]:
    sock.sendto(bytes.fromhex(payload), (host, port))
"""


@pytest.mark.root
def test_forged_checksums_reach_the_kernel_alone(bed, make_pair):
    """Through a real offloading relay: forged TCP segments from the peer's
    address, among valid ones of the same flow.  The kernel of ns a counts
    exactly one checksum error per forged segment (had one been coalesced
    into a CHECKSUM_PARTIAL super-packet, it would have been trusted)."""
    pair = make_pair(overrides_a={"relay": ['offload = true']})
    pair.start()
    assert_ping(bed, bed.ns_a, TUNNEL_B)
    assert pair.stats("a")["offload"]["vnet_hdr"]
    assert pair.stop("b") == 0, pair.log("b")      # its address and port are ours now
    # Addressed into the tunnel: to ns a (port 5201 closed).
    flow = TcpFlow(4, src=TUNNEL_B, dst=TUNNEL_A)
    sent = (flow.run(3, 1000) + [flow.segment(1000, csum_delta=0x0100)] + flow.run(2, 1000)
            + [flow.segment(1000, zero_csum=True), flow.segment(1000, alter_payload=True)]
            + flow.run(3, 1000))
    forged = sum(not l4_valid(p) for p in sent)
    before = pair.stats("a")
    errors_before = nstat(bed, bed.ns_a, "TcpInCsumErrors")
    python(bed, bed.ns_b, DATAGRAMS, bed.addr_b, str(PORT), bed.addr_a, str(PORT), *[p.hex() for p in sent])
    wait_for(lambda: pair.stats("a")["ingress"]["packets"] >= before["ingress"]["packets"] + len(sent),
             5, "the segments written")
    wait_for(lambda: nstat(bed, bed.ns_a, "TcpInCsumErrors") >= errors_before + forged, 5,
             "the kernel to reject the forged segments")
    time.sleep(0.2)
    assert nstat(bed, bed.ns_a, "TcpInCsumErrors") == errors_before + forged
    assert drops(pair.stats("a")) == drops(before)
    pair.start_side("b")
    assert_ping(bed, bed.ns_a, TUNNEL_B)
    for name in ("a", "b"):
        assert pair.stop(name) == 0, pair.log(name)
