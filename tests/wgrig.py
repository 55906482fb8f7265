"""The WireGuard interop rig: tunrelay and wireguard-go as the two peers
of one tunnel, in the two namespaces of a ``Testbed``.

Side "t" (namespace ``ns_a``) runs tunrelay, as ``tunrelay run --config``
with ``framing = "wireguard"`` (``TunrelayPeer``) or as ``tunrelay-wg``
configured with ``wg`` (``TunrelayWg``); side "g" (``ns_b``) runs
wireguard-go configured with ``wg`` (``WireguardGo``), the way an operator
runs it.  The veth between them carries the outer (underlay) traffic, IPv4
198.18.0.0/24 or IPv6 fd00:198:18::/64; the tunnel's inner addresses are
10.77.0.0/24 and fd00:77::/64.  Every address lives inside the namespaces.

``WgBed`` owns what is global: the UAPI sockets in /var/run/wireguard
(shared by every namespace, so each interface name is unique to the bed)
and a work directory for keys, configs and logs; ``close()`` removes them
with the namespaces, from ``__exit__`` even when the test failed.

Keys come from ``wg genkey`` / ``wg pubkey``: what wg writes, tunrelay
must read.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from tunrelay.daemon.stats import query
from tunrelay.errors import TunrelayError
from tunrelay.testrig.netns import Testbed, set_sysctl, stop_process
from tunrelay.testrig.pair import wait_running

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UAPI_DIR = "/var/run/wireguard"
PORT = 51820
MTU = 1420               # what wg-quick gives a WireGuard interface by default
INNER_PREFIX, INNER6_PREFIX = 24, 64
#: Inner (tunnel) addresses per side: "t" tunrelay, "g" wireguard-go.
INNER = {"t": ("10.77.0.1", "fd00:77::1"), "g": ("10.77.0.2", "fd00:77::2")}
#: Where a side's veth address moves to in the roaming test.
ROAMED = {"t": ("198.18.0.3", "fd00:198:18::3"), "g": ("198.18.0.4", "fd00:198:18::4")}
#: wireguard-go refuses to start where the kernel has WireGuard, unless told.
WG_GO_ENV = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1", "LOG_LEVEL": "debug"}
READY_TIMEOUT_S = 15.0
PING_TIMEOUT_S = 20.0    # a handshake, and a retransmitted one (REKEY_TIMEOUT 5 s)


class RigError(AssertionError):
    """Something in the rig failed; the message carries the logs."""


def missing_tools() -> str | None:
    """None when wireguard-go and wg are installed, else what is missing."""
    absent = [b for b in ("wireguard-go", "wg", "ping") if shutil.which(b) is None]
    if absent:
        return (f"not installed: {', '.join(absent)} (make test installs them: "
                "scripts/install-system-deps wireguard-go@prefer-backports wireguard-tools)")
    return None


def wireguard_go_version() -> str:
    done = subprocess.run(["wireguard-go", "--version"], capture_output=True, text=True)
    return (done.stdout or done.stderr).strip().splitlines()[0]


# ---------------------------------------------------------------- keys

@dataclass(frozen=True)
class Keypair:
    private: str   # base64, as `wg genkey` prints it
    public: str

    @classmethod
    def generate(cls) -> Keypair:
        private = _wg_tool(["genkey"])
        return cls(private, _wg_tool(["pubkey"], private))


def genpsk() -> str:
    return _wg_tool(["genpsk"])


def _wg_tool(args: list[str], stdin: str | None = None) -> str:
    done = subprocess.run(["wg", *args], input=stdin, capture_output=True, text=True)
    if done.returncode != 0:
        raise RigError(f"wg {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def write_secret(path: str, text: str) -> str:
    """A key file as wg and tunrelay want it: owner-only, one line."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return path


# ---------------------------------------------------------------- addresses

