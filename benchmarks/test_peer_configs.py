"""The relay.toml files of issue 8's benchmark rows, checked without root:
each parses as ``tunrelay run`` reads it (tunrelay.daemon.config) and says
what the row claims, so a changed configuration format fails here rather
than as a skipped or failed row after minutes of benchmarking."""

from __future__ import annotations

import ipaddress
import types

import pytest

from benchmarks.report import POINT_TO_POINT
from benchmarks.tunnels import (
    HUB,
    ONE_PEER_TABLE,
    TUNRELAY_VARIANTS,
    HubTunnel,
    OnePeerTablePair,
    all_tunnels,
)
from tunrelay.daemon.config import loads
from tunrelay.testrig.hub import Spoke
from tunrelay.testrig.pair import PORT, TUNNEL_A, TUNNEL_B, RelayPair

BED = types.SimpleNamespace(ns_a="bench-a", ns_b="bench-b", addr_a="198.18.0.1", addr_b="198.18.0.2")


def _nets(*texts: str) -> tuple:
    return tuple(ipaddress.ip_network(t) for t in texts)


def test_the_rows_follow_their_point_to_point_twin() -> None:
    labels = [t.label for t in all_tunnels()]
    at = labels.index(POINT_TO_POINT)
    assert labels[at + 1:at + 3] == [ONE_PEER_TABLE, HUB]


@pytest.mark.parametrize("side, there, inner", [("a", BED.addr_b, TUNNEL_B), ("b", BED.addr_a, TUNNEL_A)])
def test_one_peer_table_replaces_the_transport_peer(tmp_path, side, there, inner) -> None:
    protocol, overrides = TUNRELAY_VARIANTS[POINT_TO_POINT]
    OnePeerTablePair(BED, protocol=protocol, mtu=1400, overrides=overrides,
                     workdir=str(tmp_path))
    (tmp_path / "plain").mkdir()
    RelayPair(BED, protocol=protocol, mtu=1400, overrides=overrides,
              workdir=str(tmp_path / "plain"))
    cfg = loads((tmp_path / f"{side}.toml").read_text())
    assert cfg.transport.peer is None
    assert len(cfg.peers) == 1
    peer = cfg.peers[0]
    assert (peer.endpoint.host, peer.endpoint.port) == (there, PORT)
    assert peer.allowed_ips[0] == ipaddress.ip_network(f"{inner}/32") and not peer.roaming
    # Everything else is what the point-to-point row runs with.
    twin = loads((tmp_path / "plain" / f"{side}.toml").read_text())
    assert twin.transport.peer is not None and not twin.peers
    assert cfg.relay == twin.relay
    assert cfg.device.addresses == twin.device.addresses
    assert (cfg.device.mtu, cfg.device.queues) == (twin.device.mtu, twin.device.queues)
    assert cfg.transport.listen == twin.transport.listen
    assert cfg.transport.framing == twin.transport.framing


def test_the_hub_and_its_spokes(tmp_path) -> None:
    spokes = [Spoke(index=i, ns=f"s{i}", veth=f"v{i}", hub_veth=f"h{i}", addr=f"198.18.{i}.2",
                    addr6=f"fd00:198:18:{i}::2", hub_addr=f"198.18.{i}.1",
                    hub_addr6=f"fd00:198:18:{i}::1") for i in (1, 2)]
    star = types.SimpleNamespace(hub="h", spokes=spokes)
    _, overrides = TUNRELAY_VARIANTS[POINT_TO_POINT]
    tunnel = HubTunnel(HUB, overrides)
    tunnel._workdir = types.SimpleNamespace(name=str(tmp_path))
    configs = {name: (ns, loads(text)) for name, (ns, text) in tunnel.configs(star).items()}
    assert [ns for ns, _ in configs.values()] == ["h", "s1", "s2"]
    hub = configs["hub"][1]
    assert hub.transport.peer is None
    assert [(p.name, p.endpoint.host, p.allowed_ips) for p in hub.peers] == [
        ("spoke1", "198.18.1.2", _nets(f"{TUNNEL_B}/32", "fd00:99::2/128")),
        ("spoke2", "198.18.2.2", _nets(f"{TUNNEL_A}/32", "fd00:99::1/128"))]
    for name, inner in (("spoke1", TUNNEL_B), ("spoke2", TUNNEL_A)):
        spoke = configs[name][1]
        assert not spoke.peers and spoke.transport.peer.host == f"198.18.{name[-1]}.1"
        assert ipaddress.ip_interface(f"{inner}/24") in spoke.device.addresses
    # Every relay runs with the point-to-point row's settings.
    (tmp_path / "plain").mkdir()
    twin = loads(RelayPair(BED, protocol="udp", mtu=1400, overrides=overrides,
                           workdir=str(tmp_path / "plain"))._config("a", overrides))
    for _, cfg in configs.values():
        assert cfg.relay == twin.relay
        assert (cfg.device.mtu, cfg.device.queues) == (twin.device.mtu, twin.device.queues)
