"""Prometheus metrics: the relay's counters over HTTP (``[metrics] listen``).

Each scrape takes a fresh snapshot, the very dictionary ``tunrelay stats
--json`` prints (``Relay.snapshot()``, or a WireGuard run's), and turns it
into metric families (``SnapshotCollector``).  Nothing is mirrored into
``Counter`` objects: a scrape always agrees with the snapshot, nothing is
counted twice, and a counter the pumps add needs no code here as long as it
lands in one of the snapshot's dictionaries (drops by reason, errors by
kind).

The exposition text is prometheus_client's; the HTTP server is its WSGI app
on a threaded ``wsgiref`` server, bound when the relay opens its sockets
(before privileges are dropped, so a port below 1024 works) and closed with
them: ``close()`` returns once the server thread and every request thread
have ended and the port is free.
"""

from __future__ import annotations

import errno
import logging
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import make_wsgi_app
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from .. import __version__
from ..errors import TunrelayError

log = logging.getLogger("tunrelay.daemon.metrics")

__all__ = ["MetricsServer", "SnapshotCollector", "families", "STATES", "UP_STATES"]

#: The states a relay reports (snapshot "state"), each a tunrelay_state
#: sample: 1 for the current one, 0 for the others.
STATES = ("starting", "running", "listening", "connecting", "connected", "stopping", "stopped")
#: The states in which packets can pass: tunrelay_up is 1 in them.
UP_STATES = ("running", "connected")
#: The pump counters that are plain totals, per direction, and their help.
_TOTALS = {
    "packets": "Packets moved, as on the wire (after segmentation, before coalescing)",
    "bytes": "Bytes of the packets moved (inner packets, without framing)",
    "batches": "Batches of packets moved (one wake-up's work)",
    "syscalls": "System calls made to move packets",
    "wakeups": "Times a loop slept and woke up to move packets (busy polling catches some without)",
    "tun_io": "Reads and writes on the TUN/TAP device (with offloads one moves many packets)",
    "mss_clamped": "TCP SYN and SYN-ACK packets whose MSS option was lowered ([relay] mss_clamp)",
}
#: A WireGuard device's handshake messages: counter name -> (type, direction).
_WG_MESSAGES = {
    "initiations_sent": ("initiation", "egress"), "initiations_received": ("initiation", "ingress"),
    "responses_sent": ("response", "egress"), "responses_received": ("response", "ingress"),
    "cookies_sent": ("cookie", "egress"), "cookies_received": ("cookie", "ingress"),
}
#: A WireGuard device's other counters: (section, key) -> (metric, help).
_WG_COUNTERS = {
    ("handshakes", "completed"): ("tunrelay_wireguard_handshakes_total",
                                  "Handshakes completed (sessions made), both roles"),
    ("handshakes", "retransmits"): ("tunrelay_wireguard_handshake_retransmits_total",
                                    "Handshake initiations sent again after REKEY_TIMEOUT"),
    ("handshakes", "given_up"): ("tunrelay_wireguard_handshakes_given_up_total",
                                 "Handshakes abandoned after REKEY_ATTEMPT_TIME"),
    ("handshakes", "yielded"): ("tunrelay_wireguard_handshakes_yielded_total",
                                "Own handshakes dropped for the peer's crossing initiation"),
    ("handshakes", "under_load_batches"): ("tunrelay_wireguard_under_load_batches_total",
                                           "Batches of handshake messages handled under load"),
    ("timers", "keepalives_sent"): ("tunrelay_wireguard_keepalives_sent_total",
                                    "Keepalives sent (passive and persistent)"),
    ("timers", "sessions_expired"): ("tunrelay_wireguard_sessions_expired_total",
                                     "Sessions ended by their age or message limits"),
    ("timers", "keys_zeroed"): ("tunrelay_wireguard_keys_zeroed_total",
                                "Times a peer's keys were zeroed after 3 x REJECT_AFTER_TIME"),
    ("timers", "rekeys_ignored"): ("tunrelay_wireguard_rekeys_ignored_total",
                                   "Rekey requests ignored (a handshake already running)"),
    ("", "send_errors"): ("tunrelay_wireguard_send_errors_total",
                          "Handshake or keepalive datagrams the socket refused"),
}
#: The WireGuard peer table's counters: the data plane's (the loops') control
#: queue, staged packets and handshake gate, as tunrelay_wireguard_dataplane_*
#: (the device's own staged_* are the control plane's); the table's other
#: numbers are gauges or bookkeeping.
_WG_TABLE = {
    "control_queued": "Control datagrams (handshakes, cookies) queued for the control plane",
    "control_dropped": "Control datagrams dropped: the control queue was full",
    "staged_queued": "Packets held in the data plane for a peer without a session",
    "staged_dropped": "Packets the data plane could not hold for a peer without a session",
    "gate_bad_mac1": "Handshake messages the loops dropped under load: mac1 wrong",
    "gate_mac2_ok": "Handshake messages the loops let through under load: a valid cookie (mac2)",
    "gate_shed": "Handshake messages the loops dropped under load: no room without a cookie",
    "gate_source_capped": "Handshake messages the loops dropped under load: over their "
                          "source address's share",
}


