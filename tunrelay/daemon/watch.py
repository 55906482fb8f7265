"""``tunrelay stats --watch``: the counters redrawn every interval, with rates.

Each interval the control socket is asked for a snapshot (the one
``tunrelay stats`` prints); the rates are the differences between two
consecutive snapshots divided by the time between them.  That time is the
difference of the relay's own ``uptime`` (read from the same monotonic
clock at the moment the relay made the snapshot, so the socket's latency
does not enter it); the watcher's monotonic clock is the fallback.

A counter that is smaller than it was (the relay restarted, or a peer was
removed and added again) has no rate for that interval: it is shown as
``-``, never as a negative rate.  An uptime that went backwards means the
relay restarted: every rate of that interval is dropped.

Three outputs, chosen by ``cmd_stats``:

- a terminal: a ``rich`` view redrawn in place (``rich.live.Live``);
- anything else (a pipe, a file, ``TERM=dumb``): one block of plain lines
  per interval, no escape codes, a blank line between blocks;
- ``--json``: one JSON object per line: the snapshot as ``tunrelay stats
  --json`` has it, plus ``rates`` (the same counters' paths, per second)
  and ``watch`` (when, over how long, whether the relay restarted).

The relay going away after it answered once is not the end: the watch
says so and asks again every interval until it answers (a restarted relay
starts with fresh rates).  If it does not answer the first time, the
watch ends at once with exit code 1, as ``tunrelay stats`` does.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from ..counters import DIRECTIONS
from ..errors import TunrelayError

#: Where intervals may go (seconds): faster than 0.1 s only loads the
#: relay's control thread; slower than an hour is not watching.
MIN_INTERVAL_S, MAX_INTERVAL_S = 0.1, 3600.0

#: A WireGuard device's counters that are facts or gauges, not counts
#: (the nested ``wireguard.counters`` of its snapshot).
_WG_GAUGES = {("peers",), ("listen_port",), ("under_load",), ("pumps",),
              ("table", "peers"), ("table", "retired_pending"), ("table", "control_waiting")}

#: A [[peer]]'s entries that are not counters.
_PEER_FACTS = ("id", "name", "endpoint", "allowed_ips", "roaming", "last_seen", "sessions")

Path = tuple  # of str: ("egress", "drops", "no_route"), ("peers", "office", "ingress", "bytes")


# ------------------------------------------------------------------ rates

def counters(snapshot: dict) -> dict[Path, int]:
    """Every counter of a snapshot, by its path: the pumps' directions,
    the [[peer]] tables' peers, a WireGuard device's peers (keyed by public
    key, which a reload cannot give to another peer) and its own counters,
    and a TCP relay's connection counts.  Gauges and facts (uptime,
    queues, last seen, sessions held) are left out: they have no rate."""
    found: dict[Path, int] = {}
    for direction in DIRECTIONS:
        if isinstance(snapshot.get(direction), dict):
            _walk(snapshot[direction], (direction,), found)
    for name, info in (snapshot.get("peers") or {}).items():
        _walk({k: v for k, v in info.items() if k not in _PEER_FACTS}, ("peers", name), found)
    for row in snapshot.get("wg_peers") or ():
        key = row.get("public_key") or row.get("name")
        for counter in ("tx_bytes", "rx_bytes"):
            if _is_count(row.get(counter)):
                found[("wg_peers", key, counter)] = row[counter]
    wg_counters = (snapshot.get("wireguard") or {}).get("counters")
    if isinstance(wg_counters, dict):
        _walk(wg_counters, ("wireguard", "counters"), found, skip=_WG_GAUGES)
    for key in ("connections", "rejected"):
        if _is_count(snapshot.get(key)):
            found[(key,)] = snapshot[key]
    if isinstance(snapshot.get("refused"), dict):
        _walk(snapshot["refused"], ("refused",), found)
    return found


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _walk(tree: dict, prefix: Path, found: dict, skip: set = frozenset(), at: Path = ()) -> None:
    for key, value in tree.items():
        here = (*at, str(key))
        if here in skip or key == "last_errno":  # an errno, not a count
            continue
        if isinstance(value, dict):
            _walk(value, prefix, found, skip, here)
        elif _is_count(value):
            found[(*prefix, *here)] = value


@dataclass(frozen=True)
class Sample:
    """One answer of the relay: its snapshot, and when the watcher got it
    (``time.monotonic()`` and ``time.time()``)."""
    snapshot: dict
    monotonic: float
    wall: float


@dataclass
class Rates:
    """The rates between two samples.  ``elapsed`` is None for the first
    sample (nothing to compare with); ``restarted`` says the relay's
    uptime went backwards, or moved far less than the watcher's clock (a
    new relay: no rates at all then).  ``per_s`` holds a rate
    for every counter of the newer sample: None where there is none
    (first sample, restart, a counter new or smaller than before)."""
    elapsed: float | None
    restarted: bool = False
    per_s: dict[Path, float | None] = field(default_factory=dict)

    def of(self, *path: str) -> float | None:
        return self.per_s.get(tuple(path))

    def as_json(self) -> dict:
        """Nested like the snapshot: {"egress": {"packets": 5.0, "drops":
        {...}}, "peers": {...}, "wg_peers": {public key: {...}}, ...}."""
        nested: dict = {}
        for path, rate in self.per_s.items():
            node = nested
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = None if rate is None else round(rate, 3)
        return nested


#: How far the relay's uptime may lag the watcher's clock between two
#: answers before it counts as a restart (a relay restarted during an
#: outage whose new uptime is already past the old one).  Both read the
#: same monotonic clock; they differ only by how long an answer takes,
#: at most the control socket's timeout.
RESTART_SLACK_S = 2.5


def compute_rates(previous: Sample | None, current: Sample) -> Rates:
    """Rates of ``current``'s counters since ``previous``."""
    now = counters(current.snapshot)
    if previous is None:
        return Rates(elapsed=None, per_s=dict.fromkeys(now))
    watched = current.monotonic - previous.monotonic
    up_then, up_now = previous.snapshot.get("uptime"), current.snapshot.get("uptime")
    if isinstance(up_then, (int, float)) and isinstance(up_now, (int, float)):
        elapsed = up_now - up_then
        restarted = elapsed < 0 or watched - elapsed > RESTART_SLACK_S
    else:
        elapsed, restarted = watched, False
    if restarted or elapsed <= 0:
        return Rates(elapsed=None, restarted=restarted, per_s=dict.fromkeys(now))
    before = counters(previous.snapshot)
    per_s: dict[Path, float | None] = {}
    for path, value in now.items():
        old = before.get(path)
        per_s[path] = None if old is None or value < old else (value - old) / elapsed
    return Rates(elapsed=elapsed, per_s=per_s)


