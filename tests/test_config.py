"""tunrelay.daemon.config: good files, bad files (one per rule), endpoints, round trip.

No root needed: the only system look-ups are pwd/grp for "root" (uid/gid 0).
"""

from __future__ import annotations

import ast
import dataclasses
import os
import socket
import sys
from ipaddress import ip_interface, ip_network
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tunrelay.daemon.config
from tunrelay import aead
from tunrelay.daemon.config import (
    DEFAULT_BUSY_POLL_US,
    Config,
    DeviceConfig,
    Endpoint,
    PeerConfig,
    RelayConfig,
    StatsConfig,
    TransportConfig,
    load,
    loads,
    parse_endpoint,
    to_toml,
)
from tunrelay.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "relay.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str) -> Config:
    return load(write(tmp_path, text))


# --------------------------------------------------------------------------
# Good files
# --------------------------------------------------------------------------

FULL = """\
[device]
name = "tun7"
mode = "tap"
mtu = 1500
address = ["10.10.0.1/24", "fd00:10::1/64"]
routes = ["192.168.50.0/24", "fd00:50::/48"]
persist = true
owner = "root"
group = "root"
queues = 1

[transport]
protocol = "udp"
listen = "0.0.0.0:4000"
peer = "192.0.2.7:5000"
framing = "len16"

[relay]
batch = 128
engine = "python"
io = "syscalls"

[stats]
interval = 2.5
socket = "/tmp/tunrelay-test.sock"
"""


# aead over TCP: the key file is relative to the config file.
AEAD_TCP_CLIENT = ('[transport]\nprotocol = "tcp"\npeer = "192.0.2.7:55555"\nframing = "aead"\n'
                   '[security]\nkey_file = "relay.key"\n')
AEAD_TCP_SERVER = '[transport]\nprotocol = "tcp"\nframing = "aead"\n[security]\nkey_file = "relay.key"\n'


def test_empty_file_is_a_udp_relay_that_learns_its_peer(tmp_path):
    cfg = load_text(tmp_path, "")
    assert cfg.path == str(tmp_path / "relay.toml")
    assert cfg.device == DeviceConfig()
    assert cfg.transport == TransportConfig(
        protocol="udp", listen=Endpoint("0.0.0.0", 55555), peer=None, framing="raw")
    assert not cfg.transport.is_server
    assert cfg.relay == RelayConfig(batch=64, engine="fast", io="auto")
    assert cfg.stats == StatsConfig(interval=0.0, socket="")
    assert cfg.control_socket == "/run/tunrelay/tunrelay.sock"


def test_loop_defaults_follow_the_engine(tmp_path):
    fast = load_text(tmp_path, "").relay
    assert (fast.duplex, fast.busy_poll_us) == ("auto", None)
    assert fast.duplex_for() and fast.busy_poll_for() == DEFAULT_BUSY_POLL_US
    python = load_text(tmp_path, '[relay]\nengine = "python"\n').relay
    assert not python.duplex_for() and python.busy_poll_for() == 0
    chosen = load_text(tmp_path, "[relay]\nduplex = false\nbusy_poll_us = 0\n").relay
    assert not chosen.duplex_for() and chosen.busy_poll_for() == 0
    chosen = load_text(tmp_path, "[relay]\nduplex = true\nbusy_poll_us = 250\n").relay
    assert chosen.duplex_for() and chosen.busy_poll_for() == 250


def test_empty_tables_are_allowed(tmp_path):
    cfg = load_text(tmp_path, "[device]\n[transport]\n[relay]\n[stats]\n")
    assert cfg == dataclasses.replace(loads(""), path=cfg.path)


def test_minimal_file_with_a_peer(tmp_path):
    cfg = load_text(tmp_path, '[transport]\npeer = "192.0.2.7:55555"\n')
    assert cfg.transport.peer == Endpoint("192.0.2.7", 55555)
    assert cfg.transport.listen == Endpoint("0.0.0.0", 55555)
    assert cfg.transport.framing == "raw"


def test_full_file(tmp_path):
    cfg = load_text(tmp_path, FULL)
    assert cfg.device == DeviceConfig(
        name="tun7", mode="tap", mtu=1500,
        addresses=(ip_interface("10.10.0.1/24"), ip_interface("fd00:10::1/64")),
        routes=(ip_network("192.168.50.0/24"), ip_network("fd00:50::/48")),
        persist=True, owner=0, group=0, queues=1)
    assert cfg.transport == TransportConfig(
        protocol="udp", listen=Endpoint("0.0.0.0", 4000), peer=Endpoint("192.0.2.7", 5000),
        framing="len16")
    assert cfg.relay == RelayConfig(batch=128, engine="python", io="syscalls")
    assert cfg.stats == StatsConfig(interval=2.5, socket="/tmp/tunrelay-test.sock")
    assert cfg.control_socket == "/tmp/tunrelay-test.sock"


def test_ipv6_underlay_listens_on_the_ipv6_wildcard(tmp_path):
    cfg = load_text(tmp_path, '[transport]\npeer = "[2001:db8::7]:55555"\n')
    assert cfg.transport.peer == Endpoint("2001:db8::7", 55555)
    assert cfg.transport.peer.family == socket.AF_INET6
    assert cfg.transport.listen == Endpoint("::", 55555)
    assert str(cfg.transport.listen) == "[::]:55555"


def test_ipv6_underlay_with_explicit_listen(tmp_path):
    cfg = load_text(tmp_path, '[transport]\nlisten = "[::1]:4000"\npeer = "[::1]:5000"\n')
    assert cfg.transport.listen == Endpoint("::1", 4000)


def test_tcp_server_defaults(tmp_path):
    cfg = load_text(tmp_path, '[transport]\nprotocol = "tcp"\n')
    assert cfg.transport.is_server
    assert cfg.transport.listen == Endpoint("0.0.0.0", 55555)
    assert cfg.transport.framing == "len16"


def test_tcp_client_defaults_bind_nothing(tmp_path):
    cfg = load_text(tmp_path, '[transport]\nprotocol = "tcp"\npeer = "192.0.2.7:55555"\n')
    assert not cfg.transport.is_server
    assert cfg.transport.listen is None
    assert cfg.transport.framing == "len16"


def test_tcp_client_with_a_local_bind_address(tmp_path):
    cfg = load_text(tmp_path, '[transport]\nprotocol = "tcp"\nlisten = "10.0.0.2:0"\n'
                              'peer = "192.0.2.7:55555"\n')
    assert cfg.transport.listen == Endpoint("10.0.0.2", 0)


def test_len16_over_udp_is_allowed(tmp_path):
    assert load_text(tmp_path, '[transport]\nframing = "len16"\n').transport.framing == "len16"


def key_file(directory: Path, name: str = "relay.key") -> Path:
    """An owner-only key file as `tunrelay genkey` would fill it."""
    path = directory / name
    path.write_text(aead.genkey() + "\n")
    path.chmod(0o600)
    return path


