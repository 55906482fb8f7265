"""The tunnels the suite measures, one small class per kind.

Each kind joins the two namespaces of a ``Testbed`` with addresses
10.99.0.1 (side a, the iperf3 server) and 10.99.0.2 (side b) on a tunnel
device of MTU 1400; direct veth uses the underlay itself.  ``testbed()``
makes the bed it runs on (a ``Testbed``; the hub: a ``StarBed``, whose
sides a and b are two spokes), ``start(bed)`` brings it up, ``pids()``
names the user-space processes whose CPU time is charged to it ([] for
kernel tunnels), ``stop()`` takes it down (the test bed's ``close()``
removes whatever is left).

A kind that cannot run here says why: ``missing()`` before start (a binary
is not installed) or ``Unsupported`` from ``start`` (this tunrelay build
does not know a configuration key yet).  Both are reported as skipped.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks.measure import DEFAULT_MEASURES
from benchmarks.report import (
    BUSY_POLL,
    BUSY_POLL_US,
    IO_SYSCALLS,
    NAGLE_LEN16,
    NAGLE_OPENVPN,
    POINT_TO_POINT,
    SPLIT_LOOPS,
)
from tunrelay.errors import TunrelayError
from tunrelay.testrig.hub import Star
from tunrelay.testrig.nagle import NagleTunnel, missing_peer, openvpn_argv
from tunrelay.testrig.netns import Testbed, stop_process
from tunrelay.testrig.pair import (
    PORT,
    TUNNEL6_A,
    TUNNEL6_B,
    TUNNEL_A,
    TUNNEL_B,
    RelayPair,
    wait_running,
)

MTU = 1400
PREFIX = 24
TUNNEL_NET = str(ipaddress.ip_interface(f"{TUNNEL_A}/{PREFIX}").network)

# ---------------------------------------------------------------- variants

#: The tunrelay variants: label -> (protocol, {TOML table: [lines]}).
#: A build that rejects a variant's key (an older one without ``offload``
#: or ``queues``, or queues > 1 over TCP, which is one connection) exits
#: with code 2 naming the key, and the variant is reported as skipped with
#: the relay's own message.  The first row of each protocol uses no such
#: key (offload "auto", 1 queue), so every build measures it.
# The defaults are offload = "auto" (on here) and queues = 1: the
# "offload=on q=1" rows are what a user gets unconfigured.
_AEAD = {"transport": ['framing = "aead"'], "device": ["mtu = 1400"],
         "security": ['key_file = "{key_file}"']}

TUNRELAY_VARIANTS: dict[str, tuple[str, dict]] = {
    POINT_TO_POINT: ("udp", {"relay": ["offload = true"], "device": ["queues = 1"]}),
    "tunrelay udp offload=off q=1": ("udp", {"relay": ["offload = false"], "device": ["queues = 1"]}),
    "tunrelay udp offload=on q=2": ("udp", {"relay": ["offload = true"], "device": ["queues = 2"]}),
    "tunrelay udp offload=off q=2": ("udp", {"relay": ["offload = false"], "device": ["queues = 2"]}),
    "tunrelay tcp offload=on q=1": ("tcp", {"relay": ["offload = true"], "device": ["queues = 1"]}),
    "tunrelay tcp offload=off q=1": ("tcp", {"relay": ["offload = false"], "device": ["queues = 1"]}),
    "tunrelay tcp offload=on q=2": ("tcp", {"relay": ["offload = true"], "device": ["queues = 2"]}),
    "tunrelay tcp offload=off q=2": ("tcp", {"relay": ["offload = false"], "device": ["queues = 2"]}),
    "tunrelay udp aead chacha20-poly1305": ("udp", _AEAD),
    "tunrelay udp aead aes-256-gcm": (
        "udp", {**_AEAD, "security": _AEAD["security"] + ['cipher = "aes-256-gcm"']}),
    "tunrelay tcp aead chacha20-poly1305": ("tcp", _AEAD),
}

#: The same relays with their one peer in a ``[[peer]]`` table instead of
#: ``[transport] peer``: the many-peers data path (a PeerTable, every
#: packet routed by its destination) carrying one peer.  Issue 8: within
#: 5 % of its point-to-point twin, the row it follows in the table.
ONE_PEER_TABLE = "tunrelay udp 1 [[peer]] offload=on q=1"

#: Spoke to spoke through a hub relay (``HubTunnel``), every relay with
#: the point-to-point row's settings.  Issue 8: at least 50 % of it.
HUB = "tunrelay hub, spoke to spoke (3 relays)"

#: tunrelay speaking WireGuard (``TunrelayWireguard``), measured beside
#: wireguard-go.  Issue 9: TCP 1 stream >= 1.5x, CPU per GB <= 0.6x, ping
#: rtt <= 1x, UDP 64 B delivered >= 2x wireguard-go's.
TUNRELAY_WG = "tunrelay wireguard"

#: The "naive Python relay" baseline: tunrelay with its pure-Python pump
#: (select, one packet per system call).
PYTHON_RELAY = ("udp", {"relay": ['engine = "python"']})


class Unsupported(Exception):
    """This build of tunrelay rejects a key the variant needs."""


# ---------------------------------------------------------------- kinds

class Tunnel:
    """The interface; also the no-op parts."""

    # "veth", "vxlan", "tunrelay", "tunrelay-aead", "tunrelay-peers", "tunrelay-hub",
    # "tunrelay-wg", "tunrelay-nagle", "tunrelay-loop", "python", "openvpn", "wireguard-go"
    kind = ""
    binaries: tuple = ()   # commands that must be installed
    server_ip = TUNNEL_A   # side a's address, reached from side b
    measures: tuple = DEFAULT_MEASURES   # what measure_tunnel takes (measure.MEASURES)

    def __init__(self, label: str) -> None:
        self.label = label

    def missing(self) -> str | None:
        absent = [b for b in self.binaries if shutil.which(b) is None]
        return f"not installed: {', '.join(absent)}" if absent else None

    def testbed(self) -> Testbed:
        """The namespaces this tunnel joins (a context manager)."""
        return Testbed()

    def start(self, bed: Testbed) -> None:
        raise NotImplementedError

    def pids(self) -> list[int]:
        return []

    def stop(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label}>"


class VethDirect(Tunnel):
    """No tunnel: iperf3 between the underlay addresses (veth MTU 1500)."""

    kind = "veth"

    def start(self, bed: Testbed) -> None:
        self.server_ip = bed.addr_a


class KernelVxlan(Tunnel):
    """The kernel's VXLAN over the veth, unicast to the other end."""

    kind = "vxlan"
    VNI, PORT = 42, 4789

    def start(self, bed: Testbed) -> None:
        for ns, dev, here, there, addr in ((bed.ns_a, bed.veth_a, bed.addr_a, bed.addr_b, TUNNEL_A),
                                           (bed.ns_b, bed.veth_b, bed.addr_b, bed.addr_a, TUNNEL_B)):
            _ip(bed, ns, "link", "add", "vxbench", "type", "vxlan", "id", str(self.VNI),
                "local", here, "remote", there, "dstport", str(self.PORT), "dev", dev)
            _ip(bed, ns, "link", "set", "dev", "vxbench", "mtu", str(MTU))
            _ip(bed, ns, "addr", "add", f"{addr}/{PREFIX}", "dev", "vxbench")
            _ip(bed, ns, "link", "set", "dev", "vxbench", "up")