# ------------------------------------------------------------- formatting

def si(value: float | None, unit: str = "") -> str:
    """A rate for people: ``-`` for none, else 3 significant figures with
    an SI prefix (``4.22 kbit/s``, ``950 pkt/s``, ``1.05 Gbit/s``)."""
    if value is None or math.isnan(value):
        return "-"
    prefix = ""
    for p, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            value, prefix = value / scale, p
            break
    if value == 0:
        number = "0"
    elif abs(value) < 10:
        number = f"{value:.2f}"
    elif abs(value) < 100:
        number = f"{value:.1f}"
    else:
        number = f"{value:.0f}"
    suffix = f"{prefix}{unit}"
    return f"{number} {suffix}" if suffix else number


def per_s(rate: float | None) -> str:
    """A rate of events (drops, errors, handshakes): ``0/s``, ``2.50/s``,
    ``1.20 k/s``; ``-`` for none."""
    return "-" if rate is None else si(rate) + "/s"


def _bits(rate: float | None) -> float | None:
    return None if rate is None else rate * 8


def _ago(then: float | None, now: float) -> str:
    return "never" if then is None else f"{max(0.0, now - then):.1f} s ago"


def headline(snapshot: dict, rates: Rates, wall: float) -> str:
    """The first line of a block: which relay, its state, when, and over
    how long the rates are (or why there are none)."""
    parts = [snapshot.get("device") or "(no device)"]
    for key in ("framing", "state"):
        if snapshot.get(key):
            parts.append(str(snapshot[key]))
    if snapshot.get("peer"):
        parts.append(f"peer {snapshot['peer']}")
    if isinstance(snapshot.get("uptime"), (int, float)):
        parts.append(f"up {snapshot['uptime']:.0f} s")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(wall))
    if rates.restarted:
        over = "the relay restarted: rates start again"
    elif rates.elapsed is None:
        over = "first sample: rates from the next one"
    else:
        over = f"rates over {rates.elapsed:.3f} s"
    return f"{', '.join(parts)}; {when}; {over}"


