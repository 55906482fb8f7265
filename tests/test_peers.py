"""Many peers per pump (PeerTable): routing by inner address, the source
check, endpoints, per-peer counters, sessions (framing "session"), the
control channel, and live changes while the loops run.

Loopback UDP and a socketpair TUN stand-in, no root needed.  The session
framing is checked against an independent ChaCha20-Poly1305 (the
`cryptography` package) built from the wire format the README gives,
which is WireGuard's transport data message.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
import time

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from pumprig import WAIT, Rig, assert_quiet, drops, wait_for

fp = pytest.importorskip("tunrelay._fastpath")
PeerTable = fp.PeerTable
Pump = fp.Pump


def v4(src: str, dst: str, size: int = 60, seq: int = 0) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, seq & 0xFFFF, 0, 64, 17, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    return header + bytes((seq + i) & 0xFF for i in range(size - 20))


def v6(src: str, dst: str, size: int = 80, seq: int = 0) -> bytes:
    header = struct.pack("!IHBB16s16s", 0x60000000, size - 40, 17, 64,
                         socket.inet_pton(socket.AF_INET6, src),
                         socket.inet_pton(socket.AF_INET6, dst))
    return header + bytes((seq + i) & 0xFF for i in range(size - 40))


def seal(key: bytes, index: int, counter: int, packet: bytes) -> bytes:
    """A session datagram made by hand: WireGuard's transport data message."""
    nonce = b"\0" * 4 + struct.pack("<Q", counter)
    return struct.pack("<BxxxIQ", 4, index, counter) + ChaCha20Poly1305(key).encrypt(nonce, packet, b"")