class Tunrelay(Tunnel):
    """Two tunrelay processes (``RelayPair``); TCP: side a is the server."""

    kind = "tunrelay"

    def __init__(self, label: str, protocol: str, overrides: dict, kind: str = "tunrelay",
                 pair: type[RelayPair] = RelayPair) -> None:
        super().__init__(label)
        self.kind = kind
        self.protocol, self.overrides = protocol, overrides
        self.pair_class = pair
        self.pair: RelayPair | None = None
        self._workdir: tempfile.TemporaryDirectory | None = None

    def start(self, bed: Testbed) -> None:
        self._workdir = tempfile.TemporaryDirectory(prefix="tunrelay-bench-")
        overrides = self.overrides
        if any("{key_file}" in line for lines in overrides.values() for line in lines):
            # aead: one fresh pre-shared key for both ends, owner-only.
            from tunrelay.aead import genkey
            key_file = os.path.join(self._workdir.name, "relay.key")
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(genkey() + "\n")
            overrides = {table: [line.replace("{key_file}", key_file) for line in lines]
                         for table, lines in overrides.items()}
        self.pair = self.pair_class(bed, protocol=self.protocol, mtu=MTU, overrides=overrides,
                                    workdir=self._workdir.name)
        try:
            self.pair.start()
        except TunrelayError as exc:
            rejected = self._rejected_key()
            if rejected:
                raise Unsupported(f"rejected by this build: {rejected}") from None
            # "relay a exited with 1:\n<log>": the log's last line says why.
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            why = f"{lines[0]} {lines[-1]}" if len(lines) > 1 else str(exc)
            raise TunrelayError(f"did not start: {why}") from None

    def _rejected_key(self) -> str | None:
        """The relay's own message when it exited 2 (configuration error)
        naming one of the variant's keys; None for any other failure."""
        keys = {line.split("=")[0].strip() for lines in self.overrides.values() for line in lines}
        for name, side in self.pair.sides.items():
            if side.proc is None or side.proc.poll() != 2:
                continue
            for line in self.pair.log(name).splitlines():
                if any(key in line for key in keys):
                    # "tunrelay: /tmp/.../a.toml: [relay] offload: ..." -> from "[relay]"
                    return line[line.find("["):].strip() if "[" in line else line.strip()
        return None

    def pids(self) -> list[int]:
        return [side.proc.pid for side in self.pair.sides.values() if side.proc is not None]

    def stop(self) -> None:
        if self.pair is not None:
            self.pair.close()
        if self._workdir is not None:
            self._workdir.cleanup()


