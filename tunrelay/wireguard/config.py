"""What a WireGuard device is built from, and the two files that say it.

``WgConfig`` / ``PeerConfig`` are the data ``WireGuardDevice.from_config``
consumes.  They come from:

- a ``wg setconf`` / ``wg-quick`` file (``[Interface]`` / ``[Peer]``):
  ``load_wg_config`` (``tunrelay run --wg-config wg0.conf``), so an
  existing WireGuard set-up moves over unchanged;
- the TOML file with ``framing = "wireguard"``: ``daemon/config.py``
  checks it and reads its key files (``read_key_file``, re-exported
  here), and ``from_relay_config`` turns it into a ``WgConfig``.

Every problem is a ``ConfigError`` naming the file, the line (INI) or the
key (TOML), and what was expected.  Only the standard library is imported:
``tunrelay check`` must work where the extension or ``cryptography`` is
missing.  The one system call besides reading files is the resolution of
an INI ``Endpoint`` hostname, once, at load time (``wg`` does the same).
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import os
import re
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network

from ..daemon.config import (
    IPV6_MIN_MTU,
    KEY_LEN,
    MAX_FWMARK,
    MAX_KEEPALIVE,
    MAX_MTU,
    MIN_MTU,
    Config,
    Endpoint,
    decode_key,
    key_expected,
    parse_endpoint,
    read_key_file,
)
from ..daemon.config import WG_DEFAULT_MTU as DEFAULT_MTU
from ..daemon.config import WG_DEFAULT_PORT as DEFAULT_PORT
from ..errors import ConfigError

__all__ = ["PeerConfig", "WgConfig", "WgQuickFile", "load_wg_config", "read_wg_quick",
           "to_wg_config",
           "decode_key", "read_key_file", "from_relay_config", "quick_routes",
           "DEFAULT_MTU", "DEFAULT_PORT", "KEY_LEN"]

log = logging.getLogger("tunrelay.wireguard.config")

Network = IPv4Network | IPv6Network
Interface = IPv4Interface | IPv6Interface


@dataclass(frozen=True)
class PeerConfig:
    """One peer, as the device takes it."""

    public_key: bytes                      # 32 bytes
    preshared_key: bytes | None = field(default=None, repr=False)
    endpoint: tuple[str, int] | None = None
    allowed_ips: tuple[Network, ...] = ()
    persistent_keepalive: int = 0          # seconds, 0 = off, max 65535
    name: str | None = None                # TOML name; else None


@dataclass(frozen=True)
class WgConfig:
    """A device: its key, port, mark and peers.  ``addresses`` and ``mtu``
    are wg-quick's keys, which tunrelay applies itself when it runs from
    ``--wg-config``."""

    private_key: bytes | None = field(repr=False)
    listen_port: int = 0                   # 0: any
    fwmark: int = 0
    peers: tuple[PeerConfig, ...] = ()
    addresses: tuple[Interface, ...] = ()
    mtu: int | None = None


@dataclass(frozen=True)
class WgQuickFile:
    """A wg-quick file read: the device's configuration, and what wg-quick
    would do beyond it that tunrelay does too (``table``: "auto" routes
    every peer's allowed IPs into the device, "off" routes nothing; any
    other value is ignored and noted) or ignores (``ignored``: the keys
    accepted but not acted on, each once, as spelled in the file)."""

    path: str
    config: WgConfig
    table: str = "auto"
    ignored: tuple[str, ...] = ()


# --------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------


# decode_key and read_key_file live in daemon/config.py, which reads the
# TOML file's key files and may import nothing but the plain core.


# --------------------------------------------------------------------------
# The wg-quick / wg setconf file
# --------------------------------------------------------------------------

# The keys of each section, in wg's spelling (matched case-insensitively).
_INTERFACE_KEYS = ("PrivateKey", "ListenPort", "FwMark")
_PEER_KEYS = ("PublicKey", "PresharedKey", "AllowedIPs", "Endpoint", "PersistentKeepalive")
# wg-quick's own [Interface] keys: applied by tunrelay ...
_QUICK_APPLIED = ("Address", "MTU", "Table")
# ... or accepted and ignored (with one warning naming them).
_QUICK_IGNORED = ("DNS", "PreUp", "PostUp", "PreDown", "PostDown", "SaveConfig")
#: Keys that may repeat and add up (wg and wg-quick accumulate them).
_LISTS = ("AllowedIPs", "Address", "DNS", "PreUp", "PostUp", "PreDown", "PostDown")
_SECTIONS = {"interface": ("Interface", (*_INTERFACE_KEYS, *_QUICK_APPLIED, *_QUICK_IGNORED)),
             "peer": ("Peer", _PEER_KEYS)}
_HEADER = re.compile(r"\[\s*([^\]]*?)\s*\]\Z")


class _Line:
    """One key = value line, with what an error about it needs."""

    def __init__(self, path: str, number: int, section: str, key: str, value: str) -> None:
        self.path, self.number, self.section, self.key, self.value = (
            path, number, section, key, value)

    def error(self, message: str) -> ConfigError:
        return _line_error(self.path, self.number, f"[{self.section}] {self.key}", message)


def _line_error(path: str, number: int, what: str, message: str) -> ConfigError:
    # No '.' in the key: ConfigError would take it for "table.key".
    return ConfigError(path, f"line {number}: {what.replace('.', '_')}", message)


def load_wg_config(path: str | os.PathLike[str]) -> WgConfig:
    """Read a ``wg setconf`` / ``wg-quick`` file; see ``read_wg_quick``."""
    return read_wg_quick(path).config


def read_wg_quick(path: str | os.PathLike[str], *,
                  resolve: Callable[[str, int], tuple[str, int]] | None = None) -> WgQuickFile:
    """Read and check a ``wg setconf`` / ``wg-quick`` file.

    As ``wg``: sections and keys are case-insensitive, ``#`` starts a
    comment, ``AllowedIPs`` (and wg-quick's list keys) may repeat and add
    up, an allowed IP without a prefix is one host and host bits are
    cleared, an ``Endpoint`` hostname is resolved now, once, and a network
    in two peers ends up in the later one.  Stricter than ``wg``: a second
    ``[Interface]``, a single-valued key given twice and two peers with
    one public key are errors.  ``resolve(host, port)`` replaces the
    resolver (tests)."""
    name = os.fsdecode(path)
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read()
    except OSError as e:
        raise ConfigError(name, None, f"cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(name, f"line {line}", f"expected UTF-8 text, got byte "
                                                f"0x{raw[e.start]:02x}") from None
    if mode & stat.S_IRWXO:
        log.warning("%s is world accessible (mode %o) and holds a private key; chmod 600 %s",
                    name, stat.S_IMODE(mode), name)
    sections = _split_sections(name, text)
    return _build(name, sections, resolve or _resolve)


def _split_sections(path: str, text: str) -> list[tuple[str, int, list[_Line]]]:
    """[(section, header line, [lines])]; syntax and key names checked."""
    sections: list[tuple[str, int, list[_Line]]] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        header = _HEADER.match(line)
        if header:
            wanted = header.group(1).lower()
            if wanted not in _SECTIONS:
                raise _line_error(path, number, line, _unknown(header.group(1), (
                    "Interface", "Peer"), "section"))
            section = _SECTIONS[wanted][0]
            if section == "Interface" and any(s[0] == "Interface" for s in sections):
                first = next(s[1] for s in sections if s[0] == "Interface")
                raise _line_error(path, number, line, f"expected one [Interface] section, got a "
                                                      f"second (the first is on line {first})")
            sections.append((section, number, []))
            continue
        key, equals, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sections:
            raise _line_error(path, number, key or line, "expected [Interface] or [Peer] "
                                                         "before the first key")
        section, _, lines = sections[-1]
        if not equals or not key:
            raise _line_error(path, number, f"[{section}]",
                              f"expected 'Key = value', got {line!r}")
        known = _SECTIONS[section.lower()][1]
        canonical = {k.lower(): k for k in known}.get(key.lower())
        if canonical is None:
            other = "Peer" if section == "Interface" else "Interface"
            if key.lower() in {k.lower() for k in _SECTIONS[other.lower()][1]}:
                message = f"belongs in a [{other}] section, not in [{section}]"
            else:
                message = _unknown(key, known, "key")
            raise _line_error(path, number, f"[{section}] {key}", message)
        lines.append(_Line(path, number, section, canonical, value))
    return sections


def _unknown(name: str, known: tuple[str, ...], what: str) -> str:
    message = f"unknown {what} {name!r}, expected one of: {', '.join(known)}"
    by_lower = {k.lower(): k for k in known}
    close = difflib.get_close_matches(name.lower(), by_lower, n=1, cutoff=0.6)
    return f"{message}; did you mean '{by_lower[close[0]]}'?" if close else message


def _build(path: str, sections: list[tuple[str, int, list[_Line]]],
           resolve: Callable[[str, int], tuple[str, int]]) -> WgQuickFile:
    interface: dict[str, list[_Line]] = {}
    peers: list[tuple[int, dict[str, list[_Line]]]] = []
    for section, number, lines in sections:
        keys: dict[str, list[_Line]] = {}
        for line in lines:
            if line.key in keys and line.key not in _LISTS:
                raise line.error(f"expected once per section, got a second one (the first is "
                                 f"on line {keys[line.key][0].number})")
            keys.setdefault(line.key, []).append(line)
        if section == "Interface":
            interface = keys
        else:
            peers.append((number, keys))

    def one(keys: dict[str, list[_Line]], key: str) -> _Line | None:
        return keys[key][0] if key in keys else None

    private_key = _key(one(interface, "PrivateKey"), "private key")
    listen_port = _number(one(interface, "ListenPort"), "a port from 0 to 65535", 65535, False)
    fwmark = _fwmark(one(interface, "FwMark"))
    mtu_line = one(interface, "MTU")
    mtu = None if mtu_line is None else _number(
        mtu_line, f"an integer from {MIN_MTU} to {MAX_MTU}", MAX_MTU, False, MIN_MTU)
    addresses = _addresses(interface.get("Address", []))
    v6 = [a for a in addresses if a.version == 6]
    if v6 and mtu_line is not None and mtu is not None and mtu < IPV6_MIN_MTU:
        raise mtu_line.error(f"expected at least {IPV6_MIN_MTU} because IPv6 ({v6[0]}) is "
                             f"configured (RFC 8200), got {mtu}")
    table = "auto"
    table_line = one(interface, "Table")
    if table_line is not None:
        table = table_line.value.lower() if table_line.value.lower() in ("auto", "off") \
            else table_line.value
    ignored = [k for k in _QUICK_IGNORED if k in interface]
    if table not in ("auto", "off"):
        ignored.insert(0, "Table")

    config_peers = _peers(path, peers, resolve)
    if ignored:
        log.warning("%s: wg-quick's %s accepted and ignored: tunrelay sets the device's "
                    "addresses, MTU and routes itself and runs no hooks", path, ", ".join(ignored))
    return WgQuickFile(path=path, table=table, ignored=tuple(ignored), config=WgConfig(
        private_key=private_key, listen_port=listen_port or 0, fwmark=fwmark,
        peers=config_peers, addresses=addresses, mtu=mtu))


def _peers(path: str, peers: list[tuple[int, dict[str, list[_Line]]]],
           resolve: Callable[[str, int], tuple[str, int]]) -> tuple[PeerConfig, ...]:
    result: list[PeerConfig] = []
    seen: dict[bytes, int] = {}             # public key -> header line
    owners: dict[Network, int] = {}         # network -> index in result
    for header, keys in peers:
        key_line = keys.get("PublicKey", [None])[0]
        if key_line is None:
            raise _line_error(path, header, "[Peer]", "expected a PublicKey in this section: "
                                                      "a peer is known by its public key")
        public_key = _key(key_line, "public key")
        assert public_key is not None
        if public_key in seen:
            raise key_line.error(f"expected each peer once, got the public key of the [Peer] "
                                 f"on line {seen[public_key]} again")
        seen[public_key] = header
        networks: list[Network] = []
        for line in keys.get("AllowedIPs", []):
            for network in _allowed_ips(line):
                if network in networks:
                    continue
                holder = owners.get(network)
                if holder is not None:
                    # wg moves it: the later peer has it.
                    prior = result[holder]
                    result[holder] = replace(prior, allowed_ips=tuple(
                        n for n in prior.allowed_ips if n != network))
                    log.warning("%s: line %d: %s is in the allowed IPs of two peers; like wg, the "
                                "later one (line %d) has it", path, line.number, network, header)
                owners[network] = len(result)
                networks.append(network)
        endpoint_line = keys.get("Endpoint", [None])[0]
        result.append(PeerConfig(
            public_key=public_key,
            preshared_key=_key(keys.get("PresharedKey", [None])[0], "preshared key"),
            endpoint=None if endpoint_line is None else _endpoint(endpoint_line, resolve),
            allowed_ips=tuple(networks),
            persistent_keepalive=_keepalive(keys.get("PersistentKeepalive", [None])[0])))
    return tuple(result)


def _key(line: _Line | None, what: str) -> bytes | None:
    if line is None:
        return None
    key = decode_key(line.value)
    if key is None:
        raise line.error(f"{key_expected(what)}; got {_shown(line.value)}")
    return key


def _shown(value: str) -> str:
    """A bad value for a message; a key's characters are not repeated."""
    return f"{len(value)} characters" if len(value) >= 20 else repr(value)


def _number(line: _Line | None, expected: str, high: int, off: bool, low: int = 0) -> int | None:
    if line is None:
        return None
    value = line.value
    if off and value.lower() == "off":
        return 0
    if not (value.isascii() and value.isdigit()) or not low <= int(value) <= high:
        raise line.error(f"expected {expected}, got {value!r}")
    return int(value)


def _fwmark(line: _Line | None) -> int:
    if line is None or line.value.lower() == "off":
        return 0
    value = line.value
    expected = f"a mark from 0 to {MAX_FWMARK} (decimal or 0x hex) or 'off'"
    try:
        mark = int(value, 16) if value.lower().startswith("0x") else int(value, 10)
    except ValueError:
        raise line.error(f"expected {expected}, got {value!r}") from None
    if not value.isascii() or "_" in value or not 0 <= mark <= MAX_FWMARK:
        raise line.error(f"expected {expected}, got {value!r}")
    return mark


def _keepalive(line: _Line | None) -> int:
    return _number(line, f"'off' or seconds from 0 to {MAX_KEEPALIVE}", MAX_KEEPALIVE,
                   True) or 0


def _items(line: _Line) -> list[str]:
    return [item.strip() for item in line.value.split(",") if item.strip()]


def _allowed_ips(line: _Line) -> list[Network]:
    networks = []
    for item in _items(line):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise line.error(f"expected networks like '10.0.0.2/32, fd00::2/128' separated by "
                             f"commas, got {item!r}") from None
    return networks


def _addresses(lines: list[_Line]) -> tuple[Interface, ...]:
    addresses: list[Interface] = []
    for line in lines:
        for item in _items(line):
            try:
                address = ipaddress.ip_interface(item)
            except ValueError:
                raise line.error(f"expected addresses like '10.0.0.1/24, fd00::1/64' separated "
                                 f"by commas, got {item!r}") from None
            if address in addresses:
                raise line.error(f"expected each address once, got {item!r} twice")
            addresses.append(address)
    return tuple(addresses)


def _endpoint(line: _Line, resolve: Callable[[str, int], tuple[str, int]]) -> tuple[str, int]:
    try:
        endpoint = parse_endpoint(line.value)
    except ValueError as e:
        raise line.error(str(e)) from None
    if endpoint.port == 0:
        raise line.error(f"expected a port from 1 to 65535, got {line.value!r}")
    if endpoint.family is not None:
        return endpoint.host, endpoint.port
    try:
        return resolve(endpoint.host, endpoint.port)
    except OSError as e:
        raise line.error(f"expected a hostname that resolves, got {endpoint.host!r}: "
                         f"{e.strerror or e}") from None


def _resolve(host: str, port: int) -> tuple[str, int]:
    """A hostname's first address, as wg takes it."""
    infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"no address for {host}")
    sockaddr = infos[0][4]
    return str(sockaddr[0]), int(sockaddr[1])


