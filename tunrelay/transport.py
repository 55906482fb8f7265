"""Sockets for the relay: UDP, and TCP client/server with reconnection.

Everything here returns sockets the caller owns; nothing reads or writes
packets (that is the pump's job).

Addresses.  Hosts are resolved with getaddrinfo (numeric literals come back
unchanged).  The socket family follows the peer when there is one, else the
listen address.  A wildcard listen address ("0.0.0.0" or "::") fits either
family; an IPv6 socket bound to "::" clears IPV6_V6ONLY so IPv4 peers reach
it too.  Such a socket sees an IPv4 peer as the v4-mapped ``::ffff:a.b.c.d``,
so peer addresses are returned in exactly the form ``recvfrom`` reports for
that socket: ``(host, port)`` for AF_INET, ``(host, port, flowinfo,
scope_id)`` for AF_INET6 (not shortened), and the pump can compare a
sender's address with ``==``.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import select
import socket
import struct
import threading
import ctypes
import time
from typing import TYPE_CHECKING, NamedTuple

from .errors import TransportError

if TYPE_CHECKING:
    from .config import Endpoint, TransportConfig

__all__ = ["open_udp", "open_udp_queues", "TcpClient", "TcpServer", "resolve_peer",
           "format_sockaddr"]

# A burst of 64-packet batches at 1.5 KB is ~100 KB per wake-up; the default
# buffers (~200 KB) overflow as soon as the reader is descheduled for a
# moment, and every overflow is a lost packet.  4 MiB absorbs tens of ms.
# The *FORCE options ignore net.core.[rw]mem_max but need CAP_NET_ADMIN.
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)  # asm-generic/socket.h
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

# A tunnel over TCP must notice a dead peer by itself (no traffic may flow
# for a long time, and a vanished peer never sends a FIN): keepalive probes
# after 10 s idle, every 5 s, 3 misses; and unacknowledged data fails the
# connection after 30 s.  Either way, about half a minute, then reconnect.
TCP_KEEPIDLE_S = 10
TCP_KEEPINTVL_S = 5
TCP_KEEPCNT = 3
TCP_USER_TIMEOUT_MS = 30_000

# Reconnection: quick at first (a restarting peer is back in well under a
# second), capped so that a long outage costs one attempt every ~5 s.
BACKOFF_START_S = 0.1
BACKOFF_CAP_S = 5.0
BACKOFF_JITTER = 0.1  # up to +10 %, so many clients do not retry in lockstep
CONNECT_TIMEOUT_S = 10.0  # one attempt; the SYN retries would take minutes
POLL_SLICE_S = 0.2  # how long a wait may go without looking at the stop event
LISTEN_BACKLOG = 8

_WILDCARDS = {"0.0.0.0", "::"}
_LINGER_RESET = struct.pack("ii", 1, 0)  # struct linger {l_onoff=1, l_linger=0}


class _ResolveError(TransportError):
    """A host name did not resolve: worth retrying, unlike other errors."""


class _Plan(NamedTuple):
    family: int
    bind: tuple | None  # sockaddr to bind, None = let the kernel choose
    peer: tuple | None  # sockaddr of the peer, in the form recvfrom reports


# -- addresses ---------------------------------------------------------------

def format_sockaddr(addr: tuple) -> str:
    """Format as 1.2.3.4:5 or [::1]:5, for messages."""
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _resolve(ep: Endpoint, socktype: int, what: str) -> list[tuple[int, tuple]]:
    """[(family, sockaddr)] for an endpoint, in getaddrinfo's preference order."""
    try:
        infos = socket.getaddrinfo(ep.host, ep.port, socket.AF_UNSPEC, socktype)
    except socket.gaierror as exc:
        raise _ResolveError(f"cannot resolve {what} address {ep}: {exc.strerror}") from exc
    seen: list[tuple[int, tuple]] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr) not in seen:
            seen.append((family, sockaddr))
    if not seen:
        raise _ResolveError(f"cannot resolve {what} address {ep}: no IPv4 or IPv6 address")
    return seen


def _is_wildcard(sockaddr: tuple) -> bool:
    return sockaddr[0] in _WILDCARDS