def test_aead_default_mtu_follows_the_wire_overhead(tmp_path):
    key_file(tmp_path)
    cfg = load_text(tmp_path, AEAD_TCP_SERVER)
    assert cfg.device.mtu == tunrelay.daemon.config.AEAD_DEFAULT_MTU == 1400 - aead.OVERHEAD


@pytest.mark.parametrize("text, role", [
    (AEAD_TCP_CLIENT, "a"),
    (AEAD_TCP_CLIENT + 'role = "a"\n', "a"),
    (AEAD_TCP_SERVER, "b"),
    (AEAD_TCP_SERVER + 'role = "b"\n', "b"),
])
def test_aead_over_tcp_derives_the_role_client_a_server_b(tmp_path, text, role):
    key_file(tmp_path)
    cfg = load_text(tmp_path, text)
    assert cfg.transport.protocol == "tcp" and cfg.transport.framing == "aead"
    assert cfg.security.role == role
    assert len(cfg.security.key) == 32


@pytest.mark.parametrize("role", ["a", "b"])
def test_aead_over_udp_keeps_the_given_role(tmp_path, role):
    key_file(tmp_path)
    cfg = load_text(tmp_path, '[transport]\nframing = "aead"\npeer = "192.0.2.7:1"\n'
                              f'[security]\nkey_file = "relay.key"\nrole = "{role}"\n')
    assert cfg.security.role == role


def test_role_is_empty_without_aead(tmp_path):
    assert load_text(tmp_path, "").security.role == ""
    assert load_text(tmp_path, '[transport]\nprotocol = "tcp"\n').security.role == ""


def test_learn_defaults_to_once_and_never_needs_a_peer(tmp_path):
    assert load_text(tmp_path, "").transport.learn == "once"
    assert TransportConfig().learn == "once"
    cfg = load_text(tmp_path, '[transport]\nlearn = "never"\npeer = "192.0.2.7:1"\n')
    assert cfg.transport.learn == "never"
    cfg = load_text(tmp_path, '[transport]\nlearn = "once"\nframing = "len16"\n')
    assert cfg.transport.learn == "once" and cfg.transport.peer is None


def test_allow_on_a_tcp_server(tmp_path):
    cfg = load_text(tmp_path, '[transport]\nprotocol = "tcp"\n'
                              'allow = ["192.0.2.0/24", "2001:db8::/32", "10.1.2.3/32"]\n')
    assert cfg.transport.allow == (ip_network("192.0.2.0/24"), ip_network("2001:db8::/32"),
                                   ip_network("10.1.2.3/32"))
    assert load_text(tmp_path, '[transport]\nprotocol = "tcp"\n').transport.allow == ()


def test_away_hold_ms_on_tcp_client_and_server(tmp_path):
    """TCP: how long a packet may wait in the device while no peer is
    connected; 1000 ms unless given, 0 (drop at once) allowed."""
    assert load_text(tmp_path, '[transport]\nprotocol = "tcp"\n').transport.away_hold_ms == 1000
    assert TransportConfig(protocol="tcp").away_hold_ms == 1000
    cfg = load_text(tmp_path, '[transport]\nprotocol = "tcp"\naway_hold_ms = 0\n')
    assert cfg.transport.away_hold_ms == 0
    cfg = load_text(tmp_path, '[transport]\nprotocol = "tcp"\npeer = "192.0.2.7:1"\n'
                              'away_hold_ms = 600000\n')
    assert cfg.transport.away_hold_ms == 600000


def test_allow_on_an_aead_tcp_server(tmp_path):
    key_file(tmp_path)
    cfg = load_text(tmp_path, AEAD_TCP_SERVER.replace('framing = "aead"\n',
                                                      'framing = "aead"\nallow = ["::/0"]\n'))
    assert cfg.transport.allow == (ip_network("::/0"),)


def test_link_local_endpoints_keep_their_interface(tmp_path):
    cfg = load_text(tmp_path, '[transport]\nlisten = "[fe80::2%eth0]:0"\npeer = "[fe80::1%eth0]:55555"\n')
    assert cfg.transport.peer == Endpoint("fe80::1%eth0", 55555)
    assert cfg.transport.listen == Endpoint("fe80::2%eth0", 0)
    assert str(cfg.transport.peer) == "[fe80::1%eth0]:55555"
    assert load_text(tmp_path, '[transport]\npeer = "[fe80::1%2]:1"\n').transport.peer.host == "fe80::1%2"


def test_transport_config_built_in_code_has_the_file_defaults():
    assert TransportConfig() == loads("").transport
    assert TransportConfig(protocol="tcp").framing == "len16"
    assert TransportConfig(protocol="tcp", peer=Endpoint("192.0.2.7", 1)).listen is None
    assert TransportConfig(peer=Endpoint("2001:db8::1", 1)).listen == Endpoint("::", 55555)


def test_address_as_a_string(tmp_path):
    cfg = load_text(tmp_path, '[device]\naddress = "10.10.0.1/24"\n')
    assert cfg.device.addresses == (ip_interface("10.10.0.1/24"),)


def test_address_as_a_list(tmp_path):
    cfg = load_text(tmp_path, '[device]\naddress = ["10.10.0.1/24", "fd00::1/64"]\n')
    assert cfg.device.addresses == (ip_interface("10.10.0.1/24"), ip_interface("fd00::1/64"))


@pytest.mark.parametrize("value", ['"root"', "0"])
def test_owner_and_group_by_name_or_id(tmp_path, value):
    cfg = load_text(tmp_path, f"[device]\nowner = {value}\ngroup = {value}\n")
    assert (cfg.device.owner, cfg.device.group) == (0, 0)


def test_a_numeric_id_need_not_exist(tmp_path):
    cfg = load_text(tmp_path, "[device]\nowner = 4294967294\ngroup = 54321\n")
    assert (cfg.device.owner, cfg.device.group) == (4294967294, 54321)


def test_hostnames_are_kept_for_run_time_without_dns(tmp_path, monkeypatch):
    def no_dns(*args, **kwargs):
        raise AssertionError("DNS at load time")
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(socket, "gethostbyname", no_dns)
    cfg = load_text(tmp_path, '[transport]\nlisten = "[::]:1"\npeer = "relay-b.example.org:55555"\n')
    assert cfg.transport.peer == Endpoint("relay-b.example.org", 55555)
    assert cfg.transport.peer.family is None


@pytest.mark.parametrize("name", ["", "tun0", "tun%d", "a" * 15, "tunnel-é7"])
def test_good_device_names(tmp_path, name):
    assert load_text(tmp_path, f'[device]\nname = "{name}"\n').device.name == name


def test_mtu_limits(tmp_path):
    assert load_text(tmp_path, '[device]\nmtu = 68\naddress = "10.0.0.1/30"\n').device.mtu == 68
    assert load_text(tmp_path, '[device]\nmtu = 1280\naddress = "fd00::1/64"\n').device.mtu == 1280
    assert load_text(tmp_path, "[device]\nmtu = 65535\n").device.mtu == 65535


