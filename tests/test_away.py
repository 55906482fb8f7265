"""TCP: the packets queued in the TUN while no peer is connected (issue 10).

Unit tests (no root) drive ``AwayDrain`` over AF_UNIX datagram socket
pairs, which read like a TUN queue (one packet per read, POLLIN while one
waits).  Root tests run two relays (``tunrelay run``) over TCP, take one
away, send into the other's device, and look at what the returning peer
gets.  Bounds are far apart (a hold of 0.2 s against waits of 2 s, or a
hold of a minute against a reconnect of seconds): no timing is asserted.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
from _root import bed, make_pair, wait_for  # noqa: F401 (bed, make_pair: fixtures)

from tunrelay.daemon.away import PEER_AWAY, AwayDrain, packets_in
from tunrelay.daemon.config import loads
from tunrelay.daemon.relay import Relay
from tunrelay.daemon.stats import format_line, format_table
from tunrelay.testrig.pair import TUNNEL_A, TUNNEL_B

WAIT = 10.0  # the most any bounded wait here may take


# ------------------------------------------------------------------ helpers

@pytest.fixture
def queues():
    """Two fake device queues: (fd the drain reads, socket to feed it) each."""
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(2)]
    yield [(inside.fileno(), outside) for inside, outside in pairs]
    for pair in pairs:
        for sock in pair:
            sock.close()


def waiting(fd: int) -> int:
    """How many packets wait in a fake queue (counted by reading them: the
    queue is empty afterwards)."""
    count = 0
    sock = socket.socket(fileno=socket.dup(fd))
    sock.setblocking(False)
    try:
        while True:
            sock.recv(65536)
            count += 1
    except BlockingIOError:
        return count
    finally:
        sock.close()


@pytest.fixture
def drains():
    made = []

    def make(*args, **kw):
        drain = AwayDrain(*args, **kw)
        made.append(drain)
        return drain
    yield make
    for drain in made:
        drain.close()


# --------------------------------------------------------------- unit tests

def test_packets_older_than_the_bound_are_dropped_and_counted(queues, drains):
    (fd, feed), (fd2, feed2) = queues
    drain = drains((fd, fd2), 0.05)
    drain.start()
    for n in range(5):
        feed.send(bytes([n]) * 60)
    feed2.send(b"x" * 60)
    wait_for(lambda: drain.dropped == 6, WAIT, "the six packets dropped")
    assert drain.stop() == 6 and drain.dropped == 6
    assert waiting(fd) == 0 and waiting(fd2) == 0


def test_packets_younger_than_the_bound_wait_for_the_next_peer(queues, drains):
    """A quick reconnect: stop() before the bound leaves every packet in
    the device, for the next pump."""
    (fd, feed), _ = queues
    drain = drains((fd,), 60.0)
    drain.start()
    for n in range(5):
        feed.send(bytes([n]) * 60)
    time.sleep(0.3)
    assert drain.stop() == 0 and drain.dropped == 0
    assert waiting(fd) == 5


def test_a_bound_of_zero_drops_everything_at_once(queues, drains):
    (fd, feed), _ = queues
    drain = drains((fd,), 0.0)
    drain.start()
    feed.send(b"a" * 60)
    wait_for(lambda: drain.dropped == 1, WAIT, "the packet dropped")
    feed.send(b"b" * 60)
    wait_for(lambda: drain.dropped == 2, WAIT, "the second packet dropped")
    drain.stop()


def test_the_count_carries_on_across_gaps(queues, drains):
    (fd, feed), _ = queues
    drain = drains((fd,), 0.0)
    for gap in (1, 2):
        drain.start()
        feed.send(b"p" * 60)
        wait_for(lambda: drain.dropped == gap, WAIT, f"gap {gap}'s packet dropped")  # noqa: B023 (called within the iteration)
        assert drain.stop() == 1
    assert drain.dropped == 2
    drain.close()
    drain.close()            # idempotent
    drain.start()            # closed: a no-op
    assert not drain.running and drain.dropped == 2


def test_a_backlog_the_pump_left_counts_from_when_it_last_read(queues, drains):
    """note() while a pump runs: the device seen empty (or the pump's reads
    moving) marks the queue young; a backlog that sat behind a stalled pump
    keeps its old mark and is dropped at once when the gap starts."""
    (fd, feed), _ = queues
    drain = drains((fd,), 30.0)
    drain.note(7)                      # empty: young now
    seen = drain._seen
    time.sleep(0.01)
    feed.send(b"stuck" * 12)
    drain.note(7)                      # a packet waits, the pump did not read: not young
    assert drain._seen == seen
    drain.note(8)                      # the pump read: young again
    assert drain._seen > seen
    drain._seen = time.monotonic() - 60   # as if the pump stalled a minute ago
    drain.start()
    wait_for(lambda: drain.dropped == 1, WAIT, "the stale backlog dropped")
    drain.stop()


def test_a_backlog_without_notes_counts_from_the_gap_start(queues, drains):
    (fd, feed), _ = queues
    feed.send(b"q" * 60)
    drain = drains((fd,), 60.0)
    drain.start()
    time.sleep(0.3)
    assert drain.stop() == 0 and waiting(fd) == 1


def test_packets_in_counts_the_segments_of_a_gso_read():
    assert packets_in(b"E" + bytes(59), vnet_hdr=False) == 1
    plain = bytes(10) + b"E" + bytes(99)
    assert packets_in(plain, vnet_hdr=True) == 1
    # gso_type TCPV4 (1), hdr_len 52, gso_size 1000: 2948 bytes of payload -> 3 segments
    header = bytes([0, 1]) + (52).to_bytes(2, "little") + (1000).to_bytes(2, "little") + bytes(4)
    assert packets_in(header + bytes(52 + 2948), vnet_hdr=True) == 3
    assert packets_in(header + bytes(52 + 3000), vnet_hdr=True) == 3
    assert packets_in(header + bytes(52), vnet_hdr=True) == 1


def test_peer_away_is_a_tcp_egress_drop_in_stats():
    """It shows with the other drops: `tunrelay stats`, the JSON, and the
    stats log line's total; a UDP relay has no such counter."""
    relay = Relay(loads('[transport]\nprotocol = "tcp"\n'))
    snapshot = relay.stats()
    assert snapshot["egress"]["drops"][PEER_AWAY] == 0
    assert PEER_AWAY not in snapshot["ingress"]["drops"]
    snapshot["egress"]["drops"][PEER_AWAY] = 7
    assert "drop peer_away" in format_table(snapshot)
    assert "egress 0 pkts 0 B 7 drops" in format_line(snapshot)
    assert PEER_AWAY not in Relay(loads("")).stats()["egress"]["drops"]