class OnePeerTablePair(RelayPair):
    """A ``RelayPair`` whose two relays name each other in one ``[[peer]]``
    table (endpoint and the other side's /32 and /128 as allowed IPs)
    instead of ``[transport] peer``; everything else as the pair writes it."""

    def _config(self, name: str, overrides: dict) -> str:
        text = super()._config(name, overrides)
        there = self.bed.addr_b if name == "a" else self.bed.addr_a
        inner = (TUNNEL_B, TUNNEL6_B) if name == "a" else (TUNNEL_A, TUNNEL6_A)
        lines = text.splitlines()
        shorthand = f'peer = "{there}:{PORT}"'
        if shorthand not in lines:
            raise RuntimeError(f"no '{shorthand}' in the config RelayPair wrote:\n{text}")
        lines.remove(shorthand)
        return "\n".join(lines + _peer_table("b" if name == "a" else "a", f"{there}:{PORT}",
                                              [f"{inner[0]}/32", f"{inner[1]}/128"])) + "\n"


def _peer_table(name: str, endpoint: str, allowed_ips: list[str]) -> list[str]:
    return ["[[peer]]", f'name = "{name}"', f'endpoint = "{endpoint}"',
            "allowed_ips = [" + ", ".join(f'"{net}"' for net in allowed_ips) + "]", ""]


class StarBed(Star):
    """A ``Star`` of two spokes seen as the suite's two-sided test bed:
    side a (the iperf3 server, 10.99.0.1) is spoke 2, side b (the client,
    10.99.0.2) spoke 1, so the measured traffic goes spoke 1 -> hub ->
    spoke 2, and ``measure`` works on it unchanged."""

    __test__ = False

    def __init__(self) -> None:
        super().__init__(spokes=2)

    @property
    def ns_a(self) -> str:
        return self.spokes[1].ns

    @property
    def ns_b(self) -> str:
        return self.spokes[0].ns