def test_interval_accepts_an_integer(tmp_path):
    interval = load_text(tmp_path, "[stats]\ninterval = 10\n").stats.interval
    assert interval == 10.0 and isinstance(interval, float)


def test_control_socket_defaults_to_the_device_name(tmp_path):
    assert load_text(tmp_path, '[device]\nname = "tun3"\n').control_socket == "/run/tunrelay/tun3.sock"
    assert StatsConfig(socket="/x.sock").socket_path("tun3") == "/x.sock"


def test_configs_are_frozen():
    cfg = loads("")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.device.mtu = 9000  # type: ignore[misc]


def test_load_accepts_str_and_path(tmp_path):
    path = write(tmp_path, "")
    assert load(str(path)) == load(path)


# --------------------------------------------------------------------------
# [[peer]] tables
# --------------------------------------------------------------------------

HUB = """\
[device]
address = ["10.77.0.1/24", "fd77::1/64"]

[[peer]]
name = "spoke1"
endpoint = "198.18.1.2:55555"
allowed_ips = ["10.77.0.2/32", "fd77::2/128"]

[[peer]]
name = "spoke2"
roaming = true
allowed_ips = ["10.77.0.3/32"]
"""


def peer(name: str = "p", *lines: str, endpoint: str | None = "192.0.2.7:1",
         allowed: str = '["10.0.0.2/32"]') -> str:
    """One [[peer]] table's text."""
    text = f'[[peer]]\nname = "{name}"\n' if name is not None else "[[peer]]\n"
    if endpoint is not None:
        text += f'endpoint = "{endpoint}"\n'
    if allowed is not None:
        text += f"allowed_ips = {allowed}\n"
    return text + "".join(line + "\n" for line in lines)


def test_peers_are_read_in_order_with_their_defaults(tmp_path):
    cfg = load_text(tmp_path, HUB)
    assert cfg.peers == (
        PeerConfig(name="spoke1", endpoint=Endpoint("198.18.1.2", 55555), roaming=False,
                   allowed_ips=(ip_network("10.77.0.2/32"), ip_network("fd77::2/128"))),
        PeerConfig(name="spoke2", endpoint=None, roaming=True,
                   allowed_ips=(ip_network("10.77.0.3/32"),)),
    )
    # The rest is a plain UDP relay without a [transport] peer.
    assert cfg.transport == TransportConfig(protocol="udp", listen=Endpoint("0.0.0.0", 55555),
                                            peer=None, framing="raw")


def test_roaming_is_off_unless_asked_for(tmp_path):
    """raw and len16 authenticate nothing: an endpoint moves only when the
    peer's table says roaming = true."""
    assert load_text(tmp_path, peer("a")).peers[0].roaming is False
    assert load_text(tmp_path, peer("a", "roaming = true")).peers[0].roaming is True
    cfg = load_text(tmp_path, '[transport]\nframing = "len16"\n' + peer("a"))
    assert cfg.transport.framing == "len16" and cfg.peers[0].roaming is False


def test_a_peer_without_endpoint_is_learned_when_it_roams(tmp_path):
    cfg = load_text(tmp_path, peer("a", "roaming = true", endpoint=None))
    assert cfg.peers[0].endpoint is None and cfg.peers[0].roaming


def test_no_peers_is_the_point_to_point_relay(tmp_path):
    assert load_text(tmp_path, "").peers == ()
    cfg = load_text(tmp_path, '[transport]\npeer = "192.0.2.7:55555"\nlearn = "never"\n')
    assert cfg.peers == () and cfg.transport.learn == "never"


def test_peer_endpoints_take_the_transport_peer_syntax(tmp_path):
    cfg = load_text(tmp_path, peer("a", endpoint="[2001:db8::7]:5") + peer("b", endpoint="relay-b.example:6",
                                                                       allowed='["10.0.0.3/32"]')
                    + peer("c", endpoint="[fe80::1%eth0]:7", allowed='["10.0.0.4/32"]'))
    assert [p.endpoint for p in cfg.peers] == [Endpoint("2001:db8::7", 5),
                                              Endpoint("relay-b.example", 6),
                                              Endpoint("fe80::1%eth0", 7)]


def test_an_ipv6_peer_endpoint_makes_the_default_listen_dual_stack(tmp_path):
    cfg = load_text(tmp_path, peer("a") + peer("b", endpoint="[2001:db8::7]:5", allowed='["10.0.0.3/32"]'))
    assert cfg.transport.listen == Endpoint("::", 55555)
    assert load_text(tmp_path, peer("a")).transport.listen == Endpoint("0.0.0.0", 55555)
    # An IPv4 peer behind an explicit dual-stack wildcard is fine.
    cfg = load_text(tmp_path, '[transport]\nlisten = "[::]:4000"\n' + peer("a"))
    assert cfg.transport.listen == Endpoint("::", 4000)


def test_overlapping_networks_of_two_peers_are_allowed(tmp_path):
    """Longest prefix wins: a /24 to one peer and a /32 inside it to another
    is routing, not a conflict; only the same network twice is."""
    cfg = load_text(tmp_path, peer("a", allowed='["10.0.0.0/24"]')
                    + peer("b", endpoint="192.0.2.8:1", allowed='["10.0.0.2/32"]'))
    assert [p.allowed_ips for p in cfg.peers] == [(ip_network("10.0.0.0/24"),),
                                                 (ip_network("10.0.0.2/32"),)]


def test_many_peers_may_have_many_queues(tmp_path):
    """The PeerTable is shared by every queue's pump, so a learned endpoint
    is known to all of them (unlike a learned [transport] peer)."""
    cfg = load_text(tmp_path, "[device]\nqueues = 4\n" + peer("a", "roaming = true", endpoint=None))
    assert cfg.device.queues == 4


# What a refusal of [[peer]] with TCP, aead or TAP says works instead.
PEERS_WORK_WITH = ['[[peer]] tables work with protocol = "udp", mode = "tun" and framing "raw" or "len16"',
                   'authenticated multi-peer is the "session" framing', "control plane",
                   "embedding API", "WireGuard"]


