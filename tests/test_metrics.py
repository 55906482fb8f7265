"""[metrics]: the Prometheus endpoint (tunrelay/daemon/metrics.py).

Without root: the collector on snapshots shaped as the relay and a
WireGuard run make them (names, types, labels, values; every counter of
the snapshot exposed), the HTTP server on loopback in this namespace
(a real HTTP client, a clean stop, a bind failure naming the address),
and the [metrics] table's errors.

As root: relays in a Testbed's namespaces with [metrics] on the
namespace's loopback, scraped from inside it with urllib and compared
with `tunrelay stats --json`'s snapshot (read on the control socket just
before and just after the scrape; compared once the two agree, i.e. the
tunnel was quiet meanwhile); a listener that cannot bind ends the run
with exit 1 naming the address; privileges dropped after the port is
bound.  Every wait is bounded; nothing depends on timing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from _root import bed, make_pair, python, require_root  # noqa: F401 (bed, make_pair: fixtures)
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_integration import assert_ping, has_device

import tunrelay
from tunrelay.counters import DIRECTIONS, empty_direction
from tunrelay.daemon import cli
from tunrelay.daemon.config import Endpoint, MetricsConfig, load, loads, parse_endpoint, to_toml
from tunrelay.daemon.metrics import STATES, MetricsServer, families, make_registry
from tunrelay.errors import ConfigError, TunrelayError

# ---------------------------------------------------------------- snapshots


def directions(seed: int = 0) -> dict:
    """Both directions' counters, as the pumps report them, every number
    distinct (so a value in the wrong place shows)."""
    out = {}
    n = seed
    for direction in DIRECTIONS:
        counters = empty_direction(direction)
        for key, value in counters.items():
            if isinstance(value, dict):
                for name in value:
                    n += 1
                    value[name] = n
            else:
                n += 1
                counters[key] = n
        counters["last_errno"] = 11  # an errno, not a counter
        out[direction] = counters
    return out


def udp_snapshot(**extra) -> dict:
    """What Relay.snapshot() returns for a UDP relay."""
    return {"device": "tun7", "mode": "tun", "transport": "udp", "framing": "raw",
            "engine": "fast", "loop": {"duplex": True, "busy_poll_us": 0}, "queues": 1,
            "offload": {"vnet_hdr": True}, "state": "running", "peer": "192.0.2.7:55555",
            "aead": None, "peer_mode": "configured, fixed", "connections": None,
            "rejected": None, "refused": None, "uptime": 12.5, **directions(), **extra}


def tcp_snapshot(state: str = "connected") -> dict:
    snap = udp_snapshot(transport="tcp", framing="len16", state=state, connections=3,
                        rejected=2, peer_mode="tcp server",
                        refused={"refused_busy": 2, "refused_not_allowed": 1, "unproven": 0,
                                 "accept_errors": 0})
    snap["egress"]["drops"]["peer_away"] = 7
    return snap


def peers_snapshot() -> dict:
    """A relay with [[peer]] tables: the PeerTable's rows by name."""
    def peer(n, last_seen):
        return {"id": n, "name": f"p{n}", "endpoint": f"192.0.2.{n}:55555" if last_seen else None,
                "allowed_ips": [f"10.0.0.{n}/32"], "roaming": False, "roams": 10 * n,
                "last_seen": last_seen,
                "egress": {"packets": 100 + n, "bytes": 1000 + n, "drops": n, "keepalives": 0},
                "ingress": {"packets": 200 + n, "bytes": 2000 + n, "drops": 2 * n,
                            "keepalives": 0}}
    return udp_snapshot(peer=None, peer_mode="2 [[peer]] table(s), routed by allowed IPs",
                        peers={"p1": peer(1, 1.7e9), "p2": peer(2, None)})