def endpoint(host: str, port: int = PORT) -> str:
    """host:port, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def same_host(a: str, b: str) -> bool:
    """Two addresses equal, an IPv4-mapped IPv6 one equal to its IPv4."""
    x, y = ipaddress.ip_address(a), ipaddress.ip_address(b)
    x = getattr(x, "ipv4_mapped", None) or x
    y = getattr(y, "ipv4_mapped", None) or y
    return x == y


def split_endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


# ---------------------------------------------------------------- the bed

class WgBed(Testbed):
    """A ``Testbed`` (``ns_a`` for tunrelay, ``ns_b`` for wireguard-go), a
    work directory, and the UAPI interface names it hands out (removed
    with it).  ``outer`` is 4 or 6: the underlay family the peers use."""

    __test__ = False

    def __init__(self) -> None:
        # Before the namespaces: close() (also on a failed build) uses them.
        self._ifnames: list[str] = []
        self._roamed: dict[tuple[str, int], str] = {}
        # Short: the stats socket path must fit sun_path.
        self.workdir = tempfile.mkdtemp(prefix="trwg-")
        super().__init__()

    def ifname(self, tag: str) -> str:
        """A WireGuard interface name unique to this bed (UAPI sockets are
        global): the bed's 13-byte base and a tag of at most 2 characters."""
        name = f"{self.base}{tag}"
        assert len(name) <= 15, name
        self._ifnames.append(name)
        return name

    def ns(self, side: str) -> str:
        return self.ns_a if side == "t" else self.ns_b

    def veth(self, side: str) -> str:
        return self.veth_a if side == "t" else self.veth_b

    def underlay(self, side: str, outer: int) -> str:
        """The side's current underlay address of family ``outer``."""
        if (side, outer) in self._roamed:
            return self._roamed[(side, outer)]
        if outer == 4:
            return self.addr_a if side == "t" else self.addr_b
        return self.addr6_a if side == "t" else self.addr6_b

    def roam(self, side: str, outer: int) -> str:
        """Move the side's veth address of family ``outer`` to another one
        on the same link (the new one first, then the old one goes), as a
        laptop changing networks; return the new address."""
        old = self.underlay(side, outer)
        new = ROAMED[side][0 if outer == 4 else 1]
        prefix = 24 if outer == 4 else 64
        ns, dev = self.ns(side), self.veth(side)
        # The new IPv4 address is a secondary of the same /24: without this
        # the kernel removes it with the primary.
        set_sysctl(ns, f"net/ipv4/conf/{dev}/promote_secondaries", "1")
        self.sh(ns, ["ip", "addr", "add", f"{new}/{prefix}", "dev", dev,
                     *(["nodad"] if outer == 6 else [])])
        self.sh(ns, ["ip", "addr", "del", f"{old}/{prefix}", "dev", dev])
        self._roamed[(side, outer)] = new
        return new

    def sh(self, ns: str, argv: list[str], timeout: float = 30, **kw: Any) -> str:
        """Run a command in ``ns``; it must succeed; its stdout."""
        done = self.run(ns, argv, capture_output=True, text=True, timeout=timeout, **kw)
        if done.returncode != 0:
            raise RigError(f"'{' '.join(argv)}' in {ns} exited with {done.returncode}: "
                           f"{done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def pids(self, ns: str) -> list[int]:
        """The processes inside ``ns`` (asked from outside it: an ``ip``
        run inside would list itself)."""
        done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        return [int(pid) for pid in done.stdout.split()]

    def close(self) -> None:
        super().close()
        for name in self._ifnames:
            try:
                os.unlink(os.path.join(UAPI_DIR, f"{name}.sock"))
            except FileNotFoundError:
                pass
        shutil.rmtree(self.workdir, ignore_errors=True)

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)


