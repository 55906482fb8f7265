"""Both pumps, end to end, without root.

The TUN fd is one end of a SOCK_SEQPACKET socketpair (it keeps packet
boundaries); the network side is a loopback UDP socket pair (IPv4 and IPv6)
or a TCP connection on 127.0.0.1.  Every test runs against the compiled
pump and the pure-Python twin (the ``pump_class`` fixture).

Nothing here can hang: test-side sockets have timeouts, every wait for a
counter has a deadline, and the ``rig`` fixture stops every pump before it
closes a single fd.  The only timing asserted is the generous bound on
stop().
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from pumprig import (
    TIMEOUT,
    WAIT,
    Rig,
    assert_quiet,
    counted,
    drops,
    errors,
    recv_exactly,
    recv_n,
    wait_for,
)

from conftest import (
    PUMP_KINDS,
    ethernet_frame,
    ip_packet,
    ipv4_packet,
    ipv6_packet,
    load_pump_class,
)
from tunrelay.framing import len16_encode

MTU = 1400
STOP_BOUND = 2.0    # stop() must return within this, idle or busy
BIG_DATAGRAM = 65507  # the largest UDP payload over IPv4: "64 KiB"

FAMILIES = [pytest.param(socket.AF_INET, id="ipv4"),
            pytest.param(socket.AF_INET6, id="ipv6")]
#: Counters that depend on how a pump batches, not on what it moved.
MECHANICS = ("batches", "syscalls", "wakeups")


def is_compiled(pump_class) -> bool:
    from tunrelay._fastpath import Pump
    return issubclass(pump_class, Pump)


@pytest.fixture
def rig(pump_class):
    rig = Rig(pump_class, mtu=MTU)
    yield rig
    rig.close()


# ---------------------------------------------------------------- helpers

def wait_drops(pump, direction: str, expected: dict) -> None:
    wait_for(lambda: drops(pump, direction) == expected, f"{direction} drops {expected}",
             lambda: drops(pump, direction))




def wait_counted(pump, direction: str, n: int) -> None:
    wait_for(lambda: counted(pump, direction) >= n, f"{n} {direction} packets counted",
             lambda: pump.stats()[direction])












def queue(tun: socket.socket, packets) -> None:
    """Write packets into the stand-in without waiting for POLLOUT (a unix
    socket polls writable only below a quarter of its buffer, while send
    goes on to the whole of it): packets queued before start()."""
    for packet in packets:
        os.write(tun.fileno(), packet)


def in_thread(function, *args):
    """Run function in a daemon-like worker; returns its Future."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(function, *args)
    pool.shutdown(wait=False)
    return future


def frames_of(packets) -> bytes:
    return b"".join(len16_encode(p) for p in packets)


def parse_len16(stream: bytes) -> list[bytes]:
    frames, offset = [], 0
    while offset < len(stream):
        length = int.from_bytes(stream[offset:offset + 2], "big")
        frames.append(stream[offset + 2:offset + 2 + length])
        offset += 2 + length
    assert offset == len(stream), "the stream ends inside a frame"
    return frames


def mixed_sizes(n: int, low: int = 20, high: int = MTU) -> list[int]:
    """n sizes spread over low..high, both ends included."""
    return [low, high] + [low + (i * 397) % (high - low + 1) for i in range(n - 2)]


def udp_rig(rig, family=socket.AF_INET, **options):
    """tun test end, peer socket, the pump's socket and the pump (not started),
    the peer given explicitly."""
    tun, tun_end = rig.tun()
    peer = rig.udp(family)
    sock = rig.udp(family, timeout=None)
    pump = rig.pump(tun_end, sock, peer=peer.getsockname()[:2], **options)
    return tun, peer, sock, pump