def unseal(key: bytes, datagram: bytes, mtu: int = 1500) -> tuple[int, int, bytes]:
    """Open a session datagram: (receiver index, counter, the packet with
    its padding checked and taken off).  WireGuard pads the plaintext with
    zeros to a multiple of 16, never past the MTU."""
    kind, index, counter = struct.unpack("<BxxxIQ", datagram[:16])
    assert kind == 4
    nonce = b"\0" * 4 + struct.pack("<Q", counter)
    plain = ChaCha20Poly1305(key).decrypt(nonce, datagram[16:], b"")
    if not plain:
        return index, counter, plain
    length = (struct.unpack("!H", plain[2:4])[0] if plain[0] >> 4 == 4
              else 40 + struct.unpack("!H", plain[4:6])[0])
    assert plain[length:] == b"\0" * (len(plain) - length), "padding is zeros"
    assert len(plain) == min(-(-length // 16) * 16, max(mtu, length)), \
        f"{length} bytes padded to {len(plain)}"
    return index, counter, plain[:length]


@pytest.fixture
def rig():
    rig = Rig(Pump)
    yield rig
    rig.close()


def hub(rig, framing="raw", **table_options):
    """A pump with a PeerTable and two peers, each a loopback UDP socket:
    (test tun end, pump, table, {name: (peer id, socket)})."""
    table = PeerTable(**table_options)
    tun_test, tun_pump = rig.tun()
    sock = rig.udp(timeout=None)
    spokes = {}
    for n, name in enumerate(("one", "two"), start=1):
        s = rig.udp()
        pid = table.add(name, endpoint=s.getsockname(),
                        allowed_ips=[f"10.9.{n}.0/24", f"fd09::{n}:0/112"])
        spokes[name] = (pid, s)
    pump = rig.pump(tun_pump, sock, framing=framing, peers=table)
    return tun_test, pump, table, spokes, sock


# ---------------------------------------------------------------- the table

def test_table_routes_longest_prefix_and_refuses_a_prefix_twice():
    table = PeerTable()
    a = table.add("a", allowed_ips=["10.0.0.0/8", "fd00::/8"])
    b = table.add("b", allowed_ips=["10.1.0.0/16"])
    assert table.route("10.1.2.3") == b
    assert table.route("10.2.0.1") == a
    assert table.route("fd00::1") == a
    assert table.route("192.168.0.1") is None
    with pytest.raises(fp.PumpArgumentError, match="belongs to peer 'a'"):
        table.add("c", allowed_ips=["10.0.0.0/8"])
    with pytest.raises(fp.PumpArgumentError, match="exists already"):
        table.add("a")
    with pytest.raises(fp.PumpArgumentError, match="host bits|allowed_ips"):
        table.add("d", allowed_ips=["10.0.0.1/8"])
    table.update(b, allowed_ips=["10.3.0.0/16"])
    assert table.route("10.1.2.3") == a
    assert table.route("10.3.0.1") == b
    table.remove(a)
    assert table.route("10.1.2.3") is None
    with pytest.raises(fp.PumpArgumentError, match="no peer"):
        table.info(a)
    assert table.ids() == [b]


def test_a_batch_is_one_publication():
    table = PeerTable()
    before = table.counts()["publications"]
    with table.batch():
        for n in range(100):
            table.add(f"p{n}", allowed_ips=[f"10.0.{n}.0/24"])
    assert table.counts()["publications"] == before + 1
    assert table.route("10.0.42.7") == table.find("p42")


def test_pump_arguments_with_peers(rig):
    table = PeerTable()
    tun_test, tun_pump = rig.tun()
    sock = rig.udp(timeout=None)
    with pytest.raises(fp.PumpArgumentError, match="endpoints"):
        Pump(tun_pump, sock, peers=table, peer=("127.0.0.1", 9))
    with pytest.raises(fp.PumpArgumentError, match="framing"):
        Pump(tun_pump, sock, peers=table, framing="aead")
    with pytest.raises(fp.PumpArgumentError, match="mode 'tun'"):
        Pump(tun_pump, sock, peers=table, mode="tap")
    with pytest.raises(fp.PumpArgumentError, match="needs peers"):
        Pump(tun_pump, sock, framing="session")
    test_end, pump_end = rig.tcp()
    with pytest.raises(fp.PumpArgumentError, match="datagram"):
        Pump(tun_pump, pump_end, peers=table, framing="len16")


# ---------------------------------------------------------------- raw framing

@pytest.mark.parametrize("framing", ["raw", "len16"])
def test_egress_goes_to_the_peer_of_the_destination(rig, framing):
    tun, pump, table, spokes, _ = hub(rig, framing)
    pump.start()
    one, two = spokes["one"][1], spokes["two"][1]
    front = 2 if framing == "len16" else 0
    p1 = v4("10.0.0.1", "10.9.1.5", seq=1)
    p2 = v6("fd00::1", "fd09::2:7", seq=2)
    tun.send(p1)
    tun.send(p2)
    tun.send(v4("10.0.0.1", "10.7.7.7", seq=3))   # nobody's
    assert one.recv(65535)[front:] == p1
    assert two.recv(65535)[front:] == p2
    wait_for(lambda: drops(pump, "egress").get("no_route", 0) == 1, "no_route counted")
    assert_quiet(one)
    assert_quiet(two)
    stats = table.stats()
    assert stats["one"]["egress"]["packets"] == 1
    assert stats["one"]["egress"]["bytes"] == len(p1)
    assert stats["two"]["egress"]["packets"] == 1


def test_ingress_checks_the_sender_and_the_inner_source(rig):
    tun, pump, table, spokes, sock = hub(rig)
    for pid, _ in spokes.values():
        table.update(pid, roaming=False)
    pump.start()
    one, two = spokes["one"][1], spokes["two"][1]
    good = v4("10.9.1.9", "10.0.0.1", seq=1)
    one.sendto(good, sock.getsockname())
    assert tun.recv(65535) == good
    one.sendto(v4("10.9.2.9", "10.0.0.1"), sock.getsockname())        # two's source from one
    stranger = rig.udp()
    stranger.sendto(v4("10.9.1.9", "10.0.0.1"), sock.getsockname())   # nobody's address
    two.sendto(v6("fd09::2:1", "fd00::1", seq=3), sock.getsockname())
    assert tun.recv(65535) == v6("fd09::2:1", "fd00::1", seq=3)
    wait_for(lambda: drops(pump).get("not_allowed", 0) == 1 and drops(pump).get("not_peer", 0) == 1,
             "not_allowed and not_peer counted", lambda: drops(pump))
    assert_quiet(tun)
    info = table.info(spokes["one"][0])
    assert info["ingress"]["packets"] == 1 and info["ingress"]["drops"] == 1
    assert info["last_seen"] is not None and abs(info["last_seen"] - time.time()) < 5


def test_a_roaming_raw_peer_is_found_by_its_inner_source(rig):
    table = PeerTable()
    tun, tun_pump = rig.tun()
    sock = rig.udp(timeout=None)
    pid = table.add("mobile", allowed_ips=["10.9.1.0/24"], roaming=True)
    pump = rig.pump(tun_pump, sock, peers=table)
    pump.start()
    tun.send(v4("10.0.0.1", "10.9.1.2"))
    wait_for(lambda: drops(pump, "egress").get("no_peer", 0) == 1, "no endpoint yet")
    mobile = rig.udp()
    packet = v4("10.9.1.2", "10.0.0.1")
    mobile.sendto(packet, sock.getsockname())
    assert tun.recv(65535) == packet
    assert table.info(pid)["endpoint"] == mobile.getsockname()
    events = table.take()
    assert ("endpoint", pid, mobile.getsockname()) in [(e.kind, e.peer, e.address) for e in events]
    reply = v4("10.0.0.1", "10.9.1.2", seq=9)
    tun.send(reply)
    assert mobile.recv(65535) == reply


# ---------------------------------------------------------------- sessions

KEY_AB = bytes(range(32))
KEY_BA = bytes(range(32, 64))


def one_session(rig, *, session=True, **table_options):
    """A session pump whose table has one peer, "other" (a loopback socket
    owning 10.8.2.0/24), with session 1 -> 2 installed as current:
    (tun test end, pump (not started), table, peer id, pump socket, other)."""
    table = PeerTable(**table_options)
    tun, tun_pump = rig.tun()
    sock = rig.udp(timeout=None)
    other = rig.udp()
    pid = table.add("other", endpoint=other.getsockname(), allowed_ips=["10.8.2.0/24"])
    if session:
        table.install_session(pid, local_index=1, remote_index=2, send_key=KEY_AB,
                              recv_key=KEY_BA, initiator=True)
    pump = rig.pump(tun_pump, sock, framing="session", peers=table)
    return tun, pump, table, pid, sock, other


def session_pair(rig, **table_options):
    """Two session pumps on loopback, each with one peer (the other)."""
    ends = []
    socks = [rig.udp(timeout=None), rig.udp(timeout=None)]
    for n in range(2):
        table = PeerTable(**table_options)
        tun_test, tun_pump = rig.tun()
        other = socks[1 - n].getsockname()
        pid = table.add("other", endpoint=other,
                        allowed_ips=["10.8.2.0/24"] if n == 0 else ["10.8.1.0/24"])
        pump = rig.pump(tun_pump, socks[n], framing="session", peers=table)
        ends.append((tun_test, pump, table, pid))
    (ta, pa, tab_a, peer_b), (tb, pb, tab_b, peer_a) = ends
    tab_a.install_session(peer_b, local_index=11, remote_index=22, send_key=KEY_AB,
                          recv_key=KEY_BA, initiator=True)
    tab_b.install_session(peer_a, local_index=22, remote_index=11, send_key=KEY_BA,
                          recv_key=KEY_AB, initiator=False)
    return ends


def test_sessions_carry_packets_both_ways_and_the_responder_promotes(rig):
    (ta, pa, tab_a, peer_b), (tb, pb, tab_b, peer_a) = session_pair(rig)
    pa.start()
    pb.start()
    assert tab_b.info(peer_a)["sessions"] == {"current": None, "previous": None, "next": 22}
    # b cannot send before a confirmed the session: no current session.
    # The packet is staged for the control plane, and renewal asked.
    early = v4("10.8.2.1", "10.8.1.1", seq=4)
    tb.send(early)
    wait_for(lambda: tab_b.counts()["staged_queued"] == 1, "the packet staged")
    staged = [e for e in tab_b.take() if e.kind == "staged"]
    assert [(e.peer, e.data) for e in staged] == [(peer_a, early)]
    assert drops(pb, "egress") == {}
    packet = v4("10.8.1.1", "10.8.2.1", size=1000, seq=5)
    ta.send(packet)
    assert tb.recv(65535) == packet
    assert tab_b.info(peer_a)["sessions"]["current"] == 22
    assert [e.kind for e in tab_b.take()] == ["promoted"]
    # Now the control plane sends what it held, then the loop sends on.
    pb.send_packet(peer_a, staged[0].data)
    assert ta.recv(65535) == early
    reply = v4("10.8.2.1", "10.8.1.1", size=300, seq=6)
    tb.send(reply)
    assert ta.recv(65535) == reply


def test_the_session_wire_format_is_wireguards_data_message(rig):
    table = PeerTable()
    tun, tun_pump = rig.tun()
    sock = rig.udp(timeout=None)
    other = rig.udp()
    pid = table.add("other", endpoint=other.getsockname(), allowed_ips=["10.8.2.0/24"])
    table.install_session(pid, local_index=0x01020304, remote_index=0xA0B0C0D0,
                          send_key=KEY_AB, recv_key=KEY_BA, initiator=True)
    pump = rig.pump(tun_pump, sock, framing="session", peers=table)
    pump.start()
    out = v4("10.8.1.1", "10.8.2.1", seq=1)
    tun.send(out)
    index, counter, plain = unseal(KEY_AB, other.recv(65535))
    assert (index, counter, plain) == (0xA0B0C0D0, 0, out)
    tun.send(out)
    assert unseal(KEY_AB, other.recv(65535))[1] == 1
    # In: padded to 16 as WireGuard sends it; the padding is trimmed.
    packet = v4("10.8.2.1", "10.8.1.1", size=61, seq=2)
    other.sendto(seal(KEY_BA, 0x01020304, 0, packet + b"\0" * 3), sock.getsockname())
    assert tun.recv(65535) == packet
    # A keepalive: authenticated, counted, not delivered.
    other.sendto(seal(KEY_BA, 0x01020304, 1, b""), sock.getsockname())
    wait_for(lambda: table.info(pid)["ingress"]["keepalives"] == 1, "keepalive counted")
    # Replay, forgery, an unknown index, a source outside the allowed IPs.
    other.sendto(seal(KEY_BA, 0x01020304, 0, packet), sock.getsockname())
    forged = bytearray(seal(KEY_BA, 0x01020304, 7, packet))
    forged[-1] ^= 1
    other.sendto(bytes(forged), sock.getsockname())
    other.sendto(seal(KEY_BA, 0x05050505, 8, packet), sock.getsockname())
    other.sendto(seal(KEY_BA, 0x01020304, 9, v4("10.7.0.1", "10.8.1.1")), sock.getsockname())
    other.sendto(seal(KEY_BA, 0x01020304, 10, b"")[:20], sock.getsockname())
    wait_for(lambda: all(drops(pump).get(r, 0) == 1 for r in
                         ("replay", "bad_tag", "no_session", "not_allowed", "too_short")),
             "each hostile datagram counted once", lambda: drops(pump))
    assert_quiet(tun)


def test_a_session_roams_with_its_authenticated_datagrams(rig):
    tun, pump, table, pid, sock, old = one_session(rig)
    new = rig.udp()
    pump.start()
    # A forgery from elsewhere moves nothing.
    stranger = rig.udp()
    stranger.sendto(seal(bytes(32), 1, 0, v4("10.8.2.1", "10.8.1.1")), sock.getsockname())
    wait_for(lambda: drops(pump).get("bad_tag", 0) == 1, "forgery counted")
    assert table.info(pid)["endpoint"] == old.getsockname()
    packet = v4("10.8.2.1", "10.8.1.1")
    new.sendto(seal(KEY_BA, 1, 0, packet), sock.getsockname())
    assert tun.recv(65535) == packet
    assert table.info(pid)["endpoint"] == new.getsockname()
    tun.send(v4("10.8.1.1", "10.8.2.1"))
    assert unseal(KEY_AB, new.recv(65535))[2] == v4("10.8.1.1", "10.8.2.1")
    assert table.info(pid)["roams"] == 1


def test_renewal_is_asked_and_hard_limits_refuse(rig):
    tun, pump, table, pid, sock, other = one_session(rig, rekey_after_messages=3,
                                                     reject_after_messages=5)
    pump.start()
    for seq in range(7):
        tun.send(v4("10.8.1.1", "10.8.2.1", seq=seq))
    counters = [unseal(KEY_AB, other.recv(65535))[1] for _ in range(5)]
    assert counters == [0, 1, 2, 3, 4]
    wait_for(lambda: drops(pump, "egress").get("session_expired", 0) == 2, "past the hard limit")
    assert [(e.kind, e.session) for e in table.take()] == [("renew", 1)]
    other.sendto(seal(KEY_BA, 1, 5, v4("10.8.2.1", "10.8.1.1")), sock.getsockname())
    wait_for(lambda: drops(pump).get("session_expired", 0) == 1, "a received counter past the limit")
    # A new session: sending resumes, counters from 0.
    table.install_session(pid, local_index=3, remote_index=4, send_key=KEY_BA,
                          recv_key=KEY_AB, initiator=True)
    tun.send(v4("10.8.1.1", "10.8.2.1", seq=9))
    assert unseal(KEY_BA, other.recv(65535))[:2] == (4, 0)
    assert table.info(pid)["sessions"] == {"current": 3, "previous": 1, "next": None}


def test_a_session_expires_with_age(rig):
    tun, pump, table, pid, sock, other = one_session(rig, reject_after_time=0.2)
    pump.start()
    tun.send(v4("10.8.1.1", "10.8.2.1"))
    other.recv(65535)
    time.sleep(0.3)
    tun.send(v4("10.8.1.1", "10.8.2.1"))
    wait_for(lambda: drops(pump, "egress").get("session_expired", 0) == 1, "too old to send with")
    assert_quiet(other)
    # Past its hard limit a session asks for renewal (no rekey threshold was set).
    assert [(e.kind, e.session) for e in table.take()] == [("renew", 1)]


def test_a_keepalive_confirms_a_session_to_the_responder(rig):
    (ta, pa, tab_a, peer_b), (tb, pb, tab_b, peer_a) = session_pair(rig)
    pa.start()
    pb.start()
    pa.send_keepalive(peer_b)
    wait_for(lambda: tab_b.info(peer_a)["ingress"]["keepalives"] == 1, "the keepalive arrived")
    assert tab_b.info(peer_a)["sessions"]["current"] == 22
    assert [(e.kind, e.session) for e in tab_b.take()] == [("promoted", 22)]
    packet = v4("10.8.2.1", "10.8.1.1", seq=3)
    tb.send(packet)          # b may send now, without a's data first
    assert ta.recv(65535) == packet
    assert_quiet(tb)
    with pytest.raises(fp.PumpStateError, match="no current session"):
        pb.send_keepalive(tab_b.add("nobody", endpoint=("127.0.0.1", 9)))
    with pytest.raises(fp.PumpArgumentError, match="framing 'session'"):
        rig.pump(rig.tun()[1], rig.udp(timeout=None), peers=PeerTable()).send_keepalive(1)


def test_no_session_asks_for_renewal_at_most_once_a_second(rig):
    tun, pump, table, pid, sock, other = one_session(rig, session=False)
    pump.start()
    first = v4("10.8.1.1", "10.8.2.1")
    tun.send(first)
    wait_for(lambda: table.counts()["staged_queued"] == 1, "staged")
    assert [(e.kind, e.peer, e.session) for e in table.take()] == \
        [("staged", pid, None), ("renew", pid, None)]
    renewals = 0
    for seq in range(20):
        tun.send(v4("10.8.1.1", "10.8.2.1", seq=seq))
        wait_for(lambda: table.counts()["staged_queued"] == seq + 2, "staged")  # noqa: B023 (called within the iteration)
        renewals += sum(e.kind == "renew" for e in table.take())
    # Taken after every packet, yet no new "renew" within the second (one,
    # should the machine have taken a second over these 20 packets).
    assert renewals <= 1


def test_install_session_checks_its_arguments():
    table = PeerTable()
    pid = table.add("p")
    with pytest.raises(fp.PumpArgumentError, match="32 bytes"):
        table.install_session(pid, local_index=1, remote_index=2, send_key=b"x",
                              recv_key=KEY_AB, initiator=True)
    table.install_session(pid, local_index=1, remote_index=2, send_key=KEY_AB,
                          recv_key=KEY_BA, initiator=True)
    other = table.add("q")
    with pytest.raises(fp.PumpArgumentError, match="in use"):
        table.install_session(other, local_index=1, remote_index=2, send_key=KEY_AB,
                              recv_key=KEY_BA, initiator=True)
    table.clear_sessions(pid)
    assert table.info(pid)["sessions"] == {"current": None, "previous": None, "next": None}
    # Its counters would start again at 0: the nonces already used with it.
    with pytest.raises(fp.PumpArgumentError, match="reuse its nonces"):
        table.install_session(pid, local_index=5, remote_index=6, send_key=KEY_AB,
                              recv_key=bytes(32), initiator=True)


# ---------------------------------------------------------------- control channel

def test_control_datagrams_reach_python_and_a_flood_is_bounded(rig):
    table = PeerTable(control_slots=4)
    tun, tun_pump = rig.tun()
    sock = rig.udp(timeout=None)
    pump = rig.pump(tun_pump, sock, framing="session", peers=table)
    pump.start()
    peer = rig.udp()
    for n in range(10):
        peer.sendto(bytes([1]) + b"hello %d" % n, sock.getsockname())
    wait_for(lambda: drops(pump).get("control_full", 0) == 6, "the overflow counted")
    import select
    assert select.select([table], [], [], 5)[0] == [table]
    events = table.take()
    assert [(e.kind, e.address, e.data) for e in events] == [
        ("control", peer.getsockname(), bytes([1]) + b"hello %d" % n) for n in range(4)]
    assert select.select([table], [], [], 0)[0] == []
    assert table.counts()["control_dropped"] == 6
    pump.send_control(peer.getsockname(), b"\x02reply")
    assert peer.recv(100) == b"\x02reply"
    assert_quiet(tun)


def test_raw_framing_sends_chosen_types_to_control(rig):
    table = PeerTable(control_types=[0x01])
    tun, tun_pump = rig.tun()
    sock = rig.udp(timeout=None)
    pump = rig.pump(tun_pump, sock, peers=table)
    pump.start()
    peer = rig.udp()
    peer.sendto(b"\x01knock", sock.getsockname())
    peer.sendto(b"\x02other", sock.getsockname())
    wait_for(lambda: drops(pump).get("not_peer", 0) == 1, "an unclassified datagram from no peer dropped")
    assert [(e.kind, e.data) for e in table.take()] == [("control", b"\x01knock")]


# ---------------------------------------------------------------- live changes

def test_thousands_of_changes_per_second_while_packets_flow(rig):
    """Peers and prefixes added, changed and removed from Python while both
    loops move packets: nothing crashes, the stable peer's traffic is whole,
    and every retired snapshot is freed once the loops have passed it."""
    tun, pump, table, spokes, sock = hub(rig)
    pump.start()
    one_id, one = spokes["one"]
    stop = threading.Event()
    changes = [0]

    def churn():
        n = 0
        while not stop.is_set():
            pid = table.add(f"tmp{n}", endpoint=("127.0.0.1", 9 + n % 100),
                            allowed_ips=[f"10.{100 + n % 50}.{n % 250}.0/24"])
            table.update(pid, allowed_ips=[f"10.{100 + n % 50}.{n % 250}.128/25"])
            table.update(spokes["two"][0], endpoint=("127.0.0.1", 20000 + n % 1000))
            table.remove(pid)
            changes[0] += 4
            n += 1

    worker = threading.Thread(target=churn)
    worker.start()
    deadline = time.monotonic() + WAIT
    sent = 0
    try:
        # Until the churn has made 4,000 changes under the traffic (about a
        # second here; benchmarks/peer_changes.py measures the rate).
        while changes[0] < 4000:
            assert time.monotonic() < deadline, f"only {changes[0]} changes in {WAIT} s"
            for seq in range(32):
                tun.send(v4("10.0.0.1", "10.9.1.1", size=200, seq=sent + seq))
            for seq in range(32):
                assert one.recv(65535) == v4("10.0.0.1", "10.9.1.1", size=200, seq=sent + seq)
                one.sendto(v4("10.9.1.1", "10.0.0.1", seq=seq), sock.getsockname())
                assert tun.recv(65535) == v4("10.9.1.1", "10.0.0.1", seq=seq)
            sent += 32
    finally:
        stop.set()
        worker.join()
    assert table.info(one_id)["egress"]["packets"] == sent
    wait_for(lambda: table.counts()["retired_pending"] == 0, "every retired object freed",
             lambda: table.counts())


def test_one_replay_window_whatever_queue_a_datagram_lands_on(rig):
    """Two queue pumps share a table: a datagram accepted by one is a replay
    for the other, and one sending counter serves both (no nonce twice)."""
    table = PeerTable()
    other = rig.udp()
    pid = table.add("other", endpoint=other.getsockname(), allowed_ips=["10.8.2.0/24"])
    table.install_session(pid, local_index=1, remote_index=2, send_key=KEY_AB,
                          recv_key=KEY_BA, initiator=True)
    queues = []
    for _ in range(2):
        tun, tun_pump = rig.tun()
        queues.append((tun, rig.pump(tun_pump, rig.udp(timeout=None), framing="session",
                                     peers=table)))
    packet = v4("10.8.2.1", "10.8.1.1")
    datagram = seal(KEY_BA, 1, 0, packet)
    (tun_a, pump_a), (tun_b, pump_b) = queues
    pump_a._feed(datagram, sender=other.getsockname())
    assert tun_a.recv(65535) == packet
    pump_b._feed(datagram, sender=other.getsockname())
    assert drops(pump_b).get("replay", 0) == 1
    assert_quiet(tun_b)
    for _tun, pump in queues:
        pump.start()
    for tun, _pump in queues:
        tun.send(v4("10.8.1.1", "10.8.2.1"))
    counters = sorted(unseal(KEY_AB, other.recv(65535))[1] for _ in queues)
    assert counters == [0, 1]


def test_peers_sharing_an_endpoint_are_told_apart_by_nothing(rig):
    """Raw framing finds a peer by its endpoint: of peers configured at one
    address the first one added owns it (one map entry, so a crowd at one
    address costs every datagram nothing extra), and the others' inner
    sources from there are not_allowed."""
    table = PeerTable()
    tun, tun_pump = rig.tun()
    sock = rig.udp(timeout=None)
    shared = rig.udp()
    first = table.add("first", endpoint=shared.getsockname(), allowed_ips=["10.9.1.0/24"],
                      roaming=False)
    table.add("second", endpoint=shared.getsockname(), allowed_ips=["10.9.2.0/24"],
              roaming=False)
    pump = rig.pump(tun_pump, sock, peers=table)
    pump.start()
    shared.sendto(v4("10.9.2.1", "10.0.0.1"), sock.getsockname())
    shared.sendto(v4("10.9.1.1", "10.0.0.1", seq=1), sock.getsockname())
    assert tun.recv(65535) == v4("10.9.1.1", "10.0.0.1", seq=1)
    wait_for(lambda: drops(pump).get("not_allowed", 0) == 1, "not_allowed")
    assert table.info(first)["ingress"]["packets"] == 1


def test_an_ipv6_socket_reaches_ipv4_peers(rig):
    """A dual-stack (IPv6) socket: IPv4 endpoints are written as the kernel
    reports their datagrams (::ffff:a.b.c.d), and shown as given."""
    table = PeerTable()
    v4_peer = rig.udp()
    v6_peer = rig.udp(socket.AF_INET6)
    one = table.add("v4", endpoint=v4_peer.getsockname(), allowed_ips=["10.9.1.0/24"],
                    roaming=False)
    two = table.add("v6", endpoint=v6_peer.getsockname()[:2], allowed_ips=["fd09::/64"],
                    roaming=False)
    tun, tun_pump = rig.tun()
    sock = rig.keep(socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", 0))
    port = sock.getsockname()[1]
    pump = rig.pump(tun_pump, sock, peers=table)
    pump.start()
    tun.send(v4("10.0.0.1", "10.9.1.2"))
    tun.send(v6("fd00::1", "fd09::2"))
    assert v4_peer.recv(65535) == v4("10.0.0.1", "10.9.1.2")
    assert v6_peer.recv(65535) == v6("fd00::1", "fd09::2")
    v4_peer.sendto(v4("10.9.1.2", "10.0.0.1"), ("127.0.0.1", port))
    assert tun.recv(65535) == v4("10.9.1.2", "10.0.0.1")
    assert table.info(one)["endpoint"] == v4_peer.getsockname()
    assert table.info(one)["ingress"]["packets"] == 1
    assert table.info(two)["endpoint"] == v6_peer.getsockname()[:2]
    v4_only = rig.udp(timeout=None)
    with pytest.raises(fp.PumpArgumentError, match="one address family"):
        Pump(rig.tun()[1], v4_only, peers=table)


# ---------------------------------------------------------------- with TUN offloads

def test_offloads_segment_and_coalesce_per_peer_under_sessions(rig):
    """offload=True with a session table: a TSO super-packet read from the
    device becomes the reference's segments, each sealed for the peer of the
    destination (one GSO run per peer); sealed segments from a peer are
    opened, checked and coalesced back into one write."""
    import test_offload as ref  # the offload reference: builders, segmenter, checker

    table = PeerTable()
    tun, tun_pump = rig.tun()
    sock = rig.udp(timeout=None)
    peer = rig.udp()
    # The reference's packets go 10.0.0.1 -> 10.0.0.2 (and fd00::1 -> fd00::2).
    pid = table.add("far", endpoint=peer.getsockname(), allowed_ips=["10.0.0.0/24", "fd00::/64"])
    table.install_session(pid, local_index=1, remote_index=2, send_key=KEY_AB,
                          recv_key=KEY_BA, initiator=True)
    pump = rig.pump(tun_pump, sock, framing="session", peers=table, offload=True,
                    mtu=ref.MTU, batch=64)
    for version in (4, 6):
        header, packet = ref.tso(version, ref.pattern(20000, version), 1400, seq=7,
                                 flags=ref.ACK | ref.PSH)
        tun.send(header + packet)
    pump.start()
    for version in (4, 6):
        header, packet = ref.tso(version, ref.pattern(20000, version), 1400, seq=7,
                                 flags=ref.ACK | ref.PSH)
        expected = ref.ref_segment(header, packet)
        got = [unseal(KEY_AB, peer.recv(65535)) for _ in expected]
        assert [g[2] for g in got] == expected
        assert [g[0] for g in got] == [2] * len(expected)
    assert table.info(pid)["egress"]["packets"] == 2 * len(expected)
    # Ingress: a flow's consecutive segments, sealed by the peer, queued
    # while the pump is stopped so that one receive sees them all.
    pump.stop()
    segments = [ref.tcp_packet(4, ref.pattern(1000, n), seq=1000 + 1000 * n, ident=0x1234 + n)
                for n in range(8)]
    for n, segment in enumerate(segments):
        peer.sendto(seal(KEY_BA, 1, n, segment), sock.getsockname())
    pump.start()
    wait_for(lambda: pump.stats()["ingress"]["packets"] == len(segments), "all opened")
    writes = ref.recv_n(tun, pump.stats()["ingress"]["tun_io"])
    ref.check_ingress(segments, writes)
    assert len(writes) < len(segments)    # coalesced
    assert drops(pump) == {} and drops(pump, "egress") == {}


def test_raw_peers_that_moved_are_found_at_their_new_address_before_any_publication(rig):
    """Raw framing finds a peer by its endpoint.  Moves the loops make are
    listed (up to 16) until the control plane's next publication (take()
    does one) files them in the endpoint map; a 17th move in between is
    refused, not guessed, until then."""
    table = PeerTable()
    tun, tun_pump = rig.tun()
    ids = [table.add(f"p{i}", endpoint=("127.0.0.1", 9 + i), allowed_ips=[f"10.9.{i}.0/24"])
           for i in range(17)]
    pump = rig.pump(tun_pump, rig.udp(timeout=None), peers=table)

    def feed(i, sender_port, src_net=None):
        pump._feed(v4(f"10.9.{i if src_net is None else src_net}.1", "10.0.0.1"),
                   sender=("127.0.0.1", sender_port))

    for i in range(17):
        feed(i, 20000 + i)
    moved = [table.info(pid)["endpoint"][1] for pid in ids]
    assert moved == [20000 + i for i in range(16)] + [9 + 16]
    assert drops(pump).get("not_peer", 0) == 1
    # From p0's new address with p1's source: p0 is found there (listed), so
    # the packet is p0's and not allowed; p1 does not move onto p0's address.
    feed(0, 20000, src_net=1)
    assert drops(pump).get("not_allowed", 0) == 1
    assert table.info(ids[1])["endpoint"] == ("127.0.0.1", 20001)
    assert [e.kind for e in table.take()].count("endpoint") == 17   # the refused one's too
    feed(16, 20016)
    assert table.info(ids[16])["endpoint"] == ("127.0.0.1", 20016)
    delivered = [tun.recv(65535) for _ in range(17)]
    assert len(delivered) == 17


def test_len16_control_types_look_past_the_length(rig):
    """With len16 the first byte is the length's: the type is the byte after
    it, so a data datagram of 300 bytes (length 0x012c) is not "type 1"."""
    table = PeerTable(control_types=[0x01])
    tun, tun_pump = rig.tun()
    sock = rig.udp(timeout=None)
    peer = rig.udp()
    table.add("p", endpoint=peer.getsockname(), allowed_ips=["10.9.1.0/24"])
    pump = rig.pump(tun_pump, sock, framing="len16", peers=table)
    pump.start()
    packet = v4("10.9.1.1", "10.0.0.1", size=300)
    peer.sendto(len(packet).to_bytes(2, "big") + packet, sock.getsockname())
    assert tun.recv(65535) == packet
    peer.sendto(b"\x00\x06\x01knock", sock.getsockname())
    wait_for(lambda: table.counts()["control_queued"] == 1, "the control datagram queued")
    assert [(e.kind, e.data) for e in table.take()] == [("control", b"\x00\x06\x01knock")]


def test_staged_packets_take_at_most_half_the_control_ring(rig):
    """Packets for a peer without a session wait in the control ring for
    the control plane, but never fill it: the handshakes that would give
    the peer a session must still find room.  The rest are counted."""
    tun, pump, table, pid, sock, other = one_session(rig, session=False, control_slots=8)
    for seq in range(7):
        tun.send(v4("10.8.1.1", "10.8.2.1", seq=seq))
    pump.start()
    wait_for(lambda: drops(pump, "egress").get("no_session", 0) == 3, "the rest counted",
             lambda: (drops(pump, "egress"), table.counts()))
    counts = table.counts()
    assert (counts["staged_queued"], counts["staged_dropped"]) == (4, 3)
    assert table.info(pid)["egress"]["drops"] == 3
    # Handshakes still get in: 4 slots are left for them.
    for _ in range(4):
        other.sendto(bytes([1]) + bytes(147), sock.getsockname())
    wait_for(lambda: table.counts()["control_waiting"] == 8, "the handshakes queued")
    kinds = [e.kind for e in table.take()]
    assert kinds.count("staged") == 4 and kinds.count("control") == 4
    # Taken: room for staging again.
    tun.send(v4("10.8.1.1", "10.8.2.1", seq=9))
    wait_for(lambda: table.counts()["staged_queued"] == 5, "staged again")


def test_packets_are_padded_to_16_but_not_past_the_mtu(rig):
    tun, pump, table, pid, sock, other = one_session(rig)
    pump.start()
    for size in (20, 21, 60, 64, 1399, 1400):
        packet = v4("10.8.1.1", "10.8.2.1", size=size, seq=size)
        tun.send(packet)
        datagram = other.recv(65535)
        padded = min(-(-size // 16) * 16, 1400)
        assert len(datagram) == 32 + padded
        assert unseal(KEY_AB, datagram, mtu=1400)[2] == packet


def test_send_packet_and_activity(rig):
    """What a control plane's timers read (activity) and how it sends a held
    packet (send_packet): sealed and padded like the loop's own."""
    tun, pump, table, pid, sock, other = one_session(rig)
    assert table.activity() == {pid: (None, None, None)}
    pump.start()
    before = time.monotonic()
    packet = v4("10.8.1.1", "10.8.2.1", size=45, seq=1)
    pump.send_packet(pid, packet)
    index, counter, plain = unseal(KEY_AB, other.recv(65535))
    assert (index, counter, plain) == (2, 0, packet)
    tun.send(v4("10.8.1.1", "10.8.2.1", seq=2))
    assert unseal(KEY_AB, other.recv(65535))[1] == 1     # the loop goes on from there
    seen, received, sent = table.activity()[pid]
    assert seen is None and received is None and sent >= before - 0.01
    pump.send_keepalive(pid)
    assert unseal(KEY_AB, other.recv(65535)) == (2, 2, b"")
    other.sendto(seal(KEY_BA, 1, 0, b""), sock.getsockname())          # a keepalive
    wait_for(lambda: table.activity()[pid][0] is not None, "heard from")
    assert table.activity()[pid][1] is None                              # not data
    other.sendto(seal(KEY_BA, 1, 1, v4("10.8.2.1", "10.8.1.1")), sock.getsockname())
    wait_for(lambda: table.activity()[pid][1] is not None, "data received")
    info = table.info(pid)
    assert info["egress"]["packets"] == 2 and info["egress"]["keepalives"] == 1
    with pytest.raises(fp.PumpArgumentError, match="longer than the MTU"):
        pump.send_packet(pid, bytes(1401))
    with pytest.raises(fp.PumpStateError, match="no current session"):
        pump.send_packet(table.add("nobody", endpoint=("127.0.0.1", 9)), packet)


def _mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, key=key, digest_size=16).digest()


def test_the_handshake_gate_keeps_room_for_proven_senders_under_a_flood(rig):
    """WireGuard's defence against initiation floods, in the loops: under
    load, a message whose mac1 is wrong never takes a control slot, one
    whose mac2 carries the cookie of its sender's address may take any,
    the rest only a quarter of the queue.  Not under load, everything goes
    to Python, which checks it all again."""
    mac1_key, secret = bytes(range(32)), bytes(range(32, 64))
    tun, pump, table, pid, sock, other = one_session(rig, control_slots=16)
    table.set_handshake_gate(mac1_key, secret, valid_for=60)
    pump.start()
    to = sock.getsockname()

    def initiation(n: int, *, mac1_ok: bool = True, cookie: bytes | None = None) -> bytes:
        body = bytes([1, 0, 0, 0]) + struct.pack("<I", n) + bytes(108)
        mac1 = _mac(mac1_key, body) if mac1_ok else bytes(16)
        mac2 = _mac(cookie, body + mac1) if cookie else bytes(16)
        return body + mac1 + mac2

    other.sendto(initiation(0, mac1_ok=False), to)       # not under load: Python's to judge
    wait_for(lambda: table.counts()["control_waiting"] == 1, "queued")
    for n in range(1, 9):                                 # load from 2 (16/8) on
        other.sendto(initiation(n), to)
    wait_for(lambda: table.counts()["gate_shed"] == 5, "the flood shed at a quarter",
             lambda: table.counts())
    assert table.counts()["control_waiting"] == 4
    other.sendto(initiation(9, mac1_ok=False), to)
    other.sendto(initiation(10)[:100], to)
    wait_for(lambda: drops(pump).get("bad_frame", 0) == 1, "a wrong size dropped")
    assert table.counts()["gate_bad_mac1"] == 1 and drops(pump)["bad_tag"] == 1
    host, port = other.getsockname()
    cookie = _mac(secret, socket.inet_aton(host) + struct.pack(">H", port))
    proven = initiation(11, cookie=cookie)
    other.sendto(proven, to)
    wait_for(lambda: table.counts()["gate_mac2_ok"] == 1, "the proven one let in")
    got = [e.data for e in table.take() if e.kind == "control"]
    assert len(got) == 5 and got[-1] == proven
    assert drops(pump)["control_full"] == 5
    # A cookie for another address proves nothing.
    other.sendto(initiation(12, cookie=_mac(secret, socket.inet_aton(host) + struct.pack(">H", 9))), to)
    wait_for(lambda: table.counts()["control_waiting"] == 1, "in the quarter, unproven")
    assert table.counts()["gate_mac2_ok"] == 1
    table.set_handshake_gate(None)
    with pytest.raises(fp.PumpArgumentError, match="32 bytes"):
        table.set_handshake_gate(b"short")


def test_the_handshake_gate_gives_one_address_a_share_of_the_unproven_room(rig):
    mac1_key = bytes(range(32))
    tun, pump, table, pid, sock, other = one_session(rig, control_slots=1024)
    table.set_handshake_gate(mac1_key, None)
    pump.start()
    body = bytes([1, 0, 0, 0]) + bytes(112)
    message = body + _mac(mac1_key, body) + bytes(16)
    for _ in range(200):         # load from 128 queued on; one address's share is 16
        other.sendto(message, sock.getsockname())
    wait_for(lambda: table.counts()["control_queued"] + table.counts()["control_dropped"] == 200,
             "every message decided", lambda: table.counts())
    counts = table.counts()
    assert counts["gate_source_capped"] >= 1 and counts["control_queued"] < 200
    # Another address still gets its share while the first is capped.
    stranger = rig.udp(host="127.0.0.2")
    stranger.sendto(message, sock.getsockname())
    wait_for(lambda: table.counts()["control_queued"] == counts["control_queued"] + 1,
             "the other address queued")