def _add_inner(bed: WgBed, side: str, dev: str) -> None:
    v4, v6 = INNER[side]
    ns = bed.ns(side)
    bed.sh(ns, ["ip", "addr", "add", f"{v4}/{INNER_PREFIX}", "dev", dev])
    bed.sh(ns, ["ip", "addr", "add", f"{v6}/{INNER6_PREFIX}", "dev", dev, "nodad"])
    bed.sh(ns, ["ip", "link", "set", "dev", dev, "mtu", str(MTU), "up"])


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _wait_uapi(path: str, proc: subprocess.Popen, log: str, what: str,
               timeout: float = READY_TIMEOUT_S) -> None:
    """Until the UAPI socket at ``path`` accepts a connection (a stale one
    from a killed daemon may exist before)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RigError(f"{what} exited with {proc.returncode} before its UAPI socket "
                           f"answered:\n{_read(log)}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(path)
                return
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise RigError(f"{what}: no UAPI socket at {path} after {timeout:.0f} s:\n{_read(log)}")
        time.sleep(0.02)


def _stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
    if proc is None:
        return None
    stop_process(proc, sig, timeout)
    return proc.returncode


# ---------------------------------------------------------------- wg show

@dataclass
class PeerView:
    """One peer line of ``wg show IF dump``."""
    public_key: str
    preshared_key: str | None
    endpoint: str | None
    allowed_ips: list[str]
    latest_handshake: int     # unix seconds, 0 = never
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: int  # 0 = off


@dataclass
class InterfaceView:
    """``wg show IF dump``: the interface line and its peers."""
    private_key: str
    public_key: str
    listen_port: int
    fwmark: int
    peers: dict[str, PeerView]


def parse_dump(text: str) -> InterfaceView:
    lines = [line.split("\t") for line in text.splitlines() if line.strip()]
    if not lines or len(lines[0]) != 4:
        raise RigError(f"wg show dump: no interface line in {text!r}")
    priv, pub, port, fwmark = lines[0]
    peers = {}
    for fields in lines[1:]:
        if len(fields) != 8:
            raise RigError(f"wg show dump: a peer line of {len(fields)} fields: {fields}")
        key, psk, ep, allowed, hs, rx, tx, keepalive = fields
        peers[key] = PeerView(key, None if psk == "(none)" else psk,
                              None if ep == "(none)" else ep,
                              [] if allowed == "(none)" else allowed.split(","),
                              int(hs), int(rx), int(tx),
                              0 if keepalive == "off" else int(keepalive))
    return InterfaceView(priv, pub, int(port), 0 if fwmark == "off" else int(fwmark, 0), peers)


class _WgDriven:
    """A WireGuard implementation in a namespace driven by ``wg`` through
    its UAPI socket: wireguard-go, or tunrelay-wg."""

    what = ""

    def __init__(self, bed: WgBed, side: str, tag: str, keys: Keypair | None = None) -> None:
        self.bed, self.side = bed, side
        self.ns = bed.ns(side)
        self.ifname = bed.ifname(tag)
        self.keys = keys or Keypair.generate()
        self.key_file = write_secret(bed.path(f"{self.ifname}.key"), self.keys.private)
        self.log_path = bed.path(f"{self.ifname}.log")
        self.proc: subprocess.Popen | None = None
        self.uapi = os.path.join(UAPI_DIR, f"{self.ifname}.sock")

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> None:
        """The daemon in the foreground, until its UAPI socket answers."""
        with open(self.log_path, "ab") as log:
            self.proc = self.bed.popen(self.ns, self.argv(), env=self.env(),
                                       stdout=log, stderr=subprocess.STDOUT)
        _wait_uapi(self.uapi, self.proc, self.log_path, self.what)

    def configure(self, peer: Keypair, *, peer_endpoint: str | None = None,
                  keepalive: int = 0, psk_file: str | None = None,
                  listen_port: int = PORT) -> None:
        """``wg set`` as an operator would: our key and port, the one peer
        with the other side's inner addresses; then addresses and link up."""
        other = "g" if self.side == "t" else "t"
        allowed = ",".join((f"{INNER[other][0]}/32", f"{INNER[other][1]}/128"))
        args = ["wg", "set", self.ifname, "private-key", self.key_file,
                "listen-port", str(listen_port), "peer", peer.public, "allowed-ips", allowed]
        if peer_endpoint:
            args += ["endpoint", peer_endpoint]
        if keepalive:
            args += ["persistent-keepalive", str(keepalive)]
        if psk_file:
            args += ["preshared-key", psk_file]
        self.wg_set(args)
        _add_inner(self.bed, self.side, self.ifname)

    def wg_set(self, args: list[str]) -> None:
        try:
            self.bed.sh(self.ns, args)
        except RigError as exc:
            raise RigError(f"{exc}\n{self.what} log:\n{self.log()}") from None

    def wg(self, *args: str) -> str:
        return self.bed.sh(self.ns, ["wg", *args])

    def show(self) -> InterfaceView:
        return parse_dump(self.wg("show", self.ifname, "dump"))

    def peer(self, public_key: str) -> PeerView:
        view = self.show()
        if public_key not in view.peers:
            raise RigError(f"{self.what} has no peer {public_key}: {sorted(view.peers)}")
        return view.peers[public_key]

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        return _stop(self.proc, sig)

    def log(self) -> str:
        return _read(self.log_path)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


