"""The cross-platform userspace API (wireguard.com/xplatform): what ``wg``
and ``wg-quick`` speak to a userspace WireGuard daemon over a UNIX socket.

A connection carries requests, one after the other:

- ``get=1\\n\\n``: the reply is the device's state as ``key=value`` lines,
  then ``errno=0\\n\\n``;
- ``set=1\\n`` + ``key=value`` lines + ``\\n``: the reply is ``errno=N\\n\\n``.

Everything a script can see is written as wireguard-go writes it (checked
against a live wireguard-go, tests/data/wg/uapi_wireguard_go.txt): the key
order, hex keys, the clamped private key, ``[v6]:port`` endpoints, one
``allowed_ip`` per prefix, and *negative* errnos: -22 (EINVAL) for an
unknown key or a bad value, -71 (EPROTO) for a line without ``=``, -98
(EADDRINUSE) when the port (or fwmark) cannot be bound, -5 (EIO) for input
that cannot be read, -55 for anything else.  An unknown operation closes the
connection without a reply.

A set is applied line by line inside one ``device.batch()``.  Like
wireguard-go, a set that fails part-way keeps what its earlier lines did
(wireguard-go applies each line as it reads it and returns at the first
error; nothing is rolled back), replies with the error and then closes the
connection (wireguard-go would read the rest of the request as the next
operation, which it refuses by closing).

Input is bounded: a line has at most ``line_limit`` bytes (64 KiB, like
wireguard-go's line scanner; a longer line is -5), a set request at most
``request_limit`` bytes (also -5: what came before the cut is applied, as
for a long line), a request must arrive within ``timeout`` seconds (else
the connection is closed and nothing of it applied), and at most
``max_clients`` connections are served at once.  Each connection is its
own task and the state is changed only between two awaits, so a slow or
hostile client never holds the device or delays another client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno as _errno
import ipaddress
import logging
import math
import os
import re
import socket
import stat
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "SOCKET_DIR", "UapiError", "UapiDevice", "UapiServer", "open_uapi_socket",
    "socket_path", "render_get", "apply_set", "parse_endpoint", "format_endpoint",
    "parse_prefix", "format_prefix",
]

SOCKET_DIR = "/var/run/wireguard"

# wireguard-go's codes (ipc/uapi_unix.go), written negated on the wire.
EIO = _errno.EIO                  # input that cannot be read
EPROTO = _errno.EPROTO            # a line without "="
EINVAL = _errno.EINVAL            # unknown key, bad value
EADDRINUSE = _errno.EADDRINUSE    # listen_port / fwmark cannot be bound
EOTHER = 55                       # anything else ("other UAPI error")

LINE_LIMIT = 64 * 1024            # bytes in one line, newline included
REQUEST_LIMIT = 8 * 1024 * 1024   # bytes in one set request (~30,000 peers)
CLIENT_TIMEOUT = 15.0             # seconds for a request to arrive whole
MAX_CLIENTS = 16
MAX_PEERS = 1 << 16               # wireguard-go's MaxPeers

_KEY_SIZE = 32
_ZERO_KEY = bytes(_KEY_SIZE)
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_DIGITS = re.compile(r"[0-9]+")
_BITS = re.compile(r"0|[1-9][0-9]{0,2}")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

log = logging.getLogger("tunrelay.wireguard.uapi")


class UapiError(Exception):
    """A request the daemon refuses: ``errno`` (positive; written negated)."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


class _Status(Protocol):
    """What a get shows of a peer (device.PeerStatus has these and more)."""

    @property
    def preshared_key(self) -> bytes | None: ...
    @property
    def endpoint(self) -> tuple[str, int] | None: ...
    @property
    def last_handshake(self) -> float | None: ...
    @property
    def tx_bytes(self) -> int: ...
    @property
    def rx_bytes(self) -> int: ...
    @property
    def persistent_keepalive(self) -> int: ...
    @property
    def allowed_ips(self) -> Sequence[IPNetwork]: ...


