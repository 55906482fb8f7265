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

import ctypes
import errno
import ipaddress
import logging
import os
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from ..aead import HELLO_RECORD_LEN
from ..errors import TransportError
from .lograte import RateLimitedLog

if TYPE_CHECKING:
    from .config import Endpoint, TransportConfig

__all__ = ["open_udp", "open_udp_queues", "TcpClient", "TcpServer", "resolve_peer",
           "resolve_for_socket", "format_sockaddr", "PROOF_DEADLINE_S", "MAX_PROVING"]

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

# Proving (a TCP server given verify, e.g. aead): a connection is the peer
# only once its first record verifies.  Until then it is one of at most
# MAX_PROVING, each closed when PROOF_DEADLINE_S pass without a proof, so an
# idle stranger holds a place briefly and never blocks the real peer; when
# all places are taken the oldest goes (a fresh client sends its proof at
# once, so a crowd of idle strangers cannot push it out).
PROOF_DEADLINE_S = 5.0
MAX_PROVING = 32
# Room for a burst of connections to wait for their turn to prove
# themselves: when the queue is full the kernel drops new SYNs, the real
# client's among them (it retries after 1 s, 3 s, 7 s...).
LISTEN_BACKLOG = 4 * MAX_PROVING
# The length field a hello record must carry (a len16 record).
_HELLO_LENGTH = (HELLO_RECORD_LEN - 2).to_bytes(2, "big")

# accept() failing for want of a resource (EMFILE, ENFILE, ENOBUFS, ENOMEM)
# stays failing while the backlog is not empty: pause accepting, 0.1 s
# doubling to 1 s, rather than spin or give up; it passes.
ACCEPT_BACKOFF_START_S = 0.1
ACCEPT_BACKOFF_CAP_S = 1.0
# Errors of the one connection accept() took (it died in the backlog, or a
# network error Linux passes on: accept(2)): take the next at once.
_ACCEPT_NEXT = frozenset({
    errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT, errno.EHOSTDOWN,
    errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH, errno.EPERM,
    errno.ETIMEDOUT})
# The listener itself is unusable: a bug, not a passing condition.
_ACCEPT_FATAL = frozenset({errno.EBADF, errno.EINVAL, errno.ENOTSOCK, errno.EFAULT})

_WILDCARDS = {"0.0.0.0", "::"}
_LINGER_RESET = struct.pack("ii", 1, 0)  # struct linger {l_onoff=1, l_linger=0}


class _ResolveError(TransportError):
    """A host name did not resolve: worth retrying, unlike other errors."""


class _Unproven(TransportError):
    """The other end did not prove it holds the key: retry, counted."""


class _Plan(NamedTuple):
    family: int
    bind: tuple | None  # sockaddr to bind, None = let the kernel choose
    peer: tuple | None  # sockaddr of the peer, in the form recvfrom reports


# -- addresses ---------------------------------------------------------------

def format_sockaddr(addr: tuple) -> str:
    """Format as 1.2.3.4:5, [::1]:5 or [fe80::1%eth0]:5, for messages.
    The scope of a link-local address is the sockaddr's scope_id (Python
    leaves it out of the host): named where the interface still exists."""
    host, port = addr[0], addr[1]
    if len(addr) == 4 and addr[3] and "%" not in host:
        try:
            scope = socket.if_indextoname(addr[3])
        except OSError:
            scope = str(addr[3])
        host = f"{host}%{scope}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _resolve(ep: Endpoint, socktype: int, what: str) -> list[tuple[int, tuple]]:
    """[(family, sockaddr)] for an endpoint, in getaddrinfo's preference
    order.  A link-local "fe80::1%eth0" comes back with the interface's
    index as scope_id, which the socket calls need (EINVAL without it)."""
    try:
        infos = socket.getaddrinfo(ep.host, ep.port, socket.AF_UNSPEC, socktype)
    except socket.gaierror as exc:
        raise _ResolveError(f"cannot resolve {what} address {ep}: {exc.strerror}"
                            f"{_scope_hint(ep.host)}") from exc
    seen: list[tuple[int, tuple]] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr) not in seen:
            seen.append((family, sockaddr))
    if not seen:
        raise _ResolveError(f"cannot resolve {what} address {ep}: no IPv4 or IPv6 address")
    return seen


