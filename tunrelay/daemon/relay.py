"""The relay's lifecycle: device + transport -> pump, supervised.

One object owns the close order: stop the loops, join them, then close
the socket(s), then the device.  Never close an fd a loop may still be
blocked on.

Supervision (``run()``, in the caller's thread):
- UDP: one socket for the relay's life; the pump runs until stopped or
  until the device vanishes.  With ``[[peer]]`` tables, one PeerTable
  holds the peers and is shared by every queue's pump (routed by allowed
  IPs); its endpoint events are drained here and logged.
- TCP client: connect (with capped exponential backoff), pump until the
  connection ends, reconnect.  The device stays up throughout.
- TCP, between connections (and before the first): no pump reads the
  device, and an AwayDrain (away.py) drops what waits there longer than
  ``[transport] away_hold_ms``, counted ``peer_away``; it is stopped before
  the next pump starts on the device.
- TCP server: accept one peer, pump until it goes, accept the next.
  Further connections while a peer is live are refused and counted.  With
  aead, connections are accepted side by side and the one whose hello
  authenticates is kept; a newly proven connection replaces the live one
  (the real peer reconnecting after its old connection died silently).
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import threading
import time

from .. import aead as _aead
from .._runner import FATAL, REPLACED, STOPPED, Outcome
from ..counters import DIRECTIONS, empty_direction
from ..errors import PumpError, TunrelayError
from . import device
from . import transport as _transport
from .away import PEER_AWAY, AwayDrain
from .config import Config
from .device import Device
from .notify import Notifier, Watchdog
from .stats import ControlServer, format_line

log = logging.getLogger("tunrelay.daemon.relay")

#: How often the supervisor looks up from waiting (stop, housekeeping).
SUPERVISE_SLICE_S = 0.2
#: The systemd watchdog's view: a supervisor that has not looked up for
#: this long while pumps run is stuck, and the relay is not healthy.
SUPERVISOR_STALE_S = 10 * SUPERVISE_SLICE_S
#: Drops that mean "look at the other end", logged when they grow, at most
#: once a minute each: the other end speaks another aead wire version, or
#: sends our own role (both ends configured alike, or our datagrams sent
#: back to us).
_NOTICE_EVERY_S = 60.0
_NOTICES = {
    "aead_version": "aead: %d datagram(s) of another aead wire version: the other end runs "
                    "an older (or newer) tunrelay; both ends need the same version",
    "reflected": "aead: %d datagram(s) carrying this relay's own role %r: both ends are "
                 "configured with the same [security] role, or our own datagrams are being "
                 "sent back to us",
    "stale_session": "aead: %d datagram(s) of a peer session older than its newest: a "
                     "recording being replayed, or the peer's clock went back",
}


def pump_class(engine: str):
    """The compiled pump for "fast", the pure-Python one for "python"."""
    if engine == "python":
        from ..pypump import PyPump
        return PyPump
    from .._fastpath import Pump
    return Pump


class Relay:
    """A configured relay: ``run()`` blocks until ``stop()``."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        #: systemd's $NOTIFY_SOCKET (READY/STATUS/STOPPING/WATCHDOG): off
        #: unless set before run() (`tunrelay run`: Notifier.from_environ()).
        self.notifier = Notifier(None)
        self.device = Device(cfg.device, log=logging.getLogger("tunrelay.daemon.device"),
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
        #: aead: the keys and peer sessions all pumps share (made in open()).
        self.keyring = None
        #: [[peer]]: the PeerTable all pumps share (made in open()), and the
        #: endpoint last logged for each of its peers (by id).
        self.peers = None
        self._peer_endpoints: dict[int, tuple | None] = {}
        self._endpoint = None
        self._noticed: dict[str, tuple[int, float]] = {}
        self._newcomer: socket.socket | None = None  # a proven connection waiting to take over
        # aead TCP server: (start, counter) of the hellos of the live and of
        # the last proven connection; a newcomer must be newer to take over.
        self._live_order: tuple[int, int] | None = None
        self._proven_order: tuple[int, int] | None = None
        #: TCP: drops what waits in the device while no peer is connected.
        self._away: AwayDrain | None = None
        #: [metrics] listen: the Prometheus endpoint (daemon/metrics.py).
        self._metrics = None
        #: reload (made on the first): and when the next stats line is due.
        self._reloader = None
        self._next_log: float | None = None
        #: While pumps run: when the supervisor last looked up (watchdog).
        self._pumping = False
        self._beat = time.monotonic()

    # ------------------------------------------------------------ control

    def stop(self) -> None:
        """Ask run() to return.  Safe from a signal handler or any thread."""
        self._stop.set()
        for pump in self.pumps:
            pump.request_stop()

    def stats(self) -> dict:
        """Counters of all pumps, summed per direction (TCP: with the
        packets dropped while no peer was connected, ``peer_away``)."""
        total = sum_counters([pump.stats() for pump in self.pumps])
        if self.cfg.transport.protocol == "tcp":
            total["egress"]["drops"][PEER_AWAY] = self._away.dropped if self._away else 0
        return total

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
            "loop": ({"duplex": self.pumps[0].duplex, "busy_poll_us": self.pumps[0].busy_poll_us}
                     if self.pumps else None),
            "io": self.pumps[0].io if self.pumps else None,
            "queues": len(self.device.fds) or self.cfg.device.queues,
            "offload": ({k: v for k, v in self.pumps[0].offloads.items()}
                        if self.pumps and hasattr(self.pumps[0], "offloads") else None),
            "state": self._state,
            "peer": peer,
            "aead": self._aead_snapshot(),
            "peer_mode": self._peer_mode(),
            "connections": self._connections if tcfg.protocol == "tcp" else None,
            "rejected": self._rejected if tcfg.is_server else None,
            "refused": (dict(self._server.counts) if self._server is not None
                        else self._client_counts()),
            "uptime": time.monotonic() - self._started,
            **self.stats(),
            **({"peers": self._peers_snapshot()} if self.peers is not None else {}),
        }

    def _peers_snapshot(self) -> dict:
        """The PeerTable's stats(), per peer name, with the endpoint as text
        ("198.18.1.2:55555", None while unknown), as JSON carries it."""
        peers = {}
        for name, info in self.peers.stats().items():
            info = dict(info)
            endpoint = info.get("endpoint")
            info["endpoint"] = _format_endpoint(endpoint) if endpoint is not None else None
            info.pop("sessions", None)  # framing session only; [[peer]] is raw/len16
            peers[name] = info
        return peers

    def _aead_snapshot(self) -> dict | None:
        if self.keyring is None:
            return None
        counts = self.keyring.counts()   # one look under the table's lock, not three
        return {"cipher": self.cfg.security.cipher, "role": self.keyring.role,
                "sessions": [p.aead_session for p in self.pumps],
                "peer_sessions": counts["sessions"], "evicted": counts["evicted"],
                "roams": counts["roams"]}

    def _peer_mode(self) -> str:
        """How the peer is chosen, for `tunrelay stats`."""
        tcfg = self.cfg.transport
        if self.cfg.peers:
            return f"{len(self.cfg.peers)} [[peer]] table(s), routed by allowed IPs"
        if tcfg.protocol == "tcp":
            return "tcp server" if tcfg.is_server else "tcp client"
        if tcfg.framing == "aead":
            return "roaming: follows the newest authenticated datagram"
        if tcfg.peer is not None:
            return "configured, fixed"
        if tcfg.learn == "never":
            return "never learned"
        return "learned once, fixed until restart"

    def _client_counts(self) -> dict | None:
        counts = getattr(self._client, "counts", None)
        return dict(counts) if counts is not None else None

    # ------------------------------------------------------------ systemd

    def status_line(self) -> str:
        """One line for systemd's STATUS= (``systemctl status``): device,
        transport and where the peer stands, e.g. ``tun0 (tun, tcp len16):
        connected to 192.0.2.7:55555``."""
        tcfg = self.cfg.transport
        head = (f"{self.device.name or self.cfg.device.name or '?'} "
                f"({self.cfg.device.mode}, {tcfg.protocol} {tcfg.framing})")
        return f"{head}: {self._peer_status()}"

    def _peer_status(self) -> str:
        state = self._state
        if state in ("stopping", "stopped"):
            return state
        if state == "connected":
            peer = self._conn_peer()
            return f"connected to {peer or 'a peer'} (connection {self._connections})"
        if self._server is not None:
            try:
                where = _transport.format_sockaddr(self._server.address)
            except OSError:
                where = str(self.cfg.transport.listen)
            return f"listening on {where}, waiting for a peer"
        if self._client is not None:
            return f"connecting to {self.cfg.transport.peer}"
        where = (_transport.format_sockaddr(self._udp[0].getsockname())
                 if self._udp else str(self.cfg.transport.listen))
        if self.peers is not None:
            return f"listening on {where}, {len(self.cfg.peers)} peers"
        if self.keyring is not None:
            endpoint = self.keyring.endpoint
            return (f"listening on {where}, peer at {_transport.format_sockaddr(endpoint)}"
                    if endpoint is not None else f"listening on {where}, no peer heard yet")
        peer = self.pumps[0].peer if self.pumps else self._peer
        return (f"listening on {where}, peer {_transport.format_sockaddr(peer)}"
                if peer is not None else f"listening on {where}, peer to be learned")

    def _conn_peer(self) -> str | None:
        """The connected TCP peer's address as text (None if unknown)."""
        if self._conn is None:
            return None
        try:
            return _transport.format_sockaddr(self._conn.getpeername())
        except OSError:
            return None

    def trouble(self) -> str | None:
        """Why the relay is not healthy now, or None: the systemd
        watchdog pings only while this is None.  Healthy means: not
        stopping, the device still there, and while pumps should run,
        every pump running and the supervisor looking up every slice.
        (Waiting for a TCP peer is healthy: the relay does its job.)"""
        if self._stop.is_set():
            return "stopping"
        if self._device_lost:
            return f"device {self.device.name} is gone"
        if self._pumping:
            ended = [i for i, pump in enumerate(self.pumps) if not pump.running]
            if ended:
                return f"the pump of queue {ended[0]} ended"
            stale = time.monotonic() - self._beat
            if stale > SUPERVISOR_STALE_S:
                return f"the supervisor has not looked at the pumps for {stale:.1f} s"
        return None

    # ------------------------------------------------------------ running

    def open(self) -> None:
        """Create the device and the listening/UDP socket(s); start the
        control socket.  Separate from run() so a caller can drop
        privileges in between."""
        try:
            self.device.open()
            tcfg = self.cfg.transport
            if tcfg.framing == "aead":
                from .._fastpath import Keyring
                self.keyring = Keyring(self.cfg.security.key, self.cfg.security.cipher,
                                       self.cfg.security.role)
            if tcfg.protocol == "udp":
                self._udp, self._peer = _transport.open_udp_queues(tcfg, len(self.device.fds))
                where = _transport.format_sockaddr(self._udp[0].getsockname())
                queues = f" ({len(self._udp)} sockets, steered by CPU)" if len(self._udp) > 1 else ""
                if self.cfg.peers:
                    self.peers = self._peer_table(self._udp[0])
                    log.info("udp: listening on %s%s, %d peers: %s", where, queues,
                             len(self.cfg.peers), self._describe_peers())
                    if len(self.cfg.peers) > 1:
                        _warn_if_not_forwarding(self.cfg.peers)
                elif self._peer is None:
                    log.info("udp: listening on %s%s, peer to be learned from the first valid datagram",
                             where, queues)
                else:
                    log.info("udp: listening on %s%s, peer %s", where, queues,
                             _transport.format_sockaddr(self._peer))
            elif tcfg.is_server:
                self._server = _transport.TcpServer(
                    tcfg, log=logging.getLogger("tunrelay.daemon.transport"))
                self._server.open()
            else:
                self._client = _transport.TcpClient(
                    tcfg, log=logging.getLogger("tunrelay.daemon.transport"))
            if tcfg.protocol == "tcp":
                self._away = AwayDrain(self.device.fds, tcfg.away_hold_ms / 1000,
                                       vnet_hdr=self.device.vnet_hdr,
                                       log=logging.getLogger("tunrelay.daemon.away"))
            self._control = ControlServer(self.cfg.control_socket, self.snapshot,
                                          requests={"reload": self.reload})
            self._control.open()
            self._metrics = open_metrics(self.cfg.metrics, self.snapshot)
        except BaseException:
            self.close()
            raise

    def _peer_table(self, sock: socket.socket):
        """The [[peer]] tables as one PeerTable; each endpoint resolved now,
        in the form the socket reports senders (IPv4 on a dual-stack socket:
        ::ffff:a.b.c.d), so the pumps recognise the peer's datagrams."""
        from .._fastpath import PeerTable
        table = PeerTable()
        with table.batch():
            for peer in self.cfg.peers:
                endpoint = None
                if peer.endpoint is not None:
                    endpoint = _transport.resolve_for_socket(peer.endpoint, sock,
                                                             f"peer {peer.name!r} endpoint")
                table.add(peer.name, endpoint=endpoint, roaming=peer.roaming,
                          allowed_ips=[str(network) for network in peer.allowed_ips])
        self._peer_endpoints = {pid: table.info(pid)["endpoint"] for pid in table.ids()}
        return table

    # ------------------------------------------------------------ reload

    def reload(self) -> dict:
        """Re-read the config file and apply what can change live, or
        nothing (daemon/reload.py); the outcome as ``tunrelay reload``
        reports it.  Safe from any thread but a signal handler."""
        from .reload import Reloader
        if self._reloader is None:
            self._reloader = Reloader(self)
        return self._reloader.reload().to_dict()

    def resolve_endpoint(self, peer) -> tuple | None:
        """A [[peer]]'s endpoint as the table holds it (see _peer_table)."""
        if peer.endpoint is None:
            return None
        return _transport.resolve_for_socket(peer.endpoint, self._udp[0],
                                             f"peer {peer.name!r} endpoint")

    def reloaded(self) -> None:
        """After a reload applied: the peers' endpoints as logged (new
        peers' too), and the stats interval restarts from now."""
        if self.peers is not None:
            self._peer_endpoints = {pid: self.peers.info(pid)["endpoint"]
                                    for pid in self.peers.ids()}
        self._next_log = None

    def _describe_peers(self) -> str:
        parts = []
        for pid in self.peers.ids():
            info = self.peers.info(pid)
            where = (_format_endpoint(info["endpoint"]) if info["endpoint"] is not None
                     else "endpoint to be learned")
            parts.append(f"{info['name']} at {where}{' (roaming)' if info['roaming'] else ''} "
                         f"for {', '.join(info['allowed_ips'])}")
        return "; ".join(parts)

    def run(self) -> None:
        """Pump until stop(); raises PumpError when the device is gone."""
        if not self.device.fds:
            self.open()
        self.notifier.ready(self.status_line())
        watchdog = Watchdog(self.notifier, self.trouble)
        watchdog.start()
        watcher = None
        if not self._udp:
            # TCP: while connecting or listening no pump reads the device,
            # so nothing else would notice it being deleted.
            watcher = threading.Thread(target=self._watch_device, name="device-watch",
                                       daemon=True)
            watcher.start()
        try:
            while not self._stop.is_set():
                if self._away is not None:
                    self._away.start()  # no pump reads the device until the next connection
                socks = self._next_sockets()
                if socks is None:
                    break
                outcome = self._pump_until_end(socks)
                self._pumping = False
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
            watchdog.stop()  # no ping after STOPPING=1
            self.notifier.stopping(self.status_line())
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
            self.notifier.status(self.status_line())
            return self._udp
        if self._server is not None and self._newcomer is not None:
            self._conn, self._newcomer = self._newcomer, None
            self._live_order = self._proven_order
        elif self._server is not None:
            self._state = "listening"
            self.notifier.status(self.status_line())
            self._conn = self._server.accept(self._stop, **self._proof())
            self._live_order = self._proven_order
        else:
            self._state = "connecting"
            self.notifier.status(self.status_line())
            self._conn = self._client.connect(self._stop, **self._hello())
        if self._conn is None:
            return None
        self._connections += 1
        self._state = "connected"
        self.notifier.status(self.status_line())
        return [self._conn]

    def _proof(self) -> dict:
        """TCP server with aead: how a connection proves itself (its first
        record is a hello that authenticates) and the hello it gets back."""
        if self.keyring is None:
            return {}
        return {"verify": self._verify_record, "reply": self._hello_record}

    def _hello(self) -> dict:
        """TCP client with aead: the hello it sends, and how the server's is checked."""
        if self.keyring is None:
            return {}
        return {"hello": self._hello_record, "verify": self._verify_record}

    def _hello_record(self) -> bytes:
        hello = self.keyring.hello()
        return len(hello).to_bytes(2, "big") + hello

    def _verify_record(self, record: bytes) -> bool:
        """A TCP hello record that authenticates, is no replay and, while a
        connection is live, is newer than the live one's: a hello recorded
        earlier (one can verify once after a restart of ours, when our
        replay window is new) cannot take the slot from the real peer."""
        if not (len(record) == _aead.HELLO_RECORD_LEN
                and int.from_bytes(record[:2], "big") == _aead.OVERHEAD
                and self.keyring.verify_hello(record[2:])):
            return False
        order = _hello_order(record[2:])
        if self._conn is not None and self._live_order is not None and order <= self._live_order:
            log.warning("tcp: a hello older than the live connection's was refused "
                        "(a recording, replayed)")
            return False
        self._proven_order = order
        return True

    def _make_pumps(self, socks: list[socket.socket]) -> None:
        options: dict = {"offload": True} if self.device.vnet_hdr else {}
        options["io"] = self.cfg.relay.io
        if self.cfg.relay.offload is False and self.cfg.relay.engine == "fast":
            options["gso"] = False  # offload = false: no UDP GSO either
        if self.cfg.relay.engine == "fast":
            options.update(duplex=self.cfg.relay.duplex_for(),
                           busy_poll_us=self.cfg.relay.busy_poll_for())
        if self.keyring is not None:
            options.update(key=self.keyring)
        if self.peers is not None:
            options.update(peers=self.peers)  # endpoints are the table's: no peer=
        else:
            options.update(peer=self._peer if self._udp else None)
        for fd, sock in zip(self.device.fds, socks):
            self.pumps.append(self._pump_class(
                fd, sock, framing=self.cfg.transport.framing,
                mode=self.cfg.device.mode, mtu=self.cfg.device.mtu,
                batch=self.cfg.relay.batch, mss_clamp=self.cfg.relay.mss_clamp, **options))
        fallback = getattr(self.pumps[0], "io_fallback", None)
        log.info("io: %s%s", self.pumps[0].io,
                 f' (io "auto": io_uring cannot be set up here: {fallback})' if fallback else
                 " (a receive batch's TUN writes in one io_uring_enter)"
                 if self.pumps[0].io == "uring" else "")
        if self.keyring is not None:
            log.info("aead: %s, role %s, session %s", self.cfg.security.cipher, self.keyring.role,
                     ", ".join(p.aead_session for p in self.pumps))
        v4, v6 = self.pumps[0].mss_clamp
        if v4 or v6:
            log.info("mss clamp: TCP SYNs announce at most %s over IPv4, %s over IPv6",
                     v4 or "(any)", v6 or "(any)")
        if self.device.vnet_hdr:
            log.info("offloads: tun %s, udp %s", _tun_offloads(self.device.offload_flags),
                     ", ".join(k for k, v in self.pumps[0].offloads.items()
                               if v and k != "vnet_hdr") or "none")

    def _pump_until_end(self, socks: list[socket.socket]):
        self._end_away()
        if not self.pumps:
            self._make_pumps(socks)
        else:
            self.pumps[0].attach(socks[0])  # TCP: the new connection
        if self._stop.is_set():
            return _stopped()
        for pump in self.pumps:
            pump.start()
        self._beat, self._pumping = time.monotonic(), True  # until run() has the outcome
        self._next_log = None
        while True:
            self._beat = time.monotonic()
            outcome = self.pumps[0].wait(SUPERVISE_SLICE_S)
            if outcome is None:
                outcome = next((o for o in (p.wait(0) for p in self.pumps[1:]) if o), None)
            if outcome is not None or self._stop.is_set():
                # One pump ended (or stop): end them all, report the first
                # that ended on its own.
                ended = [pump.stop() for pump in self.pumps]
                return next((o for o in [outcome, *ended] if o and o.reason != STOPPED), ended[0])
            if self._away is not None:
                self._away.note(self.pumps[0].stats()["egress"]["tun_io"])
            if self._housekeeping():
                for pump in self.pumps:
                    pump.stop()
                return Outcome(REPLACED, message="a newly proven connection replaces it")
            self._log_stats()

    def _log_stats(self) -> None:
        """Every [stats] interval (read each time: a reload may change it)."""
        interval, now = self.cfg.stats.interval, time.monotonic()
        if not interval:
            self._next_log = None  # a reload may turn it on again: from then on
            return
        if self._next_log is None:
            self._next_log = now + interval
        elif now >= self._next_log:
            log.info("stats: %s", format_line(self.stats()))
            self._next_log = max(self._next_log + interval, now)

    def _end_away(self) -> None:
        """A peer is connected: stop dropping what waits in the device (the
        pump reads it from now on) and say what the gap dropped."""
        if self._away is None or not self._away.running:
            return
        dropped = self._away.stop()
        if dropped:
            log.info("tcp: %d packet(s) dropped while no peer was connected (waited longer "
                     "than away_hold_ms = %d; counted peer_away)", dropped,
                     self.cfg.transport.away_hold_ms)

    def _housekeeping(self) -> bool:
        """Between waits: refuse or prove TCP newcomers, log what changed.
        True when a newly proven TCP connection should replace the live one."""
        if self._server is not None:
            newcomer = self._server.poll(**self._proof())
            self._rejected = self._server.counts.get("refused_busy", 0)
            if newcomer is not None:
                self._newcomer = newcomer
                return True
        if self._udp and self._learned is None and self.pumps[0].learns_peer:
            peer = self.pumps[0].peer
            if peer is not None:
                self._learned = peer
                log.info("udp: learned peer %s", _transport.format_sockaddr(peer))
                self.notifier.status(self.status_line())
        if self.keyring is not None and self._udp:
            endpoint = self.keyring.endpoint
            if endpoint != self._endpoint:
                if self._endpoint is None:
                    log.info("aead: peer at %s", _transport.format_sockaddr(endpoint))
                else:
                    log.info("aead: peer moved from %s to %s (roaming)",
                             _transport.format_sockaddr(self._endpoint),
                             _transport.format_sockaddr(endpoint))
                self._endpoint = endpoint
                self.notifier.status(self.status_line())
        if self.keyring is not None:
            self._notice_drops()
        if self.peers is not None:
            self._log_peer_events()
        return False

    def _log_peer_events(self) -> None:
        """Drain the PeerTable's events (its eventfd would stay readable
        otherwise) and log each endpoint a peer was found at or moved to."""
        for event in self.peers.take():
            if event.kind != "endpoint" or event.peer is None:
                continue
            try:
                info = self.peers.info(event.peer)
            except (KeyError, ValueError):
                continue
            before = self._peer_endpoints.get(event.peer)
            now = info["endpoint"]
            if now == before:
                continue
            self._peer_endpoints[event.peer] = now
            if before is None:
                log.info("peer %s: at %s (learned)", info["name"], _format_endpoint(now))
            else:
                log.info("peer %s: moved from %s to %s (roaming)", info["name"],
                         _format_endpoint(before), _format_endpoint(now))

    def _notice_drops(self) -> None:
        """Log the drops that point at a misconfigured or older other end
        (at most once a minute each, with how many since the last line)."""
        drops = self.stats()["ingress"]["drops"]
        now = time.monotonic()
        for reason, message in _NOTICES.items():
            count = drops.get(reason, 0)
            logged, when = self._noticed.get(reason, (0, -_NOTICE_EVERY_S))
            if count > logged and now - when >= _NOTICE_EVERY_S:
                args = (count - logged, self.keyring.role) if reason == "reflected" else (count - logged,)
                log.warning(message, *args)
                self._noticed[reason] = (count, now)

    def _drop_connection(self, outcome) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        if outcome.reason == REPLACED:
            log.info("tcp: a newly proven connection replaces the live one")
            return
        log.warning("tcp: connection lost (%s)%s", outcome,
                    "; reconnecting" if self._client is not None else "; waiting for the peer")

    def close(self) -> None:
        """Stop and join the loops, then close sockets, then the device."""
        if self._away is not None:
            self._away.close()  # joined before the device's fds close; its count stays
        for pump in self.pumps:
            if pump.running:
                pump.stop()
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._control is not None:
            self._control.close()
            self._control = None
        for sock in [self._conn, self._newcomer, *self._udp]:
            if sock is not None:
                sock.close()
        self._conn, self._newcomer, self._udp = None, None, []
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

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_metrics(cfg, snapshot):
    """The Prometheus endpoint of ``[metrics]`` serving ``snapshot()``,
    open (bound, serving), or None when ``listen`` is not set.  A
    ``TunrelayError`` naming the address when it cannot bind."""
    if cfg.listen is None:
        return None
    try:
        from .metrics import MetricsServer
    except ImportError as exc:
        raise TunrelayError(f"metrics: [metrics] listen = \"{cfg.listen}\" needs the "
                            f"prometheus_client package ({exc}); pip install "
                            "prometheus_client") from exc
    server = MetricsServer(cfg.listen, snapshot)
    server.open()
    return server