def to_wg_config(config: WgConfig) -> str:
    """``config`` as a wg-quick file, the keys in ``wg showconf``'s order
    (with wg-quick's Address and MTU first), so ``read_wg_quick`` reads
    back the same ``WgConfig``.  Peer names have no place in the format
    and are left out; so are the keys tunrelay ignores."""
    import base64

    def b64(key: bytes) -> str:
        return base64.b64encode(key).decode("ascii")

    lines = ["[Interface]"]
    if config.addresses:
        lines.append(f"Address = {', '.join(str(a) for a in config.addresses)}")
    if config.mtu is not None:
        lines.append(f"MTU = {config.mtu}")
    if config.listen_port:
        lines.append(f"ListenPort = {config.listen_port}")
    if config.fwmark:
        lines.append(f"FwMark = {config.fwmark:#x}")
    if config.private_key is not None:
        lines.append(f"PrivateKey = {b64(config.private_key)}")
    for peer in config.peers:
        lines += ["", "[Peer]", f"PublicKey = {b64(peer.public_key)}"]
        if peer.preshared_key is not None:
            lines.append(f"PresharedKey = {b64(peer.preshared_key)}")
        if peer.allowed_ips:
            lines.append(f"AllowedIPs = {', '.join(str(n) for n in peer.allowed_ips)}")
        if peer.endpoint is not None:
            host, port = peer.endpoint
            lines.append(f"Endpoint = {f'[{host}]' if ':' in host else host}:{port}")
        if peer.persistent_keepalive:
            lines.append(f"PersistentKeepalive = {peer.persistent_keepalive}")
    return "\n".join(lines) + "\n"


