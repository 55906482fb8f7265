"""A hub with two spokes: ``tunrelay run`` with [[peer]] tables in the hub
namespace of a Star, and a plain point-to-point relay in each spoke whose
[transport] peer is the hub.

Inner addresses: hub 10.77.0.1/24 + fd77::1/64, spoke1 .2 / ::2, spoke2
.3 / ::3.  On the hub each spoke's allowed_ips are its /32 and /128; the
spokes route the whole /24 (/64) into their tunnel, so spoke1 reaches
spoke2 through the hub's kernel (forwarding on in the hub's namespace).

spoke1 is configured with its endpoint (IPv4 underlay, seen as
::ffff:198.18.1.2 by the hub's dual-stack socket); spoke2 has none and
roaming = true, so the hub learns it (IPv6 underlay) from its first
datagram.

One star and three relays serve the whole module (the setup is the slow
part); each test makes the traffic it checks.  Every wait is bounded; no
assertion depends on timing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

import pytest
from _root import REPO, python, require_root, wait_for
from test_integration import RECEIVER, SENDER, assert_ping

from tunrelay.daemon.stats import format_peers, query
from tunrelay.errors import TunrelayError
from tunrelay.testrig.hub import Star

PORT = 55555
HUB, HUB6 = "10.77.0.1", "fd77::1"
SPOKE = {1: ("10.77.0.2", "fd77::2"), 2: ("10.77.0.3", "fd77::3")}
LISTEN_PORT = 7777        # a UDP listener on the hub's inner addresses
TRANSFER_PORT = 5202
TRANSFER_BYTES = 3 * 1024 * 1024
READY_TIMEOUT_S = 15.0


# ------------------------------------------------------------- the relays

class Relays:
    """Relays started through the CLI in a Star's namespaces, each with its
    config file, control socket and log in ``workdir``."""

    def __init__(self, star: Star, workdir: str) -> None:
        self.star, self.workdir = star, workdir
        self.procs: dict[str, subprocess.Popen] = {}
        self.ns: dict[str, str] = {}
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (REPO, os.environ.get("PYTHONPATH")) if p))

    def path(self, name: str, suffix: str) -> str:
        return os.path.join(self.workdir, f"{name}.{suffix}")

    def start(self, name: str, ns: str, config: str) -> None:
        with open(self.path(name, "toml"), "w") as f:
            f.write(config + f'\n[stats]\nsocket = "{self.path(name, "sock")}"\n')
        with open(self.path(name, "log"), "ab") as log:
            self.procs[name] = self.star.popen(
                ns, [sys.executable, "-m", "tunrelay", "run", "--config", self.path(name, "toml")],
                stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.ns[name] = ns

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        for name, proc in self.procs.items():
            while True:
                assert proc.poll() is None, f"relay {name} exited with {proc.returncode}:\n{self.log(name)}"
                try:
                    if query(self.path(name, "sock"), timeout=1)["state"] == "running":
                        break
                except TunrelayError:
                    pass
                assert time.monotonic() < deadline, f"relay {name} not ready:\n{self.log(name)}"
                time.sleep(0.05)

    def stats(self, name: str) -> dict:
        return query(self.path(name, "sock"))

    def cli_stats(self, name: str, *json_flag: str) -> str:
        """``tunrelay stats --config FILE [--json]``, run in the relay's namespace."""
        done = self.star.run(self.ns[name], [sys.executable, "-m", "tunrelay", "stats", "--config",
                                             self.path(name, "toml"), *json_flag],
                             capture_output=True, text=True, timeout=20, env=self.env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def log(self, name: str) -> str:
        with open(self.path(name, "log"), errors="replace") as f:
            return f.read()

    def stop_all(self) -> dict[str, int]:
        codes = {}
        for name, proc in self.procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            codes[name] = proc.returncode
        return codes


def hub_config(star: Star, device: str = "", relay: str = "") -> str:
    """The hub's file; ``device`` and ``relay``: more lines for those tables."""
    s1 = star.spokes[0]
    return f"""
[device]
name = "trhub0"
address = ["{HUB}/24", "{HUB6}/64"]
{device}
[relay]
{relay}

[transport]
listen = "[::]:{PORT}"

[[peer]]
name = "spoke1"
endpoint = "{s1.addr}:{PORT}"
allowed_ips = ["{SPOKE[1][0]}/32", "{SPOKE[1][1]}/128"]

[[peer]]
name = "spoke2"
roaming = true
allowed_ips = ["{SPOKE[2][0]}/32", "{SPOKE[2][1]}/128"]
"""


def spoke_config(star: Star, index: int) -> str:
    s = star.spokes[index - 1]
    if index == 1:
        listen, peer = f"{s.addr}:{PORT}", f"{s.hub_addr}:{PORT}"
    else:  # spoke2 crosses an IPv6 underlay
        listen, peer = f"[{s.addr6}]:{PORT}", f"[{s.hub_addr6}]:{PORT}"
    v4, v6 = SPOKE[index]
    return f"""
[device]
name = "trtun0"
address = ["{v4}/24", "{v6}/64"]

[transport]
listen = "{listen}"
peer = "{peer}"
"""


@contextlib.contextmanager
def running_hub(device: str = "", relay: str = ""):
    """A star, the hub relay (``device``, ``relay``: more lines for its
    tables) and
    both spoke relays, running, with spoke2 already learned by the hub.
    Stopped (each must exit 0) and removed afterwards, also when the body
    failed; the logs are printed (shown on failure)."""
    require_root()
    workdir = tempfile.mkdtemp(prefix="trh-")  # short: sun_path
    with Star(spokes=2) as star:
        relays = Relays(star, workdir)
        try:
            relays.start("hub", star.hub, hub_config(star, device, relay))
            for index in (1, 2):
                relays.start(f"spoke{index}", star.spokes[index - 1].ns, spoke_config(star, index))
            relays.wait_ready()
            # spoke2's first datagram tells the hub where it is.
            assert_ping(star, star.spokes[1].ns, HUB, count=1)
            yield star, relays
            codes = relays.stop_all()
            assert codes == {"hub": 0, "spoke1": 0, "spoke2": 0}, codes
            assert "Traceback" not in relays.log("hub")
        finally:
            relays.stop_all()
            for name in relays.procs:
                print(f"----- relay {name} log -----\n{relays.log(name)}")
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def hub():
    """One running hub and its spokes for the module's tests."""
    with running_hub() as running:
        yield running


def spoke_ns(star: Star, index: int) -> str:
    return star.spokes[index - 1].ns


# ------------------------------------------------------------ crafted packets

def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_packet(src: str, dst: str, dport: int, payload: bytes, sport: int = 40001) -> bytes:
    """An IPv4 or IPv6 UDP packet with correct checksums: one the hub's
    kernel delivers to a listener on ``dst`` if it reaches the device."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    length = 8 + len(payload)
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, 17, length)
    else:
        pseudo = s.packed + d.packed + struct.pack("!IxxxB", length, 17)
    udp = struct.pack("!HHHH", sport, dport, length, 0) + payload
    udp = udp[:6] + struct.pack("!H", _checksum(pseudo + udp) or 0xFFFF) + udp[8:]
    if s.version == 4:
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0, 64, 17, 0,
                             s.packed, d.packed)
        return header[:10] + struct.pack("!H", _checksum(header)) + header[12:] + udp
    return struct.pack("!IHBB16s16s", 0x60000000, length, 17, 64, s.packed, d.packed) + udp


# Prints each datagram received on the given addresses, one per line, until
# it has seen as many "end" datagrams as addresses (or 30 s of silence).
LISTENER = r"""
import select, socket, sys
port, hosts = int(sys.argv[1]), sys.argv[2:]
socks = []
for host in hosts:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    socks.append(sock)
print("ready", flush=True)
ends = 0
while ends < len(socks):
    ready, _, _ = select.select(socks, [], [], 30)
    if not ready:
        print("timeout", flush=True)
        break
    for sock in ready:
        data = sock.recv(4096).decode(errors="replace")
        print(data, flush=True)
        ends += data.startswith("end")
"""

# Sends each datagram (hex) from a bound (host, port) to a target.
DATAGRAMS = r"""
import socket, sys
bind_host, bind_port, host, port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((bind_host, bind_port))
for payload in sys.argv[5:]:
    sock.sendto(bytes.fromhex(payload), (host, port))
"""

# Writes each IP packet (hex) as is, through a raw socket: in a spoke's
# namespace it is routed into the spoke's tunnel, whatever its source.
INJECT = r"""
import socket, sys
for text in sys.argv[1:]:
    packet = bytes.fromhex(text)
    if packet[0] >> 4 == 4:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        sock.sendto(packet, (socket.inet_ntop(socket.AF_INET, packet[16:20]), 0))
    else:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        sock.sendto(packet, (socket.inet_ntop(socket.AF_INET6, packet[24:40]), 0))
    sock.close()
"""


def hub_drops(relays: Relays) -> dict:
    return relays.stats("hub")["ingress"]["drops"]


# ------------------------------------------------------------------ tests

@pytest.mark.root
@pytest.mark.parametrize("target", [SPOKE[2][0], SPOKE[2][1]])
def test_spokes_ping_each_other_through_the_hub(hub, target):
    star, relays = hub
    assert_ping(star, spoke_ns(star, 1), target)
    assert_ping(star, spoke_ns(star, 2), SPOKE[1][0] if "." in target else SPOKE[1][1])


def transfer(star: Star, host: str) -> None:
    """TRANSFER_BYTES of random data from spoke1 to a receiver on ``host``
    in spoke2, checked byte for byte (sha256)."""
    receiver = star.popen(spoke_ns(star, 2), [sys.executable, "-c", RECEIVER, host,
                                              str(TRANSFER_PORT)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout.readline().strip() == "ready", receiver.stderr.read()
        done = python(star, spoke_ns(star, 1), SENDER, host, str(TRANSFER_PORT),
                      str(TRANSFER_BYTES), timeout=60)
        sent, seen = done.stdout.splitlines()[:2]
        assert sent.startswith(f"{TRANSFER_BYTES} ")
        assert seen == sent, "spoke2 got different bytes than spoke1 sent"
        assert receiver.wait(10) == 0
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()


@pytest.mark.root
@pytest.mark.parametrize("family", [4, 6])
def test_a_transfer_from_spoke_to_spoke_is_byte_exact(hub, family):
    star, relays = hub
    transfer(star, SPOKE[2][0] if family == 4 else SPOKE[2][1])
    assert relays.stats("hub")["egress"]["drops"]["send_error"] == 0


@pytest.mark.root
def test_a_two_queue_hub_without_offloads_shares_its_peers(tmp_path):
    """Two queues: two pumps on one PeerTable, so spoke2's endpoint, learned
    by whichever queue its first datagram reached, is known to both."""
    with running_hub(device="queues = 2", relay="offload = false") as (star, relays):
        snapshot = relays.stats("hub")
        assert snapshot["queues"] == 2 and not snapshot["offload"]["vnet_hdr"]
        for target in (SPOKE[2][0], SPOKE[2][1]):
            assert_ping(star, spoke_ns(star, 1), target)
        no_peer = relays.stats("hub")["egress"]["drops"]["no_peer"]
        transfer(star, SPOKE[2][1])
        after = relays.stats("hub")
        assert after["peers"]["spoke2"]["egress"]["bytes"] >= TRANSFER_BYTES
        assert after["egress"]["drops"]["no_peer"] == no_peer, "a queue did not know spoke2"


@pytest.mark.root
def test_stats_show_per_peer_counters(hub):
    star, relays = hub
    before = relays.stats("hub")["peers"]
    assert_ping(star, spoke_ns(star, 1), SPOKE[2][0], count=3)
    snapshot = json.loads(relays.cli_stats("hub", "--json"))
    peers = snapshot["peers"]
    assert set(peers) == {"spoke1", "spoke2"}
    assert peers["spoke1"]["endpoint"] == f"{star.spokes[0].addr}:{PORT}"
    assert peers["spoke2"]["endpoint"] == f"[{star.spokes[1].addr6}]:{PORT}"  # learned
    assert peers["spoke1"]["roaming"] is False and peers["spoke2"]["roaming"] is True
    assert peers["spoke1"]["allowed_ips"] == [f"{SPOKE[1][0]}/32", f"{SPOKE[1][1]}/128"]
    for name in ("spoke1", "spoke2"):
        for direction in ("ingress", "egress"):
            for counter in ("packets", "bytes"):
                assert peers[name][direction][counter] > before[name][direction][counter], \
                    (name, direction, counter, peers[name])
        assert peers[name]["last_seen"] is not None and peers[name]["last_seen"] <= time.time()
    assert peers["spoke2"]["roams"] >= 1  # learned
    assert peers["spoke1"]["roams"] == 0
    assert snapshot["peer"] is None and "2 [[peer]]" in snapshot["peer_mode"]
    # The relay-wide counters still add every queue up.
    assert snapshot["ingress"]["packets"] >= sum(p["ingress"]["packets"] for p in peers.values())

    text = relays.cli_stats("hub")
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("spoke")}
    assert set(lines) == {"spoke1", "spoke2"}, text
    assert f"{star.spokes[0].addr}:{PORT}" in lines["spoke1"] and "s ago" in lines["spoke1"]
    assert "learned" in relays.log("hub") and "peer spoke2: at" in relays.log("hub")


@pytest.mark.root
def test_strangers_and_spoofed_sources_never_reach_the_hubs_device(hub):
    """Datagrams from an endpoint that is no peer's (not_peer), and packets
    from spoke1's own endpoint whose inner source is not spoke1's
    (not_allowed), are dropped and counted; the same listener on the hub
    gets the control packets sent the proper way, and nothing else."""
    star, relays = hub
    s1, s2 = star.spokes
    listener = star.popen(star.hub, [sys.executable, "-c", LISTENER, str(LISTEN_PORT), HUB, HUB6],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "ready", listener.stderr.read()
        # From spoke1's host and spoke2's host, but not from their relays'
        # ports: sources inside spoke1's allowed IPs (not roaming: its
        # endpoint stays) and inside nobody's.  (Sources of spoke2, which
        # roams, would move its endpoint: raw framing authenticates nothing.)
        strangers = [udp_packet(src, dst, LISTEN_PORT, f"stranger {src}".encode())
                     for src, dst in ((SPOKE[1][0], HUB), ("10.77.0.99", HUB),
                                      (SPOKE[1][1], HUB6), ("fd77::99", HUB6))]
        before = hub_drops(relays)
        python(star, s1.ns, DATAGRAMS, s1.addr, "40000", s1.hub_addr, str(PORT),
               *[p.hex() for p in strangers])
        python(star, s2.ns, DATAGRAMS, s2.addr6, "40000", s2.hub_addr6, str(PORT),
               *[p.hex() for p in strangers])
        # Through spoke1's tunnel, so from its real endpoint, with sources
        # that are spoke2's or nobody's.
        spoofed = [udp_packet(src, dst, LISTEN_PORT, f"spoofed {src}".encode())
                   for src, dst in ((SPOKE[2][0], HUB), ("10.77.0.99", HUB),
                                    (SPOKE[2][1], HUB6), ("fd77::99", HUB6))]
        spoke1_drops = relays.stats("hub")["peers"]["spoke1"]["ingress"]["drops"]
        python(star, s1.ns, INJECT, *[p.hex() for p in spoofed])

        def counted():
            now = hub_drops(relays)
            return (now["not_peer"] >= before["not_peer"] + 2 * len(strangers)
                    and now["not_allowed"] >= before["not_allowed"] + len(spoofed))

        wait_for(counted, 10, "the hub to count the strangers' and the spoofed datagrams")
        peers = relays.stats("hub")["peers"]
        assert peers["spoke1"]["ingress"]["drops"] >= spoke1_drops + len(spoofed)
        assert peers["spoke1"]["endpoint"] == f"{s1.addr}:{PORT}", "a stranger moved spoke1"
        assert peers["spoke2"]["endpoint"] == f"[{s2.addr6}]:{PORT}", "a spoofed source moved spoke2"

        # The control: the same kind of packet, sent the proper way, arrives.
        python(star, s1.ns, INJECT, *[udp_packet(src, dst, LISTEN_PORT, b"end").hex()
                                      for src, dst in ((SPOKE[1][0], HUB), (SPOKE[1][1], HUB6))])
        out, err = listener.communicate(timeout=40)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.communicate()
    received = [line for line in out.splitlines() if line]
    assert received == ["end", "end"], (received, err)


# ------------------------------------------------------------ without root

@pytest.mark.parametrize("forwarding", [("0", "1"), ("1", "0"), ("0", "0"), ("1", "1")])
def test_a_hub_warns_when_forwarding_is_off(tmp_path, monkeypatch, caplog, forwarding):
    from tunrelay.daemon import relay
    from tunrelay.daemon.config import loads
    paths = {}
    for version, value in zip((4, 6), forwarding):
        paths[version] = tmp_path / f"forward{version}"
        paths[version].write_text(value + "\n")
    monkeypatch.setattr(relay, "_FORWARDING", paths)
    cfg = loads('[[peer]]\nname = "a"\nendpoint = "192.0.2.1:1"\nallowed_ips = ["10.0.0.2/32"]\n'
                '[[peer]]\nname = "b"\nendpoint = "192.0.2.2:1"\n'
                'allowed_ips = ["10.0.0.3/32", "fd00::3/128"]\n')
    with caplog.at_level("WARNING", logger="tunrelay.daemon.relay"):
        relay._warn_if_not_forwarding(cfg.peers)
    warned = {version for version in (4, 6) if f"IPv{version} forwarding is off" in caplog.text}
    assert warned == {version for version, value in zip((4, 6), forwarding) if value == "0"}
    if warned:
        assert "only through the kernel" in caplog.text


def test_an_ipv4_only_hub_is_not_warned_about_ipv6(tmp_path, monkeypatch, caplog):
    from tunrelay.daemon import relay
    from tunrelay.daemon.config import loads
    (tmp_path / "off").write_text("0\n")
    (tmp_path / "on").write_text("1\n")
    monkeypatch.setattr(relay, "_FORWARDING", {4: tmp_path / "on", 6: tmp_path / "off"})
    cfg = loads('[[peer]]\nname = "a"\nendpoint = "192.0.2.1:1"\nallowed_ips = ["10.0.0.2/32"]\n'
                '[[peer]]\nname = "b"\nendpoint = "192.0.2.2:1"\nallowed_ips = ["10.0.0.3/32"]\n')
    with caplog.at_level("WARNING", logger="tunrelay.daemon.relay"):
        relay._warn_if_not_forwarding(cfg.peers)
    assert "forwarding" not in caplog.text


def test_format_peers_one_line_each():
    peer = {"endpoint": "192.0.2.1:55555", "last_seen": 100.0, "roams": 0,
            "ingress": {"packets": 3, "bytes": 300, "drops": 1, "keepalives": 0},
            "egress": {"packets": 4, "bytes": 400, "drops": 2}}
    lines = format_peers({"spoke1": peer, "spoke2": {**peer, "endpoint": None, "last_seen": None}},
                         now=102.5)
    assert len(lines) == 3
    assert lines[1].split() == ["spoke1", "192.0.2.1:55555", "2.5", "s", "ago", "3", "300", "4",
                                "400", "1/2"]
    assert lines[2].split()[:3] == ["spoke2", "(unknown)", "never"]


def test_endpoints_are_given_in_the_sockets_own_form():
    """A dual-stack socket reports IPv4 senders as ::ffff:a.b.c.d: an IPv4
    [[peer]] endpoint must be given to the table in that form, or its
    datagrams would be not_peer."""
    from tunrelay.daemon.config import Endpoint
    from tunrelay.daemon.transport import resolve_for_socket
    from tunrelay.errors import TransportError
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as dual:
        dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        dual.bind(("::", 0))
        assert resolve_for_socket(Endpoint("192.0.2.7", 5), dual, "peer")[:2] == ("::ffff:192.0.2.7", 5)
        assert resolve_for_socket(Endpoint("2001:db8::7", 5), dual, "peer")[:2] == ("2001:db8::7", 5)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as v4:
        v4.bind(("127.0.0.1", 0))
        assert resolve_for_socket(Endpoint("192.0.2.7", 5), v4, "peer") == ("192.0.2.7", 5)
        with pytest.raises(TransportError, match="reaches both families"):
            resolve_for_socket(Endpoint("2001:db8::7", 5), v4, "peer 'x' endpoint")
