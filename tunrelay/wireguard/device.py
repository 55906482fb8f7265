"""A WireGuard interface: one PeerTable, one compiled Pump per TUN queue,
and the handshake, cookies and timers on an asyncio loop.

How the work splits:

* **C (the nogil loops, framing "session").**  Transport data (type 4) both
  ways: routing by allowed IPs, sealing with padding, the replay window,
  the inner-source check, roaming on authenticated data, the REKEY/REJECT
  message and age limits (the "renew" event), promotion of a responder's
  session on the peer's first datagram ("promoted"), and holding packets
  for a peer without a session ("staged").  Handshake messages (types 1-3,
  and any other type byte) go to the control ring.
* **Python (this module).**  Everything else, from the events the table
  raises (tunrelay.aio.AsyncPump): mac1 first, then under load mac2 or a
  cookie reply and a per-source token bucket, then the Noise steps
  (noise.py), TAI64N replay and 50/s flood checks, a device-wide map of
  local indexes, session installation (``initiator=True`` for sessions we
  initiated, else next until the peer confirms), endpoint updates from
  authenticated handshakes, the staged-packet queues, and every timer on
  one tick (timers.py).

Control events are handled per ``take()`` batch: the batch's number of
handshake messages is WireGuard's queue length, so "under load" (>= 1/8 of
the control ring, latched for a second) is decided before any DH of it.

Simultaneous initiations.  When both ends initiate at once, installing our
own session as initiator would retire the responder session the peer is
about to use (the table keeps one ``next``, and an initiator's install
drops it).  So the end with the smaller public key yields: answering the
peer's initiation, it abandons its own (the peer's response to it is then
refused as "unknown_index").  The other end completes as initiator and
the yielding end's staged packets go once the peer's first datagram
promotes the session.  For the same reason no handshake is started
within REKEY_TIMEOUT of answering one whose session is not confirmed yet.

Configuration (``set_*``, ``add_peer``...) is made from the event loop's
thread, running or not; ``batch()`` makes many changes one publication.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import random
import secrets
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from .._runner import Outcome, Reason
from ..aio import AsyncPump
from ..daemon.lograte import RateLimitedLog
from ..errors import PumpArgumentError, PumpStateError
from ..framing import MssClamp, mss_clamps
from . import noise
from .cookie import MacVerifier, parse_cookie_reply
from .noise import HandshakeError, Identity, UnknownPeer, key_to_base64
from .peer import Network, Pending, SessionInfo, WgPeer
from .ratelimit import SourceBuckets
from .timers import Action, PeerClock, Timers, due, new_handshake_due, unanswered_since

if TYPE_CHECKING:
    from .._fastpath import Event, PeerTable, Pump
    from .config import WgConfig

__all__ = ["KEEP", "Keep", "PeerStatus", "REFUSALS", "WireGuardDevice"]

log = logging.getLogger("tunrelay.wireguard")


class Keep:
    """The type of KEEP: ``set_peer`` leaves a keyword given as KEEP as it is."""
    _instance: Keep | None = None

    def __new__(cls) -> Keep:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Final = Keep()

#: Why a handshake message was refused (stats()["refused"] has each).
REFUSALS: tuple[str, ...] = (
    "malformed_size",      # wrong length for its type, or reserved bytes set
    "unknown_type",        # a first byte that is no WireGuard message
    "no_private_key",      # this device has no key yet
    "bad_mac1",            # not for our public key (checked before any DH)
    "cookie_needed",       # under load, without a valid mac2: answered with a cookie
    "rate_limited",        # under load, over its source's token bucket
    "decrypt_failure",     # does not authenticate (or a low-order key)
    "unknown_peer",        # authenticates, from a static key that is not our peer's
    "replayed_timestamp",  # TAI64N not newer than the peer's newest
    "too_soon",            # a second initiation from one peer within 20 ms
    "unknown_index",       # a response/cookie for no handshake or session of ours
    "bad_cookie",          # a cookie reply that does not open
    "stopping",            # arrived while the device stopped
)

CONTROL_SLOTS = 1024
HANDSHAKE_TYPES = {noise.MSG_INITIATION: noise.INITIATION_SIZE,
                   noise.MSG_RESPONSE: noise.RESPONSE_SIZE,
                   noise.MSG_COOKIE: noise.COOKIE_SIZE}
SOCKET_BUFFER_BYTES = 4 << 20
SO_MARK = getattr(socket, "SO_MARK", 36)
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
TUNGETIFF = 0x800454D2
IFF_VNET_HDR = 0x4000


@dataclass
class PeerStatus:
    """What ``wg show`` / UAPI get report for one peer."""
    public_key: bytes
    preshared_key: bytes | None
    endpoint: tuple[str, int] | None
    last_handshake: float | None      # time.time() of the last completed handshake
    tx_bytes: int
    rx_bytes: int
    persistent_keepalive: int
    allowed_ips: list[Network]
    name: str | None


def _has_vnet_hdr(fd: int) -> bool:
    """Whether a TUN fd was opened with IFF_VNET_HDR (offload "auto"); False
    for anything that is not a TUN device (a socketpair in tests)."""
    try:
        ifreq = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    except OSError:
        return False
    (flags,) = struct.unpack_from("H", ifreq, 16)
    return bool(flags & IFF_VNET_HDR)


def _network(value: object) -> Network:
    """An allowed IP as wg takes it: host bits are cleared (10.0.0.1/24 is
    10.0.0.0/24)."""
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return value
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError as exc:
        raise ValueError(f"allowed IP {value!r}: {exc}") from None


def _check_key(key: object, what: str) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != noise.KEY_SIZE:
        found = f"{len(key)} bytes" if isinstance(key, (bytes, bytearray)) else type(key).__name__
        raise ValueError(f"{what} must be 32 bytes, got {found}")
    return bytes(key)


class WireGuardDevice:
    """One WireGuard interface over ``tun_fds`` (one open TUN fd per queue,
    IFF_NO_PI; the caller keeps and closes them)."""

    def __init__(self, tun_fds: Sequence[int], *, private_key: bytes | None = None,
                 listen_port: int = 0, fwmark: int = 0, mtu: int = 1420, bind: str = "::",
                 timers: Timers | None = None, offload: bool | str = "auto",
                 duplex: bool = False, busy_poll_us: int = 0,
                 mss_clamp: MssClamp = None) -> None:
        from .._fastpath import PeerTable  # the compiled core, loaded only for a device
        self._tun_fds = list(tun_fds)
        if not self._tun_fds:
            raise ValueError("a WireGuardDevice needs at least one TUN fd")
        if offload not in (True, False, "auto"):
            raise ValueError(f"offload must be True, False or 'auto', got {offload!r}")
        self.timers = timers if timers is not None else Timers()
        self._check_port(listen_port)
        self._check_fwmark(fwmark)
        self._wanted_port = listen_port
        self._bound_port = 0
        self._fwmark = fwmark
        self._mtu = mtu
        self._bind = bind
        self._offload = offload
        # How each pump's loops run (tunrelay.Pump duplex= and busy_poll_us=),
        # and what its SYNs are clamped to (mss_clamp=).
        mss_clamps(mss_clamp, mtu)   # a bad value fails here, not at start()
        self._loop = {"duplex": duplex, "busy_poll_us": busy_poll_us, "mss_clamp": mss_clamp}
        t = self.timers
        self.table: PeerTable = PeerTable(
            control_slots=CONTROL_SLOTS, rekey_after_messages=t.rekey_after_messages,
            rekey_after_time=t.rekey_after_time, reject_after_messages=t.reject_after_messages,
            reject_after_time=t.reject_after_time)
        self._peers: dict[bytes, WgPeer] = {}           # insertion order: peers()
        self._by_id: dict[int, WgPeer] = {}
        self._owners: dict[Network, WgPeer] = {}
        self._pending: dict[int, WgPeer] = {}           # local index of an initiation in flight
        self._sessions: dict[int, SessionInfo] = {}     # local index of an installed session
        self._identity: Identity | None = None
        self._public: bytes | None = None
        self._verifier: MacVerifier | None = None
        self._buckets = SourceBuckets(t.handshakes_per_second, t.handshake_burst)
        self._counts: Counter[str] = Counter()
        self._refused: Counter[str] = Counter({reason: 0 for reason in REFUSALS})
        self._rlog = RateLimitedLog(log)
        self._pumps: list[Pump] = []
        self._socks: list[socket.socket] = []
        self._ap: AsyncPump | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._watchers: set[asyncio.Task[None]] = set()
        self._rebinding: asyncio.Task[None] | None = None
        self._ended: asyncio.Future[Outcome] | None = None
        self._batch: list[Event] = []
        self._batch_scheduled = False
        self._under_load_until = float("-inf")
        self._running = False
        if private_key is not None:
            self.set_private_key(private_key)

    @classmethod
    def from_config(cls, config: WgConfig, tun_fds: Sequence[int], *, mtu: int = 1420,
                    timers: Timers | None = None, bind: str = "::", duplex: bool = False,
                    busy_poll_us: int = 0, mss_clamp: MssClamp = None) -> WireGuardDevice:
        """A device as ``config`` describes it (its MTU, when it names one,
        over ``mtu``)."""
        device = cls(tun_fds, private_key=config.private_key, listen_port=config.listen_port,
                     fwmark=config.fwmark, mtu=config.mtu if config.mtu else mtu,
                     timers=timers, bind=bind, duplex=duplex, busy_poll_us=busy_poll_us,
                     mss_clamp=mss_clamp)
        with device.batch():
            for pc in config.peers:
                device.add_peer(pc.public_key, pc.name)
                device.set_peer(pc.public_key, preshared_key=pc.preshared_key,
                                endpoint=pc.endpoint, persistent_keepalive=pc.persistent_keepalive,
                                allowed_ips=pc.allowed_ips)
        return device

    # ------------------------------------------------------------ running

    @property
    def running(self) -> bool:
        return self._running

    async def start(self) -> None:
        """Bind the UDP socket(s) and start the pumps and the timers."""
        if self._running:
            raise PumpStateError("this WireGuardDevice is running already")
        loop = asyncio.get_running_loop()
        socks = self._open_sockets(self._wanted_port)
        try:
            self._attach(socks)
            await self._start_pumps()
        except BaseException:
            for sock in socks:
                sock.close()
            self._socks = []
            raise
        self._ended = loop.create_future()
        self._running = True
        self._tick_task = asyncio.create_task(self._ticker(), name="wireguard-timers")
        log.info("wireguard: listening on port %d (%d queue%s)", self._bound_port,
                 len(self._pumps), "" if len(self._pumps) == 1 else "s")

    async def stop(self) -> None:
        """Stop the timers and the pumps and close the sockets; idempotent.
        Sessions and peers are kept (start() again resumes)."""
        if not self._running:
            return
        await self.rebound()
        self._running = False
        if self._tick_task is not None:
            self._tick_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick_task
            self._tick_task = None
        outcome = await self._stop_pumps()
        for sock in self._socks:
            sock.close()
        self._socks = []
        self._bound_port = 0
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(outcome or Outcome(Reason.STOPPED))

    async def wait(self) -> Outcome:
        """Until a pump ends by itself (the TUN device was deleted), or stop()."""
        if self._ended is None:
            raise PumpStateError("WireGuardDevice.wait() before start()")
        return await asyncio.shield(self._ended)

    def _attach(self, socks: list[socket.socket]) -> None:
        from .._fastpath import Pump
        if not self._pumps:
            offload = (all(_has_vnet_hdr(fd) for fd in self._tun_fds)
                       if self._offload == "auto" else bool(self._offload))
            self._pumps = [Pump(fd, sock, framing="session", peers=self.table, mtu=self._mtu,
                                offload=offload, **self._loop)
                           for fd, sock in zip(self._tun_fds, socks)]
        else:
            for pump, sock in zip(self._pumps, socks):
                pump.attach(sock)
        self._socks = socks
        self._bound_port = socks[0].getsockname()[1]

    async def _start_pumps(self) -> None:
        # Callbacks only: the events() queue keeps nothing worth holding.
        ap = AsyncPump(*self._pumps, peers=self.table, queue_size=1)
        ap.on("control", self._on_control)
        ap.on("staged", self._on_staged)
        ap.on("renew", self._on_renew)
        ap.on("promoted", self._on_promoted)
        ap.on("endpoint", self._on_endpoint)
        await ap.start()
        self._ap = ap
        watcher = asyncio.create_task(self._watch(ap), name="wireguard-pumps")
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _stop_pumps(self) -> Outcome | None:
        ap, self._ap = self._ap, None
        if ap is None:
            return None
        return await ap.stop()

    async def _watch(self, ap: AsyncPump) -> None:
        """A pump that ends while this AsyncPump is the live one ended by
        itself (the TUN went away): wait() reports it."""
        outcome = await ap.wait()
        if ap is self._ap and self._ended is not None and not self._ended.done():
            log.warning("wireguard: a pump ended: %s", outcome)
            self._ended.set_result(outcome)

    # ------------------------------------------------------------ sockets

    def _open_sockets(self, port: int) -> list[socket.socket]:
        """One UDP socket per queue on ``port`` (0: any, the same for all),
        sharing it with SO_REUSEPORT; dual-stack on "::", IPv4 when this
        host has no IPv6."""
        try:
            return self._open_on(self._bind, port)
        except OSError as exc:
            if self._bind != "::" or exc.errno not in (
                    errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.EADDRNOTAVAIL):
                raise
            log.info("wireguard: no IPv6 here (%s): listening on IPv4 only", exc.strerror)
            return self._open_on("0.0.0.0", port)

    def _open_on(self, host: str, port: int) -> list[socket.socket]:
        socks: list[socket.socket] = []
        try:
            for _ in self._tun_fds:
                sock = self._udp_socket(host, port)
                socks.append(sock)
                port = sock.getsockname()[1]
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        return socks

    def _udp_socket(self, host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            if len(self._tun_fds) > 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF),
                                 (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
                try:       # forced when privileged, else what rmem_max/wmem_max allow
                    sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER_BYTES)
                except OSError:
                    sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER_BYTES)
            if self._fwmark:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self._fwmark)
            if family == socket.AF_INET6 and host == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise OSError(exc.errno, f"cannot bind UDP port {port} on {host}: "
                              f"{exc.strerror}") from None
        except BaseException:
            sock.close()
            raise
        return sock

    # ------------------------------------------------------------ configuration

    @property
    def private_key(self) -> bytes | None:
        if self._identity is None:
            return None
        return noise.private_bytes(self._identity.private)

    @property
    def public_key(self) -> bytes | None:
        return self._public

    def set_private_key(self, key: bytes | None) -> None:
        """A new static key: every peer's precomputation is derived again,
        every session and handshake in flight is forgotten (they were made
        with the old key), and a peer whose public key is now ours is
        removed."""
        if key is not None:
            key = _check_key(key, "private_key")
            if not any(key):
                key = None                   # all zeros: UAPI's "no key"
        if key == self.private_key:
            return
        self._identity = Identity.from_bytes(key) if key is not None else None
        self._public = self._identity.public if self._identity is not None else None
        self._verifier = None
        self.table.set_handshake_gate(None)
        if self._public is not None:
            # The loops sort handshake messages under load with the same
            # mac1 key and cookie secret (PeerTable.set_handshake_gate), so a
            # flood cannot keep a peer that carries our cookie out.
            def share(secret: bytes, valid_for: float) -> None:
                self.table.set_handshake_gate(verifier.mac1_key, secret, valid_for)
            verifier = MacVerifier(self._public, refresh=self.timers.cookie_refresh_time,
                                   on_rotate=share)
            self._verifier = verifier
            verifier.current_secret()
        with self.table.batch():
            if self._public is not None and self._public in self._peers:
                log.warning("wireguard: peer %s has this device's public key: removed",
                            key_to_base64(self._public))
                self.remove_peer(self._public)
            for peer in self._peers.values():
                peer.derive(self._identity)
                self._forget_sessions(peer)
                self._drop_pending(peer)

    @property
    def listen_port(self) -> int:
        """The bound port while running, else the configured one (0: any)."""
        return self._bound_port if self._running else self._wanted_port

    def set_listen_port(self, port: int) -> None:
        """Listen on ``port`` (0: any).  While running the sockets are
        rebound at once (sessions kept): OSError (EADDRINUSE) when the port
        is taken, and then nothing changed."""
        self._check_port(port)
        if not self._running:
            self._wanted_port = port
            return
        if port != 0 and port == self._bound_port:
            self._wanted_port = port
            return
        socks = self._open_sockets(port)      # raises before anything is changed
        self._wanted_port = port
        previous = self._rebinding
        self._rebinding = asyncio.get_running_loop().create_task(
            self._rebind(socks, previous), name="wireguard-rebind")
        self._bound_port = socks[0].getsockname()[1]

    async def rebound(self) -> None:
        """Until a set_listen_port() made while running has taken effect."""
        while self._rebinding is not None:
            task = self._rebinding
            await asyncio.shield(task)
            if self._rebinding is task:
                self._rebinding = None

    async def _rebind(self, socks: list[socket.socket],
                      previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.shield(previous)
        old = self._socks
        await self._stop_pumps()
        if not self._running:                    # stopped meanwhile
            for sock in socks:
                sock.close()
            return
        self._attach(socks)
        for sock in old:
            sock.close()
        await self._start_pumps()
        log.info("wireguard: listening on port %d", self._bound_port)

    @property
    def fwmark(self) -> int:
        return self._fwmark

    def set_fwmark(self, mark: int) -> None:
        """The SO_MARK of the UDP sockets (0: none); set on them at once."""
        self._check_fwmark(mark)
        for sock in self._socks:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        self._fwmark = mark

    def peers(self) -> list[bytes]:
        """The peers' public keys, in the order they were added."""
        return list(self._peers)

    def add_peer(self, public_key: bytes, name: str | None = None) -> None:
        """A new peer with nothing configured yet (set_peer does that); a
        no-op if it exists.  ValueError for this device's own public key."""
        public_key = _check_key(public_key, "public_key")
        if public_key in self._peers:
            return
        if public_key == self._public:
            raise ValueError(f"peer {key_to_base64(public_key)} is this device's own public key")
        label = name or key_to_base64(public_key)
        if self.table.find(label) is not None:
            raise ValueError(f"a peer named {label!r} exists already")
        table_id = self.table.add(label, roaming=True)
        peer = WgPeer(public_key, table_id, name)
        peer.signer.refresh = self.timers.cookie_refresh_time
        peer.derive(self._identity)
        self._peers[public_key] = peer
        self._by_id[table_id] = peer

    def remove_peer(self, public_key: bytes) -> None:
        """Take a peer out (its sessions, handshakes and queued packets go
        with it); a no-op for an unknown key."""
        peer = self._peers.pop(bytes(public_key), None)
        if peer is None:
            return
        self._drop_pending(peer)
        for index in list(peer.sessions):
            self._sessions.pop(index, None)
        peer.sessions.clear()
        self._drop_staged(peer, "staged_dropped_removed")
        for net in peer.allowed:
            self._owners.pop(net, None)
        del self._by_id[peer.table_id]
        self.table.remove(peer.table_id)

    def remove_all_peers(self) -> None:
        with self.table.batch():
            for key in list(self._peers):
                self.remove_peer(key)

    def set_peer(self, public_key: bytes, *, preshared_key: bytes | None | Keep = KEEP,
                 endpoint: tuple[str, int] | None | Keep = KEEP,
                 persistent_keepalive: int | Keep = KEEP,
                 allowed_ips: Iterable[Network | str] | Keep = KEEP,
                 add_allowed_ips: Iterable[Network | str] = ()) -> None:
        """Change a peer (KeyError if it was not added).  ``allowed_ips``
        replaces its list; ``add_allowed_ips`` appends, moving a prefix
        another peer held.  Every value is checked before anything
        changes."""
        peer = self._peers.get(bytes(public_key))
        if peer is None:
            raise KeyError(f"no peer {key_to_base64(bytes(public_key))}")
        psk = preshared_key
        if not isinstance(psk, Keep) and psk is not None:
            psk = _check_key(psk, "preshared_key")
            if not any(psk):
                psk = None
        where: tuple[str, int] | None | Keep = endpoint
        if not isinstance(endpoint, Keep) and endpoint is not None:
            where = self._resolve(endpoint)
        if not isinstance(persistent_keepalive, Keep):
            if not isinstance(persistent_keepalive, int) or not 0 <= persistent_keepalive <= 65535:
                raise ValueError(f"persistent_keepalive must be 0..65535 s, "
                                 f"got {persistent_keepalive!r}")
        replace = None if isinstance(allowed_ips, Keep) else list(
            dict.fromkeys(_network(n) for n in allowed_ips))
        added = list(dict.fromkeys(_network(n) for n in add_allowed_ips))
        with self.table.batch():
            if not isinstance(psk, Keep):
                peer.preshared_key = psk
            if not isinstance(where, Keep):
                try:
                    self.table.update(peer.table_id, endpoint=where)
                except PumpArgumentError as exc:
                    raise ValueError(str(exc)) from None
                peer.has_endpoint = where is not None
            if replace is not None or added:
                nets = list(peer.allowed) if replace is None else replace
                nets += [n for n in added if n not in nets]
                self._give(peer, nets)
            if not isinstance(persistent_keepalive, Keep):
                turned_on = persistent_keepalive and not peer.persistent_keepalive
                peer.persistent_keepalive = persistent_keepalive
                if turned_on and self._running:
                    self._keepalive_now(peer)

    def _give(self, peer: WgPeer, nets: list[Network]) -> None:
        """``peer`` holds exactly ``nets``; a prefix another peer held is
        taken from it first (in the caller's batch)."""
        losers: dict[int, WgPeer] = {}
        for net in nets:
            holder = self._owners.get(net)
            if holder is not None and holder is not peer:
                holder.allowed = [n for n in holder.allowed if n != net]
                losers[holder.table_id] = holder
        for holder in losers.values():
            self.table.update(holder.table_id, allowed_ips=holder.allowed)
        for net in peer.allowed:
            self._owners.pop(net, None)
        self.table.update(peer.table_id, allowed_ips=nets)
        peer.allowed = nets
        for net in nets:
            self._owners[net] = peer

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Many changes, one publication of the data path's tables."""
        with self.table.batch():
            yield

    def _resolve(self, endpoint: tuple[str, int]) -> tuple[str, int]:
        """An endpoint as the table takes it: a numeric host (names are
        resolved now, as ``wg`` does), a port 1..65535."""
        try:
            host, port = str(endpoint[0]), int(endpoint[1])
        except (TypeError, IndexError, ValueError):
            raise ValueError(f"endpoint must be (host, port), got {endpoint!r}") from None
        if not 0 < port < 65536:
            raise ValueError(f"endpoint {host}:{port}: the port must be 1..65535")
        host = host.strip("[]")
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
            return host, port
        except ValueError:
            pass
        v4_only = bool(self._socks) and self._socks[0].family == socket.AF_INET
        try:
            found = socket.getaddrinfo(host, port, socket.AF_INET if v4_only else socket.AF_UNSPEC,
                                       socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise ValueError(f"endpoint {host}:{port}: {exc.strerror}") from None
        found.sort(key=lambda a: a[0] != socket.AF_INET)   # IPv4 first, as wg does
        return str(found[0][4][0]), port

    @staticmethod
    def _check_port(port: int) -> None:
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"listen_port must be 0..65535, got {port!r}")

    @staticmethod
    def _check_fwmark(mark: int) -> None:
        if not isinstance(mark, int) or not 0 <= mark <= 0xFFFFFFFF:
            raise ValueError(f"fwmark must be 0..2^32-1, got {mark!r}")

    # ------------------------------------------------------------ status

    def peer_status(self, public_key: bytes) -> PeerStatus:
        """One peer as ``wg show`` reports it.  Bytes are on the wire:
        the table's packet bytes plus 32 bytes of header and tag per
        datagram, plus the handshake messages."""
        peer = self._peers.get(bytes(public_key))
        if peer is None:
            raise KeyError(f"no peer {key_to_base64(bytes(public_key))}")
        info = self.table.info(peer.table_id)
        eg, ing = info["egress"], info["ingress"]
        overhead = noise.TRANSPORT_MIN
        tx = (eg["bytes"] + overhead * (eg["packets"] + eg.get("keepalives", 0))
              + peer.handshake_bytes_sent)
        rx = (ing["bytes"] + overhead * (ing["packets"] + ing["keepalives"])
              + peer.handshake_bytes_received)
        endpoint = info["endpoint"]
        return PeerStatus(
            public_key=peer.public_key, preshared_key=peer.preshared_key,
            endpoint=(str(endpoint[0]), int(endpoint[1])) if endpoint else None,
            last_handshake=peer.last_handshake_wall, tx_bytes=tx, rx_bytes=rx,
            persistent_keepalive=peer.persistent_keepalive, allowed_ips=list(peer.allowed),
            name=peer.name)

    def peer_counters(self, public_key: bytes) -> dict[str, dict[str, int]]:
        """The data plane's counters of one peer, per direction (egress: to
        the peer): packets, bytes (of the inner packets, unlike
        ``peer_status``'s wire bytes), drops and keepalives."""
        peer = self._peers.get(bytes(public_key))
        if peer is None:
            raise KeyError(f"no peer {key_to_base64(bytes(public_key))}")
        info = self.table.info(peer.table_id)
        return {direction: {key: info[direction].get(key, 0)
                            for key in ("packets", "bytes", "drops", "keepalives")}
                for direction in ("egress", "ingress")}

    @property
    def under_load(self) -> bool:
        return time.monotonic() < self._under_load_until

    def stats(self) -> dict[str, Any]:
        """Device counters: handshakes by step, refusals by reason, cookies,
        staged packets, the table's and each pump's counters."""
        counts = self._counts
        return {
            "peers": len(self._peers),
            "listen_port": self.listen_port,
            "under_load": self.under_load,
            "handshakes": {k: counts[k] for k in (
                "initiations_sent", "initiations_received", "responses_sent",
                "responses_received", "completed", "retransmits", "given_up",
                "yielded", "cookies_sent", "cookies_received", "under_load_batches")},
            "refused": dict(self._refused),
            "staged": {k: counts[k] for k in (
                "staged_queued", "staged_sent", "staged_dropped_overflow",
                "staged_dropped_gave_up", "staged_dropped_no_peer", "staged_dropped_send_error",
                "staged_dropped_removed", "staged_dropped_expired")},
            "timers": {k: counts[k] for k in (
                "keepalives_sent", "sessions_expired", "keys_zeroed", "rekeys_ignored")},
            "send_errors": counts["send_errors"],
            "table": self.table.counts(),
            "pumps": [dict(pump.stats()) for pump in self._pumps],
        }

    # ------------------------------------------------------------ events

    def _on_endpoint(self, event: Event) -> None:
        peer = self._by_id.get(event.peer) if event.peer is not None else None
        if peer is not None:
            peer.has_endpoint = event.address is not None
            log.debug("wireguard: peer %s roamed to %s", self._label(peer), event.address)

    def _on_control(self, event: Event) -> None:
        """Collect a take() batch; it is handled once complete (call_soon runs
        after AsyncPump dispatched all of it), so its size is known first."""
        self._batch.append(event)
        if not self._batch_scheduled:
            self._batch_scheduled = True
            asyncio.get_running_loop().call_soon(self._handle_batch)

    def _handle_batch(self) -> None:
        batch, self._batch = self._batch, []
        self._batch_scheduled = False
        if not self._running:
            self._refused["stopping"] += len(batch)
            return
        now = time.monotonic()
        handshakes = sum(1 for e in batch if e.data and e.data[0] in (1, 2))
        if handshakes >= CONTROL_SLOTS // 8:
            if now >= self._under_load_until:
                self._rlog.warning("under_load", "wireguard: under load (%d handshake messages "
                                   "waiting): cookies and rate limits on", handshakes)
            self._under_load_until = now + self.timers.under_load_hold
            self._counts["under_load_batches"] += 1
        for event in batch:
            try:
                self._handle(event.data or b"", event.address, now)
            except Exception:                 # a bug must not stop the loop's reader
                log.exception("wireguard: handling a control message failed")

    def _refuse(self, reason: str, address: Any) -> None:
        self._refused[reason] += 1
        host = address[0] if address else "?"
        self._rlog.log_at(logging.INFO, reason, "wireguard: handshake message from %s refused: %s",
                          host, reason)

    def _handle(self, data: bytes, address: Any, now: float) -> None:
        """One control datagram: size, mac1 (before any DH), load, then its step."""
        if not data:
            return self._refuse("malformed_size", address)
        size = HANDSHAKE_TYPES.get(data[0])
        if size is None:
            return self._refuse("unknown_type", address)
        if len(data) != size or data[1:4] != b"\0\0\0":
            return self._refuse("malformed_size", address)
        if data[0] == noise.MSG_COOKIE:
            return self._on_cookie_reply(data, address)
        if self._identity is None or self._verifier is None:
            return self._refuse("no_private_key", address)
        if not self._verifier.mac1_ok(data):
            return self._refuse("bad_mac1", address)
        if now < self._under_load_until:
            if not self._verifier.mac2_ok(data, address):
                self._send(address, self._verifier.reply(data, address))
                self._counts["cookies_sent"] += 1
                return self._refuse("cookie_needed", address)
            if not self._buckets.allow(address[0]):
                return self._refuse("rate_limited", address)
        if data[0] == noise.MSG_INITIATION:
            self._on_initiation(data, address, now)
        else:
            self._on_response(data, address, now)

    def _static_secret(self, static: bytes) -> bytes:
        peer = self._peers.get(static)
        if peer is None or peer.static_secret is None:
            raise UnknownPeer("no such peer")
        return peer.static_secret

    def _on_initiation(self, data: bytes, address: Any, now: float) -> None:
        assert self._identity is not None and self._public is not None
        try:
            init = noise.consume_initiation(self._identity, data, self._static_secret)
        except UnknownPeer:
            return self._refuse("unknown_peer", address)
        except HandshakeError:
            return self._refuse("decrypt_failure", address)
        peer = self._peers[init.remote_static]
        if peer.latest_timestamp is not None and init.timestamp <= peer.latest_timestamp:
            return self._refuse("replayed_timestamp", address)
        if (peer.last_initiation_consumed is not None
                and now - peer.last_initiation_consumed < self.timers.initiation_interval):
            return self._refuse("too_soon", address)
        index = self._new_index()
        response, keys = noise.create_response(init, index, psk=peer.psk)
        peer.latest_timestamp = init.timestamp
        peer.last_initiation_consumed = now
        peer.handshake_bytes_received += len(data)
        self._counts["initiations_received"] += 1
        if peer.pending is not None and self._public < peer.public_key:
            # Both ends initiated: the smaller key yields (module docstring).
            self._drop_pending(peer)
            self._counts["yielded"] += 1
        self._install(peer, keys, now)
        self._set_endpoint(peer, address)
        self._send_handshake(peer, peer.signer.sign(response), address)
        self._counts["responses_sent"] += 1

    def _on_response(self, data: bytes, address: Any, now: float) -> None:
        assert self._identity is not None
        _, receiver = noise.response_indexes(data)
        peer = self._pending.get(receiver)
        if peer is None or peer.pending is None or peer.pending.state.local_index != receiver:
            return self._refuse("unknown_index", address)
        try:
            keys = noise.consume_response(peer.pending.state, self._identity, data)
        except HandshakeError:
            return self._refuse("decrypt_failure", address)
        self._drop_pending(peer)
        peer.handshake_bytes_received += len(data)
        self._counts["responses_received"] += 1
        self._install(peer, keys, now)
        self._set_endpoint(peer, address)
        # The responder may not send until our first datagram confirms the
        # session: the packets that waited, or a keepalive.
        if not self._flush(peer):
            self._keepalive_now(peer)

    def _on_cookie_reply(self, data: bytes, address: Any) -> None:
        receiver = parse_cookie_reply(data)
        peer = self._pending.get(receiver) if receiver is not None else None
        if peer is None and receiver is not None and receiver in self._sessions:
            peer = self._sessions[receiver].peer
        if peer is None:
            return self._refuse("unknown_index", address)
        if not peer.signer.take_reply(data):
            return self._refuse("bad_cookie", address)
        self._counts["cookies_received"] += 1

    def _on_staged(self, event: Event) -> None:
        peer = self._by_id.get(event.peer) if event.peer is not None else None
        if peer is None or not event.data:
            self._counts["staged_dropped_no_peer"] += 1
            return
        if len(peer.staged) >= self.timers.max_staged:
            peer.staged.popleft()
            self._counts["staged_dropped_overflow"] += 1
        peer.staged.append(event.data)
        self._counts["staged_queued"] += 1
        if peer.current_index is not None:
            self._flush(peer)            # a session became current since C staged it
        if peer.staged:
            self._initiate(peer, "a packet is waiting")

    def _on_renew(self, event: Event) -> None:
        peer = self._by_id.get(event.peer) if event.peer is not None else None
        if peer is None:
            return
        if event.session is not None:
            info = self._sessions.get(event.session)
            # REKEY_AFTER_TIME is the initiator's to act on; a responder
            # rekeys only on the message count (its session is younger).
            if (info is not None and not info.initiator
                    and time.monotonic() - info.created >= self.timers.rekey_after_time):
                self._counts["rekeys_ignored"] += 1
                return
        peer.rekey_wanted = event.session
        self._initiate(peer, "rekey" if event.session is not None else "no session")

    def _on_promoted(self, event: Event) -> None:
        peer = self._by_id.get(event.peer) if event.peer is not None else None
        if peer is None:
            return
        now = time.monotonic()
        peer.current_index = event.session
        info = self._sessions.get(event.session) if event.session is not None else None
        if info is not None and not info.initiator:
            peer.last_handshake_completed = now
            peer.last_handshake_wall = time.time()
            self._counts["completed"] += 1
        self._reconcile(peer)
        self._flush(peer)

    # ------------------------------------------------------------ handshakes

    def _new_index(self) -> int:
        while True:
            index = secrets.randbits(32)
            if index not in self._pending and index not in self._sessions:
                return index

    def _initiate(self, peer: WgPeer, why: str, *, retry: bool = False) -> None:
        """Send an initiation to ``peer`` (a new ephemeral, index and
        timestamp each time).  Not while one is in flight, nor within
        REKEY_TIMEOUT of the last, unless it is the retry itself."""
        if self._identity is None or peer.static_secret is None or not self._running:
            return
        now = time.monotonic()
        if not retry:
            if peer.pending is not None:
                return
            if (peer.last_handshake_sent is not None
                    and now - peer.last_handshake_sent < self.timers.rekey_timeout):
                return
            if self._awaiting_confirmation(peer, now):
                return
        if not peer.has_endpoint:
            return
        endpoint = self.table.info(peer.table_id)["endpoint"]
        if endpoint is None:
            peer.has_endpoint = False
            return
        self._drop_pending(peer, keep_attempt=retry)
        index = self._new_index()
        stamp = noise.tai64n_after(peer.last_timestamp_sent)
        message, state = noise.create_initiation(
            self._identity, peer.public_key, index, psk=peer.psk, timestamp=stamp,
            static_secret=peer.static_secret)
        peer.last_timestamp_sent = stamp
        peer.pending = Pending(state, now)
        self._pending[index] = peer
        if not retry or peer.attempt_started is None:
            peer.attempt_started = now
            log.debug("wireguard: handshake with %s (%s)", self._label(peer), why)
        peer.retransmit_at = now + self.timers.rekey_timeout + random.uniform(
            0, self.timers.rekey_timeout_jitter)
        peer.last_handshake_sent = now
        self._send_handshake(peer, peer.signer.sign(message), endpoint)
        self._counts["initiations_sent"] += 1
        if retry:
            self._counts["retransmits"] += 1

    def _awaiting_confirmation(self, peer: WgPeer, now: float) -> bool:
        """We answered the peer's initiation moments ago and its first
        datagram (which makes that session current) is on its way: a
        handshake of ours now would only demote that session to previous
        and cost both ends a handshake for nothing.  The staged packets go
        on promotion."""
        return any(not s.initiator and index != peer.current_index
                   and now - s.created < self.timers.rekey_timeout
                   for index, s in peer.sessions.items())

    def _drop_pending(self, peer: WgPeer, *, keep_attempt: bool = False) -> None:
        if peer.pending is not None:
            self._pending.pop(peer.pending.state.local_index, None)
        attempt = peer.attempt_started
        peer.forget_handshake()
        if keep_attempt:
            peer.attempt_started = attempt

    def _install(self, peer: WgPeer, keys: noise.Keys, now: float) -> None:
        self.table.install_session(peer.table_id, local_index=keys.local_index,
                                   remote_index=keys.remote_index, send_key=keys.send_key,
                                   recv_key=keys.recv_key, initiator=keys.initiator)
        info = SessionInfo(peer, now, keys.initiator)
        self._sessions[keys.local_index] = info
        peer.sessions[keys.local_index] = info
        if keys.initiator:
            peer.current_index = keys.local_index
            peer.last_handshake_completed = now
            peer.last_handshake_wall = time.time()
            self._counts["completed"] += 1
            log.debug("wireguard: session %08x with %s (we initiated)", keys.local_index,
                      self._label(peer))
        self._reconcile(peer)

    def _reconcile(self, peer: WgPeer) -> None:
        """Forget the sessions the table no longer holds for ``peer``."""
        live = {i for i in self.table.info(peer.table_id)["sessions"].values() if i is not None}
        for index in [i for i in peer.sessions if i not in live]:
            del peer.sessions[index]
            self._sessions.pop(index, None)
        if peer.current_index not in live:
            peer.current_index = None

    def _forget_sessions(self, peer: WgPeer) -> None:
        if peer.sessions or peer.current_index is not None:
            self.table.clear_sessions(peer.table_id)
        for index in peer.sessions:
            self._sessions.pop(index, None)
        peer.sessions.clear()
        peer.current_index = None

    def _set_endpoint(self, peer: WgPeer, address: Any) -> None:
        """An authenticated handshake came from ``address``: the peer is there."""
        current = self.table.info(peer.table_id)["endpoint"]
        if current is None or tuple(current[:2]) != tuple(address[:2]):
            self.table.update(peer.table_id, endpoint=address)
        peer.has_endpoint = True

    # ------------------------------------------------------------ sending

    def _send(self, address: Any, data: bytes) -> bool:
        if not self._pumps:
            return False
        try:
            self._pumps[0].send_control(address, data)
        except OSError as exc:
            self._counts["send_errors"] += 1
            self._rlog.warning("send", "wireguard: sending to %s failed: %s", address, exc)
            return False
        return True

    def _send_handshake(self, peer: WgPeer, message: bytes, address: Any) -> None:
        if self._send(address, message):
            peer.handshake_bytes_sent += len(message)

    def _flush(self, peer: WgPeer) -> bool:
        """Send the packets that waited for a session; True if any went."""
        sent = False
        while peer.staged and self._pumps:
            packet = peer.staged[0]
            try:
                self._pumps[0].send_packet(peer.table_id, packet)
            except PumpStateError:
                return sent                     # no current session after all: they wait
            except (OSError, PumpArgumentError) as exc:
                self._counts["staged_dropped_send_error"] += 1
                self._rlog.warning("send", "wireguard: a staged packet to %s was lost: %s",
                                   self._label(peer), exc)
            else:
                self._counts["staged_sent"] += 1
                sent = True
            peer.staged.popleft()
        return sent

    def _drop_staged(self, peer: WgPeer, counter: str) -> None:
        if peer.staged:
            self._counts[counter] += len(peer.staged)
            peer.staged.clear()

    def _keepalive_now(self, peer: WgPeer) -> None:
        """A keepalive under the current session; with none, a handshake."""
        if peer.current_index is None:
            self._initiate(peer, "keepalive")
            return
        if not self._pumps:
            return
        try:
            self._pumps[0].send_keepalive(peer.table_id)
        except PumpStateError:
            return
        except OSError as exc:
            self._counts["send_errors"] += 1
            self._rlog.warning("send", "wireguard: a keepalive to %s failed: %s",
                               self._label(peer), exc)
            return
        peer.last_keepalive_sent = time.monotonic()
        self._counts["keepalives_sent"] += 1

    # ------------------------------------------------------------ timers

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.timers.tick)
            try:
                self._tick(time.monotonic())
            except Exception:
                log.exception("wireguard: the timer tick failed")

    def _tick(self, now: float) -> None:
        activity = self.table.activity()
        for peer in list(self._peers.values()):
            if not (peer.sessions or peer.pending or peer.staged or peer.persistent_keepalive
                    or peer.rekey_wanted is not None):
                continue        # nothing can be due: the common case of many idle peers
            seen, got, sent = activity.get(peer.table_id, (None, None, None))
            current = peer.sessions.get(peer.current_index) if peer.current_index else None
            clock = PeerClock(
                now=now, last_seen=seen, last_data_received=got, last_data_sent=sent,
                last_keepalive_sent=peer.last_keepalive_sent,
                last_handshake_sent=peer.last_handshake_sent,
                last_handshake_completed=peer.last_handshake_completed,
                attempt_started=peer.attempt_started if peer.pending else None,
                retransmit_at=peer.retransmit_at,
                current_created=current.created if current else None,
                current_initiator=current.initiator if current else False,
                newest_session=max((s.created for s in peer.sessions.values()), default=None),
                has_sessions=bool(peer.sessions), has_endpoint=peer.has_endpoint,
                persistent_keepalive=peer.persistent_keepalive,
                last_initiation_received=peer.last_initiation_consumed,
                unanswered_since=peer.unanswered_since,
                new_handshake_fired=peer.new_handshake_fired)
            # The new-handshake timer moves on every tick (the table only
            # records the newest send: its first unanswered one is seen here).
            peer.unanswered_since = unanswered_since(clock)
            for action in due(clock, self.timers):
                self._act(peer, action, clock)
            if peer.rekey_wanted is not None and peer.rekey_wanted != peer.current_index:
                peer.rekey_wanted = None             # a newer session is current: done
            if peer.pending is None and (peer.rekey_wanted is not None or (
                    peer.staged and peer.current_index is None)):
                # The data path asks for renewal once per session, and packets
                # may wait with no handshake running (a confirmation that
                # never came, a refused response): until it happens, each
                # tick tries (REKEY_TIMEOUT still spaces the initiations).
                self._initiate(peer, "rekey" if peer.rekey_wanted is not None
                               else "packets waiting")

    def _act(self, peer: WgPeer, action: Action, clock: PeerClock) -> None:
        if peer.public_key not in self._peers:
            return
        if action is Action.ZERO:
            self._forget_sessions(peer)
            self._drop_pending(peer)
            self._drop_staged(peer, "staged_dropped_expired")
            self._counts["keys_zeroed"] += 1
        elif action is Action.EXPIRE:
            self._forget_sessions(peer)
            self._counts["sessions_expired"] += 1
        elif action is Action.GIVE_UP:
            log.info("wireguard: no answer from %s for %.0f s: giving up until the next packet",
                     self._label(peer), self.timers.rekey_attempt_time)
            self._drop_pending(peer)
            self._drop_staged(peer, "staged_dropped_gave_up")
            self._stop_new_handshake(peer, clock.now)   # the next data sent starts it
            self._counts["given_up"] += 1
        elif action is Action.RETRANSMIT:
            self._initiate(peer, "retransmit", retry=True)
        elif action is Action.INITIATE:
            why = "timer"
            if new_handshake_due(clock, self.timers):
                # Fired: it runs again from the next data packet sent.
                self._stop_new_handshake(peer, clock.now)
                why = "data sent, nothing received"
            self._initiate(peer, why)
        elif action is Action.KEEPALIVE:
            self._keepalive_now(peer)

    @staticmethod
    def _stop_new_handshake(peer: WgPeer, now: float) -> None:
        peer.unanswered_since = None
        peer.new_handshake_fired = now

    def _label(self, peer: WgPeer) -> str:
        return peer.name or key_to_base64(peer.public_key)[:8] + "..."