class WireguardGo(_WgDriven):
    """``wireguard-go -f IFNAME`` in side "g"'s namespace."""

    what = "wireguard-go"

    def __init__(self, bed: WgBed, keys: Keypair | None = None, side: str = "g") -> None:
        super().__init__(bed, side, "g" if side == "g" else "gt", keys)

    def argv(self) -> list[str]:
        return ["wireguard-go", "-f", self.ifname]

    def env(self) -> dict[str, str]:
        return dict(os.environ, **WG_GO_ENV)


def tunrelay_wg_argv() -> list[str]:
    """How to run tunrelay-wg: the console script next to this Python (the
    venv's, made by ``pip install -e``), else the module it runs."""
    script = os.path.join(os.path.dirname(sys.executable), "tunrelay-wg")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "tunrelay.wireguard.cli"]


class TunrelayWg(_WgDriven):
    """``tunrelay-wg -f IFNAME`` in side "t"'s namespace."""

    what = "tunrelay-wg"

    def __init__(self, bed: WgBed, keys: Keypair | None = None) -> None:
        super().__init__(bed, "t", "u", keys)

    def argv(self) -> list[str]:
        return [*tunrelay_wg_argv(), "-f", self.ifname]

    def env(self) -> dict[str, str]:
        return tunrelay_wg_env()


def tunrelay_wg_command(bed: WgBed) -> str:
    """One executable path that runs tunrelay-wg, for
    WG_QUICK_USERSPACE_IMPLEMENTATION (wg-quick runs it as one word): the
    console script, else a wrapper script around the module."""
    argv = tunrelay_wg_argv()
    if len(argv) == 1:
        return argv[0]
    path = bed.path("tunrelay-wg")
    with open(path, "w") as f:
        f.write("#!/bin/sh\nexec " + " ".join(argv) + ' "$@"\n')
    os.chmod(path, 0o755)
    return path


def no_kernel_wireguard_path(bed: WgBed) -> str:
    """A PATH whose ``ip`` refuses ``ip link add ... type wireguard`` as a
    kernel without WireGuard does, and is the real ``ip`` otherwise: so
    wg-quick takes its userspace path (tunrelay-wg) and never loads the
    host's wireguard module (which would then make it always take the
    kernel's).  Everything else passes through."""
    real = shutil.which("ip")
    assert real is not None
    directory = bed.path("bin")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "ip"), "w") as f:
        f.write("#!/bin/sh\n"
                "# a kernel without WireGuard, for wg-quick (tests/wgrig.py)\n"
                'case " $* " in *" type wireguard "*)\n'
                '    echo "Error: Unknown device type (test stand-in: no kernel WireGuard)." >&2\n'
                "    exit 2 ;;\nesac\n"
                f'exec {real} "$@"\n')
    os.chmod(os.path.join(directory, "ip"), 0o755)
    return directory + os.pathsep + os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")


def tunrelay_wg_env() -> dict[str, str]:
    """tunrelay-wg's environment: verbose logs, and this checkout first."""
    return dict(os.environ, LOG_LEVEL="verbose",
                PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))


# ---------------------------------------------------------------- tunrelay run

def wg_quick_file(path: str, keys: Keypair, peer: Keypair, *, peer_endpoint: str | None,
                  side: str = "t") -> str:
    """An ordinary wg-quick file for ``side`` (Address, MTU, ListenPort, one
    [Peer] with the other side's inner addresses), owner-only as wg-quick
    wants it; one file for wg-quick and ``tunrelay run --wg-config``."""
    other = "g" if side == "t" else "t"
    lines = ["[Interface]", f"PrivateKey = {keys.private}", f"ListenPort = {PORT}",
             f"Address = {INNER[side][0]}/{INNER_PREFIX}, {INNER[side][1]}/{INNER6_PREFIX}",
             f"MTU = {MTU}", "", "[Peer]", f"PublicKey = {peer.public}",
             f"AllowedIPs = {INNER[other][0]}/32, {INNER[other][1]}/128"]
    if peer_endpoint:
        lines.append(f"Endpoint = {peer_endpoint}")
    return write_secret(path, "\n".join(lines))


# `tunrelay run --config FILE` with WireGuard's timers replaced (a JSON
# object of Timers fields): the relay.toml has no key for them, so this
# goes through the same run path (wireguard/run.py) the CLI takes.
RUN_WITH_TIMERS = r"""
import dataclasses, json, logging, sys
from tunrelay.daemon.config import load
from tunrelay.wireguard.run import from_relay_config_settings, run
from tunrelay.wireguard.timers import Timers
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
timers = dataclasses.replace(Timers(), **json.loads(sys.argv[2]))
logging.getLogger("wgrig").info("timers: %s", timers)
run(from_relay_config_settings(load(sys.argv[1])), timers=timers)
"""


