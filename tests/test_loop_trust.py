"""Loop-level findings of the trust review (issue 7), against both pumps
where both have the feature.

- A stop while the TCP socket is full must not leave half a len16 record on
  the wire: the pump restarted on the same connection finishes it first.
- An offload TUN read longer than a vnet header plus the largest IP packet
  is dropped as oversize, never segmented.
- A scoped IPv6 peer (link-local) keeps its scope.

Every wait has a deadline; the rig stops the pumps before it closes fds.
"""

from __future__ import annotations

import socket
import struct

import pytest
from pumprig import WAIT, Rig, drops, recv_exactly, wait_for

from conftest import ip_packet, ipv4_packet, load_fastpath

MTU = 1400
LEN16 = struct.Struct("!H")


@pytest.fixture
def rig(pump_class):
    # A roomy TUN stand-in: the test writes all its packets before the pump
    # has sent them (the kernel caps the size at twice wmem_max unprivileged,
    # still ample).
    rig = Rig(pump_class, mtu=MTU, tun_buffer=1 << 20)
    yield rig
    rig.close()


def parse_records(data: bytes) -> tuple[list[bytes], bytes]:
    """Whole len16 records and what is left over."""
    out, offset = [], 0
    while len(data) - offset >= 2:
        (length,) = LEN16.unpack_from(data, offset)
        if len(data) - offset - 2 < length:
            break
        out.append(data[offset + 2:offset + 2 + length])
        offset += 2 + length
    return out, data[offset:]


def small_buffered_tcp_pump(rig):
    """A running TCP pump whose connection holds little (4 KiB buffers each
    way), so a few packets fill it: (test end of the connection, test end
    of the TUN stand-in, the pump's end of it, the pump)."""
    # Sized before the connection exists (the accepted socket inherits the
    # listener's), so the window never grows past them.
    with socket.socket() as listener:
        for sock in (listener, test_end := rig.keep(socket.socket())):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(5)
        test_end.settimeout(5)
        test_end.connect(listener.getsockname())
        pump_end = rig.keep(listener.accept()[0])
    pump_end.setblocking(True)
    tun, tun_pump = rig.tun()
    pump = rig.pump(tun_pump, pump_end)
    pump.start()
    return test_end, tun, tun_pump, pump


def test_a_stop_with_the_socket_full_never_leaves_half_a_record(rig):
    """The peer stops reading; the pump fills the socket and blocks in the
    middle of a record; stop().  Restarted on the same connection, it first
    sends the rest of that record: the peer reads a stream of whole,
    byte-exact records, each packet once, and the packets read but not
    begun are counted as "stopped"."""
    test_end, tun, tun_pump, pump = small_buffered_tcp_pump(rig)
    packets = [ip_packet(MTU - (i % 7) * 97, i) for i in range(50)]
    for packet in packets:
        tun.send(packet)   # 65 KB: fits the stand-in (1 MiB asked), not the small TCP buffers
    # The peer does not read: the pump ends up waiting for POLLOUT, with
    # part of some record written.
    wait_for(lambda: pump.stats()["egress"]["bytes"] > 0 and
             pump.stats()["egress"]["packets"] < len(packets),
             "the socket to fill", lambda: pump.stats()["egress"])
    before = pump.stats()["egress"]
    assert pump.stop(WAIT) is not None
    stopped = drops(pump, "egress").get("stopped", 0)
    # Every packet is accounted for once: sent, or dropped as stopped, or
    # still in the TUN stand-in (read after the restart), or the one cut.
    pump.start()
    test_end.settimeout(2.0)
    data = bytearray()
    while True:
        try:
            chunk = test_end.recv(1 << 16)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    records, rest = parse_records(bytes(data))
    assert rest == b"", f"{len(rest)} bytes of a cut record at the end of the stream"
    assert all(r in packets for r in records), "a record that is not one of the packets: desync"
    seen = [packets.index(r) for r in records]
    assert seen == sorted(seen) and len(set(seen)) == len(seen), "order or duplicates"
    after = pump.stats()["egress"]
    assert after["packets"] == len(records)
    assert len(records) + drops(pump, "egress").get("stopped", 0) == len(packets)
    assert before["packets"] <= len(records)   # (equal when the stop fell between records)
    assert stopped <= drops(pump, "egress").get("stopped", 0)


def test_attach_forgets_the_old_connection_s_half_record(rig):
    """A half record belongs to its connection: after attach() to a new
    one, the new stream starts on a record boundary."""
    test_end, tun, tun_pump, pump = small_buffered_tcp_pump(rig)
    for i in range(50):
        tun.send(ip_packet(MTU, i))
    wait_for(lambda: pump.stats()["egress"]["bytes"] > 0 and
             pump.stats()["egress"]["packets"] < 50, "the socket to fill")
    assert pump.stop(WAIT) is not None
    # The stand-in still holds packets the pump has not read: read them
    # away (from the pump's end), so the next one the pump reads is ours.
    tun_pump.setblocking(False)
    try:
        while tun_pump.recv(1 << 17):
            pass
    except BlockingIOError:
        pass
    new_test, new_pump = rig.tcp()
    pump.attach(new_pump)
    pump.start()
    packet = ipv4_packet(100, 7)
    tun.send(packet)
    new_test.settimeout(5)
    (length,) = LEN16.unpack(recv_exactly(new_test, 2))
    assert length == len(packet), f"the new stream starts off a record boundary ({length})"
    assert recv_exactly(new_test, length) == packet


def test_offload_read_longer_than_any_ip_packet_is_dropped():
    """A TUN stand-in that returns more than a vnet header plus 65,535
    bytes: dropped as oversize, nothing sent."""
    Pump = load_fastpath().Pump
    rig = Rig(Pump, mtu=MTU, tun_buffer=1 << 20)
    try:
        tun, tun_pump = rig.tun()
        peer = rig.udp()
        sock = rig.udp(timeout=None)
        pump = rig.pump(tun_pump, sock, peer=peer.getsockname(), offload=True)
        pump.start()
        too_long = bytes(10) + ipv4_packet(1000, 1) + bytes(65535)
        tun.send(too_long)
        tun.send(bytes(10) + ipv4_packet(1000, 2))   # a good one after it passes
        assert peer.recv(1 << 17) == ipv4_packet(1000, 2)
        wait_for(lambda: drops(pump, "egress").get("oversize") == 1, "the oversize drop",
                 lambda: drops(pump, "egress"))
    finally:
        rig.close()


def test_a_scoped_ipv6_peer_keeps_its_scope(rig):
    """("fe80::1%lo", port) or (host, port, 0, scope): the pump sends with
    that scope id and reports it; a sender on another scope is not the peer."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    sock = rig.udp(socket.AF_INET6, timeout=None)
    tun, tun_pump = rig.tun()
    lo = socket.if_nametoindex("lo")
    pump = rig.pump(tun_pump, sock, peer=("fe80::1%lo", 5555))
    assert pump.peer == ("fe80::1", 5555, 0, lo)
    _, tun_other = rig.tun()
    other = rig.pump(tun_other, rig.udp(socket.AF_INET6, timeout=None),
                     peer=("fe80::1", 5555, 0, lo))
    assert other.peer == ("fe80::1", 5555, 0, lo)