def _scope_hint(host: str) -> str:
    """Why "fe80::1%eth9" does not resolve, when the reason is the interface."""
    scope = host.partition("%")[2]
    if not scope or scope.isdigit():
        return ""
    try:
        socket.if_nametoindex(scope)
    except OSError:
        return f" (this host has no interface {scope!r})"
    return ""


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


def resolve_for_socket(ep: Endpoint, sock: socket.socket, what: str) -> tuple:
    """``ep``'s sockaddr in the form ``sock``'s recvfrom reports it, so a
    sender can be compared with ``==`` (a [[peer]] endpoint): an address of
    the socket's own family, else, on a dual-stack IPv6 socket, an IPv4 one
    as ``::ffff:a.b.c.d``."""
    found = _resolve(ep, socket.SOCK_DGRAM, what)
    for family, sockaddr in found:
        if family == sock.family:
            return sockaddr
    if (sock.family == socket.AF_INET6 and sock.getsockname()[0] == "::"
            and not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)):
        for family, sockaddr in found:
            if family == socket.AF_INET:
                return _as_family(socket.AF_INET6, sockaddr)
    local = format_sockaddr(sock.getsockname())
    raise TransportError(f"{what} {ep}: no address this socket ({local}) can reach: expected "
                         f"{'an IPv4' if sock.family == socket.AF_INET else 'an IPv6'} address "
                         f'(listen = "[::]:port" reaches both families)')


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