def wireguard_snapshot() -> dict:
    """What WgRunner.snapshot() returns (its counters as JSON carries them)."""
    snap = {"device": "wg0", "mode": "tun", "transport": "udp", "framing": "wireguard",
            "engine": "fast", "queues": 2, "state": "running", "uptime": 3.0,
            "peer_mode": "2 WireGuard peer(s), routed by allowed IPs", **directions(1000)}
    snap["wireguard"] = {"public_key": "A" * 43 + "=", "listen_port": 51820, "fwmark": 0,
                         "counters": {
        "peers": 2, "listen_port": 51820, "under_load": False,
        "handshakes": {"initiations_sent": 1, "initiations_received": 2, "responses_sent": 3,
                       "responses_received": 4, "completed": 5, "retransmits": 6,
                       "given_up": 7, "yielded": 8, "cookies_sent": 9, "cookies_received": 10,
                       "under_load_batches": 11},
        "refused": {"bad_mac1": 12, "too_soon": 13},
        "staged": {"staged_queued": 14, "staged_sent": 15, "staged_dropped_overflow": 16,
                   "staged_dropped_gave_up": 17},
        "timers": {"keepalives_sent": 18, "sessions_expired": 19, "keys_zeroed": 20,
                   "rekeys_ignored": 21},
        "send_errors": 22,
        "table": {"peers": 2, "publications": 9, "retired_pending": 0, "control_queued": 23,
                  "control_dropped": 24, "control_waiting": 0, "staged_queued": 25,
                  "staged_dropped": 26, "gate_bad_mac1": 27, "gate_mac2_ok": 28,
                  "gate_shed": 29, "gate_source_capped": 30},
        "pumps": [{}, {}]}}
    snap["wg_peers"] = [
        {"name": "bee", "public_key": "B" * 43 + "=", "endpoint": "198.18.0.2:51821",
         "latest_handshake": 1.7e9, "tx_bytes": 31, "rx_bytes": 32, "persistent_keepalive": 0,
         "allowed_ips": ["10.66.0.2/32"],
         "egress": {"packets": 33, "bytes": 34, "drops": 35, "keepalives": 36},
         "ingress": {"packets": 37, "bytes": 38, "drops": 39, "keepalives": 40}},
        {"name": "CCCCCCCCCC...", "public_key": "C" * 43 + "=", "endpoint": None,
         "latest_handshake": None, "tx_bytes": 0, "rx_bytes": 0, "persistent_keepalive": 25,
         "allowed_ips": [],
         "egress": {"packets": 0, "bytes": 0, "drops": 41, "keepalives": 0},
         "ingress": {"packets": 0, "bytes": 0, "drops": 0, "keepalives": 0}},
    ]
    return snap


def samples(snapshot: dict) -> dict:
    """{(sample name, sorted label items): value} through the exposition
    text, as a scraper sees it."""
    text = generate_latest(make_registry(lambda: snapshot)).decode()
    return parse(text)