class ConfiguredRelays(Tunnel):
    """Several ``tunrelay run --config`` processes, one per relay that
    ``configs()`` names, each with its config, log and control socket in
    one short-lived work directory (its prefix: ``WORKDIR``)."""

    WORKDIR = "trb-"

    def __init__(self, label: str) -> None:
        super().__init__(label)
        self.procs: dict[str, subprocess.Popen] = {}
        self._workdir: tempfile.TemporaryDirectory | None = None

    def _path(self, name: str, suffix: str) -> str:
        assert self._workdir is not None, "start() makes the work directory"
        return os.path.join(self._workdir.name, f"{name}.{suffix}")

    def configs(self, bed: Any) -> dict[str, tuple[str, str]]:
        """name -> (namespace, relay.toml text) of every relay."""
        raise NotImplementedError

    def start(self, bed: Any) -> None:
        self._workdir = tempfile.TemporaryDirectory(prefix=self.WORKDIR)  # short: sun_path
        for name, (ns, text) in self.configs(bed).items():
            with open(self._path(name, "toml"), "w") as f:
                f.write(text)
            with open(self._path(name, "log"), "ab") as log:
                self.procs[name] = bed.popen(
                    ns, [sys.executable, "-m", "tunrelay", "run", "--config", self._path(name, "toml")],
                    stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15.0
        for name, proc in self.procs.items():
            try:
                wait_running(name, proc, self._path(name, "sock"), lambda n=name: self.log(n),
                             deadline, 15.0)
            except TunrelayError:
                self.refused(name, proc)
                raise

    def refused(self, name: str, proc: subprocess.Popen) -> None:
        """A relay did not come up: raise Unsupported if this build cannot
        run the row at all (else the caller re-raises the failure)."""

    def log(self, name: str) -> str:
        try:
            with open(self._path(name, "log"), errors="replace") as f:
                return f.read()
        except (OSError, TypeError, AttributeError, AssertionError):
            return ""

    def roles(self) -> dict[str, int]:
        """Relay name -> pid, for CPU time per relay."""
        return {name: proc.pid for name, proc in self.procs.items()}

    def pids(self) -> list[int]:
        return list(self.roles().values())

    def stop(self) -> None:
        for proc in self.procs.values():
            _terminate(proc, timeout=10.0)
        if self._workdir is not None:
            self._workdir.cleanup()


class HubTunnel(ConfiguredRelays):
    """Three tunrelay processes: a hub in the star's hub namespace with one
    ``[[peer]]`` table per spoke (its allowed IPs the spoke's /32 and
    /128), and in each spoke a point-to-point relay whose peer is the hub,
    its device address covering the whole /24 (/64), as README "Running a
    tunnel" sets a hub up.  A packet from spoke 1 to spoke 2 crosses four
    relay loops (spoke 1 out, hub in, hub out, spoke 2 in) and the hub's
    kernel, which routes it from the hub's device back into it.  Every
    relay gets the ``overrides`` of the point-to-point row it is compared
    with; the CPU time counted is that of all three."""

    kind = "tunrelay-hub"
    WORKDIR = "trbh-"
    HUB_ADDR, HUB_ADDR6 = "10.99.0.254", "fd00:99::fe"

    def __init__(self, label: str, overrides: dict) -> None:
        super().__init__(label)
        self.overrides = overrides

    def testbed(self) -> StarBed:
        return StarBed()

    def configs(self, star: Star) -> dict[str, tuple[str, str]]:
        """name -> (namespace, relay.toml text) of the three relays."""
        # Spoke 1 is side b (TUNNEL_B), spoke 2 side a (TUNNEL_A): see StarBed.
        inner = {1: (TUNNEL_B, TUNNEL6_B), 2: (TUNNEL_A, TUNNEL6_A)}
        hub_peers = []
        for spoke in star.spokes:
            v4, v6 = inner[spoke.index]
            hub_peers += _peer_table(f"spoke{spoke.index}", f"{spoke.addr}:{PORT}",
                                     [f"{v4}/32", f"{v6}/128"])
        out = {"hub": (star.hub, self._render(
            "hub", "trhub0", [self.HUB_ADDR, self.HUB_ADDR6], [f'listen = "0.0.0.0:{PORT}"'])
            + "\n" + "\n".join(hub_peers))}
        for spoke in star.spokes:
            name = f"spoke{spoke.index}"
            out[name] = (spoke.ns, self._render(
                name, "trtun0", list(inner[spoke.index]),
                [f'listen = "{spoke.addr}:{PORT}"', f'peer = "{spoke.hub_addr}:{PORT}"']))
        return out

    def _render(self, name: str, device: str, addresses: list[str], transport: list[str]) -> str:
        prefixes = [f"{a}/{PREFIX}" if "." in a else f"{a}/64" for a in addresses]
        tables = {
            "device": [f'name = "{device}"', 'mode = "tun"', f"mtu = {MTU}",
                       "address = [" + ", ".join(f'"{p}"' for p in prefixes) + "]"],
            "transport": ['protocol = "udp"', *transport],
            "relay": [],
            "stats": [f'socket = "{self._path(name, "sock")}"'],
        }
        for table, lines in self.overrides.items():
            keys = {line.split("=")[0].strip() for line in lines}
            tables[table] = [line for line in tables.get(table, []) if line.split("=")[0].strip() not in keys]
            tables[table] += lines
        return "".join(f"[{t}]\n" + "".join(line + "\n" for line in lines) + "\n"
                       for t, lines in tables.items())


class OpenVPN(Tunnel):
    """OpenVPN 2.6 point-to-point over UDP without TLS, cipher or auth:
    the options 2.6 still accepts (it warns that 2.7 drops them).  DCO is
    off: it needs TLS anyway."""

    kind = "openvpn"
    binaries = ("openvpn",)
    PORT = 1194

    def __init__(self, label: str) -> None:
        super().__init__(label)
        self.procs: list[subprocess.Popen] = []
        self._logs: list = []

    def start(self, bed: Testbed) -> None:
        for ns, here, there, local, remote in ((bed.ns_a, bed.addr_a, bed.addr_b, TUNNEL_A, TUNNEL_B),
                                               (bed.ns_b, bed.addr_b, bed.addr_a, TUNNEL_B, TUNNEL_A)):
            log = tempfile.TemporaryFile()
            self._logs.append(log)
            self.procs.append(bed.popen(ns, openvpn_argv(
                "ovpn0", MTU, "udp", local, remote,
                "--local", here, "--remote", there, "--port", str(self.PORT),
            ), stdout=log, stderr=subprocess.STDOUT))
        time.sleep(0.2)
        for proc, log in zip(self.procs, self._logs):
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"openvpn exited with {proc.returncode}: "
                                   f"{log.read().decode(errors='replace')[-500:]}")

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            _terminate(proc)
        for log in self._logs:
            log.close()


