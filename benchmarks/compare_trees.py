"""Tunnel rows of the suite from two trees, alternating, in one run (root).

    python -m benchmarks.compare_trees BASE_TREE [--rounds 6] [--seconds 5] [--runs 3]
                                       [--json FILE]

BASE_TREE is a checkout of another commit with its extension built in
place (``git worktree add /tmp/base <commit>``, then ``python setup.py
build_ext --inplace`` in it).  Each measurement is a fresh subprocess run
in one tree (cwd and sys.path), which takes the row from *that tree's*
suite (``benchmarks.tunnels.all_tunnels()``), builds its test bed, starts
its relays (``python -m tunrelay run``, so that tree's daemon and pump),
checks that the relay processes mapped that tree's ``_fastpath`` and
measures TCP 1 stream with iperf3 ``runs`` times (Gbit/s, receiver side;
CPU s/GB of the relays), as the suite does.  Nothing is written to either
tree's RESULTS.md.

The rows (``--row TREE=LABEL``, TREE ``base`` or ``this``) default to
issue 8's: the point-to-point relay of both trees, this tree's relay with
its one peer in a ``[[peer]]`` table, and this tree's hub (spoke to spoke
through a third relay).  Every round measures every row, in an order that
rotates round by round, so the machine's drift falls on all rows alike.
The ratios are taken within each round (a row over its reference of the
same round) and their median and range over the rounds are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks.report import POINT_TO_POINT
from benchmarks.tunnels import HUB, ONE_PEER_TABLE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ROWS = [("base", POINT_TO_POINT), ("this", POINT_TO_POINT), ("this", ONE_PEER_TABLE),
                ("this", HUB)]
#: (row, reference row): the ratios printed, each taken within one round.
RATIOS = [
    (("this", POINT_TO_POINT), ("base", POINT_TO_POINT)),
    (("this", ONE_PEER_TABLE), ("this", POINT_TO_POINT)),
    (("this", ONE_PEER_TABLE), ("base", POINT_TO_POINT)),
    (("this", HUB), ("this", POINT_TO_POINT)),
]

# Runs in the subprocess, cwd = the tree, the tree first on sys.path.  It
# uses only what both trees' suites have (tunnels.all_tunnels, Testbed,
# measure.*); a tunnel with its own test bed says so with testbed().
PROBE = r"""
import json, os, sys
tree, label, seconds, runs = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, tree)
import tunrelay
from benchmarks import measure, tunnels
for module in (tunrelay, measure, tunnels):
    assert module.__file__.startswith(tree + os.sep), (module.__name__, module.__file__)
by_label = {t.label: t for t in tunnels.all_tunnels()}
if label not in by_label:
    print(json.dumps({"missing": sorted(by_label)}))
    sys.exit(0)
tunnel = by_label[label]
bed_of = getattr(tunnel, "testbed", tunnels.Testbed)
out = {"tcp1_gbps": [], "cpu_s_per_gb": [], "cpu_by_relay": [], "fastpath": []}
with bed_of() as bed:
    try:
        tunnel.start(bed)
        measure.wait_for_ping(bed, tunnel.server_ip)
        pids = tunnel.pids()
        roles = tunnel.roles() if hasattr(tunnel, "roles") else {f"relay{i}": p for i, p in enumerate(pids)}
        for pid in pids:  # the relay processes run this tree's compiled pump
            with open(f"/proc/{pid}/maps") as f:
                mapped = {line.split()[-1] for line in f if "_fastpath" in line}
            assert mapped and all(p.startswith(tree + os.sep) for p in mapped), (pid, mapped)
            out["fastpath"] += sorted(mapped)
        for _ in range(runs):
            before = {name: measure.cpu_seconds([pid]) for name, pid in roles.items()}
            gbps, moved = measure.tcp_result(measure.iperf3(bed, tunnel.server_ip, seconds))
            gb = moved / 1e9
            used = {name: (measure.cpu_seconds([pid]) - before[name]) / gb for name, pid in roles.items()}
            out["tcp1_gbps"].append(gbps)
            out["cpu_s_per_gb"].append(sum(used.values()))
            out["cpu_by_relay"].append(used)
    finally:
        tunnel.stop()