def _as_family(family: int, sockaddr: tuple) -> tuple:
    """The sockaddr as a socket of ``family`` uses it (IPv4 -> v4-mapped)."""
    if family == socket.AF_INET6 and len(sockaddr) == 2:
        host = "::" if sockaddr[0] == "0.0.0.0" else f"::ffff:{sockaddr[0]}"
        return (host, sockaddr[1], 0, 0)
    return sockaddr


def _plan(cfg: TransportConfig, socktype: int) -> _Plan:
    """Choose family, bind address and peer address for a socket.

    The peer decides the family; a listen address must be of the same
    family, or a wildcard (then it becomes the wildcard of the peer's
    family).  A listen on "::" keeps AF_INET6 even for an IPv4 peer.
    """
    listen = _resolve(cfg.listen, socktype, "listen") if cfg.listen is not None else None
    peer = _resolve(cfg.peer, socktype, "peer") if cfg.peer is not None else None
    if peer is None:
        if listen is None:
            raise TransportError("expected a listen address, a peer address or both; got neither")
        family, bind = listen[0]
        return _Plan(family, bind, None)
    if listen is None:
        family, peer_addr = peer[0]
        return _Plan(family, None, peer_addr)
    for listen_family, bind in listen:
        if listen_family == socket.AF_INET6 and bind[0] == "::":
            # Dual-stack wildcard: reaches any peer; an IPv4 peer is mapped.
            return _Plan(socket.AF_INET6, bind, _as_family(socket.AF_INET6, peer[0][1]))
        for peer_family, peer_addr in peer:
            if peer_family == listen_family:
                return _Plan(peer_family, bind, peer_addr)
            if _is_wildcard(bind):
                return _Plan(peer_family, _as_family(peer_family, bind), peer_addr)
    raise TransportError(
        f"listen address {cfg.listen} and peer address {cfg.peer} are of different "
        f"address families: expected both IPv4 or both IPv6 (or a wildcard listen address)"
    )


def resolve_peer(cfg: TransportConfig, socktype: int = socket.SOCK_DGRAM) -> tuple | None:
    """The peer's sockaddr in the form a socket opened for ``cfg`` reports it."""
    return _plan(cfg, socktype).peer


# -- socket set-up -------------------------------------------------------------

def _new_socket(family: int, socktype: int) -> socket.socket:
    sock = socket.socket(family, socktype | socket.SOCK_CLOEXEC)
    try:
        _size_buffers(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def _size_buffers(sock: socket.socket) -> None:
    """SOCKET_BUFFER_BYTES each way: forced if privileged, else as much as
    net.core.[rw]mem_max allows (the kernel caps silently)."""
    for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER_BYTES)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER_BYTES)


def _bind(sock: socket.socket, addr: tuple) -> None:
    """Bind, dual-stack on "::"; the common failures in plain words."""
    if sock.family == socket.AF_INET6 and addr[0] == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.bind(addr)
    except OSError as exc:
        where = format_sockaddr(addr)
        if exc.errno == errno.EADDRINUSE:
            message = f"address {where} is in use"
        elif exc.errno == errno.EADDRNOTAVAIL:
            message = f"address {where} is not an address of this host (no interface has it)"
        elif exc.errno == errno.EACCES:
            message = f"address {where}: ports below 1024 need root or CAP_NET_BIND_SERVICE"
        else:
            message = f"cannot bind address {where}: {exc.strerror}"
        raise TransportError(message) from exc


