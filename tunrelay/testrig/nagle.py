"""tunrelay over TCP against a peer that leaves Nagle on (issue 10).

``NagleTunnel(bed, peer, workdir)``: in ``bed.ns_a`` a foreign len16 peer
that listens and never sets TCP_NODELAY, in ``bed.ns_b`` a tunrelay TCP
client (side b of a ``RelayPair``, configured as an operator would) that
connects to it.  The peers:

- ``"len16"``: ``nagle_peer`` (this package), which writes each packet as
  two ``send()`` calls, the length and then the packet, as simpletun does;
- ``"openvpn"``: OpenVPN 2.6 point-to-point over TCP without
  ``--tcp-nodelay``, no cipher or auth (its TCP framing is len16 too).

Overlay addresses as in the pair: 10.99.0.1 on the peer's device (ns_a),
10.99.0.2 on the relay's (ns_b).  Traffic from the relay's side shows the
stall of a relay that lets its ACKs be delayed: ``nagle_peer`` holds the
packet half of every reply ~40 ms; OpenVPN sends the first reply of a
burst at once and holds the others as long.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from .netns import Testbed, stop_process
from .pair import PORT, READY_TIMEOUT_S, TUNNEL_A, TUNNEL_B, RelayPair

__all__ = ["PEERS", "NagleTunnel", "openvpn_argv"]

#: peer name -> the commands it needs installed.
PEERS = {"len16": (), "openvpn": ("openvpn",)}
PEER_DEVICE = "nagle0"
#: Run as a script: a foreign peer, nothing of tunrelay imported.
NAGLE_PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nagle_peer.py")


def openvpn_argv(device: str, mtu: int, proto: str, local: str, remote: str,
                 *endpoint: str) -> list[str]:
    """OpenVPN 2.6 point-to-point without TLS, cipher or auth (2.6 still
    accepts them, with a warning that 2.7 drops them), DCO off (it needs
    TLS): tunnel addresses ``local`` and ``remote``, ``proto`` and its
    ``endpoint`` options (e.g. "--local", HOST, "--port", PORT)."""
    return ["openvpn", "--dev", device, "--dev-type", "tun", "--tun-mtu", str(mtu),
            "--proto", proto, *endpoint, "--ifconfig", local, remote,
            "--cipher", "none", "--auth", "none", "--disable-dco", "--verb", "1"]


def missing_peer(peer: str) -> str | None:
    """Why ``peer`` cannot run here (a command not installed), or None."""
    absent = [b for b in PEERS[peer] if shutil.which(b) is None]
    return f"not installed: {', '.join(absent)}" if absent else None


class NagleTunnel:
    """A Nagle peer and a tunrelay TCP client: ``start()``, ``pids()``,
    ``log()``, ``close()`` (the test bed removes whatever is left)."""

    def __init__(self, bed: Testbed, peer: str, workdir: str, *, mtu: int = 1400) -> None:
        if peer not in PEERS:
            raise ValueError(f"peer {peer!r}: expected one of {', '.join(PEERS)}")
        self.bed, self.peer, self.mtu = bed, peer, mtu
        self.pair = RelayPair(bed, protocol="tcp", mtu=mtu, workdir=workdir)
        self.peer_log_path = os.path.join(workdir, f"{peer}.log")
        self.peer_proc: subprocess.Popen | None = None

    def peer_argv(self) -> list[str]:
        if self.peer == "len16":
            return [sys.executable, NAGLE_PEER, "--device", PEER_DEVICE,
                    "--address", f"{TUNNEL_A}/24", "--mtu", str(self.mtu),
                    "--listen", f"{self.bed.addr_a}:{PORT}"]
        # No --tcp-nodelay: OpenVPN leaves Nagle on.
        return openvpn_argv(PEER_DEVICE, self.mtu, "tcp-server", TUNNEL_A, TUNNEL_B,
                            "--local", self.bed.addr_a, "--port", str(PORT))

    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        """The peer listening, then the relay; until the relay is connected."""
        with open(self.peer_log_path, "ab") as log:
            self.peer_proc = self.bed.popen(self.bed.ns_a, self.peer_argv(), stdout=log,
                                            stderr=subprocess.STDOUT)
        self._wait_listening(timeout)
        self.pair.start_side("b", wait=False)
        self.pair.wait_ready("b", timeout=timeout)

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.bed.run(self.bed.ns_a, ["ss", "-Hltn", f"sport = :{PORT}"],
                               capture_output=True, text=True).stdout.strip():
            if self.peer_proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.peer} peer not listening on port {PORT} "
                                   f"(exit code {self.peer_proc.poll()}):\n{self.peer_log()}")
            time.sleep(0.02)

    def pids(self) -> list[int]:
        return [proc.pid for proc in (self.peer_proc, self.pair.sides["b"].proc) if proc]

    def peer_log(self) -> str:
        try:
            with open(self.peer_log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def log(self) -> str:
        return (f"----- relay log -----\n{self.pair.log('b')}"
                f"----- {self.peer} peer log -----\n{self.peer_log()}")

    def close(self) -> None:
        self.pair.close()
        if self.peer_proc is not None:
            stop_process(self.peer_proc)
