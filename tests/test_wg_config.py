"""WireGuard configuration: the wg-quick / `wg setconf` file, the TOML
[wireguard] table and [[peer]] keys, and the CLI around them (check,
genkey --wireguard, pubkey, the usage errors).

No root needed and no network: Endpoint hostnames go through an injected
resolver, except "localhost", which every system resolves from /etc/hosts.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunrelay.daemon.cli import main as cli_main
from tunrelay.daemon.config import load, loads, to_toml
from tunrelay.daemon.stats import format_table
from tunrelay.errors import ConfigError
from tunrelay.wireguard.config import (
    PeerConfig,
    WgConfig,
    from_relay_config,
    load_wg_config,
    quick_routes,
    read_wg_quick,
    to_wg_config,
)
from tunrelay.wireguard.noise import generate_private_key, key_to_base64, private_to_public
from tunrelay.wireguard.run import (
    check_own_key,
    from_relay_config_settings,
    from_wg_quick,
    interface_name,
    short_key,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRIVATE = generate_private_key()
PUBLIC = private_to_public(PRIVATE)
PEER1 = private_to_public(generate_private_key())
PEER2 = private_to_public(generate_private_key())
PSK = os.urandom(32)
B64 = key_to_base64


def no_dns(host: str, port: int) -> tuple[str, int]:
    """The injected resolver: one known name, everything else unknown."""
    if host == "vpn.example.net":
        return "192.0.2.44", port
    raise OSError(f"Name or service not known: {host}")


def write(tmp_path: Path, text: str, name: str = "wg0.conf", mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def quick(tmp_path: Path, text: str, name: str = "wg0.conf"):
    return read_wg_quick(write(tmp_path, text, name), resolve=no_dns)


# --------------------------------------------------------------------------
# wg-quick files: good ones
# --------------------------------------------------------------------------

# What a wg-quick user has in /etc/wireguard: mixed case, comments, hooks,
# repeated AllowedIPs, every way to write an endpoint.
REALISTIC = f"""\
# /etc/wireguard/wg0.conf: the office gateway
[Interface]
Address = 10.200.0.1/24, fd20::1/64
Address = 10.201.0.1/24
ListenPort = 51820
PrivateKey = {B64(PRIVATE)}
MTU = 1380
DNS = 10.200.0.53, office.lan
FwMark = 0x1234
PostUp = iptables -A FORWARD -i %i -j ACCEPT; iptables -t nat -A POSTROUTING -o eth0 -j MASQUERADE
PostDown = iptables -D FORWARD -i %i -j ACCEPT
SaveConfig = false

[Peer]
# laptop: no endpoint, it calls in
PublicKey = {B64(PEER1)}
PresharedKey = {B64(PSK)}
AllowedIPs = 10.200.0.2/32, fd20::2/128
AllowedIPs = 192.168.77.0/24   # the laptop's LAN