# (file text, dotted key, what the message must say), run by test_bad_file.
BAD_PEERS = [
    # the table itself
    ('[peer]\nname = "a"\n', "peer", ["expected [[peer]] tables (double brackets", "got a table [peer]"]),
    ('peer = "192.0.2.7:1"\n', "peer",
     ["expected [[peer]] tables", 'got a string "192.0.2.7:1"', "shorthand", "[transport] table"]),
    ('peer = [1, 2]\n', "peer", ["expected [[peer]] tables", "got an array of 2 items"]),
    ('[[peers]]\nname = "a"\n', "peers", ["unknown table", "did you mean 'peer'?"]),
    (peer("a", "allowed = 1"), "peer #1.allowed", ["unknown key", "expected one of: name, endpoint, "
                                                   "allowed_ips, roaming", "did you mean 'allowed_ips'?"]),
    # name
    (peer(None), "peer #1.name", ["expected a name for this peer", "tunrelay stats"]),
    ('[[peer]]\nname = 5\nallowed_ips = ["10.0.0.2/32"]\n', "peer #1.name",
     ["expected a string", "got an integer 5"]),
    (peer(""), "peer #1.name", ["expected 1 to 64 printable characters", 'got ""']),
    (peer("x" * 65), "peer #1.name", ["expected 1 to 64 printable characters"]),
    (peer("a\\tb"), "peer #1.name", ["expected 1 to 64 printable characters", '"a\\tb"']),
    (peer("a") + peer("a", endpoint="192.0.2.8:1", allowed='["10.0.0.3/32"]'), "peer #2.name",
     ["expected a name of its own", 'got "a"', "another [[peer]] has"]),
    # endpoint
    (peer("a", endpoint="192.0.2.7"), 'peer #1 "a".endpoint', ["expected 'host:port'", "missing ':port'"]),
    (peer("a", endpoint="192.0.2.7:0"), 'peer #1 "a".endpoint', ["expected a port from 1 to 65535"]),
    (peer("a", endpoint="2001:db8::1:55555"), 'peer #1 "a".endpoint', ["expected an IPv6 address in brackets"]),
    (peer("a", endpoint="0.0.0.0:1"), 'peer #1 "a".endpoint', ["expected a reachable address"]),
    (peer("a", endpoint="[fe80::1]:1"), 'peer #1 "a".endpoint', ["expected a link-local address with its interface"]),
    ('[[peer]]\nname = "a"\nendpoint = 5\nallowed_ips = ["10.0.0.2/32"]\n', 'peer #1 "a".endpoint',
     ["expected a string 'host:port'", "got an integer 5"]),
    (peer("a", endpoint=None), 'peer #1 "a".endpoint',
     ['expected an endpoint "host:port", or roaming = true', "could never be reached"]),
    (peer("a", "roaming = false", endpoint=None), 'peer #1 "a".endpoint', ["could never be reached"]),
    (peer("a") + peer("b", allowed='["10.0.0.3/32"]'), 'peer #2 "b".endpoint',
     ["expected an endpoint of this peer's own", 'peer "a"\'s', "could not be told apart"]),
    ('[transport]\nlisten = "0.0.0.0:1"\n' + peer("a", endpoint="[2001:db8::7]:1"), 'peer #1 "a".endpoint',
     ["expected the address family of [transport] listen 0.0.0.0:1", "got [2001:db8::7]:1",
      'listen = "[::]:1" reaches both']),
    ('[transport]\nlisten = "[2001:db8::1]:1"\n' + peer("a"), 'peer #1 "a".endpoint',
     ["expected the address family of [transport] listen [2001:db8::1]:1", "got 192.0.2.7:1"]),
    # roaming
    (peer("a", 'roaming = "yes"'), 'peer #1 "a".roaming', ["expected true or false", 'got a string "yes"']),
    # allowed_ips
    (peer("a", allowed=None), 'peer #1 "a".allowed_ips', ["expected the networks routed to this peer"]),
    (peer("a", allowed="[]"), 'peer #1 "a".allowed_ips', ["expected at least one network", "empty array"]),
    (peer("a", allowed='"10.0.0.2/32"'), 'peer #1 "a".allowed_ips', ["expected an array of strings", "got a string"]),
    (peer("a", allowed='["10.0.0.1/24"]'), 'peer #1 "a".allowed_ips',
     ["host bits set", "did you mean '10.0.0.0/24'?"]),
    (peer("a", allowed='["fd00::1/64"]'), 'peer #1 "a".allowed_ips', ["host bits set", "did you mean 'fd00::/64'?"]),
    (peer("a", allowed='["10.0.0.2"]'), 'peer #1 "a".allowed_ips', ["(CIDR)", "got '10.0.0.2'"]),
    (peer("a", allowed='["10.0.0.0/33"]'), 'peer #1 "a".allowed_ips', ["expected a network", "'10.0.0.0/33'"]),
    (peer("a", allowed='["10.0.0.2/32", "10.0.0.2/32"]'), 'peer #1 "a".allowed_ips',
     ["expected each entry once", "'10.0.0.2/32' twice"]),
    (peer("a", allowed='["10.0.0.0/24", "fd00::/64"]')
     + peer("b", endpoint="192.0.2.8:1", allowed='["fd00:0::/64"]'), 'peer #2 "b".allowed_ips',
     ["expected each network in one peer only", "'fd00::/64'", 'peer "a" has too']),
    # with other tables
    ('[transport]\npeer = "192.0.2.9:1"\n' + peer("a"), "transport.peer",
     ["expected no [transport] peer with [[peer]] tables", "one-peer shorthand", "as a [[peer]] table"]),
    ('[transport]\nprotocol = "tcp"\n' + peer("a"), "transport.protocol",
     ['expected "udp" with [[peer]] tables, got "tcp"', "a TCP connection carries one peer",
      *PEERS_WORK_WITH]),
    ('[transport]\nframing = "aead"\n[security]\nkey_file = "relay.key"\nrole = "a"\n' + peer("a"),
     "transport.framing", ['expected "raw" or "len16" with [[peer]] tables, got "aead"',
                           *PEERS_WORK_WITH]),
    ('[device]\nmode = "tap"\n' + peer("a"), "device.mode",
     ['expected "tun" with [[peer]] tables, got "tap"', "inner IP address", *PEERS_WORK_WITH]),
    ('[relay]\nengine = "python"\n' + peer("a"), "relay.engine",
     ['expected "fast" with [[peer]] tables', "the Python pump serves one peer"]),
    ('[transport]\nlearn = "once"\n' + peer("a"), "transport.learn",
     ["does not apply with [[peer]] tables", "roaming = true", "remove learn"]),
    ('[transport]\nlearn = "never"\n' + peer("a"), "transport.learn", ["does not apply with [[peer]] tables"]),
]


def test_peer_errors_name_the_peer_as_the_file_does(tmp_path):
    """By its place among the [[peer]] tables and, once read, its name."""
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, peer("a") + peer("b", endpoint="192.0.2.8:1", allowed='["10.0.0.1/24"]'))
    assert str(info.value).startswith(f'{tmp_path / "relay.toml"}: [peer #2 "b"] allowed_ips: expected')


# --------------------------------------------------------------------------
# Bad files: (file text, dotted key, what the message must say)
# --------------------------------------------------------------------------