def bad_ip_packets() -> dict[str, list[bytes]]:
    """Datagrams the ingress check must drop, by reason (TUN, mtu=MTU)."""
    wrong_total = bytearray(ipv4_packet(100))
    wrong_total[2:4] = (99).to_bytes(2, "big")
    short_ihl = bytearray(ipv4_packet(100))
    short_ihl[0] = 0x44
    wrong_payload = bytearray(ipv6_packet(100))
    wrong_payload[4:6] = (61).to_bytes(2, "big")
    return {
        "empty": [b""],
        "truncated": [b"\x45" + bytes(10), b"\x60" + bytes(38)],
        "bad_version": [bytes(60), b"\x50" + bytes(59), b"\xf0" + bytes(40)],
        "bad_length": [bytes(wrong_total), bytes(short_ihl), bytes(wrong_payload)],
        "oversize": [ipv4_packet(MTU + 1), b"\x45" + bytes(BIG_DATAGRAM - 1)],
    }


# ---------------------------------------------------------------- UDP raw

@pytest.mark.parametrize("family", FAMILIES)
def test_udp_egress_raw(rig, pump_class, family):
    tun, peer, _, pump = udp_rig(rig, family)
    burst = [ip_packet(size, i) for i, size in enumerate(mixed_sizes(50))]
    queue(tun, burst)             # before start: one wake-up finds them all
    pump.start()
    assert recv_n(peer, len(burst)) == burst
    wait_for(lambda: pump.stats()["egress"]["packets"] == len(burst), "the burst counted")
    egress = pump.stats()["egress"]
    assert egress["bytes"] == sum(map(len, burst))
    if is_compiled(pump_class):
        assert 1 <= egress["batches"] < egress["packets"], egress
    else:
        assert egress["batches"] == egress["packets"], egress

    sent = list(burst)
    for round_ in range(5):       # steady traffic, written while running
        packets = [ip_packet(size, 1000 * round_ + i)
                   for i, size in enumerate(mixed_sizes(40, 20 + round_))]
        for packet in packets:
            tun.send(packet)
        assert recv_n(peer, len(packets)) == packets
        sent += packets
    tun.send(ipv4_packet(MTU + 1))  # longer than the MTU: dropped, not sent
    last = ipv6_packet(MTU, 99)
    tun.send(last)
    assert peer.recv(1 << 17) == last
    sent.append(last)
    wait_for(lambda: counted(pump, "egress") == len(sent) + 1, "all egress counted")
    assert_quiet(peer)

    egress = pump.stats()["egress"]
    assert (egress["packets"], egress["bytes"]) == (len(sent), sum(map(len, sent)))
    assert drops(pump, "egress") == {"oversize": 1}
    assert errors(pump, "egress") == {}
    assert egress["last_errno"] == 0
    assert pump.stats()["ingress"]["packets"] == 0
    assert pump.stop(WAIT).reason == "stopped"