class NaglePeer(Tunnel):
    """A tunrelay TCP client (side b) against a len16 peer that leaves
    Nagle on (side a): ``NagleTunnel`` of the test rig.  Ping only (a lone
    echo and bursts, from the relay's side): TCP through a Python peer
    measures the peer, and the row is here for the delayed-ACK stall."""

    kind = "tunrelay-nagle"
    measures = ("ping", "ping burst")

    def __init__(self, label: str, peer: str) -> None:
        super().__init__(label)
        self.peer = peer
        self.tunnel: NagleTunnel | None = None
        self._workdir: tempfile.TemporaryDirectory | None = None

    def missing(self) -> str | None:
        return missing_peer(self.peer)

    def start(self, bed: Testbed) -> None:
        self._workdir = tempfile.TemporaryDirectory(prefix="trbn-")  # short: sun_path
        self.tunnel = NagleTunnel(bed, self.peer, self._workdir.name, mtu=MTU)
        self.tunnel.start()

    def pids(self) -> list[int]:
        return self.tunnel.pids() if self.tunnel is not None else []

    def stop(self) -> None:
        if self.tunnel is not None:
            self.tunnel.close()
        if self._workdir is not None:
            self._workdir.cleanup()


class TunrelayWireguard(ConfiguredRelays):
    """Two ``tunrelay run --config`` with ``framing = "wireguard"``, each
    the other's one ``[[peer]]`` (endpoint, the other side's /32 and /128
    as allowed IPs), MTU 1400 like every row, offloads and queues as the
    daemon defaults them (no key set): the WireGuard protocol against
    wireguard-go in the same run.  Keys are made with tunrelay's own
    helpers, so the row needs no wireguard-tools."""

    kind = "tunrelay-wg"
    WORKDIR = "trbw-"
    PORT = 51820

    def missing(self) -> str | None:
        try:
            import tunrelay.wireguard.noise  # noqa: F401  (needs cryptography)
        except ImportError as exc:
            return f"this build cannot speak WireGuard: {exc}"
        return None

    def configs(self, bed: Testbed) -> dict[str, tuple[str, str]]:
        """name -> (namespace, relay.toml text) of the two relays; writes
        their private keys (owner-only) beside them."""
        from tunrelay.wireguard.noise import generate_private_key, key_to_base64, private_to_public
        sides = {"a": (bed.ns_a, bed.addr_a, TUNNEL_A, TUNNEL6_A),
                 "b": (bed.ns_b, bed.addr_b, TUNNEL_B, TUNNEL6_B)}
        public = {}
        for name in sides:
            private = generate_private_key()
            public[name] = key_to_base64(private_to_public(private))
            fd = os.open(self._path(name, "key"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(key_to_base64(private) + "\n")
        out = {}
        for name, (ns, here, v4, v6) in sides.items():
            other = "b" if name == "a" else "a"
            _, there, ov4, ov6 = sides[other]
            tables = {
                "device": ['name = "trtun0"', 'mode = "tun"', f"mtu = {MTU}",
                           f'address = ["{v4}/{PREFIX}", "{v6}/64"]'],
                "transport": ['protocol = "udp"', f'listen = "{here}:{self.PORT}"',
                              'framing = "wireguard"'],
                "stats": [f'socket = "{self._path(name, "sock")}"'],
                "wireguard": [f'private_key_file = "{self._path(name, "key")}"'],
            }
            text = "".join(f"[{t}]\n" + "".join(line + "\n" for line in lines) + "\n"
                           for t, lines in tables.items())
            text += "\n".join(["[[peer]]", f'name = "{other}"', f'public_key = "{public[other]}"',
                               f'endpoint = "{there}:{self.PORT}"',
                               f'allowed_ips = ["{ov4}/32", "{ov6}/128"]', ""])
            out[name] = (ns, text)
        return out

    def refused(self, name: str, proc: subprocess.Popen) -> None:
        # Exit 2 naming the framing: a build from before WireGuard.
        if proc.poll() == 2 and "wireguard" in self.log(name):
            raise Unsupported(f"rejected by this build: {self.log(name).strip()[-200:]}") from None


def wireguard_go_label() -> str:
    """"wireguard-go v0.0.20230223": the row says which build it measured
    (Debian bookworm's 2022 build lacks the offloads of later ones)."""
    if shutil.which("wireguard-go") is None:
        return "wireguard-go"
    done = subprocess.run(["wireguard-go", "--version"], capture_output=True, text=True)
    match = re.search(r"v\d[\w.]*", done.stdout + done.stderr)
    return f"wireguard-go {match.group(0)}" if match else "wireguard-go (version unknown)"


class WireguardGo(Tunnel):
    """Userspace WireGuard: one wireguard-go per side, configured with wg."""

    kind = "wireguard-go"
    binaries = ("wireguard-go", "wg")
    PORT = 51820
    # wireguard-go refuses to run where the kernel has WireGuard, unless told.
    ENV = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
    UAPI_DIR = "/var/run/wireguard"

    def __init__(self, label: str) -> None:
        super().__init__(label)
        self.procs: list[subprocess.Popen] = []
        self._keys: tempfile.TemporaryDirectory | None = None

    def start(self, bed: Testbed) -> None:
        self._keys = tempfile.TemporaryDirectory(prefix="wg-bench-")
        # The UAPI socket lives in /var/run/wireguard, shared by all
        # namespaces: the device names must differ between the two sides.
        sides = {"a": (bed.ns_a, bed.addr_a, TUNNEL_A, f"wg{bed.ns_a[2:]}"[:15]),
                 "b": (bed.ns_b, bed.addr_b, TUNNEL_B, f"wg{bed.ns_b[2:]}"[:15])}
        public = {}
        for name in sides:
            private = _wg(["genkey"])
            public[name] = _wg(["pubkey"], private)
            path = os.path.join(self._keys.name, name)
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(private + "\n")
        env = dict(os.environ, **self.ENV)
        for name, (ns, _here, addr, dev) in sides.items():
            other = "b" if name == "a" else "a"
            self.procs.append(bed.popen(ns, ["wireguard-go", "-f", dev], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            _wait_for(os.path.join(self.UAPI_DIR, f"{dev}.sock"), self.procs[-1])
            _run(bed, ns, ["wg", "set", dev, "private-key", os.path.join(self._keys.name, name),
                           "listen-port", str(self.PORT), "peer", public[other],
                           "endpoint", f"{sides[other][1]}:{self.PORT}",
                           "allowed-ips", TUNNEL_NET])
            _ip(bed, ns, "addr", "add", f"{addr}/{PREFIX}", "dev", dev)
            _ip(bed, ns, "link", "set", "dev", dev, "mtu", str(MTU), "up")

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            _terminate(proc)
        if self._keys is not None:
            self._keys.cleanup()


def all_tunnels() -> list[Tunnel]:
    """Every tunnel, in table order."""
    tunnels: list[Tunnel] = [VethDirect("veth (no tunnel)"), KernelVxlan("kernel vxlan")]
    for label, (protocol, overrides) in TUNRELAY_VARIANTS.items():
        tunnels.append(Tunrelay(label, protocol, overrides,
                                kind="tunrelay-aead" if "aead" in label else "tunrelay"))
        if label == POINT_TO_POINT:  # issue 8's rows next to the one they are held to
            tunnels.append(Tunrelay(ONE_PEER_TABLE, protocol, overrides, kind="tunrelay-peers",
                                    pair=OnePeerTablePair))
            tunnels.append(HubTunnel(HUB, overrides))
            # Issue 10's loop levers, beside the row with today's defaults.
            for lever, lines in ((SPLIT_LOOPS, ["duplex = false", "busy_poll_us = 0"]),
                                 (BUSY_POLL, [f"busy_poll_us = {BUSY_POLL_US}"]),
                                 (IO_SYSCALLS, ['io = "syscalls"'])):
                tunnels.append(Tunrelay(lever, protocol,
                                        {**overrides, "relay": overrides["relay"] + lines},
                                        kind="tunrelay-loop"))
    tunnels.append(Tunrelay("python relay udp (naive)", *PYTHON_RELAY, kind="python"))
    # The WireGuard protocol both ways, next to each other (issue 9's targets).
    tunnels += [OpenVPN("openvpn p2p udp, no crypto"), WireguardGo(wireguard_go_label()),
                TunrelayWireguard(TUNRELAY_WG)]
    # Issue 10: tunrelay's TCP mode against peers that leave Nagle on.
    tunnels += [NaglePeer(NAGLE_LEN16, "len16"), NaglePeer(NAGLE_OPENVPN, "openvpn")]
    return tunnels


# ---------------------------------------------------------------- helpers

def _run(bed: Testbed, ns: str, argv: list[str]) -> None:
    done = bed.run(ns, argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"'{' '.join(argv)}' in {ns} failed: {done.stderr.strip()}")


def _ip(bed: Testbed, ns: str, *args: str) -> None:
    _run(bed, ns, ["ip", *args])


def _wg(args: list[str], stdin: str | None = None) -> str:
    return subprocess.run(["wg", *args], input=stdin, capture_output=True, text=True,
                          check=True).stdout.strip()


def _wait_for(path: str, proc: subprocess.Popen, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"wireguard-go exited with {proc.returncode} before creating {path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"wireguard-go did not create {path} within {timeout:.0f} s")
        time.sleep(0.02)


def _terminate(proc: subprocess.Popen, timeout: float = 3.0) -> None:
    stop_process(proc, timeout=timeout)
