"""The configuration file (TOML) read into frozen dataclasses.

The loader is strict on purpose: a relay that starts with a mistyped key
silently ignored is worse than one that refuses to start.  Every problem is
a ``ConfigError`` naming the file, the dotted key, what was expected and what
was found.  Loading touches nothing on the system except ``pwd``/``grp``
look-ups for owner and group names: no DNS, no devices, no sockets, so
``tunrelay check`` can validate a file anywhere.

Only the standard library is imported here: the CLI must be able to report
a bad file even when the compiled extension is not built.
"""

from __future__ import annotations

import base64
import difflib
import grp
import ipaddress
import math
import os
import pwd
import re
import socket
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..aead import CIPHERS, ROLES
from ..aead import DEFAULT_MTU as AEAD_DEFAULT_MTU
from ..aead import OVERHEAD as AEAD_OVERHEAD
from ..errors import ConfigError
from ..framing import (
    DEFAULT_MTU,
    FRAMINGS,
    IO_ENGINES,
    LEN16_LIMIT,
    MAX_BATCH,
    MAX_BUSY_POLL_US,
    MAX_MSS,
    MAX_MTU,
    MIN_MSS,
    MIN_MTU,
    max_frame,
)
from ..framing import MODES as DEVICE_MODES

DEFAULT_PORT = 55555  # simpletun's port, so the two interoperate unconfigured
IFNAMSIZ = 16  # linux/if.h, counting the NUL
IPV6_MIN_MTU = 1280  # RFC 8200 section 5
MAX_QUEUES = 16  # one pump (two threads) per queue; more than cores is waste
# TCP: how long a packet may wait in the device while no peer is connected
# before it is dropped (daemon/away.py).  1 s: a peer restarting or a
# client's first reconnect attempts (0.1 + 0.2 + 0.4 s) lose nothing, and
# nothing older than TCP's initial retransmission timeout (RFC 6298: 1 s)
# reaches the next peer; by then a ping is counted lost, a real-time packet
# is useless and a TCP segment has been sent again.
DEFAULT_AWAY_HOLD_MS = 1000
MAX_AWAY_HOLD_MS = 600_000  # 10 min; the kernel holds at most txqueuelen packets anyway
MAX_ID = 2**32 - 2  # uid/gid (uid_t)-1 means "no owner" to TUNSETOWNER
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes, one for the NUL

PROTOCOLS = ("udp", "tcp")
# DEVICE_MODES, FRAMINGS, CIPHERS, the MTU and batch limits and
# AEAD_DEFAULT_MTU (with aead the default MTU shrinks by the overhead) come
# from framing and aead, where the pumps take them from too.
# Each queue's pump is an aead session of its own, and the peer's table of
# sessions (AEAD_SLOTS = 8 in _fastpath.pxd) must hold all of them, plus the
# hello session and a restart's overlap; a session pushed out of a full
# table is refused from then on (its recordings must not get a new window).
AEAD_MAX_QUEUES = 4
ENGINES = ("fast", "python")
# How a UDP relay without a configured peer (raw/len16) picks one: "once"
# takes the source of the first valid datagram until restart; "never" does
# not learn (a peer must be configured).  aead roams instead (see _learn).
LEARN = ("once", "never")
# [[peer]] tables: a relay with many peers (a PeerTable), routed by each
# peer's allowed IPs.  Names show in logs and `tunrelay stats`.
PEER_NAME_MAX = 64
# framing = "wireguard" is not a pump framing: it runs a WireGuardDevice
# (tunrelay/wireguard), whose pumps speak "session".  Its defaults: the
# MTU of wg-quick and wireguard-go (1500 - 80: an IPv6 header, UDP, and
# the data message's 32 bytes of type, index, counter and tag), and
# WireGuard's customary port on a dual-stack socket.
WIREGUARD = "wireguard"
CONFIG_FRAMINGS = (*FRAMINGS, WIREGUARD)
WG_DEFAULT_MTU = 1420
WG_DEFAULT_PORT = 51820
MAX_FWMARK = 2**32 - 1
# [stats] log_level: the names of the logging module's levels, lower case.
LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_KEEPALIVE = 65535
# [metrics]: the Prometheus endpoint.  Its scrapes are plain HTTP without
# authentication, so a non-loopback address needs allow_remote = true.
METRICS_EXAMPLE = "127.0.0.1:9555"


# --------------------------------------------------------------------------
# Endpoints
# --------------------------------------------------------------------------

# Letters, digits, hyphens (and underscores, which container and SRV names
# use); a label neither starts nor ends with a hyphen.
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")