@pytest.mark.parametrize("family", FAMILIES)
def test_udp_ingress_raw(rig, family):
    tun, peer, sock, pump = udp_rig(rig, family)
    stranger = rig.udp(family)
    address = sock.getsockname()
    pump.start()

    good = [ip_packet(size, i) for i, size in enumerate([20, 40, 41, 576, MTU - 1, MTU])]
    for packet in good:
        peer.sendto(packet, address)
    assert recv_n(tun, len(good)) == good

    stranger.sendto(ipv4_packet(100, 7), address)
    bad = bad_ip_packets()
    for datagrams in bad.values():
        for datagram in datagrams:
            peer.sendto(datagram, address)
    sentinel = ipv6_packet(80, 12345)   # the pump is still running after all that
    peer.sendto(sentinel, address)
    assert tun.recv(1 << 17) == sentinel

    expected = {reason: len(datagrams) for reason, datagrams in bad.items()}
    expected["not_peer"] = 1
    wait_drops(pump, "ingress", expected)
    assert_quiet(tun)
    ingress = pump.stats()["ingress"]
    assert ingress["packets"] == len(good) + 1
    assert ingress["bytes"] == sum(map(len, good)) + len(sentinel)
    assert errors(pump, "ingress") == {}
    assert pump.running
    assert pump.stats()["egress"]["packets"] == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_peer_learning(rig, family):
    tun, tun_end = rig.tun()
    peer, stranger = rig.udp(family), rig.udp(family)
    sock = rig.udp(family, timeout=None)
    address = sock.getsockname()
    pump = rig.pump(tun_end, sock)
    assert pump.learns_peer
    assert pump.peer is None
    pump.start()

    for i in range(3):            # nobody to send to yet
        tun.send(ip_packet(60, i))
    wait_drops(pump, "egress", {"no_peer": 3})

    peer.sendto(bytes(40), address)   # invalid: must not choose the peer
    wait_drops(pump, "ingress", {"bad_version": 1})
    assert pump.peer is None
    tun.send(ip_packet(60, 3))
    wait_drops(pump, "egress", {"no_peer": 4})

    first = ip_packet(100, 10)
    peer.sendto(first, address)
    assert tun.recv(1 << 17) == first
    assert pump.peer == peer.getsockname()[:2]

    later = [ip_packet(size, 20 + i) for i, size in enumerate(mixed_sizes(10))]
    for packet in later:
        tun.send(packet)
    assert recv_n(peer, len(later)) == later   # the dropped early ones never came

    stranger.sendto(ip_packet(100, 30), address)
    sentinel = ip_packet(100, 31)
    peer.sendto(sentinel, address)
    assert tun.recv(1 << 17) == sentinel
    wait_drops(pump, "ingress", {"bad_version": 1, "not_peer": 1})
    assert pump.peer == peer.getsockname()[:2]
    assert_quiet(tun)
    assert_quiet(peer)
    assert_quiet(stranger)
    wait_for(lambda: pump.stats()["egress"]["packets"] == len(later), "egress counted")
    assert pump.stats()["ingress"]["packets"] == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_connected_udp(rig, family):
    tun, tun_end = rig.tun()
    peer, stranger = rig.udp(family), rig.udp(family)
    sock = rig.udp(family, timeout=None)
    sock.connect(peer.getsockname())
    peer.connect(sock.getsockname())
    pump = rig.pump(tun_end, sock)
    assert not pump.learns_peer
    assert pump.peer is None
    pump.start()

    out = [ip_packet(size, i) for i, size in enumerate(mixed_sizes(20))]
    for packet in out:
        tun.send(packet)
    assert recv_n(peer, len(out)) == out
    back = [ip_packet(size, 100 + i) for i, size in enumerate(mixed_sizes(20, 40))]
    stranger.sendto(ip_packet(100), sock.getsockname())   # the kernel filters it
    for packet in back:
        peer.send(packet)
    assert recv_n(tun, len(back)) == back
    wait_for(lambda: pump.stats()["egress"]["packets"] == len(out), "egress counted")
    wait_for(lambda: pump.stats()["ingress"]["packets"] == len(back), "ingress counted")
    assert_quiet(tun)
    assert pump.stats()["egress"]["bytes"] == sum(map(len, out))
    assert pump.stats()["ingress"]["bytes"] == sum(map(len, back))
    assert drops(pump, "egress") == drops(pump, "ingress") == {}


# ---------------------------------------------------------------- TAP

def test_tap_frame_sizes(rig):
    tun, peer, sock, pump = udp_rig(rig, mode="tap")
    longest = MTU + 18              # Ethernet header + one VLAN tag
    address = sock.getsockname()
    pump.start()

    good = [ethernet_frame(14, 1), ethernet_frame(60, 2), ethernet_frame(longest, 3)]
    for frame in good + [ethernet_frame(longest + 1), bytes(10)]:
        peer.sendto(frame, address)
    sentinel = ethernet_frame(100, 4)
    peer.sendto(sentinel, address)
    assert recv_n(tun, len(good) + 1) == good + [sentinel]
    wait_drops(pump, "ingress", {"oversize": 1, "truncated": 1})
    assert_quiet(tun)

    out = [ethernet_frame(longest, 5), ethernet_frame(longest + 1, 6), ethernet_frame(64, 7)]
    for frame in out:
        tun.send(frame)
    assert recv_n(peer, 2) == [out[0], out[2]]
    wait_for(lambda: counted(pump, "egress") == 3, "egress counted")
    assert drops(pump, "egress") == {"oversize": 1}
    assert pump.stats()["egress"]["bytes"] == longest + 64


