"""Attacks on a real relay pair (issue 7): each test runs two relays
(``RelayPair``, ``tunrelay run``) in the two namespaces of a fresh test bed
and attacks them from inside those namespaces only.

- Reflection (finding 1): B's *own* aead datagrams, taken off B's veth with
  an AF_PACKET tap (ETH_P_ALL, so outgoing frames too), are sent back to B
  from A's address and port.  None may reach B's TUN.
- Cross-queue replay (finding 3): with two queues, datagrams are steered to
  a queue's socket by the CPU that receives them, and veth receives on the
  sending CPU.  Each captured A->B datagram is replayed once from CPU 0 and
  once from CPU 1, so the copies land on both queues.  None may reach B's TUN.
- TCP hijack (finding 2): strangers reach the aead TCP server first (one
  idle, one reconnecting in a loop with bogus hellos); the real client still
  gets the tunnel, the strangers are counted, and the idle one is closed
  after the proof deadline.
- ``allow`` (finding 2): a len16 server with ``[transport] allow`` resets a
  connection from an address outside it, counts it, and the client works.
- Log flood (finding 2): 200 refused connections log a handful of WARNING
  lines, not 200, and are all counted.

The TCP server's counters are looked up by name anywhere in the snapshot
(``refused_busy``, ``refused_not_allowed``, ``unproven``).  Tunnel
addresses are IPv4 only and IPv6 is off on the TUN devices in the UDP
tests, so no stray packet (MLD, ...) crosses the tunnel while the counters
are compared.  Every wait polls with a generous deadline; nothing asserts
speed.  Helper processes are started with ``bed.popen`` and so are stopped
with the test bed, also when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _root import bed, make_pair, python, wait_for  # noqa: F401 (bed, make_pair: fixtures)
from test_faults import assert_ping, ping, wait_ping
from test_hostile import FLOOD

from tunrelay.aead import genkey
from tunrelay.errors import TunrelayError
from tunrelay.testrig.netns import Testbed
from tunrelay.testrig.pair import PORT, TUNNEL_A, TUNNEL_B, RelayPair

pytestmark = pytest.mark.root

MTU = 1300               # fits raw, len16 and aead (old or new overhead) on a 1500-byte veth
CAPTURED = 30            # datagrams taken off the wire per attack
TUNNEL_TIMEOUT_S = 30.0  # the real client must have the tunnel within this
STRANGER_3 = "198.18.0.3"  # a second address of ns b, outside the server's allow list


# ================================================================ helpers

def write_key(directory: Path) -> str:
    """A fresh pre-shared key file (mode 600, as load_key demands)."""
    path = directory / "relay.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(genkey() + "\n")
    return str(path)


def udp_aead_pair(make_pair, bed: Testbed, tmp_path: Path, queues: int = 1) -> RelayPair:
    """A UDP aead pair, one role each, offloads off (one datagram per frame
    on the wire, no GSO super-packets in the capture), IPv4 tunnel only."""
    for ns in (bed.ns_a, bed.ns_b):
        # TUN devices made from now on in these namespaces get no IPv6: no
        # MLD reports or the like cross the tunnel while counters are read.
        bed.run(ns, ["sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6"],
                check=True, timeout=10)
    key = write_key(tmp_path)
    both = {"transport": ['framing = "aead"'], "security": [f'key_file = "{key}"'],
            "device": [f"mtu = {MTU}", f"queues = {queues}"], "relay": ["offload = false"]}
    pair = make_pair(overrides=both,
                     overrides_a={"security": ['role = "a"'],
                                  "device": [f'address = ["{TUNNEL_A}/24"]']},
                     overrides_b={"security": ['role = "b"'],
                                  "device": [f'address = ["{TUNNEL_B}/24"]']})
    pair.start()
    return pair


def ingress(pair: RelayPair, name: str) -> tuple[int, int, dict]:
    """(packets written to the TUN, total drops, non-zero drops by reason)."""
    counters = pair.stats(name)["ingress"]
    nonzero = {k: v for k, v in counters["drops"].items() if v}
    return counters["packets"], sum(counters["drops"].values()), nonzero


def wait_quiet(pair: RelayPair, name: str, still_s: float = 1.0, timeout: float = 20.0):
    """Until ``name``'s ingress counters stay unchanged for ``still_s``; the
    counters then."""
    deadline = time.monotonic() + timeout
    last, since = ingress(pair, name), time.monotonic()
    while time.monotonic() - since < still_s:
        assert time.monotonic() < deadline, f"relay {name} ingress never went quiet: {last}"
        time.sleep(0.1)
        now = ingress(pair, name)
        if now[:2] != last[:2]:
            last, since = now, time.monotonic()
    return last


def find_counter(snapshot, name: str) -> int | None:
    """The integer counter called ``name`` anywhere in the snapshot (summed
    if it occurs more than once), or None when there is none."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == name and isinstance(value, int) and not isinstance(value, bool):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(snapshot)
    return sum(found) if found else None