@dataclass(frozen=True)
class Endpoint:
    """A host and a port.  ``host`` is an IP literal (IPv6 without brackets,
    a link-local one with its interface: ``fe80::1%eth0``) or a hostname,
    which is resolved when the socket is opened, not here."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def family(self) -> int | None:
        """``AF_INET``/``AF_INET6`` for an IP literal, ``None`` for a hostname."""
        ip = _ip_or_none(self.host)
        if ip is None:
            return None
        return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def parse_endpoint(text: str) -> Endpoint:
    """Parse ``host:port`` or ``[v6]:port``; raise ``ValueError`` saying
    what is wrong.  IPv6 needs brackets because ``2001:db8::1:80`` is
    ambiguous; IP literals are normalised (``[0::1]`` -> ``::1``)."""
    if text.startswith("["):
        host, port_text = _split_bracketed(text)
    else:
        host, port_text = _split_plain(text)
    return Endpoint(host, _parse_port(port_text, text))


def _split_bracketed(text: str) -> tuple[str, str]:
    close = text.find("]")
    if close < 0:
        raise ValueError(f"expected '[address]:port', got {text!r} (no closing ']')")
    host, rest = text[1:close], text[close + 1:]
    if not rest.startswith(":"):
        raise ValueError(f"expected '[address]:port', got {text!r} (missing ':port')")
    ip = _ip_or_none(host)
    if ip is None or ip.version != 6:
        raise ValueError(f"expected an IPv6 address between the brackets, got {host!r} in {text!r}")
    _check_scope(ip, text, rest[1:])
    return str(ip), rest[1:]


def _check_scope(ip: ipaddress.IPv6Address, text: str, port_text: str) -> None:
    """fe80::/10 exists on every link, so a link-local address means nothing
    without its interface (the kernel refuses it: EINVAL); and a scope on
    any other address would be ignored, so it is a mistake either way."""
    if ip.is_link_local and ip.scope_id is None:
        raise ValueError(f"expected a link-local address with its interface, like "
                         f"'[{ip}%eth0]:{port_text}', got {text!r} (which link is fe80::/10 on?)")
    if ip.scope_id is None:
        return
    if not ip.is_link_local:
        raise ValueError(f"expected a scope (%interface) only on a link-local address (fe80::/10), "
                         f"got {text!r}")
    scope = ip.scope_id
    if _utf8_size(scope) > IFNAMSIZ - 1 or any(c in "/:" or c.isspace() or not c.isprintable()
                                                for c in scope):
        raise ValueError(f"expected an interface name or index after '%', got {scope!r} in {text!r}")


def _split_plain(text: str) -> tuple[str, str]:
    host, colon, port_text = text.rpartition(":")
    if not colon:
        raise ValueError(f"expected 'host:port', got {text!r} (missing ':port')")
    if ":" in host:
        if _ip_or_none(host) is not None:
            raise ValueError(f"expected an IPv6 address in brackets, like '[{host}]:{port_text}', "
                             f"got {text!r}")
        if _ip_or_none(text) is not None:
            raise ValueError(f"expected an IPv6 address in brackets with a port, like "
                             f"'[{text}]:{DEFAULT_PORT}', got {text!r}")
        raise ValueError(f"expected 'host:port' or '[IPv6 address]:port', got {text!r}")
    if not host:
        raise ValueError(f"expected 'host:port', got {text!r} (missing host; "
                         f"0.0.0.0 or [::] means every local address)")
    ip = _ip_or_none(host)
    if ip is not None:
        return str(ip), port_text
    if not _is_hostname(host):
        raise ValueError(f"expected an IP address or a hostname, got {host!r} in {text!r}")
    return host, port_text


def _parse_port(port_text: str, text: str) -> int:
    # isdigit() alone would let through "٥" and friends, which int() accepts.
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        found = "missing port" if not port_text else f"port {port_text!r}"
        raise ValueError(f"expected a port from 0 to 65535, got {text!r} ({found})")
    return int(port_text)


def _is_hostname(host: str) -> bool:
    """RFC 1123 syntax; an all-numeric last label is refused so that a
    mistyped address such as ``10.0.1`` is not taken for a name."""
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    return (len(host) <= 253 and all(_LABEL.match(label) for label in labels)
            and not labels[-1].isdigit())


def _ip_or_none(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


# --------------------------------------------------------------------------
# WireGuard keys (framing = "wireguard"; tunrelay/wireguard/config.py uses
# them for wg-quick files too)
# --------------------------------------------------------------------------

KEY_LEN = 32
KEY_B64_LEN = 44  # base64 of 32 bytes: 43 characters and one '='


def decode_key(text: str) -> bytes | None:
    """32 bytes from the exact form ``wg genkey`` writes (44 characters of
    standard base64 ending in '='), else None."""
    if len(text) != KEY_B64_LEN or not text.endswith("=") or text.endswith("=="):
        return None
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError:
        return None
    # Canonical only (the unused low bits zero), as noise.parse_key: one
    # key, one spelling.
    if len(key) != KEY_LEN or base64.b64encode(key).decode("ascii") != text:
        return None
    return key


def key_expected(what: str) -> str:
    return (f"expected a {what}: 44 characters of base64 (32 bytes) as `wg genkey` or "
            "`tunrelay genkey --wireguard` writes")


def read_key_file(path: str, config_path: str, key: str, what: str = "private key") -> bytes:
    """A WireGuard key from a file, checked like the aead pre-shared key
    (a regular file, not a symbolic link, owned by this user or root,
    mode 600 or stricter; the checks made on the open file) and holding
    exactly one key as ``wg genkey`` writes it: 44 characters of base64,
    one trailing newline allowed.  Errors name ``config_path`` and ``key``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if os.path.islink(path):
            raise ConfigError(config_path, key, (
                f"{what} file {path} is a symbolic link; expected the file itself (links are not "
                f"followed: whoever can change the link would choose the key): use "
                f"{os.path.realpath(path)}")) from None
        raise ConfigError(config_path, key, f"cannot read {what} file {path}: "
                                            f"{exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(config_path, key, f"{what} file {path} is not a regular file; "
                                                "expected a regular file")
        euid = os.geteuid()
        if info.st_uid not in (euid, 0):
            raise ConfigError(config_path, key, (
                f"{what} file {path} is owned by uid {info.st_uid}; expected uid {euid} (the "
                f"user tunrelay runs as) or root, as its owner can replace the key: "
                f"chown {euid} {path}"))
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(config_path, key, (
                f"{what} file {path} is open to group or others (mode "
                f"{stat.S_IMODE(info.st_mode):o}); expected 600: chmod 600 {path}"))
        data = b""
        while len(data) < 128 and (chunk := os.read(fd, 128 - len(data))):
            data += chunk
    except OSError as exc:
        raise ConfigError(config_path, key, f"cannot read {what} file {path}: "
                                            f"{exc.strerror}") from None
    finally:
        os.close(fd)
    text = data[:-1] if data.endswith(b"\n") else data
    decoded = decode_key(text.decode("ascii", "replace"))
    if decoded is None:
        found = (f"{len(data)} bytes" if len(data) != KEY_B64_LEN + 1 or not data.endswith(b"\n")
                 else "44 characters that are not base64 of 32 bytes")
        raise ConfigError(config_path, key, (
            f"{what} file {path}: {key_expected(what)}, and nothing else but one trailing "
            f"newline; got {found}"))
    return decoded


# --------------------------------------------------------------------------
# The configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceConfig:
    """The TUN/TAP device.  ``name`` "" lets the kernel choose (tun%d)."""

    name: str = ""
    mode: str = "tun"
    mtu: int = DEFAULT_MTU
    addresses: tuple = ()  # of ipaddress.IPv4Interface / IPv6Interface
    routes: tuple = ()  # of ipaddress.IPv4Network / IPv6Network
    persist: bool = False
    owner: int | None = None  # uid, resolved from a name at load time
    group: int | None = None  # gid, likewise
    queues: int = 1


@dataclass(frozen=True)
class TransportConfig:
    """The underlay socket.

    ``listen`` None and ``framing`` "" mean "the protocol's default" and are
    filled in on construction, so a ``TransportConfig`` built in code has the
    same defaults as one read from a file.  Only a TCP client keeps
    ``listen`` None (it then binds nothing before connecting).

    ``learn`` matters to a UDP relay with framing raw or len16 and no peer
    (aead follows its authenticated peer instead); ``allow`` only to a TCP
    server, which refuses (RST) connections from anywhere else;
    ``away_hold_ms`` only to TCP: how long a packet may wait in the device
    while no peer is connected (older ones are dropped, ``peer_away``).
    """

    protocol: str = "udp"
    listen: Endpoint | None = None
    peer: Endpoint | None = None
    framing: str = ""
    learn: str = "once"
    allow: tuple = ()  # of ipaddress.IPv4Network / IPv6Network; () = any address
    away_hold_ms: int = DEFAULT_AWAY_HOLD_MS

    def __post_init__(self) -> None:
        if not self.framing:
            object.__setattr__(self, "framing", "len16" if self.protocol == "tcp" else "raw")
        if self.listen is None and not (self.protocol == "tcp" and self.peer is not None):
            # A wildcard of the peer's family: a v4 socket cannot reach a v6 peer.
            wildcard = "::" if self.peer is not None and self.peer.family == socket.AF_INET6 else "0.0.0.0"
            object.__setattr__(self, "listen", Endpoint(wildcard, DEFAULT_PORT))

    @property
    def is_server(self) -> bool:
        """A TCP end without a peer accepts; every other end sends first or learns."""
        return self.protocol == "tcp" and self.peer is None


@dataclass(frozen=True)
class RelayConfig:
    """The pumps: packets per wake-up and which implementation runs."""

    batch: int = 64
    engine: str = "fast"  # "fast" = compiled pump, "python" = the slow reference
    # TUN offloads (virtio_net_hdr, TSO/USO, UDP GSO/GRO): "auto" uses them
    # where they apply (mode tun, compiled engine) and the kernel has them;
    # True insists (an error where they cannot apply); False never.
    offload: str | bool = "auto"
    # The compiled pump's TUN I/O engine (tunrelay.framing.IO_ENGINES):
    # "uring" batches the TUN writes through io_uring (an error at
    # start where io_uring cannot be set up), "syscalls" one per packet,
    # "auto" the faster where io_uring is available, else syscalls.
    io: str = "auto"
    # Both directions of a queue in one thread (True), one thread each
    # (False), or "auto": one for the compiled engine, two for the Python one.
    duplex: str | bool = "auto"
    # Busy polling: after work, a loop polls without sleeping this long
    # (microseconds) before it sleeps; None: the engine's default
    # (DEFAULT_BUSY_POLL_US compiled, 0 for the Python pump, which cannot).
    busy_poll_us: int | None = None
    # MSS clamping of TCP SYNs through the tunnel: "auto" (what fits the
    # device MTU), an MSS for both families, or False (off).
    mss_clamp: str | int | bool = "auto"

    def duplex_for(self) -> bool:
        return self.engine == "fast" if self.duplex == "auto" else bool(self.duplex)

    def busy_poll_for(self) -> int:
        if self.busy_poll_us is not None:
            return self.busy_poll_us
        return DEFAULT_BUSY_POLL_US if self.engine == "fast" else 0


#: The compiled pump's busy-polling budget when [relay] busy_poll_us is not
#: given (benchmarks/RESULTS.md, issue 10, has the measurements behind it).
DEFAULT_BUSY_POLL_US = 0


