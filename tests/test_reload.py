"""Reload (SIGHUP, `tunrelay reload`): the config diff, the all-or-nothing
PeerTable apply, and relays in namespaces reloaded while traffic flows.

Unit tests need nothing (a PeerTable is a data structure until a pump
attaches).  The root tests run a RelayPair whose side a has [[peer]] tables
(peer "b" is side b, the others reach no one) and side b is point-to-point.
No assertion depends on timing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

import pytest
from _root import bed, wait_for  # noqa: F401  (bed is a fixture)
from test_integration import assert_ping

from tunrelay.aead import genkey
from tunrelay.daemon.config import loads
from tunrelay.daemon.reload import Reloader, apply_peers, diff
from tunrelay.errors import PumpArgumentError
from tunrelay.testrig.pair import TUNNEL6_A, TUNNEL_A, TUNNEL_B, RelayPair

# ------------------------------------------------------------ the diff

P2P = """
[device]
name = "tr0"
mtu = 1400
address = ["10.1.0.1/24"]
[transport]
listen = "127.0.0.1:5000"
peer = "127.0.0.1:5001"
[stats]
socket = "/tmp/tr-reload-unit.sock"
"""

PEERS = """
[device]
name = "tr0"
[transport]
listen = "0.0.0.0:5000"
[[peer]]
name = "one"
endpoint = "192.0.2.1:5000"
allowed_ips = ["10.1.0.2/32"]
[[peer]]
name = "two"
endpoint = "192.0.2.2:5000"
allowed_ips = ["10.1.0.3/32", "10.1.1.0/24"]
"""


def _with(base: str, table: str, line: str) -> str:
    """``base`` with ``line`` in ``[table]`` (a key given again replaces it)."""
    key = line.split("=")[0].strip()
    out, current = [], None
    for text in base.strip().splitlines():
        if text.startswith("["):
            if current == table and line is not None:
                out.append(line)
                line = None
            current = text.strip("[]")
        elif current == table and text.split("=")[0].strip() == key:
            continue
        out.append(text)
    if line is not None:
        out += ([line] if current == table else [f"[{table}]", line])
    return "\n".join(out) + "\n"


RESTART = [
    ("device", 'name = "tr1"', "device.name"),
    ("device", 'mode = "tap"', "device.mode"),
    ("device", "mtu = 1300", "device.mtu"),
    ("device", 'address = ["10.1.0.9/24"]', "device.address"),
    ("device", 'routes = ["10.2.0.0/16"]', "device.routes"),
    ("device", "persist = true", "device.persist"),
    ("device", "queues = 2", "device.queues"),
    ("transport", 'protocol = "tcp"', "transport.protocol"),
    ("transport", 'listen = "127.0.0.1:5002"', "transport.listen"),
    ("transport", 'peer = "127.0.0.1:5003"', "transport.peer"),
    ("transport", 'framing = "len16"', "transport.framing"),
    ("transport", 'learn = "never"', "transport.learn"),
    ("relay", "batch = 8", "relay.batch"),
    ("relay", 'engine = "python"', "relay.engine"),
    ("relay", "offload = false", "relay.offload"),
    ("relay", "duplex = false", "relay.duplex"),
    ("relay", "busy_poll_us = 50", "relay.busy_poll_us"),
    ("relay", 'io = "syscalls"', "relay.io"),
    ("stats", 'socket = "/tmp/tr-reload-other.sock"', "stats.socket"),
    ("security", "user = 0", "security.user"),
    ("metrics", 'listen = "127.0.0.1:9555"', "metrics.listen"),
]


@pytest.mark.parametrize("table,line,key", RESTART, ids=[r[2] for r in RESTART])
def test_a_restart_needing_key_is_named(table, line, key):
    d = diff(loads(P2P), loads(_with(P2P, table, line)))
    assert key in d.restart, d
    assert not d.live


@pytest.mark.parametrize("line,key", [("interval = 5", "stats.interval"),
                                      ('log_level = "debug"', "stats.log_level")])
def test_live_keys_are_recognised(line, key):
    d = diff(loads(P2P), loads(_with(P2P, "stats", line)))
    assert d.restart == [] and d.live == [key]


def test_the_same_file_is_no_change():
    assert diff(loads(PEERS), loads(PEERS)).empty


def test_peer_changes_are_live():
    new = PEERS.replace('"192.0.2.2:5000"', '"192.0.2.9:5000"').replace(
        '"10.1.0.2/32"', '"10.1.0.2/32", "10.1.2.0/24"')
    new = new.replace('name = "two"', 'name = "two"\nroaming = true')
    new += '[[peer]]\nname = "three"\nendpoint = "192.0.2.3:5000"\nallowed_ips = ["10.1.0.4/32"]\n'
    d = diff(loads(PEERS), loads(new))
    assert d.restart == []
    assert d.added == ["three"]
    assert d.changed == {"one": ["allowed_ips"], "two": ["endpoint", "roaming"]}
    d = diff(loads(new), loads(PEERS))
    assert d.removed == ["three"] and d.restart == []


def test_one_peer_to_peer_tables_needs_a_restart():
    d = diff(loads(P2P), loads(PEERS))
    assert any(k.startswith("peer") for k in d.restart), d


def test_an_aead_key_rewritten_in_place_needs_a_restart(tmp_path):
    key = tmp_path / "relay.key"
    text = (f'[transport]\nlisten = "127.0.0.1:5000"\npeer = "127.0.0.1:5001"\n'
            f'framing = "aead"\n[security]\nrole = "a"\nkey_file = "{key}"\n')
    key.write_text(genkey() + "\n")
    key.chmod(0o600)
    old = loads(text, str(tmp_path / "r.toml"))
    key.write_text(genkey() + "\n")
    d = diff(old, loads(text, str(tmp_path / "r.toml")))
    assert d.restart == ["security.key_file"]


# ------------------------------------------------------------ the apply


def _table(cfg):
    from tunrelay._fastpath import PeerTable
    table = PeerTable()
    with table.batch():
        for p in cfg.peers:
            table.add(p.name, endpoint=(p.endpoint.host, p.endpoint.port), roaming=p.roaming,
                      allowed_ips=[str(n) for n in p.allowed_ips])
    return table


class FakeRelay:
    """What Reloader needs of a Relay."""

    def __init__(self, path: str) -> None:
        from tunrelay.daemon.config import load
        self.cfg = load(path)
        self.peers = _table(self.cfg) if self.cfg.peers else None
        self.reloads = 0

    def resolve_endpoint(self, peer):
        return None if peer.endpoint is None else (peer.endpoint.host, peer.endpoint.port)

    def reloaded(self) -> None:
        self.reloads += 1


def _state(table) -> dict:
    return {table.name(pid): (table.info(pid)["endpoint"], table.info(pid)["allowed_ips"],
                              table.info(pid)["roaming"]) for pid in table.ids()}


def test_a_network_moves_between_peers_in_one_reload(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(PEERS)
    relay = FakeRelay(str(path))
    path.write_text(PEERS.replace('["10.1.0.2/32"]', '["10.1.0.2/32", "10.1.1.0/24"]')
                    .replace('["10.1.0.3/32", "10.1.1.0/24"]', '["10.1.0.3/32"]'))
    outcome = Reloader(relay).reload()
    assert outcome.applied, outcome
    assert relay.peers.name(relay.peers.route("10.1.1.5")) == "one"
    assert relay.reloads == 1


def test_a_failing_apply_leaves_the_table_as_it_was():
    cfg = loads(PEERS)
    table = _table(cfg)
    before = _state(table)
    publications = table.counts()["publications"]
    plan = [("remove", "one", {}),
            ("update", "two", {"allowed_ips": ["10.1.0.3/32"], "endpoint": ("192.0.2.7", 1)}),
            ("add", "new", {"endpoint": ("192.0.2.8", 1), "allowed_ips": ["10.1.5.0/24"],
                            "roaming": False}),
            ("add", "bad", {"endpoint": None, "allowed_ips": ["not a network"],
                            "roaming": True})]
    with pytest.raises(PumpArgumentError, match="not a network"):
        apply_peers(table, plan)
    assert _state(table) == before
    assert table.find("new") is None
    assert table.name(table.route("10.1.0.2")) == "one"
    assert table.counts()["publications"] == publications + 1  # one batch


def test_a_broken_file_is_refused_and_nothing_changes(tmp_path, caplog):
    path = tmp_path / "r.toml"
    path.write_text(PEERS)
    relay = FakeRelay(str(path))
    cfg = relay.cfg
    path.write_text(PEERS + "\n[stats]\ninterval = -1\n")
    with caplog.at_level(logging.WARNING, "tunrelay.daemon.reload"):
        outcome = Reloader(relay).reload()
    assert not outcome.applied and outcome.message.startswith("[stats] interval: expected")
    assert relay.cfg is cfg and relay.reloads == 0
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1 and str(path) in refused[0] and "[stats] interval" in refused[0]


def test_a_restart_change_with_live_ones_applies_none(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(PEERS)
    relay = FakeRelay(str(path))
    before = _state(relay.peers)
    path.write_text(_with(PEERS, "device", "mtu = 1300").replace('"192.0.2.1:5000"',
                                                                 '"192.0.2.5:5000"'))
    outcome = Reloader(relay).reload()
    assert not outcome.applied and "device.mtu" in outcome.message
    assert _state(relay.peers) == before


# ------------------------------------------------------------ in namespaces

IPERF_PORT = 5211


def _peers_config(pair: RelayPair, peers: str, stats: str = "") -> str:
    side = pair.sides["a"]
    return (f'[device]\nname = "trtun0"\nmtu = 1400\naddress = ["{TUNNEL_A}/24", '
            f'"{TUNNEL6_A}/64"]\n[transport]\nlisten = "{pair.bed.addr_a}:55555"\n'
            f'[stats]\nsocket = "{side.socket_path}"\n{stats}\n{peers}')


def _peer(name: str, endpoint: str, *networks: str) -> str:
    nets = ", ".join(f'"{n}"' for n in networks)
    return f'[[peer]]\nname = "{name}"\nendpoint = "{endpoint}"\nallowed_ips = [{nets}]\n'


def _reload_cli(pair: RelayPair, *extra: str) -> subprocess.CompletedProcess:
    side = pair.sides["a"]
    return pair.bed.run(side.ns, [sys.executable, "-m", "tunrelay", "reload", "--config",
                                  side.config_path, *extra],
                        capture_output=True, text=True, timeout=60)


def _write(pair: RelayPair, text: str) -> None:
    with open(pair.sides["a"].config_path, "w") as f:
        f.write(text)


def _log_lines(pair: RelayPair, word: str) -> list[str]:
    return [line for line in pair.log("a").splitlines() if "reload of" in line and word in line]


@pytest.fixture
def hub_pair(bed):  # noqa: F811 (the fixture)
    """Side a: [[peer]] tables, peer "b" (side b) and "c" (nobody there)."""
    pair = RelayPair(bed)
    b = _peer("b", f"{bed.addr_b}:55555", f"{TUNNEL_B}/32")
    c = _peer("c", "198.51.100.7:55555", "10.99.0.3/32")
    _write(pair, _peers_config(pair, b + c))
    with pair:
        pair.start()
        yield pair, b, c


def test_peers_change_live_while_iperf3_flows(hub_pair):
    pair, _, _ = hub_pair
    net = pair.bed
    assert_ping(net, net.ns_a, TUNNEL_B)
    server = net.popen(net.ns_b, ["iperf3", "-s", "-1", "-B", TUNNEL_B, "-p", str(IPERF_PORT)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: net.run(net.ns_b, ["ss", "-ltnH", f"sport = :{IPERF_PORT}"],
                                 capture_output=True, text=True).stdout.strip(), 10,
                 "the iperf3 server")
        client = net.popen(net.ns_a, ["iperf3", "-c", TUNNEL_B, "-p", str(IPERF_PORT), "-t", "8",
                                      "-J"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
        wait_for(lambda: pair.stats("a")["peers"]["b"]["egress"]["bytes"] > 5_000_000, 20,
                 "iperf3 load through peer b")
        before = pair.stats("a")["peers"]["b"]
        # tunrelay reload: a peer added, b's allowed IPs and c's endpoint changed.
        b2 = _peer("b", f"{net.addr_b}:55555", f"{TUNNEL_B}/32", "10.99.5.0/24")
        c2 = _peer("c", "198.51.100.8:55555", "10.99.0.3/32")
        d = _peer("d", "198.51.100.9:55555", "10.99.0.4/32")
        _write(pair, _peers_config(pair, b2 + c2 + d))
        done = _reload_cli(pair)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "applied" in done.stdout and "'d' added" in done.stdout, done.stdout
        peers = pair.stats("a")["peers"]
        assert set(peers) == {"b", "c", "d"}
        assert peers["c"]["endpoint"] == "198.51.100.8:55555"
        assert peers["b"]["allowed_ips"] == [f"{TUNNEL_B}/32", "10.99.5.0/24"]
        # The same peer b (its counters carry on), still carrying the load.
        assert peers["b"]["id"] == before["id"]
        assert peers["b"]["egress"]["bytes"] >= before["egress"]["bytes"]
        # SIGHUP: d removed again.
        _write(pair, _peers_config(pair, b2 + c2))
        pair.sides["a"].proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "d" not in pair.stats("a")["peers"], 10, "the SIGHUP reload")
        # The peer is gone from the table a moment before the line is logged.
        wait_for(lambda: len(_log_lines(pair, "applied")) == 2, 10, "the SIGHUP reload's log line")
        out, err = client.communicate(timeout=60)
        assert client.returncode == 0, err + out
        result = json.loads(out)
        assert "error" not in result, result["error"]
        sent = result["end"]["sum_sent"]["bytes"]
        received = result["end"]["sum_received"]["bytes"]
        assert sent > 0 and 0 < received <= sent
        assert pair.stats("a")["peers"]["b"]["egress"]["bytes"] >= received
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
    assert pair.sides["a"].proc.poll() is None
    assert_ping(net, net.ns_a, TUNNEL_B)


def test_refused_reloads_keep_the_old_config(hub_pair):
    pair, b, c = hub_pair
    net = pair.bed
    good = _peers_config(pair, b + c)
    # A restart-needing change (with a live one beside it): refused, named.
    _write(pair, good.replace("mtu = 1400", "mtu = 1300").replace("198.51.100.7", "198.51.100.6"))
    done = _reload_cli(pair)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "refused" in done.stdout and "device.mtu" in done.stdout, done.stdout
    assert pair.stats("a")["peers"]["c"]["endpoint"] == "198.51.100.7:55555"
    lines = _log_lines(pair, "refused")
    assert len(lines) == 1 and "device.mtu" in lines[0], pair.log("a")
    assert_ping(net, net.ns_a, TUNNEL_B)
    # A broken file, by `tunrelay reload --socket` (the file itself would
    # not load) and by SIGHUP: refused, the relay runs on.
    _write(pair, good + "[[peer]]\nname = 7\n")
    done = pair.bed.run(net.ns_a, [sys.executable, "-m", "tunrelay", "reload", "--socket",
                                   pair.sides["a"].socket_path, "--json"],
                        capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    answer = json.loads(done.stdout)
    assert answer["reload"] == "refused" and "name" in answer["message"]
    pair.sides["a"].proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(_log_lines(pair, "refused")) == 3, 10, "the SIGHUP refusal")
    assert pair.sides["a"].proc.poll() is None
    assert_ping(net, net.ns_a, TUNNEL_B)
    # The good file again: nothing to change.
    _write(pair, good)
    done = _reload_cli(pair)
    assert done.returncode == 0 and "nothing changed" in done.stdout, done.stdout


def test_a_point_to_point_relay_reloads_its_stats_interval_and_log_level(bed):  # noqa: F811 (the fixture)
    with RelayPair(bed) as pair:
        pair.start()
        side = pair.sides["b"]
        with open(side.config_path) as f:
            text = f.read().replace("[stats]\n", "[stats]\ninterval = 0.5\n"
                                                'log_level = "debug"\n', 1)
        with open(side.config_path, "w") as f:
            f.write(text)
        side.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "stats: egress" in pair.log("b"), 20, "a periodic stats line")
        lines = [line for line in pair.log("b").splitlines() if "reload of" in line]
        assert len(lines) == 1 and "applied" in lines[0] and "stats.interval" in lines[0] \
            and "stats.log_level" in lines[0], pair.log("b")
        assert_ping(bed, bed.ns_b, TUNNEL_A)
        assert os.path.exists(side.socket_path)


# ------------------------------------------------------------ WireGuard


def test_a_wireguard_device_reloads_its_peers(bed):  # noqa: F811 (the fixture)
    """Side B of test_wg_daemon's pair (`tunrelay run --wg-config`, as root)
    gets a peer added and A's allowed IPs widened live; a new ListenPort is
    refused (SIGHUP), as is a broken file; the tunnel to A works throughout."""
    import shutil
    import tempfile

    from test_wg_daemon import A, B, WgPair

    from tunrelay.wireguard.noise import (
        generate_private_key,
        key_to_base64,
        private_to_public,
    )
    workdir = tempfile.mkdtemp(prefix="trr-")  # short: sun_path
    os.chmod(workdir, 0o755)
    wg = WgPair(bed, workdir)
    with open(wg.conf) as f:
        text = f.read()
    _write_file(wg.conf, text.replace("[Interface]\n", "[Interface]\nTable = off\n", 1))
    try:
        wg.start()
        wg.wait_ready()
        assert_ping(bed, bed.ns_a, B, count=1)
        with open(wg.conf) as f:
            original = f.read()
        other = key_to_base64(private_to_public(generate_private_key()))
        wider = original.replace(f"AllowedIPs = {A}/32", f"AllowedIPs = {A}/32, 10.66.5.0/24")
        _write_file(wg.conf, wider + f"\n[Peer]\nPublicKey = {other}\nAllowedIPs = 10.66.0.9/32\n")
        done = wg.cli("b", "reload", "--wg-config", wg.conf)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "applied" in done.stdout and "added" in done.stdout, done.stdout
        peers = {p["public_key"]: p for p in query_b(wg)["wg_peers"]}
        assert other in peers and peers[other]["allowed_ips"] == ["10.66.0.9/32"]
        assert "10.66.5.0/24" in peers[key_to_base64(wg.pub_a)]["allowed_ips"]
        assert_ping(bed, bed.ns_b, A)
        # A restart-needing change, by SIGHUP: refused with one line.
        _write_file(wg.conf, wider.replace("ListenPort = 51821", "ListenPort = 51829"))
        wg.procs["b"].send_signal(signal.SIGHUP)
        wait_for(lambda: [line for line in wg.log("b").splitlines()
                          if "reload of" in line and "refused" in line], 10, "the refusal")
        refused = [line for line in wg.log("b").splitlines() if "refused" in line]
        assert len(refused) == 1 and "transport.listen" in refused[0], wg.log("b")
        assert other in {p["public_key"] for p in query_b(wg)["wg_peers"]}
        # A broken file.
        _write_file(wg.conf, wider + "\n[Peer]\nPublicKey = nonsense\n")
        done = wg.cli("b", "reload", "--socket", wg.socket_b)
        assert done.returncode == 1 and "refused" in done.stdout, done.stdout + done.stderr
        assert wg.procs["b"].poll() is None
        assert_ping(bed, bed.ns_b, A)
    finally:
        codes = wg.stop()
        print(wg.log("b"))
        shutil.rmtree(workdir, ignore_errors=True)
    assert codes == {"a": 0, "b": 0}


def _write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def query_b(wg) -> dict:
    from tunrelay.daemon.stats import query
    return query(wg.socket_b)


def test_wg_quick_routes_from_allowed_ips_need_a_restart(tmp_path):
    """wg-quick's Table = auto routes each AllowedIPs network into the
    device: changing them is a route change, refused (with what to do)."""
    from tunrelay.daemon.reload import diff_wireguard
    from tunrelay.wireguard.noise import (
        generate_private_key,
        key_to_base64,
        private_to_public,
    )
    from tunrelay.wireguard.run import from_wg_quick
    own = key_to_base64(generate_private_key())
    other = key_to_base64(private_to_public(generate_private_key()))
    conf = tmp_path / "wg7.conf"

    def settings(allowed: str, table: str = ""):
        conf.write_text(f"[Interface]\nPrivateKey = {own}\nListenPort = 51820\n{table}"
                        f"Address = 10.7.0.1/24\n[Peer]\nPublicKey = {other}\n"
                        f"AllowedIPs = {allowed}\n")
        return from_wg_quick(str(conf))

    d = diff_wireguard(settings("10.7.0.2/32"), settings("10.7.0.2/32, 10.7.9.0/24"))
    assert len(d.restart) == 1 and "Table = auto" in d.restart[0]
    off = "Table = off\n"
    d = diff_wireguard(settings("10.7.0.2/32", off), settings("10.7.0.2/32, 10.7.9.0/24", off))
    assert d.restart == [] and list(d.changed.values()) == [["allowed_ips"]]


def test_a_wireguard_metrics_listener_needs_a_restart(tmp_path):
    """--metrics of a --wg-config run: kept by a reload of the file (which
    has no place for it); another address needs a restart."""
    from dataclasses import replace

    from tunrelay.daemon.config import metrics_option
    from tunrelay.daemon.reload import diff_wireguard
    from tunrelay.wireguard.noise import generate_private_key, key_to_base64
    from tunrelay.wireguard.run import WgRunner, from_wg_quick
    conf = tmp_path / "wg7.conf"
    conf.write_text(f"[Interface]\nPrivateKey = {key_to_base64(generate_private_key())}\n")
    running = from_wg_quick(str(conf), metrics=metrics_option("127.0.0.1:9555"))
    assert diff_wireguard(running, WgRunner(running).reread()).empty
    d = diff_wireguard(running, replace(running, metrics=metrics_option("127.0.0.1:9556")))
    assert d.restart == ["metrics.listen"]
