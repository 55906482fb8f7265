"""Two relays, one in each namespace of a Testbed, started through the CLI.

The demo, the integration tests and the benchmarks all need "a tunnel
between two hosts on this machine"; this is that, built exactly the way an
operator would: a relay.toml per host and ``tunrelay run --config``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from ..daemon.stats import query
from ..errors import TunrelayError
from .netns import Testbed, stop_process

#: Tunnel (overlay) addresses: inside the two namespaces only.
TUNNEL_A, TUNNEL_B = "10.99.0.1", "10.99.0.2"
TUNNEL6_A, TUNNEL6_B = "fd00:99::1", "fd00:99::2"
PORT = 55555
DEVICE = "trtun0"

READY_TIMEOUT_S = 15.0


@dataclass
class Side:
    name: str          # "a" or "b"
    ns: str
    config_path: str
    socket_path: str
    log_path: str
    proc: subprocess.Popen | None = None
    extra: dict = field(default_factory=dict)


class RelayPair:
    """``RelayPair(bed, protocol="udp", mode="tun", ...)``: write configs,
    ``start()`` both relays, ``stats(side)``, ``stop(side) -> exit code``.

    With TCP, side a is the server and side b the client.  ``overrides``
    adds raw TOML lines per table for both sides (e.g. {"relay": ["engine =
    \\"python\\""]}); ``overrides_a``/``overrides_b`` for one side.
    """

    def __init__(self, bed: Testbed, *, protocol: str = "udp", mode: str = "tun",
                 mtu: int = 1400, overrides: dict | None = None,
                 overrides_a: dict | None = None, overrides_b: dict | None = None,
                 workdir: str | None = None) -> None:
        self.bed = bed
        self.protocol, self.mode, self.mtu = protocol, mode, mtu
        self.workdir = workdir or tempfile.mkdtemp(prefix="tunrelay-")
        self.sides = {}
        for name, ns, own in (("a", bed.ns_a, overrides_a), ("b", bed.ns_b, overrides_b)):
            side = Side(name, ns,
                        config_path=os.path.join(self.workdir, f"{name}.toml"),
                        socket_path=os.path.join(self.workdir, f"{name}.sock"),
                        log_path=os.path.join(self.workdir, f"{name}.log"))
            with open(side.config_path, "w") as f:
                f.write(self._config(name, _merge(overrides, own)))
            self.sides[name] = side

    def _config(self, name: str, overrides: dict) -> str:
        here, there = (self.bed.addr_a, self.bed.addr_b) if name == "a" else (self.bed.addr_b, self.bed.addr_a)
        tunnel = TUNNEL_A if name == "a" else TUNNEL_B
        tunnel6 = TUNNEL6_A if name == "a" else TUNNEL6_B
        tables = {
            "device": [f'name = "{DEVICE}"', f'mode = "{self.mode}"', f"mtu = {self.mtu}",
                       f'address = ["{tunnel}/24", "{tunnel6}/64"]'],
            "transport": [f'protocol = "{self.protocol}"'],
            "relay": [],
            "stats": [f'socket = "{os.path.join(self.workdir, name + ".sock")}"'],
        }
        if self.protocol == "udp":
            tables["transport"] += [f'listen = "{here}:{PORT}"', f'peer = "{there}:{PORT}"']
        elif name == "a":
            tables["transport"] += [f'listen = "{here}:{PORT}"']
        else:
            tables["transport"] += [f'peer = "{there}:{PORT}"']
        aead = any(line.replace(" ", "") == 'framing="aead"' for line in overrides.get("transport", []))
        if aead and self.protocol == "udp":
            # Both ends share the key; each needs its own direction, as an
            # operator would write it: side a is role "a", side b role "b".
            # (Over TCP the client and server roles decide.)
            tables["security"] = [f'role = "{name}"']
        for table, lines in overrides.items():
            keys = {line.split("=")[0].strip() for line in lines}
            tables[table] = [line for line in tables.get(table, []) if line.split("=")[0].strip() not in keys]
            tables[table] += lines
        return "".join(f"[{t}]\n" + "".join(line + "\n" for line in lines) + "\n"
                       for t, lines in tables.items())

    def start(self, *names: str, wait: bool = True) -> None:
        for name in names or ("a", "b"):
            self.start_side(name, wait=False)
        if wait:
            self.wait_ready(*(names or ("a", "b")))

    def start_side(self, name: str, *, wait: bool = True, prefix: tuple = (),
                   env: dict[str, str] | None = None) -> None:
        """Start one relay; ``prefix`` wraps the command (e.g. setpriv),
        ``env`` adds to its environment (e.g. systemd's NOTIFY_SOCKET)."""
        side = self.sides[name]
        log = open(side.log_path, "ab")
        side.proc = self.bed.popen(side.ns, [*prefix, sys.executable, "-m", "tunrelay", "run",
                                              "--config", side.config_path],
                                   stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **env} if env else None)
        log.close()
        if wait:
            self.wait_ready(name)

    def wait_ready(self, *names: str, timeout: float = READY_TIMEOUT_S) -> None:
        """Until each relay answers on its control socket in a working
        state (TCP: connected)."""
        deadline = time.monotonic() + timeout
        for name in names:
            side = self.sides[name]
            wait_running(name, side.proc, side.socket_path, lambda n=name: self.log(n),
                         deadline, timeout)

    def stats(self, name: str) -> dict:
        return query(self.sides[name].socket_path)

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal one relay and return its exit code."""
        proc = self.sides[name].proc
        if proc is None:
            return 0
        if not stop_process(proc, sig, timeout):
            raise TunrelayError(f"relay {name} did not exit within {timeout} s of {sig!r}")
        return proc.returncode

    def log(self, name: str) -> str:
        try:
            with open(self.sides[name].log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        for name in self.sides:
            try:
                self.stop(name)
            except TunrelayError:
                pass

    def __enter__(self) -> RelayPair:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _merge(common: dict | None, own: dict | None) -> dict:
    merged: dict = {}
    for source in (common or {}, own or {}):
        for table, lines in source.items():
            merged.setdefault(table, []).extend(lines)
    return merged


def wait_running(name: str, proc: subprocess.Popen | None, socket_path: str, log,
                 deadline: float, timeout: float) -> None:
    """Until the relay `name` answers on its control socket in a working
    state (TCP: connected); TunrelayError with its log (`log()`) if it
    exits first or is not there by `deadline` (`timeout` s after start)."""
    while True:
        if proc is not None and proc.poll() is not None:
            raise TunrelayError(f"relay {name} exited with {proc.returncode}:\n{log()}")
        try:
            if query(socket_path, timeout=1)["state"] in ("running", "connected"):
                return
        except TunrelayError:
            pass
        if time.monotonic() > deadline:
            raise TunrelayError(f"relay {name} not ready after {timeout} s:\n{log()}")
        time.sleep(0.05)