BAD = [
    # unknown names
    ('[device]\nadress = "10.0.0.1/24"\n', "device.adress", ["unknown key", "did you mean 'address'?"]),
    ("[device]\nMTU = 1400\n", "device.MTU", ["unknown key", "did you mean 'mtu'?"]),
    ('[transport]\nkey_file = "k"\n', "transport.key_file",
     ["unknown key", "expected one of: protocol, listen, peer, framing"]),
    ("[device.extra]\nx = 1\n", "device.extra", ["unknown key"]),
    ('[devce]\nname = "tun0"\n', "devce", ["unknown table", "did you mean 'device'?"]),
    ("[logging]\n", "logging", ["unknown table", "expected one of: device, transport, relay, security, stats"]),
    ('[metric]\nlisten = "127.0.0.1:9555"\n', "metric", ["unknown table", "did you mean 'metrics'?"]),
    ("mtu = 1400\n", "mtu", ["unknown top-level key", "belongs in the [device] table"]),
    ('device = "tun0"\n', "device", ["expected a table [device]", 'got a string "tun0"']),
    # wrong types
    ("[device]\nmtu = true\n", "device.mtu", ["expected an integer from 68 to 65535", "got a boolean true"]),
    ('[device]\nmtu = "1400"\n', "device.mtu", ["expected an integer from 68 to 65535", 'got a string "1400"']),
    ("[device]\nmtu = 1400.0\n", "device.mtu", ["expected an integer", "got a float 1400.0"]),
    ('[device]\npersist = "yes"\n', "device.persist", ["expected true or false", 'got a string "yes"']),
    ("[device]\npersist = 1\n", "device.persist", ["expected true or false", "got an integer 1"]),
    ("[device]\nname = 5\n", "device.name", ["expected a string", "got an integer 5"]),
    ('[device]\nmode = "tum"\n', "device.mode", ['expected "tun" or "tap"', 'got a string "tum"']),
    ("[device]\naddress = 5\n", "device.address", ["expected a string or an array of strings", "got an integer 5"]),
    ('[device]\naddress = ["10.0.0.1/24", 5]\n', "device.address", ["got an item that is an integer 5"]),
    ('[device]\nroutes = "10.0.0.0/24"\n', "device.routes", ["expected an array of strings", "got a string"]),
    ("[device]\nowner = true\n", "device.owner", ["expected a user name or a numeric id", "got a boolean true"]),
    ("[device]\ngroup = 1.5\n", "device.group", ["expected a group name or a numeric id", "got a float 1.5"]),
    ('[device]\nqueues = "1"\n', "device.queues", ["expected an integer from 1 to 16", 'got a string "1"']),
    ('[transport]\nprotocol = "sctp"\n', "transport.protocol", ['expected "udp" or "tcp"', '"sctp"']),
    ("[transport]\nlisten = 55555\n", "transport.listen", ["expected a string 'host:port'", "got an integer 55555"]),
    ('[transport]\nframing = "chacha"\n', "transport.framing", ['expected "raw", "len16" or "aead"', '"chacha"']),
    ('[transport]\nframing = "aead"\n', "security.key_file", ['needs a key file', "tunrelay genkey"]),
    # [security] role (aead; the key file is not read before the role is checked)
    ('[transport]\nframing = "aead"\n[security]\nkey_file = "relay.key"\n', "security.role",
     ['framing = "aead" over UDP needs role = "a" on one end and "b" on the other',
      "each end needs its own direction", "reflected back"]),
    (AEAD_TCP_CLIENT + 'role = "b"\n', "security.role",
     ['expected "a" for a TCP client (peer set), got "b"', 'the client is "a" and the server "b"']),
    (AEAD_TCP_SERVER + 'role = "a"\n', "security.role",
     ['expected "b" for a TCP server (no peer), got "a"']),
    ('[security]\nrole = "c"\n', "security.role", ['expected "a" or "b"', 'got a string "c"']),
    ('[security]\nrole = 1\n', "security.role", ['expected "a" or "b"', "got an integer 1"]),
    ('[security]\nrole = "a"\n', "security.role", ['applies to framing = "aead" only', 'got framing = "raw"']),
    ('[security]\nrol = "a"\n', "security.rol", ["unknown key", "did you mean 'role'?"]),
    # [transport] learn
    ('[transport]\nlearn = "always"\n', "transport.learn", ['expected "once" or "never"', '"always"']),
    ('[transport]\nlearn = "never"\n', "transport.learn",
     ['expected a [transport] peer with learn = "never"', "nowhere to send"]),
    ('[transport]\nlearn = "once"\nframing = "aead"\npeer = "192.0.2.7:1"\n', "transport.learn",
     ['does not apply to framing = "aead"', "roaming", "remove learn"]),
    ('[transport]\nprotocol = "tcp"\nlearn = "once"\n', "transport.learn",
     ['applies to protocol = "udp" only']),
    # [transport] allow
    ('[transport]\nallow = ["10.0.0.0/8"]\n', "transport.allow",
     ['applies to a TCP server only (protocol = "tcp" without peer)', 'got protocol = "udp"']),
    ('[transport]\nprotocol = "tcp"\npeer = "192.0.2.7:1"\nallow = ["10.0.0.0/8"]\n', "transport.allow",
     ["applies to a TCP server only", "got a TCP client (peer 192.0.2.7:1)"]),
    ('[transport]\nprotocol = "tcp"\nallow = ["10.0.0.1/24"]\n', "transport.allow",
     ["expected a network", "host bits set", "did you mean '10.0.0.0/24'?"]),
    ('[transport]\nprotocol = "tcp"\nallow = ["10.0.0.1"]\n', "transport.allow", ["(CIDR)", "got '10.0.0.1'"]),
    ('[transport]\nprotocol = "tcp"\nallow = "10.0.0.0/8"\n', "transport.allow",
     ["expected an array of strings", "got a string"]),
    ('[transport]\nprotocol = "tcp"\nallow = []\n', "transport.allow",
     ["expected at least one network", "empty array", "leave allow out"]),
    ('[transport]\nprotocol = "tcp"\nallow = ["::/0", "::/0"]\n', "transport.allow",
     ["expected each entry once", "'::/0' twice"]),
    # [transport] away_hold_ms
    ('[transport]\naway_hold_ms = 500\n', "transport.away_hold_ms",
     ['applies to protocol = "tcp" only', 'got protocol = "udp"', "remove away_hold_ms"]),
    ('[transport]\nprotocol = "tcp"\naway_hold_ms = -1\n', "transport.away_hold_ms",
     ["expected an integer from 0 to 600000", "got -1"]),
    ('[transport]\nprotocol = "tcp"\naway_hold_ms = 600001\n', "transport.away_hold_ms",
     ["expected an integer from 0 to 600000", "got 600001"]),
    ('[transport]\nprotocol = "tcp"\naway_hold_ms = 1.5\n', "transport.away_hold_ms",
     ["expected an integer from 0 to 600000", "got a float 1.5"]),
    ('[transport]\nprotocol = "tcp"\naway_hold_ms = "1s"\n', "transport.away_hold_ms",
     ["expected an integer from 0 to 600000", 'got a string "1s"']),
    ('[transport]\nprotocol = "tcp"\naway_hold = 5\n', "transport.away_hold",
     ["unknown key", "did you mean 'away_hold_ms'?"]),
    ("[relay]\nbatch = 1.5\n", "relay.batch", ["expected an integer from 1 to 1024", "got a float 1.5"]),
    ("[relay]\nbatch = true\n", "relay.batch", ["expected an integer from 1 to 1024", "got a boolean true"]),
    ('[relay]\nengine = "c"\n', "relay.engine", ['expected "fast" or "python"', 'got a string "c"']),
    ('[relay]\nduplex = 1\n', "relay.duplex", ['expected true, false or "auto"', "got an integer 1"]),
    ("[relay]\nbusy_poll_us = -1\n", "relay.busy_poll_us",
     ["expected an integer from 0 to 1000000", "got -1"]),
    ('[relay]\nbusy_poll_us = "50"\n', "relay.busy_poll_us",
     ["expected an integer from 0 to 1000000", 'got a string "50"']),
    ('[relay]\nengine = "python"\nduplex = true\n', "relay.duplex",
     ['true needs engine = "fast"']),
    ('[relay]\nengine = "python"\nbusy_poll_us = 50\n', "relay.busy_poll_us",
     ['50 needs engine = "fast"']),
    ('[relay]\nio = "io_uring"\n', "relay.io",
     ['expected "auto", "uring" or "syscalls"', 'got a string "io_uring"']),
    ("[relay]\nio = true\n", "relay.io", ['expected "auto", "uring" or "syscalls"', "got a boolean true"]),
    ('[relay]\nengine = "python"\nio = "uring"\n', "relay.io",
     ['expected "auto" or "syscalls" with engine = "python"', "no io_uring engine", 'got "uring"']),
    ("[stats]\ninterval = true\n", "stats.interval", ["expected a number of seconds", "got a boolean true"]),
    ('[stats]\ninterval = "10"\n', "stats.interval", ["expected a number of seconds", 'got a string "10"']),
    ("[stats]\nsocket = 1\n", "stats.socket", ["expected a string", "got an integer 1"]),
    # endpoints
    ('[transport]\nlisten = "0.0.0.0"\n', "transport.listen", ["expected 'host:port'", "missing ':port'"]),
    ('[transport]\nlisten = "0.0.0.0:"\n', "transport.listen", ["expected a port from 0 to 65535", "missing port"]),
    ('[transport]\nlisten = "0.0.0.0:65536"\n', "transport.listen", ["expected a port from 0 to 65535", "65536"]),
    ('[transport]\nlisten = "0.0.0.0:http"\n', "transport.listen", ["expected a port from 0 to 65535", "'http'"]),
    ('[transport]\nlisten = ":55555"\n', "transport.listen", ["expected 'host:port'", "missing host"]),
    ('[transport]\npeer = "2001:db8::1:55555"\n', "transport.peer",
     ["expected an IPv6 address in brackets", "'[2001:db8::1]:55555'"]),
    ('[transport]\npeer = "2001:db8::1"\n', "transport.peer",
     ["expected an IPv6 address in brackets with a port", "'[2001:db8::1]:55555'"]),
    ('[transport]\npeer = "[2001:db8::1]"\n', "transport.peer", ["expected '[address]:port'", "missing ':port'"]),
    ('[transport]\npeer = "[2001:db8::1:55555"\n', "transport.peer", ["expected '[address]:port'", "no closing ']'"]),
    ('[transport]\npeer = "[192.0.2.7]:55555"\n', "transport.peer",
     ["expected an IPv6 address between the brackets", "'192.0.2.7'"]),
    ('[transport]\npeer = "192.0.2.7:0"\n', "transport.peer", ["expected a port from 1 to 65535", "port 0"]),
    ('[transport]\npeer = "10.0.1:55555"\n', "transport.peer", ["expected an IP address or a hostname", "'10.0.1'"]),
    ('[transport]\npeer = "-bad-:55555"\n', "transport.peer", ["expected an IP address or a hostname", "'-bad-'"]),
    ('[transport]\npeer = "0.0.0.0:55555"\n', "transport.peer", ["expected a reachable address", "0.0.0.0:55555"]),
    ('[transport]\npeer = "[fe80::1]:55555"\n', "transport.peer",
     ["expected a link-local address with its interface", "like '[fe80::1%eth0]:55555'"]),
    ('[transport]\nlisten = "[fe80::2]:0"\npeer = "[fe80::1%eth0]:1"\n', "transport.listen",
     ["expected a link-local address with its interface", "'[fe80::2]:0'"]),
    ('[transport]\npeer = "[2001:db8::1%eth0]:55555"\n', "transport.peer",
     ["expected a scope (%interface) only on a link-local address (fe80::/10)"]),
    ('[transport]\npeer = "[fe80::1%e th0]:55555"\n', "transport.peer",
     ["expected an interface name or index after '%'", "'e th0'"]),
    ('[transport]\npeer = "[fe80::1%interface0123456]:55555"\n', "transport.peer",
     ["expected an interface name or index after '%'", "'interface0123456'"]),
    # [device] values
    ('[device]\nname = "tunnel0123456789"\n', "device.name", ["expected at most 15 bytes", "got 16 bytes"]),
    ('[device]\nname = "ééééééééé"\n', "device.name", ["expected at most 15 bytes", "got 18 bytes"]),
    ('[device]\nname = "tun/0"\n', "device.name", ["without '/'", "'tun/0'"]),
    ('[device]\nname = "tun 0"\n', "device.name", ["whitespace", "'tun 0'"]),
    ('[device]\nname = "tun:0"\n', "device.name", ["':'", "'tun:0'"]),
    ('[device]\nname = "tun\\u0001"\n', "device.name", ["control characters"]),
    ('[device]\nname = "."\n', "device.name", ["expected an interface name", "'.'"]),
    ('[device]\nname = ".."\n', "device.name", ["expected an interface name", "'..'"]),
    ('[device]\nname = "tun%s"\n', "device.name", ["expected at most one '%d'", "'tun%s'"]),
    ('[device]\nname = "t%d%d"\n', "device.name", ["expected at most one '%d'", "'t%d%d'"]),
    ("[device]\nmtu = 70000\n", "device.mtu", ["expected an integer from 68 to 65535, got 70000"]),
    ("[device]\nmtu = 67\n", "device.mtu", ["expected an integer from 68 to 65535, got 67"]),
    ('[device]\nmtu = 1200\naddress = ["10.0.0.1/24", "fd00::1/64"]\n', "device.mtu",
     ["expected at least 1280", "IPv6 (fd00::1/64)", "RFC 8200", "got 1200"]),
    ('[device]\nmtu = 1279\nroutes = ["fd00:1::/64"]\n', "device.mtu", ["expected at least 1280", "got 1279"]),
    ('[device]\naddress = "10.0.0.1"\n', "device.address", ["(CIDR)", "got '10.0.0.1'"]),
    ('[device]\naddress = ["10.0.0.1/24", "10.0.0.2/33"]\n', "device.address", ["(CIDR)", "got '10.0.0.2/33'"]),
    ('[device]\naddress = ["10.0.0.1/24", "10.0.0.1/24"]\n', "device.address",
     ["expected each entry once", "'10.0.0.1/24' twice"]),
    ('[device]\nroutes = ["10.0.0.1/24"]\n', "device.routes",
     ["expected a network", "host bits set", "did you mean '10.0.0.0/24'?"]),
    ('[device]\nroutes = ["10.0.0.0"]\n', "device.routes", ["(CIDR)", "got '10.0.0.0'"]),
    ('[device]\nroutes = ["banana/24"]\n', "device.routes", ["expected a network", "got 'banana/24'"]),
    ('[device]\nowner = "no-such-user-tunrelay"\n', "device.owner",
     ["expected a user name or a numeric id", "not a user on this system"]),
    ('[device]\nowner = "0"\n', "device.owner", ["write a numeric id without quotes: owner = 0"]),
    ("[device]\nowner = -1\n", "device.owner", ["from 0 to 4294967294", "got -1"]),
    ('[device]\ngroup = "no-such-group-tunrelay"\n', "device.group", ["not a group on this system"]),
    ("[device]\nqueues = 2\n", "device.queues", ["2 queues need [transport] peer"]),
    ('[device]\nqueues = 2\n[transport]\nprotocol = "tcp"\npeer = "10.0.0.1:5"\n', "device.queues",
     ['need [transport] protocol = "udp"']),
    ("[device]\nqueues = 0\n", "device.queues", ["expected an integer from 1 to 16, got 0"]),
    ("[device]\nqueues = 17\n", "device.queues", ["expected an integer from 1 to 16, got 17"]),
    # [transport] rules
    ('[transport]\nprotocol = "tcp"\nframing = "raw"\n', "transport.framing",
     ['expected "len16" over TCP', "no packet boundaries"]),
    ('[transport]\nlisten = "[::]:1"\npeer = "192.0.2.7:1"\n', "transport.listen",
     ["expected the same address family as peer 192.0.2.7:1", "got [::]:1"]),
    ('[transport]\nlisten = "0.0.0.0:1"\npeer = "[2001:db8::7]:1"\n', "transport.listen",
     ["same address family", "[2001:db8::7]:1"]),
    ('[transport]\nprotocol = "tcp"\nlisten = "10.0.0.2:0"\npeer = "[2001:db8::7]:1"\n',
     "transport.listen", ["same address family"]),
    # [relay] and [stats] values
    ("[relay]\nbatch = 0\n", "relay.batch", ["expected an integer from 1 to 1024, got 0"]),
    ("[relay]\nbatch = 1025\n", "relay.batch", ["expected an integer from 1 to 1024, got 1025"]),
    ("[stats]\ninterval = -1\n", "stats.interval", ["0 or more", "got -1"]),
    ("[stats]\ninterval = nan\n", "stats.interval", ["0 or more", "got nan"]),
    ("[stats]\ninterval = inf\n", "stats.interval", ["0 or more", "got inf"]),
    (f'[stats]\nsocket = "/{"x" * 107}"\n', "stats.socket", ["expected a path of at most 107 bytes", "got 108 bytes"]),
    *[(text, key, expected) for text, key, expected in BAD_PEERS],
]


