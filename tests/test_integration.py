"""End to end: two relays (``tunrelay run``), one in each namespace of a
Testbed, and real traffic across the tunnel between them.

Every wait is bounded; nothing asserts throughput.  All traffic goes
between addresses inside the test bed's namespaces.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from _root import bed, make_pair, python, wait_for  # noqa: F401 (bed, make_pair: fixtures)

from tunrelay.testrig.netns import Testbed
from tunrelay.testrig.pair import DEVICE, PORT, TUNNEL6_A, TUNNEL6_B, TUNNEL_A, TUNNEL_B, RelayPair

pytestmark = pytest.mark.root

TRANSFER_BYTES = 8 * 1024 * 1024
TRANSFER_PORT = 5201


# ----------------------------------------------------------------- helpers

def ping(bed: Testbed, ns: str, address: str, count: int = 5) -> subprocess.CompletedProcess:
    # -w: wait (up to 10 s) for the replies instead of ping's default of
    # two round trips after the last request, which a loaded machine's
    # latency spikes exceed.  ping then sends more than ``count`` requests
    # while replies are missing, so loss is judged by sequence numbers.
    argv = ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "2", "-w", "10"]
    if ":" in address:
        argv.append("-6")
    return bed.run(ns, [*argv, address], capture_output=True, text=True, timeout=30)


def wait_ping(bed: Testbed, ns: str, address: str, timeout: float = 15.0) -> None:
    """Until one echo comes back (a tunnel just (re)built may need ARP/ND
    or a reconnection first)."""
    deadline = time.monotonic() + timeout
    while True:
        family = ["-6"] if ":" in address else []
        done = bed.run(ns, ["ping", "-n", "-c", "1", "-W", "1", *family, address],
                       capture_output=True, text=True, timeout=10)
        if done.returncode == 0:
            return
        assert time.monotonic() < deadline, f"no echo from {address} within {timeout} s:\n{done.stdout}"
        time.sleep(0.1)


def assert_ping(bed: Testbed, ns: str, address: str, count: int = 5) -> None:
    """Reachable, then ``count`` echo requests, every one of them answered
    (0 % loss; the tunnel keeps order, so a late reply is not overtaken)."""
    wait_ping(bed, ns, address)
    done = ping(bed, ns, address, count)
    answered = {int(m) for m in re.findall(r"bytes from .*icmp_seq=(\d+)", done.stdout)}
    missing = set(range(1, count + 1)) - answered
    assert done.returncode == 0 and not missing, \
        f"no reply to icmp_seq {sorted(missing)}:\n{done.stdout}{done.stderr}"




def has_device(bed: Testbed, ns: str) -> bool:
    return subprocess.run(["ip", "-n", ns, "link", "show", DEVICE],
                          capture_output=True).returncode == 0


def cli_stats(bed: Testbed, pair: RelayPair, name: str) -> dict:
    """``tunrelay stats --config FILE --json`` run inside the side's namespace."""
    side = pair.sides[name]
    done = bed.run(side.ns, [sys.executable, "-m", "tunrelay", "stats", "--config", side.config_path,
                             "--json"], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)




def drops(snapshot: dict, direction: str = "ingress") -> dict:
    return snapshot[direction]["drops"]


# A receiver: prints "ready" once listening, then answers "<bytes> <sha256>".
RECEIVER = r"""
import hashlib, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(1)
srv.settimeout(30)
print("ready", flush=True)
conn, _ = srv.accept()
conn.settimeout(30)
digest, size = hashlib.sha256(), 0
while True:
    data = conn.recv(1 << 16)
    if not data:
        break
    digest.update(data)
    size += len(data)
conn.sendall(f"{size} {digest.hexdigest()}".encode())
conn.close()
"""

# A sender: random bytes, then prints what it sent and what the receiver saw.
SENDER = r"""
import hashlib, os, socket, sys
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = os.urandom(size)
sock = socket.create_connection((host, port), timeout=30)
sock.sendall(data)
sock.shutdown(socket.SHUT_WR)
reply = b""
while True:
    chunk = sock.recv(4096)
    if not chunk:
        break
    reply += chunk
print(f"{size} {hashlib.sha256(data).hexdigest()}")
print(reply.decode())
"""

