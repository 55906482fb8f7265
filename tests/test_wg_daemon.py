"""`tunrelay run` as a WireGuard device, both ways of configuring it, in
two network namespaces (a Testbed) joined by a veth.

Side A runs `tunrelay run --config a.toml` with framing = "wireguard",
bound to its underlay address, two queues, a pre-shared key and
[security] user = "nobody" (privileges dropped once the device and
sockets are open).
Side B runs `tunrelay run --wg-config <name>.conf`, a wg-quick file with
a PostUp hook (ignored) and no Endpoint for A: B learns where A is from
A's handshake, as a WireGuard server learns its clients.  Its interface
name comes from the file name, its control socket is the default
/run/tunrelay/<name>.sock (unique: the name carries the test bed's).

Inner addresses: A 10.66.0.1/24 + fd66::1/64, B 10.66.0.2/24 + fd66::2/64.

One test bed and two relays serve the module; the last test stops them
with SIGTERM and checks they exit cleanly.  Every wait is bounded; no
assertion depends on timing.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from _root import REPO, python, require_root, wait_for
from test_integration import RECEIVER, SENDER, assert_ping

from tunrelay.daemon.stats import query
from tunrelay.errors import TunrelayError
from tunrelay.testrig.netns import Testbed
from tunrelay.wireguard.noise import generate_private_key, key_to_base64, private_to_public

pytestmark = pytest.mark.root

A, A6 = "10.66.0.1", "fd66::1"
B, B6 = "10.66.0.2", "fd66::2"
PORT_A, PORT_B = 51820, 51821
TRANSFER_PORT = 5203
TRANSFER_BYTES = 3 * 1024 * 1024
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (REPO, os.environ.get("PYTHONPATH")) if p))


def _write(path: str, text: str, mode: int = 0o600) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


class WgPair:
    """Side A from TOML, side B from a wg-quick file, in a Testbed."""

    def __init__(self, bed: Testbed, workdir: str) -> None:
        self.bed, self.workdir = bed, workdir
        self.dev_a, self.dev_b = f"{bed.base}w", f"{bed.base}v"
        self.key_a, self.key_b = generate_private_key(), generate_private_key()
        self.pub_a, self.pub_b = private_to_public(self.key_a), private_to_public(self.key_b)
        psk = key_to_base64(os.urandom(32))
        _write(self.path("a.key"), key_to_base64(self.key_a) + "\n")
        _write(self.path("ab.psk"), psk + "\n")
        user = 'user = "nobody"' if _has_user("nobody") else ""
        self.toml = _write(self.path("a.toml"), f"""\
[device]
name = "{self.dev_a}"
address = ["{A}/24", "{A6}/64"]
queues = 2

[transport]
framing = "wireguard"
listen = "{bed.addr_a}:{PORT_A}"

[wireguard]
private_key_file = "a.key"

[security]
{user}

[stats]
socket = "{self.path('a.sock')}"

[[peer]]
name = "bee"
public_key = "{key_to_base64(self.pub_b)}"
preshared_key_file = "ab.psk"
endpoint = "{bed.addr_b}:{PORT_B}"
allowed_ips = ["{B}/32", "{B6}/128"]
""", 0o644)
        self.conf = _write(self.path(f"{self.dev_b}.conf"), f"""\
# side B: a wg-quick file as it would sit in /etc/wireguard
[Interface]
PrivateKey = {key_to_base64(self.key_b)}
ListenPort = {PORT_B}
Address = {B}/24, {B6}/64
PostUp = echo this hook is not run

