"""``tunrelay stats --watch``: rates from consecutive snapshots, the plain,
rich and JSON-lines outputs, the loop (a relay that goes away and comes
back), the command line, and (as root) the watch of real running relays:
a point-to-point pair, a hub with [[peer]] tables and a WireGuard device.

No assertion depends on timing beyond generous bounds; rates are checked
against the counters they were computed from.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from itertools import pairwise

import pytest
from _root import REPO, bed, make_pair, python, wait_for  # noqa: F401 (bed, make_pair: fixtures)
from test_wg_daemon import B, pair  # noqa: F401 (pair: a running WireGuard pair, a fixture)

from tunrelay.counters import empty_direction
from tunrelay.daemon import watch as w
from tunrelay.daemon.cli import main
from tunrelay.daemon.stats import ControlServer
from tunrelay.errors import TunrelayError

ESC = "\x1b"


# ------------------------------------------------------------ snapshots

def relay_snapshot(uptime: float = 10.0, *, eg: tuple = (0, 0), ing: tuple = (0, 0),
                   drops: dict | None = None, errors: dict | None = None,
                   peers: dict | None = None) -> dict:
    """A point-to-point relay's snapshot as Relay.snapshot() makes it
    (counters from tunrelay.counters, so the shape follows the code)."""
    snap = {"device": "tun0", "mode": "tun", "transport": "udp", "framing": "raw",
            "engine": "fast", "queues": 1, "state": "running", "peer": "192.0.2.7:55555",
            "peer_mode": "configured, fixed", "connections": None, "rejected": None,
            "refused": None, "uptime": uptime, "egress": empty_direction("egress"),
            "ingress": empty_direction("ingress")}
    for direction, (packets, size) in (("egress", eg), ("ingress", ing)):
        snap[direction].update(packets=packets, bytes=size, last_errno=0)
    for (direction, reason), n in (drops or {}).items():
        snap[direction]["drops"][reason] = n
    for (direction, kind), n in (errors or {}).items():
        snap[direction]["errors"][kind] = n
    if peers is not None:
        snap["peers"] = peers
    return snap


def peer(rx: tuple, tx: tuple, drops: tuple = (0, 0), endpoint: str | None = "192.0.2.9:55555",
         last_seen: float | None = 1000.0) -> dict:
    """One [[peer]] as PeerTable.info() reports it (rx from the peer, tx to it)."""
    return {"id": 1, "endpoint": endpoint, "allowed_ips": ["10.10.0.2/32"], "roaming": False,
            "roams": 0, "last_seen": last_seen,
            "ingress": {"packets": rx[0], "bytes": rx[1], "drops": drops[0], "keepalives": 0},
            "egress": {"packets": tx[0], "bytes": tx[1], "drops": drops[1], "keepalives": 0}}


KEY_BEE = "x" * 43 + "="


def wg_snapshot(uptime: float, *, tx: int, rx: int, completed: int = 1, refused: int = 0,
                pumps: tuple = (100, 100)) -> dict:
    """A WireGuard device's snapshot as tunrelay/wireguard/run.py makes it."""
    snap = relay_snapshot(uptime, eg=(pumps[0], pumps[0] * 100), ing=(pumps[1], pumps[1] * 100))
    snap.update(framing="wireguard", peer_mode="1 WireGuard peer(s), routed by allowed IPs")
    for key in ("peer", "connections", "rejected", "refused"):
        snap.pop(key)
    snap["wireguard"] = {
        "public_key": "y" * 43 + "=", "listen_port": 51820, "fwmark": 0,
        "counters": {"peers": 1, "listen_port": 51820, "under_load": False,
                     "handshakes": {"initiations_sent": completed, "completed": completed,
                                    "given_up": 0},
                     "refused": {"bad_mac1": refused} if refused else {},
                     "staged": {"staged_queued": 0, "staged_dropped_overflow": 0},
                     "send_errors": 0,
                     "table": {"peers": 1, "publications": 4, "control_waiting": 0,
                               "control_dropped": 0},
                     "pumps": [empty_direction("egress")]}}
    snap["wg_peers"] = [{"name": "bee", "public_key": KEY_BEE, "endpoint": "198.18.0.2:51821",
                         "latest_handshake": 990.0, "tx_bytes": tx, "rx_bytes": rx,
                         "persistent_keepalive": 0, "allowed_ips": ["10.66.0.2/32"]}]
    return snap


def sample(snapshot: dict, monotonic: float, wall: float = 1000.0) -> w.Sample:
    return w.Sample(snapshot, monotonic, wall)


# ------------------------------------------------------------------ rates