def quick_routes(quick: WgQuickFile) -> tuple[Network, ...]:
    """The routes wg-quick adds with ``Table = auto`` (its default): every
    peer's allowed IPs into the device, once each.  A /0 (wg-quick's
    policy routing, which tunrelay does not do) is left out and logged."""
    if quick.table != "auto":
        return ()
    routes: list[Network] = []
    for peer in quick.config.peers:
        for network in peer.allowed_ips:
            if network.prefixlen == 0:
                log.warning("%s: %s is not routed into the device: wg-quick would route "
                            "everything through it with fwmark policy rules, which tunrelay "
                            "does not set up; add the routes you want yourself", quick.path,
                            network)
            elif network not in routes:
                routes.append(network)
    return tuple(routes)


# --------------------------------------------------------------------------
# The TOML file (framing = "wireguard")
# --------------------------------------------------------------------------


def from_relay_config(cfg: Config, *, resolve: Callable[[str, int], tuple[str, int]] | None
                      = None) -> WgConfig:
    """The device's configuration from a TOML file that ``daemon/config``
    loaded with ``framing = "wireguard"`` (keys already read and checked);
    endpoint hostnames resolved now, in the family of the listen socket."""
    wg = cfg.wireguard
    assert wg is not None, "framing is not wireguard"
    listen = cfg.transport.listen
    assert listen is not None
    v4_only = listen.family == socket.AF_INET

    def where(endpoint: Endpoint | None, name: str) -> tuple[str, int] | None:
        if endpoint is None:
            return None
        if endpoint.family is not None:
            return endpoint.host, endpoint.port
        try:
            if resolve is not None:
                return resolve(endpoint.host, endpoint.port)
            family = socket.AF_INET if v4_only else socket.AF_UNSPEC
            infos = socket.getaddrinfo(endpoint.host, endpoint.port, family, socket.SOCK_DGRAM)
        except OSError as e:
            raise ConfigError(cfg.path, f"{name}.endpoint", (
                f"expected a hostname that resolves, got {endpoint.host!r}: "
                f"{e.strerror or e}")) from None
        return str(infos[0][4][0]), int(infos[0][4][1])

    peers = tuple(PeerConfig(
        public_key=p.public_key, preshared_key=p.preshared_key,
        endpoint=where(p.endpoint, f"peer #{i}"), allowed_ips=tuple(p.allowed_ips),
        persistent_keepalive=p.persistent_keepalive, name=p.name)
        for i, p in enumerate(cfg.peers, 1))
    return WgConfig(private_key=wg.private_key, listen_port=listen.port, fwmark=wg.fwmark,
                    peers=peers, addresses=tuple(cfg.device.addresses), mtu=cfg.device.mtu)