# ---------------------------------------------------------------- TCP len16

def test_tcp_egress_len16_byte_exact(rig):
    tun, tun_end = rig.tun()
    peer, sock = rig.tcp()
    pump = rig.pump(tun_end, sock)
    assert pump.framing == "len16"
    pump.start()

    packets = [ip_packet(size, i) for i, size in enumerate(mixed_sizes(400))]
    writer = in_thread(lambda: [tun.send(p) for p in packets])
    stream = recv_exactly(peer, sum(2 + len(p) for p in packets))
    writer.result(TIMEOUT)
    assert stream == frames_of(packets)
    assert parse_len16(stream) == packets
    wait_for(lambda: pump.stats()["egress"]["packets"] == len(packets), "egress counted")
    assert pump.stats()["egress"]["bytes"] == sum(map(len, packets))
    assert drops(pump, "egress") == {}
    assert_quiet(peer)


def test_tcp_egress_partial_writes(rig):
    """A send buffer smaller than a frame: sends come back short and the
    pump must resume each frame where the kernel stopped."""
    mtu = 9000
    tun, tun_end = rig.tun()
    peer, sock = rig.tcp()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    pump = rig.pump(tun_end, sock, mtu=mtu)
    pump.start()

    packets = [ip_packet(size, i) for i, size in enumerate(mixed_sizes(200, 20, mtu))]
    writer = in_thread(lambda: [tun.send(p) for p in packets])
    expected = frames_of(packets)
    stream = bytearray()
    while len(stream) < len(expected):
        chunk = peer.recv(1000)
        assert chunk, "the pump closed the connection"
        stream += chunk
    writer.result(TIMEOUT)
    assert stream == expected
    wait_for(lambda: pump.stats()["egress"]["packets"] == len(packets), "egress counted")
    assert pump.stats()["egress"]["bytes"] == sum(map(len, packets))
    assert drops(pump, "egress") == errors(pump, "egress") == {}


def test_tcp_ingress_len16_awkward_chunks(rig):
    tun, tun_end = rig.tun()
    peer, sock = rig.tcp()
    pump = rig.pump(tun_end, sock)
    pump.start()

    packets = [ip_packet(size, i) for i, size in enumerate(mixed_sizes(120))]
    stream = frames_of(packets)

    def send_awkwardly():
        pattern = (1, 3, 1000, 1, 2, 3, 1000, 7)
        offset = step = 0
        while offset < len(stream):
            size = pattern[step % len(pattern)]
            peer.sendall(stream[offset:offset + size])
            offset += size
            step += 1
            if step % 4 == 0:
                time.sleep(0.001)   # let the pump see the pieces one by one

    sender = in_thread(send_awkwardly)
    assert recv_n(tun, len(packets)) == packets
    sender.result(TIMEOUT)
    wait_for(lambda: pump.stats()["ingress"]["packets"] == len(packets), "ingress counted")
    assert pump.stats()["ingress"]["bytes"] == sum(map(len, packets))
    assert drops(pump, "ingress") == {}
    assert pump.running
    assert_quiet(tun)


@pytest.mark.parametrize("header", [0, MTU + 1, 0xFFFF], ids=["zero", "mtu+1", "max"])
def test_tcp_bad_length_is_protocol_error(rig, header):
    tun, tun_end = rig.tun()
    peer, sock = rig.tcp()
    pump = rig.pump(tun_end, sock)
    pump.start()

    before = [ip_packet(100, 1), ip_packet(MTU, 2), ip_packet(40, 3)]
    peer.sendall(frames_of(before[:1]))
    assert tun.recv(1 << 17) == before[0]     # an earlier read, then one with the bad header
    peer.sendall(frames_of(before[1:]) + header.to_bytes(2, "big") + b"junk"
                 + frames_of([ip_packet(60, 4)]))
    outcome = pump.wait(WAIT)
    assert outcome is not None and outcome.reason == "protocol_error", outcome
    assert outcome.restartable            # a new connection may carry on
    assert recv_n(tun, 2) == before[1:]
    assert_quiet(tun)
    assert not pump.running
    ingress = pump.stats()["ingress"]
    assert ingress["packets"] == len(before)
    assert drops(pump, "ingress") == {"bad_frame": 1}
    assert errors(pump, "ingress") == {"disconnect": 1}