class TunrelayPeer:
    """``tunrelay run --config relay.toml`` with ``framing = "wireguard"``
    in side "t"'s namespace, its one ``[[peer]]`` the wireguard-go side.

    ``extra``: more TOML lines per table ({"wireguard": ["..."]});
    ``timers``: WireGuard timers to shorten ({"rekey_after_time": 2.0}),
    which runs the relay through ``RUN_WITH_TIMERS``.
    """

    DEVICE = "trwg0"
    PEER_NAME = "wggo"

    def __init__(self, bed: WgBed, peer: Keypair, *, peer_endpoint: str | None,
                 keys: Keypair | None = None, keepalive: int = 0, psk_file: str | None = None,
                 listen: str = f"[::]:{PORT}", extra: dict[str, list[str]] | None = None,
                 timers: dict[str, float] | None = None, wg_config: bool = False,
                 name: str = "t") -> None:
        self.bed = bed
        self.timers = timers
        #: With ``wg_config``: ``tunrelay run --wg-config wg0.conf`` instead
        #: (the same tunnel from a wg-quick file; ``extra`` and ``timers``
        #: do not apply).
        self.wg_config: str | None = None
        self.ns = bed.ns_a
        self.keys = keys or Keypair.generate()
        self.config_path = bed.path(f"{name}.toml")
        self.socket_path = bed.path(f"{name}.sock")
        self.log_path = bed.path(f"{name}.log")
        key_file = write_secret(bed.path(f"{name}.key"), self.keys.private)
        v4, v6 = INNER["t"]
        gv4, gv6 = INNER["g"]
        tables: dict[str, list[str]] = {
            "device": [f'name = "{self.DEVICE}"', 'mode = "tun"', f"mtu = {MTU}",
                       f'address = ["{v4}/{INNER_PREFIX}", "{v6}/{INNER6_PREFIX}"]'],
            "transport": ['protocol = "udp"', f'listen = "{listen}"', 'framing = "wireguard"'],
            "stats": [f'socket = "{self.socket_path}"'],
            "wireguard": [f'private_key_file = "{key_file}"'],
        }
        for table, lines in (extra or {}).items():
            tables.setdefault(table, []).extend(lines)
        text = "".join(f"[{t}]\n" + "".join(line + "\n" for line in lines) + "\n"
                       for t, lines in tables.items())
        peer_lines = ["[[peer]]", f'name = "{self.PEER_NAME}"', f'public_key = "{peer.public}"',
                      f'allowed_ips = ["{gv4}/32", "{gv6}/128"]']
        if peer_endpoint:
            peer_lines.append(f'endpoint = "{peer_endpoint}"')
        if keepalive:
            peer_lines.append(f"persistent_keepalive = {keepalive}")
        if psk_file:
            peer_lines.append(f'preshared_key_file = "{psk_file}"')
        with open(self.config_path, "w") as f:
            f.write(text + "\n".join(peer_lines) + "\n")
        if wg_config:
            self.wg_config = wg_quick_file(bed.path("wg0.conf"), self.keys, peer,
                                           peer_endpoint=peer_endpoint)
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        if self.wg_config is not None:
            return [sys.executable, "-m", "tunrelay", "run", "--wg-config", self.wg_config,
                    "--socket", self.socket_path]
        if self.timers is None:
            return [sys.executable, "-m", "tunrelay", "run", "--config", self.config_path]
        return [sys.executable, "-c", RUN_WITH_TIMERS, self.config_path, json.dumps(self.timers)]

    def start(self, wait: bool = True) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = self.bed.popen(
                self.ns, self.argv(),
                env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                    p for p in (REPO, os.environ.get("PYTHONPATH")) if p)),
                stdout=log, stderr=subprocess.STDOUT)
        if wait:
            try:
                wait_running("t", self.proc, self.socket_path, self.log,
                             time.monotonic() + READY_TIMEOUT_S, READY_TIMEOUT_S)
            except TunrelayError as exc:
                config = self.wg_config or self.config_path
                raise RigError(f"{exc}\nconfig {config}:\n{_read(config)}") from None

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        return _stop(self.proc, sig)

    def stats(self) -> dict:
        return query(self.socket_path)

    def peer_row(self) -> dict:
        """The wireguard-go peer's row of ``tunrelay stats`` (name,
        endpoint, latest_handshake, tx_bytes, rx_bytes, ...)."""
        rows = self.stats().get("wg_peers")
        if not rows:
            raise RigError(f"tunrelay stats has no wg_peers: {self.stats()}")
        for row in rows:
            if row.get("name") == self.PEER_NAME:
                return row
        if len(rows) == 1:  # from a wg-quick file: named by its key
            return rows[0]
        raise RigError(f"no peer {self.PEER_NAME!r} in tunrelay stats: {rows}")

    def peer_endpoint(self) -> str | None:
        """The peer's endpoint as ``tunrelay stats`` reports it."""
        return self.peer_row().get("endpoint")

    def log(self) -> str:
        return _read(self.log_path)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