def rendered(key: str) -> str:
    """How ConfigError spells a dotted key: "[device] mtu"."""
    table, _, name = key.rpartition(".")
    return f"[{table}] {name}" if table else key


@pytest.mark.parametrize("text, key, expected", BAD, ids=[f"{k}-{i}" for i, (_, k, _) in enumerate(BAD)])
def test_bad_file(tmp_path, text, key, expected):
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    error = info.value
    message = str(error)
    assert error.key == key
    assert error.path == str(tmp_path / "relay.toml")
    assert f"relay.toml: {rendered(key)}: " in message
    for part in expected:
        assert part in message


def test_loads_names_its_source(tmp_path):
    with pytest.raises(ConfigError, match=r"^<string>: \[relay\] batch: "):
        loads("[relay]\nbatch = 0\n")
    with pytest.raises(ConfigError, match=r"^elsewhere.toml: \[relay\] batch: "):
        loads("[relay]\nbatch = 0\n", "elsewhere.toml")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "relay.toml")
    assert info.value.key is None
    assert str(info.value) == f"{tmp_path / 'relay.toml'}: cannot read: No such file or directory"


def test_directory_instead_of_a_file(tmp_path):
    (tmp_path / "relay.toml").mkdir()
    with pytest.raises(ConfigError, match=r"relay\.toml: cannot read: Is a directory"):
        load(tmp_path / "relay.toml")


