"""Allowed IPs (issue 8): the compiled longest-prefix match against a plain
Python reference (ipaddress, the longest containing network wins), on
hand-picked overlaps and on random tables and addresses (hypothesis)."""

from __future__ import annotations

import ipaddress
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import load_fastpath


def table(entries):
    return load_fastpath().PrefixTable(entries)


class Reference:
    """The peer of the longest network containing an address: for each
    prefix length, longest first, is the address's own network of that
    length in the table?"""

    def __init__(self, entries) -> None:
        self.by_network = {ipaddress.ip_network(network): peer for network, peer in entries}

    def __call__(self, address):
        ip = ipaddress.ip_address(address)
        for length in range(ip.max_prefixlen, -1, -1):
            peer = self.by_network.get(ipaddress.ip_network((ip, length), strict=False))
            if peer is not None:
                return peer
        return None


def reference(entries, address):
    return Reference(entries)(address)


OVERLAPS = [("10.0.0.0/8", 1), ("10.1.0.0/16", 2), ("10.1.2.0/24", 3), ("10.1.2.128/25", 4),
            ("10.1.2.3/32", 5), ("10.1.2.4/31", 6), ("10.1.2.8/30", 7), ("10.1.2.16/29", 8),
            ("192.168.0.0/17", 9), ("192.168.128.0/18", 10), ("0.0.0.0/1", 11),
            ("fd00::/8", 20), ("fd00:1::/32", 21), ("fd00:1:2::/48", 22), ("fd00:1:2:2::/63", 23),
            ("fd00:1:2:3::1/128", 24), ("2001:db8::/33", 25), ("2001:db8:8000::/34", 26)]


@pytest.mark.parametrize("address", [
    "10.0.0.1", "10.1.0.1", "10.1.2.1", "10.1.2.127", "10.1.2.128", "10.1.2.255", "10.1.2.3",
    "10.1.2.4", "10.1.2.5", "10.1.2.6", "10.1.2.9", "10.1.2.11", "10.1.2.12", "10.1.2.16",
    "10.1.2.23", "10.1.2.24", "10.2.0.0", "11.0.0.0", "127.255.255.255", "128.0.0.0",
    "192.168.127.255", "192.168.128.0", "192.168.191.255", "192.168.192.0", "255.255.255.255",
    "fd00::1", "fd00:1::1", "fd00:1:2::1", "fd00:1:2:3::1", "fd00:1:2:3::2", "fd00:1:2:2::1",
    "fd00:1:2:4::1", "fe80::1", "2001:db8::1", "2001:db8:7fff::1", "2001:db8:8000::1",
    "2001:db8:c000::1", "2001:db9::1", "::", "::ffff:10.1.2.3"])
def test_the_longest_prefix_wins(address):
    assert table(OVERLAPS).lookup(address) == reference(OVERLAPS, address)