def _format_endpoint(sockaddr: tuple) -> str:
    """A peer's endpoint for people: an IPv4 address seen through a
    dual-stack socket (::ffff:a.b.c.d) shown as plain IPv4."""
    host = sockaddr[0]
    if host.startswith("::ffff:") and "." in host:
        return _transport.format_sockaddr((host[7:], sockaddr[1]))
    return _transport.format_sockaddr(sockaddr)


#: Where the kernel says whether it forwards, per family, in this namespace.
_FORWARDING = {4: "/proc/sys/net/ipv4/ip_forward", 6: "/proc/sys/net/ipv6/conf/all/forwarding"}
_FORWARDING_SYSCTL = {4: "net.ipv4.ip_forward", 6: "net.ipv6.conf.all.forwarding"}


def _warn_if_not_forwarding(peers) -> None:
    """A hub's spokes reach each other through the kernel (device -> routing
    -> device): with forwarding off it drops their packets.  Warn for each
    family some peer's allowed IPs use."""
    families = {network.version for peer in peers for network in peer.allowed_ips}
    for version in sorted(families):
        path = _FORWARDING[version]
        try:
            with open(path) as f:
                on = f.read().strip() != "0"
        except OSError:
            continue  # IPv6 disabled: nothing to forward
        if not on:
            key = _FORWARDING_SYSCTL[version]
            log.warning("hub: IPv%d forwarding is off in this network namespace (%s = 0): "
                        "%d peers reach each other only through the kernel, which drops their "
                        "packets; turn it on (sysctl -w %s=1) if they should", version, key,
                        len(peers), key)


def _hello_order(hello: bytes) -> tuple[int, int]:
    """How new a hello is: its session's start time, then its counter."""
    return int.from_bytes(hello[4:8], "big"), int.from_bytes(hello[16:24], "big")


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