class UapiDevice(Protocol):
    """The part of WireGuardDevice (tunrelay/wireguard/device.py) used here."""

    @property
    def private_key(self) -> bytes | None: ...
    @property
    def public_key(self) -> bytes | None: ...
    @property
    def listen_port(self) -> int: ...
    @property
    def fwmark(self) -> int: ...
    def set_private_key(self, key: bytes | None) -> None: ...
    def set_listen_port(self, port: int) -> None: ...
    def set_fwmark(self, mark: int) -> None: ...
    def peers(self) -> list[bytes]: ...
    def add_peer(self, public_key: bytes, name: str | None = None) -> None: ...
    def remove_peer(self, public_key: bytes) -> None: ...
    def remove_all_peers(self) -> None: ...
    # Each keyword left out is kept (the device's KEEP default).
    def set_peer(self, public_key: bytes, *, preshared_key: Any = ..., endpoint: Any = ...,
                 persistent_keepalive: Any = ..., allowed_ips: Any = ...,
                 add_allowed_ips: Any = ...) -> None: ...
    def batch(self) -> AbstractContextManager[None]: ...
    def peer_status(self, public_key: bytes) -> _Status: ...


# ---------------------------------------------------------------- values

def _uint(text: str, bits: int, what: str) -> int:
    """A decimal unsigned integer as Go's strconv.ParseUint(text, 10, bits):
    digits only (no sign, space, underscore), leading zeros allowed."""
    if not _DIGITS.fullmatch(text):
        raise UapiError(EINVAL, f"{what}: expected a decimal number, got {text!r}")
    digits = text.lstrip("0") or "0"
    if len(digits) > 20 or int(digits) >= 1 << bits:
        raise UapiError(EINVAL, f"{what}: {text} is out of range (0..{(1 << bits) - 1})")
    return int(digits)


def _hex_key(text: str, what: str) -> bytes:
    if not _HEX_KEY.fullmatch(text):
        raise UapiError(EINVAL, f"{what}: expected 64 hex digits, got {text[:80]!r}")
    return bytes.fromhex(text)


def _true(value: str, key: str) -> None:
    if value != "true":
        raise UapiError(EINVAL, f"{key}: the only value is 'true', got {value!r}")


def clamp(key: bytes) -> bytes:
    """An X25519 private key as it is used (and as wireguard-go shows it)."""
    raw = bytearray(key)
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return bytes(raw)


def _format_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    # Go writes an IPv4-mapped IPv6 address as ::ffff:a.b.c.d; Python would
    # write ::ffff:a0b:c0d.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return str(ip)


