"""Two builds of the compiled pump, measured side by side in one run.

    python -m benchmarks.compare_builds BASE_TREE [--rounds 5] [--seconds 2]

BASE_TREE is a checkout of another commit with its extension built in
place (``git worktree add /tmp/base <commit>`` then, in it,
``python setup.py build_ext --inplace``).  Each measurement runs in a
fresh subprocess that imports ``tunrelay`` from one tree: the base, this
tree, or this tree with the pump given a one-peer PeerTable (the many-peers
path carrying one peer: what a point-to-point user pays for it).  The
variants alternate round by round so that the machine's drift falls on all
of them alike; the table gives medians and the ratios to the base.

What is measured is the micro benchmark's packet rate (benchmarks/
test_micro.py): one pump between a SOCK_SEQPACKET stand-in and loopback
UDP, a load generator in another process, the rate read from the pump's
own counters over a window after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in the subprocess, with the chosen tree first on sys.path.  Self-
# contained: it must work against an older tree's tunrelay as well.
PROBE = r"""
import json, os, socket, subprocess, sys, time
tree, variant, direction, size, seconds, root = sys.argv[1:7]
sys.path.insert(0, tree)
import tunrelay._fastpath as fastpath
assert fastpath.__file__.startswith(tree), fastpath.__file__
size, seconds = int(size), float(seconds)
app, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
relay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
far = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
    relay.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
relay.bind(("127.0.0.1", 0))
far.bind(("127.0.0.1", 0))
far.connect(relay.getsockname())
if variant == "peers":
    table = fastpath.PeerTable()
    # The load generator's packets are 10.99.0.2 -> 10.99.0.1 (benchmarks/loadgen.py).
    table.add("far", endpoint=far.getsockname(), allowed_ips=["10.99.0.0/24"])
    pump = fastpath.Pump(tun, relay, mtu=1400, batch=64, peers=table)
else:
    pump = fastpath.Pump(tun, relay, peer=far.getsockname(), mtu=1400, batch=64)
pump.start()
def loadgen(*args, fd):
    return subprocess.Popen([sys.executable, "-m", "benchmarks.loadgen", *args],
                            pass_fds=(fd,), cwd=root, env={**os.environ, "PYTHONPATH": root})
if direction == "egress":
    children = [loadgen("send", str(app.fileno()), str(size), fd=app.fileno())]
else:
    children = [loadgen("send", str(far.fileno()), str(size), fd=far.fileno()),
                loadgen("drain", str(app.fileno()), fd=app.fileno())]
time.sleep(0.5)
before, t0 = pump.stats()[direction]["packets"], time.monotonic()
cpu0 = os.times()
time.sleep(seconds)
after, t1 = pump.stats()[direction]["packets"], time.monotonic()
cpu1 = os.times()
for child in children:
    child.kill()
    child.wait()
pump.stop()
packets = max(after - before, 1)
print(json.dumps({"pps": packets / (t1 - t0),
                  "cpu_us_per_packet": ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system))
                  / packets * 1e6}))
"""


def measure(tree: str, variant: str, direction: str, size: int, seconds: float) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, tree, variant, direction, str(size),
                          str(seconds), ROOT], capture_output=True, text=True, cwd="/",
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} {direction} {size}: {out.stderr.strip()[-800:]}")
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="a tree of another commit, its extension built in place")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--sizes", default="64,1400")
    args = parser.parse_args()
    base = os.path.abspath(args.base)
    variants = {"base": (base, "p2p"), "this": (ROOT, "p2p"), "this+peers": (ROOT, "peers")}
    cases = [(d, int(s)) for d in ("egress", "ingress") for s in args.sizes.split(",")]
    results: dict = {(c, v): [] for c in cases for v in variants}
    for round_ in range(args.rounds):
        for case in cases:
            for name, (tree, variant) in variants.items():
                results[(case, name)].append(measure(tree, variant, *case, args.seconds))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    print("| direction | size | base kpps | this kpps | this+peers kpps | this / base "
          "| this+peers / base | CPU µs/pkt base / this / this+peers |")
    print("|---|---|---|---|---|---|---|---|")
    for case in cases:
        pps = {v: statistics.median(r["pps"] for r in results[(case, v)]) for v in variants}
        cpu = {v: statistics.median(r["cpu_us_per_packet"] for r in results[(case, v)])
               for v in variants}
        print(f"| {case[0]} | {case[1]} B | {pps['base'] / 1e3:.0f} | {pps['this'] / 1e3:.0f} "
              f"| {pps['this+peers'] / 1e3:.0f} | {pps['this'] / pps['base']:.2f} "
              f"| {pps['this+peers'] / pps['base']:.2f} | {cpu['base']:.2f} / {cpu['this']:.2f} "
              f"/ {cpu['this+peers']:.2f} |")


if __name__ == "__main__":
    main()