def test_counters_are_the_counts_and_not_the_facts():
    snap = relay_snapshot(eg=(5, 500), drops={("ingress", "not_peer"): 2})
    found = w.counters(snap)
    assert found[("egress", "packets")] == 5 and found[("egress", "bytes")] == 500
    assert found[("ingress", "drops", "not_peer")] == 2
    assert ("egress", "errors", "read") in found
    # uptime, queues, the errno of the last error: no rate means anything for them
    assert not [p for p in found if p[-1] in ("uptime", "queues", "last_errno")]


def test_rates_are_the_differences_over_the_relays_own_time():
    before = sample(relay_snapshot(10.0, eg=(100, 10_000), ing=(50, 4_000)), monotonic=500.0)
    # The watcher got the answer 1.3 s later, but the relay made it 2 s
    # after the first: the relay's uptime is what counts.
    after = sample(relay_snapshot(12.0, eg=(300, 30_000), ing=(50, 4_000)), monotonic=501.3)
    rates = w.compute_rates(before, after)
    assert rates.elapsed == pytest.approx(2.0) and not rates.restarted
    assert rates.of("egress", "packets") == pytest.approx(100.0)
    assert rates.of("egress", "bytes") == pytest.approx(10_000.0)
    assert rates.of("ingress", "packets") == 0


def test_the_first_sample_has_no_rates():
    rates = w.compute_rates(None, sample(relay_snapshot(eg=(7, 700)), 1.0))
    assert rates.elapsed is None and not rates.restarted
    assert rates.per_s and set(rates.per_s.values()) == {None}


def test_without_an_uptime_the_watchers_clock_is_used():
    one, two = relay_snapshot(eg=(0, 0)), relay_snapshot(eg=(10, 0))
    del one["uptime"], two["uptime"]
    rates = w.compute_rates(sample(one, 100.0), sample(two, 100.5))
    assert rates.elapsed == pytest.approx(0.5)
    assert rates.of("egress", "packets") == pytest.approx(20.0)


def test_a_counter_that_went_backwards_has_no_rate_never_a_negative_one():
    before = sample(relay_snapshot(10.0, eg=(100, 9_000), ing=(80, 8_000)), 1.0)
    after = sample(relay_snapshot(11.0, eg=(40, 4_000), ing=(90, 9_000)), 2.0)
    rates = w.compute_rates(before, after)
    assert rates.of("egress", "packets") is None and rates.of("egress", "bytes") is None
    assert rates.of("ingress", "packets") == pytest.approx(10.0)
    assert all(r is None or r >= 0 for r in rates.per_s.values())


def test_a_relay_that_restarted_starts_its_rates_again():
    before = sample(relay_snapshot(100.0, eg=(100, 9_000)), 1.0)
    # Restarted: uptime went back; its counters may already be higher.
    after = sample(relay_snapshot(0.5, eg=(500, 50_000)), 2.0)
    rates = w.compute_rates(before, after)
    assert rates.restarted and set(rates.per_s.values()) == {None}
    assert "restarted" in w.headline(after.snapshot, rates, 0.0)


def test_a_restart_during_an_outage_longer_than_the_old_uptime_is_seen():
    # The watcher waited 60 s; the relay's uptime moved only 8 s (it was
    # restarted 52 s ago... and has run for 13 s): not the same relay.
    before = sample(relay_snapshot(5.0, eg=(100, 9_000)), 10.0)
    after = sample(relay_snapshot(13.0, eg=(900, 90_000)), 70.0)
    rates = w.compute_rates(before, after)
    assert rates.restarted and rates.of("egress", "packets") is None


def test_per_peer_rates():
    before = sample(relay_snapshot(1.0, peers={"office": peer((10, 1_000), (20, 2_000))}), 1.0)
    after = sample(relay_snapshot(3.0, peers={"office": peer((30, 3_000), (20, 2_000), (4, 0)),
                                              "laptop": peer((1, 100), (1, 100))}), 3.0)
    rates = w.compute_rates(before, after)
    assert rates.of("peers", "office", "ingress", "packets") == pytest.approx(10.0)
    assert rates.of("peers", "office", "ingress", "bytes") == pytest.approx(1_000.0)
    assert rates.of("peers", "office", "egress", "packets") == 0
    assert rates.of("peers", "office", "ingress", "drops") == pytest.approx(2.0)
    assert rates.of("peers", "laptop", "ingress", "packets") is None  # new: no rate yet
    assert not [p for p in rates.per_s if p[-1] in ("id", "last_seen", "roaming")]


