"""``tunrelay run`` for a WireGuard device, from either file.

``tunrelay run --wg-config wg0.conf`` (a wg-quick file) and ``tunrelay run
--config relay.toml`` with ``framing = "wireguard"`` both end up here, as a
``Settings``: the device's ``WgConfig`` and the TUN device around it.

The order is the relay's (daemon/relay.py): create and configure the TUN
device (daemon/device.py), build and start the ``WireGuardDevice`` (its UDP
socket bound), open the control socket ``tunrelay stats`` reads, then drop
privileges.  Then the event loop runs the device until SIGTERM/SIGINT (a
clean stop: exit 0) or until the TUN device disappears (a ``PumpError``:
exit 1).  The close order is the reverse: the device's pumps stop and join
before the TUN fds close.

The control socket's thread never touches the device: it asks the event
loop for a snapshot and waits for it.  Handshakes and endpoint moves are
logged at INFO from a once-a-second look at each peer.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import signal
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..daemon.config import Config, DeviceConfig, MetricsConfig
from ..daemon.notify import Notifier, Watchdog
from ..errors import ConfigError, PumpError, TransportError
from .config import DEFAULT_MTU, WgConfig, from_relay_config, quick_routes, read_wg_quick

if TYPE_CHECKING:
    from ..daemon.device import Device
    from ..daemon.stats import ControlServer
    from .device import WireGuardDevice
    from .timers import Timers

__all__ = ["Settings", "from_relay_config_settings", "from_wg_quick", "run", "interface_name",
           "short_key", "WgRunner"]

log = logging.getLogger("tunrelay.wireguard.run")

#: How often the peers are looked at for new handshakes and endpoints, and
#: how many at most each time: a hub of 10,000 peers is looked at in turns
#: (each peer every 20 s) rather than costing the event loop a scan of all
#: of them every second.
WATCH_INTERVAL_S = 1.0
WATCH_PEERS_PER_TICK = 512
#: How long the control socket waits for the event loop's snapshot.
SNAPSHOT_TIMEOUT_S = 2.0
#: How long the control socket's thread waits for a reload on the loop.
RELOAD_TIMEOUT_S = 25.0
# wg-quick's rule for an interface name taken from a file name.
_IFNAME = re.compile(r"[a-zA-Z0-9_=+.-]{1,15}\Z")


@dataclass(frozen=True)
class Settings:
    """Everything a WireGuard run needs.  ``source`` is the file, for
    messages; ``bind`` the local address of the UDP socket ("::": every
    address, both families)."""

    source: str
    wg: WgConfig
    device: DeviceConfig
    control_socket: str
    bind: str = "::"
    stats_interval: float = 0.0
    offload: str | bool = "auto"
    duplex: bool = False
    busy_poll_us: int = 0
    mss_clamp: str | int | bool = "auto"
    user: int | None = None
    group: int | None = None
    kind: str = field(default="toml")   # "toml" or "wg-quick", for messages
    log_level: str = "info"             # [stats] log_level (a reload applies it)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # [metrics]: off by default


def short_key(public_key: bytes) -> str:
    """A public key as a peer's label where it has no name: the start of
    its base64, which is what people recognise from `wg show`."""
    return base64.b64encode(public_key).decode()[:10] + "..."


def interface_name(path: str) -> str:
    """The interface name wg-quick takes from a file name (``wg0.conf`` ->
    ``wg0``); a ``ConfigError`` when the name does not make one."""
    base = os.path.basename(path)
    name = base[:-5] if base.endswith(".conf") else base
    if not _IFNAME.match(name):
        raise ConfigError(path, None, (
            f"expected a file name that makes an interface name, like wg0.conf (at most 15 "
            f"characters of letters, digits and _=+.-), got {base!r}: pass --name"))
    return name


def from_relay_config_settings(cfg: Config, *, resolve: bool = True) -> Settings:
    """A TOML file with ``framing = "wireguard"``, already loaded; with
    ``resolve`` False (``tunrelay check``) hostnames are left as they are."""
    listen = cfg.transport.listen
    assert listen is not None and cfg.wireguard is not None
    wg = from_relay_config(cfg) if resolve else from_relay_config(cfg, resolve=_as_is)
    return Settings(
        source=cfg.path, wg=wg, device=cfg.device,
        control_socket=cfg.control_socket, bind=listen.host,
        stats_interval=cfg.stats.interval, offload=cfg.relay.offload,
        duplex=cfg.relay.duplex_for(), busy_poll_us=cfg.relay.busy_poll_for(),
        mss_clamp=cfg.relay.mss_clamp,
        user=cfg.security.user, group=cfg.security.group, kind="toml",
        log_level=cfg.stats.log_level, metrics=cfg.metrics)


def _as_is(host: str, port: int) -> tuple[str, int]:
    return host, port


def from_wg_quick(path: str, *, name: str | None = None, socket_path: str | None = None,
                  user: int | None = None, group: int | None = None,
                  metrics: MetricsConfig | None = None) -> Settings:
    """A wg-quick file: its addresses, MTU and (``Table = auto``) routes
    applied to the TUN device named ``name`` (by default, as wg-quick,
    after the file)."""
    quick = read_wg_quick(path)
    if quick.config.private_key is None:
        raise ConfigError(path, "[Interface] PrivateKey", (
            "expected the device's private key: without one it can make no handshake"))
    name = name if name is not None else interface_name(path)
    routes = quick_routes(quick)
    device = DeviceConfig(name=name, mode="tun", mtu=quick.config.mtu or DEFAULT_MTU,
                          addresses=quick.config.addresses, routes=routes)
    return Settings(source=path, wg=quick.config, device=device,
                    control_socket=socket_path or f"/run/tunrelay/{name}.sock",
                    user=user, group=group, kind="wg-quick",
                    metrics=metrics or MetricsConfig())


def check_own_key(settings: Settings) -> None:
    """A peer with the device's own public key would be a handshake with
    itself; refuse it (wireguard-go drops such a peer silently)."""
    from .noise import private_to_public
    if settings.wg.private_key is None:
        return
    own = private_to_public(settings.wg.private_key)
    for number, peer in enumerate(settings.wg.peers, 1):
        if peer.public_key == own:
            key = (f'peer #{number} "{peer.name}".public_key' if settings.kind == "toml"
                   else f"[Peer] #{number} PublicKey")
            raise ConfigError(settings.source, key, "expected another device's public key, got "
                                                    "this device's own (the public key of its "
                                                    "private key)")


def run(settings: Settings, *, timers: Timers | None = None,
        notifier: Notifier | None = None) -> None:
    """Run until SIGTERM/SIGINT; raise a ``TunrelayError`` on failure.
    ``notifier``: systemd's $NOTIFY_SOCKET (READY, STATUS, STOPPING, WATCHDOG)."""
    WgRunner(settings, timers=timers, notifier=notifier).run()