@dataclass
class Row:
    """One line of a table: a label, then (total, rate) cells."""
    label: str
    cells: list[tuple[str, str]]
    alarm: bool = False      # a drop or error counter rising now
    warn: bool = False       # a drop or error counter that is not zero


def direction_rows(snapshot: dict, rates: Rates) -> list[Row]:
    """packets (pkt/s), bytes (bit/s), drops and errors (their totals and
    each nonzero reason or kind), one (total, rate) cell per direction."""
    if not all(isinstance(snapshot.get(d), dict) for d in DIRECTIONS):
        return []
    rows = [Row("packets", [(str(snapshot[d]["packets"]), si(rates.of(d, "packets"), "pkt/s"))
                            for d in DIRECTIONS]),
            Row("bytes", [(str(snapshot[d]["bytes"]), si(_bits(rates.of(d, "bytes")), "bit/s"))
                          for d in DIRECTIONS])]
    for group, singular in (("drops", "drop"), ("errors", "error")):
        names = sorted({k for d in DIRECTIONS for k, v in snapshot[d].get(group, {}).items()
                        if _is_count(v) and v})
        totals, total_rates = [], []
        for d in DIRECTIONS:
            counts = {k: v for k, v in snapshot[d].get(group, {}).items() if _is_count(v)}
            totals.append(sum(counts.values()))
            each = [rates.of(d, group, k) for k in counts]
            total_rates.append(None if any(r is None for r in each) else sum(each))
        rows.append(_alarm_row(group, totals, total_rates))
        for name in names:
            values = [snapshot[d].get(group, {}).get(name) for d in DIRECTIONS]
            rows.append(_alarm_row(f"  {singular} {name}", values,
                                   [rates.of(d, group, name) for d in DIRECTIONS]))
    return rows


def _alarm_row(label: str, values: list, rates: list) -> Row:
    cells = [("-" if v is None else str(v), "-" if v is None else per_s(r))
             for v, r in zip(values, rates)]
    return Row(label, cells, alarm=any(r for r in rates if r is not None),
               warn=any(v for v in values if v))


#: The [[peer]] table's columns (after name, endpoint and last seen).
PEER_COLUMNS = ("rx pkts", "rx pkt/s", "rx bit/s", "tx pkts", "tx pkt/s", "tx bit/s",
                "drops rx/tx", "drops/s")


def peer_rows(snapshot: dict, rates: Rates, now: float) -> list[tuple[list[str], bool]]:
    """One row per [[peer]] (cells, and whether its drops are rising):
    name, endpoint, last seen, then PEER_COLUMNS.  rx is from the peer,
    tx to it."""
    rows = []
    for name, info in (snapshot.get("peers") or {}).items():
        rx, tx = info.get("ingress", {}), info.get("egress", {})
        def r(*path: str, name: str = name) -> float | None:
            return rates.of("peers", name, *path)

        drop_rates = [r("ingress", "drops"), r("egress", "drops")]
        drops_per_s = None if None in drop_rates else sum(drop_rates)
        rows.append(([name, info.get("endpoint") or "(unknown)", _ago(info.get("last_seen"), now),
                      str(rx.get("packets", 0)), si(r("ingress", "packets")),
                      si(_bits(r("ingress", "bytes"))),
                      str(tx.get("packets", 0)), si(r("egress", "packets")),
                      si(_bits(r("egress", "bytes"))),
                      f"{rx.get('drops', 0)}/{tx.get('drops', 0)}", si(drops_per_s)],
                     bool(drops_per_s)))
    return rows


#: A WireGuard device's peer columns (after name, endpoint, latest handshake).
WG_PEER_COLUMNS = ("rx bytes", "rx bit/s", "tx bytes", "tx bit/s")