[peer]
publickey = {B64(PEER2)}
endpoint = vpn.example.net:51821
allowedips = 10.200.0.3/32,fd20::3
persistentkeepalive = 25
"""


def test_realistic_wg_quick_file(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "tunrelay.wireguard.config")
    q = quick(tmp_path, REALISTIC)
    wg = q.config
    assert wg.private_key == PRIVATE
    assert wg.listen_port == 51820
    assert wg.fwmark == 0x1234
    assert wg.mtu == 1380
    assert wg.addresses == tuple(ipaddress.ip_interface(a) for a in
                                 ("10.200.0.1/24", "fd20::1/64", "10.201.0.1/24"))
    laptop, office = wg.peers
    assert laptop == PeerConfig(public_key=PEER1, preshared_key=PSK, endpoint=None,
                                allowed_ips=tuple(ipaddress.ip_network(n) for n in (
                                    "10.200.0.2/32", "fd20::2/128", "192.168.77.0/24")))
    assert laptop.preshared_key == PSK
    assert office.endpoint == ("192.0.2.44", 51821)
    assert office.allowed_ips == (ipaddress.ip_network("10.200.0.3/32"),
                                  ipaddress.ip_network("fd20::3/128"))  # no prefix: one host
    assert office.persistent_keepalive == 25 and office.preshared_key is None
    assert office.name is None
    assert q.table == "auto"
    assert q.ignored == ("DNS", "PostUp", "PostDown", "SaveConfig")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings  # one warning naming them all
    assert "DNS, PostUp, PostDown, SaveConfig" in warnings[0] and "wg0.conf" in warnings[0]
    # Table = auto: every allowed IP is routed into the device, as wg-quick does.
    assert quick_routes(q) == laptop.allowed_ips + office.allowed_ips


def test_realistic_wg_quick_file_round_trip(tmp_path):
    """Written back (the keys tunrelay uses, as `wg showconf` orders them)
    and read again: the same configuration."""
    first = quick(tmp_path, REALISTIC).config
    text = to_wg_config(first)
    again = quick(tmp_path, text, "again.conf").config
    assert again == first
    assert [p.preshared_key for p in again.peers] == [PSK, None]
    assert "PostUp" not in text and f"PrivateKey = {B64(PRIVATE)}" in text
    assert "FwMark = 0x1234" in text and "Endpoint = 192.0.2.44:51821" in text
    v6 = WgConfig(private_key=None, peers=(PeerConfig(public_key=PEER1,
                                                      endpoint=("2001:db8::1", 51820)),))
    assert quick(tmp_path, to_wg_config(v6), "v6.conf").config == v6


def test_wg_quick_settings_name_the_device_after_the_file(tmp_path):
    path = write(tmp_path, REALISTIC.replace("vpn.example.net", "127.0.0.1"), "office7.conf")
    settings = from_wg_quick(str(path))
    assert settings.device.name == "office7"
    assert settings.device.mtu == 1380
    assert settings.device.addresses == settings.wg.addresses
    assert ipaddress.ip_network("192.168.77.0/24") in settings.device.routes
    assert settings.control_socket == "/run/tunrelay/office7.sock"
    assert settings.bind == "::"
    named = from_wg_quick(str(path), name="wgx", socket_path="/tmp/x.sock")
    assert (named.device.name, named.control_socket) == ("wgx", "/tmp/x.sock")


def test_wg_setconf_file_without_wg_quick_keys(tmp_path):
    """`wg showconf` output: no Address/MTU; the MTU defaults to 1420."""
    text = f"[Interface]\nListenPort = 0\nPrivateKey = {B64(PRIVATE)}\n\n" \
           f"[Peer]\nPublicKey = {B64(PEER1)}\nAllowedIPs = 10.0.0.2/32\n" \
           f"Endpoint = [2001:db8::7]:51820\nPersistentKeepalive = off\n"
    q = quick(tmp_path, text)
    assert q.config.mtu is None and q.config.addresses == () and q.ignored == ()
    assert q.config.listen_port == 0
    assert q.config.peers[0].endpoint == ("2001:db8::7", 51820)
    assert q.config.peers[0].persistent_keepalive == 0
    assert from_wg_quick(str(tmp_path / "wg0.conf")).device.mtu == 1420


def test_load_wg_config_returns_the_device_config(tmp_path):
    path = write(tmp_path, f"[Interface]\nPrivateKey = {B64(PRIVATE)}\n"
                           f"[Peer]\nPublicKey = {B64(PEER1)}\nEndpoint = localhost:1\n")
    wg = load_wg_config(path)
    assert isinstance(wg, WgConfig)
    assert wg.peers[0].endpoint in (("127.0.0.1", 1), ("::1", 1))  # resolved once, now
    assert wg.peers[0].allowed_ips == ()


@pytest.mark.parametrize("value, mark", [("off", 0), ("0", 0), ("51820", 51820),
                                         ("0xCA6C", 0xCA6C), ("4294967295", 2**32 - 1)])
def test_fwmark_forms(tmp_path, value, mark):
    assert quick(tmp_path, f"[Interface]\nFwMark = {value}\n").config.fwmark == mark


def test_table_off_routes_nothing_and_default_route_is_not_routed(tmp_path, caplog):
    peer = f"[Peer]\nPublicKey = {B64(PEER1)}\nAllowedIPs = 0.0.0.0/0, ::/0, 10.1.0.0/16\n"
    off = quick(tmp_path, "[Interface]\nTable = off\n" + peer)
    assert off.table == "off" and off.ignored == () and quick_routes(off) == ()
    caplog.set_level(logging.WARNING, "tunrelay.wireguard.config")
    auto = quick(tmp_path, "[Interface]\n" + peer)
    assert quick_routes(auto) == (ipaddress.ip_network("10.1.0.0/16"),)
    assert sum("0.0.0.0/0" in r.getMessage() or "::/0" in r.getMessage()
               for r in caplog.records) == 2
    other = quick(tmp_path, "[Interface]\nTable = 1234\n" + peer)
    assert other.ignored == ("Table",) and quick_routes(other) == ()


def test_network_in_two_peers_goes_to_the_later_one_like_wg(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "tunrelay.wireguard.config")
    q = quick(tmp_path, f"[Peer]\nPublicKey = {B64(PEER1)}\nAllowedIPs = 10.0.0.0/24, 10.0.1.0/24\n"
                        f"[Peer]\nPublicKey = {B64(PEER2)}\nAllowedIPs = 10.0.1.0/24\n")
    assert q.config.peers[0].allowed_ips == (ipaddress.ip_network("10.0.0.0/24"),)
    assert q.config.peers[1].allowed_ips == (ipaddress.ip_network("10.0.1.0/24"),)
    assert any("10.0.1.0/24" in r.getMessage() and "later" in r.getMessage()
               for r in caplog.records)


def test_host_bits_are_cleared_like_wg(tmp_path):
    q = quick(tmp_path, f"[Peer]\nPublicKey = {B64(PEER1)}\nAllowedIPs = 10.0.0.7/24\n")
    assert q.config.peers[0].allowed_ips == (ipaddress.ip_network("10.0.0.0/24"),)


def test_world_readable_file_is_warned_about(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "tunrelay.wireguard.config")
    quick(tmp_path, f"[Interface]\nPrivateKey = {B64(PRIVATE)}\n")
    assert not caplog.records
    read_wg_quick(write(tmp_path, f"[Interface]\nPrivateKey = {B64(PRIVATE)}\n", mode=0o644))
    assert any("world accessible" in r.getMessage() and "chmod 600" in r.getMessage()
               for r in caplog.records)


def test_interface_name_from_file_name():
    assert interface_name("/etc/wireguard/wg0.conf") == "wg0"
    assert interface_name("office-vpn") == "office-vpn"
    with pytest.raises(ConfigError, match="pass --name"):
        interface_name("/etc/wireguard/a-name-much-too-long.conf")
    with pytest.raises(ConfigError, match="pass --name"):
        interface_name("my vpn.conf")


# --------------------------------------------------------------------------
# wg-quick files: one bad file per rule; each error names file, line, key
# --------------------------------------------------------------------------

GOOD_PEER = f"[Peer]\nPublicKey = {B64(PEER1)}\n"

BAD_QUICK = [
    # (text, line, what the key part says, what the message says)
    ("[Interface]\nPrivateKey = abc\n", 2, "[Interface] PrivateKey", "44 characters of base64"),
    (f"[Interface]\nPrivateKey = {B64(PRIVATE)[:-2]}B=\n", 2, "[Interface] PrivateKey",
     "expected a private key"),   # not canonical: 'B' leaves a low bit set
    (f"[Interface]\nPrivateKey = {B64(PRIVATE)}\nprivatekey = {B64(PRIVATE)}\n", 3,
     "[Interface] PrivateKey", "the first is on line 2"),
    ("[Interface]\nListenPort = 65536\n", 2, "[Interface] ListenPort", "a port from 0 to 65535"),
    ("[Interface]\nListenPort = http\n", 2, "[Interface] ListenPort", "got 'http'"),
    ("[Interface]\nFwMark = 0x1ffffffff\n", 2, "[Interface] FwMark", "'off'"),
    ("[Interface]\nFwMark = -1\n", 2, "[Interface] FwMark", "decimal or 0x hex"),
    ("[Interface]\nMTU = 40\n", 2, "[Interface] MTU", "from 68 to 65535"),
    ("[Interface]\nAddress = fd00::1/64\nMTU = 1200\n", 3, "[Interface] MTU", "at least 1280"),
    ("[Interface]\nAddress = 10.0.0.1/24, 10.0.0.300\n", 2, "[Interface] Address",
     "'10.0.0.300'"),
    ("[Interface]\nAddress = 10.0.0.1/24\nAddress = 10.0.0.1/24\n", 3, "[Interface] Address",
     "once"),
    ("[Interface]\nListnPort = 1\n", 2, "[Interface] ListnPort", "did you mean 'ListenPort'"),
    ("[Interface]\nEndpoint = 192.0.2.1:1\n", 2, "[Interface] Endpoint",
     "belongs in a [Peer] section"),
    ("[Peer]\nPrivateKey = x\n", 2, "[Peer] PrivateKey", "belongs in a [Interface] section"),
    ("[Interface]\n[Interface]\n", 2, "[Interface]", "the first is on line 1"),
    ("[Interfaces]\n", 1, "[Interfaces]", "did you mean 'Interface'"),
    ("PrivateKey = x\n", 1, "PrivateKey", "before the first key"),
    ("[Interface]\nListenPort 51820\n", 2, "[Interface]", "'Key = value'"),
    ("[Peer]\nAllowedIPs = 10.0.0.0/24\n", 1, "[Peer]", "expected a PublicKey"),
    (f"{GOOD_PEER}\n# the same again\n{GOOD_PEER}", 6, "[Peer] PublicKey",
     "the [Peer] on line 1 again"),
    (f"{GOOD_PEER}PublicKey = {B64(PEER2)}\n", 3, "[Peer] PublicKey", "once per section"),
    (f"{GOOD_PEER}PresharedKey = {'A' * 43}\n", 3, "[Peer] PresharedKey",
     "expected a preshared key"),
    (f"{GOOD_PEER}AllowedIPs = 10.0.0.0/24, 10.0.0.0/33\n", 3, "[Peer] AllowedIPs",
     "'10.0.0.0/33'"),
    (f"{GOOD_PEER}Endpoint = 192.0.2.1\n", 3, "[Peer] Endpoint", "missing ':port'"),
    (f"{GOOD_PEER}Endpoint = 2001:db8::1:51820\n", 3, "[Peer] Endpoint", "in brackets"),
    (f"{GOOD_PEER}Endpoint = 192.0.2.1:0\n", 3, "[Peer] Endpoint", "from 1 to 65535"),
    (f"{GOOD_PEER}Endpoint = nowhere.invalid:51820\n", 3, "[Peer] Endpoint",
     "a hostname that resolves, got 'nowhere.invalid'"),
    (f"{GOOD_PEER}PersistentKeepalive = 65536\n", 3, "[Peer] PersistentKeepalive",
     "'off' or seconds from 0 to 65535"),
    (f"{GOOD_PEER}PersistentKeepalive = 1.5\n", 3, "[Peer] PersistentKeepalive", "got '1.5'"),
]


@pytest.mark.parametrize("text, line, key, message", BAD_QUICK)
def test_bad_wg_quick_file(tmp_path, text, line, key, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        read_wg_quick(path, resolve=no_dns)
    text = str(info.value)
    assert text.startswith(f"{path}: line {line}: {key}"), text
    assert message in text, text
    assert info.value.path == str(path)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from([
    "[Interface]", "[Peer]", "[peer]", "[Other]", "", "# c", "=", "x = y",
    f"PrivateKey = {B64(PRIVATE)}", f"PublicKey = {B64(PEER1)}", f"PublicKey = {B64(PEER2)}",
    "ListenPort = 51820", "ListenPort = -1", "FwMark = 0x10", "MTU = 1280", "MTU = 1279",
    "Address = fd00::1/64", "Address = 10.0.0.1", "AllowedIPs = 10.0.0.0/8, ::/0",
    "AllowedIPs = 10.0.0.0/8", "Endpoint = [::1]:1", "Endpoint = 1.2.3.4:5", "Endpoint = x:1",
    "PersistentKeepalive = off", "PersistentKeepalive = 99999", "Table = off", "DNS = 1.1.1.1",
    "PresharedKey = abc"]), max_size=12), st.text(max_size=30))
def test_any_wg_quick_text_reads_or_is_a_config_error(tmp_path, lines, noise):
    """Whatever the lines, the reader returns a configuration or a
    ConfigError naming the file; it never crashes."""
    path = write(tmp_path, "\n".join(lines) + "\n" + noise)
    try:
        read_wg_quick(path, resolve=no_dns)
    except ConfigError as exc:
        assert exc.path == str(path)


def test_unreadable_and_not_utf8_wg_quick_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        read_wg_quick(tmp_path / "missing.conf")
    path = tmp_path / "wg0.conf"
    path.write_bytes(b"[Interface]\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"line 2: expected UTF-8 text, got byte 0xe9"):
        read_wg_quick(path)


def test_wg_quick_without_private_key_cannot_run(tmp_path):
    path = write(tmp_path, GOOD_PEER)
    assert load_wg_config(path).private_key is None  # wg setconf accepts it ...
    with pytest.raises(ConfigError, match="PrivateKey: expected the device's private key"):
        from_wg_quick(str(path))                     # ... a device to run does not


def test_own_public_key_as_a_peer_is_refused(tmp_path):
    path = write(tmp_path, f"[Interface]\nPrivateKey = {B64(PRIVATE)}\n"
                           f"[Peer]\nPublicKey = {B64(PEER1)}\n[Peer]\nPublicKey = {B64(PUBLIC)}\n")
    with pytest.raises(ConfigError, match=r"\[Peer\] #2 PublicKey: expected another device's"):
        check_own_key(from_wg_quick(str(path)))


# --------------------------------------------------------------------------
# The TOML file: framing = "wireguard"
# --------------------------------------------------------------------------


def key_file(tmp_path: Path, key: bytes, name: str = "wg.key", mode: int = 0o600,
             text: str | None = None) -> Path:
    path = tmp_path / name
    path.write_text(B64(key) + "\n" if text is None else text)
    path.chmod(mode)
    return path


def toml(tmp_path: Path, text: str = "", peers: str | None = None, key: bool = True) -> Path:
    if key and not (tmp_path / "wg.key").exists():
        key_file(tmp_path, PRIVATE)
    if peers is None:
        peers = f'[[peer]]\nname = "office"\npublic_key = "{B64(PEER1)}"\n' \
                f'allowed_ips = ["10.9.0.2/32"]\n'
    body = ('[transport]\nframing = "wireguard"\n[wireguard]\nprivate_key_file = "wg.key"\n'
            if "[transport]" not in text else "")
    path = tmp_path / "relay.toml"
    path.write_text(body + text + "\n" + peers)
    return path


FULL_TOML = f"""\
[device]
name = "wg7"
address = ["10.9.0.1/24", "fd09::1/64"]
queues = 2