def test_wireguard_rates_per_peer_by_public_key_and_device_counters():
    before = sample(wg_snapshot(5.0, tx=1_000, rx=2_000), 1.0)
    after = sample(wg_snapshot(6.0, tx=3_000, rx=2_500, completed=2, refused=7), 2.0)
    rates = w.compute_rates(before, after)
    assert rates.of("wg_peers", KEY_BEE, "tx_bytes") == pytest.approx(2_000.0)
    assert rates.of("wg_peers", KEY_BEE, "rx_bytes") == pytest.approx(500.0)
    assert rates.of("wireguard", "counters", "handshakes", "completed") == pytest.approx(1.0)
    assert rates.of("wireguard", "counters", "refused", "bad_mac1") is None  # new
    assert rates.of("egress", "packets") == 0   # the pumps' counters, summed
    found = w.counters(after.snapshot)
    for gauge in (("peers",), ("listen_port",), ("table", "peers"), ("table", "control_waiting")):
        assert ("wireguard", "counters", *gauge) not in found
    assert not [p for p in found if "pumps" in p]   # summed into egress/ingress already


def test_rates_as_json_are_nested_like_the_snapshot():
    before = sample(relay_snapshot(1.0, eg=(0, 0), peers={"office": peer((0, 0), (0, 0))}), 1.0)
    after = sample(relay_snapshot(2.0, eg=(5, 500), peers={"office": peer((2, 200), (0, 0))}), 2.0)
    nested = w.compute_rates(before, after).as_json()
    assert nested["egress"]["packets"] == 5.0 and nested["egress"]["drops"]["no_peer"] == 0
    assert nested["peers"]["office"]["ingress"]["bytes"] == 200.0


@pytest.mark.parametrize("value, unit, text", [
    (None, "bit/s", "-"), (0, "pkt/s", "0 pkt/s"), (5, "pkt/s", "5.00 pkt/s"),
    (42.25, "", "42.2"), (950, "pkt/s", "950 pkt/s"), (4_220, "bit/s", "4.22 kbit/s"),
    (12_345_678, "bit/s", "12.3 Mbit/s"), (9.41e9, "bit/s", "9.41 Gbit/s")])
def test_si(value, unit, text):
    assert w.si(value, unit) == text


def test_per_second():
    assert (w.per_s(None), w.per_s(0), w.per_s(2.5), w.per_s(1200)) == (
        "-", "0/s", "2.50/s", "1.20 k/s")


# ------------------------------------------------------------ renderers

def two_samples(before: dict, after: dict, elapsed: float = 1.0):
    first = sample(before, 100.0)
    second = sample(after, 100.0 + elapsed, wall=1_764_345_600.0)   # 2025-11-28 16:00:00 UTC
    return second, w.compute_rates(first, second)


def test_plain_block():
    second, rates = two_samples(
        relay_snapshot(10.0, eg=(100, 10_000), ing=(90, 9_000), drops={("ingress", "not_peer"): 1}),
        relay_snapshot(11.0, eg=(150, 15_000), ing=(140, 14_000),
                       drops={("ingress", "not_peer"): 4}, errors={("egress", "write"): 1}))
    text = w.render_plain(second.snapshot, rates, second.wall)
    print(text)
    assert ESC not in text
    lines = text.splitlines()
    assert lines[0] == ("tun0, raw, running, peer 192.0.2.7:55555, up 11 s; "
                        "2025-11-28 16:00:00 UTC; rates over 1.000 s")
    rows = {re.split(r"\s{2,}", line.strip())[0]: line.split() for line in lines[1:]}
    assert rows["packets"] == ["packets", "150", "50.0", "pkt/s", "140", "50.0", "pkt/s"]
    assert rows["bytes"] == ["bytes", "15000", "40.0", "kbit/s", "14000", "40.0", "kbit/s"]
    assert rows["drops"] == ["drops", "0", "0/s", "4", "3.00/s"]
    assert rows["drop not_peer"] == ["drop", "not_peer", "-", "-", "4", "3.00/s"]  # ingress only
    assert rows["errors"] == ["errors", "1", "1.00/s", "0", "0/s"]
    assert rows["error write"] == ["error", "write", "1", "1.00/s", "0", "0/s"]
    assert not [line for line in lines if "no_peer" in line]   # zero reasons left out


def test_plain_first_block_has_totals_and_no_rates():
    snap = relay_snapshot(3.0, eg=(7, 700))
    text = w.render_plain(snap, w.compute_rates(None, sample(snap, 1.0)), 0.0)
    assert "first sample" in text.splitlines()[0]
    assert re.search(r"^packets\s+7\s+-\s+0\s+-$", text, re.MULTILINE), text


