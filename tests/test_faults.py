"""Faults (issue 4, section 3): what goes wrong around a running relay.

Two relays (``tunrelay run``) in the two namespaces of a Testbed
(``RelayPair``), then: a peer killed and restarted, the underlay link
down and up, the TUN device deleted from under a relay, ICMP "port
unreachable" from a stopped peer, SIGTERM under full load, SIGHUP, and no
loss over TCP.  One unit-level test (no root) covers ECONNREFUSED on a
connected UDP socket, which the relay itself never has (see there).

Every wait is bounded; nothing asserts throughput.  All traffic goes
between addresses inside the test bed's namespaces.  The helpers and
fixtures here are also used by test_hostile.py.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from _root import bed, make_pair, python, wait_for  # noqa: F401 (bed, make_pair: fixtures)

from conftest import PUMP_KINDS, ip_packet, load_pump_class
from tunrelay.errors import TunrelayError
from tunrelay.testrig.netns import Testbed
from tunrelay.testrig.pair import DEVICE, TUNNEL6_B, TUNNEL_A, TUNNEL_B, RelayPair

CLK_TCK = os.sysconf("SC_CLK_TCK")
IPERF_PORT = 5202
SIGTERM_BOUND_S = 2.0   # issue 4: a clean exit within 2 s, under full load
EXIT_BOUND_S = 5.0      # the device deleted: exit 1 within this
CPU_BOUND_S = 0.5       # ... having used at most this much CPU meanwhile (no spin)


# ----------------------------------------------------------------- helpers

def ping(bed: Testbed, ns: str, address: str, count: int = 5, wait: int = 2,
         interval: float = 0.2) -> subprocess.CompletedProcess:
    """``count`` echoes.  -w (a deadline for all of them), not -W: after a
    first reply, iputils waits only two round trips for the last one, and
    on a loaded machine a late reply would pass for a lost one."""
    deadline = max(wait, int(count * interval + wait + 1))
    argv = ["ping", "-c", str(count), "-i", str(interval), "-w", str(deadline)]
    if ":" in address:
        argv.append("-6")
    return bed.run(ns, [*argv, address], capture_output=True, text=True, timeout=60)


def wait_ping(bed: Testbed, ns: str, address: str, timeout: float = 15.0) -> None:
    """Until one echo comes back (a tunnel just (re)built may need ARP/ND,
    a reconnection, or TCP's retransmission timer first)."""
    deadline = time.monotonic() + timeout
    while True:
        done = ping(bed, ns, address, count=1, wait=1)
        if done.returncode == 0:
            return
        assert time.monotonic() < deadline, f"no echo from {address} within {timeout} s:\n{done.stdout}"
        time.sleep(0.1)


def assert_ping(bed: Testbed, ns: str, address: str, timeout: float = 15.0) -> None:
    """Reachable, then 5 echoes with 0 % loss."""
    wait_ping(bed, ns, address, timeout)
    done = ping(bed, ns, address)
    assert done.returncode == 0 and " 0% packet loss" in done.stdout, done.stdout + done.stderr


def assert_no_echo(bed: Testbed, ns: str, address: str) -> None:
    done = ping(bed, ns, address, count=2, wait=1)
    assert done.returncode != 0, f"{address} answered through a broken tunnel:\n{done.stdout}"






def drops(snapshot: dict, direction: str = "ingress") -> dict:
    """The non-zero drop counters of a direction."""
    return {k: v for k, v in snapshot[direction]["drops"].items() if v}


def errors(snapshot: dict, direction: str) -> dict:
    return {k: v for k, v in snapshot[direction]["errors"].items() if v}


def alive(pair: RelayPair, name: str) -> bool:
    proc = pair.sides[name].proc
    return proc is not None and proc.poll() is None


def assert_alive(pair: RelayPair, *names: str) -> None:
    for name in names:
        assert alive(pair, name), \
            f"relay {name} exited with {pair.sides[name].proc.returncode}:\n{pair.log(name)}"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def reap(proc: subprocess.Popen, timeout: float):
    """Wait up to ``timeout`` for proc; return (elapsed, rusage) or None.
    wait4 instead of Popen.wait: its rusage is the CPU the child used."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return time.monotonic() - started, usage
        time.sleep(0.01)
    return None


def nstat(bed: Testbed, ns: str, counter: str) -> int:
    """A kernel SNMP counter (absolute) as seen inside ``ns``."""
    done = bed.run(ns, ["nstat", "-asz", counter], capture_output=True, text=True, timeout=10)
    for line in done.stdout.splitlines():
        fields = line.split()
        if fields and fields[0] == counter:
            return int(fields[1])
    raise AssertionError(f"nstat has no {counter}:\n{done.stdout}{done.stderr}")


def relay_state(pair: RelayPair, name: str) -> str:
    return pair.stats(name)["state"]


def _state_or_none(pair: RelayPair, name: str) -> str | None:
    """The state, or None while the control socket is not up yet."""
    assert alive(pair, name), pair.log(name)
    try:
        return relay_state(pair, name)
    except TunrelayError:
        return None


# -------------------------------------------------------------- peer killed

@pytest.mark.root
@pytest.mark.parametrize("victim", ["b", pytest.param("a", marks=pytest.mark.slow)])
def test_udp_peer_killed_and_restarted(bed, make_pair, victim):
    """SIGKILL one end (no clean-up at all), then start it again: the other
    end noticed nothing but silence, and traffic resumes."""
    pair = make_pair()
    pair.start()
    assert_ping(bed, bed.ns_a, TUNNEL_B)
    survivor = "a" if victim == "b" else "b"
    ns_survivor, ns_victim = pair.sides[survivor].ns, pair.sides[victim].ns
    there = {"a": TUNNEL_A, "b": TUNNEL_B}
    survivor_pid = pair.sides[survivor].proc.pid

    assert pair.stop(victim, signal.SIGKILL) == -signal.SIGKILL
    assert_no_echo(bed, ns_survivor, there[victim])
    assert_alive(pair, survivor)
    assert relay_state(pair, survivor) == "running"
    pair.start_side(victim)
    assert_ping(bed, ns_survivor, there[victim])
    wait_ping(bed, ns_victim, there[survivor])
    assert pair.sides[survivor].proc.pid == survivor_pid   # never restarted
    for name in ("a", "b"):
        assert pair.stop(name) == 0, pair.log(name)
        assert "Traceback" not in pair.log(name)


# A steady background load: one small datagram every 10 ms to a closed port
# on the far tunnel address (ICMP port unreachable comes back), for argv[2] s.
TRICKLE = r"""
import socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    sock.sendto(b"x" * 200, (sys.argv[1], 9))
    time.sleep(0.01)
"""


@pytest.mark.root
@pytest.mark.parametrize("cycles", [pytest.param(1, id="once"),
                                    pytest.param(3, id="3-times", marks=pytest.mark.slow)])
def test_tcp_server_killed_under_traffic_client_reconnects(bed, make_pair, cycles):
    """SIGKILL the TCP server while traffic flows, restart it, repeat: the
    client reconnects every time, keeps its device, and leaks no fd.
    (test_integration kills either end once on an idle tunnel.)"""
    pair = make_pair(protocol="tcp")
    pair.start()
    assert_ping(bed, bed.ns_b, TUNNEL_A)
    client = pair.sides["b"].proc
    fds_before = open_fds(client.pid)
    trickle = bed.popen(bed.ns_b, [sys.executable, "-c", TRICKLE, TUNNEL_A, str(10 * cycles + 20)])
    for cycle in range(cycles):
        wait_for(lambda: pair.stats("b")["egress"]["packets"] > 20 * (cycle + 1), 10,  # noqa: B023 (called within the iteration)
                 "traffic through the tunnel")
        assert pair.stop("a", signal.SIGKILL) == -signal.SIGKILL
        wait_for(lambda: relay_state(pair, "b") == "connecting", 10, "the client to notice")
        pair.start_side("a", wait=False)
        pair.wait_ready("a", "b")
        assert_ping(bed, bed.ns_b, TUNNEL_A)
    trickle.kill()
    trickle.wait()
    assert client.poll() is None and pair.sides["b"].proc is client, "the client restarted"
    assert pair.stats("b")["connections"] >= cycles + 1
    assert pair.log("b").count("connection lost") >= cycles
    # Each lost connection's socket was closed: the client holds as many fds
    # as before (give a socket closed under load a moment).
    wait_for(lambda: open_fds(client.pid) == fds_before, 5,
             f"the client's fds back to {fds_before} (now {open_fds(client.pid)})")
    assert_ping(bed, bed.ns_a, TUNNEL6_B)
    for name in ("a", "b"):
        assert pair.stop(name) == 0, pair.log(name)


# -------------------------------------------------------------- underlay link

@pytest.mark.root
@pytest.mark.parametrize("protocol", ["udp", "tcp"])
def test_underlay_link_down_and_up(bed, make_pair, protocol):
    """The veth goes down under the tunnel for ~2 s: the relays stay up
    (UDP counts the refused sends; a TCP connection rides it out), and the
    tunnel works again once the link is back."""
    pair = make_pair(protocol=protocol)
    pair.start()
    assert_ping(bed, bed.ns_a, TUNNEL_B)
    pids = {name: pair.sides[name].proc.pid for name in ("a", "b")}
    before = pair.stats("a")

    bed.link_set(bed.ns_a, bed.veth_a, False)
    try:
        assert_no_echo(bed, bed.ns_a, TUNNEL_B)
        assert_alive(pair, "a", "b")
        during = pair.stats("a")
        if protocol == "udp":
            # The route to the peer left with the link: ENETUNREACH per send,
            # counted and skipped.
            sent = lambda s: s["egress"]["packets"] + s["egress"]["drops"]["send_error"]  # noqa: E731
            assert sent(during) >= sent(before) + 2
            assert during["egress"]["drops"]["send_error"] > before["egress"]["drops"]["send_error"]
            assert during["egress"]["last_errno"] in (errno.ENETUNREACH, errno.EHOSTUNREACH)
            assert during["state"] == "running"
        else:
            assert during["state"] == "connected"
    finally:
        bed.link_set(bed.ns_a, bed.veth_a, True)

    # TCP: the connection's retransmission timer backed off during the
    # outage; the next retry carries the data (or the client reconnects).
    assert_ping(bed, bed.ns_a, TUNNEL_B, timeout=25)
    assert_ping(bed, bed.ns_b, TUNNEL_A)
    assert_alive(pair, "a", "b")
    assert {name: pair.sides[name].proc.pid for name in ("a", "b")} == pids
    if protocol == "tcp":   # the connection rode it out (TCP_USER_TIMEOUT is 30 s)
        assert pair.stats("b")["connections"] == 1
    for name in ("a", "b"):
        assert pair.stop(name) == 0, pair.log(name)


# -------------------------------------------------------------- device deleted

@pytest.mark.root
@pytest.mark.parametrize("protocol,engine,side,state", [
    ("udp", "fast", "a", "running"),
    ("udp", "python", "b", "running"),
    ("tcp", "fast", "b", "connected"),       # the client, while pumping
    ("tcp", "fast", "a", "listening"),       # the server, no client: no pump runs
], ids=["udp", "udp-python-engine", "tcp-client", "tcp-server-idle"])
@pytest.mark.parametrize("relay_io", ["syscalls", "uring"])   # both TUN I/O engines see it go
def test_tun_deleted_from_under_the_relay(bed, make_pair, protocol, engine, side, state):
    """``ip link del`` of the relay's device: exit 1 with one clear line,
    promptly, without spinning (CPU time stays low), with either TUN I/O
    engine ([relay] io; the Python engine has syscalls only)."""
    pair = make_pair(protocol=protocol, overrides={"relay": [f'engine = "{engine}"']})
    if state == "listening":
        pair.start_side("a", wait=False)
        wait_for(lambda: _state_or_none(pair, "a") == "listening", 15, "the server to listen")
    else:
        pair.start()
        assert_ping(bed, bed.ns_a, TUNNEL_B)
    assert relay_state(pair, side) == state
    proc, ns = pair.sides[side].proc, pair.sides[side].ns
    cpu_before = cpu_seconds(proc.pid)

    subprocess.run(["ip", "-n", ns, "link", "del", DEVICE], check=True, capture_output=True)
    reaped = reap(proc, EXIT_BOUND_S)
    assert reaped is not None, f"relay {side} still running {EXIT_BOUND_S} s after its device went"
    elapsed, usage = reaped
    cpu_used = usage.ru_utime + usage.ru_stime - cpu_before
    assert proc.returncode == 1, pair.log(side)
    assert cpu_used < CPU_BOUND_S, f"{cpu_used:.2f} s of CPU in {elapsed:.2f} s: a spin?"
    log = pair.log(side)
    assert "Traceback" not in log
    last = log.strip().splitlines()[-1]
    assert last.startswith("tunrelay: ") and DEVICE in last and "deleted" in last, last

    other = "b" if side == "a" else "a"
    if alive(pair, other):   # the peer is unaffected: UDP running, TCP back to waiting
        assert relay_state(pair, other) in ("running", "connecting", "listening")
        assert pair.stop(other) == 0, pair.log(other)


# -------------------------------------------------------------- ICMP refused

@pytest.mark.root
def test_udp_peer_port_closed_icmp_refused(bed, make_pair):
    """The peer relay stops: its host answers each datagram with ICMP port
    unreachable.  The relay's UDP socket is unconnected (so datagrams from
    strangers reach it and are counted as not_peer), and Linux reports ICMP
    errors to an unconnected socket only with IP_RECVERR: they are not
    counted, and above all not fatal.  Sends are counted (as sent, or as
    send_error if the kernel ever refuses one), the relay keeps running, and
    the tunnel works again when the peer returns.  Counting ECONNREFUSED on
    a connected socket: test_refused_then_the_peer_returns below."""
    pair = make_pair()
    pair.start()
    assert_ping(bed, bed.ns_a, TUNNEL_B)
    assert pair.stop("b") == 0, pair.log("b")
    before = pair.stats("a")
    unreachable = nstat(bed, bed.ns_a, "IcmpInDestUnreachs")

    assert_no_echo(bed, bed.ns_a, TUNNEL_B)
    wait_for(lambda: nstat(bed, bed.ns_a, "IcmpInDestUnreachs") >= unreachable + 2, 5,
             "ICMP port unreachable from the peer's host")
    after = pair.stats("a")
    handled = lambda s: s["egress"]["packets"] + s["egress"]["drops"]["send_error"]  # noqa: E731
    assert handled(after) >= handled(before) + 2
    # Datagrams: each refused send is one write error and one send_error drop.
    assert (after["egress"]["drops"]["send_error"] - before["egress"]["drops"]["send_error"]
            == after["egress"]["errors"]["write"] - before["egress"]["errors"]["write"])
    for direction in ("egress", "ingress"):
        if errors(after, direction) != errors(before, direction):
            assert after[direction]["last_errno"] == errno.ECONNREFUSED, after[direction]
    assert after["state"] == "running"
    assert_alive(pair, "a")

    pair.start_side("b")
    assert_ping(bed, bed.ns_a, TUNNEL_B)
    assert_ping(bed, bed.ns_b, TUNNEL_A)
    for name in ("a", "b"):
        assert pair.stop(name) == 0, pair.log(name)


@pytest.mark.parametrize("kind", PUMP_KINDS)
def test_refused_then_the_peer_returns(kind):
    """Unit level, no root: a connected UDP socket whose peer port is
    closed gets ECONNREFUSED (from the ICMP error) on a send or a receive:
    counted, the pump goes on; once something listens on that port again,
    packets flow both ways."""
    pump_class = load_pump_class(kind)
    tun, tun_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tun.settimeout(5)
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    address = closed.getsockname()
    closed.close()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.connect(address)
    pump = pump_class(tun_end, sock, mtu=1400)
    peer = None
    try:
        pump.start()
        sent = 0
        deadline = time.monotonic() + 10
        while not any(pump.stats()[d]["errors"]["read"] + pump.stats()[d]["errors"]["write"]
                      for d in ("egress", "ingress")):
            assert time.monotonic() < deadline, f"no ECONNREFUSED counted: {pump.stats()}"
            tun.send(ip_packet(100, sent))
            sent += 1
            time.sleep(0.02)
        assert pump.running
        stats = pump.stats()
        for direction in ("egress", "ingress"):
            if stats[direction]["errors"]["read"] or stats[direction]["errors"]["write"]:
                assert stats[direction]["last_errno"] == errno.ECONNREFUSED

        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(address)   # the peer is back, on the same port
        peer.settimeout(5)
        peer.connect(sock.getsockname())
        out, back = ip_packet(300, 1000), ip_packet(200, 2000)
        deadline = time.monotonic() + 10
        while True:          # a refusal may still be queued: the first send can be eaten
            tun.send(out)
            try:
                got = peer.recv(1 << 17)
                break
            except TimeoutError:
                assert time.monotonic() < deadline, "nothing arrived once the peer returned"
        assert got == out
        peer.send(back)
        assert tun.recv(1 << 17) == back
        assert pump.running
    finally:
        assert pump.stop(15) is not None
        for s in (tun, tun_end, sock, peer):
            if s is not None:
                s.close()


# -------------------------------------------------------------- signals

@pytest.mark.root
@pytest.mark.parametrize("protocol", ["udp", "tcp"])
def test_sigterm_under_full_load(bed, make_pair, protocol):
    """iperf3 through the tunnel at full speed; SIGTERM both relays at once:
    each exits 0 within 2 s and removes its device."""
    pair = make_pair(protocol=protocol)
    pair.start()
    wait_ping(bed, bed.ns_a, TUNNEL_B)
    server = bed.popen(bed.ns_b, ["iperf3", "-s", "-1", "-B", TUNNEL_B, "-p", str(IPERF_PORT)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: bed.run(bed.ns_b, ["ss", "-ltnH", f"sport = :{IPERF_PORT}"], capture_output=True,
                             text=True).stdout.strip(), 10, "the iperf3 server")
    client = bed.popen(bed.ns_a, ["iperf3", "-c", TUNNEL_B, "-p", str(IPERF_PORT), "-t", "30"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = pair.stats("b")["ingress"]["bytes"]
    # Full load: well over 10 MB through, and still flowing.
    wait_for(lambda: pair.stats("b")["ingress"]["bytes"] > start + 10_000_000, 20, "iperf3 load")
    mark = pair.stats("b")["ingress"]["bytes"]
    wait_for(lambda: pair.stats("b")["ingress"]["bytes"] > mark + 1_000_000, 5, "iperf3 still running")
    assert client.poll() is None

    procs = {name: pair.sides[name].proc for name in ("a", "b")}
    for proc in procs.values():
        proc.send_signal(signal.SIGTERM)
    exits = {name: reap(proc, 10) for name, proc in procs.items()}
    for name, reaped in exits.items():
        assert reaped is not None, f"relay {name} did not exit within 10 s of SIGTERM"
        assert procs[name].returncode == 0, pair.log(name)
        assert reaped[0] < SIGTERM_BOUND_S, f"relay {name} took {reaped[0]:.2f} s to exit"
        assert "SIGTERM: stopping" in pair.log(name) and "stopped" in pair.log(name)
        assert "Traceback" not in pair.log(name)
        assert subprocess.run(["ip", "-n", pair.sides[name].ns, "link", "show", DEVICE],
                              capture_output=True).returncode != 0, f"{DEVICE} left behind"
    for proc in (client, server):
        proc.kill()
        proc.wait()


@pytest.mark.root
def test_sighup_with_an_unchanged_file_changes_nothing(bed, make_pair):
    """SIGHUP reloads the file (tests/test_reload.py has the changes); the
    same file is logged as "nothing changed" and changes nothing: the
    relays keep running, the TCP connection stays up."""
    pair = make_pair(protocol="tcp")
    pair.start()
    assert_ping(bed, bed.ns_a, TUNNEL_B)
    pids = {name: pair.sides[name].proc.pid for name in ("a", "b")}
    for count in (1, 2):   # one at a time: two pending SIGHUPs are one signal
        for name in ("a", "b"):
            pair.sides[name].proc.send_signal(signal.SIGHUP)
        for name in ("a", "b"):
            wait_for(lambda: pair.log(name).count("applied: nothing changed") == count, 5,  # noqa: B023 (called within the iteration)
                     f"relay {name} to log SIGHUP #{count}")
    time.sleep(0.2)
    assert_alive(pair, "a", "b")
    assert {name: pair.sides[name].proc.pid for name in ("a", "b")} == pids
    assert pair.stats("a")["connections"] == pair.stats("b")["connections"] == 1
    assert relay_state(pair, "a") == relay_state(pair, "b") == "connected"
    assert_ping(bed, bed.ns_a, TUNNEL_B)
    for name in ("a", "b"):
        assert pair.stop(name) == 0, pair.log(name)
        assert "Traceback" not in pair.log(name)


# -------------------------------------------------------------- no loss over TCP

# Receiver (ns b): N numbered datagrams; prints "ready", then, once all
# came or it timed out, "<received> <in order>" and the first few missing.
NUMBERED_RECEIVER = r"""
import socket, struct, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 32 << 20)
sock.bind((host, port))
sock.settimeout(10)
print("ready", flush=True)
seen, in_order, expected = set(), True, 0
try:
    while len(seen) < n:
        data = sock.recv(65536)
        seq = struct.unpack("!I", data[:4])[0]
        if seq != expected:
            in_order = False
        expected = seq + 1
        seen.add(seq)