def counter(pair: RelayPair, side: str, *names: str, required: bool = True) -> int:
    """The sum of the named TCP server counters in ``side``'s stats; each
    name must be there (``required``), else a missing one counts 0 (for a
    baseline: the verdict comes later, with ``required``)."""
    snapshot = pair.stats(side)
    total = 0
    for name in names:
        value = find_counter(snapshot, name)
        assert value is not None or not required, (
            f"relay {side}'s stats have no counter {name!r} (top-level keys: {sorted(snapshot)})")
        total += value or 0
    return total


def wait_state(pair: RelayPair, side: str, state: str, timeout: float = 15.0) -> None:
    """Until the relay answers on its control socket in ``state`` (for a TCP
    server alone: "listening", which RelayPair.wait_ready does not take)."""
    def reached():
        proc = pair.sides[side].proc
        assert proc is not None and proc.poll() is None, \
            f"relay {side} exited ({proc and proc.returncode}):\n{pair.log(side)}"
        try:
            return pair.stats(side)["state"] == state
        except TunrelayError:
            return False
    wait_for(reached, timeout, f"relay {side} {state}")


def finish(proc: subprocess.Popen, timeout: float, what: str) -> str:
    """A helper process's stdout once it exits by itself (killed if not)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{what} did not finish within {timeout} s:\n{out}\n{err}") from None
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{out}\n{err}"
    return out


def wait_log_quiet(pair: RelayPair, side: str, still_s: float = 0.5, timeout: float = 10.0) -> None:
    """Until ``side``'s log has not grown for ``still_s``."""
    deadline = time.monotonic() + timeout
    size, since = len(pair.log(side)), time.monotonic()
    while time.monotonic() - since < still_s and time.monotonic() < deadline:
        time.sleep(0.1)
        if len(pair.log(side)) != size:
            size, since = len(pair.log(side)), time.monotonic()


def warnings_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if " WARNING " in line]


# ================================================================ helper scripts

# An AF_PACKET tap (ETH_P_ALL: outgoing frames too) on one interface: prints
# "ready", then the UDP payloads (hex, JSON list) of the first COUNT IPv4/UDP
# datagrams from SRC:PORT to DST:PORT, or of as many as came within TIMEOUT.
CAPTURE = r"""
import json, select, socket, struct, sys, time
ifname, src, dst, port, count, timeout = sys.argv[1:7]
port, count, timeout = int(port), int(count), float(timeout)
src, dst = socket.inet_aton(src), socket.inet_aton(dst)
tap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
tap.bind((ifname, 0))
print("ready", flush=True)
got = []
deadline = time.monotonic() + timeout
while len(got) < count and time.monotonic() < deadline:
    if not select.select([tap], [], [], 0.1)[0]:
        continue
    frame = tap.recv(65536)
    if len(frame) < 14 + 28 or frame[12:14] != b"\x08\x00":
        continue
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    total = int.from_bytes(ip[2:4], "big")
    if ip[0] >> 4 != 4 or ip[9] != 17 or ip[12:16] != src or ip[16:20] != dst:
        continue
    if int.from_bytes(ip[6:8], "big") & 0x3FFF or total > len(ip):
        continue                      # a fragment, or cut short
    udp = ip[ihl:total]
    sport, dport, length = struct.unpack("!HHH", udp[:6])
    if sport == port and dport == port and length == len(udp):
        got.append(udp[8:].hex())
print(json.dumps(got), flush=True)
"""