class WgRunner:
    """One run: the TUN device, the WireGuardDevice, the control socket."""

    def __init__(self, settings: Settings, *, timers: Timers | None = None,
                 notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.timers = timers
        self.notifier = notifier if notifier is not None else Notifier(None)
        self._ended: asyncio.Future | None = None
        self.device: Device | None = None
        self.wg: WireGuardDevice | None = None
        self._control: ControlServer | None = None
        self._metrics: Any = None  # daemon.metrics.MetricsServer, with [metrics] listen
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._state = "starting"
        self._started = time.monotonic()
        self._seen: dict[bytes, tuple[float | None, tuple[str, int] | None]] = {}
        self._watch_from = 0

    def run(self) -> None:
        """The TUN device is made before the event loop runs and closed
        after it ended: pyroute2's netlink calls run an event loop of their
        own, which cannot run inside ours."""
        from ..daemon.device import Device
        s = self.settings
        check_own_key(s)
        # Offloads as the relay asks for them; the device sees from the fds
        # whether they carry virtio_net_hdrs.
        self.device = Device(s.device, log=logging.getLogger("tunrelay.daemon.device"),
                             offload=s.offload)
        self.device.open()
        try:
            asyncio.run(self._main())
        finally:
            self._close_device()

    # ------------------------------------------------------------ lifecycle

    async def _main(self) -> None:
        from ..daemon.privileges import drop_privileges
        from ..daemon.relay import open_metrics
        from ..daemon.stats import ControlServer
        from .device import WireGuardDevice
        s = self.settings
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(signum, self._on_signal, signum)
        self._loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        assert self.device is not None
        try:
            self.wg = WireGuardDevice.from_config(s.wg, self.device.fds, mtu=s.device.mtu,
                                                  timers=self.timers, bind=s.bind,
                                                  duplex=s.duplex, busy_poll_us=s.busy_poll_us,
                                                  mss_clamp=s.mss_clamp)
            try:
                await self.wg.start()
            except OSError as exc:  # the port in use, a bad bind address
                raise TransportError(f"wireguard: {exc.strerror or exc}") from exc
            log.info("wireguard: device %s, public key %s, bound to %s, %d peer%s",
                     self.device.name, _b64(self.wg.public_key), s.bind,
                     len(s.wg.peers), "" if len(s.wg.peers) == 1 else "s")
            self._remember_peers()
            self._control = ControlServer(s.control_socket, self._snapshot_from_thread,
                                          requests={"reload": self._reload_from_thread})
            self._control.open()
            self._metrics = open_metrics(s.metrics, self._snapshot_from_thread)
            drop_privileges(s.user, s.group)
            self._state = "running"
            log.info("running (control socket %s); SIGTERM or Ctrl-C stops", s.control_socket)
            self.notifier.ready(self.status_line())
            lost = await self._until_stopped()
            if lost is not None:
                raise PumpError(f"device {self.device.name} was deleted or detached from under "
                                f"the relay ({lost}); the relay cannot go on")
        finally:
            self._state = "stopping"
            self.notifier.stopping(self.status_line())
            await self._close()

    # ------------------------------------------------------------ reload

    def _on_hup(self) -> None:
        log.info("SIGHUP: reloading %s", self.settings.source)
        self.reload()

    def reload(self) -> dict[str, Any]:
        """Re-read the file and apply its peer changes, or nothing
        (daemon/reload.py); on the event loop."""
        from ..daemon.reload import Outcome, WgReloader
        if self.wg is None or self._state != "running":
            return Outcome(False, f"the device is {self._state}, not running",
                           self.settings.source).to_dict()
        return WgReloader(self).reload().to_dict()

    def _reload_from_thread(self) -> dict[str, Any]:
        """For the control socket's thread: reload() on the loop."""
        return self._on_loop(self.reload, RELOAD_TIMEOUT_S, lambda: {
            "error": f"the event loop did not answer within {RELOAD_TIMEOUT_S} s; the "
                     "relay's log says whether the reload ran"})

    def _on_loop(self, call: Any, timeout: float, late: Any) -> dict[str, Any]:
        """``call()`` on the event loop (the device's owner), from another
        thread; ``late()`` if the loop does not answer within ``timeout``."""
        loop = self._loop
        if loop is None or loop.is_closed() or threading.current_thread() is threading.main_thread():
            return call()

        async def run() -> dict[str, Any]:
            return call()

        future = asyncio.run_coroutine_threadsafe(run(), loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            return late()

    def reread(self) -> Settings:
        """The file again, as the Settings it was started from were made
        (a ConfigError if it does not load)."""
        s = self.settings
        if s.kind == "wg-quick":
            new = from_wg_quick(s.source, name=s.device.name, socket_path=s.control_socket,
                                user=s.user, group=s.group, metrics=s.metrics)
        else:
            from ..daemon.config import WIREGUARD, load
            cfg = load(s.source)
            if cfg.transport.framing != WIREGUARD:
                raise ConfigError(s.source, "transport.framing", (
                    f'expected "{WIREGUARD}" (this relay runs a WireGuard device; another '
                    f'framing needs a restart), got "{cfg.transport.framing}"'))
            new = from_relay_config_settings(cfg)
        check_own_key(new)
        return new

    def _on_signal(self, signum: int) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        assert self._stop is not None
        self._stop.set()

    async def _until_stopped(self) -> str | None:
        """Wait for a stop signal (None) or the device ending by itself
        (the outcome, as text); watch peers and log stats meanwhile."""
        assert self.wg is not None and self._stop is not None
        ended = self._ended = asyncio.ensure_future(self.wg.wait())
        stopped = asyncio.ensure_future(self._stop.wait())
        watcher = asyncio.ensure_future(self._watch())
        # Pinged from the event loop itself: a loop that stops turning
        # stops the pings too.
        watchdog = asyncio.ensure_future(Watchdog(self.notifier, self.trouble).run_async())
        try:
            await asyncio.wait((ended, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watchdog.cancel()
            watcher.cancel()
            stopped.cancel()
            if not ended.done():
                ended.cancel()
        if stopped.done() and not stopped.cancelled() and not ended.done():
            return None
        if ended.done() and not ended.cancelled():
            if ended.exception() is not None:
                raise ended.exception()  # type: ignore[misc]
            outcome = ended.result()
            if self._stop.is_set():
                return None
            log.error("device %s: gone (%s)", self.device.name if self.device else "?", outcome)
            return str(outcome)
        return None

    async def _close(self) -> None:
        """Stop the device's pumps (joined), then the control socket; the
        TUN fds close after (``_close_device``): never close an fd a loop
        may still be blocked on."""
        if self.wg is not None:
            try:
                await self.wg.stop()
            except Exception:  # the fds must still close
                log.exception("wireguard: stopping the device failed")
        if self._metrics is not None:
            await _in_thread(self._metrics.close)
            self._metrics = None
        if self._control is not None:
            self._control.close()
            self._control = None

    def _close_device(self) -> None:
        if self.wg is not None and self.wg.running:
            return  # its pumps could not be stopped: leave the fds to the exit
        if self.device is not None and self.device.fds:
            name = self.device.name
            self.device.close()
            log.info("device %s closed%s", name, " (persistent: left in place)"
                     if self.settings.device.persist else " and removed")
        self._state = "stopped"
        log.info("stopped")

    # ------------------------------------------------------------ watching

    def _remember_peers(self) -> None:
        assert self.wg is not None
        for key in self.wg.peers():
            status = self.wg.peer_status(key)
            self._seen[key] = (status.last_handshake, status.endpoint)

    async def _watch(self) -> None:
        """Log handshakes and endpoint moves, and the periodic stats line."""
        next_log = None
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            try:
                self._log_peer_changes()
                self.notifier.status(self.status_line())
                interval, now = self.settings.stats_interval, time.monotonic()
                if not interval:
                    next_log = None  # a reload may turn it on again: from then on
                elif next_log is None:
                    next_log = now + interval
                elif now >= next_log:
                    log.info("stats: %s", _stats_line(self._peer_rows()))
                    next_log = max(next_log + interval, now)
            except Exception:  # a bug here must not stop the tunnel
                log.exception("wireguard: watching the peers failed")

    def _log_peer_changes(self) -> None:
        assert self.wg is not None
        keys = self.wg.peers()
        if len(keys) > WATCH_PEERS_PER_TICK:
            start = self._watch_from % len(keys)
            keys = (keys[start:] + keys[:start])[:WATCH_PEERS_PER_TICK]
            self._watch_from = start + WATCH_PEERS_PER_TICK
        for key in keys:
            status = self.wg.peer_status(key)
            before_handshake, before_endpoint = self._seen.get(key, (None, None))
            label = status.name or short_key(key)
            if status.endpoint != before_endpoint and status.endpoint is not None:
                if before_endpoint is None:
                    log.info("peer %s: at %s", label, _endpoint(status.endpoint))
                else:
                    log.info("peer %s: moved from %s to %s (roaming)", label,
                             _endpoint(before_endpoint), _endpoint(status.endpoint))
            if status.last_handshake is not None and status.last_handshake != before_handshake:
                if before_handshake is None:
                    log.info("peer %s: handshake completed (%s)", label,
                             _endpoint(status.endpoint) if status.endpoint else "no endpoint")
                else:
                    log.debug("peer %s: new handshake (rekey)", label)
            self._seen[key] = (status.last_handshake, status.endpoint)

    # ------------------------------------------------------------ systemd

    def status_line(self) -> str:
        """One line for systemd's STATUS=: device, port, peers and how many
        completed a handshake (from the once-a-second look at the peers)."""
        name = (self.device.name if self.device is not None and self.device.name
                else self.settings.device.name or "?")
        head = f"{name} (tun, udp wireguard)"
        if self._state in ("stopping", "stopped") or self.wg is None:
            return f"{head}: {self._state}"
        peers = len(self._seen)
        up = sum(1 for handshake, _ in self._seen.values() if handshake is not None)
        return (f"{head}: listening on port {self.wg.listen_port}, {peers} "
                f"peer{'' if peers == 1 else 's'}, {up} with a handshake")

    def trouble(self) -> str | None:
        """Why the device is not healthy, or None (the watchdog pings only
        then): stopping, or the device or one of its pumps ended."""
        if self._stop is not None and self._stop.is_set():
            return "stopping"
        if self.wg is None or not self.wg.running:
            return "the WireGuard device is not running"
        if self._ended is not None and self._ended.done():
            return "a pump ended"
        return None

    # ------------------------------------------------------------ stats

    def _snapshot_from_thread(self) -> dict[str, Any]:
        """For the control socket's thread: the snapshot, made on the loop."""
        return self._on_loop(self.snapshot, SNAPSHOT_TIMEOUT_S, lambda: {
            **self._header(), "state": "busy (the event loop did not answer)"})

    def _header(self) -> dict[str, Any]:
        s = self.settings
        return {
            "device": self.device.name if self.device is not None else s.device.name,
            "mode": "tun", "transport": "udp", "framing": "wireguard", "engine": "fast",
            "queues": len(self.device.fds) if self.device is not None and self.device.fds
            else s.device.queues,
            "state": self._state,
            "peer_mode": f"{len(s.wg.peers)} WireGuard peer(s), routed by allowed IPs",
            "uptime": time.monotonic() - self._started,
        }

    def snapshot(self) -> dict[str, Any]:
        """Everything ``tunrelay stats`` shows: the header facts, the pump
        counters (when the device reports them), the device's WireGuard
        counters and one row per peer."""
        snap = self._header()
        wg = self.wg
        if wg is None:
            return snap
        from ..daemon.relay import sum_counters
        raw = wg.stats()
        pumps = raw.get("pumps")
        if isinstance(pumps, list) and pumps:
            # The queues' pumps read as one, as the relay shows them.
            summed = sum_counters(pumps)
            snap.update(egress=summed["egress"], ingress=summed["ingress"])
        counters = _jsonable(raw)
        snap["wireguard"] = {
            "public_key": _b64(wg.public_key), "listen_port": wg.listen_port,
            "fwmark": wg.fwmark, "counters": counters,
        }
        snap["wg_peers"] = self._peer_rows()
        return snap

    def _peer_rows(self) -> list[dict[str, Any]]:
        assert self.wg is not None
        rows = []
        for key in self.wg.peers():
            status = self.wg.peer_status(key)
            counters = self.wg.peer_counters(key)
            rows.append({
                "name": status.name or short_key(key),
                "public_key": _b64(key),
                "endpoint": _endpoint(status.endpoint) if status.endpoint else None,
                "latest_handshake": status.last_handshake,
                "tx_bytes": status.tx_bytes, "rx_bytes": status.rx_bytes,
                "persistent_keepalive": status.persistent_keepalive,
                "allowed_ips": [str(n) for n in status.allowed_ips],
                # The data plane's own, of the inner packets (as [[peer]] rows have them).
                "egress": counters["egress"], "ingress": counters["ingress"],
            })
        return rows


async def _in_thread(work: Any) -> None:
    """``work()`` in a thread of its own, awaited: the metrics server's
    close() joins a scrape's thread, which may be waiting for this loop's
    snapshot.  Not run_in_executor: its pool is imported on first use, and
    after privileges are dropped the Python installation may not be
    readable any more (a pyenv under /root)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def run() -> None:
        try:
            work()
        finally:
            loop.call_soon_threadsafe(done.set_result, None)

    threading.Thread(target=run, name="metrics-close").start()
    await done


def _b64(key: bytes | None) -> str | None:
    return None if key is None else base64.b64encode(key).decode()


def _endpoint(endpoint: tuple[str, int] | tuple[Any, ...]) -> str:
    host, port = str(endpoint[0]), int(endpoint[1])
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _stats_line(rows: list[dict[str, Any]]) -> str:
    tx = sum(r["tx_bytes"] for r in rows)
    rx = sum(r["rx_bytes"] for r in rows)
    up = sum(1 for r in rows if r["latest_handshake"] is not None)
    return f"{len(rows)} peers ({up} with a handshake), tx {tx} B, rx {rx} B"


def _jsonable(value: Any) -> Any:
    """The device's counters as JSON carries them (bytes as base64,
    tuples as lists, other objects as text)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def describe(settings: Settings) -> str:
    """One line for ``tunrelay check``."""
    wg, d = settings.wg, settings.device
    try:
        from .noise import private_to_public
        public = (_b64(private_to_public(wg.private_key)) if wg.private_key is not None
                  else "(no private key)")
    except ImportError:  # cryptography missing: the file is still checked
        public = "(cryptography not installed)"
    peers = ", ".join(
        f"{p.name or short_key(p.public_key)} "
        f"{_endpoint(p.endpoint) if p.endpoint else '(endpoint from its handshake)'}"
        for p in wg.peers)
    routes = f", routes {' '.join(str(r) for r in d.routes)}" if d.routes else ""
    return (f"wireguard device {d.name or '(kernel-chosen)'} mtu {d.mtu}, public key {public}, "
            f"listen {settings.bind} port {wg.listen_port or '(any)'}"
            f"{f', fwmark {wg.fwmark:#x}' if wg.fwmark else ''}{routes}, "
            f"{len(wg.peers)} peer{'' if len(wg.peers) == 1 else 's'}: {peers or 'none'}")