def test_plain_block_of_a_hub_has_a_line_per_peer():
    second, rates = two_samples(
        relay_snapshot(10.0, peers={"office": peer((10, 1_000), (20, 2_000)),
                                    "laptop": peer((0, 0), (0, 0), endpoint=None,
                                                   last_seen=None)}),
        relay_snapshot(12.0, peers={"office": peer((30, 126_000), (24, 2_400), (2, 0)),
                                    "laptop": peer((0, 0), (0, 0), endpoint=None,
                                                   last_seen=None)}), elapsed=2.0)
    text = w.render_plain(second.snapshot, rates, 1001.5)
    print(text)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("peer "))
    assert header.split() == ["peer", "endpoint", "last", "seen", "rx", "pkts", "rx", "pkt/s",
                              "rx", "bit/s", "tx", "pkts", "tx", "pkt/s", "tx", "bit/s",
                              "drops", "rx/tx", "drops/s"]
    office = next(line for line in lines if line.startswith("office"))
    assert office.split() == ["office", "192.0.2.9:55555", "1.5", "s", "ago", "30", "10.0",
                              "500", "k", "24", "2.00", "1.60", "k", "2/0", "1.00"]
    laptop = next(line for line in lines if line.startswith("laptop"))
    assert laptop.split()[:3] == ["laptop", "(unknown)", "never"]


def test_plain_block_of_a_wireguard_device():
    second, rates = two_samples(wg_snapshot(5.0, tx=1_000, rx=2_000, refused=1),
                                wg_snapshot(6.0, tx=126_000, rx=2_500, refused=6))
    text = w.render_plain(second.snapshot, rates, 1000.0)
    print(text)
    lines = text.splitlines()
    assert lines[0].startswith("tun0, wireguard, running, up 6 s;")
    bee = next(line for line in lines if line.startswith("bee"))
    assert bee.split() == ["bee", "198.18.0.2:51821", "10.0", "s", "ago", "2500", "4.00", "k",
                           "126000", "1.00", "M"]
    assert re.search(r"^handshakes\.completed\s+1\s+0/s$", text, re.MULTILINE), text
    assert re.search(r"^refused\.bad_mac1\s+6\s+5\.00/s$", text, re.MULTILINE), text
    assert "listen_port" not in text and "table.peers" not in text


def rich_text(renderable, width: int = 120) -> str:
    from rich.console import Console
    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_rich_view_has_the_same_numbers():
    second, rates = two_samples(
        relay_snapshot(10.0, eg=(100, 10_000), ing=(90, 9_000),
                       peers={"office": peer((10, 1_000), (20, 2_000))}),
        relay_snapshot(11.0, eg=(150, 15_000), ing=(140, 14_000),
                       drops={("ingress", "not_allowed"): 3},
                       peers={"office": peer((60, 6_000), (70, 7_000), (3, 0))}))
    text = rich_text(w.render_rich(second.snapshot, rates, second.wall), width=200)
    print(text)
    assert "rates over 1.000 s" in text
    assert re.search(r"packets\s+150\s+50\.0 pkt/s\s+140\s+50\.0 pkt/s", text), text
    assert re.search(r"bytes\s+15000\s+40\.0 kbit/s\s+14000\s+40\.0 kbit/s", text), text
    assert re.search(r"drop not_allowed\s+-\s+-\s+3\s+3\.00/s", text), text
    assert re.search(r"office\s+192\.0\.2\.9:55555.*\s60\s+50\.0\s+40\.0 k\s+70\s+50\.0\s+40\.0 k"
                     r"\s+3/0\s+3\.00", text), text
    assert "Ctrl-C" in text


def test_rich_view_marks_a_rising_drop_in_red():
    from rich.console import Console
    second, rates = two_samples(relay_snapshot(1.0, drops={("ingress", "bad_tag"): 1}),
                                relay_snapshot(2.0, drops={("ingress", "bad_tag"): 9}))
    console = Console(file=io.StringIO(), width=100, force_terminal=True, color_system="standard")
    console.print(w.render_rich(second.snapshot, rates, second.wall))
    out = console.file.getvalue()
    line = next(line for line in out.splitlines() if "bad_tag" in line)
    assert f"{ESC}[1;31m" in line, repr(line)


def test_rich_view_fits_a_narrow_terminal():
    second, rates = two_samples(wg_snapshot(5.0, tx=1_000, rx=2_000),
                                wg_snapshot(6.0, tx=3_000, rx=2_500))
    text = rich_text(w.render_rich(second.snapshot, rates, second.wall), width=60)
    print(text)
    assert max(len(line) for line in text.splitlines()) <= 60
    assert "packets" in text and "WireGuard peers" in text


