"""MSS clamping across a path MTU black hole, as root.

The case clamping exists for: the hosts talking through the tunnel sit on
links with a larger MTU than the tunnel's, and the ICMP that path MTU
discovery needs ("fragmentation needed", "packet too big") never reaches
them.  Four namespaces:

    c (client) --LAN 1500-- a [relay] ==tunnel, MTU 1400== [relay] b --LAN 1500-- s (server)

a and b forward between their LAN and the tunnel device.  Their own ICMP
errors towards the LANs are blackholed by a policy rule (``ip rule ...
ipproto icmp ... blackhole``: the routers' ICMP finds no route), so a
1500-byte packet that meets the 1400-byte tunnel is dropped without a
word, as behind a firewall that filters ICMP.  c and s each announce MSS
1460 (IPv4) or 1440 (IPv6): their own links' MTU.

- Control (no clamping): the black hole is real (a 1500-byte ping with DF
  gets neither an answer nor an ICMP error, and c learns no path MTU), and
  the server's MSS to the client is above what fits the tunnel: its full
  segments would vanish in it.
- With ``mss_clamp`` (auto: 1360 / 1340 for MTU 1400), on one relay or on
  both, over UDP with offloads on and off, and over TCP: both ends' MSS
  fits the tunnel, and a 2 MiB transfer each way arrives byte for byte.
  The relays' counters say which side clamped what: with one clamping
  relay, that one lowers the client's SYN on its way in (ingress) and the
  server's SYN-ACK on its way out (egress).

No timing is asserted: waits are bounded, results are bytes and MSS values.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys

import pytest
from _root import bed, make_pair  # noqa: F401 (fixtures)

from tunrelay.testrig.netns import add_veth, set_sysctl

pytestmark = pytest.mark.root

MTU = 1400
AUTO = {4: MTU - 40, 6: MTU - 60}
LAN_A = {4: ("10.98.1.1", "10.98.1.2", "10.98.1.0/24"),
         6: ("fd00:98:1::1", "fd00:98:1::2", "fd00:98:1::/64")}
LAN_B = {4: ("10.98.2.1", "10.98.2.2", "10.98.2.0/24"),
         6: ("fd00:98:2::1", "fd00:98:2::2", "fd00:98:2::/64")}
INNER = {4: "10.98.0.0/16", 6: "fd00:98::/32"}
PORT = 5201
SIZE = 2 * 1024 * 1024
IO_TIMEOUT = 30

SERVER = r"""
import hashlib, json, random, socket, sys
host, size = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
server = socket.socket(family, socket.SOCK_STREAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((host, int(sys.argv[3])))
server.listen(1)
server.settimeout(60)
conn, _ = server.accept()
conn.settimeout(30)
mss = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
got = bytearray()
while len(got) < size:
    chunk = conn.recv(1 << 16)
    if not chunk:
        break
    got += chunk
if size:
    conn.sendall(random.Random(2).randbytes(size))
conn.shutdown(socket.SHUT_WR)
conn.recv(1)
print(json.dumps({"mss": mss, "length": len(got), "sha256": hashlib.sha256(got).hexdigest()}))
"""

CLIENT = r"""
import hashlib, json, random, socket, sys, time
host, size, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + 15
while True:
    try:
        conn = socket.create_connection((host, port), timeout=30)
        break
    except ConnectionRefusedError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
mss = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
if size:
    conn.sendall(random.Random(1).randbytes(size))
conn.shutdown(socket.SHUT_WR)
got = bytearray()
while True:
    chunk = conn.recv(1 << 16)
    if not chunk:
        break
    got += chunk
print(json.dumps({"mss": mss, "length": len(got), "sha256": hashlib.sha256(got).hexdigest()}))
"""


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr}"


def build(bed, make_pair, *, clamp_a: str, clamp_b: str, protocol: str = "udp",
          offload: str = '"auto"'):
    """The four namespaces, the black hole and the relays; returns
    (pair, client namespace, server namespace)."""
    ns_c, ns_s = f"{bed.base}c", f"{bed.base}s"
    for ns in (ns_c, ns_s):
        bed.add_namespace(ns)
    for router, host, lan, tag in ((bed.ns_a, ns_c, LAN_A, "c"), (bed.ns_b, ns_s, LAN_B, "s")):
        add_veth(router, f"lan{tag}", host, "lan0", [
            (router, f"lan{tag}", f"{lan[4][0]}/24"), (router, f"lan{tag}", f"{lan[6][0]}/64"),
            (host, "lan0", f"{lan[4][1]}/24"), (host, "lan0", f"{lan[6][1]}/64")])
        ip("-n", host, "route", "add", "default", "via", lan[4][0])
        ip("-n", host, "-6", "route", "add", "default", "via", lan[6][0])
        set_sysctl(router, "net/ipv4/ip_forward", "1")
        set_sysctl(router, "net/ipv6/conf/all/forwarding", "1")
        # The black hole: ICMP the router itself sends towards the inner
        # networks finds no route (PMTU discovery is blind from here on).
        ip("-n", router, "rule", "add", "pref", "100", "iif", "lo", "ipproto", "1",
           "to", INNER[4], "blackhole")
        ip("-n", router, "-6", "rule", "add", "pref", "100", "iif", "lo", "ipproto", "58",
           "to", INNER[6], "blackhole")

    def relay(clamp: str, far: dict) -> dict:
        return {"device": [f'routes = ["{far[4][2]}", "{far[6][2]}"]'],
                "relay": [f"mss_clamp = {clamp}", f"offload = {offload}"]}

    pair = make_pair(protocol=protocol, mtu=MTU, overrides_a=relay(clamp_a, LAN_B),
                     overrides_b=relay(clamp_b, LAN_A))
    pair.start()
    return pair, ns_c, ns_s


def transfer(bed, ns_c: str, ns_s: str, version: int, size: int) -> tuple[dict, dict]:
    """A TCP connection from c to s: `size` bytes each way.  The two ends'
    reports: MSS at the start, bytes received and their SHA-256."""
    host = LAN_B[version][1]
    server = bed.popen(ns_s, [sys.executable, "-c", SERVER, host, str(size), str(PORT)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # (The client retries until the server listens.)
    client = bed.run(ns_c, [sys.executable, "-c", CLIENT, host, str(size), str(PORT)],
                     capture_output=True, text=True, timeout=120)
    try:
        out, err = server.communicate(timeout=IO_TIMEOUT)
    except subprocess.TimeoutExpired:
        server.kill()
        out, err = server.communicate()
    assert client.returncode == 0, f"client: {client.stderr}"
    assert server.returncode == 0, f"server: {err}"
    return json.loads(client.stdout), json.loads(out)


def digest(seed: int, size: int) -> str:
    return hashlib.sha256(random.Random(seed).randbytes(size)).hexdigest()


def counters(pair, side: str) -> dict:
    stats = pair.stats(side)
    return {d: stats[d]["mss_clamped"] for d in ("egress", "ingress")}


# ---------------------------------------------------------------- without clamping

@pytest.mark.parametrize("version", [4, 6], ids=["ipv4", "ipv6"])
def test_without_clamping_the_path_is_a_black_hole(bed, make_pair, version):
    pair, ns_c, ns_s = build(bed, make_pair, clamp_a="false", clamp_b="false")
    target = LAN_B[version][1]
    # Small packets cross; a full-sized one with DF set vanishes, and no
    # ICMP error tells c the path's MTU.
    family = ["-6"] if version == 6 else []
    small = bed.run(ns_c, ["ping", "-n", *family, "-c", "1", "-W", "5", target],
                    capture_output=True, text=True, timeout=30)
    assert small.returncode == 0, small.stdout + small.stderr
    payload = str(1500 - (28 if version == 4 else 48))
    big = bed.run(ns_c, ["ping", "-n", *family, "-c", "1", "-W", "2", "-M", "do", "-s", payload,
                         target], capture_output=True, text=True, timeout=30)
    assert big.returncode != 0, big.stdout
    assert "mtu" not in (big.stdout + big.stderr).lower(), "an ICMP error got through"
    route = bed.run(ns_c, ["ip", *family, "route", "get", target], capture_output=True,
                    text=True, timeout=10)
    assert " mtu " not in route.stdout, f"c learned a path MTU: {route.stdout}"
    # The handshake crosses (small packets) and leaves both ends with an
    # MSS whose full segments do not fit the tunnel.
    client, server = transfer(bed, ns_c, ns_s, version, 0)
    assert client["mss"] > AUTO[version] and server["mss"] > AUTO[version], (client, server)
    assert counters(pair, "a") == counters(pair, "b") == {"egress": 0, "ingress": 0}


# ---------------------------------------------------------------- with clamping

CASES = [
    pytest.param(4, "udp", '"auto"', "b", id="ipv4-udp-offload-b-clamps"),
    pytest.param(6, "udp", '"auto"', "both", id="ipv6-udp-offload-both-clamp"),
    pytest.param(4, "udp", "false", "both", id="ipv4-udp-no-offload-both-clamp"),
    pytest.param(6, "udp", "false", "b", id="ipv6-udp-no-offload-b-clamps"),
    pytest.param(4, "tcp", '"auto"', "b", id="ipv4-tcp-b-clamps"),
]


@pytest.mark.parametrize("version,protocol,offload,who", CASES)
def test_clamping_carries_tcp_through_the_black_hole(bed, make_pair, version, protocol,
                                                      offload, who):
    pair, ns_c, ns_s = build(bed, make_pair, clamp_a='"auto"' if who == "both" else "false",
                             clamp_b='"auto"', protocol=protocol, offload=offload)
    client, server = transfer(bed, ns_c, ns_s, version, SIZE)
    # TCP_MAXSEG: the MSS a socket sends with, less its options (12 bytes of
    # timestamps): at most the clamp on both ends.
    assert client["mss"] <= AUTO[version] and server["mss"] <= AUTO[version], (client, server)
    assert (server["length"], server["sha256"]) == (SIZE, digest(1, SIZE))
    assert (client["length"], client["sha256"]) == (SIZE, digest(2, SIZE))
    a, b = counters(pair, "a"), counters(pair, "b")
    if who == "both":
        # Each SYN was lowered by the first relay it met, on its way out.
        assert a["egress"] >= 1 and b["egress"] >= 1 and a["ingress"] == b["ingress"] == 0, (a, b)
    else:
        # b alone: the client's SYN on its way in, the server's SYN-ACK on its way out.
        assert b["ingress"] >= 1 and b["egress"] >= 1 and a == {"egress": 0, "ingress": 0}, (a, b)