def parse_endpoint(text: str) -> tuple[str, int]:
    """``a.b.c.d:port`` or ``[v6]:port`` (``[v6%zone]:port``), as Go's
    netip.ParseAddrPort: no host names, the brackets exactly for IPv6."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise UapiError(EINVAL, f"endpoint {text!r}: expected ADDRESS:PORT")
    port = _uint(port_text, 16, f"endpoint {text!r}: port")
    try:
        if host.startswith("[") and host.endswith("]"):
            address, percent, zone = host[1:-1].partition("%")
            if percent and not zone:
                raise ValueError("empty zone")
            ip6 = ipaddress.IPv6Address(address)
            return _format_ip(ip6) + (f"%{zone}" if percent else ""), port
        return str(ipaddress.IPv4Address(host)), port
    except ValueError as exc:
        raise UapiError(EINVAL, f"endpoint {text!r}: expected a.b.c.d:port or "
                                f"[v6]:port ({exc})") from None


def format_endpoint(endpoint: tuple[str, int]) -> str:
    host, port = endpoint
    address, percent, zone = host.partition("%")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"{host}:{port}"
    if ip.version == 6:
        return f"[{_format_ip(ip)}{percent}{zone}]:{port}"
    return f"{ip}:{port}"


def parse_prefix(text: str) -> IPNetwork:
    """``address/bits`` as Go's netip.ParsePrefix: the bits are required and
    plain decimal, no zone; host bits are allowed and masked off."""
    address, sep, bits_text = text.partition("/")
    if not sep or "%" in address or not _BITS.fullmatch(bits_text):
        raise UapiError(EINVAL, f"allowed_ip {text!r}: expected ADDRESS/BITS")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError as exc:
        raise UapiError(EINVAL, f"allowed_ip {text!r}: {exc}") from None
    bits = int(bits_text)
    if bits > ip.max_prefixlen:
        raise UapiError(EINVAL, f"allowed_ip {text!r}: at most /{ip.max_prefixlen}")
    return ipaddress.ip_network((ip, bits), strict=False)


def format_prefix(network: IPNetwork) -> str:
    return f"{_format_ip(network.network_address)}/{network.prefixlen}"


# ---------------------------------------------------------------- get

def render_get(device: UapiDevice) -> bytes:
    """The reply to ``get=1``, ``errno=0`` and the empty line included."""
    out: list[str] = []
    private = device.private_key
    if private is not None and private != _ZERO_KEY:
        out.append(f"private_key={private.hex()}")
    if device.listen_port:
        out.append(f"listen_port={device.listen_port}")
    if device.fwmark:
        out.append(f"fwmark={device.fwmark}")
    for key in device.peers():
        status = device.peer_status(key)
        out.append(f"public_key={key.hex()}")
        out.append(f"preshared_key={(status.preshared_key or _ZERO_KEY).hex()}")
        out.append("protocol_version=1")
        if status.endpoint is not None:
            out.append(f"endpoint={format_endpoint(status.endpoint)}")
        seconds, nanoseconds = _split_time(status.last_handshake)
        out.append(f"last_handshake_time_sec={seconds}")
        out.append(f"last_handshake_time_nsec={nanoseconds}")
        out.append(f"tx_bytes={status.tx_bytes}")
        out.append(f"rx_bytes={status.rx_bytes}")
        out.append(f"persistent_keepalive_interval={status.persistent_keepalive}")
        out.extend(f"allowed_ip={format_prefix(net)}" for net in status.allowed_ips)
    out.append("errno=0")
    return ("\n".join(out) + "\n\n").encode()


def _split_time(when: float | None) -> tuple[int, int]:
    if not when:
        return 0, 0
    seconds = math.floor(when)
    return seconds, min(999_999_999, int((when - seconds) * 1e9))


# ---------------------------------------------------------------- set

@dataclass
class _Peer:
    """The peer the following lines configure (wireguard-go's ipcSetPeer)."""
    key: bytes
    dummy: bool      # lines are checked, not applied: ourselves, removed, update_only
    created: bool    # by this public_key line


class _Setter:
    """Applies the lines of one set request, each as it comes."""

    def __init__(self, device: UapiDevice) -> None:
        self.device = device
        self.peer: _Peer | None = None    # None: device lines
        self._known: set[bytes] | None = None
        self._adds: list[IPNetwork] = []  # allowed_ip lines not yet handed over

    @property
    def known(self) -> set[bytes]:
        # Built once per request: peers() per public_key line would make a
        # set of n peers cost n^2.
        if self._known is None:
            self._known = set(self.device.peers())
        return self._known

    def line(self, line: str) -> None:
        key, sep, value = line.partition("=")
        if not sep:
            raise UapiError(EPROTO, f"a line is key=value, got {line[:80]!r}")
        if key == "public_key":
            self.flush()
            self._select(value)
        elif self.peer is None:
            self._device_line(key, value)
        else:
            if key != "allowed_ip":
                self.flush()
            self._peer_line(self.peer, key, value)

    def flush(self) -> None:
        """Hand buffered allowed_ip lines to the device in one call."""
        if self._adds and self.peer is not None:
            adds, self._adds = self._adds, []
            self._call(self.device.set_peer, self.peer.key, add_allowed_ips=adds)

    def _call(self, function: Any, *args: Any, bind: bool = False, **kw: Any) -> Any:
        try:
            return function(*args, **kw)
        except UapiError:
            raise
        except OSError as exc:
            if bind:  # wireguard-go answers EADDRINUSE for any bind failure
                raise UapiError(EADDRINUSE, f"cannot bind: {exc}") from exc
            raise UapiError(EOTHER, f"{getattr(function, '__name__', function)}: {exc}") from exc
        except ValueError as exc:
            raise UapiError(EINVAL, str(exc)) from exc

    def _device_line(self, key: str, value: str) -> None:
        device = self.device
        if key in _DEVICE_VERBS:
            log.debug("UAPI: %s", _DEVICE_VERBS[key])
        if key == "private_key":
            raw = _hex_key(value, "private_key")
            new = None if raw == _ZERO_KEY else clamp(raw)
            if new != device.private_key:
                self._call(device.set_private_key, new)
                # Like wireguard-go: a peer with our own public key goes.
                public = device.public_key
                if public is not None and public in self.known:
                    self._call(device.remove_peer, public)
                    self.known.discard(public)
        elif key == "listen_port":
            self._call(device.set_listen_port, _uint(value, 16, "listen_port"), bind=True)
        elif key == "fwmark":
            self._call(device.set_fwmark, _uint(value, 32, "fwmark"), bind=True)
        elif key == "replace_peers":
            _true(value, key)
            self._call(device.remove_all_peers)
            self._known = set()
        else:
            raise UapiError(EINVAL, f"unknown device key {key[:80]!r}")

    def _select(self, value: str) -> None:
        key = _hex_key(value, "public_key")
        if key == self.device.public_key:
            self.peer = _Peer(key, dummy=True, created=False)
            return
        created = key not in self.known
        if created:
            if len(self.known) >= MAX_PEERS:
                raise UapiError(EINVAL, f"too many peers (at most {MAX_PEERS})")
            self._call(self.device.add_peer, key)
            self.known.add(key)
            log.debug("%s - UAPI: Created", _label(key))
        self.peer = _Peer(key, dummy=False, created=created)

    def _remove(self, peer: _Peer) -> None:
        if not peer.dummy:
            self._call(self.device.remove_peer, peer.key)
            self.known.discard(peer.key)
        peer.dummy = True

    def _peer_line(self, peer: _Peer, key: str, value: str) -> None:
        set_peer = self.device.set_peer
        if key in _PEER_VERBS and key != "allowed_ip" and log.isEnabledFor(logging.DEBUG):
            log.debug("%s - UAPI: %s", _label(peer.key), _PEER_VERBS[key])
        if key == "update_only":
            _true(value, key)
            if peer.created:
                self._remove(peer)
        elif key == "remove":
            _true(value, key)
            self._remove(peer)
        elif key == "preshared_key":
            raw = _hex_key(value, "preshared_key")
            if not peer.dummy:
                self._call(set_peer, peer.key, preshared_key=None if raw == _ZERO_KEY else raw)
        elif key == "endpoint":
            endpoint = parse_endpoint(value)
            if not peer.dummy:
                self._call(set_peer, peer.key, endpoint=endpoint)
        elif key == "persistent_keepalive_interval":
            seconds = _uint(value, 16, "persistent_keepalive_interval")
            if not peer.dummy:
                self._call(set_peer, peer.key, persistent_keepalive=seconds)
        elif key == "replace_allowed_ips":
            _true(value, key)
            if not peer.dummy:
                self._call(set_peer, peer.key, allowed_ips=())
        elif key == "allowed_ip":
            # "-PREFIX" removes one (wireguard-go since v0.0.20250522).
            remove = value.startswith("-")
            network = parse_prefix(value[1:] if remove else value)
            if peer.dummy:
                return
            if not remove:
                self._adds.append(network)
                return
            self.flush()
            status = self._call(self.device.peer_status, peer.key)
            kept = [n for n in status.allowed_ips if n != network]
            if len(kept) != len(status.allowed_ips):
                self._call(set_peer, peer.key, allowed_ips=kept)
        elif key == "protocol_version":
            if value != "1":
                raise UapiError(EINVAL, f"protocol_version: only 1 exists, got {value[:20]!r}")
        else:
            raise UapiError(EINVAL, f"unknown peer key {key[:80]!r}")


# What LOG_LEVEL=verbose shows of a set, in wireguard-go's words.
_DEVICE_VERBS = {"private_key": "Updating private key", "listen_port": "Updating listen port",
                 "fwmark": "Updating fwmark", "replace_peers": "Removing all peers"}
_PEER_VERBS = {"remove": "Removing", "preshared_key": "Updating preshared key",
               "endpoint": "Updating endpoint",
               "persistent_keepalive_interval": "Updating persistent keepalive interval",
               "replace_allowed_ips": "Removing all allowedips"}


def _label(key: bytes) -> str:
    """A peer as wireguard-go's log names it: peer(ABCD…WXYZ)."""
    text = base64.b64encode(key).decode()
    return f"peer({text[:4]}…{text[39:43]})"


def apply_set(device: UapiDevice, lines: Iterable[str]) -> UapiError | None:
    """Apply the lines of a set request (without ``set=1`` and the empty
    line) in one ``device.batch()``.  Returns the error that stopped it, or
    None; what the lines before the error did stays done, as in wireguard-go
    (and the batch is published: it is left normally)."""
    setter = _Setter(device)
    with device.batch():
        try:
            for line in lines:
                setter.line(line)
            setter.flush()
        except UapiError as exc:
            # wireguard-go has applied every allowed_ip before the bad line.
            with contextlib.suppress(UapiError):
                setter.flush()
            return exc
        except Exception as exc:  # a bug or a device failure: answer, keep serving
            log.exception("set failed")
            return UapiError(EOTHER, f"other UAPI error: {exc}")
    return None


# ---------------------------------------------------------------- the socket

def socket_path(ifname: str, directory: str = SOCKET_DIR) -> str:
    return os.path.join(directory, f"{ifname}.sock")


class SocketInUse(OSError):
    """Another daemon answers on the UAPI socket."""


def open_uapi_socket(ifname: str, directory: str = SOCKET_DIR) -> socket.socket:
    """The listening socket ``directory/IFNAME.sock``: the directory is
    created 0755, the socket under umask 077 (so srwx------, root's only,
    as wireguard-go's).  A
    socket there that answers a connect belongs to a live daemon: refuse
    (SocketInUse); one that does not is stale: remove it."""
    path = socket_path(ifname, directory)
    if len(os.fsencode(path)) >= 108:
        raise OSError(_errno.ENAMETOOLONG, f"UAPI socket path {path!r} is too long")
    if not os.path.isdir(directory):
        os.makedirs(directory, exist_ok=True)
        os.chmod(directory, 0o755)
    old_umask = os.umask(0o077)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(path)
        except OSError as exc:
            if exc.errno != _errno.EADDRINUSE:
                raise
            _remove_stale(path)
            sock.bind(path)
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    return sock


def _remove_stale(path: str) -> None:
    mode = os.lstat(path).st_mode
    if not stat.S_ISSOCK(mode):
        raise OSError(_errno.EEXIST, f"{path} exists and is not a socket; remove it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: left by a daemon that died
            return
    raise SocketInUse(_errno.EADDRINUSE, f"{path} is in use: another daemon serves this "
                                         "interface")


class UapiServer:
    """Serves the UAPI on a listening socket (from ``open_uapi_socket``)
    for ``device``, in the running event loop.  ``close()`` stops it, ends
    its connections and removes the socket file if it is still ours."""

    def __init__(self, device: UapiDevice, sock: socket.socket, *,
                 line_limit: int = LINE_LIMIT, request_limit: int = REQUEST_LIMIT,
                 timeout: float = CLIENT_TIMEOUT, max_clients: int = MAX_CLIENTS,
                 logger: logging.Logger | None = None) -> None:
        self.device = device
        self.sock = sock
        self.path: str = sock.getsockname()
        self._inode = _inode(self.path)
        self.line_limit = line_limit
        self.request_limit = request_limit
        self.timeout = timeout
        self.max_clients = max_clients
        self.log = logger or log
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()
        # Every refused or cut-off input is counted (get them with stats()).
        self.counters = {
            "connections": 0, "requests_get": 0, "requests_set": 0, "set_errors": 0,
            "refused_too_many_clients": 0, "bad_operation": 0, "bad_get": 0,
            "line_too_long": 0, "request_too_large": 0, "timeouts": 0,
        }

    def stats(self) -> dict[str, int]:
        return dict(self.counters, clients=len(self._clients))

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(
            self._client, sock=self.sock, limit=self.line_limit)

    async def close(self) -> None:
        """Stop listening, end every connection, remove the socket file
        (only if it is still the one we made).  Idempotent."""
        if self._server is not None:
            self._server.close()
            self._server = None
        else:
            self.sock.close()
        for task in list(self._clients):
            task.cancel()
        for task in list(self._clients):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.remove_socket_file()

    def owns_socket_file(self) -> bool:
        """Whether the socket file is still there and still ours."""
        return self._inode is not None and _inode(self.path) == self._inode

    def remove_socket_file(self) -> None:
        if self.owns_socket_file():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._inode = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counters["connections"] += 1
        if len(self._clients) >= self.max_clients:
            self.counters["refused_too_many_clients"] += 1
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                async with asyncio.timeout(self.timeout):
                    op = await self._operation(reader)
                    if op is None:
                        return
                    if op == b"get=1\n":
                        reply, keep_open = await self._get(reader)
                    elif op == b"set=1\n":
                        reply, keep_open = await self._set(reader)
                    else:
                        self.counters["bad_operation"] += 1
                        self.log.error("invalid UAPI operation: %r", op[:80])
                        return
            except TimeoutError:
                self.counters["timeouts"] += 1
                self.log.error("UAPI client sent no complete request within %g s; "
                               "disconnected", self.timeout)
                return
            writer.write(reply)
            try:
                # A client that does not read its replies is cut off too.
                async with asyncio.timeout(self.timeout):
                    await writer.drain()
            except TimeoutError:
                self.counters["timeouts"] += 1
                self.log.error("UAPI client read no reply within %g s; disconnected",
                               self.timeout)
                return
            if not keep_open:
                return

    async def _operation(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            return await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            return None  # the client is done (or sent half an operation)
        except asyncio.LimitOverrunError:
            self.counters["line_too_long"] += 1
            return b"<a line longer than the limit>"

    async def _get(self, reader: asyncio.StreamReader) -> tuple[bytes, bool]:
        after = await reader.readexactly(1)
        if after != b"\n":
            self.counters["bad_get"] += 1
            return _errno_reply(EINVAL), True
        self.counters["requests_get"] += 1
        try:
            return render_get(self.device), True
        except Exception:  # a bug or a device failure: answer, keep serving
            self.log.exception("UAPI get failed")
            return _errno_reply(EOTHER), True

    async def _set(self, reader: asyncio.StreamReader) -> tuple[bytes, bool]:
        self.counters["requests_set"] += 1
        lines: list[str] = []
        read_error: UapiError | None = None
        size = 0
        while True:
            try:
                raw = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as eof:
                raw = eof.partial  # a last line without its newline counts (Go's scanner)
                if raw:
                    lines.append(raw.decode("latin-1"))
                break
            except asyncio.LimitOverrunError:
                self.counters["line_too_long"] += 1
                read_error = UapiError(EIO, f"a line is longer than {self.line_limit} bytes")
                break
            if raw == b"\n":
                break
            size += len(raw)
            if size > self.request_limit:
                self.counters["request_too_large"] += 1
                read_error = UapiError(EIO, f"a set request is longer than "
                                            f"{self.request_limit} bytes")
                break
            lines.append(raw[:-1].decode("latin-1"))
        error = apply_set(self.device, lines) or read_error
        if error is None:
            return _errno_reply(0), True
        self.counters["set_errors"] += 1
        self.log.error("UAPI set: %s (errno=-%d)", error, error.errno)
        return _errno_reply(error.errno), False


def _errno_reply(code: int) -> bytes:
    return f"errno={-code}\n\n".encode()


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