class _Builder:
    """Metric families made on first use, each labelled by ``device``
    first; samples added in snapshot order.  The arguments are
    positional-only: any name (``kind``...) can be a label."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.families: dict[str, Metric] = {}

    def add(self, kind: str, name: str, help_text: str, value: float, /,
            **labels: str) -> None:
        family = self.families.get(name)
        if family is None:
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = cls(name, help_text, labels=["device", *labels])
            self.families[name] = family
        family.add_metric([self.device, *labels.values()], float(value))

    def counter(self, name: str, help_text: str, value: float, /, **labels: str) -> None:
        self.add("counter", name, help_text, value, **labels)

    def gauge(self, name: str, help_text: str, value: float, /, **labels: str) -> None:
        self.add("gauge", name, help_text, value, **labels)

    def info(self, name: str, help_text: str, /, **labels: str) -> None:
        """An info metric: ``NAME_info{labels} 1`` (an info family in
        OpenMetrics, a gauge in the classic text format)."""
        family = InfoMetricFamily(name, help_text, labels=["device"])
        family.add_metric([self.device], labels)
        self.families[name + "_info"] = family


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def families(snapshot: dict) -> list[Metric]:
    """The metric families of one snapshot (``tunrelay stats --json``'s
    dictionary, of a relay or a WireGuard run).  What a snapshot lacks (no
    TCP, no aead, no peers) has no families; every counter it has is in
    one."""
    b = _Builder(str(snapshot.get("device") or ""))
    _header(b, snapshot)
    _directions(b, snapshot)
    _tcp(b, snapshot)
    _aead(b, snapshot.get("aead"))
    _relay_peers(b, snapshot.get("peers"))
    _wireguard(b, snapshot)
    return list(b.families.values())


def _header(b: _Builder, snap: dict) -> None:
    b.info("tunrelay", "The relay's version and set-up, in labels",
           version=__version__, mode=str(snap.get("mode", "")),
           transport=str(snap.get("transport", "")), framing=str(snap.get("framing", "")),
           engine=str(snap.get("engine", "")))
    state = str(snap.get("state", ""))
    for known in (*STATES, *([state] if state not in STATES else [])):
        b.gauge("tunrelay_state", "The relay's state: 1 for the current one", known == state,
                state=known)
    b.gauge("tunrelay_up", "1 while packets can pass (running; TCP: connected), else 0",
            state in UP_STATES)
    if snap.get("connections") is not None:  # TCP
        b.gauge("tunrelay_connected", "TCP: 1 while a peer is connected, else 0",
                state == "connected")
    if _is_number(snap.get("uptime")):
        b.gauge("tunrelay_uptime_seconds", "Seconds since the relay started", snap["uptime"])
    if _is_number(snap.get("queues")):
        b.gauge("tunrelay_queues", "Queues of the device (one pump each)", snap["queues"])
    b.gauge("tunrelay_peers", "Peers: [[peer]] tables or WireGuard peers; a point-to-point "
            "relay 1 while its peer is known (configured, learned or connected), else 0",
            _peer_count(snap))


def _peer_count(snap: dict) -> int:
    if snap.get("wg_peers") is not None:
        return len(snap["wg_peers"])
    if snap.get("peers") is not None:
        return len(snap["peers"])
    return 1 if snap.get("peer") else 0


def _directions(b: _Builder, snap: dict) -> None:
    """The pumps' counters (all queues summed), per direction."""
    for direction in ("egress", "ingress"):
        counters = snap.get(direction)
        if not isinstance(counters, dict):
            continue
        for total, help_text in _TOTALS.items():
            if total in counters:
                b.counter(f"tunrelay_{total}_total", help_text, counters[total],
                          direction=direction)
        for reason, count in counters.get("drops", {}).items():
            b.counter("tunrelay_drops_total", "Packets dropped, by reason (README: what is "
                      "checked on the way in)", count, direction=direction, reason=reason)
        for kind, count in counters.get("errors", {}).items():
            b.counter("tunrelay_errors_total", "Errors not tied to one packet, by kind",
                      count, direction=direction, kind=kind)