def wg_peer_rows(snapshot: dict, rates: Rates, now: float) -> list[list[str]]:
    """One row per WireGuard peer: name, endpoint, latest handshake, then
    WG_PEER_COLUMNS (bytes on the wire, as `wg show` counts them)."""
    rows = []
    for row in snapshot.get("wg_peers") or ():
        key = row.get("public_key") or row.get("name")
        rows.append([row.get("name") or str(key), row.get("endpoint") or "(unknown)",
                     _ago(row.get("latest_handshake"), now),
                     str(row.get("rx_bytes", 0)), si(_bits(rates.of("wg_peers", key, "rx_bytes"))),
                     str(row.get("tx_bytes", 0)), si(_bits(rates.of("wg_peers", key, "tx_bytes")))])
    return rows


def other_rows(snapshot: dict, rates: Rates) -> list[Row]:
    """The other counters that are not zero: a WireGuard device's
    (handshakes, refusals, staged packets: dotted names) and a TCP relay's
    connections and refusals, each with its rate."""
    rows = []
    for path, value in counters(snapshot).items():
        if path[0] in ("wireguard", "connections", "rejected", "refused") and value:
            name = ".".join(path[2:] if path[0] == "wireguard" else path)
            rate = rates.per_s.get(path)
            rising = bool(rate) and _is_trouble(path)
            rows.append(Row(name, [(str(value), per_s(rate))],
                            alarm=rising, warn=_is_trouble(path)))
    return rows


def _is_trouble(path: Path) -> bool:
    """Counters an operator wants to see climb rarely: refusals, drops,
    errors, handshakes given up."""
    text = ".".join(path)
    return any(word in text for word in ("refused", "rejected", "dropped", "error", "given_up"))


# ------------------------------------------------------------------ plain

def _columns(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                      for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
            for row in rows]


def render_plain(snapshot: dict, rates: Rates, wall: float) -> str:
    """One block of plain lines (no escape codes): the headline, the
    directions (total and rate per direction), the peers, the other
    counters."""
    lines = [headline(snapshot, rates, wall)]
    rows = direction_rows(snapshot, rates)
    if rows:
        table = [["", "egress", "/s", "ingress", "/s"]]
        table += [[row.label, *(c for cell in row.cells for c in cell)] for row in rows]
        lines += _columns(table, right={1, 2, 3, 4})
    peers = peer_rows(snapshot, rates, wall)
    if peers:
        lines.append("")
        lines += _columns([["peer", "endpoint", "last seen", *PEER_COLUMNS],
                           *(cells for cells, _ in peers)], right=set(range(3, 11)))
    wg_peers = wg_peer_rows(snapshot, rates, wall)
    if wg_peers:
        lines.append("")
        lines += _columns([["peer", "endpoint", "latest handshake", *WG_PEER_COLUMNS],
                           *wg_peers], right={3, 4, 5, 6})
    others = other_rows(snapshot, rates)
    if others:
        lines.append("")
        lines += _columns([["counter", "total", "/s"],
                           *([row.label, *row.cells[0]] for row in others)], right={1, 2})
    return "\n".join(lines)


# ------------------------------------------------------------------- rich