def test_insertion_order_does_not_matter():
    rng = random.Random(8)
    expected = table(OVERLAPS)
    for _ in range(20):
        shuffled = OVERLAPS[:]
        rng.shuffle(shuffled)
        other = table(shuffled)
        for network, _ in OVERLAPS:
            net = ipaddress.ip_network(network)
            for host in (net[0], net[net.num_addresses // 2], net[-1]):
                assert other.lookup(host) == expected.lookup(host) == reference(OVERLAPS, host)


def test_default_routes_and_an_empty_table():
    empty = table([])
    assert empty.lookup("10.0.0.1") is None and empty.lookup("::1") is None
    default = table([("0.0.0.0/0", 7), ("::/0", 8), ("10.0.0.0/8", 9)])
    assert default.lookup("1.2.3.4") == 7 and default.lookup("10.9.9.9") == 9
    assert default.lookup("2001:db8::1") == 8
    assert default.prefixes == 3


def test_bad_entries_are_refused():
    with pytest.raises(ValueError, match="host bits"):
        table([("10.0.0.1/8", 1)])
    with pytest.raises(ValueError, match="twice"):
        table([("10.0.0.0/8", 1), ("10.0.0.0/8", 2)])
    with pytest.raises(ValueError, match="peer index"):
        table([("10.0.0.0/8", -1)])
    with pytest.raises(ValueError, match="peer index"):
        table([("10.0.0.0/8", 2**32 - 1)])


def ipv4(src: str, dst: str) -> bytes:
    return (bytes([0x45, 0, 0, 20]) + bytes(8) + ipaddress.ip_address(src).packed
            + ipaddress.ip_address(dst).packed)


def ipv6(src: str, dst: str) -> bytes:
    return (bytes([0x60]) + bytes(7) + ipaddress.ip_address(src).packed
            + ipaddress.ip_address(dst).packed)


def test_packets_are_looked_up_by_destination_or_source():
    t = table(OVERLAPS)
    assert t.lookup_packet(ipv4("10.1.2.3", "192.168.150.1")) == 10
    assert t.lookup_packet(ipv4("10.1.2.3", "192.168.150.1"), source=True) == 5
    assert t.lookup_packet(ipv6("fd00:1:2:3::1", "2001:db8:8000::9")) == 26
    assert t.lookup_packet(ipv6("fd00:1:2:3::1", "2001:db8:8000::9"), source=True) == 24
    # Too short to hold the address, or no IP at all: no peer.
    assert t.lookup_packet(ipv4("10.1.2.3", "10.1.2.3")[:19]) is None
    assert t.lookup_packet(ipv6("fd00::1", "fd00::1")[:39]) is None
    assert t.lookup_packet(b"") is None
    assert t.lookup_packet(b"\x15" + bytes(40)) is None


def _network(draw, version):
    bits = 32 if version == 4 else 128
    length = draw(st.integers(0, bits))
    value = draw(st.integers(0, 2**bits - 1)) >> (bits - length) << (bits - length) if length else 0
    return ipaddress.ip_network((value, length)) if version == 6 else \
        ipaddress.IPv4Network((value, length))


@st.composite
def tables(draw):
    entries, seen = [], set()
    for _ in range(draw(st.integers(0, 60))):
        net = _network(draw, draw(st.sampled_from((4, 6))))
        if net not in seen:
            seen.add(net)
            entries.append((net, len(entries)))
    return entries


@settings(max_examples=200, deadline=None)
@given(entries=tables(), data=st.data())
def test_random_tables_agree_with_the_reference(entries, data):
    t, ref = table(entries), Reference(entries)
    probes = [ipaddress.ip_address(data.draw(st.integers(0, 2**32 - 1))) for _ in range(20)]
    probes += [ipaddress.IPv6Address(data.draw(st.integers(0, 2**128 - 1))) for _ in range(20)]
    # Addresses inside, at the edges of and just outside each network.
    for net, _ in entries[:20]:
        probes += [net[0], net[-1]]
        if int(net[0]) > 0:
            probes.append(net[0] - 1)
        if int(net[-1]) < 2 ** net.max_prefixlen - 1:
            probes.append(net[-1] + 1)
    for ip in probes:
        assert t.lookup(ip) == ref(ip), (ip, entries)


def test_ten_thousand_prefixes_build_and_answer():
    rng = random.Random(10_000)
    entries, seen = [], set()
    while len(entries) < 10_000:
        v6 = rng.random() < 0.3
        if v6:
            net = ipaddress.IPv6Network((rng.getrandbits(64) << 64, rng.choice((48, 56, 64))), strict=False)
        else:
            net = ipaddress.IPv4Network((rng.getrandbits(32), rng.choice((16, 20, 24, 28, 32))), strict=False)
        if net not in seen:
            seen.add(net)
            entries.append((net, len(entries)))
    t, ref = table(entries), Reference(entries)
    assert t.prefixes == 10_000
    for net, _ in rng.sample(entries, 300):
        for ip in (net[0], net[-1], ipaddress.ip_address(int(net[0]) ^ rng.getrandbits(8))):
            assert t.lookup(ip) == ref(ip)