@dataclass(frozen=True)
class StatsConfig:
    """Periodic stats logging and the control socket ``tunrelay stats`` reads."""

    interval: float = 0.0  # seconds; 0 = no periodic log line
    socket: str = ""  # "" = /run/tunrelay/<device>.sock
    # The relay's log level (LOG_LEVELS); `tunrelay run -v` means "debug"
    # at start.  A reload applies a changed one.
    log_level: str = "info"

    def socket_path(self, device_name: str) -> str:
        return self.socket or f"/run/tunrelay/{device_name or 'tunrelay'}.sock"


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint (daemon/metrics.py): ``listen`` None = off.
    ``listen`` is an IP literal (loopback unless ``allow_remote``), so the
    check is made here, without resolving anything."""

    listen: Endpoint | None = None
    allow_remote: bool = False


@dataclass(frozen=True)
class SecurityConfig:
    """The aead framing's pre-shared key and cipher.  ``key`` is read and
    checked at load time (owner-only permissions, 32 bytes of base64)."""

    key_file: str = ""
    cipher: str = "chacha20-poly1305"
    key: bytes = field(default=b"", repr=False, compare=False)
    # "a" or "b": the direction this end seals with (it opens the other's).
    # After loading, the effective role with aead (derived over TCP), else "".
    role: str = ""
    # Drop to this uid/gid once the device and sockets are open (None: stay).
    user: int | None = None
    group: int | None = None


@dataclass(frozen=True)
class PeerConfig:
    """One ``[[peer]]`` table: a peer of a relay with many peers.

    ``allowed_ips`` (networks) are the inner addresses routed to the peer
    and the only inner sources accepted from it.  ``endpoint`` None: learned
    from the peer's datagrams, which needs ``roaming``; with ``roaming`` a
    given endpoint also follows the peer (raw and len16 authenticate
    nothing, so it is off unless asked for).

    With ``framing = "wireguard"`` a peer is its ``public_key`` (32 bytes),
    with an optional pre-shared key (read from ``preshared_key_file`` at
    load time) and ``persistent_keepalive`` (seconds, 0 = off); it always
    roams (on authenticated data only), and ``endpoint`` None waits for
    the peer to make the first handshake.
    """

    name: str
    allowed_ips: tuple = ()  # of ipaddress.IPv4Network / IPv6Network
    endpoint: Endpoint | None = None
    roaming: bool = False
    public_key: bytes = b""
    preshared_key_file: str = ""
    preshared_key: bytes | None = field(default=None, repr=False, compare=False)
    persistent_keepalive: int = 0


@dataclass(frozen=True)
class WireguardConfig:
    """The ``[wireguard]`` table (with ``framing = "wireguard"``): the
    device's private key, read and checked at load time from
    ``private_key_file``, and the fwmark of its UDP socket (0 = none).
    The port and bind address are ``[transport] listen``'s."""

    private_key_file: str = ""
    fwmark: int = 0
    private_key: bytes = field(default=b"", repr=False, compare=False)


