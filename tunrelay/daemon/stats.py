"""Counter snapshots as text, JSON and one-line logs, and the local
control socket that ``tunrelay stats`` reads them from.

The control socket is a unix stream socket: a client connects, sends one
line (``stats``), and reads one JSON document until the server closes.  It
is served by a daemon thread that never touches the pumps' loops: it asks
the relay for a snapshot, which reads the counters without stopping them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable

from ..counters import DIRECTIONS
from ..errors import TunrelayError

log = logging.getLogger("tunrelay.daemon.stats")

_REQUEST_LIMIT = 64
_CLIENT_TIMEOUT_S = 2.0


def format_table(snapshot: dict) -> str:
    """A human table: header facts, then one column per direction (and
    for a WireGuard device, its counters and one line per peer)."""
    lines = []
    for key in ("device", "mode", "queues", "transport", "framing", "engine", "loop", "io",
                "offload", "aead", "wireguard", "state", "peer", "peer_mode", "connections", "rejected",
                "refused", "uptime"):
        if key in snapshot and snapshot[key] not in (None, ""):
            value = snapshot[key]
            if key == "uptime":
                value = f"{value:.0f} s"
            elif key == "offload":
                value = ", ".join(k for k, on in value.items() if on) or "off"
            elif key == "loop":
                spin = value["busy_poll_us"]
                value = (("one thread per queue, both directions" if value["duplex"]
                          else "a thread per direction")
                         + (f", busy polling {spin} µs" if spin else ", no busy polling"))
            elif key == "aead":
                value = (f"{value['cipher']}, role {value['role']}, session "
                         f"{' '.join(value['sessions'])}, {value['peer_sessions']} peer "
                         f"session(s) accepted, {value['evicted']} evicted, "
                         f"{value['roams']} endpoint move(s)")
            elif key == "wireguard":
                value = (f"public key {value['public_key']}, listening on port "
                         f"{value['listen_port']}"
                         f"{', fwmark ' + hex(value['fwmark']) if value.get('fwmark') else ''}")
            elif key == "refused":
                value = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in value.items()) or "none"
            elif key == "peer_mode":
                key = "peer chosen"
            lines.append(f"{key + ':':<13}{value}")
    if "egress" in snapshot:
        if lines:
            lines.append("")
        lines.extend(_direction_rows(snapshot))
    if snapshot.get("peers"):
        lines.append("")
        lines.extend(format_peers(snapshot["peers"]))
    if "wg_peers" in snapshot:
        lines.append("")
        lines.extend(format_wg_peers(snapshot["wg_peers"]))
        counters = snapshot.get("wireguard", {}).get("counters")
        if counters:
            lines.append("")
            lines.extend(format_counters(counters))
    return "\n".join(lines)


def _direction_rows(snapshot: dict) -> list[str]:
    """The pumps' counters: one column per direction."""
    rows = [("", "egress", "ingress")]
    for total in ("packets", "bytes", "batches", "syscalls", "tun_io", "mss_clamped"):
        rows.append((total, *(str(snapshot[d].get(total, 0)) for d in DIRECTIONS)))
    packets = [snapshot[d]["packets"] for d in DIRECTIONS]
    rows.append(("syscalls/pkt", *(
        f"{snapshot[d]['syscalls'] / p:.2f}" if p else "-" for d, p in zip(DIRECTIONS, packets))))
    reasons = sorted({r for d in DIRECTIONS for r in snapshot[d]["drops"]})
    for reason in reasons:
        rows.append((f"drop {reason}", *(
            str(snapshot[d]["drops"].get(reason, "-")) for d in DIRECTIONS)))
    for kind in snapshot["egress"]["errors"]:
        rows.append((f"error {kind}", *(str(snapshot[d]["errors"][kind]) for d in DIRECTIONS)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return [f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}"
            for row in rows]


def format_wg_peers(peers: list, now: float | None = None) -> list[str]:
    """One line per peer of a WireGuard device: name (or the start of its
    public key), endpoint, how long ago its latest handshake completed,
    bytes sent to it (tx) and received from it (rx), as `wg show` has them."""
    now = time.time() if now is None else now
    rows = [("peer", "endpoint", "latest handshake", "tx bytes", "rx bytes", "allowed ips")]
    for peer in peers:
        when = peer.get("latest_handshake")
        ago = "never" if when is None else f"{max(0.0, now - when):.0f} s ago"
        rows.append((peer["name"], peer.get("endpoint") or "(unknown)", ago,
                     str(peer["tx_bytes"]), str(peer["rx_bytes"]),
                     ", ".join(peer.get("allowed_ips", [])) or "(none)"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if i in (3, 4) else cell.ljust(w)
                      for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
            for row in rows]


#: Numbers in a WireGuard device's stats that are facts, not counters
#: (the header shows them), and its per-pump list (summed above it).
_NOT_COUNTERS = ("peers", "listen_port", "under_load", "pumps")


def format_counters(counters: dict, prefix: str = "") -> list[str]:
    """A device's nested counters, one ``name value`` line each (dotted
    names for nesting), the zeros left out; ``--json`` has them all."""
    lines = []
    for key, value in counters.items():
        if not prefix and key in _NOT_COUNTERS:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            lines.extend(format_counters(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value:
            lines.append(f"{name} {value}")
    return lines


def format_peers(peers: dict, now: float | None = None) -> list[str]:
    """One line per peer of a relay with [[peer]] tables: name, endpoint,
    how long ago it was last heard from, packets and bytes received (rx,
    from the peer) and sent (tx, to it), and drops."""
    now = time.time() if now is None else now
    rows = [("peer", "endpoint", "last seen", "rx pkts", "rx bytes", "tx pkts", "tx bytes",
             "drops rx/tx")]
    for name, info in peers.items():
        seen = info.get("last_seen")
        ago = "never" if seen is None else f"{max(0.0, now - seen):.1f} s ago"
        rx, tx = info["ingress"], info["egress"]
        rows.append((name, info.get("endpoint") or "(unknown)", ago, str(rx["packets"]),
                     str(rx["bytes"]), str(tx["packets"]), str(tx["bytes"]),
                     f"{rx['drops']}/{tx['drops']}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
            for row in rows]


def format_line(snapshot: dict) -> str:
    """One line for the periodic log."""
    parts = []
    for direction in DIRECTIONS:
        c = snapshot[direction]
        drops = sum(c["drops"].values())
        parts.append(f"{direction} {c['packets']} pkts {c['bytes']} B {drops} drops")
    return "; ".join(parts)


class ControlServer:
    """Serves ``snapshot()`` as JSON on a unix socket at ``path``, and
    each of ``requests`` (name -> a callable returning a dict, such as
    "reload") as the answer to that name."""

    def __init__(self, path: str, snapshot: Callable[[], dict],
                 requests: dict[str, Callable[[], dict]] | None = None) -> None:
        self.path = path
        self._snapshot = snapshot
        self._requests = {name.encode(): call for name, call in (requests or {}).items()}
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def open(self) -> None:
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o755, exist_ok=True)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)
            os.chmod(self.path, 0o660)
            sock.listen(8)
        except OSError as exc:
            sock.close()
            raise TunrelayError(f"control socket {self.path}: {exc.strerror}") from exc
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def _remove_stale(self) -> None:
        """A socket file left by a relay that died is removed; one that a
        live relay answers on means two relays share a path: refuse."""
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise TunrelayError(f"control socket {self.path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(0.5)
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)
            return
        finally:
            probe.close()
        raise TunrelayError(
            f"control socket {self.path}: another relay is running there "
            "(set [stats] socket to a different path)")

    def _serve(self) -> None:
        sock = self._sock
        while True:
            try:
                client, _ = sock.accept()
            except OSError:
                return  # closed
            with client:
                try:
                    client.settimeout(_CLIENT_TIMEOUT_S)
                    request = client.recv(_REQUEST_LIMIT).strip()
                    if request in self._requests:
                        client.sendall(json.dumps(self._requests[request]()).encode())
                        continue
                    if request != b"stats":
                        client.sendall(json.dumps({"error": "unknown request"}).encode())
                        continue
                    client.sendall(json.dumps(self._snapshot()).encode())
                except OSError:
                    continue
                except Exception:  # a bug in a snapshot must not kill the server
                    log.exception("control socket request failed")

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        if self._thread is not None:
            self._thread.join(timeout=2)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except PermissionError:
            # Privileges were dropped and the directory is root's: the next
            # start finds the file stale (nothing answers) and removes it.
            log.debug("control socket %s left behind: no permission to remove it", self.path)


def query(path: str, timeout: float = _CLIENT_TIMEOUT_S, request: str = "stats") -> dict:
    """Ask the relay listening on ``path`` for its counters (or send it
    another ``request``, such as "reload")."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError as exc:
            raise TunrelayError(f"no relay is running: {path} does not exist") from exc
        except ConnectionRefusedError as exc:
            raise TunrelayError(f"no relay is running: nothing answers on {path}") from exc
        except OSError as exc:
            raise TunrelayError(f"cannot reach the relay on {path}: {exc.strerror}") from exc
        sock.sendall(request.encode() + b"\n")
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except TimeoutError as exc:
        raise TunrelayError(f"the relay on {path} did not answer within {timeout} s") from exc
    except OSError as exc:  # reset or broken pipe: the relay went away mid-answer
        raise TunrelayError(f"the relay on {path} closed the connection: {exc.strerror}") from exc
    finally:
        sock.close()
    try:
        return json.loads(b"".join(chunks))
    except ValueError as exc:
        raise TunrelayError(f"the relay on {path} sent something that is not JSON") from exc
