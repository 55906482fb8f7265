"""The compiled pump's duplex loop (both directions in one thread) and its
busy polling, without root.

Every pump test of tests/test_pump.py already runs against the duplex
pump too (the "c-duplex" kind of the ``pump_class`` fixture); here is what
only a single thread for both directions can get wrong:

- two relays joined by TCP, each writing faster than the other reads: a
  loop that only waited for room in its socket would stop reading it, and
  with both doing so each waits for the other for ever;
- which direction an ending is reported against;
- busy polling: a request answered within the budget is picked up without
  a sleep (the wakeups counter), and a budget is refused outside its range.
"""

from __future__ import annotations

import socket
import threading

import pytest
from pumprig import WAIT, Rig, recv_exactly, wait_for

from conftest import ip_packet, load_pump_class
from tunrelay.errors import PumpArgumentError
from tunrelay.framing import MAX_BUSY_POLL_US, len16_encode

MTU = 1400


@pytest.fixture
def rig():
    rig = Rig(load_pump_class("c"), mtu=MTU)
    yield rig
    rig.close()


def _tcp_pair(rig: Rig):
    """Two pump-side ends of one TCP connection on 127.0.0.1, with small
    buffers so that a few hundred packets fill them."""
    a, b = rig.tcp()
    for end in (a, b):
        end.setblocking(True)
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    return a, b


def _collect(sock: socket.socket, count: int, into: list) -> None:
    for _ in range(count):
        into.append(sock.recv(65536))


@pytest.mark.parametrize("busy_poll_us", [0, 200])
def test_two_duplex_relays_writing_at_once_never_wait_on_each_other(rig, busy_poll_us):
    """Both tunnel ends send 2,000 packets of 1,400 bytes at once, far more
    than the TCP buffers between them hold.  Each duplex loop, waiting for
    room in its socket, goes on reading it; every packet arrives, in order,
    on both sides."""
    count = 2000
    a, b = _tcp_pair(rig)
    tun_a, end_a = rig.tun()
    tun_b, end_b = rig.tun()
    pumps = [rig.pump(end_a, a, duplex=True, busy_poll_us=busy_poll_us),
             rig.pump(end_b, b, duplex=True, busy_poll_us=busy_poll_us)]
    for pump in pumps:
        pump.start()
    sent_a = [ip_packet(MTU, i) for i in range(count)]
    sent_b = [ip_packet(MTU, 100_000 + i) for i in range(count)]
    got_a: list[bytes] = []
    got_b: list[bytes] = []
    threads = [threading.Thread(target=_collect, args=(tun_a, count, got_a), daemon=True),
               threading.Thread(target=_collect, args=(tun_b, count, got_b), daemon=True),
               threading.Thread(target=lambda: [tun_a.send(p) for p in sent_a], daemon=True),
               threading.Thread(target=lambda: [tun_b.send(p) for p in sent_b], daemon=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 2)
    stuck = [p.stats() for p in pumps] if any(t.is_alive() for t in threads) else None
    assert stuck is None, f"the relays stopped moving: {len(got_a)} and {len(got_b)} of {count}: {stuck}"
    assert got_a == sent_b and got_b == sent_a
    for pump in pumps:
        # A packet is counted just after its write: wait for the last count.
        wait_for(lambda: pump.stats()["ingress"]["packets"] == count, "ingress counted")  # noqa: B023 (called within the iteration)
        stats = pump.stats()
        assert stats["egress"]["packets"] == stats["ingress"]["packets"] == count
        assert not any(stats["egress"]["drops"].values()) and not any(stats["ingress"]["drops"].values())


def test_duplex_reports_the_direction_that_ended_it(rig):
    """The peer closing the connection ends the one loop as the ingress;
    the device going away (EOF on the stand-in) as the egress."""
    tun, tun_end = rig.tun()
    peer, sock = rig.tcp()
    pump = rig.pump(tun_end, sock, duplex=True)
    pump.start()
    tun.send(ip_packet(100, 1))
    assert recv_exactly(peer, 102) == len16_encode(ip_packet(100, 1))
    peer.close()
    outcome = pump.wait(WAIT)
    assert outcome is not None and (outcome.reason, outcome.direction) == ("closed", "ingress")

    tun2, tun_end2 = rig.tun()
    peer2, sock2 = rig.tcp()
    pump2 = rig.pump(tun_end2, sock2, duplex=True)
    pump2.start()
    tun2.shutdown(socket.SHUT_WR)   # the stand-in reads 0: the device is gone
    outcome = pump2.wait(WAIT)
    assert outcome is not None and (outcome.reason, outcome.direction) == ("fatal", "egress")


def test_a_duplex_pump_runs_one_thread(rig):
    tun, tun_end = rig.tun()
    pump = rig.pump(tun_end, rig.udp(timeout=None), peer=("127.0.0.1", 9), duplex=True)
    before = {t.name for t in threading.enumerate()}
    pump.start()
    names = {t.name for t in threading.enumerate()} - before
    assert names == {"pump-duplex"}
    assert pump.duplex and pump.busy_poll_us == 0


def test_busy_polling_catches_an_answer_without_sleeping(rig):
    """A ping-pong through the pump: each answer comes back long before a
    one-second budget runs out, so the loop that sent the request picks the
    answer up spinning; it slept about once per exchange at most (the
    wait for the next request), not twice."""
    tun, tun_end = rig.tun()
    far = rig.udp()
    sock = rig.udp(timeout=None)
    pump = rig.pump(tun_end, sock, peer=far.getsockname(), duplex=True,
                    busy_poll_us=MAX_BUSY_POLL_US)
    pump.start()
    rounds = 50
    for i in range(rounds):
        tun.send(ip_packet(64, i))
        data, sender = far.recvfrom(65536)
        far.sendto(data, sender)
        assert tun.recv(65536) == data
    wait_for(lambda: pump.stats()["ingress"]["packets"] == rounds, "answers counted")
    stats = pump.stats()
    # The sleeps are counted on the egress side (the duplex poll); with no
    # spinning they are two per exchange, one per packet in each direction.
    assert stats["egress"]["wakeups"] + stats["ingress"]["wakeups"] < rounds * 1.5, stats


@pytest.mark.parametrize("kind", ["c", "python"])
def test_busy_poll_budget_out_of_range_is_refused(rig, kind):
    tun, tun_end = rig.tun()
    pump_class = load_pump_class(kind)
    for bad in (-1, MAX_BUSY_POLL_US + 1):
        with pytest.raises((PumpArgumentError, OverflowError)):
            pump_class(tun_end, rig.udp(timeout=None), busy_poll_us=bad)
    if kind == "python":
        for options in ({"duplex": True}, {"busy_poll_us": 10}):
            with pytest.raises(PumpArgumentError, match="compiled Pump"):
                pump_class(tun_end, rig.udp(timeout=None), **options)