# Sends the payloads (hex, JSON list on stdin) as IPv4/UDP datagrams built
# by hand (raw socket, IP_HDRINCL), so the source address and port are
# whatever we say: from SRC:SPORT to DST:DPORT.  CPUS ("0,1" or "-"): one
# pass over all payloads per CPU, the thread pinned to that CPU first (veth
# receives on the sending CPU).  Prints {"sent": n, "cpus": [cpu seen per pass]}.
SEND_RAW = r"""
import json, os, socket, struct, sys
src, sport, dst, dport, cpus = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
payloads = [bytes.fromhex(h) for h in json.load(sys.stdin)]

def ones(data):
    data += b"\0" * (len(data) & 1)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total

def datagram(payload, ident):
    udp_len = 8 + len(payload)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 17, udp_len)
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + payload
    check = ~ones(pseudo + udp) & 0xFFFF or 0xFFFF
    udp = udp[:6] + struct.pack("!H", check) + udp[8:]
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, ident, 0x4000, 64, 17, 0,
                                   socket.inet_aton(src), socket.inet_aton(dst)))
    header[10:12] = struct.pack("!H", ~ones(bytes(header)) & 0xFFFF)
    return bytes(header) + udp

def this_cpu():
    with open("/proc/thread-self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[36])

sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
sent, seen, ident = 0, [], 1
for cpu in ([None] if cpus == "-" else [int(c) for c in cpus.split(",")]):
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    for payload in payloads:
        sock.sendto(datagram(payload, ident & 0xFFFF), (dst, 0))
        sent, ident = sent + 1, ident + 1
    seen.append(this_cpu())
print(json.dumps({"sent": sent, "cpus": seen}))
"""

# One TCP connection to HOST:PORT (from BIND, or "-" for any address):
# prints "connected PORT" (its own port; or how connecting failed, then
# exits), sends nothing,
# and reports how the server ended it ("eof", "reset", or "timeout" after
# TIMEOUT seconds), after how many seconds, and how many bytes the server
# sent it meanwhile (a stranger taken for the peer is sent tunnel packets).
IDLE = r"""
import socket, sys, time
host, port, bind, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
if bind != "-":
    sock.bind((bind, 0))
sock.settimeout(10)
try:
    sock.connect((host, port))
except ConnectionRefusedError:
    print("refused 0 0", flush=True); sys.exit(0)
except ConnectionResetError:
    print("reset 0 0", flush=True); sys.exit(0)
print("connected", sock.getsockname()[1], flush=True)
start, received = time.monotonic(), 0
try:
    while True:
        sock.settimeout(max(0.01, timeout - (time.monotonic() - start)))
        data = sock.recv(65536)
        if not data:
            outcome = "eof"
            break
        received += len(data)
except ConnectionResetError:
    outcome = "reset"
except socket.timeout:
    outcome = "timeout"
print(f"{outcome} {time.monotonic() - start:.1f} {received}", flush=True)
"""

# A stranger reconnecting in a loop: each time it connects, sends a len16
# record of 40 random bytes (a hello of the right size that cannot verify),
# and waits until the server ends the connection; again at once, until its
# stdin closes (or MAX attempts).  Prints a JSON Counter of the outcomes.
LOOP = r"""
import json, os, select, socket, sys, time
from collections import Counter
host, port, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
outcomes = Counter()
for _ in range(limit):
    if select.select([sys.stdin], [], [], 0)[0] and not sys.stdin.read(1):
        break
    try:
        sock = socket.create_connection((host, port), timeout=10)
    except (ConnectionRefusedError, ConnectionResetError):
        outcomes["refused"] += 1
        time.sleep(0.05)
        continue
    except OSError as exc:
        outcomes[f"connect: {exc}"] += 1
        time.sleep(0.05)
        continue
    try:
        sock.sendall((40).to_bytes(2, "big") + os.urandom(40))
        while sock.recv(65536):
            pass
        outcomes["eof"] += 1
    except (ConnectionResetError, BrokenPipeError):
        outcomes["reset"] += 1
    except socket.timeout:
        outcomes["timeout"] += 1
    finally:
        sock.close()
    time.sleep(0.05)
print(json.dumps(outcomes))
"""

# FLOOD (from test_hostile): N connections to HOST:PORT, at most P at a time,
# each waiting for the server's verdict; prints a Counter of the outcomes.