[transport]
framing = "wireguard"
listen = "[::]:51999"

[wireguard]
private_key_file = "wg.key"
fwmark = 0x42

[security]
user = 0

[stats]
socket = "/tmp/wg7.sock"

[[peer]]
name = "office"
public_key = "{B64(PEER1)}"
preshared_key_file = "office.psk"
endpoint = "vpn.example.net:51820"
allowed_ips = ["10.9.0.2/32", "192.168.77.0/24"]
persistent_keepalive = 25

[[peer]]
name = "laptop"
public_key = "{B64(PEER2)}"
allowed_ips = ["10.9.0.3/32", "fd09::3/128"]
"""


def full_toml(tmp_path: Path) -> Path:
    key_file(tmp_path, PRIVATE)
    key_file(tmp_path, PSK, "office.psk")
    path = tmp_path / "relay.toml"
    path.write_text(FULL_TOML)
    return path


def test_toml_wireguard_file(tmp_path):
    cfg = load(full_toml(tmp_path))
    assert cfg.transport.framing == "wireguard"
    assert cfg.wireguard.private_key == PRIVATE and cfg.wireguard.fwmark == 0x42
    assert cfg.device.mtu == 1420  # WireGuard's default
    office, laptop = cfg.peers
    assert office.public_key == PEER1 and office.preshared_key == PSK
    assert office.persistent_keepalive == 25
    assert laptop.preshared_key is None and laptop.endpoint is None
    wg = from_relay_config(cfg, resolve=no_dns)
    assert wg.private_key == PRIVATE and wg.listen_port == 51999 and wg.fwmark == 0x42
    assert wg.peers[0] == PeerConfig(
        public_key=PEER1, preshared_key=PSK, endpoint=("192.0.2.44", 51820),
        allowed_ips=(ipaddress.ip_network("10.9.0.2/32"), ipaddress.ip_network("192.168.77.0/24")),
        persistent_keepalive=25, name="office")
    assert wg.peers[0].preshared_key == PSK
    assert wg.peers[1].name == "laptop" and wg.peers[1].endpoint is None
    assert wg.addresses == cfg.device.addresses and wg.mtu == 1420
    settings = from_relay_config_settings(cfg, resolve=False)
    assert settings.bind == "::" and settings.control_socket == "/tmp/wg7.sock"
    assert settings.device.queues == 2 and settings.user == 0


def test_toml_wireguard_defaults(tmp_path):
    cfg = load(toml(tmp_path))
    assert str(cfg.transport.listen) == "[::]:51820"
    assert cfg.device.mtu == 1420 and cfg.wireguard.fwmark == 0
    assert cfg.peers[0].persistent_keepalive == 0
    assert load(toml(tmp_path, "[device]\nmtu = 1300\n")).device.mtu == 1300


def test_toml_wireguard_ipv6_endpoint_keeps_the_wireguard_port(tmp_path):
    """A peer reached over IPv6 needs a dual-stack socket, which the
    WireGuard default listen ("[::]:51820") already is."""
    cfg = load(toml(tmp_path, peers=peer_with('endpoint = "[2001:db8::9]:51820"')))
    assert str(cfg.transport.listen) == "[::]:51820"
    v4 = toml(tmp_path, WG_HEAD.replace('framing = "wireguard"\n',
                                        'framing = "wireguard"\nlisten = "0.0.0.0:51820"\n'),
              peers=peer_with('endpoint = "[2001:db8::9]:51820"'))
    with pytest.raises(ConfigError, match=r'\[peer #1 "office"\] endpoint: expected the address '
                                          r"family of \[transport\] listen 0.0.0.0:51820"):
        load(v4)


def test_toml_wireguard_round_trip(tmp_path):
    cfg = load(full_toml(tmp_path))
    again = loads(to_toml(cfg), cfg.path)
    assert again == cfg
    assert again.wireguard.private_key == PRIVATE and again.peers[0].preshared_key == PSK


def test_key_file_forms(tmp_path):
    """Exactly what `wg genkey` writes; one trailing newline or none."""
    key_file(tmp_path, PRIVATE, text=B64(PRIVATE))
    assert load(toml(tmp_path)).wireguard.private_key == PRIVATE


@pytest.mark.parametrize("text, found", [
    (B64(PRIVATE) + "\n\n", "46 bytes"),
    (B64(PRIVATE) + " \n", "46 bytes"),
    (" " + B64(PRIVATE) + "\n", "46 bytes"),
    (B64(PRIVATE)[:-2] + "=\n", "44 bytes"),
    (B64(PRIVATE)[:-2] + "B=\n", "not base64 of 32 bytes"),  # non-canonical
    (base64.b64encode(PRIVATE).hex() + "\n", "bytes"),
    ("", "0 bytes"),
])
def test_key_file_content_must_be_exact(tmp_path, text, found):
    key_file(tmp_path, PRIVATE, text=text)
    with pytest.raises(ConfigError) as info:
        load(toml(tmp_path))
    message = str(info.value)
    assert "[wireguard] private_key_file: private key file" in message
    assert "44 characters of base64" in message and found in message, message


def test_key_file_permissions_owner_and_links(tmp_path):
    path = key_file(tmp_path, PRIVATE, mode=0o640)
    with pytest.raises(ConfigError, match=r"\[wireguard\] private_key_file: .*open to group or "
                                          r"others \(mode 640\); expected 600: chmod 600"):
        load(toml(tmp_path))
    path.chmod(0o400)
    assert load(toml(tmp_path)).wireguard.private_key == PRIVATE  # stricter is fine
    if os.geteuid() == 0:
        os.chown(path, 65534, -1)
        with pytest.raises(ConfigError, match="owned by uid 65534; expected uid 0"):
            load(toml(tmp_path))
    path.unlink()
    real = key_file(tmp_path, PRIVATE, name="real.key")
    path.symlink_to(real)
    with pytest.raises(ConfigError, match="is a symbolic link"):
        load(toml(tmp_path))
    path.unlink()
    with pytest.raises(ConfigError, match="cannot read private key file .*wg.key"):
        load(toml(tmp_path, key=False))


def test_preshared_key_file_is_checked_like_the_private_key(tmp_path):
    key_file(tmp_path, PSK, "p.psk", mode=0o644)
    peers = (f'[[peer]]\nname = "office"\npublic_key = "{B64(PEER1)}"\n'
             f'preshared_key_file = "p.psk"\nallowed_ips = ["10.9.0.2/32"]\n')
    with pytest.raises(ConfigError, match=r'\[peer #1 "office"\] preshared_key_file: preshared '
                                          r"key file .*p.psk is open to group or others"):
        load(toml(tmp_path, peers=peers))
    (tmp_path / "p.psk").chmod(0o600)
    assert load(toml(tmp_path, peers=peers)).peers[0].preshared_key == PSK


WG_HEAD = '[transport]\nframing = "wireguard"\n[wireguard]\nprivate_key_file = "wg.key"\n'


def peer_with(extra: str, public_key: str | None = None, name: str = "office") -> str:
    key = B64(PEER1) if public_key is None else public_key
    key_line = f'public_key = "{key}"\n' if key else ""
    return f'[[peer]]\nname = "{name}"\n{key_line}allowed_ips = ["10.9.0.2/32"]\n{extra}\n'


BAD_TOML = [
    # (more text before the peers, peers, dotted key, what the message says)
    ("", "", "peer", "at least one [[peer]]"),
    ("", peer_with("", public_key=""), 'peer #1 "office".public_key',
     "expected the peer's public key"),
    ("", peer_with("", public_key="abc"), 'peer #1 "office".public_key',
     'got a string "abc"'),
    ("", peer_with("", public_key=B64(PEER1)[:-1]), 'peer #1 "office".public_key',
     "got 43 characters"),
    ("", peer_with("") + peer_with("", name="again").replace("10.9.0.2/32", "10.9.0.3/32"),
     'peer #2 "again".public_key', "peer \"office\"'s: one key is one peer"),
    ("", peer_with("persistent_keepalive = 65536"), 'peer #1 "office".persistent_keepalive',
     "from 0 to 65535, got 65536"),
    ("", peer_with('persistent_keepalive = "25"'), 'peer #1 "office".persistent_keepalive',
     'got a string "25"'),
    ("", peer_with("roaming = true"), 'peer #1 "office".roaming',
     "always follows its newest authenticated datagram"),
    ("", peer_with('endpoint = "198.51.100.1"'), 'peer #1 "office".endpoint', "missing ':port'"),
    ("", f'[[peer]]\npublic_key = "{B64(PEER1)}"\nallowed_ips = ["10.9.0.2/32"]\n',
     "peer #1.name", "expected a name for this peer"),
    (f"{WG_HEAD}fwmark = -1\n", None, "wireguard.fwmark", "from 0 to 4294967295"),
    (f"{WG_HEAD}fw_mark = 1\n", None, "wireguard.fw_mark", "did you mean 'fwmark'"),
    ('[security]\nkey_file = "wg.key"\n', None, "security.key_file",
     "a WireGuard device has no shared key"),
    ('[security]\nrole = "a"\n', None, "security.role", "gives each direction its own key"),
    ('[security]\ncipher = "aes-256-gcm"\n', None, "security.cipher", "ChaCha20-Poly1305"),
    ('[relay]\nengine = "python"\n', None, "relay.engine", "the Python pump has no sessions"),
    ('[device]\nmode = "tap"\n', None, "device.mode", "WireGuard carries IP packets"),
    ("[relay]\nbatch = 32\n", None, "relay.batch", "sizes its pumps' batches itself"),
]


@pytest.mark.parametrize("text, peers, key, message", BAD_TOML)
def test_bad_toml_wireguard_file(tmp_path, text, peers, key, message):
    path = toml(tmp_path, text, peers=peers)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == key, str(info.value)
    assert message in str(info.value)
    assert str(info.value).startswith(f"{path}: "), str(info.value)


BAD_TRANSPORT = [
    # (the whole file head, dotted key, message)
    ('[transport]\nframing = "wireguard"\nprotocol = "tcp"\n', "transport.protocol",
     "WireGuard runs over UDP only"),
    ('[transport]\nframing = "wireguard"\npeer = "192.0.2.1:51820"\n', "transport.peer",
     "known by its public key"),
    ('[transport]\nframing = "wireguard"\nlearn = "never"\n', "transport.learn",
     'does not apply to framing = "wireguard"'),
    ('[transport]\nframing = "wireguard"\n', "wireguard.private_key_file",
     "genkey --wireguard"),
    ('[transport]\nframing = "wg"\n', "transport.framing", '"aead" (or "wireguard" over UDP)'),
    ('[wireguard]\nprivate_key_file = "wg.key"\n[transport]\nframing = "raw"\n',
     "transport.framing", "with a [wireguard] table"),
]


@pytest.mark.parametrize("head, key, message", BAD_TRANSPORT)
def test_bad_toml_transport_for_wireguard(tmp_path, head, key, message):
    key_file(tmp_path, PRIVATE)
    with pytest.raises(ConfigError) as info:
        load(toml(tmp_path, head))
    assert info.value.key == key, str(info.value)
    assert message in str(info.value)


def test_wireguard_peer_keys_need_framing_wireguard(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text('[[peer]]\nname = "a"\nendpoint = "192.0.2.1:1"\nallowed_ips = '
                    f'["10.0.0.2/32"]\npublic_key = "{B64(PEER1)}"\n')
    with pytest.raises(ConfigError, match=r'\[peer #1 "a"\] public_key: applies to framing = '
                                          r'"wireguard" only.*got framing = "raw"'):
        load(path)


def test_two_wireguard_peers_may_share_an_endpoint(tmp_path):
    """Sessions, not addresses, tell WireGuard peers apart."""
    peers = (peer_with('endpoint = "192.0.2.9:51820"')
             + peer_with('endpoint = "192.0.2.9:51820"', public_key=B64(PEER2), name="two")
             .replace("10.9.0.2/32", "10.9.0.3/32"))
    assert len(load(toml(tmp_path, peers=peers)).peers) == 2


def test_toml_own_public_key_is_refused(tmp_path):
    cfg = load(toml(tmp_path, peers=peer_with("", public_key=B64(PUBLIC))))
    with pytest.raises(ConfigError, match=r'\[peer #1 "office"\] public_key: expected another'):
        check_own_key(from_relay_config_settings(cfg, resolve=False))


def test_toml_unresolvable_endpoint_names_the_peer(tmp_path):
    cfg = load(toml(tmp_path, peers=peer_with('endpoint = "nowhere.invalid:51820"')))
    with pytest.raises(ConfigError, match=r"\[peer #1\] endpoint: expected a hostname that "
                                          r"resolves, got 'nowhere.invalid'"):
        from_relay_config(cfg, resolve=no_dns)


# --------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------


def tunrelay(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, "-m", "tunrelay", *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=60)


def test_cli_check_both_files(tmp_path):
    done = tunrelay("check", "--config", str(full_toml(tmp_path)))
    assert done.returncode == 0, done.stderr
    assert "wireguard device wg7 mtu 1420" in done.stdout
    assert f"public key {B64(PUBLIC)}" in done.stdout
    assert "office vpn.example.net:51820" in done.stdout  # check resolves nothing
    assert "laptop (endpoint from its handshake)" in done.stdout
    conf = write(tmp_path, REALISTIC.replace("vpn.example.net", "198.51.100.7"))
    done = tunrelay("check", "--wg-config", str(conf))
    assert done.returncode == 0, done.stderr
    assert "wireguard device wg0 mtu 1380" in done.stdout and "fwmark 0x1234" in done.stdout
    assert f"{short_key(PEER2)} 198.51.100.7:51821" in done.stdout
    assert "accepted and ignored" in done.stderr


def test_cli_errors_exit_2_naming_file_line_key(tmp_path):
    conf = write(tmp_path, "[Interface]\nListenPort = 70000\n")
    done = tunrelay("check", "--wg-config", str(conf))
    assert done.returncode == 2
    assert done.stderr.strip() == (f"tunrelay: {conf}: line 2: [Interface] ListenPort: expected "
                                   "a port from 0 to 65535, got '70000'")
    path = toml(tmp_path, peers=peer_with("", public_key=B64(PUBLIC)))
    done = tunrelay("check", "--config", str(path))
    assert done.returncode == 2 and "this device's own" in done.stderr
    for argv in (("check", "--config", str(path), "--name", "x"),
                 ("run", "--config", str(path), "--socket", "/tmp/x.sock"),
                 ("run", "--config", str(path), "--wg-config", str(conf))):
        done = tunrelay(*argv)
        assert done.returncode == 2, argv
        assert "--" in done.stderr


def test_cli_genkey_and_pubkey_match_each_other_and_noise():
    done = tunrelay("genkey", "--wireguard")
    assert done.returncode == 0
    private = base64.b64decode(done.stdout.strip())
    assert len(private) == 32 and private[0] & 7 == 0 and private[31] & 0xC0 == 0x40  # clamped
    done = tunrelay("pubkey", stdin=done.stdout)
    assert done.returncode == 0
    assert done.stdout.strip() == B64(private_to_public(private))
    assert tunrelay("pubkey", stdin=B64(PRIVATE)).stdout.strip() == B64(PUBLIC)  # no newline
    bad = tunrelay("pubkey", stdin="not a key\n")
    assert bad.returncode == 2 and "expected a private key" in bad.stderr
    assert len(base64.b64decode(tunrelay("genkey").stdout)) == 32  # the aead key still


def test_cli_pubkey_agrees_with_wg_when_installed():
    import shutil
    if shutil.which("wg") is None:
        pytest.skip("wireguard-tools not installed")
    mine = tunrelay("pubkey", stdin=B64(PRIVATE) + "\n").stdout
    theirs = subprocess.run(["wg", "pubkey"], input=B64(PRIVATE) + "\n", capture_output=True,
                            text=True).stdout
    assert mine == theirs


def test_cli_run_wg_config_user_must_exist(tmp_path):
    conf = write(tmp_path, f"[Interface]\nPrivateKey = {B64(PRIVATE)}\n")
    done = tunrelay("run", "--wg-config", str(conf), "--user", "no-such-user-here")
    assert done.returncode == 2 and "not a user on this system" in done.stderr


def test_cli_main_in_process(tmp_path, capsys):
    """The same through main(), for coverage of the error mapping."""
    conf = write(tmp_path, "[Peer]\nAllowedIPs = 10.0.0.0/24\n")
    assert cli_main(["check", "--wg-config", str(conf)]) == 2
    assert "line 1: [Peer]: expected a PublicKey" in capsys.readouterr().err


# --------------------------------------------------------------------------
# tunrelay stats: the WireGuard rows
# --------------------------------------------------------------------------


def test_format_table_of_a_wireguard_snapshot():
    snapshot = {
        "device": "wg0", "mode": "tun", "transport": "udp", "framing": "wireguard",
        "engine": "fast", "queues": 1, "state": "running", "peer_mode": "2 WireGuard peer(s)",
        "uptime": 12.0,
        "wireguard": {"public_key": B64(PUBLIC), "listen_port": 51820, "fwmark": 0,
                      "counters": {"handshakes": {"completed": 3, "refused": 0}}},
        "wg_peers": [
            {"name": "office", "public_key": B64(PEER1), "endpoint": "192.0.2.7:51820",
             "latest_handshake": 1000.0, "tx_bytes": 1234, "rx_bytes": 5678,
             "persistent_keepalive": 25, "allowed_ips": ["10.9.0.2/32"]},
            {"name": short_key(PEER2), "public_key": B64(PEER2), "endpoint": None,
             "latest_handshake": None, "tx_bytes": 0, "rx_bytes": 0,
             "persistent_keepalive": 0, "allowed_ips": []},
        ],
    }
    text = format_table(snapshot)
    assert f"public key {B64(PUBLIC)}, listening on port 51820" in text
    office = next(line for line in text.splitlines() if line.startswith("office"))
    assert "192.0.2.7:51820" in office and "1234" in office and "5678" in office
    assert "s ago" in office
    other = next(line for line in text.splitlines() if line.startswith(short_key(PEER2)))
    assert "never" in other and "(unknown)" in other
    assert "handshakes.completed 3" in text and "refused" not in text  # zeros left out
    assert "egress" not in text  # no pump counters in this snapshot: no table of them