def test_toml_syntax_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, "[device]\nmtu = \n"))
    assert info.value.key is None
    assert "relay.toml: not valid TOML: " in str(info.value)
    assert "line 2" in str(info.value)  # tomllib's own position


def test_file_not_utf8(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_bytes(b'[device]\nname = "\xff"\n')
    with pytest.raises(ConfigError, match=r"relay\.toml: not valid TOML: expected UTF-8, got byte 0xff"):
        load(path)


# --------------------------------------------------------------------------
# parse_endpoint
# --------------------------------------------------------------------------


@pytest.mark.parametrize("text, host, port, family", [
    ("1.2.3.4:5", "1.2.3.4", 5, socket.AF_INET),
    ("0.0.0.0:0", "0.0.0.0", 0, socket.AF_INET),
    ("[::1]:65535", "::1", 65535, socket.AF_INET6),
    ("[2001:DB8:0::7]:1", "2001:db8::7", 1, socket.AF_INET6),  # normalised
    ("[fe80::1%eth0]:5", "fe80::1%eth0", 5, socket.AF_INET6),
    ("localhost:80", "localhost", 80, None),
    ("relay-b.example.org.:80", "relay-b.example.org.", 80, None),
])
def test_parse_endpoint(text, host, port, family):
    endpoint = parse_endpoint(text)
    assert endpoint == Endpoint(host, port)
    assert endpoint.family == family
    assert parse_endpoint(str(endpoint)) == endpoint


@pytest.mark.parametrize("text", [
    "", "1.2.3.4", "1.2.3.4:", "1.2.3.4:65536", "1.2.3.4:-1", "1.2.3.4:+5", "1.2.3.4: 5", "1.2.3.4:٥",
    "::1", "::1:5", "2001:db8::1", "[::1]", "[::1]5", "[::1", "[1.2.3.4]:5", "[host]:5",
    "[fe80::1]:5", "[fe80::1%]:5", "[::1%lo]:5", "fe80::1%eth0:5",
    ":5", "1.2.3:5", "-host:5", "host-:5", "ho st:5", "a..b:5", "a:b:c", "256.1.1.1:5",
])
def test_parse_endpoint_rejects(text):
    with pytest.raises(ValueError, match="expected"):
        parse_endpoint(text)


def test_endpoint_str():
    assert str(Endpoint("1.2.3.4", 5)) == "1.2.3.4:5"
    assert str(Endpoint("::1", 5)) == "[::1]:5"
    assert str(Endpoint("example.org", 5)) == "example.org:5"


# --------------------------------------------------------------------------
# to_toml round trip
# --------------------------------------------------------------------------

GOOD = [
    "",
    FULL,
    '[transport]\npeer = "[2001:db8::7]:55555"\n',
    '[transport]\nprotocol = "tcp"\n',
    '[transport]\nprotocol = "tcp"\npeer = "relay-b.example.org:55555"\n',
    '[transport]\nprotocol = "tcp"\nlisten = "10.0.0.2:0"\npeer = "192.0.2.7:55555"\n',
    '[device]\nname = "tun%d"\naddress = "10.10.0.1/24"\nowner = 0\n[stats]\ninterval = 10\n',
    '[transport]\npeer = "192.0.2.7:1"\nlearn = "never"\n',
    '[transport]\nprotocol = "tcp"\nallow = ["192.0.2.0/24", "2001:db8::/32"]\n',
    '[transport]\nprotocol = "tcp"\naway_hold_ms = 250\n',
    '[transport]\nlisten = "[fe80::2%eth0]:0"\npeer = "[fe80::1%eth0]:55555"\n',
    AEAD_TCP_CLIENT,
    AEAD_TCP_SERVER + 'role = "b"\n',
    '[transport]\nframing = "aead"\npeer = "192.0.2.7:1"\n[security]\nkey_file = "relay.key"\nrole = "b"\n',
    HUB,
    '[device]\nqueues = 2\n[transport]\nframing = "len16"\nlisten = "[::]:4000"\n[[peer]]\nname = "a b"\n'
    'endpoint = "192.0.2.7:1"\nallowed_ips = ["0.0.0.0/0", "::/0"]\nroaming = true\n'
    '[[peer]]\nname = "c"\nendpoint = "[2001:db8::7]:2"\nallowed_ips = ["10.9.0.0/16"]\n',
]


@pytest.mark.parametrize("text", GOOD)
def test_to_toml_round_trip(tmp_path, text):
    key_file(tmp_path)  # for the aead ones
    cfg = load_text(tmp_path, text)
    assert loads(to_toml(cfg), cfg.path) == cfg
    # ... and through a file, as the demo writes it.
    assert load(write(tmp_path, to_toml(cfg), "copy.toml")) == dataclasses.replace(
        cfg, path=str(tmp_path / "copy.toml"))


def test_to_toml_of_a_config_built_in_code():
    cfg = Config(path="<string>", device=DeviceConfig(name="tun1"),
                 transport=TransportConfig(protocol="tcp"), relay=RelayConfig(batch=1),
                 stats=StatsConfig(interval=1e-05))
    assert loads(to_toml(cfg)) == cfg


# Surrogates are left out: no TOML document (UTF-8) can hold them.
@settings(max_examples=200, deadline=None)
@given(socket_path=st.text(st.characters(exclude_characters="\0", exclude_categories=("Cs",)),
                           max_size=30),
       name=st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zs", "Zl", "Zp")),
                    max_size=5).filter(lambda n: not set(n) & set("/:%.") and n.isprintable()),
       interval=st.floats(min_value=0, allow_infinity=False, allow_nan=False))