# Sends each datagram (hex on argv) from a bound address to a target.
DATAGRAMS = r"""
import socket, sys
bind_host, bind_port, host, port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((bind_host, bind_port))
for payload in sys.argv[5:]:
    sock.sendto(bytes.fromhex(payload), (host, port))
"""

# A TCP client that is not a relay: connects, optionally sends bytes (hex),
# then reports how the server ended the connection ("eof", "reset" or
# "timeout"; what it sent before, if anything, is on stderr).  A server that
# took it for its peer may have sent it a packet from its device (the
# kernel's own chatter) before it read the bad frame and hung up.
RAW_TCP = r"""
import socket, sys
host, port, payload = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
sock = socket.create_connection((host, port), timeout=5)
sock.settimeout(10)
received = 0
try:
    if payload:
        sock.sendall(payload)
    while True:
        data = sock.recv(65536)
        if not data:
            print("eof")
            break
        received += len(data)
except ConnectionResetError:
    print("reset")
except socket.timeout:
    print("timeout")
print(f"received {received} bytes first", file=sys.stderr)
"""


def ipv4_header(total_length: int, src: str = "10.99.0.2", dst: str = TUNNEL_A) -> bytes:
    """A 20-byte IPv4 header (UDP, checksum left zero) claiming total_length."""
    return (bytes([0x45, 0, total_length >> 8, total_length & 0xFF, 0, 0, 0x40, 0, 64, 17, 0, 0])
            + bytes(int(x) for x in src.split(".")) + bytes(int(x) for x in dst.split(".")))