def _set_tcp_options(sock: socket.socket) -> None:
    """No Nagle delay (each write is a packet), and dead-peer detection."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, TCP_KEEPIDLE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, TCP_KEEPINTVL_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, TCP_KEEPCNT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, TCP_USER_TIMEOUT_MS)


def _wait_fd(fd: int, events: int, stop: threading.Event, timeout: float | None) -> bool:
    """Poll ``fd`` in short slices until ready (True), ``stop`` is set or the
    timeout passes (False)."""
    poller = select.poll()
    poller.register(fd, events)
    deadline = None if timeout is None else time.monotonic() + timeout
    while not stop.is_set():
        slice_s = POLL_SLICE_S
        if deadline is not None:
            slice_s = min(slice_s, deadline - time.monotonic())
            if slice_s <= 0:
                return False
        if poller.poll(slice_s * 1000):
            return True
    return False


# -- UDP -------------------------------------------------------------------------

def open_udp(cfg: TransportConfig, *, reuse_port: bool = False) -> tuple[socket.socket, tuple | None]:
    """A bound, unconnected UDP socket and the peer's sockaddr (None: to be
    learned from the first datagram).

    Not connected, so datagrams from other senders still arrive and the pump
    can count them.  With no listen address the socket is bound to the
    wildcard and an ephemeral port.  ``reuse_port`` lets one socket per TUN
    queue share the listen address (SO_REUSEPORT).
    """
    plan = _plan(cfg, socket.SOCK_DGRAM)
    sock = _new_socket(plan.family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        wildcard = "::" if plan.family == socket.AF_INET6 else "0.0.0.0"
        _bind(sock, plan.bind or (wildcard, 0))
    except BaseException:
        sock.close()
        raise
    return sock, plan.peer


# -- TCP -------------------------------------------------------------------------

# SO_REUSEPORT spreads datagrams over a group of sockets by a hash of the
# 4-tuple, and a tunnel has exactly one: every datagram would land in one
# queue.  A classic BPF program attached to the group picks the socket by
# the CPU that received the datagram instead (index = cpu % sockets), so
# each queue's pump takes the traffic its CPU handles.
SO_ATTACH_REUSEPORT_CBPF = 51  # asm-generic/socket.h
_BPF_LD_W_ABS, _BPF_ALU_MOD_K, _BPF_RET_A = 0x20, 0x94, 0x16  # linux/bpf_common.h
_SKF_AD_CPU = (-0x1000 + 36) & 0xFFFFFFFF  # SKF_AD_OFF + SKF_AD_CPU (linux/filter.h)


def _steer_by_cpu(sock: socket.socket, sockets: int) -> None:
    program = (ctypes.c_uint8 * 24)()
    struct.pack_into("HBBI HBBI HBBI", program, 0,
                     _BPF_LD_W_ABS, 0, 0, _SKF_AD_CPU,
                     _BPF_ALU_MOD_K, 0, 0, sockets,
                     _BPF_RET_A, 0, 0, 0)
    fprog = struct.pack("H6xQ", 3, ctypes.addressof(program))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def open_udp_queues(cfg: TransportConfig, queues: int) -> tuple[list[socket.socket], tuple | None]:
    """``queues`` UDP sockets sharing the listen address (SO_REUSEPORT), one
    per TUN queue, steered by CPU; and the peer.  One queue: open_udp()."""
    if queues == 1:
        sock, peer = open_udp(cfg)
        return [sock], peer
    socks: list[socket.socket] = []
    try:
        for _ in range(queues):
            sock, peer = open_udp(cfg, reuse_port=True)
            socks.append(sock)
        try:
            _steer_by_cpu(socks[0], queues)
        except OSError as exc:
            raise TransportError(f"cannot steer {queues} queues by CPU "
                                 f"(SO_ATTACH_REUSEPORT_CBPF: {exc.strerror})") from exc
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks, peer


class TcpClient:
    """Connects to the peer, retrying with capped exponential backoff."""

    def __init__(self, cfg: TransportConfig, log: logging.Logger | None = None) -> None:
        if cfg.peer is None:
            raise TransportError("a TCP client needs a peer address; got none")
        self.cfg = cfg
        self.log = log or logging.getLogger("tunrelay.transport")

    def connect(self, stop: threading.Event) -> socket.socket | None:
        """A connected, blocking socket; None as soon as ``stop`` is set.

        Resolution and connection failures are retried (the peer may not be
        up yet); a bad local address (bind failure) is not: TransportError.
        Each failure is logged at WARNING when its reason changes, at DEBUG
        while it repeats, so a long outage does not flood the log.
        """
        delay = BACKOFF_START_S
        last_reason = None
        self.log.info("connecting to %s", self.cfg.peer)
        while not stop.is_set():
            try:
                sock = self._attempt(_plan(self.cfg, socket.SOCK_STREAM), stop)
            except OSError as exc:
                reason = exc.strerror or str(exc)
            except _ResolveError as exc:
                reason = str(exc)
            else:
                if sock is None:  # stopped mid-attempt
                    return None
                self.log.info(
                    "connected to %s from %s",
                    format_sockaddr(sock.getpeername()), format_sockaddr(sock.getsockname()),
                )
                return sock
            wait = delay * (1 + random.uniform(0, BACKOFF_JITTER))
            level = logging.WARNING if reason != last_reason else logging.DEBUG
            self.log.log(level, "connect to %s failed: %s, retrying in %.1f s", self.cfg.peer, reason, wait)
            last_reason = reason
            if stop.wait(wait):
                return None
            delay = min(delay * 2, BACKOFF_CAP_S)
        return None

    def _attempt(self, plan: _Plan, stop: threading.Event) -> socket.socket | None:
        """One non-blocking connect; OSError on failure, None if stopped."""
        sock = _new_socket(plan.family, socket.SOCK_STREAM)
        try:
            _set_tcp_options(sock)
            if plan.bind is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                _bind(sock, plan.bind)
            sock.setblocking(False)
            err = sock.connect_ex(plan.peer)
            if err == errno.EINPROGRESS:
                if not _wait_fd(sock.fileno(), select.POLLOUT, stop, CONNECT_TIMEOUT_S):
                    if stop.is_set():
                        sock.close()
                        return None
                    raise OSError(errno.ETIMEDOUT, f"no answer within {CONNECT_TIMEOUT_S:g} s")
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            sock.setblocking(True)
            return sock
        except BaseException:
            sock.close()
            raise


class TcpServer:
    """Listens and hands out one peer connection at a time."""

    def __init__(self, cfg: TransportConfig, log: logging.Logger | None = None) -> None:
        if cfg.listen is None:
            raise TransportError("a TCP server needs a listen address; got none")
        self.cfg = cfg
        self.log = log or logging.getLogger("tunrelay.transport")
        self._sock: socket.socket | None = None

    def open(self) -> None:
        """Bind and listen; TransportError if the address is unusable."""
        if self._sock is not None:
            raise TransportError("the TCP server is already open")
        plan = _plan(self.cfg, socket.SOCK_STREAM)
        sock = _new_socket(plan.family, socket.SOCK_STREAM)
        try:
            # Restarting must not wait for the old connections' TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            _bind(sock, plan.bind)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)  # poll says when; reject_pending must not block
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.log.info("listening on %s (tcp)", format_sockaddr(sock.getsockname()))

    @property
    def address(self) -> tuple:
        """The bound sockaddr (useful with port 0)."""
        return self._listener().getsockname()

    def fileno(self) -> int:
        return self._listener().fileno()

    def accept(self, stop: threading.Event) -> socket.socket | None:
        """Wait for one connection: a blocking socket with the TCP options
        set, or None once ``stop`` is set."""
        listener = self._listener()
        while _wait_fd(listener.fileno(), select.POLLIN, stop, None):
            accepted = self._accept_nowait()
            if accepted is None:
                continue  # the client gave up between poll and accept
            sock, addr = accepted
            try:
                sock.setblocking(True)
                _set_tcp_options(sock)
            except BaseException:
                sock.close()
                raise
            self.log.info("accepted peer %s", format_sockaddr(addr))
            return sock
        return None

    def reject_pending(self) -> int:
        """Refuse every connection waiting in the backlog (one peer at a
        time): each is reset at once, so its client sees ECONNRESET and
        retries later.  Returns how many were refused."""
        refused = 0
        while (accepted := self._accept_nowait()) is not None:
            sock, addr = accepted
            # SO_LINGER 0: close with RST instead of FIN, a clear "refused".
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.close()
            refused += 1
            self.log.warning("refused connection from %s: a peer is already connected", format_sockaddr(addr))
        return refused

    def _accept_nowait(self) -> tuple[socket.socket, tuple] | None:
        """One connection from the backlog, or None if there is none now."""
        listener = self._listener()
        while True:
            try:
                return listener.accept()
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # that one died in the backlog; try the next
                raise TransportError(
                    f"accept on {format_sockaddr(listener.getsockname())} failed: {exc.strerror}"
                ) from exc

    def close(self) -> None:
        """Stop listening; idempotent.  Accepted sockets are the caller's."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> TcpServer:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _listener(self) -> socket.socket:
        if self._sock is None:
            raise TransportError("the TCP server is not open: call open() first")
        return self._sock