[Peer]
# A: no Endpoint, it is learned from A's handshake
PublicKey = {key_to_base64(self.pub_a)}
PresharedKey = {psk}
AllowedIPs = {A}/32, {A6}/128
""")
        self.socket_b = f"/run/tunrelay/{self.dev_b}.sock"
        self.procs: dict[str, subprocess.Popen] = {}

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def start(self) -> None:
        for side, ns, argv in (("a", self.bed.ns_a, ["--config", self.toml]),
                               ("b", self.bed.ns_b, ["--wg-config", self.conf])):
            with open(self.path(f"{side}.log"), "ab") as log:
                self.procs[side] = self.bed.popen(
                    ns, [sys.executable, "-m", "tunrelay", "run", *argv],
                    stdout=log, stderr=subprocess.STDOUT, env=_env())

    def socket(self, side: str) -> str:
        return self.path("a.sock") if side == "a" else self.socket_b

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        for side, proc in self.procs.items():
            while True:
                assert proc.poll() is None, \
                    f"relay {side} exited with {proc.returncode}:\n{self.log(side)}"
                try:
                    if query(self.socket(side), timeout=1)["state"] == "running":
                        break
                except TunrelayError:
                    pass
                assert time.monotonic() < deadline, f"relay {side} not ready:\n{self.log(side)}"
                time.sleep(0.05)

    def cli(self, side: str, *argv: str) -> subprocess.CompletedProcess:
        ns = self.bed.ns_a if side == "a" else self.bed.ns_b
        return self.bed.run(ns, [sys.executable, "-m", "tunrelay", *argv], capture_output=True,
                            text=True, timeout=30, env=_env())

    def log(self, side: str) -> str:
        try:
            with open(self.path(f"{side}.log"), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self) -> dict[str, int | None]:
        codes: dict[str, int | None] = {}
        for side, proc in self.procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    codes[side] = None  # did not stop on SIGTERM
                    continue
            codes[side] = proc.returncode
        return codes


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _has_link(bed: Testbed, ns: str, name: str) -> bool:
    return subprocess.run(["ip", "-n", ns, "link", "show", name],
                          capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def pair():
    require_root()
    workdir = tempfile.mkdtemp(prefix="trw-")  # short: sun_path
    os.chmod(workdir, 0o755)  # side A reads nothing here after dropping to nobody
    with Testbed() as bed:
        wg = WgPair(bed, workdir)
        try:
            wg.start()
            wg.wait_ready()
            # A knows B's endpoint and starts; B learns A's from the handshake.
            assert_ping(bed, bed.ns_a, B, count=1)
            yield wg
        finally:
            wg.stop()
            for side in wg.procs:
                print(f"----- relay {side} log -----\n{wg.log(side)}")
            shutil.rmtree(workdir, ignore_errors=True)


def test_ping_both_ways_ipv4_and_ipv6(pair):
    bed = pair.bed
    assert_ping(bed, bed.ns_a, B)
    assert_ping(bed, bed.ns_b, A)    # B answers A at the endpoint it learned
    assert_ping(bed, bed.ns_a, B6)
    assert_ping(bed, bed.ns_b, A6)


@pytest.mark.parametrize("direction", ["b_to_a", "a_to_b"])
def test_byte_exact_transfer(pair, direction):
    bed = pair.bed
    if direction == "b_to_a":
        receiver_ns, sender_ns, host = bed.ns_a, bed.ns_b, A
    else:
        receiver_ns, sender_ns, host = bed.ns_b, bed.ns_a, B6
    receiver = bed.popen(receiver_ns, [sys.executable, "-c", RECEIVER, host, str(TRANSFER_PORT)],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout.readline().strip() == "ready"
        done = python(bed, sender_ns, SENDER, host, str(TRANSFER_PORT), str(TRANSFER_BYTES),
                      timeout=60)
        sent, seen = done.stdout.strip().splitlines()
        assert sent == seen, f"sent {sent}, the receiver saw {seen}"
        assert sent.startswith(f"{TRANSFER_BYTES} ")
    finally:
        receiver.wait(30)


def test_stats_show_the_peer_and_its_handshake(pair):
    bed = pair.bed
    done = pair.cli("a", "stats", "--config", pair.toml, "--json")
    assert done.returncode == 0, done.stderr
    a = json.loads(done.stdout)
    assert a["framing"] == "wireguard" and a["state"] == "running"
    assert a["queues"] == 2   # [device] queues: one pump and socket per queue
    assert a["wireguard"]["public_key"] == key_to_base64(pair.pub_a)
    assert a["wireguard"]["listen_port"] == PORT_A
    (bee,) = a["wg_peers"]
    assert bee["name"] == "bee" and bee["public_key"] == key_to_base64(pair.pub_b)
    assert bee["endpoint"] == f"{bed.addr_b}:{PORT_B}"
    assert bee["latest_handshake"] is not None and bee["latest_handshake"] <= time.time()
    assert bee["tx_bytes"] > 0 and bee["rx_bytes"] > 0
    assert a["wireguard"]["counters"]["handshakes"]["completed"] >= 1
    assert a["egress"]["packets"] > 0 and a["ingress"]["packets"] > 0  # the pumps' counters

    # B: found through its wg-quick file (the default socket of its name).
    done = pair.cli("b", "stats", "--wg-config", pair.conf)
    assert done.returncode == 0, done.stderr
    table = done.stdout
    print(table)
    assert "framing:" in table and "wireguard" in table
    row = next(line for line in table.splitlines() if line.startswith(
        key_to_base64(pair.pub_a)[:10]))
    assert f"{bed.addr_a}:{PORT_A}" in row   # learned from A's handshake
    assert "s ago" in row and "never" not in row
    assert "latest handshake" in table


def test_logs_say_what_happened(pair):
    a, b = pair.log("a"), pair.log("b")
    assert "peer bee: handshake completed" in a
    assert f"peer {key_to_base64(pair.pub_a)[:10]}...: at {pair.bed.addr_a}:{PORT_A}" in b
    assert "PostUp accepted and ignored" in b
    if _has_user("nobody"):
        assert f"running as uid {pwd.getpwnam('nobody').pw_uid}" in a
    assert "Traceback" not in a + b


def test_sigterm_stops_cleanly(pair):
    """Last in the module: both relays stop on SIGTERM, exit 0, and take
    their devices and (where they may) control sockets with them."""
    bed = pair.bed
    codes = pair.stop()
    assert codes == {"a": 0, "b": 0}, (codes, pair.log("a"), pair.log("b"))
    assert not _has_link(bed, bed.ns_a, pair.dev_a)
    assert not _has_link(bed, bed.ns_b, pair.dev_b)
    assert not os.path.exists(pair.socket_b)
    for side in ("a", "b"):
        log = pair.log(side)
        assert "SIGTERM: stopping" in log and log.rstrip().endswith("stopped"), log
        assert "Traceback" not in log


def test_deleted_device_ends_the_run_with_exit_1():
    """`ip link del` under a running device: the run ends on its own, exit
    1, one line saying why (as the relay does)."""
    require_root()
    workdir = tempfile.mkdtemp(prefix="trw-")
    with Testbed() as bed:
        try:
            name = f"{bed.base}x"
            key = generate_private_key()
            conf = _write(os.path.join(workdir, f"{name}.conf"), f"""\