def test_json_line_is_the_snapshot_with_rates():
    second, rates = two_samples(relay_snapshot(10.0, eg=(100, 10_000)),
                                relay_snapshot(10.5, eg=(150, 15_000)), elapsed=0.5)
    line = w.json_line(second.snapshot, rates, second.wall)
    assert "\n" not in line
    record = json.loads(line)
    assert record["egress"]["packets"] == 150 and record["device"] == "tun0"
    assert record["rates"]["egress"]["packets"] == 100.0
    assert record["rates"]["egress"]["bytes"] == 10_000.0
    assert record["watch"] == {"time": second.wall, "elapsed": 0.5, "restarted": False}
    first = json.loads(w.json_line(second.snapshot, w.compute_rates(None, second), 0.0))
    assert first["watch"]["elapsed"] is None and first["rates"]["egress"]["packets"] is None


# ------------------------------------------------------------------- loop

class FakeRelay:
    """Answers from a script: a dict (a snapshot) or an exception per ask;
    a clock that the watch's sleeps move."""

    def __init__(self, answers: list) -> None:
        self.answers = list(answers)
        self.now = 0.0
        self.sleeps: list[float] = []

    def ask(self, path: str) -> dict:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds

    def run(self, outputs: w.Outputs, count: int, interval: float = 1.0) -> None:
        w.watch("/x.sock", interval, outputs, count=count, ask=self.ask,
                clock=lambda: self.now, sleep=self.sleep, wall=lambda: 1000.0 + self.now)


def test_watch_shows_each_answer_with_rates_until_count():
    relay = FakeRelay([relay_snapshot(1.0 + i, eg=(10 * i, 0)) for i in range(3)])
    out, err = io.StringIO(), io.StringIO()
    relay.run(w.plain_outputs(out, err, json_lines=True), count=3)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["rates"]["egress"]["packets"] for r in records] == [None, 10.0, 10.0]
    assert relay.sleeps == [1.0, 1.0] and err.getvalue() == ""


def test_a_relay_that_goes_away_is_asked_again_and_its_restart_seen():
    gone = TunrelayError("no relay is running: /x.sock does not exist")
    relay = FakeRelay([relay_snapshot(50.0, eg=(500, 0)), gone, gone, gone,
                       relay_snapshot(1.0, eg=(3, 0)), relay_snapshot(2.0, eg=(13, 0))])
    out, err = io.StringIO(), io.StringIO()
    relay.run(w.plain_outputs(out, err, json_lines=False), count=3)
    assert err.getvalue() == ("tunrelay: no relay is running: /x.sock does not exist; "
                              "retrying every 1 s\ntunrelay: the relay answers again\n")
    blocks = out.getvalue().split("\n\n")
    assert len(blocks) == 3
    assert "first sample" in blocks[0]
    assert "the relay restarted: rates start again" in blocks[1]
    assert re.search(r"^packets\s+13\s+10\.0 pkt/s", blocks[2], re.MULTILINE), blocks[2]


def test_a_relay_that_never_answered_ends_the_watch():
    relay = FakeRelay([TunrelayError("no relay is running: /x.sock does not exist")])
    closed = []
    outputs = w.Outputs(show=lambda *a: None, lost=lambda *a: None,
                        close=lambda: closed.append(True))
    with pytest.raises(TunrelayError, match="no relay is running"):
        relay.run(outputs, count=3)
    assert closed == [True]