except socket.timeout:
    pass
missing = sorted(set(range(n)) - seen)
print(len(seen), in_order, missing[:10], flush=True)
"""

# Sender (ns a): N numbered datagrams of SIZE bytes, BURST at a time with a
# short sleep in between, and never more than WINDOW ahead of what the relay
# has read from the device (its tx_packets): the TUN's ring (txqueuelen 500)
# drops silently when a starved relay falls behind, and that would be the
# sender outrunning the device, not the tunnel losing packets.
NUMBERED_SENDER = r"""
import socket, struct, sys, time
host, (port, n, size, burst, window), device = sys.argv[1], map(int, sys.argv[2:7]), sys.argv[7]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
pad = bytes(size - 4)
read_by_relay = open(f"/sys/class/net/{device}/statistics/tx_packets")

def taken():
    read_by_relay.seek(0)
    return int(read_by_relay.read())

base = taken()
for seq in range(n):
    while seq - (taken() - base) >= window:
        time.sleep(0.0005)
    sock.sendto(struct.pack("!I", seq) + pad, (host, port))
    if seq % burst == burst - 1:
        time.sleep(0.002)
"""


@pytest.mark.root
@pytest.mark.parametrize("count,size", [
    pytest.param(5000, 200, id="5000"),
    pytest.param(50000, 1200, id="50000-large", marks=pytest.mark.slow),
])
def test_no_loss_over_tcp(bed, make_pair, count, size):
    """TCP transport on a healthy link: N numbered datagrams sent through
    the tunnel all arrive, in order."""
    pair = make_pair(protocol="tcp")
    pair.start()
    assert_ping(bed, bed.ns_a, TUNNEL_B)
    before = {name: pair.stats(name) for name in ("a", "b")}
    port = 40001
    receiver = bed.popen(bed.ns_b, [sys.executable, "-c", NUMBERED_RECEIVER, TUNNEL_B, str(port), str(count)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout.readline().strip() == "ready", receiver.stderr.read()
        python(bed, bed.ns_a, NUMBERED_SENDER, TUNNEL_B, str(port), str(count), str(size), "32",
               "128", DEVICE, timeout=120)
        out, err = receiver.communicate(timeout=60)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    received, in_order, missing = out.split(" ", 2)
    tun_drops = bed.run(bed.ns_a, ["ip", "-s", "link", "show", DEVICE], capture_output=True,
                        text=True).stdout
    assert int(received) == count, f"{received} of {count} arrived; missing {missing}\n{tun_drops}"
    assert in_order == "True"
    for name in ("a", "b"):
        after = pair.stats(name)
        assert drops(after, "egress") == drops(before[name], "egress"), name
        assert drops(after, "ingress") == drops(before[name], "ingress"), name
        assert after["connections"] == 1
    assert pair.stats("b")["ingress"]["packets"] - before["b"]["ingress"]["packets"] >= count
    for name in ("a", "b"):
        assert pair.stop(name) == 0, pair.log(name)