def _tcp(b: _Builder, snap: dict) -> None:
    if snap.get("connections") is not None:
        b.counter("tunrelay_connections_total", "TCP: connections made (client) or accepted "
                  "and kept (server)", snap["connections"])
    for reason, count in (snap.get("refused") or {}).items():
        b.counter("tunrelay_connections_refused_total", "TCP: connections refused or failed, "
                  "by reason (refused_busy, refused_not_allowed, unproven, accept_errors)",
                  count, reason=reason)


def _aead(b: _Builder, aead: dict | None) -> None:
    if not aead:
        return
    b.counter("tunrelay_aead_peer_sessions_total", "aead: peer sessions accepted",
              aead["peer_sessions"])
    b.counter("tunrelay_aead_sessions_evicted_total", "aead: peer sessions ended by a newer "
              "one or pushed out of the table", aead["evicted"])
    b.counter("tunrelay_aead_roams_total", "aead: moves of the peer's endpoint", aead["roams"])


def _relay_peers(b: _Builder, peers: dict | None) -> None:
    """[[peer]] tables: each peer's counters, labelled by its name."""
    for name, info in (peers or {}).items():
        _peer_counters(b, info, peer=name)
        if _is_number(info.get("roams")):
            b.counter("tunrelay_peer_roams_total", "Moves of the peer's endpoint (roaming)",
                      info["roams"], peer=name)
        if _is_number(info.get("last_seen")):
            b.gauge("tunrelay_peer_last_seen_timestamp_seconds", "When the peer was last "
                    "heard from (Unix time); absent until it is", info["last_seen"], peer=name)


def _peer_counters(b: _Builder, info: dict, **labels: str) -> None:
    """A peer table's per-direction counters of one peer (inner packets)."""
    for direction in ("egress", "ingress"):
        counters = info.get(direction)
        if not isinstance(counters, dict):
            continue
        for key, metric, help_text in (
                ("packets", "tunrelay_peer_packets_total", "Packets sent to (egress) and "
                 "received from (ingress) the peer"),
                ("bytes", "tunrelay_peer_bytes_total", "Bytes of the packets sent to (egress) "
                 "and received from (ingress) the peer (inner packets)"),
                ("drops", "tunrelay_peer_drops_total", "Packets of the peer dropped"),
                ("keepalives", "tunrelay_peer_keepalives_total", "Keepalives sent to (egress) "
                 "and received from (ingress) the peer")):
            if _is_number(counters.get(key)):
                b.counter(metric, help_text, counters[key], **labels, direction=direction)


def _wireguard(b: _Builder, snap: dict) -> None:
    """A WireGuard run: each peer (as `wg show`), the device's counters."""
    for row in snap.get("wg_peers") or ():
        labels = {"peer": str(row["name"]), "public_key": str(row["public_key"])}
        _peer_counters(b, row, **labels)
        b.counter("tunrelay_wireguard_peer_bytes_total", "Bytes on the wire to (egress) and "
                  "from (ingress) the peer, handshakes included (`wg show` transfer)",
                  row["tx_bytes"], **labels, direction="egress")
        b.counter("tunrelay_wireguard_peer_bytes_total", "", row["rx_bytes"], **labels,
                  direction="ingress")
        if _is_number(row.get("latest_handshake")):
            b.gauge("tunrelay_wireguard_peer_last_handshake_timestamp_seconds", "When the "
                    "latest handshake with the peer completed (Unix time); absent before the "
                    "first", row["latest_handshake"], **labels)
    counters = (snap.get("wireguard") or {}).get("counters")
    if not counters:
        return
    handshakes = counters.get("handshakes", {})
    for key, (kind, direction) in _WG_MESSAGES.items():
        if key in handshakes:
            b.counter("tunrelay_wireguard_handshake_messages_total", "Handshake messages sent "
                      "(egress) and received (ingress), by type", handshakes[key], type=kind,
                      direction=direction)
    for (section, key), (metric, help_text) in _WG_COUNTERS.items():
        value = (counters if not section else counters.get(section, {})).get(key)
        if _is_number(value):
            b.counter(metric, help_text, value)
    for reason, count in counters.get("refused", {}).items():
        b.counter("tunrelay_wireguard_handshakes_refused_total", "Handshake messages refused, "
                  "by reason", count, reason=reason)
    for key, count in counters.get("staged", {}).items():
        what = key.removeprefix("staged_")
        if what.startswith("dropped_"):
            b.counter("tunrelay_wireguard_staged_drops_total", "Packets held for a peer "
                      "without a session and then dropped, by reason", count,
                      reason=what.removeprefix("dropped_"))
        else:
            b.counter(f"tunrelay_wireguard_staged_{what}_total", f"Packets held for a peer "
                      f"without a session: {what}", count)
    table = counters.get("table", {})
    for key, help_text in _WG_TABLE.items():
        if _is_number(table.get(key)):
            b.counter(f"tunrelay_wireguard_dataplane_{key}_total", help_text, table[key])
    if "under_load" in counters:
        b.gauge("tunrelay_wireguard_under_load", "1 while handshakes are under load (cookies "
                "and rate limits on)", bool(counters["under_load"]))