def capture_while_pinging(bed: Testbed, ns: str, ifname: str, src: str, dst: str,
                          ping_from: str, ping_to: str, count: int = CAPTURED) -> list[bytes]:
    """Ping through the tunnel until the tap in ``ns`` on ``ifname`` has
    ``count`` datagrams src:PORT -> dst:PORT; the pings are over on return."""
    tap = bed.popen(ns, [sys.executable, "-c", CAPTURE, ifname, src, dst, str(PORT), str(count), "30"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert tap.stdout.readline().strip() == "ready", tap.stderr.read()
        deadline = time.monotonic() + 30
        while tap.poll() is None and time.monotonic() < deadline:
            ping(bed, ping_from, ping_to, count=10, wait=2, interval=0.02)
        payloads = json.loads(finish(tap, 35, "the capture"))
    finally:
        if tap.poll() is None:
            tap.kill()
            tap.wait()
    assert len(payloads) == count, f"captured {len(payloads)} of {count} datagrams {src} -> {dst}"
    return [bytes.fromhex(p) for p in payloads]


def send_raw(bed: Testbed, ns: str, payloads: list[bytes], src: str, dst: str,
             cpus: str = "-") -> dict:
    """``payloads`` as UDP from src:PORT to dst:PORT, sent from ``ns``."""
    done = bed.run(ns, [sys.executable, "-c", SEND_RAW, src, str(PORT), dst, str(PORT), cpus],
                   input=json.dumps([p.hex() for p in payloads]), capture_output=True, text=True,
                   timeout=30)
    assert done.returncode == 0, f"raw sender failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)


def assert_none_reached_the_tun(pair: RelayPair, before, sent: int, what: str) -> None:
    """After ``sent`` hostile datagrams to b: wait until each is accounted
    for (a packet written to b's TUN or a drop); none may be a packet."""
    packets0, drops0, _ = before

    def accounted():
        packets, total, _ = ingress(pair, "b")
        return (packets - packets0) + (total - drops0) >= sent
    try:
        wait_for(accounted, 15, f"b to account for the {sent} {what} datagrams")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: ingress before {before}, now {ingress(pair, 'b')}") from None
    time.sleep(0.3)  # anything still in flight lands before the verdict
    packets, total, reasons = ingress(pair, "b")
    assert packets - packets0 == 0, (
        f"{packets - packets0} of {sent} {what} datagrams reached b's TUN "
        f"(ingress drops {drops0} -> {total}: {reasons}; stats: {pair.stats('b').get('aead')})")
    assert total - drops0 >= sent, f"drops grew by {total - drops0}, expected >= {sent}: {reasons}"


# ================================================================ UDP aead

def test_reflected_own_datagrams_are_dropped(bed, make_pair, tmp_path):
    """B's own outgoing aead datagrams, sent back to B from A's address and
    port: B must not take its own session for its peer's."""
    pair = udp_aead_pair(make_pair, bed, tmp_path)
    assert_ping(bed, bed.ns_a, TUNNEL_B)
    own = capture_while_pinging(bed, bed.ns_b, bed.veth_b, bed.addr_b, bed.addr_a,
                                ping_from=bed.ns_a, ping_to=TUNNEL_B)
    before = wait_quiet(pair, "b")
    send_raw(bed, bed.ns_a, own, src=bed.addr_a, dst=bed.addr_b)
    assert_none_reached_the_tun(pair, before, len(own), "reflected")
    assert_ping(bed, bed.ns_a, TUNNEL_B)       # and the tunnel is as good as before


def test_replay_across_queues_is_dropped(bed, make_pair, tmp_path):
    """Two queues: each captured A->B datagram replayed once from CPU 0 and
    once from CPU 1 (so onto both of B's queue sockets): none may pass, a
    session has one replay window whatever the queue."""
    if not {0, 1} <= os.sched_getaffinity(0):
        reason = "cross-queue replay needs CPUs 0 and 1 (veth receives on the sending CPU)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    pair = udp_aead_pair(make_pair, bed, tmp_path, queues=2)
    assert pair.stats("b")["queues"] == 2
    assert_ping(bed, bed.ns_a, TUNNEL_B)
    recorded = capture_while_pinging(bed, bed.ns_b, bed.veth_b, bed.addr_a, bed.addr_b,
                                     ping_from=bed.ns_a, ping_to=TUNNEL_B)
    before = wait_quiet(pair, "b")
    report = send_raw(bed, bed.ns_a, recorded, src=bed.addr_a, dst=bed.addr_b, cpus="0,1")
    assert report["cpus"] == [0, 1], report
    assert_none_reached_the_tun(pair, before, report["sent"], "replayed")
    assert_ping(bed, bed.ns_a, TUNNEL_B)


# ================================================================ TCP server

def tcp_aead_overrides(tmp_path: Path) -> dict:
    """Both sides: aead over TCP (roles implied: server and client)."""
    key = write_key(tmp_path)
    return {"transport": ['framing = "aead"'], "security": [f'key_file = "{key}"'],
            "device": [f"mtu = {MTU}"]}


def test_strangers_cannot_hijack_the_tcp_server(bed, make_pair, tmp_path):
    """An idle stranger connects to the aead TCP server before the real
    client, another reconnects in a loop with bogus hellos: the real client
    still gets the tunnel, every stranger is counted, and the idle one is
    closed once its proof deadline has passed."""
    pair = make_pair(protocol="tcp", overrides=tcp_aead_overrides(tmp_path))
    pair.start_side("a", wait=False)
    wait_state(pair, "a", "listening")
    base = counter(pair, "a", "refused_busy", "unproven", required=False)

    # The idle stranger waits longer than the client is given: while it is
    # connected, the slot cannot have been freed by the stranger giving up.
    idle = bed.popen(bed.ns_b, [sys.executable, "-c", IDLE, bed.addr_a, str(PORT), "-",
                                str(2 * TUNNEL_TIMEOUT_S)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    loop = bed.popen(bed.ns_b, [sys.executable, "-c", LOOP, bed.addr_a, str(PORT), "2000"],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     text=True)
    connected = idle.stdout.readline().split()
    assert connected[:1] == ["connected"], idle.stderr.read()
    idle_port = connected[1]
    time.sleep(0.5)          # the looping stranger is at it before the client starts

    pair.start_side("b", wait=False)
    try:
        wait_ping(bed, bed.ns_b, TUNNEL_A, timeout=TUNNEL_TIMEOUT_S)
    except AssertionError as exc:
        server = pair.stats("a")
        raise AssertionError(
            f"{exc}\nthe real client never got the tunnel: server state {server['state']}, "
            f"peer {server['peer']}, connections {server['connections']}; "
            f"client state {pair.stats('b')['state']}; the idle stranger (port {idle_port}) "
            f"still connected: {idle.poll() is None}") from None
    pair.wait_ready("a", "b")

    verdict = idle.stdout.readline().split()
    assert verdict and verdict[0] in ("eof", "reset"), \
        f"the idle stranger was not closed by the server: {verdict} {idle.stderr.read()}"
    assert verdict[2] == "0", f"the server sent the idle stranger {verdict[2]} bytes"
    idle.wait(10)
    attempts = json.loads(finish(loop, 30, "the looping stranger"))
    assert not {"data", "timeout"} & set(attempts), attempts
    ended = attempts.get("eof", 0) + attempts.get("reset", 0)
    assert ended >= 1, attempts
    # Every stranger's connection that the server ended is counted.
    wait_for(lambda: counter(pair, "a", "refused_busy", "unproven") - base >= 1 + ended, 10,
             f"the strangers counted: 1 idle + {ended} looping "
             f"(have {counter(pair, 'a', 'refused_busy', 'unproven') - base})")
    assert_ping(bed, bed.ns_b, TUNNEL_A)
    assert_ping(bed, bed.ns_a, TUNNEL_B)
    assert pair.stats("a")["state"] == pair.stats("b")["state"] == "connected"
    for name in ("a", "b"):
        assert pair.stop(name) == 0, pair.log(name)


def test_tcp_server_allow_list_refuses_other_addresses(bed, make_pair):
    """A len16 server with ``allow = ["198.18.0.2/32"]``: a connection from
    198.18.0.3 (another address of ns b) before the real client is closed at
    once and counted; then the real client gets the tunnel."""
    bed.run(bed.ns_b, ["ip", "addr", "add", f"{STRANGER_3}/24", "dev", bed.veth_b],
            check=True, timeout=10)
    pair = make_pair(protocol="tcp",
                     overrides_a={"transport": [f'allow = ["{bed.addr_b}/32"]']})
    pair.start_side("a", wait=False)
    wait_state(pair, "a", "listening")
    base = counter(pair, "a", "refused_not_allowed", required=False)

    stranger = bed.popen(bed.ns_b, [sys.executable, "-c", IDLE, bed.addr_a, str(PORT), STRANGER_3, "20"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = finish(stranger, 40, "the stranger at 198.18.0.3").split()
    verdict = lines[2:] if lines[:1] == ["connected"] else lines
    assert verdict[0] in ("reset", "eof", "refused") and verdict[2] == "0", \
        f"a connection from {STRANGER_3} was kept: {lines}"
    wait_for(lambda: counter(pair, "a", "refused_not_allowed") - base >= 1, 10,
             f"the connection from {STRANGER_3} counted as refused_not_allowed")

    pair.start_side("b", wait=False)
    pair.wait_ready("a", "b")
    assert_ping(bed, bed.ns_b, TUNNEL_A)
    assert_ping(bed, bed.ns_a, TUNNEL_B)
    for name in ("a", "b"):
        assert pair.stop(name) == 0, pair.log(name)


def test_refusals_do_not_flood_the_log(bed, make_pair):
    """200 connections at a len16 server that has its peer: all refused and
    counted, but the server logs a handful of WARNING lines, not one each."""
    attempts = 200
    pair = make_pair(protocol="tcp")
    pair.start()
    assert_ping(bed, bed.ns_b, TUNNEL_A)
    log_before = len(pair.log("a"))
    base = counter(pair, "a", "refused_busy", required=False)

    flood = bed.popen(bed.ns_b, [sys.executable, "-c", FLOOD, bed.addr_a, str(PORT), str(attempts), "8"],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outcomes = json.loads(finish(flood, 120, "the connection flood"))
    assert set(outcomes) <= {"reset", "eof"}, outcomes   # refused by the server, every one

    # Every connection was reset or closed by the server: it has seen them all
    # (and what it logs about them is written once its log stops growing).
    wait_log_quiet(pair, "a")
    lines = warnings_in(pair.log("a")[log_before:])
    assert len(lines) <= 3, (f"{len(lines)} WARNING lines for {attempts} refused connections:\n"
                             + "\n".join(lines[:5]))
    wait_for(lambda: counter(pair, "a", "refused_busy") - base >= attempts, 15,
             f"{attempts} refusals counted as refused_busy")
    assert_ping(bed, bed.ns_b, TUNNEL_A)
    assert pair.stats("a")["state"] == "connected"
    for name in ("a", "b"):
        assert pair.stop(name) == 0, pair.log(name)


# ================================================================ roaming (finding 6)

def test_an_aead_peer_that_changes_address_keeps_its_tunnel(bed, make_pair, tmp_path):
    """B listens on the wildcard, so its datagrams leave from whatever
    address its host has.  B's address changes (a new lease: .3 added, .2,
    which A was configured with, removed): A follows B's first authenticated
    datagram from the new address, logs it, and the tunnel carries on.  A
    stranger's forged datagram from yet another address does not move it."""
    key = write_key(tmp_path)
    both = {"transport": ['framing = "aead"'], "security": [f'key_file = "{key}"'],
            "device": [f"mtu = {MTU}"]}
    pair = make_pair(overrides=both,
                     overrides_b={"transport": [f'listen = "0.0.0.0:{PORT}"']})
    pair.start()
    assert_ping(bed, bed.ns_b, TUNNEL_A)
    assert pair.stats("a")["peer"] == f"{bed.addr_b}:{PORT}"
    # (Deleting a primary address deletes its secondaries unless they are promoted.)
    bed.run(bed.ns_b, ["sysctl", "-qw", f"net.ipv4.conf.{bed.veth_b}.promote_secondaries=1"],
            check=True)
    bed.run(bed.ns_b, ["ip", "addr", "add", f"{STRANGER_3}/24", "dev", bed.veth_b], check=True)
    bed.run(bed.ns_b, ["ip", "addr", "del", f"{bed.addr_b}/24", "dev", bed.veth_b], check=True)
    # B speaks first from its new address; A answers there.
    wait_ping(bed, bed.ns_b, TUNNEL_A, timeout=TUNNEL_TIMEOUT_S)
    assert_ping(bed, bed.ns_a, TUNNEL_B)
    snapshot = pair.stats("a")
    assert snapshot["peer"] == f"{STRANGER_3}:{PORT}"
    assert snapshot["aead"]["roams"] >= 1
    assert f"moved from {bed.addr_b}:{PORT} to {STRANGER_3}:{PORT}" in pair.log("a")
    # A forged datagram (right header, wrong tag) from a third address is
    # dropped and does not move the endpoint.
    # (a start time later than any real session's, so it is tried, not stale)
    forged = (b"\x02\x01\0\0" + b"\xff" * 4 + os.urandom(8) + (1 << 40).to_bytes(8, "big")
              + os.urandom(60))
    bed.run(bed.ns_b, ["ip", "addr", "add", "198.18.0.4/24", "dev", bed.veth_b], check=True)
    send_udp = ("import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                "s.bind(('198.18.0.4', 0)); [s.sendto(bytes.fromhex(sys.argv[1]), "
                f"('{bed.addr_a}', {PORT})) for _ in range(5)]")
    python(bed, bed.ns_b, send_udp, forged.hex())
    wait_for(lambda: pair.stats("a")["ingress"]["drops"]["bad_tag"] >= 5, 15, "5 bad_tag drops")
    assert pair.stats("a")["peer"] == f"{STRANGER_3}:{PORT}"
    assert_ping(bed, bed.ns_a, TUNNEL_B)


def test_a_reconnecting_client_replaces_its_silently_dead_connection(bed, make_pair, tmp_path):
    """aead over TCP: the client's host loses its link and its address, the
    client dies (its FIN never arrives: the address it was sent from is
    gone), then comes back from a new address.  The server still holds the
    old, half-open connection; the new one proves itself and replaces it at
    once, instead of waiting for keepalive to notice the old one is dead."""
    pair = make_pair(protocol="tcp", overrides=tcp_aead_overrides(tmp_path))
    pair.start()
    assert_ping(bed, bed.ns_b, TUNNEL_A)
    bed.run(bed.ns_b, ["sysctl", "-qw", f"net.ipv4.conf.{bed.veth_b}.promote_secondaries=1"],
            check=True)
    bed.link_set(bed.ns_b, bed.veth_b, False)
    pair.stop("b", signal.SIGKILL)
    bed.run(bed.ns_b, ["ip", "addr", "add", f"{STRANGER_3}/24", "dev", bed.veth_b], check=True)
    bed.run(bed.ns_b, ["ip", "addr", "del", f"{bed.addr_b}/24", "dev", bed.veth_b], check=True)
    bed.link_set(bed.ns_b, bed.veth_b, True)
    assert pair.stats("a")["state"] == "connected"     # the old connection looks alive
    pair.start_side("b")
    wait_ping(bed, bed.ns_b, TUNNEL_A, timeout=TUNNEL_TIMEOUT_S)
    assert "a newly proven connection replaces the live one" in pair.log("a")
    assert pair.stats("a")["connections"] == 2
    assert_ping(bed, bed.ns_a, TUNNEL_B)


# ================================================================ flood (finding 5)

def test_a_flood_of_made_up_sessions_does_not_starve_a_restarting_peer(bed, make_pair, tmp_path):
    """While A restarts, a stranger in A's namespace floods B with
    well-formed datagrams of made-up sessions from A's own address and port
    (newer start times, so each must be tried).  A's new session still gets
    through at once: the tunnel works again while the flood goes on, and
    every made-up datagram is counted."""
    pair = udp_aead_pair(make_pair, bed, tmp_path)
    assert_ping(bed, bed.ns_a, TUNNEL_B)
    future = int(time.time()) + 3600
    made_up = [bytes([0x02, 0, 0, 0]) + future.to_bytes(4, "big") + os.urandom(8)
               + os.urandom(8) + os.urandom(60) for _ in range(2000)]
    assert pair.stop("a") == 0
    flood = bed.popen(bed.ns_a, [sys.executable, "-c", SEND_RAW, bed.addr_a, str(PORT),
                                 bed.addr_b, str(PORT), ",".join(["0", "1"] * 150)],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      text=True)
    flood.stdin.write(json.dumps([d.hex() for d in made_up]))
    flood.stdin.close()
    wait_for(lambda: pair.stats("b")["ingress"]["drops"]["bad_tag"] > 1000, 30,
             "the flood to reach b")
    pair.start_side("a")
    wait_ping(bed, bed.ns_a, TUNNEL_B, timeout=TUNNEL_TIMEOUT_S)
    assert flood.poll() is None, "the flood ended before the tunnel was back: inconclusive"
    during = pair.stats("b")
    assert during["aead"]["peer_sessions"] >= 2
    assert flood.wait(120) == 0, flood.stderr.read()
    sent = json.loads(flood.stdout.read())["sent"]
    wait_for(lambda: pair.stats("b")["ingress"]["drops"]["bad_tag"] >= sent, 30,
             f"all {sent} made-up datagrams counted")
    assert_ping(bed, bed.ns_a, TUNNEL_B)