# --------------------------------------------------------------- root tests

PORT = 9999
# Bound to the wildcard: the returning peer's device does not exist yet.
RECEIVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", %d))
print("ready", flush=True)
s.settimeout(float(sys.argv[1]))
while True:
    data = s.recv(2048)
    print(data.decode(), flush=True)
    if data == b"end":
        break
""" % PORT


def send(bed, ns: str, dest: str, payloads: list[str]) -> None:
    script = ("import socket, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
              "for p in sys.argv[2:]:\n    s.sendto(p.encode(), (sys.argv[1], %d))\n" % PORT)
    done = bed.run(ns, [sys.executable, "-c", script, dest, *payloads], capture_output=True,
                   text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def receiver(bed, ns: str, timeout: float) -> subprocess.Popen:
    proc = bed.popen(ns, [sys.executable, "-c", RECEIVER, str(timeout)],
                     stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def received(bed, ns_from: str, dest: str, proc: subprocess.Popen) -> list[str]:
    """Once the tunnel is back: "end" sent until it arrives; what arrived
    before it."""
    deadline = time.monotonic() + 30
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the end marker never arrived"
        send(bed, ns_from, dest, ["end"])
        time.sleep(0.2)
    lines = proc.stdout.read().split()
    assert lines and lines[-1] == "end", lines
    return lines[:-1]


class Away:
    """A TCP pair with ``away_hold_ms = hold`` whose side ``away`` is
    stopped: ``stays`` is the other side, ``dest`` the tunnel address of
    the one away, ``sent_in`` sends datagrams into the device that stays;
    ``back()`` starts the one away (``listen()`` first: the receiver waits
    in its namespace) and returns what arrived before the end marker."""

    def __init__(self, bed, make_pair, away: str, hold: int) -> None:
        self.bed, self.away = bed, away
        self.pair = make_pair(protocol="tcp", overrides={"transport": [f"away_hold_ms = {hold}"]})
        self.pair.start()
        self.stays = "b" if away == "a" else "a"
        self.dest = TUNNEL_A if away == "a" else TUNNEL_B
        assert self.pair.stop(away) == 0, self.pair.log(away)
        wait_for(lambda: self.state() in ("connecting", "listening"), WAIT,
                 f"relay {self.stays} to notice its peer gone")
        self.listener = None

    def state(self) -> str:
        return self.pair.stats(self.stays)["state"]

    def peer_away(self) -> int:
        return self.pair.stats(self.stays)["egress"]["drops"][PEER_AWAY]

    def send_in(self, payloads: list[str]) -> None:
        send(self.bed, self.pair.sides[self.stays].ns, self.dest, payloads)

    def listen(self) -> None:
        self.listener = receiver(self.bed, self.pair.sides[self.away].ns, 60)

    def back(self) -> list[str]:
        self.pair.start_side(self.away, wait=False)
        self.pair.wait_ready("a", "b")
        return received(self.bed, self.pair.sides[self.stays].ns, self.dest, self.listener)


@pytest.mark.root
@pytest.mark.parametrize("away", ["a", "b"], ids=["server-away", "client-away"])
def test_packets_queued_while_the_peer_is_away_never_reach_the_next_one(bed, make_pair, away):
    """Hold 0.2 s; packets sent into the device while the peer is away,
    then 2 s of waiting: all dropped and counted peer_away (logged on
    reconnect), none delivered to the peer when it comes back."""
    gap = Away(bed, make_pair, away, hold=200)
    stale = [f"stale{n}" for n in range(20)]
    gap.send_in(stale)
    wait_for(lambda: gap.peer_away() >= len(stale), WAIT, "the queued packets dropped")
    time.sleep(2.0)
    gap.listen()
    got = gap.back()
    assert not [p for p in got if p.startswith("stale")], got
    assert gap.peer_away() >= len(stale)
    assert "drop peer_away" in subprocess.run(
        [sys.executable, "-m", "tunrelay", "stats", "--config", gap.pair.sides[gap.stays].config_path],
        capture_output=True, text=True, timeout=30).stdout
    assert "dropped while no peer was connected" in gap.pair.log(gap.stays)


@pytest.mark.root
@pytest.mark.parametrize("away", ["a", "b"], ids=["server-away", "client-away"])
def test_a_quick_reconnect_loses_nothing(bed, make_pair, away):
    """Hold a minute; packets sent while the peer is away are all delivered
    when it is back seconds later, none counted peer_away."""
    gap = Away(bed, make_pair, away, hold=60000)
    gap.listen()
    held = [f"held{n}" for n in range(20)]
    gap.send_in(held)
    assert gap.back() == held
    assert gap.peer_away() == 0