def _receive_proof(sock: socket.socket, stop: threading.Event) -> bytes | None:
    """The first HELLO_RECORD_LEN bytes the other end sends, and not one
    more (what follows is the tunnel's); None if stopped; _Unproven if they
    do not come within PROOF_DEADLINE_S."""
    deadline = time.monotonic() + PROOF_DEADLINE_S
    record = b""
    while len(record) < HELLO_RECORD_LEN:
        if not _wait_fd(sock.fileno(), select.POLLIN, stop, deadline - time.monotonic()):
            if stop.is_set():
                return None
            raise _Unproven(f"no hello from the server within {PROOF_DEADLINE_S:g} s")
        try:
            data = sock.recv(HELLO_RECORD_LEN - len(record), socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            continue
        if not data:
            raise _Unproven("the server closed the connection before proving itself "
                            "(not an aead server, or it refused us)")
        record += data
    return record


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
        self.log = log or logging.getLogger("tunrelay.daemon.transport")
        # Servers that did not prove themselves (no hello, or a bad one).
        self.counts = {"unproven": 0}

    def connect(self, stop: threading.Event, hello: Callable[[], bytes] | None = None,
                verify: Callable[[bytes], bool] | None = None) -> socket.socket | None:
        """A connected, blocking socket; None as soon as ``stop`` is set.

        Resolution and connection failures are retried (the peer may not be
        up yet); a bad local address (bind failure) is not: TransportError.
        Each failure is logged at WARNING when its reason changes, at DEBUG
        while it repeats, so a long outage does not flood the log.

        With ``hello`` the connection starts with ``hello()``, our first
        record (HELLO_RECORD_LEN bytes: a len16 header and a sealed hello).
        With ``verify`` the server must answer within PROOF_DEADLINE_S with
        a first record of HELLO_RECORD_LEN bytes that ``verify(record)``
        accepts (header included); if not, the connection is closed,
        counted in ``counts["unproven"]`` and retried after the backoff: a
        server that cannot prove it holds the key is not the peer.
        """
        delay = BACKOFF_START_S
        last_reason = None
        self.log.info("connecting to %s", self.cfg.peer)
        while not stop.is_set():
            try:
                sock = self._attempt(_plan(self.cfg, socket.SOCK_STREAM), stop)
                if sock is not None and (hello is not None or verify is not None):
                    sock = self._prove(sock, stop, hello, verify)
            except OSError as exc:
                reason = exc.strerror or str(exc)
            except _Unproven as exc:
                self.counts["unproven"] += 1
                reason = str(exc)
            except _ResolveError as exc:
                reason = str(exc)
            else:
                if sock is None:  # stopped mid-attempt
                    return None
                self.log.info(
                    "connected to %s from %s%s",
                    format_sockaddr(sock.getpeername()), format_sockaddr(sock.getsockname()),
                    " (it proved it holds the key)" if verify is not None else "",
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

    def _prove(self, sock: socket.socket, stop: threading.Event, hello: Callable[[], bytes] | None,
               verify: Callable[[bytes], bool] | None) -> socket.socket | None:
        """Send our hello, check the server's; the socket, or None if
        stopped.  Closes the socket on every other way out."""
        try:
            if hello is not None:
                sock.sendall(hello())
            if verify is None:
                return sock
            record = _receive_proof(sock, stop)
            if record is None:
                sock.close()
                return None
            if record[:2] != _HELLO_LENGTH or not verify(record):
                raise _Unproven("the server's first record did not verify: it does not hold the "
                                "key (or uses another cipher or wire version)")
            return sock
        except BaseException:
            sock.close()
            raise

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


class _Proving:
    """A connection that has yet to send its proof (its first record)."""

    __slots__ = ("sock", "addr", "deadline", "record")

    def __init__(self, sock: socket.socket, addr: tuple, deadline: float) -> None:
        self.sock, self.addr, self.deadline = sock, addr, deadline
        self.record = b""


def _allowed(host: str, networks: tuple) -> bool:
    """Whether a client address lies in one of ``networks`` (() = any).  A
    dual-stack socket reports an IPv4 client as ::ffff:a.b.c.d, which must
    match the IPv4 networks it stands for."""
    if not networks:
        return True
    ip = ipaddress.ip_address(host)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


class TcpServer:
    """Listens and hands out one peer connection at a time.

    Every connection is checked against ``cfg.allow`` first.  Refusals and
    closed connections are counted in ``counts`` and logged at most once per
    kind per 10 s (anyone who reaches the port can cause them):
    ``refused_busy`` (a peer is connected and no proof was asked for),
    ``refused_not_allowed`` (outside ``allow``), ``unproven`` (no valid first
    record in time, or pushed out by newer ones), ``accept_errors`` (accept
    failed for want of a resource; accepting pauses, then resumes).
    """

    def __init__(self, cfg: TransportConfig, log: logging.Logger | None = None) -> None:
        if cfg.listen is None:
            raise TransportError("a TCP server needs a listen address; got none")
        self.cfg = cfg
        self.log = log or logging.getLogger("tunrelay.daemon.transport")
        self._sock: socket.socket | None = None
        self._allow = tuple(cfg.allow)
        self._proving: list[_Proving] = []  # oldest first
        self._accept_delay = 0.0  # the current pause after an accept error, 0 = none
        self._accept_resume = 0.0  # time.monotonic() before which accept is not tried
        self._backlog_left = False  # the last step took its quota: more may be waiting
        self._refusals = RateLimitedLog(self.log)
        self.counts = {"refused_busy": 0, "refused_not_allowed": 0, "unproven": 0,
                       "accept_errors": 0}

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
            sock.setblocking(False)  # poll says when; poll() must not block
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

    def accept(self, stop: threading.Event, verify: Callable[[bytes], bool] | None = None,
               reply: Callable[[], bytes] | None = None) -> socket.socket | None:
        """Wait for the peer: a blocking socket with the TCP options set, or
        None once ``stop`` is set.

        Without ``verify`` the first connection that ``allow`` lets in is the
        peer.  With ``verify`` connections are taken as they come, up to
        MAX_PROVING at once, and each must send within PROOF_DEADLINE_S a
        first record of HELLO_RECORD_LEN bytes: a len16 header saying
        HELLO_RECORD_LEN - 2, then a sealed hello.  The first whose record
        ``verify(record)`` accepts (header included) is the peer; it is sent
        ``reply()`` (our first record, likewise a len16 hello) and returned.
        The others go on proving themselves for poll(), or are closed and
        counted as unproven.  Only the record is read, never the tunnel
        data behind it.
        """
        self._listener()
        while not stop.is_set():
            peer = self._step(stop, verify, reply, POLL_SLICE_S)
            if peer is not None:
                return peer
        return None

    def poll(self, verify: Callable[[bytes], bool] | None = None,
             reply: Callable[[], bytes] | None = None) -> socket.socket | None:
        """One step that never blocks, while a peer is connected.

        With ``verify``: take new connections and read their proofs as
        accept() does; a newly proven connection is returned (the caller
        swaps to it: the newest proven connection wins).  Without: refuse
        every waiting connection (RST), as reject_pending(); returns None.
        """
        if verify is None:
            self.reject_pending()
            return None
        # Called once per supervision slice, not when the listener wakes:
        # take a whole backlog's worth, so a connect flood cannot keep the
        # queue full and the real client's SYN dropped.
        for _ in range(LISTEN_BACKLOG // (MAX_PROVING // 2)):
            peer = self._step(None, verify, reply, 0.0)
            if peer is not None or not self._backlog_left:
                return peer
        return None

    def reject_pending(self) -> int:
        """Refuse every connection waiting in the backlog (one peer at a
        time): each is reset at once, so its client sees ECONNRESET and
        retries later.  Connections left proving themselves are closed too.
        Returns how many were refused or closed."""
        refused = 0
        for entry in list(self._proving):
            self._close_unproven(entry, "a peer is connected and no proof is asked for any more")
            refused += 1
        while (accepted := self._take()) is not None:
            sock, addr = accepted
            self.counts["refused_busy"] += 1  # counted first: whoever sees the RST sees the count
            _reset(sock)
            refused += 1
            self._refusals.warning("busy", "refused connection from %s: a peer is already connected",
                                   format_sockaddr(addr))
        return refused

    # -- the steps -----------------------------------------------------------

    def _step(self, stop: threading.Event | None, verify: Callable[[bytes], bool] | None,
              reply: Callable[[], bytes] | None, timeout: float) -> socket.socket | None:
        """Wait up to ``timeout`` for the listener or a proof, then: read
        the proofs that came (before newcomers can push them out), take new
        connections, close the expired ones.  The peer, or None; sets
        ``_backlog_left`` when more connections may be waiting."""
        ready = self._wait_ready(stop, timeout)
        now = time.monotonic()
        self._backlog_left = False
        for entry in [e for e in self._proving if e.sock.fileno() in ready]:
            if self._read_proof(entry, verify):
                return self._hand_out(entry.sock, entry.addr, reply, proven=True)
        if self._listener().fileno() in ready:
            if verify is None:
                accepted = self._take()
                return None if accepted is None else self._hand_out(*accepted, reply, proven=False)
            # At most half the proving places per step: a proof that was not
            # there yet when its connection was taken is read in the next
            # step, before newcomers could push it out.
            for _ in range(MAX_PROVING // 2):
                accepted = self._take()
                if accepted is None:
                    break
                entry = self._admit(*accepted, now)
                if self._read_proof(entry, verify):  # often sent right behind the handshake
                    return self._hand_out(entry.sock, entry.addr, reply, proven=True)
            else:
                self._backlog_left = True
        for entry in [e for e in self._proving if e.deadline <= now]:
            self._close_unproven(entry, f"no valid first record within {PROOF_DEADLINE_S:g} s")
        return None

    def _wait_ready(self, stop: threading.Event | None, timeout: float) -> set[int]:
        """The fds (listener, proving connections) ready within ``timeout``;
        the listener is left out while accepting is paused."""
        now = time.monotonic()
        fds = [entry.sock.fileno() for entry in self._proving]
        paused = now < self._accept_resume
        if not paused:
            fds.append(self._listener().fileno())
        elif not fds:
            if stop is not None and timeout > 0:
                stop.wait(self._accept_resume - now)  # nothing to watch; stop still ends it
            return set()
        else:
            timeout = min(timeout, self._accept_resume - now)
        if self._proving:
            timeout = min(timeout, max(0.0, min(e.deadline for e in self._proving) - now))
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        return {fd for fd, _ in poller.poll(timeout * 1000)}

    def _take(self) -> tuple[socket.socket, tuple] | None:
        """One connection from the backlog that ``allow`` lets in (the others
        are reset and counted), or None if there is none now."""
        while (accepted := self._accept_nowait()) is not None:
            sock, addr = accepted
            if _allowed(addr[0], self._allow):
                return accepted
            self.counts["refused_not_allowed"] += 1
            _reset(sock)
            self._refusals.warning("not_allowed", "refused connection from %s: not in [transport] allow",
                                   format_sockaddr(addr))
        return None

    def _admit(self, sock: socket.socket, addr: tuple, now: float) -> _Proving:
        if len(self._proving) >= MAX_PROVING:
            self._close_unproven(self._proving[0], f"{MAX_PROVING} connections were proving "
                                 "themselves at once; the oldest is closed")
        sock.setblocking(False)
        entry = _Proving(sock, addr, now + PROOF_DEADLINE_S)
        self._proving.append(entry)
        return entry

    def _read_proof(self, entry: _Proving, verify: Callable[[bytes], bool]) -> bool:
        """Read what has come of ``entry``'s first record; True once it is
        complete and verifies (entry then no longer proving).  A connection
        that fails is closed and counted."""
        try:
            data = entry.sock.recv(HELLO_RECORD_LEN - len(entry.record), socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._close_unproven(entry, f"it failed before proving itself ({exc.strerror})")
            return False
        if not data:
            self._close_unproven(entry, "it closed before proving itself")
            return False
        entry.record += data
        if len(entry.record) < HELLO_RECORD_LEN:
            return False
        try:
            proven = entry.record[:2] == _HELLO_LENGTH and verify(entry.record)
        except BaseException:
            self._close_unproven(entry, "verify failed on its first record")
            raise
        if not proven:
            self._close_unproven(entry, "its first record did not verify (it does not hold the key)")
            return False
        self._proving.remove(entry)
        return True

    def _close_unproven(self, entry: _Proving, reason: str) -> None:
        self._proving.remove(entry)
        self.counts["unproven"] += 1
        _reset(entry.sock)
        self._refusals.warning("unproven", "closed connection from %s: %s",
                               format_sockaddr(entry.addr), reason)

    def _hand_out(self, sock: socket.socket, addr: tuple, reply: Callable[[], bytes] | None,
                  proven: bool) -> socket.socket | None:
        """The peer's socket made blocking with the TCP options, after our
        reply; None (closed, counted) if the client is gone already."""
        try:
            sock.setblocking(True)
            _set_tcp_options(sock)
            if reply is not None:
                sock.sendall(reply())
        except OSError as exc:
            sock.close()
            self.counts["unproven"] += 1
            self._refusals.warning("unproven", "closed connection from %s: it failed before our "
                                   "reply (%s)", format_sockaddr(addr), exc.strerror)
            return None
        except BaseException:
            sock.close()
            raise
        self.log.info("accepted peer %s%s", format_sockaddr(addr),
                      " (it proved it holds the key)" if proven else "")
        return sock

    def _accept_nowait(self) -> tuple[socket.socket, tuple] | None:
        """One connection from the backlog, or None if there is none now or
        accepting is paused after an error."""
        listener = self._listener()
        if time.monotonic() < self._accept_resume:
            return None
        while True:
            try:
                accepted = listener.accept()
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                if exc.errno in _ACCEPT_NEXT:
                    continue  # that one died in the backlog; try the next
                if exc.errno in _ACCEPT_FATAL:
                    raise TransportError(
                        f"accept on {format_sockaddr(listener.getsockname())} failed: {exc.strerror}"
                    ) from exc
                self._pause_accepting(listener, exc)
                return None
            self._accept_delay = 0.0
            return accepted

    def _pause_accepting(self, listener: socket.socket, exc: OSError) -> None:
        """EMFILE and the like: the connection waits in the backlog (its
        client sees nothing yet) while accepting pauses, and is taken when
        descriptors or memory are free again."""
        self._accept_delay = min(max(self._accept_delay * 2, ACCEPT_BACKOFF_START_S),
                                 ACCEPT_BACKOFF_CAP_S)
        self._accept_resume = time.monotonic() + self._accept_delay
        self.counts["accept_errors"] += 1
        self._refusals.warning("accept_error", "accept on %s failed: %s; pausing accepts for %.1f s",
                               format_sockaddr(listener.getsockname()), exc.strerror,
                               self._accept_delay)

    def close(self) -> None:
        """Stop listening and close the connections still proving
        themselves; idempotent.  Handed-out sockets are the caller's."""
        for entry in self._proving:
            entry.sock.close()
        self._proving = []
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


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN (SO_LINGER 0): a clear "refused", and
    no TIME_WAIT left behind for each stranger."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass  # already reset by the other end: close() is all that is left
    sock.close()