def test_tcp_peer_close_then_attach(rig):
    tun, tun_end = rig.tun()
    peer, sock = rig.tcp()
    pump = rig.pump(tun_end, sock)
    pump.start()

    out, back = ip_packet(200, 1), ip_packet(300, 2)
    tun.send(out)
    assert recv_exactly(peer, 2 + len(out)) == len16_encode(out)
    peer.sendall(len16_encode(back))
    assert tun.recv(1 << 17) == back

    peer.sendall(len16_encode(ip_packet(300, 3))[:100])   # cut short: must not leak
    peer.close()
    outcome = pump.wait(WAIT)
    assert outcome is not None, "the pump did not notice the peer closing"
    assert (outcome.reason, outcome.direction) == ("closed", "ingress")
    assert outcome.restartable
    assert not pump.running
    assert errors(pump, "ingress") == {"disconnect": 1}

    peer, new_sock = rig.tcp()
    pump.attach(new_sock)
    pump.start()
    outs = [ip_packet(size, 10 + i) for i, size in enumerate(mixed_sizes(5))]
    for packet in outs:
        tun.send(packet)
    assert recv_exactly(peer, len(frames_of(outs))) == frames_of(outs)
    backs = [ip_packet(size, 20 + i) for i, size in enumerate(mixed_sizes(5, 40))]
    peer.sendall(frames_of(backs))
    assert recv_n(tun, len(backs)) == backs

    wait_for(lambda: pump.stats()["egress"]["packets"] == 1 + len(outs), "egress counted")
    wait_for(lambda: pump.stats()["ingress"]["packets"] == 1 + len(backs), "ingress counted")
    stats = pump.stats()
    assert stats["egress"]["bytes"] == len(out) + sum(map(len, outs))
    assert stats["ingress"]["bytes"] == len(back) + sum(map(len, backs))
    assert errors(pump, "ingress") == {"disconnect": 1}
    assert pump.stop(WAIT).reason == "stopped"


def test_len16_over_udp(rig):
    tun, peer, sock, pump = udp_rig(rig, framing="len16")
    address = sock.getsockname()
    pump.start()

    good = ip_packet(100, 1)
    peer.sendto(len16_encode(good), address)
    assert tun.recv(1 << 17) == good

    lies = [
        (99).to_bytes(2, "big") + good,      # says shorter
        (101).to_bytes(2, "big") + good,     # says longer
        b"\x00\x00" + good,                  # says zero
        b"\x00\x00",                         # header only
        b"\x01",                             # half a header
        b"",
    ]
    for datagram in lies:
        peer.sendto(datagram, address)
    peer.sendto(len16_encode(bytes(40)), address)   # a true frame of a bad packet
    # Longer than header + MTU: oversize, whatever the header says.
    too_long = [len16_encode(ipv4_packet(MTU + 1)), b"\x00\x00" + bytes(MTU + 1),
                b"\x00\x00" + bytes(MTU + 2), len16_encode(ipv4_packet(3000))]
    for datagram in too_long:
        peer.sendto(datagram, address)
    sentinel = ip_packet(MTU, 2)
    peer.sendto(len16_encode(sentinel), address)
    assert tun.recv(1 << 17) == sentinel
    expected = {"bad_frame": len(lies), "bad_version": 1, "oversize": len(too_long)}
    wait_drops(pump, "ingress", expected)
    assert_quiet(tun)
    assert pump.stats()["ingress"]["bytes"] == len(good) + len(sentinel)

    out = ip_packet(500, 3)
    tun.send(out)
    assert peer.recv(1 << 17) == len16_encode(out)
    wait_for(lambda: pump.stats()["egress"]["packets"] == 1, "egress counted")
    assert pump.stats()["egress"]["bytes"] == len(out)   # the header is not counted