def transfer(bed: Testbed, host: str) -> None:
    """TRANSFER_BYTES of random data from ns a to a receiver in ns b, byte-exact."""
    receiver = bed.popen(bed.ns_b, [sys.executable, "-c", RECEIVER, host, str(TRANSFER_PORT)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The receiver either prints "ready" or dies (EOF): readline is bounded.
        assert receiver.stdout.readline().strip() == "ready", receiver.stderr.read()
        done = python(bed, bed.ns_a, SENDER, host, str(TRANSFER_PORT), str(TRANSFER_BYTES), timeout=60)
        sent, seen = done.stdout.splitlines()[:2]
        assert sent.startswith(f"{TRANSFER_BYTES} ")
        assert seen == sent, "the receiver got different bytes than were sent"
        assert receiver.wait(10) == 0
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()


@pytest.fixture(params=["syscalls", "uring"])
def relay_io(request):
    """Every relay pair of this module runs each TUN I/O engine in turn
    ([relay] io; not on a side that runs the Python engine)."""
    return request.param


# -------------------------------------------------------------------- cases

@pytest.mark.parametrize("protocol,mode", [("udp", "tun"), ("tcp", "tun"), ("udp", "tap")])
def test_tunnel_carries_ping_and_a_byte_exact_transfer(bed, make_pair, protocol, mode, relay_io):
    pair = make_pair(protocol=protocol, mode=mode)
    pair.start()
    assert_ping(bed, bed.ns_a, TUNNEL_B)
    assert_ping(bed, bed.ns_a, TUNNEL6_B)

    transfer(bed, TUNNEL_B)

    snapshots = {name: cli_stats(bed, pair, name) for name in ("a", "b")}
    for name, snapshot in snapshots.items():
        assert snapshot["transport"] == protocol and snapshot["mode"] == mode
        assert snapshot["io"] == relay_io, snapshot
        assert "peers" not in snapshot  # [[peer]] only: point to point is as it was
        assert snapshot["device"] == DEVICE
        for direction in ("egress", "ingress"):
            assert snapshot[direction]["packets"] > 0, (name, direction, snapshot)
            assert snapshot[direction]["bytes"] > 0, (name, direction, snapshot)
    # The transfer's 8 MB (plus headers) went a -> b.
    assert snapshots["a"]["egress"]["bytes"] >= TRANSFER_BYTES
    assert snapshots["b"]["ingress"]["bytes"] >= TRANSFER_BYTES

    for name, ns in (("a", bed.ns_a), ("b", bed.ns_b)):
        assert pair.stop(name) == 0, pair.log(name)
        assert not has_device(bed, ns), f"{DEVICE} left behind in {ns}"
        assert "stopped" in pair.log(name)
        assert "Traceback" not in pair.log(name)


def test_compiled_and_python_engines_interoperate(bed, make_pair):
    pair = make_pair(overrides_a={"relay": ['engine = "python"']})
    pair.start()
    assert pair.stats("a")["engine"] == "python"
    assert pair.stats("b")["engine"] == "fast"
    assert_ping(bed, bed.ns_a, TUNNEL_B)
    assert_ping(bed, bed.ns_b, TUNNEL6_A)
    for name in ("a", "b"):
        snapshot = pair.stats(name)
        assert snapshot["egress"]["packets"] > 0 and snapshot["ingress"]["packets"] > 0
        assert pair.stop(name) == 0, pair.log(name)


def test_tcp_reconnects_after_either_end_is_killed(bed, make_pair):
    pair = make_pair(protocol="tcp")
    pair.start()
    server = f"{bed.addr_a}:{PORT}"
    assert_ping(bed, bed.ns_b, TUNNEL_A)

    # A second client while the real one is connected: refused at once.
    done = python(bed, bed.ns_b, RAW_TCP, bed.addr_a, str(PORT), (b"\x00\x04abcd").hex())
    assert done.stdout.strip() in ("reset", "eof"), done.stdout
    wait_for(lambda: pair.stats("a")["rejected"] >= 1, 5, "the server to count the refusal")
    assert pair.stats("a")["connections"] == 1
    assert "refused connection from" in pair.log("a")
    assert_ping(bed, bed.ns_b, TUNNEL_A)

    # Kill the client; while the server waits, a raw client breaks len16 (a
    # zero length): the server drops that connection and counts it.
    assert pair.stop("b", signal.SIGKILL) == -signal.SIGKILL
    wait_for(lambda: pair.stats("a")["state"] == "listening", 10, "the server to notice the lost client")
    bad_frame = drops(pair.stats("a"))["bad_frame"]
    done = python(bed, bed.ns_b, RAW_TCP, bed.addr_a, str(PORT), (b"\x00\x00").hex())
    assert done.stdout.strip() in ("reset", "eof"), done.stdout
    wait_for(lambda: pair.stats("a")["state"] == "listening", 10, "the server to drop the bad client")
    assert drops(pair.stats("a"))["bad_frame"] == bad_frame + 1

    # Restart the client: the server accepts it and the tunnel works again.
    pair.start_side("b")
    pair.wait_ready("a")
    wait_for(lambda: pair.log("a").count("accepted peer") >= 3, 5, "the server to log the new client")
    assert pair.stats("a")["connections"] == 3  # client, raw client, client again
    assert_ping(bed, bed.ns_b, TUNNEL_A)

    # Kill the server: the client keeps its device and retries with backoff.
    assert pair.stop("a", signal.SIGKILL) == -signal.SIGKILL

    def client_retries(state: str | None = None) -> bool:
        assert has_device(bed, bed.ns_b), "the client's device must survive the server's loss"
        if state is not None:
            return pair.stats("b")["state"] == state
        return "failed" in pair.log("b").split("connection lost")[-1]

    wait_for(lambda: client_retries("connecting"), 10, "the client to notice the lost server")
    wait_for(client_retries, 10, "the client to fail a reconnection attempt")
    time.sleep(0.5)  # a few attempts, with growing delays
    assert client_retries()
    assert not has_device(bed, bed.ns_a)
    pair.start_side("a", wait=False)
    pair.wait_ready("a", "b")  # a: connected (so the client is back), b: connected
    assert has_device(bed, bed.ns_b)
    log_b = pair.log("b").split("Ctrl-C stops")[-1]  # this (restarted) process only
    # At least 2 connections: a dying server may close its connection before
    # its listening socket, so a quick retry can connect once more, then be
    # reset; the client just tries again.
    connections = pair.stats("b")["connections"]
    assert connections >= 2 and log_b.count(f"connected to {server}") == connections, log_b
    assert f"connect to {server} failed" in log_b
    assert_ping(bed, bed.ns_b, TUNNEL_A)
    assert_ping(bed, bed.ns_a, TUNNEL6_B)
    for name in ("a", "b"):
        assert pair.stop(name) == 0, pair.log(name)


def test_udp_garbage_is_dropped_and_counted(bed, make_pair):
    pair = make_pair()
    pair.start()
    assert_ping(bed, bed.ns_a, TUNNEL_B)
    relay = (bed.addr_a, str(PORT))

    well_formed = ipv4_header(28) + bytes(8)
    garbage = [
        os.urandom(200),                     # random bytes
        bytes([0x45]) + bytes(9),            # a truncated IPv4 header
        ipv4_header(1000) + bytes(40),       # an IPv4 packet lying about its length
        well_formed,                         # fine, but not from the peer
    ]
    repeat = 5

    # From a non-peer address (same host as the peer, another port).
    before_a, before_b = pair.stats("a"), pair.stats("b")
    python(bed, bed.ns_b, DATAGRAMS, bed.addr_b, "40000", *relay, *[g.hex() for g in garbage * repeat])
    expected = drops(before_a)["not_peer"] + len(garbage) * repeat
    wait_for(lambda: drops(pair.stats("a"))["not_peer"] >= expected, 10, "the non-peer datagrams")
    time.sleep(0.2)  # anything that would have been written would be by now
    after_a, after_b = pair.stats("a"), pair.stats("b")
    assert drops(after_a)["not_peer"] == expected
    for reason in ("truncated", "bad_length", "bad_version", "empty"):
        assert drops(after_a)[reason] == drops(before_a)[reason], reason
    # Only what relay b sent (its kernel's own chatter) reached a's device.
    assert (after_a["ingress"]["packets"] - before_a["ingress"]["packets"]
            <= after_b["egress"]["packets"] - before_b["egress"]["packets"])
    assert_ping(bed, bed.ns_a, TUNNEL_B)

    # From the peer's own address: relay b must give its port up first.
    assert pair.stop("b") == 0, pair.log("b")
    before = pair.stats("a")
    bad = {
        "empty": b"",
        "truncated": bytes([0x45, 0, 0, 10]) + bytes(6),
        "bad_length": ipv4_header(1000) + bytes(40),
        "bad_version": bytes([0x75]) + bytes(39),
    }
    python(bed, bed.ns_b, DATAGRAMS, bed.addr_b, str(PORT), *relay,
           *[p.hex() for p in bad.values()] * repeat)

    def counted():
        now = drops(pair.stats("a"))
        return all(now[reason] >= drops(before)[reason] + repeat for reason in bad)

    wait_for(counted, 10, "the peer's bad datagrams")
    time.sleep(0.2)
    after = pair.stats("a")
    for reason in bad:
        assert drops(after)[reason] == drops(before)[reason] + repeat, (reason, drops(after))
    assert drops(after)["not_peer"] == drops(before)["not_peer"]
    assert after["ingress"]["packets"] == before["ingress"]["packets"], "garbage reached the device"

    # The relay is unharmed: a new relay b and the tunnel works.
    pair.start_side("b")
    assert_ping(bed, bed.ns_a, TUNNEL_B)
    for name in ("a", "b"):
        assert pair.stop(name) == 0, pair.log(name)


def test_udp_learns_its_peer(bed, make_pair):
    pair = make_pair()
    config_a = pair.sides["a"].config_path
    with open(config_a) as f:
        lines = f.readlines()
    with open(config_a, "w") as f:
        f.writelines(line for line in lines if not line.startswith("peer ="))
    pair.start()
    assert "peer to be learned" in pair.log("a")

    assert_ping(bed, bed.ns_b, TUNNEL_A)   # b -> a first: a learns b from it
    assert_ping(bed, bed.ns_a, TUNNEL_B)   # then a can reach b
    assert_ping(bed, bed.ns_a, TUNNEL6_B)
    assert pair.stats("a")["peer"] == f"{bed.addr_b}:{PORT}"
    wait_for(lambda: f"learned peer {bed.addr_b}:{PORT}" in pair.log("a"), 5,
             "a to log the learned peer")
    for name in ("a", "b"):
        assert pair.stop(name) == 0, pair.log(name)


def test_run_reports_configuration_and_runtime_errors(bed, make_pair):
    run = [sys.executable, "-m", "tunrelay", "run", "--config"]

    pair = make_pair(overrides_a={"transport": ["bogus = 1"]})
    path = pair.sides["a"].config_path
    done = bed.run(bed.ns_a, [*run, path], capture_output=True, text=True, timeout=20)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert path in lines[0] and "bogus" in lines[0], lines[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert not has_device(bed, bed.ns_a)

    pair = make_pair(overrides_a={"transport": ['listen = "198.18.0.77:55555"']})
    done = bed.run(bed.ns_a, [*run, pair.sides["a"].config_path], capture_output=True, text=True,
                   timeout=20)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("tunrelay: ") and "198.18.0.77:55555" in last, done.stderr
    assert "not an address of this host" in last, last
    assert not has_device(bed, bed.ns_a), "a failed start left its device behind"


# ------------------------------------------------- fast-path variants

def _aead_overrides(workdir: str) -> dict:
    """Both sides: framing aead with one freshly made key file (mode 600)."""
    from tunrelay.aead import genkey
    key_file = os.path.join(workdir, "relay.key")
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(genkey() + "\n")
    return {"transport": ['framing = "aead"'], "security": [f'key_file = "{key_file}"']}


# (protocol, overrides for both sides, overrides for side a only)
VARIANTS = {
    "udp-offload-off": ("udp", {"relay": ["offload = false"]}, None),
    "udp-offload-mixed": ("udp", None, {"relay": ["offload = false"]}),
    "tcp-offload-off": ("tcp", {"relay": ["offload = false"]}, None),
    "tcp-offload-mixed": ("tcp", None, {"relay": ["offload = false"]}),
    "udp-queues-2": ("udp", {"device": ["queues = 2"]}, None),
    "udp-queues-2-offload-off": ("udp", {"device": ["queues = 2"], "relay": ["offload = false"]}, None),
    "udp-aead": ("udp", "aead", None),
    "udp-aead-aes-offload-off": ("udp", "aead-aes", {"relay": ["offload = false"]}),
    "udp-aead-queues-2": ("udp", "aead-q2", None),
    "tcp-aead": ("tcp", "aead", None),
    "tcp-aead-offload-mixed": ("tcp", "aead", {"relay": ["offload = false"]}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fast_path_variants_carry_traffic_byte_exact(bed, make_pair, tmp_path, variant):
    """Offloads on, off and mixed (one side each way), two queues, and the
    aead framing: the same ping and byte-exact transfer pass in each."""
    protocol, both, side_a = VARIANTS[variant]
    if isinstance(both, str):
        both = _aead_overrides(str(tmp_path))
        if variant.startswith("udp-aead-aes"):
            both["security"].append('cipher = "aes-256-gcm"')
        if variant.endswith("queues-2"):
            both["device"] = ["queues = 2"]
    pair = make_pair(protocol=protocol, overrides=both, overrides_a=side_a)
    pair.start()
    assert_ping(bed, bed.ns_a, TUNNEL_B)
    assert_ping(bed, bed.ns_a, TUNNEL6_B)
    transfer(bed, TUNNEL_B)
    for name in ("a", "b"):
        snapshot = cli_stats(bed, pair, name)
        dropped = {k: v for k, v in snapshot["ingress"]["drops"].items() if v}
        assert not dropped, (name, dropped)
        if "queues-2" in variant:
            assert snapshot["queues"] == 2
        if "aead" in variant:
            assert snapshot["aead"]["peer_sessions"] >= 1
    for name in ("a", "b"):
        assert pair.stop(name) == 0, pair.log(name)


@pytest.mark.parametrize("engine", ["fast", "python"])
def test_link_local_ipv6_peers_keep_their_scope(bed, make_pair, engine):
    """Underlay peers given as "[fe80::..%veth]:port" (finding 12 of issue
    7): the scope (the interface) reaches the socket calls, and the tunnel
    carries ping and a byte-exact transfer.  Without the scope, sendto()
    fails with EINVAL and nothing crosses."""
    for ns, dev, address in ((bed.ns_a, bed.veth_a, "fe80::a"), (bed.ns_b, bed.veth_b, "fe80::b")):
        bed.run(ns, ["ip", "addr", "add", f"{address}/64", "dev", dev, "nodad"], check=True)
    pair = make_pair(
        overrides={"relay": [f'engine = "{engine}"']},
        overrides_a={"transport": [f'listen = "[::]:{PORT}"',
                                   f'peer = "[fe80::b%{bed.veth_a}]:{PORT}"']},
        overrides_b={"transport": [f'listen = "[::]:{PORT}"',
                                   f'peer = "[fe80::a%{bed.veth_b}]:{PORT}"']})
    pair.start()
    assert_ping(bed, bed.ns_a, TUNNEL_B)
    transfer(bed, TUNNEL_B)
    assert pair.stats("a")["peer"] == f"[fe80::b%{bed.veth_a}]:{PORT}"
    for name in ("a", "b"):
        assert pair.stop(name) == 0, pair.log(name)