def test_to_toml_escapes_strings_and_floats(socket_path, name, interval):
    cfg = Config(device=DeviceConfig(name=name), stats=StatsConfig(interval=interval, socket=socket_path))
    assert loads(to_toml(cfg)) == cfg


# --------------------------------------------------------------------------
# The module itself
# --------------------------------------------------------------------------


def _imports(name: str) -> set[str]:
    """What module ``name`` (dotted, in this package) imports: a module of the
    package by its full dotted name, anything else by its top-level name."""
    package_dir = Path(tunrelay.__file__).parent.parent
    path = package_dir / (name.replace(".", "/") + ".py")
    parent = name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name if alias.name.startswith("tunrelay.")
                         else alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if not node.level:
                found.add(node.module if node.module.startswith("tunrelay.")
                          else node.module.split(".")[0])
                continue
            base = parent.rsplit(".", node.level - 1)[0] if node.level > 1 else parent
            if node.module:
                found.add(f"{base}.{node.module}")
            else:  # from .. import aead: the names are modules
                found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_config_imports_only_the_standard_library_and_the_plain_core():
    """The CLI must report a bad file even when the extension is not built
    (or pyroute2 missing): config reaches tunrelay.errors, .aead (key files)
    and .framing (frame sizes, the pump limits), and they reach nothing
    else, directly or through each other."""
    allowed = {"tunrelay.errors", "tunrelay.aead", "tunrelay.framing"}
    todo, seen = ["tunrelay.daemon.config"], set()
    while todo:
        name = todo.pop()
        seen.add(name)
        for imported in _imports(name):
            if imported.startswith("tunrelay"):
                assert imported in allowed, f"{name} imports {imported}"
                if imported not in seen:
                    todo.append(imported)
            else:
                assert imported in sys.stdlib_module_names or imported == "__future__", (
                    f"{name} imports {imported}, which is not in the standard library")
    assert seen == {"tunrelay.daemon.config", *allowed}


@pytest.mark.parametrize("text, most", [
    ('[device]\nmode = "tap"\nmtu = 65535\n[transport]\nprotocol = "tcp"\n', 65517),
    ('[device]\nmode = "tap"\nmtu = 65535\n[transport]\nframing = "len16"\n', 65517),
])
def test_an_mtu_too_large_for_a_len16_record_is_refused(text, most):
    with pytest.raises(ConfigError, match=f"at most {most}") as info:
        loads(text)
    assert info.value.key == "device.mtu"
    loads(text.replace("65535", str(most)))


def test_an_aead_tcp_mtu_must_leave_room_for_header_and_tag(tmp_path):
    key = tmp_path / "relay.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("A" * 43 + "=\n")
    text = (f'[device]\nmtu = {{}}\n[transport]\nprotocol = "tcp"\nframing = "aead"\n'
            f'[security]\nkey_file = "{key}"\n')
    with pytest.raises(ConfigError, match="at most 65495") as info:
        loads(text.format(65535))
    assert info.value.key == "device.mtu"
    assert loads(text.format(65495)).device.mtu == 65495


def test_the_readme_hub_example_loads():
    """The [[peer]] example of "Running a tunnel" is a file a user will copy."""
    readme = Path(__file__).resolve().parent.parent / "README.md"
    import re
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", readme.read_text(), re.S) if "[[peer]]" in b]
    assert blocks, "README lost its [[peer]] example"
    cfg = loads(blocks[0])
    assert [p.name for p in cfg.peers] == ["office", "laptop"]
    assert cfg.peers[1].endpoint is None and cfg.peers[1].roaming


def test_check_describes_the_peers(tmp_path, capsys):
    from tunrelay.daemon.cli import main
    path = write(tmp_path, HUB)
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 peers: spoke1 198.18.1.2:55555, spoke2 (learned) roaming" in out