# ---------------------------------------------------------------- traffic

def ping(bed: WgBed, side: str, dst: str, *, timeout: float = PING_TIMEOUT_S,
         count: int = 1) -> None:
    """From ``side``'s namespace, until ``count`` echo replies in a row
    come back from ``dst`` (each tried for up to 2 s) or ``timeout``."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        done = bed.run(bed.ns(side), ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "2", dst],
                       capture_output=True, text=True, timeout=count * 2.5 + 10)
        if done.returncode == 0:
            return
        last = done.stdout.strip().splitlines()[-2:] if done.stdout.strip() else done.stderr
        if time.monotonic() > deadline:
            raise RigError(f"no echo reply from {dst} in {bed.ns(side)} within {timeout:.0f} s: {last}")


def ping_once(bed: WgBed, side: str, dst: str, wait: float = 10.0) -> bool:
    """One echo request, waiting ``wait`` s for the reply (a cold tunnel:
    the request waits in the sender's queue for the handshake)."""
    done = bed.run(bed.ns(side), ["ping", "-n", "-c", "1", "-W", f"{wait:g}", dst],
                   capture_output=True, text=True, timeout=wait + 10)
    return done.returncode == 0


# A TCP sink and source, run inside the namespaces with this Python: the
# sink prints "listening", then, after one connection has ended, the byte
# count and SHA-256 of what arrived; the source sends N bytes (seeded,
# optionally paced) and prints the same two figures of what it sent.
SINK = r"""
import hashlib, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
srv = socket.socket(family, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port)); srv.listen(1)
print("listening", flush=True)
srv.settimeout(float(sys.argv[3]))
conn, _ = srv.accept()
conn.settimeout(float(sys.argv[3]))
h, n = hashlib.sha256(), 0
while True:
    chunk = conn.recv(1 << 16)
    if not chunk:
        break
    h.update(chunk); n += len(chunk)
print(n, h.hexdigest(), flush=True)
"""

SOURCE = r"""
import hashlib, random, socket, sys, time
host, port, total, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rate = float(sys.argv[5])  # bytes per second, 0: as fast as it goes
rng = random.Random(seed)
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.create_connection((host, port), timeout=30)
h, sent, start = hashlib.sha256(), 0, time.monotonic()
while sent < total:
    chunk = rng.randbytes(min(1 << 16, total - sent))
    s.sendall(chunk); h.update(chunk); sent += len(chunk)
    if rate:
        ahead = sent / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
s.shutdown(socket.SHUT_WR)
s.settimeout(60)
while s.recv(1 << 16):
    pass
print(sent, h.hexdigest(), flush=True)
"""


@dataclass
class Transfer:
    sent: tuple[int, str]
    received: tuple[int, str]


def transfer(bed: WgBed, sender: str, receiver: str, dst: str, nbytes: int, *,
             seed: int = 1, rate: float = 0.0, port: int = 5299,
             timeout: float = 60.0) -> Transfer:
    """``nbytes`` through one TCP connection from ``sender``'s namespace to
    the sink at ``dst`` in ``receiver``'s; (count, sha256) on both ends."""
    sink = bed.popen(bed.ns(receiver), [sys.executable, "-c", SINK, dst, str(port), str(timeout)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None
        first = sink.stdout.readline().strip()
        if first != "listening":
            raise RigError(f"the sink in {bed.ns(receiver)} did not start: {first!r} "
                           f"{sink.stderr.read() if sink.stderr else ''}")
        done = bed.run(bed.ns(sender), [sys.executable, "-c", SOURCE, dst, str(port), str(nbytes),
                                        str(seed), str(rate)],
                       capture_output=True, text=True, timeout=timeout + 30)
        if done.returncode != 0:
            raise RigError(f"the source in {bed.ns(sender)} failed: {done.stderr.strip()[-800:]}")
        out, err = sink.communicate(timeout=timeout + 30)
        if sink.returncode != 0:
            raise RigError(f"the sink in {bed.ns(receiver)} failed: {err.strip()[-800:]}")
        sent = done.stdout.split()
        received = out.split()
        return Transfer((int(sent[0]), sent[1]), (int(received[0]), received[1]))
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()


# Floods a WireGuard port with handshake initiations that pass the cheap
# check (a valid mac1 for the target's public key) but come from no peer,
# in bursts: each burst (as fast as one process sends) fills the target's
# handshake queue past 1/8 (wireguard-go and tunrelay: 128 of 1024), so it
# is under load, a state both hold for 1 s, and a burst every half second
# keeps it so.  A burst stays below the queue's 1024 slots, so a real
# peer's message arriving meanwhile waits its turn instead of being dropped
# (a continuous flood above what the target handles drops them at random,
# in wireguard-go too).  Cookie replies land here unread.  Prints how many
# it sent.
FLOOD = r"""
import base64, hashlib, os, signal, socket, sys, time
src, dst, port, public, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
burst, every = int(sys.argv[6]), float(sys.argv[7])
mac1_key = hashlib.blake2s(b"mac1----" + base64.b64decode(public)).digest()
messages = []
for _ in range(burst):
    # type 1, sender index, ephemeral 32, static 32+16, timestamp 12+16: 116 bytes
    body = b"\x01\x00\x00\x00" + os.urandom(112)
    messages.append(body + hashlib.blake2s(body, key=mac1_key, digest_size=16).digest() + bytes(16))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 0))
sent, end = 0, time.monotonic() + seconds
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
while time.monotonic() < end and not stop:
    began = time.monotonic()
    for message in messages:
        try:
            s.sendto(message, (dst, port))
            sent += 1
        except OSError:
            pass
    time.sleep(max(0.0, every - (time.monotonic() - began)))
print(sent, flush=True)
"""

#: A flood's burst size and period (see FLOOD).
FLOOD_BURST, FLOOD_EVERY_S = 1000, 0.5

#: The address a flood comes from, on the flooding side's veth: not the
#: real peer's, so the target's per-address rate limit does not hit it.
FLOOD_SOURCE = {"t": "198.18.0.9", "g": "198.18.0.10"}


def start_flood(bed: WgBed, side: str, dst: str, public_key: str,
                seconds: float, every: float = FLOOD_EVERY_S) -> subprocess.Popen:
    """Bursts of valid-mac1 initiations (FLOOD) from ``side``'s namespace
    (from FLOOD_SOURCE, added to its veth) to ``dst``:PORT for ``seconds``,
    one burst every ``every`` s (0: without a pause, as fast as one
    process sends)."""
    src = FLOOD_SOURCE[side]
    bed.sh(bed.ns(side), ["ip", "addr", "add", f"{src}/24", "dev", bed.veth(side)])
    return bed.popen(bed.ns(side), [sys.executable, "-c", FLOOD, src, dst, str(PORT), public_key,
                                    str(seconds), str(FLOOD_BURST), str(every)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def expected_digest(nbytes: int, seed: int = 1) -> str:
    """The SHA-256 of what ``SOURCE`` sends for (nbytes, seed)."""
    import random
    rng, h, sent = random.Random(seed), hashlib.sha256(), 0
    while sent < nbytes:
        chunk = rng.randbytes(min(1 << 16, nbytes - sent))
        h.update(chunk)
        sent += len(chunk)
    return h.hexdigest()


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RigError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


#: Lines of each log shown after a test (a flooded wireguard-go logs a
#: line per refused message).
LOG_TAIL_LINES = 400


def all_logs(*parties: Any) -> str:
    """The logs of what a test started, each its last LOG_TAIL_LINES."""
    out = []
    for party in parties:
        if party is None:
            continue
        name = getattr(party, "what", "") or type(party).__name__
        lines = party.log().splitlines()
        cut = len(lines) - LOG_TAIL_LINES
        head = f"({cut} earlier lines not shown)\n" if cut > 0 else ""
        out.append(f"----- {name} log -----\n{head}" + "\n".join(lines[-LOG_TAIL_LINES:]))
    return "\n".join(out)