class SnapshotCollector(Collector):
    """A prometheus_client collector: ``families()`` of a fresh
    ``snapshot()`` on each scrape.  No ``describe()``: registering it
    takes no snapshot."""

    def __init__(self, snapshot: Callable[[], dict]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        return families(self._snapshot())


def make_registry(snapshot: Callable[[], dict]) -> CollectorRegistry:
    """The relay's own registry (not prometheus_client's global one): the
    snapshot's families and the process's (CPU, memory, fds, start time)."""
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(snapshot))
    ProcessCollector(registry=registry)
    return registry


# --------------------------------------------------------------------------
# The HTTP server
# --------------------------------------------------------------------------

#: A client that sends nothing cannot hold a request thread (and so a
#: relay's stop) longer than this.
REQUEST_TIMEOUT_S = 5.0


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        log.debug("metrics: %s %s", self.address_string(), format % args)


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    # Request threads are joined by server_close(): a stop leaves no thread.
    daemon_threads = False
    block_on_close = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away or timed out: no traceback on stderr.
        log.debug("metrics: a request from %s failed", client_address, exc_info=True)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the address up in DNS (getfqdn) for
        # the WSGI environ's SERVER_NAME: a relay must not wait on DNS to
        # start.  The address itself does as well.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()


class MetricsServer:
    """Serves the metrics of ``snapshot()`` on ``endpoint`` (an Endpoint
    of an IP literal, from ``[metrics] listen``).  ``open()`` binds (a
    ``TunrelayError`` naming the address if it cannot) and starts the
    serving thread; ``close()`` stops and joins it and frees the port."""

    def __init__(self, endpoint: Any, snapshot: Callable[[], dict]) -> None:
        self.endpoint = endpoint
        self._registry = make_registry(snapshot)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple | None:
        """The bound address (host, port, ...), while open."""
        return self._server.server_address if self._server is not None else None

    def open(self) -> None:
        family = socket.AF_INET6 if ":" in self.endpoint.host else socket.AF_INET

        class Server(_Server):
            address_family = family

        try:
            server = Server((self.endpoint.host, self.endpoint.port), _Handler)
        except OSError as exc:
            raise TunrelayError(f"metrics: cannot listen on {self.endpoint}: "
                                f"{exc.strerror or exc}{_hint(exc)}") from exc
        server.set_app(self._app(make_wsgi_app(self._registry)))
        self._server = server
        # A daemon thread, so that a path that never reaches close() cannot
        # keep the process alive; close() joins it all the same.
        self._thread = threading.Thread(target=server.serve_forever, name="metrics",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()
        log.info("metrics: serving http://%s/metrics", self.endpoint)

    @staticmethod
    def _app(inner: Callable) -> Callable:
        """The WSGI app, failing a scrape whose snapshot raised with one log
        line and a 500 (never a traceback on stderr, never a partial page)."""

        def app(environ: dict, start_response: Callable) -> Iterator[bytes] | list[bytes]:
            try:
                return inner(environ, start_response)
            except Exception:
                log.exception("metrics: a scrape failed")
                start_response("500 Internal Server Error",
                               [("Content-Type", "text/plain; charset=utf-8")])
                return [b"tunrelay: the counters could not be read; see the relay's log\n"]

        return app

    def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()  # serve_forever returns
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        server.server_close()  # the socket, and the request threads joined


def _hint(exc: OSError) -> str:
    return {
        errno.EADDRINUSE: " (another process listens there: choose another port)",
        errno.EADDRNOTAVAIL: " (no interface of this host has that address)",
        errno.EACCES: " (a port below 1024 needs root or CAP_NET_BIND_SERVICE)",
    }.get(exc.errno or 0, "")