print(json.dumps(out))
"""


def measure(tree: str, label: str, seconds: float, runs: int) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, tree, label, str(seconds), str(runs)],
                          capture_output=True, text=True, cwd=tree,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                          timeout=120 + runs * (seconds + 30))
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{tree} {label!r}: exit {done.returncode}: {done.stderr.strip()[-1500:]}")
    result = json.loads(lines[-1])
    if "missing" in result:
        raise SystemExit(f"{tree} has no row {label!r}; its rows: {', '.join(result['missing'])}")
    return result


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """'median (min-max)' of ``values``."""
    return (f"{fmt.format(statistics.median(values))} "
            f"({fmt.format(min(values))}-{fmt.format(max(values))})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="a tree of another commit, its extension built in place")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each iperf3 test")
    parser.add_argument("--runs", type=int, default=3, help="iperf3 tests per row per round")
    parser.add_argument("--row", action="append", metavar="TREE=LABEL",
                        help="a row to measure (TREE: base or this); default: issue 8's four")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    args = parser.parse_args()
    trees = {"base": os.path.abspath(args.base), "this": ROOT}
    rows = [tuple(r.split("=", 1)) for r in args.row] if args.row else DEFAULT_ROWS
    for tree, _ in rows:
        if tree not in trees:
            parser.error(f"--row: TREE is base or this, not {tree!r}")
    results: dict = {row: [] for row in rows}
    started = time.time()
    for round_ in range(args.rounds):
        shift = round_ % len(rows)
        for row in rows[shift:] + rows[:shift]:
            results[row].append(measure(trees[row[0]], row[1], args.seconds, args.runs))
        print(f"round {round_ + 1}/{args.rounds} done, {(time.time() - started) / 60:.1f} min, "
              f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)

    def per_round(row: tuple, metric: str) -> list[float]:
        return [statistics.median(r[metric]) for r in results[row]]

    print(f"{args.rounds} rounds; each round: every row once, median of {args.runs} iperf3 TCP "
          f"1-stream tests of {args.seconds:g} s. Figures: median over the rounds (min-max).\n")
    print("| tree | row | TCP 1 stream Gbit/s | CPU s/GB (all relays) | per round, Gbit/s |")
    print("|---|---|--:|--:|---|")
    for row in rows:
        gbps = per_round(row, "tcp1_gbps")
        print(f"| {row[0]} | {row[1]} | {spread(gbps)} | {spread(per_round(row, 'cpu_s_per_gb'), '{:.2f}')} "
              f"| {' '.join(f'{v:.2f}' for v in gbps)} |")
    ratios = [(a, b) for a, b in RATIOS if a in results and b in results]
    if ratios:
        print("\n| ratio, within each round | TCP 1 stream | CPU s/GB | per round (TCP) |")
        print("|---|--:|--:|---|")
        for a, b in ratios:
            tcp = [x / y for x, y in zip(per_round(a, "tcp1_gbps"), per_round(b, "tcp1_gbps"))]
            cpu = [x / y for x, y in zip(per_round(a, "cpu_s_per_gb"), per_round(b, "cpu_s_per_gb"))]
            print(f"| {a[0]} {a[1]} / {b[0]} {b[1]} | {spread(tcp)} | {spread(cpu)} "
                  f"| {' '.join(f'{v:.2f}' for v in tcp)} |")
    for row in rows:
        names = results[row][0]["cpu_by_relay"][0].keys() if results[row] else ()
        if len(names) > 2:
            parts = []
            for name in names:
                values = [statistics.median(run[name] for run in r["cpu_by_relay"]) for r in results[row]]
                parts.append(f"{name} {statistics.median(values):.2f}")
            print(f"\nCPU s/GB by relay, {row[0]} {row[1]}: {', '.join(parts)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [list(r) for r in rows], "args": vars(args),
                       "results": [{"tree": r[0], "label": r[1], "rounds": results[r]} for r in rows]},
                      f, indent=1)


if __name__ == "__main__":
    main()