def render_rich(snapshot: dict, rates: Rates, wall: float):
    """The same as render_plain as rich tables: a drop, error or refusal
    counter is yellow once it is not zero, bold red while it rises."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    def style(row: Row) -> str | None:
        return "bold red" if row.alarm else "yellow" if row.warn else None

    parts: list = [Text(headline(snapshot, rates, wall), style="bold")]
    rows = direction_rows(snapshot, rates)
    if rows:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, expand=False)
        table.add_column("", no_wrap=True)
        for direction in DIRECTIONS:
            table.add_column(direction, justify="right", no_wrap=True)
            table.add_column("/s", justify="right", no_wrap=True)
        for row in rows:
            table.add_row(row.label, *(c for cell in row.cells for c in cell), style=style(row))
        parts.append(table)
    peers = peer_rows(snapshot, rates, wall)
    if peers:
        parts.append(Text(""))
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title="peers", title_justify="left")
        table.add_column("peer", no_wrap=True, overflow="ellipsis", max_width=24)
        table.add_column("endpoint", overflow="ellipsis", max_width=48)
        table.add_column("last seen", no_wrap=True)
        for column in PEER_COLUMNS:
            table.add_column(column, justify="right", no_wrap=True)
        for cells, rising in peers:
            table.add_row(*cells, style="bold red" if rising else None)
        parts.append(table)
    wg_peers = wg_peer_rows(snapshot, rates, wall)
    if wg_peers:
        parts.append(Text(""))
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title="WireGuard peers",
                      title_justify="left")
        table.add_column("peer", no_wrap=True, overflow="ellipsis", max_width=24)
        table.add_column("endpoint", overflow="ellipsis", max_width=48)
        table.add_column("latest handshake", no_wrap=True)
        for column in WG_PEER_COLUMNS:
            table.add_column(column, justify="right", no_wrap=True)
        for cells in wg_peers:
            table.add_row(*cells)
        parts.append(table)
    others = other_rows(snapshot, rates)
    if others:
        parts.append(Text(""))
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title="other counters",
                      title_justify="left")
        table.add_column("counter", no_wrap=True, overflow="ellipsis")
        table.add_column("total", justify="right", no_wrap=True)
        table.add_column("/s", justify="right", no_wrap=True)
        for row in others:
            table.add_row(row.label, *row.cells[0], style=style(row))
        parts.append(table)
    parts += [Text(""), Text("Ctrl-C to stop", style="dim")]
    return Group(*parts)


# ------------------------------------------------------------------- json

def json_line(snapshot: dict, rates: Rates, wall: float) -> str:
    """One line: the snapshot (as `tunrelay stats --json`), ``rates``
    (per second, the counters' paths; WireGuard peers keyed by public key)
    and ``watch``: {"time": Unix seconds, "elapsed": seconds the rates are
    over (null for the first sample), "restarted": bool}."""
    record = dict(snapshot)
    record["rates"] = rates.as_json()
    record["watch"] = {"time": round(wall, 3),
                       "elapsed": None if rates.elapsed is None else round(rates.elapsed, 6),
                       "restarted": rates.restarted}
    return json.dumps(record, sort_keys=True)


# ------------------------------------------------------------------- loop

def samples(path: str, interval: float, *, ask: Callable[[str], dict],
            clock: Callable[[], float] = time.monotonic,
            sleep: Callable[[float], None] = time.sleep,
            wall: Callable[[], float] = time.time) -> Iterator[Sample | TunrelayError]:
    """The relay's answers, one per interval on a fixed schedule (a slow
    answer does not push the next ones back); a TunrelayError in place of
    an answer while the relay does not answer.  The first failure raises
    instead: the relay was never there."""
    start = clock()
    tick = 0
    answered = False
    while True:
        try:
            snapshot = ask(path)
        except TunrelayError as exc:
            if not answered:
                raise
            yield exc
        else:
            answered = True
            yield Sample(snapshot, clock(), wall())
        tick += 1
        due = start + tick * interval
        now = clock()
        if now > due:  # fell behind (a suspended terminal, a slow relay): skip, never burst
            tick += int((now - due) // interval) + 1
            due = start + tick * interval
        sleep(due - now)


@dataclass
class Outputs:
    """Where a watch writes: ``show(sample, rates)`` for an answer,
    ``lost(error, interval)`` when the relay stops answering, ``back()``
    when it answers again, ``close()`` at the end."""
    show: Callable[[Sample, Rates], None]
    lost: Callable[[TunrelayError, float], None]
    back: Callable[[], None] = lambda: None
    close: Callable[[], None] = lambda: None


def plain_outputs(out: TextIO, err: TextIO, *, json_lines: bool) -> Outputs:
    """Plain blocks (a blank line between them) or JSON lines on ``out``,
    flushed after each; the relay going away and coming back on ``err``,
    one line each."""
    state = {"first": True}

    def show(sample: Sample, rates: Rates) -> None:
        if json_lines:
            out.write(json_line(sample.snapshot, rates, sample.wall) + "\n")
        else:
            out.write(("" if state["first"] else "\n")
                      + render_plain(sample.snapshot, rates, sample.wall) + "\n")
        state["first"] = False
        out.flush()

    def lost(error: TunrelayError, interval: float) -> None:
        err.write(f"tunrelay: {error}; retrying every {interval:g} s\n")
        err.flush()

    def back() -> None:
        err.write("tunrelay: the relay answers again\n")
        err.flush()

    return Outputs(show, lost, back)


def rich_outputs(console) -> Outputs:
    """A rich.live.Live view on ``console``, redrawn in place each
    interval.  It starts with the first thing to show (so a relay that
    never answers leaves the terminal as it was); close() stops it: the
    cursor comes back and the last view stays on the screen."""
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    state: dict = {}

    def draw(renderable) -> None:
        if "live" not in state:
            state["live"] = Live(renderable, console=console, auto_refresh=False,
                                 transient=False, redirect_stdout=False, redirect_stderr=False)
            state["live"].start(refresh=True)
        else:
            state["live"].update(renderable, refresh=True)

    def show(sample: Sample, rates: Rates) -> None:
        state["view"] = render_rich(sample.snapshot, rates, sample.wall)
        draw(state["view"])

    def lost(error: TunrelayError, interval: float) -> None:
        message = Text(f"{error}; retrying every {interval:g} s (Ctrl-C to stop)",
                       style="bold red")
        draw(Group(message, state["view"]) if "view" in state else message)

    def close() -> None:
        if "live" in state:
            state.pop("live").stop()

    return Outputs(show, lost, close=close)


def watch(path: str, interval: float, outputs: Outputs, *, count: int | None = None,
          ask: Callable[[str], dict], clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep,
          wall: Callable[[], float] = time.time) -> None:
    """Show ``count`` answers (None: until interrupted).  Raises the
    first TunrelayError if the relay never answered.  Across an outage
    the last answer is kept: a relay that restarted meanwhile is seen by
    its uptime (or counters) going backwards, and its rates start again."""
    previous: Sample | None = None
    shown = 0
    down = False
    try:
        for item in samples(path, interval, ask=ask, clock=clock, sleep=sleep, wall=wall):
            if isinstance(item, TunrelayError):
                if not down:
                    outputs.lost(item, interval)
                down = True
                continue
            if down:
                outputs.back()
                down = False
            outputs.show(item, compute_rates(previous, item))
            previous = item
            shown += 1
            if count is not None and shown >= count:
                return
    finally:
        outputs.close()


def is_terminal(out: TextIO) -> bool:
    """Whether ``out`` gets the live view: a terminal that can move its
    cursor (not TERM=dumb)."""
    try:
        return out.isatty() and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):
        return False


def run_watch(path: str, interval: float, *, count: int | None = None, json_lines: bool = False,
              out: TextIO | None = None, err: TextIO | None = None,
              ask: Callable[[str], dict] | None = None) -> int:
    """``tunrelay stats --watch``: the live view on a terminal, plain
    blocks elsewhere, JSON lines with ``json_lines``.  Ctrl-C, SIGTERM and
    a reader that went away (``| head``) end it with 0; a relay that
    never answered raises its TunrelayError (exit 1)."""
    from .stats import query
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    outputs = None
    if not json_lines and is_terminal(out):
        try:
            from rich.console import Console
        except ImportError:   # a runtime dependency, but a packager may have left it out
            err.write("tunrelay: the live view needs rich (pip install rich): plain lines "
                      "instead\n")
        else:
            outputs = rich_outputs(Console(file=out))
    if outputs is None:
        outputs = plain_outputs(out, err, json_lines=json_lines)
    previous_term = _sigterm_interrupts()
    try:
        watch(path, interval, outputs, count=count, ask=ask or query)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # The reader is gone: nothing more to say, and nothing to flush
        # at exit either (that would fail again, on the way out).
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass
        return 0
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    return 0


def _sigterm_interrupts():
    """SIGTERM ends the watch as Ctrl-C does (cleanly, exit 0, the
    terminal restored); returns the handler it replaced (None where
    signals cannot be set: not the main thread)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, interrupt)
    except ValueError:
        return None