@dataclass(frozen=True)
class Config:
    """A whole file.  ``path`` is where it came from, for messages only.

    ``peers`` holds the ``[[peer]]`` tables: empty for a point-to-point
    relay (``[transport] peer``, or a learned peer)."""

    path: str = "<string>"
    device: DeviceConfig = field(default_factory=DeviceConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    peers: tuple = ()  # of PeerConfig
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    wireguard: WireguardConfig | None = None  # with framing = "wireguard" only

    @property
    def control_socket(self) -> str:
        return self.stats.socket_path(self.device.name)


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def load(path: str | os.PathLike) -> Config:
    """Read and validate a file; every failure is a ``ConfigError``."""
    name = os.fsdecode(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(name, None, f"cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(name, None, f"not valid TOML: expected UTF-8, got byte "
                                      f"0x{raw[e.start]:02x} at offset {e.start}") from None
    return loads(text, name)


def loads(text: str, path: str = "<string>") -> Config:
    """Validate TOML text; ``path`` only names the source in messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, None, f"not valid TOML: {e}") from None
    tables = _split_tables(data, path)
    peer_tables = _split_peers(data, path)
    transport = _read_transport(tables["transport"], many_peers=bool(peer_tables))
    wireguard = transport.framing == WIREGUARD
    if not wireguard and data.get(WIREGUARD) is not None:
        raise tables["transport"].error(
            "framing", f'expected "{WIREGUARD}" with a [wireguard] table, got '
            f'"{transport.framing}": the [wireguard] table configures a WireGuard device; '
            f'set framing = "{WIREGUARD}" or remove the table')
    cfg = Config(
        path=path,
        device=_read_device(tables["device"]),
        transport=transport,
        relay=_read_relay(tables["relay"]),
        stats=_read_stats(tables["stats"]),
        security=_read_security(tables["security"]),
        peers=_read_peers(peer_tables, transport.framing),
        metrics=_read_metrics(tables["metrics"]),
    )
    if wireguard:
        cfg = _with_wireguard(cfg, tables, peer_tables)
    if cfg.peers:
        cfg = _with_peers(cfg, tables, peer_tables)
    _check_across_tables(cfg, tables)
    if cfg.transport.framing == "aead":
        cfg = _with_aead(cfg, tables)
    _check_record_fits(cfg, tables)
    return cfg


def _check_record_fits(cfg: Config, tables: dict) -> None:
    """A len16 length (TCP, or UDP with framing len16) counts at most 65535
    bytes: the device's largest frame, with aead's header and tag, must fit
    (the pump refuses it otherwise)."""
    t = cfg.transport
    if t.protocol != "tcp" and t.framing != "len16":
        return
    record = max_frame(cfg.device.mode, cfg.device.mtu) + (AEAD_OVERHEAD if t.framing == "aead" else 0)
    if record > LEN16_LIMIT:
        most = cfg.device.mtu - (record - LEN16_LIMIT)
        raise tables["device"].error(
            "mtu", f"expected at most {most} here: a len16 record holds {LEN16_LIMIT} bytes, and "
            f"a {cfg.device.mode} frame of mtu {cfg.device.mtu} with its framing needs {record}")


def _read_security(table: _Table) -> SecurityConfig:
    user = _account_id(table, "user", "user", lambda n: pwd.getpwnam(n).pw_uid)
    group = _account_id(table, "group", "group", lambda n: grp.getgrnam(n).gr_gid)
    if user is not None and group is None:
        # A user's own group, as `su` would give: never keep root's gid 0.
        try:
            group = pwd.getpwuid(user).pw_gid
        except KeyError:
            raise table.error("group", f"expected a group: user {user} has no passwd entry "
                                       "to take its group from") from None
    return SecurityConfig(
        key_file=_string(table, "key_file", ""),
        cipher=_choice(table, "cipher", CIPHERS, SecurityConfig.cipher),
        role=_choice(table, "role", ROLES, ROLES[0]) if "role" in table.data else "",
        user=user,
        group=group,
    )


def _with_aead(cfg: Config, tables: dict) -> Config:
    """framing = "aead": a role, the compiled engine, a readable key file
    (checked now, so `tunrelay check` catches it), and the smaller default
    MTU unless one is given."""
    from dataclasses import replace

    from ..aead import load_key
    if cfg.relay.engine != "fast":
        raise tables["relay"].error("engine", 'framing = "aead" needs engine = "fast"')
    if cfg.device.queues > AEAD_MAX_QUEUES:
        raise tables["device"].error(
            "queues", f'{cfg.device.queues} queues with framing = "aead": at most '
            f"{AEAD_MAX_QUEUES} (each queue is an aead session, and the peer keeps "
            f"{AEAD_MAX_QUEUES} sessions)")
    if not cfg.security.key_file:
        raise tables["security"].error(
            "key_file", 'framing = "aead" needs a key file (make one: tunrelay genkey > relay.key; '
            "chmod 600 relay.key)")
    role = _aead_role(cfg, tables["security"])
    path = cfg.security.key_file
    if not os.path.isabs(path) and cfg.path not in ("<string>", ""):
        path = os.path.join(os.path.dirname(os.path.abspath(cfg.path)), path)
    key = load_key(path, cfg.path)
    device = cfg.device
    if "mtu" not in tables["device"].data:
        device = replace(device, mtu=AEAD_DEFAULT_MTU)
    return replace(cfg, device=device, security=replace(cfg.security, key=key, role=role))


def _relative(cfg: Config, path: str) -> str:
    """A key file's path: relative paths are relative to the config file."""
    if not os.path.isabs(path) and cfg.path not in ("<string>", ""):
        return os.path.join(os.path.dirname(os.path.abspath(cfg.path)), path)
    return path


# [security] keys that mean nothing to a WireGuard device, and why.
_NOT_WIREGUARD = {
    "key_file": "a WireGuard device has no shared key: its keys are [wireguard] "
                "private_key_file and each [[peer]]'s public_key (and preshared_key_file)",
    "role": "the WireGuard handshake gives each direction its own key",
    "cipher": "WireGuard's cipher is ChaCha20-Poly1305, always",
}


def _with_wireguard(cfg: Config, tables: dict, peer_tables: list[_Table]) -> Config:
    """framing = "wireguard": a TUN device and the compiled engine, the
    [wireguard] private key and each peer's public key read and checked
    now (so `tunrelay check` catches them), the aead keys refused, and
    WireGuard's default MTU unless one is given."""
    from dataclasses import replace

    why = f'framing = "{WIREGUARD}"'
    if cfg.device.mode != "tun":
        raise tables["device"].error("mode", f'expected "tun" with {why}, got '
                                             f'"{cfg.device.mode}": WireGuard carries IP packets')
    if cfg.relay.engine != "fast":
        raise tables["relay"].error("engine", f'expected "fast" with {why}, got '
                                              f'"{cfg.relay.engine}": the Python pump has no '
                                              "sessions")
    if "batch" in tables["relay"].data:
        raise tables["relay"].error("batch", f"does not apply to {why}: the WireGuard device "
                                             "sizes its pumps' batches itself; remove batch")
    if "io" in tables["relay"].data:
        raise tables["relay"].error("io", f"does not apply to {why}: the WireGuard device "
                                          'runs io "auto"; remove io')
    security = tables["security"]
    for key, reason in _NOT_WIREGUARD.items():
        if key in security.data:
            raise security.error(key, f"does not apply to {why}: {reason}; remove {key}")
    if not cfg.peers:
        raise ConfigError(cfg.path, "peer", (
            f"expected at least one [[peer]] table with {why} (name, public_key, allowed_ips, "
            "and endpoint on the side that starts): a device without peers accepts no one"))
    table = tables[WIREGUARD]
    if "private_key_file" not in table.data:
        raise table.error("private_key_file", (
            f"expected the path of the device's private key with {why} (make one: "
            "tunrelay genkey --wireguard > wg.key, under umask 077)"))
    key_file = _string(table, "private_key_file", "")
    wireguard = WireguardConfig(
        private_key_file=key_file,
        fwmark=_integer(table, "fwmark", 0, MAX_FWMARK, WireguardConfig.fwmark),
        private_key=read_key_file(_relative(cfg, key_file), cfg.path,
                                  f"{WIREGUARD}.private_key_file"))
    peers = []
    owners: dict[bytes, str] = {}  # public key -> peer name
    for peer_table, peer in zip(peer_tables, cfg.peers):
        if "public_key" not in peer_table.data:
            raise peer_table.error("public_key", (
                "expected the peer's public key (44 characters of base64, from `wg pubkey` or "
                "`tunrelay pubkey`): a WireGuard peer is known by it"))
        text = _string(peer_table, "public_key", "")
        public_key = decode_key(text)
        if public_key is None:
            found = f"{len(text)} characters" if len(text) >= 20 else _found(text)
            raise peer_table.error("public_key", (
                f"expected 44 characters of base64 (32 bytes) as `wg pubkey` writes it, got "
                f"{found}"))
        if public_key in owners:
            raise peer_table.error("public_key", (
                f"expected a key of this peer's own, got peer "
                f"{_toml_string(owners[public_key])}'s: one key is one peer"))
        owners[public_key] = peer.name
        psk_file, psk = "", None
        if "preshared_key_file" in peer_table.data:
            psk_file = _string(peer_table, "preshared_key_file", "")
            psk = read_key_file(_relative(cfg, psk_file), cfg.path,
                                f"{peer_table.name}.preshared_key_file", "preshared key")
        peers.append(replace(
            peer, public_key=public_key, preshared_key_file=psk_file, preshared_key=psk,
            persistent_keepalive=_integer(peer_table, "persistent_keepalive", 0, MAX_KEEPALIVE,
                                          PeerConfig.persistent_keepalive)))
    device = cfg.device
    if "mtu" not in tables["device"].data:
        device = replace(device, mtu=WG_DEFAULT_MTU)
    return replace(cfg, device=device, peers=tuple(peers), wireguard=wireguard)


def _aead_role(cfg: Config, table: _Table) -> str:
    """Both ends share the key, so each seals with the key of its own
    direction and opens with the other's: its own datagrams reflected back
    to it then never authenticate.  Over TCP the ends are already told
    apart (the client is "a", the server "b"); over UDP they are not."""
    given = cfg.security.role
    if cfg.transport.protocol == "udp":
        if not given:
            raise table.error(
                "role", 'framing = "aead" over UDP needs role = "a" on one end and "b" on the '
                "other: both ends share the key, so each end needs its own direction (a relay "
                "then never accepts its own datagrams reflected back)")
        return given
    server = cfg.transport.is_server
    derived = ROLES[1] if server else ROLES[0]
    if given and given != derived:
        end = "server (no peer)" if server else "client (peer set)"
        raise table.error(
            "role", f'expected "{derived}" for a TCP {end}, got "{given}": over TCP the client '
            f'is "{ROLES[0]}" and the server "{ROLES[1]}" (or leave role out)')
    return derived


def _check_across_tables(cfg: Config, tables: dict) -> None:
    """Settings that are each valid but not together."""
    if cfg.security.role and cfg.transport.framing != "aead":
        raise tables["security"].error(
            "role", f'applies to framing = "aead" only (it picks the key of each direction), '
            f'got framing = "{cfg.transport.framing}"; remove role')
    if cfg.device.queues > 1:
        # One SO_REUSEPORT UDP socket per queue; every queue must know where
        # to send from the start (a learned peer is seen by one queue only).
        if cfg.transport.protocol != "udp":
            raise tables["device"].error(
                "queues", f'{cfg.device.queues} queues need [transport] protocol = "udp"; '
                'a TCP tunnel is one connection: use queues = 1')
        if cfg.transport.peer is None and not cfg.peers:
            raise tables["device"].error(
                "queues", f"{cfg.device.queues} queues need [transport] peer (or [[peer]] "
                "tables): a peer learned by one queue is unknown to the others")
    if cfg.relay.io == "uring" and cfg.relay.engine != "fast":
        raise tables["relay"].error(
            "io", 'expected "auto" or "syscalls" with engine = "python" (the Python pump '
            'has no io_uring engine), got "uring"')
    if cfg.relay.engine != "fast":
        if cfg.relay.duplex is True:
            raise tables["relay"].error(
                "duplex", 'true needs engine = "fast" (the Python pump runs a thread per '
                'direction); use "auto" or false')
        if cfg.relay.busy_poll_us:
            raise tables["relay"].error(
                "busy_poll_us", f'{cfg.relay.busy_poll_us} needs engine = "fast" (the Python '
                'pump sleeps in select()); use 0 or leave it out')
    if cfg.relay.offload is True:
        if cfg.device.mode != "tun":
            raise tables["relay"].error(
                "offload", 'true needs [device] mode = "tun" (TAP frames are not segmented); '
                'use "auto" or false')
        if cfg.relay.engine != "fast":
            raise tables["relay"].error(
                "offload", 'true needs engine = "fast" (the Python pump has no offloads); '
                'use "auto" or false')


# The keys of a [[peer]] table; the last ones are framing = "wireguard"'s.
_WG_PEER_KEYS = ("public_key", "preshared_key_file", "persistent_keepalive")
_PEER_KEYS = ("name", "endpoint", "allowed_ips", "roaming", *_WG_PEER_KEYS)

# The keys each table accepts, as written in the file.
_KEYS = {
    "device": ("name", "mode", "mtu", "address", "routes", "persist", "owner", "group", "queues"),
    "transport": ("protocol", "listen", "peer", "framing", "learn", "allow", "away_hold_ms"),
    "relay": ("batch", "engine", "offload", "duplex", "busy_poll_us", "io", "mss_clamp"),
    "security": ("key_file", "cipher", "role", "user", "group"),
    "stats": ("interval", "socket", "log_level"),
    WIREGUARD: ("private_key_file", "fwmark"),
    "metrics": ("listen", "allow_remote"),
}


class _Table:
    """One table of the file, with what a reader needs to blame a key."""

    def __init__(self, path: str, name: str, data: dict) -> None:
        self.path, self.name, self.data = path, name, data

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.path, f"{self.name}.{key}", message)


def _split_tables(data: dict, path: str) -> dict[str, _Table]:
    """Check the top level (only the known tables) and each table's keys."""
    for name, value in data.items():
        if name == "peer":
            continue  # [[peer]]: _split_peers
        if name not in _KEYS:
            raise ConfigError(path, name, _unknown_top_level(name, value))
        if not isinstance(value, dict):
            raise ConfigError(path, name, f"expected a table [{name}], got {_found(value)}")
    tables = {name: _Table(path, name, data.get(name, {})) for name in _KEYS}
    for table in tables.values():
        for key in table.data:
            if key not in _KEYS[table.name]:
                raise table.error(key, _unknown(key, _KEYS[table.name], "key"))
    return tables


def _split_peers(data: dict, path: str) -> list[_Table]:
    """The ``[[peer]]`` tables (an array of tables), each with its keys
    checked.  Each is named by its place and, once read, its name:
    ``[peer #2 "spoke1"] allowed_ips``."""
    value = data.get("peer")
    if value is None:
        return []
    if isinstance(value, dict):
        raise ConfigError(path, "peer", "expected [[peer]] tables (double brackets: an array of "
                                        "tables, one per peer), got a table [peer]")
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        hint = ("; the one-peer shorthand is peer = \"host:port\" in the [transport] table"
                if isinstance(value, str) else "")
        raise ConfigError(path, "peer", f"expected [[peer]] tables, one per peer, got "
                                        f"{_found(value)}{hint}")
    tables = []
    for number, item in enumerate(value, 1):
        table = _Table(path, f"peer #{number}", item)
        for key in item:
            if key not in _PEER_KEYS:
                raise table.error(key, _unknown(key, _PEER_KEYS, "key"))
        tables.append(table)
    return tables


def _unknown_top_level(name: str, value: Any) -> str:
    """A key above the first table header is usually a setting put in the
    wrong place; say which table it belongs to."""
    if isinstance(value, dict) or (isinstance(value, list) and value
                                   and all(isinstance(item, dict) for item in value)):
        return _unknown(name, (*_KEYS, "peer"), "table")
    owners = [table for table, keys in _KEYS.items() if name in keys]
    if owners:
        return f"unknown top-level key; '{name}' belongs in the [{owners[0]}] table"
    return _unknown(name, tuple(_KEYS), "top-level key (only tables are allowed here)")


def _unknown(name: str, known: tuple[str, ...], what: str) -> str:
    """An "unknown key" message listing what is known, with the closest
    match: a typo must fail loudly and say how to fix it."""
    message = f"unknown {what}, expected one of: {', '.join(known)}"
    by_lower = {k.lower(): k for k in known}
    close = difflib.get_close_matches(name.lower(), by_lower, n=1, cutoff=0.6)
    return f"{message}; did you mean '{by_lower[close[0]]}'?" if close else message


# ---- typed readers: each returns the default when the key is absent ------


def _found(value: Any) -> str:
    """What was found, in TOML spelling, with its type when that is the
    point (``"1400"`` is a string, ``true`` is not an integer)."""
    if isinstance(value, bool):
        return f"a boolean {'true' if value else 'false'}"
    if isinstance(value, str):
        return f"a string {_toml_string(value)}"
    if isinstance(value, int):
        return f"an integer {value}"
    if isinstance(value, float):
        return f"a float {value}"
    if isinstance(value, list):
        return f"an array of {len(value)} items"
    if isinstance(value, dict):
        return "a table"
    return f"a date/time {value}"


def _string(table: _Table, key: str, default: str) -> str:
    value = table.data.get(key, default)
    if not isinstance(value, str):
        raise table.error(key, f"expected a string, got {_found(value)}")
    return value


def _choice(table: _Table, key: str, choices: tuple[str, ...], default: str) -> str:
    value = table.data.get(key, default)
    if not isinstance(value, str) or value not in choices:
        quoted = [f'"{c}"' for c in choices]
        expected = " or ".join(quoted) if len(quoted) < 3 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
        raise table.error(key, f"expected {expected}, got {_found(value)}")
    return value


def _integer(table: _Table, key: str, low: int, high: int, default: int) -> int:
    value = table.data.get(key, default)
    expected = f"an integer from {low} to {high}"
    if isinstance(value, bool) or not isinstance(value, int):  # bool is an int subclass
        raise table.error(key, f"expected {expected}, got {_found(value)}")
    if not low <= value <= high:
        raise table.error(key, f"expected {expected}, got {value}")
    return value


def _boolean(table: _Table, key: str, default: bool) -> bool:
    value = table.data.get(key, default)
    if not isinstance(value, bool):
        raise table.error(key, f"expected true or false, got {_found(value)}")
    return value


def _string_list(table: _Table, key: str, *, single_ok: bool) -> list[str]:
    """An array of strings; with ``single_ok`` a lone string is one item."""
    value = table.data.get(key, [])
    if single_ok and isinstance(value, str):
        return [value]
    expected = "a string or an array of strings" if single_ok else "an array of strings"
    if not isinstance(value, list):
        raise table.error(key, f"expected {expected}, got {_found(value)}")
    for item in value:
        if not isinstance(item, str):
            raise table.error(key, f"expected {expected}, got an item that is {_found(item)}")
    return value


def _utf8_size(text: str) -> int:
    """Bytes the kernel will see; "surrogatepass" so that a lone surrogate
    (possible from ``loads``, never from a file) is measured, not a crash."""
    return len(text.encode("utf-8", "surrogatepass"))


def _no_duplicates(table: _Table, key: str, items: list) -> tuple:
    """Netlink refuses the second copy (EEXIST) at run time; say so now."""
    for i, item in enumerate(items):
        if item in items[:i]:
            raise table.error(key, f"expected each entry once, got {str(item)!r} twice")
    return tuple(items)


# ---- [device] -------------------------------------------------------------


def _read_device(table: _Table) -> DeviceConfig:
    addresses = _no_duplicates(table, "address", [
        _interface(table, text) for text in _string_list(table, "address", single_ok=True)])
    routes = _no_duplicates(table, "routes", [
        _network(table, text) for text in _string_list(table, "routes", single_ok=False)])
    mtu = _integer(table, "mtu", MIN_MTU, MAX_MTU, DeviceConfig.mtu)
    _check_ipv6_mtu(table, mtu, addresses + routes)
    return DeviceConfig(
        name=_device_name(table),
        mode=_choice(table, "mode", DEVICE_MODES, DeviceConfig.mode),
        mtu=mtu,
        addresses=addresses,
        routes=routes,
        persist=_boolean(table, "persist", DeviceConfig.persist),
        owner=_account_id(table, "owner", "user", lambda n: pwd.getpwnam(n).pw_uid),
        group=_account_id(table, "group", "group", lambda n: grp.getgrnam(n).gr_gid),
        queues=_queues(table),
    )


def _device_name(table: _Table) -> str:
    """The kernel's own rules (dev_valid_name, __dev_alloc_name), checked
    here so the mistake is reported against the file, not as EINVAL."""
    name = _string(table, "name", DeviceConfig.name)
    size = _utf8_size(name)
    if size > IFNAMSIZ - 1:
        raise table.error("name", f"expected at most {IFNAMSIZ - 1} bytes (IFNAMSIZ - 1), "
                                  f"got {size} bytes: {name!r}")
    if name in (".", ".."):
        raise table.error("name", f"expected an interface name, got {name!r}")
    bad = [c for c in name if c in "/:" or c.isspace() or not c.isprintable()]
    if bad:
        raise table.error("name", f"expected a name without '/', ':', whitespace or control "
                                  f"characters, got {name!r}")
    percent = name.find("%")
    if percent >= 0 and (name[percent + 1:percent + 2] != "d" or "%" in name[percent + 2:]):
        raise table.error("name", f"expected at most one '%d' (the kernel's number) and no other "
                                  f"'%', got {name!r}")
    return name


def _interface(table: _Table, text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """An address with its prefix: without one the kernel would assume /32
    (or /128) and the peer's subnet would have no route."""
    if "/" not in text:
        raise table.error("address", f"expected an address with a prefix length (CIDR) like "
                                     f"'10.0.0.1/24', got {text!r}")
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        raise table.error("address", f"expected an address with a prefix length (CIDR) like "
                                     f"'10.0.0.1/24', got {text!r}") from None


def _network(table: _Table, text: str,
             key: str = "routes") -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A route (or an allow entry) must be a network: "10.0.0.1/24" is more
    likely a pasted address than the network it lies in, so name that
    network instead of guessing (the strict=False answer)."""
    expected = "a network with a prefix length (CIDR) like '192.168.50.0/24'"
    if "/" not in text:
        raise table.error(key, f"expected {expected}, got {text!r}")
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        pass
    try:
        meant = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise table.error(key, f"expected {expected}, got {text!r}") from None
    raise table.error(key, f"expected {expected}, got {text!r} which has host bits set; "
                           f"did you mean '{meant}'?")


def _check_ipv6_mtu(table: _Table, mtu: int, prefixes: tuple) -> None:
    """Linux disables IPv6 on a link below 1280 bytes, so the addresses and
    routes would fail to apply (or vanish) at run time."""
    ipv6 = [p for p in prefixes if p.version == 6]
    if ipv6 and mtu < IPV6_MIN_MTU:
        raise table.error("mtu", f"expected at least {IPV6_MIN_MTU} because IPv6 ({ipv6[0]}) is "
                                 f"configured and IPv6 needs a link MTU of at least {IPV6_MIN_MTU} "
                                 f"(RFC 8200), got {mtu}")


def _account_id(table: _Table, key: str, what: str, lookup: Callable[[str], int]) -> int | None:
    """A numeric id as is (it need not exist, as with chown), or a name
    resolved now so that a typo fails before any device is made."""
    value = table.data.get(key)
    if value is None:
        return None
    expected = f"a {what} name or a numeric id from 0 to {MAX_ID}"
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= MAX_ID:
            raise table.error(key, f"expected {expected}, got {value}")
        return value
    if not isinstance(value, str):
        raise table.error(key, f"expected {expected}, got {_found(value)}")
    try:
        return lookup(value)
    except (KeyError, ValueError):
        hint = f" (write a numeric id without quotes: {key} = {value})" if value.isdigit() else ""
        raise table.error(key, f"expected {expected}, got {value!r}, which is not a {what} "
                               f"on this system{hint}") from None


def _queues(table: _Table) -> int:
    return _integer(table, "queues", 1, MAX_QUEUES, DeviceConfig.queues)


# ---- [transport] ----------------------------------------------------------


def _read_transport(table: _Table, many_peers: bool = False) -> TransportConfig:
    protocol = _choice(table, "protocol", PROTOCOLS, TransportConfig.protocol)
    listen = _endpoint(table, "listen", min_port=0)
    peer = _endpoint(table, "peer", min_port=1)
    framing = table.data.get("framing", "len16" if protocol == "tcp" else "raw")
    if framing not in CONFIG_FRAMINGS:
        raise table.error("framing", f'expected "raw", "len16" or "aead" (or "{WIREGUARD}" over '
                                     f"UDP), got {_found(framing)}")
    if framing == WIREGUARD and protocol != "udp":
        raise table.error("protocol", f'expected "udp" with framing = "{WIREGUARD}", got '
                                      f'"{protocol}": WireGuard runs over UDP only')
    if framing == WIREGUARD and peer is not None:
        raise table.error("peer", f'expected no [transport] peer with framing = "{WIREGUARD}", '
                                  f"got {peer}: a WireGuard peer is known by its public key; "
                                  "write it as a [[peer]] table with public_key, endpoint and "
                                  "allowed_ips")
    if framing == WIREGUARD and "listen" not in table.data:
        listen = Endpoint("::", WG_DEFAULT_PORT)
    if protocol == "tcp" and framing == "raw":
        raise table.error("framing", 'expected "len16" over TCP, got "raw": a TCP stream has '
                                     "no packet boundaries, so raw packets could not be split again")
    if peer is not None and peer.host in ("0.0.0.0", "::"):  # parse_endpoint normalised them
        raise table.error("peer", f"expected a reachable address, got {peer} (the unspecified "
                                  f"address only makes sense for listen)")
    if listen is not None and peer is not None and None not in (listen.family, peer.family) \
            and listen.family != peer.family:
        raise table.error("listen", f"expected the same address family as peer {peer}, got {listen}: "
                                    f"a socket of one family cannot reach an address of the other")
    if many_peers and "learn" in table.data and framing != WIREGUARD:
        raise table.error("learn", "does not apply with [[peer]] tables: a [[peer]] without "
                                   "endpoint is learned when it has roaming = true; remove learn")
    return TransportConfig(protocol=protocol, listen=listen, peer=peer, framing=framing,
                           learn=_learn(table, protocol, peer, framing),
                           allow=_allow(table, protocol, peer),
                           away_hold_ms=_away_hold(table, protocol))


def _away_hold(table: _Table, protocol: str) -> int:
    """TCP: milliseconds a packet may wait in the device while no peer is
    connected; the packets the kernel queues there are dropped after it."""
    if "away_hold_ms" in table.data and protocol != "tcp":
        raise table.error("away_hold_ms", f'applies to protocol = "tcp" only (a UDP relay sends '
                                          f'or counts each packet at once), got protocol = '
                                          f'"{protocol}"; remove away_hold_ms')
    return _integer(table, "away_hold_ms", 0, MAX_AWAY_HOLD_MS, DEFAULT_AWAY_HOLD_MS)


def _learn(table: _Table, protocol: str, peer: Endpoint | None, framing: str) -> str:
    """How a UDP relay without a peer finds one; an aead relay needs no
    choice: it follows the source of the newest authenticated datagram."""
    learn = _choice(table, "learn", LEARN, TransportConfig.learn)
    if "learn" not in table.data:
        return learn
    if protocol != "udp":
        raise table.error("learn", 'applies to protocol = "udp" only (a TCP peer is the '
                                   "connection); remove learn")
    if framing in ("aead", WIREGUARD):
        raise table.error("learn", f'does not apply to framing = "{framing}": it follows each '
                                   "peer to the source of its newest authenticated datagram "
                                   "(roaming); remove learn")
    if learn == "never" and peer is None:
        raise table.error("learn", 'expected a [transport] peer with learn = "never": without '
                                   "one the relay would have nowhere to send")
    return learn


def _allow(table: _Table, protocol: str, peer: Endpoint | None) -> tuple:
    """The networks a TCP server accepts connections from."""
    if "allow" not in table.data:
        return ()
    if protocol != "tcp" or peer is not None:
        found = f'protocol = "{protocol}"' if protocol != "tcp" else f"a TCP client (peer {peer})"
        raise table.error("allow", f'applies to a TCP server only (protocol = "tcp" without peer), '
                                   f"got {found}; remove allow")
    networks = _no_duplicates(table, "allow", [
        _network(table, text, "allow") for text in _string_list(table, "allow", single_ok=False)])
    if not networks:
        raise table.error("allow", "expected at least one network like '192.0.2.0/24', got an "
                                   "empty array (which would refuse everyone); leave allow out "
                                   "to accept any address")
    return networks


def _endpoint(table: _Table, key: str, min_port: int) -> Endpoint | None:
    value = table.data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise table.error(key, f"expected a string 'host:port', got {_found(value)}")
    try:
        endpoint = parse_endpoint(value)
    except ValueError as e:
        raise table.error(key, str(e)) from None
    if endpoint.port < min_port:
        raise table.error(key, f"expected a port from {min_port} to 65535, got {value!r} "
                               f"(port {endpoint.port})")
    return endpoint


# ---- [[peer]] ---------------------------------------------------------------

# Why [[peer]] takes UDP, TUN and framing raw/len16/wireguard only, and what else there is.
_PEERS_WORK_WITH = ('[[peer]] tables work with protocol = "udp", mode = "tun" and framing '
                    '"raw" or "len16" (or "wireguard"); authenticated multi-peer is the '
                    '"session" framing: WireGuard here (framing = "wireguard"), or a control '
                    "plane of your own through the embedding API (PeerTable)")


def _read_peers(tables: list[_Table], framing: str = "raw") -> tuple:
    """Each [[peer]] on its own; names and networks across peers are
    checked here too (a network routes to one peer).  The WireGuard keys
    (``public_key``...) are read later, by ``_with_wireguard``."""
    peers: list[PeerConfig] = []
    owners: dict = {}  # network -> name of the peer that has it
    endpoints: dict = {}  # Endpoint -> name
    wireguard = framing == WIREGUARD
    for table in tables:
        name = _peer_name(table, [p.name for p in peers])
        table.name = f"{table.name} {_toml_string(name)}"
        endpoint = _endpoint(table, "endpoint", min_port=1)
        if endpoint is not None and endpoint.host in ("0.0.0.0", "::"):
            raise table.error("endpoint", f"expected a reachable address, got {endpoint} (the "
                                          f"unspecified address only makes sense for listen)")
        if wireguard:
            # Two WireGuard peers behind one address are told apart by
            # their sessions, and an unknown endpoint waits for the peer.
            if "roaming" in table.data:
                raise table.error("roaming", f'does not apply to framing = "{WIREGUARD}": a '
                                             "WireGuard peer always follows its newest "
                                             "authenticated datagram (and nothing else); remove "
                                             "roaming")
            peers.append(PeerConfig(name=name, allowed_ips=_owned(table, owners, name),
                                    endpoint=endpoint))
            continue
        for key in _WG_PEER_KEYS:
            if key in table.data:
                raise table.error(key, f'applies to framing = "{WIREGUARD}" only (a WireGuard '
                                       f'peer\'s key or timer), got framing = "{framing}"; '
                                       f"remove {key}")
        if endpoint is not None and endpoint in endpoints:
            raise table.error("endpoint", f"expected an endpoint of this peer's own, got {endpoint}, "
                                          f"which is peer {_toml_string(endpoints[endpoint])}'s: "
                                          "datagrams from it could not be told apart")
        if endpoint is not None:
            endpoints[endpoint] = name
        roaming = _boolean(table, "roaming", PeerConfig.roaming)
        if endpoint is None and not roaming:
            raise table.error("endpoint", 'expected an endpoint "host:port", or roaming = true to '
                                          "learn it from the peer's datagrams: without either the "
                                          "peer could never be reached")
        peers.append(PeerConfig(name=name, allowed_ips=_owned(table, owners, name),
                                endpoint=endpoint, roaming=roaming))
    return tuple(peers)


def _owned(table: _Table, owners: dict, name: str) -> tuple:
    """The peer's allowed IPs, each network in no other peer."""
    allowed = _allowed_ips(table)
    for network in allowed:
        if network in owners:
            raise table.error("allowed_ips", f"expected each network in one peer only, got "
                                             f"'{network}', which peer "
                                             f"{_toml_string(owners[network])} has too: a "
                                             "packet to it would have two places to go")
        owners[network] = name
    return allowed


def _peer_name(table: _Table, taken: list[str]) -> str:
    if "name" not in table.data:
        raise table.error("name", 'expected a name for this peer (name = "spoke1"): logs and '
                                  "`tunrelay stats` show peers by name")
    name = _string(table, "name", "")
    if not name or len(name) > PEER_NAME_MAX or not name.isprintable():
        raise table.error("name", f"expected 1 to {PEER_NAME_MAX} printable characters, got "
                                  f"{_toml_string(name)}")
    if name in taken:
        raise table.error("name", f"expected a name of its own, got {_toml_string(name)}, which "
                                  "another [[peer]] has")
    return name


def _allowed_ips(table: _Table) -> tuple:
    """The peer's networks: required, at least one, strict (host bits set
    is an error), each once."""
    if "allowed_ips" not in table.data:
        raise table.error("allowed_ips", "expected the networks routed to this peer, like "
                                         '["10.0.0.2/32", "fd00::2/128"]: a peer without them '
                                         "would get no packets and have none accepted")
    networks = _no_duplicates(table, "allowed_ips", [
        _network(table, text, "allowed_ips")
        for text in _string_list(table, "allowed_ips", single_ok=False)])
    if not networks:
        raise table.error("allowed_ips", "expected at least one network like '10.0.0.2/32', got "
                                         "an empty array (the peer would get no packets and have "
                                         "none accepted)")
    return networks


def _with_peers(cfg: Config, tables: dict, peer_tables: list[_Table]) -> Config:
    """[[peer]] tables: what they need of the other tables, and the listen
    address's family.  Point-to-point settings are refused, not ignored."""
    from dataclasses import replace
    t = cfg.transport
    if t.peer is not None:
        raise tables["transport"].error(
            "peer", f"expected no [transport] peer with [[peer]] tables, got {t.peer}: [transport] "
            "peer is the one-peer shorthand; write that peer as a [[peer]] table (with its "
            "allowed_ips), or remove the [[peer]] tables")
    if t.protocol != "udp":
        raise tables["transport"].error(
            "protocol", f'expected "udp" with [[peer]] tables, got "{t.protocol}": a TCP '
            f"connection carries one peer. {_PEERS_WORK_WITH}")
    if t.framing not in ("raw", "len16", WIREGUARD):
        raise tables["transport"].error(
            "framing", f'expected "raw" or "len16" with [[peer]] tables, got "{t.framing}": '
            f"its key and sessions are those of one peer. {_PEERS_WORK_WITH}")
    if cfg.device.mode != "tun":
        raise tables["device"].error(
            "mode", f'expected "tun" with [[peer]] tables, got "{cfg.device.mode}": peers are '
            f"chosen by the inner IP address, which a TAP device's Ethernet frames do not "
            f"route by. {_PEERS_WORK_WITH}")
    if cfg.relay.engine != "fast":
        raise tables["relay"].error(
            "engine", f'expected "fast" with [[peer]] tables, got "{cfg.relay.engine}": the '
            "Python pump serves one peer")
    listen = t.listen
    if "listen" not in tables["transport"].data and t.framing != WIREGUARD and any(
            p.endpoint is not None and p.endpoint.family == socket.AF_INET6 for p in cfg.peers):
        # Dual stack: an IPv6 socket on "::" reaches IPv4 peers too.
        listen = Endpoint("::", DEFAULT_PORT)
    for table, peer in zip(peer_tables, cfg.peers):
        family = None if peer.endpoint is None else peer.endpoint.family
        if family is None or listen.family is None or family == listen.family:
            continue
        if family == socket.AF_INET and listen.host == "::":
            continue  # dual stack
        raise table.error("endpoint", f"expected the address family of [transport] listen "
                                      f"{listen}, got {peer.endpoint}: a socket of one family "
                                      'cannot reach an address of the other (listen = "[::]:'
                                      f'{listen.port}" reaches both)')
    return replace(cfg, transport=replace(t, listen=listen))


# ---- [relay] and [stats] --------------------------------------------------


def _read_relay(table: _Table) -> RelayConfig:
    return RelayConfig(
        batch=_integer(table, "batch", 1, MAX_BATCH, RelayConfig.batch),
        engine=_choice(table, "engine", ENGINES, RelayConfig.engine),
        offload=_auto_or_boolean(table, "offload"),
        duplex=_auto_or_boolean(table, "duplex"),
        busy_poll_us=(_integer(table, "busy_poll_us", 0, MAX_BUSY_POLL_US, 0)
                      if "busy_poll_us" in table.data else None),
        io=_choice(table, "io", IO_ENGINES, RelayConfig.io),
        mss_clamp=_mss_clamp(table),
    )


def _mss_clamp(table: _Table) -> str | int | bool:
    value = table.data.get("mss_clamp", RelayConfig.mss_clamp)
    expected = f'expected "auto", false or an integer from {MIN_MSS} to {MAX_MSS} (an MSS in bytes)'
    if value == "auto" or value is False:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise table.error("mss_clamp", f"{expected}, got {_found(value)}")
    if not MIN_MSS <= value <= MAX_MSS:
        raise table.error("mss_clamp", f"{expected}, got {value}")
    return value


def _auto_or_boolean(table: _Table, key: str) -> str | bool:
    value = table.data.get(key, "auto")
    if value == "auto" or isinstance(value, bool):
        return value
    raise table.error(key, f'expected true, false or "auto", got {_found(value)}')


def _read_stats(table: _Table) -> StatsConfig:
    return StatsConfig(interval=_interval(table), socket=_socket_path(table),
                       log_level=_choice(table, "log_level", LOG_LEVELS, StatsConfig.log_level))


def _interval(table: _Table) -> float:
    value = table.data.get("interval", StatsConfig.interval)
    expected = "a number of seconds, 0 or more (0 = off)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise table.error("interval", f"expected {expected}, got {_found(value)}")
    if not math.isfinite(value) or value < 0:
        raise table.error("interval", f"expected {expected}, got {value}")
    return float(value)


def _socket_path(table: _Table) -> str:
    path = _string(table, "socket", StatsConfig.socket)
    size = _utf8_size(path)
    if "\0" in path or size > SUN_PATH_MAX:
        raise table.error("socket", f"expected a path of at most {SUN_PATH_MAX} bytes without NUL "
                                    f"(the size of sockaddr_un.sun_path), got {size} bytes: {path!r}")
    return path


# ---- [metrics] --------------------------------------------------------------


def metrics_option(text: str) -> MetricsConfig:
    """``tunrelay run --wg-config ... --metrics ADDRESS`` (a wg-quick file
    has no place for it): checked as ``[metrics] listen``, loopback only
    (a remote address needs a TOML file's allow_remote = true)."""
    try:
        return _read_metrics(_Table("--metrics", "metrics", {"listen": text}),
                             remote="or a TOML config with [metrics] allow_remote = true "
                                    "to serve them there")
    except ConfigError as exc:
        raise ConfigError("--metrics", None, exc.message) from None


def _read_metrics(table: _Table, remote: str = "set allow_remote = true to serve them "
                                               "there") -> MetricsConfig:
    """The Prometheus endpoint: off unless ``listen`` is given; an IP
    literal and a port, on loopback unless ``allow_remote = true`` (the
    metrics are served without authentication or TLS)."""
    allow_remote = _boolean(table, "allow_remote", MetricsConfig.allow_remote)
    if "listen" not in table.data:
        if "allow_remote" in table.data:
            raise table.error("allow_remote", f'applies with listen only (the metrics are off '
                                              f'without it), like listen = "{METRICS_EXAMPLE}"; '
                                              "add listen or remove allow_remote")
        return MetricsConfig()
    listen = _endpoint(table, "listen", min_port=1)
    assert listen is not None
    ip = _ip_or_none(listen.host)
    if ip is None:
        raise table.error("listen", f"expected an IP address and a port, like "
                                    f'"{METRICS_EXAMPLE}" or "[::1]:9555", got hostname '
                                    f"{_toml_string(str(listen))} (the address is checked "
                                    "before anything is resolved: write the address itself)")
    if not allow_remote and not _is_loopback(ip):
        raise table.error("listen", f"expected a loopback address (127.0.0.1, [::1]), got "
                                    f"{_toml_string(str(listen))}: the metrics are served "
                                    "without authentication or TLS, to anyone who can reach "
                                    f"the port; {remote}")
    return MetricsConfig(listen=listen, allow_remote=allow_remote)


def _is_loopback(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """127.0.0.0/8, ::1, and 127.x seen as an IPv4-mapped IPv6 address."""
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def to_toml(cfg: Config) -> str:
    """Every setting written out explicitly, so ``loads(to_toml(c), c.path)
    == c``; a key whose value is None (no owner, no TCP bind address) is left
    out, which reads back as None.  So are the keys the loader refuses where
    they do not apply (learn but over UDP without aead, allow but on a TCP
    server, away_hold_ms but over TCP, role but with aead, [metrics] without
    listen): their defaults read back the same."""
    d, t, r, s = cfg.device, cfg.transport, cfg.relay, cfg.stats
    tables: dict[str, dict[str, Any]] = {
        "device": {"name": d.name, "mode": d.mode, "mtu": d.mtu, "address": d.addresses,
                   "routes": d.routes, "persist": d.persist, "owner": d.owner,
                   "group": d.group, "queues": d.queues},
        "transport": {"protocol": t.protocol, "listen": t.listen, "peer": t.peer,
                      "framing": t.framing,
                      "learn": (t.learn if t.protocol == "udp" and t.framing != "aead"
                                and not cfg.peers else None),
                      "allow": t.allow or None,
                      "away_hold_ms": t.away_hold_ms if t.protocol == "tcp" else None},
        "relay": {"batch": r.batch, "engine": r.engine, "offload": r.offload,
                  "duplex": r.duplex, "busy_poll_us": r.busy_poll_us, "io": r.io,
                  "mss_clamp": r.mss_clamp},
        "stats": {"interval": s.interval, "socket": s.socket, "log_level": s.log_level},
        "security": {"key_file": cfg.security.key_file, "cipher": cfg.security.cipher,
                     "role": cfg.security.role or None,
                     "user": cfg.security.user, "group": cfg.security.group},
    }
    wg = cfg.wireguard
    if wg is not None:
        for key in _NOT_WIREGUARD:
            tables["security"][key] = None
        tables["relay"]["batch"] = None
        tables["relay"]["io"] = None
        tables[WIREGUARD] = {"private_key_file": wg.private_key_file, "fwmark": wg.fwmark}
    m = cfg.metrics
    if m.listen is not None:
        tables["metrics"] = {"listen": m.listen, "allow_remote": m.allow_remote}
    lines = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(v)}" for key, v in values.items() if v is not None)
        lines.append("")
    for peer in cfg.peers:
        lines.append("[[peer]]")
        values = {"name": peer.name, "endpoint": peer.endpoint,
                  "allowed_ips": peer.allowed_ips, "roaming": peer.roaming}
        if wg is not None:
            values.update(roaming=None, public_key=base64.b64encode(peer.public_key).decode(),
                          preshared_key_file=peer.preshared_key_file or None,
                          persistent_keepalive=peer.persistent_keepalive)
        lines.extend(f"{key} = {_toml_value(v)}" for key, v in values.items() if v is not None)
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # "1e-05", "inf", "nan" are all TOML floats too
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return _toml_string(str(value))  # str, Endpoint, ipaddress objects


# TOML basic strings forbid the control characters (DEL included) unescaped.
_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
                 "\f": "\\f", "\r": "\\r"}


def _toml_string(text: str) -> str:
    out = []
    for c in text:
        if c in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[c])
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'