[Interface]
PrivateKey = {key_to_base64(key)}
Address = 10.67.0.1/24
[Peer]
PublicKey = {key_to_base64(private_to_public(generate_private_key()))}
AllowedIPs = 10.67.0.2/32
Endpoint = {bed.addr_b}:{PORT_B}
""")
            sock = os.path.join(workdir, "x.sock")
            with open(os.path.join(workdir, "x.log"), "ab") as log:
                proc = bed.popen(bed.ns_a, [sys.executable, "-m", "tunrelay", "run",
                                            "--wg-config", conf, "--socket", sock],
                                 stdout=log, stderr=subprocess.STDOUT, env=_env())

            def running() -> bool:
                assert proc.poll() is None, _read(workdir, "x.log")
                try:
                    return query(sock, timeout=1)["state"] == "running"
                except TunrelayError:
                    return False

            wait_for(running, READY_TIMEOUT_S, "the run to start")
            subprocess.run(["ip", "-n", bed.ns_a, "link", "del", name], check=True)
            try:
                code = proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                pytest.fail(f"still running after its device was deleted:\n"
                            f"{_read(workdir, 'x.log')}")
            log_text = _read(workdir, "x.log")
            assert code == 1, log_text
            assert f"tunrelay: device {name} was deleted or detached" in log_text
            assert "Traceback" not in log_text
            assert not os.path.exists(sock)
        finally:
            print(_read(workdir, "x.log"))
            shutil.rmtree(workdir, ignore_errors=True)


def test_port_in_use_exits_1_and_removes_the_device():
    """A ListenPort taken by another socket: exit 1, one line naming the
    port, and the TUN device made for the run is gone again."""
    require_root()
    workdir = tempfile.mkdtemp(prefix="trw-")
    with Testbed() as bed:
        try:
            name = f"{bed.base}p"
            conf = _write(os.path.join(workdir, f"{name}.conf"), f"""\
[Interface]
PrivateKey = {key_to_base64(generate_private_key())}
ListenPort = {PORT_B}
Address = 10.68.0.1/24
""")
            holder = bed.popen(bed.ns_a, [sys.executable, "-c", (
                "import socket, sys\n"
                "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
                f"s.bind(('::', {PORT_B}))\n"
                "print('bound', flush=True)\n"
                "sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                assert holder.stdout.readline().strip() == "bound"
                done = bed.run(bed.ns_a, [sys.executable, "-m", "tunrelay", "run", "--wg-config",
                                          conf, "--socket", os.path.join(workdir, "p.sock")],
                               capture_output=True, text=True, timeout=60, env=_env())
            finally:
                holder.stdin.close()
                holder.wait(10)
            print(done.stderr)
            assert done.returncode == 1
            last = done.stderr.strip().splitlines()[-1]
            assert last.startswith("tunrelay: wireguard: cannot bind UDP port") and \
                str(PORT_B) in last and "in use" in last, last
            assert not _has_link(bed, bed.ns_a, name)
            assert "Traceback" not in done.stderr
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def _read(workdir: str, name: str) -> str:
    try:
        with open(os.path.join(workdir, name), errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""