# ---------------------------------------------------------------- batching, arguments, errors

@pytest.mark.parametrize("batch", [1, 7, 64])
def test_egress_batching(rig, pump_class, batch):
    tun, peer, _, pump = udp_rig(rig, batch=batch)
    burst = [ip_packet(size, i) for i, size in enumerate(mixed_sizes(50))]
    queue(tun, burst)             # all there before the first wake-up
    pump.start()
    assert recv_n(peer, len(burst)) == burst
    wait_for(lambda: pump.stats()["egress"]["packets"] == len(burst), "the burst counted")
    batches = pump.stats()["egress"]["batches"]
    if is_compiled(pump_class):   # one sendmmsg per full read batch (either engine)
        assert batches == -(-len(burst) // batch)
    else:
        assert batches == len(burst)


def test_bad_arguments(rig, pump_class):
    tun, tun_end = rig.tun()
    udp = rig.udp(timeout=None)
    _, tcp = rig.tcp()
    for options in ({"mode": "tup"}, {"mtu": 67}, {"mtu": 65536}, {"batch": 0},
                    {"batch": 1025}, {"framing": "aead-ish"}, {"peer": ("127.0.0.1", 0)}):
        with pytest.raises(ValueError):
            pump_class(tun_end, udp, **options)
    with pytest.raises(ValueError):           # raw has no boundaries on a stream
        pump_class(tun_end, tcp, framing="raw")
    with pytest.raises(ValueError):           # a TCP socket is already connected
        pump_class(tun_end, tcp, peer=("127.0.0.1", 9))
    pump = rig.pump(tun_end, udp, peer=("127.0.0.1", 9))
    pump.start()
    with pytest.raises(RuntimeError):
        pump.attach(rig.udp(timeout=None))
    assert pump.running


def test_refused_datagrams_are_counted_not_fatal(rig):
    """ICMP port unreachable comes back as ECONNREFUSED on the next send or
    receive: counted as an error, the pump goes on."""
    tun, tun_end = rig.tun()
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    nobody = closed.getsockname()
    closed.close()
    sock = rig.udp(timeout=None)
    sock.connect(nobody)
    pump = rig.pump(tun_end, sock)
    pump.start()
    for i in range(5):
        tun.send(ip_packet(100, i))
        wait_counted(pump, "egress", i + 1)
    wait_for(lambda: errors(pump, "egress") or errors(pump, "ingress"), "an error counted")
    assert pump.running
    stats = pump.stats()
    egress = stats["egress"]
    assert egress["packets"] + egress["drops"]["send_error"] == 5
    assert egress["drops"]["send_error"] == egress["errors"]["write"]
    for direction in ("egress", "ingress"):
        if any(stats[direction]["errors"].values()):
            assert stats[direction]["last_errno"] == errno.ECONNREFUSED


def test_ipv4_peer_on_dual_stack_socket(rig):
    tun, tun_end = rig.tun()
    peer = rig.udp(socket.AF_INET)
    sock = rig.keep(socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", 0))
    port = peer.getsockname()[1]
    pump = rig.pump(tun_end, sock, peer=("127.0.0.1", port))
    assert pump.peer == ("::ffff:127.0.0.1", port)   # as the kernel reports it
    pump.start()
    back = ip_packet(100, 1)
    peer.sendto(back, ("127.0.0.1", sock.getsockname()[1]))
    assert tun.recv(1 << 17) == back
    out = ip_packet(200, 2)
    tun.send(out)
    assert peer.recv(1 << 17) == out
    assert drops(pump, "ingress") == {}


# ---------------------------------------------------------------- stop / start

def timed_stop(pump):
    started = time.monotonic()
    outcome = pump.stop(WAIT)
    elapsed = time.monotonic() - started
    assert outcome is not None, "stop() did not return"
    assert elapsed < STOP_BOUND, f"stop() took {elapsed:.2f} s"
    assert not pump.running
    return outcome


def test_stop_idle(rig):
    _, _, _, pump = udp_rig(rig)
    pump.start()
    time.sleep(0.1)               # both loops blocked in their wait
    assert pump.running
    assert timed_stop(pump).reason == "stopped"


def test_stop_while_traffic_flows(rig):
    tun, peer, sock, pump = udp_rig(rig)
    address = sock.getsockname()
    done = threading.Event()

    def forever(step):
        while not done.is_set():
            try:
                step()
            except OSError:       # a timeout once the pump has stopped
                pass

    packet = ip_packet(500)
    tun.settimeout(0.2)
    peer.settimeout(0.2)
    workers = [in_thread(forever, lambda: tun.send(packet)),
               in_thread(forever, lambda: tun.recv(1 << 17)),
               in_thread(forever, lambda: peer.sendto(packet, address)),
               in_thread(forever, lambda: peer.recv(1 << 17))]
    try:
        pump.start()
        wait_for(lambda: counted(pump, "egress") > 200 and counted(pump, "ingress") > 200,
                 "traffic both ways")
        assert timed_stop(pump).reason == "stopped"
    finally:
        done.set()
        for worker in workers:
            worker.result(WAIT)


@pytest.mark.parametrize("blocked", ["tcp-peer-not-reading", "tun-not-read"])
def test_stop_while_output_blocked(rig, blocked):
    """A pump waiting for room on a full socket or device still stops."""
    tun, tun_end = rig.tun()
    packet = ip_packet(MTU)
    if blocked == "tcp-peer-not-reading":
        peer, sock = rig.tcp()
        pump = rig.pump(tun_end, sock)
        pump.start()
        tun.settimeout(0.2)

        def fill():               # until the stand-in is full: the pump is stuck
            while True:
                tun.send(packet)
        filler = in_thread(fill)
        with pytest.raises(OSError):
            filler.result(WAIT)
    else:
        peer = rig.udp()
        sock = rig.udp(timeout=None)
        pump = rig.pump(tun_end, sock, peer=peer.getsockname()[:2])
        pump.start()
        for _ in range(2000):     # ~2.8 MB: far more than the stand-in holds
            peer.sendto(packet, sock.getsockname())
        last = [-1]

        def settled():
            now = pump.stats()["ingress"]["packets"]
            settled_now, last[0] = now == last[0], now
            time.sleep(0.05)
            return settled_now
        wait_for(settled, "the ingress loop to stall")
        assert pump.stats()["ingress"]["packets"] < 2000
    assert timed_stop(pump).reason == "stopped"


def test_restart_after_stop(rig):
    tun, peer, sock, pump = udp_rig(rig)
    address = sock.getsockname()
    for round_ in range(3):
        pump.start()
        out, back = ip_packet(100, round_), ip_packet(200, round_)
        tun.send(out)
        assert peer.recv(1 << 17) == out
        peer.sendto(back, address)
        assert tun.recv(1 << 17) == back
        wait_for(lambda: pump.stats()["egress"]["packets"] == round_ + 1, "egress counted")  # noqa: B023 (called within the iteration)
        assert timed_stop(pump).reason == "stopped"
    stats = pump.stats()
    assert stats["egress"]["packets"] == stats["ingress"]["packets"] == 3


def test_stop_never_started(rig):
    tun, peer, sock, pump = udp_rig(rig)
    assert not pump.running
    outcome = pump.stop(STOP_BOUND)
    assert outcome is not None and outcome.reason == "stopped"
    assert not pump.running
    pump.stop(STOP_BOUND)
    pump.start()                  # the early stop left nothing armed
    packet = ip_packet(100)
    tun.send(packet)
    assert peer.recv(1 << 17) == packet
    assert pump.running


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_tun_eof_is_fatal(rig, transport):
    tun, tun_end = rig.tun()
    if transport == "udp":
        peer = rig.udp()
        pump = rig.pump(tun_end, rig.udp(timeout=None), peer=peer.getsockname()[:2])
    else:
        peer, sock = rig.tcp()
        pump = rig.pump(tun_end, sock)
    pump.start()
    packet = ip_packet(100)
    tun.send(packet)
    assert recv_exactly(peer, len(packet) + (2 if transport == "tcp" else 0))
    tun.close()                   # the "device" goes away
    outcome = pump.wait(WAIT)
    assert outcome is not None, "the pump did not notice the device going away"
    assert (outcome.reason, outcome.direction) == ("fatal", "egress")
    assert not outcome.restartable
    assert not pump.running


# ---------------------------------------------------------------- C == Python

def scripted_udp(rig):
    tun, peer, sock, pump = udp_rig(rig)
    stranger = rig.udp()
    address = sock.getsockname()
    pump.start()
    out = [ip_packet(size, i) for i, size in enumerate(mixed_sizes(30))]
    for packet in out[:15] + [ipv4_packet(MTU + 1)] + out[15:]:
        tun.send(packet)
    assert recv_n(peer, len(out)) == out
    good = [ip_packet(size, 100 + i) for i, size in enumerate(mixed_sizes(20))]
    bad = [d for datagrams in bad_ip_packets().values() for d in datagrams]
    script = good[:10] + bad + good[10:]
    for datagram in script:
        peer.sendto(datagram, address)
    stranger.sendto(good[0], address)
    assert recv_n(tun, len(good)) == good
    wait_counted(pump, "egress", len(out) + 1)
    wait_counted(pump, "ingress", len(script) + 1)
    return pump


def scripted_tcp(rig):
    tun, tun_end = rig.tun()
    peer, sock = rig.tcp()
    pump = rig.pump(tun_end, sock)
    pump.start()
    out = [ip_packet(size, i) for i, size in enumerate(mixed_sizes(30))]
    for packet in out[:10] + [ipv4_packet(MTU + 1)] + out[10:]:
        tun.send(packet)
    assert recv_exactly(peer, len(frames_of(out))) == frames_of(out)
    good = [ip_packet(size, 100 + i) for i, size in enumerate(mixed_sizes(20))]
    bad = [d for reason, datagrams in bad_ip_packets().items()
           if reason not in ("empty", "oversize") for d in datagrams]   # len16 cannot carry those
    peer.sendall(frames_of(good[:10] + bad + good[10:]) + b"\x00\x00")
    assert recv_n(tun, len(good)) == good
    wait_counted(pump, "egress", len(out) + 1)
    outcome = pump.wait(WAIT)
    assert outcome is not None and outcome.reason == "protocol_error"
    return pump


@pytest.mark.parametrize("script", [scripted_udp, scripted_tcp], ids=["udp", "tcp"])
def test_both_pumps_count_alike(script):
    results = {}
    for kind in PUMP_KINDS:
        rig = Rig(load_pump_class(kind))
        try:
            pump = script(rig)
            pump.stop(WAIT)
            results[kind] = {direction: {k: v for k, v in counters.items() if k not in MECHANICS}
                             for direction, counters in pump.stats().items()}
        finally:
            rig.close()
    assert results["c"] == results["python"]
    assert results["c"]["egress"]["drops"]["oversize"] == 1
    assert results["c"]["ingress"]["packets"] == 20


def test_python_pump_close_twice_leaves_other_fds_alone():
    """close() then garbage collection must not close a reused fd number."""
    import gc

    from tunrelay.pypump import PyPump
    app, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    pump = PyPump(tun, sock, peer=("127.0.0.1", 9))
    pump.close()
    reused = os.open("/dev/null", os.O_RDONLY)   # takes a freed number
    try:
        del pump
        gc.collect()
        os.fstat(reused)                         # raises EBADF if closed again
    finally:
        os.close(reused)
        for s in (app, tun, sock):
            s.close()