def test_a_slow_answer_skips_ticks_instead_of_bursting():
    relay = FakeRelay([relay_snapshot(1.0), relay_snapshot(2.0), relay_snapshot(6.0)])
    real_ask = relay.ask

    def slow_first(path):
        answer = real_ask(path)
        if len(relay.answers) == 1:    # the second ask takes 3.5 s
            relay.now += 3.5
        return answer

    relay.ask = slow_first
    relay.run(w.Outputs(show=lambda *a: None, lost=lambda *a: None), count=3)
    assert relay.sleeps == [1.0, 0.5]   # next tick at 5 s: ticks 2, 3 and 4 were missed


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_live_view_is_drawn_and_the_cursor_given_back(monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("COLUMNS", "100")
    answers = [relay_snapshot(1.0, eg=(1, 100)), relay_snapshot(2.0, eg=(6, 600))]
    out, err = Tty(), io.StringIO()
    assert w.run_watch("/x.sock", 0.1, count=2, out=out, err=err,
                       ask=lambda path: answers.pop(0)) == 0
    text = out.getvalue()
    assert f"{ESC}[?25l" in text                       # cursor hidden while live...
    assert text.rstrip("\n").endswith(f"{ESC}[?25h")   # ...and shown again at the end
    assert "5.00 pkt/s" in text and err.getvalue() == ""


def test_a_dumb_terminal_gets_plain_lines(monkeypatch):
    monkeypatch.setenv("TERM", "dumb")
    answers = [relay_snapshot(1.0, eg=(1, 100))]
    out = Tty()
    w.run_watch("/x.sock", 0.1, count=1, out=out, err=io.StringIO(),
                ask=lambda path: answers.pop(0))
    assert ESC not in out.getvalue() and out.getvalue().startswith("tun0, raw, running")


def test_without_rich_a_terminal_gets_plain_lines_and_a_word_why(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setitem(sys.modules, "rich.console", None)   # import fails
    answers = [relay_snapshot(1.0, eg=(1, 100))]
    out, err = Tty(), io.StringIO()
    assert w.run_watch("/x.sock", 0.1, count=1, out=out, err=err,
                       ask=lambda path: answers.pop(0)) == 0
    assert ESC not in out.getvalue() and out.getvalue().startswith("tun0, raw, running")
    assert "the live view needs rich" in err.getvalue()


def test_ctrl_c_ends_the_watch_with_0_and_the_view_closed(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    calls = []

    def ask(path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return relay_snapshot(1.0)

    out = Tty()
    term = signal.getsignal(signal.SIGTERM)
    assert w.run_watch("/x.sock", 0.1, out=out, err=io.StringIO(), ask=ask) == 0
    assert out.getvalue().rstrip("\n").endswith(f"{ESC}[?25h")
    assert signal.getsignal(signal.SIGTERM) is term   # put back


def test_a_reader_that_went_away_ends_the_watch_with_0():
    class Closed(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    assert w.run_watch("/x.sock", 0.1, out=Closed(), err=io.StringIO(),
                       ask=lambda path: relay_snapshot(1.0)) == 0


# ---------------------------------------------------------- command line

@pytest.mark.parametrize("argv, message", [
    (["--interval", "2"], "--interval applies to --watch only"),
    (["--count", "2"], "--count applies to --watch only"),
    (["--watch", "--interval", "0"], "expected seconds from 0.1 to 3600, got '0'"),
    (["--watch", "--interval", "soon"], "expected seconds from 0.1 to 3600, got 'soon'"),
    (["--watch", "--interval", "nan"], "expected seconds from 0.1 to 3600, got 'nan'"),
    (["--watch", "--count", "0"], "expected a whole number of updates, 1 or more, got '0'"),
])
def test_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["stats", "--socket", "/nonexistent/x.sock", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_no_relay_ends_the_watch_with_exit_1(tmp_path, capsys):
    path = str(tmp_path / "none.sock")
    assert main(["stats", "--socket", path, "--watch", "--interval", "0.1"]) == 1
    assert capsys.readouterr().err == f"tunrelay: no relay is running: {path} does not exist\n"


class Served:
    """A control socket served by this process, answering snapshots whose
    counters grow by 10 packets (1000 bytes) each way per request."""

    def __init__(self, path: str) -> None:
        self.path, self.n, self.started = path, 0, time.monotonic()
        self.server: ControlServer | None = None

    def snapshot(self) -> dict:
        self.n += 1
        return relay_snapshot(time.monotonic() - self.started, eg=(10 * self.n, 1000 * self.n),
                              ing=(10 * self.n, 1000 * self.n))

    def open(self) -> Served:
        self.server = ControlServer(self.path, self.snapshot)
        self.server.open()
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


@pytest.fixture
def served(tmp_path):
    relay = Served(str(tmp_path / "r.sock")).open()
    yield relay
    relay.close()


def test_watch_with_count_from_the_command_line(served, capsys):
    assert main(["stats", "--socket", served.path, "--watch", "--interval", "0.1",
                 "--count", "3"]) == 0
    blocks = capsys.readouterr().out.split("\n\n")
    assert len(blocks) == 3 and all(b.startswith("tun0, raw, running") for b in blocks)
    assert ESC not in "".join(blocks)


def test_json_watch_from_the_command_line(served, capsys):
    assert main(["stats", "--socket", served.path, "-w", "--json", "--interval", "0.1",
                 "--count", "2"]) == 0
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert second["egress"]["packets"] - first["egress"]["packets"] == 10
    assert second["rates"]["egress"]["packets"] == pytest.approx(
        10 / second["watch"]["elapsed"], rel=1e-3)


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (REPO, os.environ.get("PYTHONPATH")) if p))


class Reader:
    """Collects a process's output lines in a thread (reads never block
    the test)."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def join(self) -> None:
        self._thread.join(10)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_the_watch_process_cleanly(served, sig):
    proc = subprocess.Popen([sys.executable, "-m", "tunrelay", "stats", "--socket", served.path,
                             "--watch", "--interval", "0.1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    try:
        out = Reader(proc.stdout)
        wait_for(lambda: out.text().count("rates over") >= 2, 30, "two blocks with rates")
        proc.send_signal(sig)
        assert proc.wait(10) == 0
        out.join()
        assert proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_watch_process_waits_for_a_relay_that_went_away(served):
    proc = subprocess.Popen([sys.executable, "-m", "tunrelay", "stats", "--socket", served.path,
                             "--watch", "--interval", "0.1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    try:
        out, err = Reader(proc.stdout), Reader(proc.stderr)
        wait_for(lambda: "rates over" in out.text(), 30, "a block with rates")
        served.close()
        wait_for(lambda: "retrying every 0.1 s" in err.text(), 30, "the outage told")
        assert proc.poll() is None
        served.started = time.monotonic()   # a new relay: its uptime starts again
        served.n = 0
        served.open()
        wait_for(lambda: "the relay answers again" in err.text(), 30, "the relay back")
        wait_for(lambda: "the relay restarted: rates start again" in out.text(), 30,
                 "the restart seen")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        err.join()
        assert err.text().count("retrying") == 1   # once per outage, not once per interval
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------- real relays (as root)

PACKETS = re.compile(r"^packets\s+(\d+)\s+(-|[\d.]+ [kMG]?pkt/s)\s+(\d+)\s+(-|[\d.]+ [kMG]?pkt/s)$",
                     re.MULTILINE)
NOT_PEER = re.compile(r"^  drop not_peer\s+\S+\s+\S+\s+(\d+)\s+(\S+)$", re.MULTILINE)
OVER = re.compile(r"; rates over ([\d.]+) s$", re.MULTILINE)
SCALE = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}


def value(text: str) -> float | None:
    """A rate cell back to a number: "5.00 pkt/s" -> 5.0, "1.20 k" -> 1200."""
    if text == "-":
        return None
    match = re.fullmatch(r"([\d.]+)(?:/s)?(?: ([kMG]?)\S*)?", text)
    assert match, text
    return float(match[1]) * SCALE[match[2] or ""]


def blocks(text: str) -> list[str]:
    """The plain output cut into blocks at their headlines."""
    starts = [m.start() for m in re.finditer(r"^\S.*; \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC; ",
                                             text, re.MULTILINE)]
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)])]


def watch_process(net, ns: str, *argv: str) -> tuple[subprocess.Popen, Reader, Reader]:
    """``tunrelay stats ARGV`` in namespace ``ns`` of ``net`` (a Testbed or Star)."""
    proc = net.popen(ns, [sys.executable, "-m", "tunrelay", "stats", *argv],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    return proc, Reader(proc.stdout), Reader(proc.stderr)


def end(proc: subprocess.Popen, err: Reader) -> None:
    """Ctrl-C: the watch must stop at once, with 0 and nothing on stderr."""
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 0
    err.join()
    assert err.text() == ""


@pytest.mark.root
def test_watching_a_running_pair_while_pinging(make_pair):
    from test_integration import DATAGRAMS, wait_ping

    from tunrelay.testrig.pair import PORT, TUNNEL_B
    relays = make_pair()
    relays.start()
    tb, side = relays.bed, relays.sides["a"]
    wait_ping(tb, tb.ns_a, TUNNEL_B)
    before = relays.stats("a")
    proc, out, err = watch_process(tb, side.ns, "--config", side.config_path, "--watch",
                                   "--interval", "0.2")
    ping = tb.popen(tb.ns_a, ["ping", "-n", "-q", "-i", "0.05", "-c", "200", "-w", "30",
                               TUNNEL_B], stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(blocks(out.text())) >= 4, 30, "four blocks")
        # A stranger (not the peer's port) sends three datagrams: dropped, not_peer.
        python(tb, tb.ns_b, DATAGRAMS, tb.addr_b, "40000", tb.addr_a, str(PORT),
               "45", "45", "45")
        wait_for(lambda: NOT_PEER.search(blocks(out.text())[-1]), 30, "the not_peer drops shown")
        wait_for(lambda: len(blocks(out.text())) >= 8, 30, "eight blocks")
    finally:
        ping.wait(60)
    end(proc, err)
    after = relays.stats("a")
    text = out.text()
    print(text)
    assert ESC not in text
    seen = blocks(text)
    assert "first sample" in seen[0]
    rows = []
    for block in seen:
        match = PACKETS.search(block)
        assert match, block
        over = OVER.search(block)
        rows.append((int(match[1]), value(match[2]), int(match[3]), value(match[4]),
                     float(over[1]) if over else None))
    # The counters are the relay's: between what it said before and after,
    # never going back.
    eg = [r[0] for r in rows]
    ing = [r[2] for r in rows]
    assert before["egress"]["packets"] <= eg[0] and eg == sorted(eg)
    assert eg[-1] <= after["egress"]["packets"]
    assert before["ingress"]["packets"] <= ing[0] and ing == sorted(ing)
    assert ing[-1] <= after["ingress"]["packets"]
    # Each rate is its block's counters minus the last block's, over its
    # interval (up to the rounding of 3 printed figures).
    for (eg0, _, in0, _, _), (eg1, eg_rate, in1, in_rate, over) in pairwise(rows):
        assert over is not None and 0.05 < over < 5
        for delta, rate in ((eg1 - eg0, eg_rate), (in1 - in0, in_rate)):
            assert rate is not None and rate * over == pytest.approx(delta, rel=0.02, abs=0.5)
    # The ping (20 a second each way) was seen going out and coming back.
    assert max(r[1] for r in rows[1:]) > 0 and max(r[3] for r in rows[1:]) > 0
    # The stranger's drops: a total of at least 3, and a rate while they came.
    drops = [NOT_PEER.search(block) for block in seen]
    assert max(int(m[1]) for m in drops if m) >= 3
    assert any(value(m[2]) for m in drops if m)


@pytest.mark.root
def test_watching_a_hub_as_json_lines_per_peer():
    from test_hub import HUB, running_hub
    with running_hub() as (star, relays):
        ns = star.spokes[0].ns
        proc, out, err = watch_process(star, star.hub, "--config", relays.path("hub", "toml"),
                                       "--watch", "--json", "--interval", "0.2")
        ping = star.popen(ns, ["ping", "-n", "-q", "-i", "0.05", "-c", "100", "-w", "30", HUB],
                          stdout=subprocess.DEVNULL)
        try:
            wait_for(lambda: len(out.text().splitlines()) >= 6, 30, "six JSON lines")
        finally:
            ping.wait(60)
        end(proc, err)
    records = [json.loads(line) for line in out.text().splitlines()]
    assert records[0]["watch"]["elapsed"] is None
    spoke1 = [(r["peers"]["spoke1"]["ingress"]["packets"],
               r["rates"]["peers"]["spoke1"]["ingress"]["packets"], r["watch"]["elapsed"])
              for r in records]
    for (n0, _, _), (n1, rate, elapsed) in pairwise(spoke1):
        assert 0.05 < elapsed < 5
        assert rate == pytest.approx((n1 - n0) / elapsed, rel=1e-3, abs=1e-3)
    assert max(rate for _, rate, _ in spoke1[1:]) > 0    # the ping, from spoke1
    assert all("spoke2" in r["rates"]["peers"] for r in records)


@pytest.mark.root
def test_watching_a_wireguard_device(pair):
    tb = pair.bed
    proc, out, err = watch_process(tb, tb.ns_a, "--config", pair.toml, "--watch",
                                   "--interval", "0.2")
    ping = tb.popen(tb.ns_a, ["ping", "-n", "-q", "-i", "0.05", "-c", "100", "-w", "30", B],
                    stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(blocks(out.text())) >= 5, 30, "five blocks")
    finally:
        ping.wait(60)
    end(proc, err)
    text = out.text()
    print(text)
    bee = re.compile(r"^bee\s+\S+\s+.+? ago\s+(\d+)\s+(\S+(?: [kMG])?)\s+(\d+)\s+(\S+(?: [kMG])?)$",
                     re.MULTILINE)
    bees = [bee.search(block) for block in blocks(text)]
    assert all(bees), text
    rx = [(int(m[1]), value(m[2])) for m in bees]
    tx = [(int(m[3]), value(m[4])) for m in bees]
    assert [n for n, _ in rx] == sorted(n for n, _ in rx)
    assert max(r for _, r in rx[1:]) > 0 and max(r for _, r in tx[1:]) > 0
    assert "handshakes.completed" in text
    assert PACKETS.search(blocks(text)[-1])   # the pumps' counters too
