"""The relay's lifecycle: device + transport -> pump, supervised.

One object owns the close order: stop the loops, join them, then close
the socket(s), then the device.  Never close an fd a loop may still be
blocked on.

Supervision (``run()``, in the caller's thread):
- UDP: one socket for the relay's life; the pump runs until stopped or
  until the device vanishes.
- TCP client: connect (with capped exponential backoff), pump until the
  connection ends, reconnect.  The device stays up throughout.
- TCP server: accept one peer, pump until it goes, accept the next.
  Further connections while a peer is live are refused and counted.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import threading
import time

from . import transport as _transport
from ._runner import FATAL, STOPPED, Outcome
from .counters import DIRECTIONS, empty_direction
from .config import Config
from . import device
from .device import Device
from .errors import PumpError
from .stats import ControlServer, format_line

log = logging.getLogger("tunrelay.relay")

#: How often the supervisor looks up from waiting (stop, housekeeping).
SUPERVISE_SLICE_S = 0.2


def pump_class(engine: str):
    """The compiled pump for "fast", the pure-Python one for "python"."""
    if engine == "python":
        from .pypump import PyPump
        return PyPump
    from ._fastpath import Pump
    return Pump


class Relay:
    """A configured relay: ``run()`` blocks until ``stop()``."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.device = Device(cfg.device, log=logging.getLogger("tunrelay.device"),
                             offload=_offload_wanted(cfg))
        #: One pump per TUN queue (UDP), or the one pump of the TCP connection.
        self.pumps: list = []
        self._pump_class = pump_class(cfg.relay.engine)
        self._stop = threading.Event()
        self._udp: list[socket.socket] = []
        self._peer = None
        self._client: _transport.TcpClient | None = None
        self._server: _transport.TcpServer | None = None
        self._conn: socket.socket | None = None
        self._control: ControlServer | None = None
        self._state = "starting"
        self._connections = 0
        self._rejected = 0
        self._started = time.monotonic()
        self._learned = None
        self._device_lost = False

    # ------------------------------------------------------------ control

    def stop(self) -> None:
        """Ask run() to return.  Safe from a signal handler or any thread."""
        self._stop.set()
        for pump in self.pumps:
            pump.request_stop()

    def stats(self) -> dict:
        """Counters of all pumps, summed per direction."""
        return sum_counters([pump.stats() for pump in self.pumps])

    def snapshot(self) -> dict:
        """Everything ``tunrelay stats`` shows."""
        tcfg = self.cfg.transport
        peer = None
        if self._conn is not None:
            try:
                peer = _transport.format_sockaddr(self._conn.getpeername())
            except OSError:
                peer = None
        elif self.pumps and self.pumps[0].peer is not None:
            peer = _transport.format_sockaddr(self.pumps[0].peer)
        return {
            "device": self.device.name,
            "mode": self.cfg.device.mode,
            "transport": tcfg.protocol,
            "framing": tcfg.framing,
            "engine": self.cfg.relay.engine,
            "queues": len(self.device.fds) or self.cfg.device.queues,
            "offload": ({k: v for k, v in self.pumps[0].offloads.items()}
                        if self.pumps and hasattr(self.pumps[0], "offloads") else None),
            "state": self._state,
            "peer": peer,
            "aead": ({"cipher": self.cfg.security.cipher,
                      "sessions": [p.aead_session for p in self.pumps],
                      "peer_sessions": sum(p.aead_peer_sessions for p in self.pumps)}
                     if self.cfg.transport.framing == "aead" and self.pumps else None),
            "connections": self._connections if tcfg.protocol == "tcp" else None,
            "rejected": self._rejected if tcfg.is_server else None,
            "uptime": time.monotonic() - self._started,
            **self.stats(),
        }

    # ------------------------------------------------------------ running

    def open(self) -> None:
        """Create the device and the listening/UDP socket(s); start the
        control socket.  Separate from run() so a caller can drop
        privileges in between."""
        try:
            self.device.open()
            tcfg = self.cfg.transport
            if tcfg.protocol == "udp":
                self._udp, self._peer = _transport.open_udp_queues(tcfg, len(self.device.fds))
                where = _transport.format_sockaddr(self._udp[0].getsockname())
                queues = f" ({len(self._udp)} sockets, steered by CPU)" if len(self._udp) > 1 else ""
                if self._peer is None:
                    log.info("udp: listening on %s%s, peer to be learned from the first valid datagram",
                             where, queues)
                else:
                    log.info("udp: listening on %s%s, peer %s", where, queues,
                             _transport.format_sockaddr(self._peer))
            elif tcfg.is_server:
                self._server = _transport.TcpServer(tcfg, log=logging.getLogger("tunrelay.transport"))
                self._server.open()
            else:
                self._client = _transport.TcpClient(tcfg, log=logging.getLogger("tunrelay.transport"))
            self._control = ControlServer(self.cfg.control_socket, self.snapshot)
            self._control.open()
        except BaseException:
            self.close()
            raise

    def run(self) -> None:
        """Pump until stop(); raises PumpError when the device is gone."""
        if not self.device.fds:
            self.open()
        watcher = None
        if not self._udp:
            # TCP: while connecting or listening no pump reads the device,
            # so nothing else would notice it being deleted.
            watcher = threading.Thread(target=self._watch_device, name="device-watch",
                                       daemon=True)
            watcher.start()
        try:
            while not self._stop.is_set():
                socks = self._next_sockets()
                if socks is None:
                    break
                outcome = self._pump_until_end(socks)
                if outcome.reason == STOPPED:
                    break
                if outcome.reason == FATAL:
                    if outcome.errno == errno.EBADFD:
                        self._device_lost = True
                        break
                    raise PumpError(f"device {self.device.name}: {outcome}; the relay cannot go on")
                self._drop_connection(outcome)
            if self._device_lost:
                raise PumpError(f"device {self.device.name} was deleted or detached from under "
                                "the relay; the relay cannot go on")
        finally:
            self._state = "stopping"
            if watcher is not None:
                self._stop.set()  # run() is ending: the watcher too, before the fds close
                watcher.join()
            self.close()

    def _watch_device(self) -> None:
        """Until the relay stops: poll the device fds for errors only (a
        deleted TUN device polls POLLERR); on one, stop the relay with
        "device lost"."""
        poller = select.poll()
        for fd in self.device.fds:
            poller.register(fd, 0)  # POLLERR/POLLHUP/POLLNVAL are always reported
        while not self._stop.is_set():
            if poller.poll(SUPERVISE_SLICE_S * 1000):
                log.error("device %s: gone (deleted from under the relay?)", self.device.name)
                self._device_lost = True
                self.stop()
                return

    def _next_sockets(self) -> list[socket.socket] | None:
        if self._udp:
            self._state = "running"
            return self._udp
        if self._server is not None:
            self._state = "listening"
            self._conn = self._server.accept(self._stop)
        else:
            self._state = "connecting"
            self._conn = self._client.connect(self._stop)
        if self._conn is None:
            return None
        self._connections += 1
        self._state = "connected"
        return [self._conn]

    def _make_pumps(self, socks: list[socket.socket]) -> None:
        options = {"offload": True} if self.device.vnet_hdr else {}
        if self.cfg.relay.offload is False and self.cfg.relay.engine == "fast":
            options["gso"] = False  # offload = false: no UDP GSO either
        if self.cfg.transport.framing == "aead":
            options.update(key=self.cfg.security.key, cipher=self.cfg.security.cipher)
        for fd, sock in zip(self.device.fds, socks):
            self.pumps.append(self._pump_class(
                fd, sock, framing=self.cfg.transport.framing,
                mode=self.cfg.device.mode, mtu=self.cfg.device.mtu,
                batch=self.cfg.relay.batch,
                peer=self._peer if self._udp else None, **options))
        if self.cfg.transport.framing == "aead":
            log.info("aead: %s, session %s", self.cfg.security.cipher,
                     ", ".join(p.aead_session for p in self.pumps))
        if self.device.vnet_hdr:
            log.info("offloads: tun %s, udp %s", _tun_offloads(self.device.offload_flags),
                     ", ".join(k for k, v in self.pumps[0].offloads.items()
                               if v and k != "vnet_hdr") or "none")

    def _pump_until_end(self, socks: list[socket.socket]):
        if not self.pumps:
            self._make_pumps(socks)
        else:
            self.pumps[0].attach(socks[0])  # TCP: the new connection
        if self._stop.is_set():
            return _stopped()
        for pump in self.pumps:
            pump.start()
        interval = self.cfg.stats.interval
        next_log = time.monotonic() + interval if interval else None
        while True:
            outcome = self.pumps[0].wait(SUPERVISE_SLICE_S)
            if outcome is None:
                outcome = next((o for o in (p.wait(0) for p in self.pumps[1:]) if o), None)
            if outcome is not None or self._stop.is_set():
                # One pump ended (or stop): end them all, report the first
                # that ended on its own.
                ended = [pump.stop() for pump in self.pumps]
                return next((o for o in [outcome, *ended] if o and o.reason != STOPPED), ended[0])
            self._housekeeping()
            if next_log is not None and time.monotonic() >= next_log:
                log.info("stats: %s", format_line(self.stats()))
                next_log += interval

    def _housekeeping(self) -> None:
        if self._server is not None:
            refused = self._server.reject_pending()
            if refused:
                self._rejected += refused
                log.warning("tcp: refused %d connection(s): a peer is already connected", refused)
        if self._udp and self._learned is None and self.pumps[0].learns_peer:
            peer = self.pumps[0].peer
            if peer is not None:
                self._learned = peer
                log.info("udp: learned peer %s", _transport.format_sockaddr(peer))

    def _drop_connection(self, outcome) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        log.warning("tcp: connection lost (%s)%s", outcome,
                    "; reconnecting" if self._client is not None else "; waiting for the peer")

    def close(self) -> None:
        """Stop and join the loops, then close sockets, then the device."""
        for pump in self.pumps:
            if pump.running:
                pump.stop()
        if self._control is not None:
            self._control.close()
            self._control = None
        for sock in [self._conn, *self._udp]:
            if sock is not None:
                sock.close()
        self._conn, self._udp = None, []
        if self._server is not None:
            self._server.close()
            self._server = None
        for pump in self.pumps:
            close_pump = getattr(pump, "close", None)
            if close_pump is not None:
                close_pump()
        if self.device.fds:
            name = self.device.name
            self.device.close()
            log.info("device %s closed%s", name,
                     " (persistent: left in place)" if self.cfg.device.persist else " and removed")
        self._state = "stopped"

    def __enter__(self) -> "Relay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sum_counters(snapshots: list[dict]) -> dict:
    """Pump counter snapshots added up (several queues read as one)."""
    if not snapshots:
        return _zero_counters()
    total = snapshots[0]
    for other in snapshots[1:]:
        total = _add(total, other)
    return total


def _add(a, b, key=None):
    if isinstance(a, dict):
        return {k: _add(value, b[k], k) for k, value in a.items()}
    if key == "last_errno":
        return a or b  # an errno, not a count
    return a + b


def _offload_wanted(cfg: Config) -> str | bool:
    """The Device's offload argument: only the compiled pump in TUN mode
    can use a virtio_net_hdr (config.py refuses offload = true elsewhere)."""
    if cfg.relay.offload is False or cfg.device.mode != "tun" or cfg.relay.engine != "fast":
        return False
    return cfg.relay.offload


def _tun_offloads(flags: int) -> str:
    names = [name for name, bit in (("csum", device.TUN_F_CSUM), ("tso4", device.TUN_F_TSO4),
                                    ("tso6", device.TUN_F_TSO6), ("uso4", device.TUN_F_USO4),
                                    ("uso6", device.TUN_F_USO6)) if flags & bit]
    return "+".join(names) or "none"


def _stopped():
    return Outcome(STOPPED)


def _zero_counters() -> dict:
    return {d: empty_direction(d) for d in DIRECTIONS}