def parse(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"sample {key} twice"
            out[key] = s.value
    return out


def value(found: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in found, f"no sample {name}{labels}; have " + ", ".join(
        sorted({n for n, _ in found if n.startswith(name[:12])}))
    return found[key]


def types(snapshot: dict) -> dict:
    return {f.name: f.type for f in families(snapshot)}


# ---------------------------------------------------------------- the collector


def test_direction_counters_are_counters_labelled_by_device_and_direction():
    snap = udp_snapshot()
    found = samples(snap)
    kinds = types(snap)
    for direction in DIRECTIONS:
        c = snap[direction]
        for total in ("packets", "bytes", "batches", "syscalls", "wakeups", "tun_io"):
            assert kinds[f"tunrelay_{total}"] == "counter"
            assert value(found, f"tunrelay_{total}_total", device="tun7",
                         direction=direction) == c[total]
        for reason, count in c["drops"].items():
            assert value(found, "tunrelay_drops_total", device="tun7", direction=direction,
                         reason=reason) == count
        for kind, count in c["errors"].items():
            assert value(found, "tunrelay_errors_total", device="tun7", direction=direction,
                         kind=kind) == count
    assert not any("errno" in name for name, _ in found)  # an errno is no counter


def test_every_number_of_the_snapshots_counters_is_exposed():
    """Nothing silently lost: each counter the pumps report (the drops of
    every reason, zeros too) is a sample with its value."""
    for snap in (udp_snapshot(), tcp_snapshot(), peers_snapshot(), wireguard_snapshot()):
        exposed = set(samples(snap).values())
        for direction in DIRECTIONS:
            for key, count in snap[direction].items():
                if key == "last_errno":
                    continue
                for number in (count.values() if isinstance(count, dict) else [count]):
                    assert number in exposed, (snap["framing"], direction, key, number)


def test_state_up_uptime_peers_and_info_are_gauges():
    snap = udp_snapshot()
    found = samples(snap)
    kinds = types(snap)
    for name in ("tunrelay_state", "tunrelay_up", "tunrelay_uptime_seconds", "tunrelay_peers",
                 "tunrelay_queues"):
        assert kinds[name] == "gauge", name
    assert kinds["tunrelay"] == "info"  # tunrelay_info
    for state in STATES:
        assert value(found, "tunrelay_state", device="tun7", state=state) == (state == "running")
    assert value(found, "tunrelay_up", device="tun7") == 1
    assert value(found, "tunrelay_uptime_seconds", device="tun7") == 12.5
    assert value(found, "tunrelay_peers", device="tun7") == 1
    assert value(found, "tunrelay_info", device="tun7", version=tunrelay.__version__,
                 mode="tun", transport="udp", framing="raw", engine="fast") == 1
    assert "tunrelay_connected" not in kinds  # TCP only
    learning = samples(udp_snapshot(peer=None))
    assert value(learning, "tunrelay_peers", device="tun7") == 0


@pytest.mark.parametrize("state,up", [("connected", 1), ("listening", 0), ("connecting", 0)])
def test_tcp_connected_connections_refusals_and_peer_away(state, up):
    found = samples(tcp_snapshot(state))
    assert value(found, "tunrelay_up", device="tun7") == up
    assert value(found, "tunrelay_connected", device="tun7") == up
    assert value(found, "tunrelay_state", device="tun7", state=state) == 1
    assert value(found, "tunrelay_connections_total", device="tun7") == 3
    assert value(found, "tunrelay_connections_refused_total", device="tun7",
                 reason="refused_busy") == 2
    assert value(found, "tunrelay_connections_refused_total", device="tun7",
                 reason="refused_not_allowed") == 1
    # The daemon's own drop (packets that waited in the device too long
    # while no peer was connected) comes with the snapshot.
    assert value(found, "tunrelay_drops_total", device="tun7", direction="egress",
                 reason="peer_away") == 7


def test_an_unknown_state_is_shown_too():
    found = samples(udp_snapshot(state="busy (the event loop did not answer)"))
    assert value(found, "tunrelay_state", device="tun7",
                 state="busy (the event loop did not answer)") == 1
    assert value(found, "tunrelay_up", device="tun7") == 0


def test_aead_sessions_and_roams():
    snap = udp_snapshot(framing="aead", aead={"cipher": "chacha20-poly1305", "role": "a",
                                              "sessions": ["x"], "peer_sessions": 4,
                                              "evicted": 2, "roams": 1})
    found = samples(snap)
    assert value(found, "tunrelay_aead_peer_sessions_total", device="tun7") == 4
    assert value(found, "tunrelay_aead_sessions_evicted_total", device="tun7") == 2
    assert value(found, "tunrelay_aead_roams_total", device="tun7") == 1
    assert "tunrelay_aead_roams" not in types(udp_snapshot())


def test_peer_tables_are_labelled_by_peer_name():
    snap = peers_snapshot()
    found = samples(snap)
    assert value(found, "tunrelay_peers", device="tun7") == 2
    for name, info in snap["peers"].items():
        for direction in DIRECTIONS:
            for key in ("packets", "bytes", "drops", "keepalives"):
                assert value(found, f"tunrelay_peer_{key}_total", device="tun7", peer=name,
                             direction=direction) == info[direction][key]
        assert value(found, "tunrelay_peer_roams_total", device="tun7", peer=name) == info["roams"]
    assert value(found, "tunrelay_peer_last_seen_timestamp_seconds", device="tun7",
                 peer="p1") == 1.7e9
    # Never heard from: no timestamp rather than 1970.
    assert ("tunrelay_peer_last_seen_timestamp_seconds",
            (("device", "tun7"), ("peer", "p2"))) not in found


def test_wireguard_peers_handshakes_and_device_counters():
    snap = wireguard_snapshot()
    found = samples(snap)
    d = {"device": "wg0"}
    bee = {"peer": "bee", "public_key": "B" * 43 + "="}
    assert value(found, "tunrelay_peers", **d) == 2
    for direction, number in (("egress", 31), ("ingress", 32)):
        assert value(found, "tunrelay_wireguard_peer_bytes_total", **d, **bee,
                     direction=direction) == number
    assert value(found, "tunrelay_wireguard_peer_last_handshake_timestamp_seconds", **d,
                 **bee) == 1.7e9
    assert not any(name == "tunrelay_wireguard_peer_last_handshake_timestamp_seconds"
                   and ("peer", "CCCCCCCCCC...") in labels for name, labels in found)
    for direction, numbers in (("egress", (33, 34, 35, 36)), ("ingress", (37, 38, 39, 40))):
        for key, number in zip(("packets", "bytes", "drops", "keepalives"), numbers):
            assert value(found, f"tunrelay_peer_{key}_total", **d, **bee,
                         direction=direction) == number
    assert value(found, "tunrelay_wireguard_handshakes_total", **d) == 5
    assert value(found, "tunrelay_wireguard_handshake_messages_total", **d, type="initiation",
                 direction="egress") == 1
    assert value(found, "tunrelay_wireguard_handshake_messages_total", **d, type="cookie",
                 direction="ingress") == 10
    assert value(found, "tunrelay_wireguard_handshakes_refused_total", **d, reason="too_soon") == 13
    assert value(found, "tunrelay_wireguard_staged_queued_total", **d) == 14
    assert value(found, "tunrelay_wireguard_staged_drops_total", **d, reason="gave_up") == 17
    assert value(found, "tunrelay_wireguard_sessions_expired_total", **d) == 19
    assert value(found, "tunrelay_wireguard_send_errors_total", **d) == 22
    assert value(found, "tunrelay_wireguard_dataplane_control_dropped_total", **d) == 24
    assert value(found, "tunrelay_wireguard_dataplane_staged_dropped_total", **d) == 26
    assert value(found, "tunrelay_wireguard_dataplane_gate_shed_total", **d) == 29
    assert value(found, "tunrelay_wireguard_under_load", **d) == 0
    # Every number of the device's counters is a sample, but for the
    # table's bookkeeping (peers, publications, what waits right now).
    exposed = set(found.values())
    counters = snap["wireguard"]["counters"]
    for section in ("handshakes", "refused", "staged", "timers"):
        for key, number in counters[section].items():
            assert number in exposed, (section, key)
    for key, number in counters["table"].items():
        assert number in exposed or key in ("peers", "publications", "retired_pending",
                                             "control_waiting"), key


def test_names_follow_the_prometheus_conventions():
    """tunrelay_ prefix, snake case, counters _total, base units (seconds,
    bytes) named, one TYPE and HELP per family, the device label on all."""
    for snap in (udp_snapshot(), tcp_snapshot(), peers_snapshot(), wireguard_snapshot()):
        text = generate_latest(make_registry(lambda s=snap: s)).decode()
        for family in text_string_to_metric_families(text):
            if family.name.startswith("process_"):
                continue  # prometheus_client's process collector
            assert re.fullmatch(r"tunrelay_[a-z0-9_]+", family.name), family.name
            assert family.documentation, family.name
            for s in family.samples:
                assert s.labels.get("device") == snap["device"], s
                if family.type == "counter":
                    assert s.name in (family.name + "_total", family.name + "_created"), s.name
            if family.type == "gauge":
                assert not family.name.endswith("_total"), family.name
            assert "milliseconds" not in family.name and not family.name.endswith("_ms")
        names = re.findall(r"^# TYPE (\S+)", text, re.M)
        assert len(names) == len(set(names))


def test_openmetrics_too():
    """Prometheus asks for OpenMetrics first: the same samples come out in
    it, and its (strict) parser takes them."""
    from prometheus_client.openmetrics.exposition import generate_latest as generate_om
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
    for snap in (udp_snapshot(), tcp_snapshot(), peers_snapshot(), wireguard_snapshot()):
        text = generate_om(make_registry(lambda s=snap: s)).decode()
        found = {}
        for family in parse_om(text):
            for s in family.samples:
                found[(s.name, tuple(sorted(s.labels.items())))] = s.value
        def ours(samples_):
            return {k: v for k, v in samples_.items() if k[0].startswith("tunrelay")}
        assert ours(found) == ours(samples(snap))
        assert "# TYPE tunrelay info" in text


def test_process_metrics_come_along():
    found = samples(udp_snapshot())
    assert any(name == "process_start_time_seconds" for name, _ in found)


def test_a_fresh_snapshot_on_each_scrape():
    snap = udp_snapshot()
    calls = []

    def snapshot():
        calls.append(1)
        snap["egress"]["packets"] = len(calls)
        return snap

    registry = make_registry(snapshot)
    assert not calls  # registering takes none
    for n in (1, 2):
        found = parse(generate_latest(registry).decode())
        assert value(found, "tunrelay_packets_total", device="tun7", direction="egress") == n


# ---------------------------------------------------------------- the HTTP server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: A real HTTP client, never through a proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str):
    with _HTTP.open(url, timeout=10) as reply:
        return reply.status, reply.headers.get("Content-Type"), reply.read().decode()


def _metrics_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "metrics" or "process_request" in t.name]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_server_serves_the_snapshot_and_stops_cleanly(host):
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    snap = udp_snapshot()
    port = _free_port()
    server = MetricsServer(Endpoint(host, port), lambda: snap)
    server.open()
    try:
        where = f"[{host}]" if ":" in host else host
        status, content_type, body = _get(f"http://{where}:{port}/metrics")
        assert status == 200
        assert content_type.startswith("text/plain") and "version=" in content_type
        found = parse(body)
        assert value(found, "tunrelay_packets_total", device="tun7",
                     direction="ingress") == snap["ingress"]["packets"]
        # Anything but GET (and OPTIONS) is refused by the library's app.
        request = urllib.request.Request(f"http://{where}:{port}/metrics", data=b"x",
                                         method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            _HTTP.open(request, timeout=10)
        assert refused.value.code == 405
    finally:
        server.close()
    assert not _metrics_threads(), _metrics_threads()
    # The port is free again at once.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind((host, port))
    server.close()  # twice is fine


def test_a_snapshot_that_fails_fails_the_scrape_with_one_log_line(caplog):
    def broken():
        raise RuntimeError("boom")

    port = _free_port()
    server = MetricsServer(Endpoint("127.0.0.1", port), broken)
    server.open()
    try:
        with caplog.at_level(logging.ERROR, logger="tunrelay.daemon.metrics"):
            with pytest.raises(urllib.error.HTTPError) as failed:
                _get(f"http://127.0.0.1:{port}/metrics")
        assert failed.value.code == 500
        assert any("a scrape failed" in r.getMessage() for r in caplog.records)
    finally:
        server.close()


def test_an_address_in_use_is_an_error_naming_it():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        server = MetricsServer(Endpoint("127.0.0.1", port), udp_snapshot)
        with pytest.raises(TunrelayError) as error:
            server.open()
    message = str(error.value)
    assert f"127.0.0.1:{port}" in message and "in use" in message, message
    assert not _metrics_threads()


def test_an_address_not_of_this_host_is_an_error_naming_it():
    # 192.0.2.0/24 (TEST-NET-1) is on no interface here: the bind fails,
    # nothing is sent.
    if Path("/proc/sys/net/ipv4/ip_nonlocal_bind").read_text().strip() != "0":
        pytest.skip("ip_nonlocal_bind is on: any address binds")
    server = MetricsServer(Endpoint("192.0.2.1", _free_port()), udp_snapshot)
    with pytest.raises(TunrelayError) as error:
        server.open()
    assert "192.0.2.1:" in str(error.value) and "no interface" in str(error.value)


# ---------------------------------------------------------------- [metrics]


def check_error(tmp_path: Path, text: str, key: str, *fragments: str) -> str:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load(path)
    message = str(error.value)
    assert message.startswith(f"{path}: [metrics] {key}: "), message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_metrics_are_off_by_default():
    assert loads("").metrics == MetricsConfig(listen=None, allow_remote=False)


@pytest.mark.parametrize("listen", ["127.0.0.1:9555", "127.8.0.1:9555", "[::1]:9555",
                                    "[::ffff:127.0.0.1]:9555"])
def test_a_loopback_listen_address(listen):
    cfg = loads(f'[metrics]\nlisten = "{listen}"\n')
    assert cfg.metrics == MetricsConfig(listen=parse_endpoint(listen), allow_remote=False)


@pytest.mark.parametrize("listen", ["0.0.0.0:9555", "[::]:9555", "198.18.0.1:9555",
                                    "[fd00::1]:9555"])
def test_a_remote_address_needs_allow_remote(tmp_path, listen):
    check_error(tmp_path, f'[metrics]\nlisten = "{listen}"\n', "listen",
                "expected a loopback address", listen, "allow_remote = true",
                "without authentication")
    cfg = loads(f'[metrics]\nlisten = "{listen}"\nallow_remote = true\n')
    assert cfg.metrics.allow_remote and str(cfg.metrics.listen) == listen


@pytest.mark.parametrize("text,key,fragments", [
    ('listen = "localhost:9555"', "listen", ("expected an IP address", "localhost:9555")),
    ('listen = "127.0.0.1:0"', "listen", ("port from 1 to 65535",)),
    ('listen = "127.0.0.1"', "listen", ("missing ':port'",)),
    ('listen = "::1:9555"', "listen", ("in brackets",)),
    ("listen = 9555", "listen", ("expected a string", "an integer 9555")),
    ('listen = "127.0.0.1:9555"\nallow_remote = "yes"', "allow_remote",
     ("expected true or false", '"yes"')),
    ("allow_remote = true", "allow_remote", ("applies with listen only",)),
    ('listen = "127.0.0.1:9555"\nport = 1', "port", ("unknown key", "listen, allow_remote")),
    ('lisen = "127.0.0.1:9555"', "lisen", ("did you mean 'listen'",)),
])
def test_metrics_errors_name_the_file_the_key_and_what_was_expected(tmp_path, text, key,
                                                                     fragments):
    check_error(tmp_path, f"[metrics]\n{text}\n", key, *fragments)


def test_metrics_round_trip_through_to_toml():
    for text in ('[metrics]\nlisten = "127.0.0.1:9555"\n',
                 '[metrics]\nlisten = "[::]:9555"\nallow_remote = true\n', ""):
        cfg = loads(text)
        assert loads(to_toml(cfg)) == cfg
    assert "[metrics]" not in to_toml(loads(""))


def test_check_says_where_the_metrics_are_served(tmp_path, capsys):
    path = tmp_path / "relay.toml"
    path.write_text('[metrics]\nlisten = "127.0.0.1:9555"\n')
    assert cli.main(["check", "--config", str(path)]) == 0
    assert "metrics on http://127.0.0.1:9555/metrics" in capsys.readouterr().out
    path.write_text('[metrics]\nlisten = "0.0.0.0:9555"\n')
    assert cli.main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: [metrics] listen: expected a loopback address" in err


def test_wg_config_runs_take_metrics_from_the_command_line(tmp_path, capsys):
    from tunrelay.daemon.config import metrics_option
    assert metrics_option("[::1]:9555") == MetricsConfig(listen=parse_endpoint("[::1]:9555"))
    with pytest.raises(ConfigError) as error:
        metrics_option("0.0.0.0:9555")
    message = str(error.value)
    assert message.startswith("--metrics: expected a loopback address") and \
        "[metrics] allow_remote = true" in message, message
    # Only with --wg-config: a TOML file has its [metrics] table.
    path = tmp_path / "relay.toml"
    path.write_text("")
    with pytest.raises(SystemExit) as usage:
        cli.main(["run", "--config", str(path), "--metrics", "127.0.0.1:9555"])
    assert usage.value.code == 2
    assert "--metrics applies to --wg-config only" in capsys.readouterr().err


# ---------------------------------------------------------------- as root

METRICS_PORT = 9555
LOW_PORT = 955  # below 1024: root's to bind
# Run inside a namespace: the snapshot on the control socket, a scrape of
# the metrics with a real HTTP client (urllib), the snapshot again.
SCRAPE = r"""
import gzip, json, sys, urllib.request
from tunrelay.daemon.stats import query
socket_path, url = sys.argv[1], sys.argv[2]
before = query(socket_path)
http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
with http.open(url, timeout=10) as reply:
    status, content_type, body = reply.status, reply.headers["Content-Type"], reply.read().decode()
after = query(socket_path)
# Then as Prometheus asks: OpenMetrics preferred, gzip accepted.
request = urllib.request.Request(url, headers={
    "Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    "Accept-Encoding": "gzip"})
with http.open(request, timeout=10) as reply:
    as_prometheus = {"status": reply.status, "content_type": reply.headers["Content-Type"],
                     "encoding": reply.headers["Content-Encoding"],
                     "body": gzip.decompress(reply.read()).decode()}
print(json.dumps({"before": before, "after": after, "status": status,
                  "content_type": content_type, "body": body, "as_prometheus": as_prometheus}))
"""
# Binds a TCP port (argv: host port) and holds it until stdin closes.
HOLD = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
print("bound", flush=True)
sys.stdin.read()
"""
# Exits 0 if a TCP port (argv: host port) can be bound, 1 if not.
BINDS = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((sys.argv[1], int(sys.argv[2])))
except OSError as e:
    print(e)
    sys.exit(1)
"""


def _steady(snapshot: dict) -> dict:
    """A snapshot without what moves by itself: the clock, and a peer's
    last_seen, which is worked out from the clocks at each reading."""
    steady = {k: v for k, v in snapshot.items() if k != "uptime"}
    if steady.get("peers"):
        steady["peers"] = {name: {**info, "last_seen": round(info["last_seen"] or 0, 1)}
                           for name, info in steady["peers"].items()}
    return steady


#: Samples read from the clock (compared within 0.1 s, not exactly).
_CLOCKED = ("tunrelay_uptime_seconds", "tunrelay_peer_last_seen_timestamp_seconds")


def scrape_quiet(bed, ns: str, socket_path: str, url: str, tries: int = 30) -> tuple[dict, dict]:
    """(snapshot, scraped samples) from a moment the counters stood still
    across the scrape; fails if they never do within ``tries``."""
    for _ in range(tries):
        done = python(bed, ns, SCRAPE, socket_path, url)
        got = json.loads(done.stdout)
        assert got["status"] == 200 and got["content_type"].startswith("text/plain")
        prom = got["as_prometheus"]
        assert prom["status"] == 200 and prom["encoding"] == "gzip"
        assert prom["content_type"].startswith("application/openmetrics-text")
        assert prom["body"].endswith("# EOF\n") and "tunrelay_packets_total" in prom["body"]
        if _steady(got["before"]) == _steady(got["after"]):
            return got["after"], parse(got["body"])
        time.sleep(0.2)
    raise AssertionError(f"the counters never stood still across a scrape in {tries} tries")


def assert_matches(snapshot: dict, found: dict) -> None:
    """The scrape holds the snapshot's numbers: checked by hand for the
    main ones, then every sample against the collector's reading of the
    same snapshot (the clock aside)."""
    d = {"device": snapshot["device"]}
    for direction in DIRECTIONS:
        c = snapshot[direction]
        assert value(found, "tunrelay_packets_total", **d, direction=direction) == c["packets"]
        assert value(found, "tunrelay_bytes_total", **d, direction=direction) == c["bytes"]
        for reason, count in c["drops"].items():
            assert value(found, "tunrelay_drops_total", **d, direction=direction,
                         reason=reason) == count
        for kind, count in c["errors"].items():
            assert value(found, "tunrelay_errors_total", **d, direction=direction,
                         kind=kind) == count
    assert value(found, "tunrelay_state", **d, state=snapshot["state"]) == 1
    assert value(found, "tunrelay_up", **d) == 1
    expected = {key: number for key, number in samples(snapshot).items()
                if key[0].startswith("tunrelay_")}
    scraped = {key: number for key, number in found.items() if key[0].startswith("tunrelay_")}
    assert scraped.keys() == expected.keys()
    for key, number in expected.items():
        if key[0] in _CLOCKED:
            assert scraped[key] == pytest.approx(number, abs=0.1), key
        else:
            assert scraped[key] == number, key
    assert 0 <= value(found, "tunrelay_uptime_seconds", **d)


def _hub_config(pair, name: str, metrics: str) -> None:
    """Side ``name`` as a relay with one [[peer]] table (the other side)
    instead of [transport] peer."""
    from tunrelay.testrig.pair import DEVICE, PORT, TUNNEL6_A, TUNNEL6_B, TUNNEL_A, TUNNEL_B
    side = pair.sides[name]
    here, there = (pair.bed.addr_a, pair.bed.addr_b) if name == "a" else (pair.bed.addr_b,
                                                                          pair.bed.addr_a)
    inner = (TUNNEL_A, TUNNEL6_A) if name == "a" else (TUNNEL_B, TUNNEL6_B)
    other = (TUNNEL_B, TUNNEL6_B) if name == "a" else (TUNNEL_A, TUNNEL6_A)
    Path(side.config_path).write_text(f"""\
[device]
name = "{DEVICE}"
address = ["{inner[0]}/24", "{inner[1]}/64"]

[transport]
listen = "{here}:{PORT}"

[stats]
socket = "{side.socket_path}"

{metrics}
[[peer]]
name = "other"
endpoint = "{there}:{PORT}"
allowed_ips = ["{other[0]}/32", "{other[1]}/128"]
""")




@pytest.mark.root
@pytest.mark.parametrize("kind", ["udp", "tcp", "udp-peers", "udp-nobody"])
def test_a_scrape_matches_tunrelay_stats(bed, make_pair, kind):
    from tunrelay.testrig.pair import TUNNEL_A, TUNNEL_B
    protocol = "tcp" if kind == "tcp" else "udp"
    port = METRICS_PORT
    metrics = {"metrics": [f'listen = "127.0.0.1:{port}"']}
    if kind == "udp-nobody":
        # Privileges dropped once the device and sockets (this one too) are
        # open: a port below 1024, which only root may bind, still serves.
        port = LOW_PORT
        metrics = {"metrics": [f'listen = "127.0.0.1:{port}"'],
                   "security": ['user = "nobody"', 'group = "nogroup"']}
    pair = make_pair(protocol=protocol, overrides=metrics)
    if kind == "udp-peers":
        for name in ("a", "b"):
            _hub_config(pair, name, f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    pair.start()
    assert_ping(bed, bed.ns_a, TUNNEL_B)
    assert_ping(bed, bed.ns_b, TUNNEL_A)
    url = f"http://127.0.0.1:{port}/metrics"
    for name in ("a", "b"):
        side = pair.sides[name]
        snapshot, found = scrape_quiet(bed, side.ns, side.socket_path, url)
        assert snapshot["egress"]["packets"] >= 5 and snapshot["ingress"]["packets"] >= 5
        assert_matches(snapshot, found)
        d = {"device": snapshot["device"]}
        if protocol == "tcp":
            assert value(found, "tunrelay_connected", **d) == 1
            assert value(found, "tunrelay_connections_total", **d) == snapshot["connections"]
            assert ("tunrelay_drops_total", tuple(sorted({
                **d, "direction": "egress", "reason": "peer_away"}.items()))) in found
        if kind == "udp-peers":
            info = snapshot["peers"]["other"]
            assert value(found, "tunrelay_peer_packets_total", **d, peer="other",
                         direction="egress") == info["egress"]["packets"] >= 5
            assert value(found, "tunrelay_peer_last_seen_timestamp_seconds", **d,
                         peer="other") == pytest.approx(info["last_seen"], abs=0.1)
        assert f"metrics: serving http://127.0.0.1:{port}/metrics" in pair.log(name)
    if kind == "udp-nobody":
        assert "running as uid" in pair.log("a")
    if kind == "udp":
        # A reload keeps the listener; another address needs a restart.
        side = pair.sides["a"]
        reload = [sys.executable, "-m", "tunrelay", "reload", "--config", side.config_path]
        done = bed.run(side.ns, reload, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "nothing changed" in done.stdout, done.stdout + done.stderr
        text = Path(side.config_path).read_text()
        Path(side.config_path).write_text(text.replace(f":{port}", f":{port + 1}"))
        done = bed.run(side.ns, reload, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and "metrics.listen" in done.stdout, done.stdout + done.stderr
        assert_matches(*scrape_quiet(bed, side.ns, side.socket_path, url))
    # A clean stop frees the port with the rest.
    for name in ("a", "b"):
        assert pair.stop(name) == 0, pair.log(name)
        side = pair.sides[name]
        done = bed.run(side.ns, [sys.executable, "-c", BINDS, "127.0.0.1", str(port)],
                       capture_output=True, text=True)
        assert done.returncode == 0, f"the metrics port is still taken: {done.stdout}"
        assert "Traceback" not in pair.log(name)


@pytest.mark.root
@pytest.mark.parametrize("why", ["in use", "not local"])
def test_a_metrics_listener_that_cannot_bind_exits_1_naming_the_address(bed, make_pair, why):
    if why == "in use":
        listen, lines = f"127.0.0.1:{METRICS_PORT}", [f'listen = "127.0.0.1:{METRICS_PORT}"']
    else:
        listen = f"198.18.0.77:{METRICS_PORT}"  # of the test bed's underlay, on no interface
        lines = [f'listen = "{listen}"', "allow_remote = true"]
    pair = make_pair(overrides_a={"metrics": lines})
    holder = None
    if why == "in use":
        holder = bed.popen(bed.ns_a, [sys.executable, "-c", HOLD, "127.0.0.1", str(METRICS_PORT)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "bound"
    try:
        done = bed.run(bed.ns_a, [sys.executable, "-m", "tunrelay", "run", "--config",
                                  pair.sides["a"].config_path], capture_output=True, text=True,
                       timeout=60)
    finally:
        if holder is not None:
            holder.stdin.close()
            holder.wait(10)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tunrelay: metrics: cannot listen on {listen}: "), last
    assert ("in use" if why == "in use" else "no interface of this host") in last, last
    assert "Traceback" not in done.stderr
    assert not has_device(bed, bed.ns_a), "a failed start left its device behind"
    assert not os.path.exists(pair.sides["a"].socket_path), "its control socket stayed"


@pytest.mark.root
def test_a_wireguard_run_serves_its_metrics_after_dropping_privileges(monkeypatch):
    """framing = "wireguard" from TOML (side A, which drops to nobody when
    it exists) and a wg-quick file with --metrics (side B, on [::1]): the
    snapshot's peers, handshakes and pump counters in the scrape."""
    from test_wg_daemon import B, WgPair, _env

    from tunrelay.testrig.netns import Testbed
    require_root()
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])  # the scrape helper's imports
    workdir = tempfile.mkdtemp(prefix="trm-")
    os.chmod(workdir, 0o755)  # side A reads nothing here after dropping to nobody
    with Testbed() as bed:
        wg = WgPair(bed, workdir)
        try:
            with open(wg.toml, "a") as f:
                f.write(f'\n[metrics]\nlisten = "127.0.0.1:{METRICS_PORT}"\n')
            # B runs its wg-quick file with --metrics (WgPair.start, plus it).
            for side, ns, argv in (("a", bed.ns_a, ["--config", wg.toml]),
                                   ("b", bed.ns_b, ["--wg-config", wg.conf, "--metrics",
                                                    f"[::1]:{METRICS_PORT}"])):
                with open(wg.path(f"{side}.log"), "ab") as log:
                    wg.procs[side] = bed.popen(ns, [sys.executable, "-m", "tunrelay", "run", *argv],
                                               stdout=log, stderr=subprocess.STDOUT, env=_env())
            wg.wait_ready()
            assert_ping(bed, bed.ns_a, B, count=3)
            snapshot_b, found_b = scrape_quiet(bed, bed.ns_b, wg.socket("b"),
                                               f"http://[::1]:{METRICS_PORT}/metrics")
            assert_matches(snapshot_b, found_b)
            assert value(found_b, "tunrelay_wireguard_handshakes_total",
                         device=snapshot_b["device"]) >= 1
            snapshot, found = scrape_quiet(bed, bed.ns_a, wg.socket("a"),
                                           f"http://127.0.0.1:{METRICS_PORT}/metrics")
            assert_matches(snapshot, found)
            d = {"device": snapshot["device"]}
            (bee,) = snapshot["wg_peers"]
            labels = {"peer": "bee", "public_key": bee["public_key"]}
            assert value(found, "tunrelay_wireguard_peer_bytes_total", **d, **labels,
                         direction="egress") == bee["tx_bytes"] > 0
            assert value(found, "tunrelay_wireguard_peer_last_handshake_timestamp_seconds",
                         **d, **labels) == bee["latest_handshake"]
            assert value(found, "tunrelay_peer_packets_total", **d, **labels,
                         direction="egress") == bee["egress"]["packets"] >= 3
            assert value(found, "tunrelay_wireguard_handshakes_total", **d) >= 1
            assert wg.stop() == {"a": 0, "b": 0}, (wg.log("a"), wg.log("b"))
            for side in ("a", "b"):
                assert "metrics: serving" in wg.log(side) and "Traceback" not in wg.log(side)
            done = bed.run(bed.ns_a, [sys.executable, "-c", BINDS, "127.0.0.1",
                                      str(METRICS_PORT)], capture_output=True, text=True)
            assert done.returncode == 0, f"the metrics port is still taken: {done.stdout}"
        finally:
            wg.stop()
            for side in ("a", "b"):
                print(f"----- relay {side} log -----\n{wg.log(side)}")
            shutil.rmtree(workdir, ignore_errors=True)
