"""ping RTT distribution through a pair, per config; also relay counters."""
import re
import sys

from _pair import pairs

from tunrelay.testrig.pair import TUNNEL_A

interval = float(sys.argv[1])
count = int(sys.argv[2])
for name, bed, pair in pairs(sys.argv[3:]):
    before = {s: pair.stats(s) for s in "ab"}
    out = bed.run(bed.ns_b, ["ping", "-c", str(count), "-i", str(interval), TUNNEL_A],
                  capture_output=True, text=True).stdout
    after = {s: pair.stats(s) for s in "ab"}
    rtts = sorted(float(x) * 1000 for x in re.findall(r"time=([\d.]+) ms", out))
    wk = {s: sum(after[s][d]["wakeups"] - before[s][d]["wakeups"] for d in ("egress", "ingress")) for s in "ab"}
    sc = {s: sum(after[s][d]["syscalls"] - before[s][d]["syscalls"] for d in ("egress", "ingress")) for s in "ab"}

    def q(p, rtts=rtts):
        return rtts[int(p * (len(rtts) - 1))]
    print(f"{name:12} n={len(rtts)} min {rtts[0]:.0f} p25 {q(.25):.0f} med {q(.5):.0f} "
          f"p75 {q(.75):.0f} max {rtts[-1]:.0f} "
          f"| wakeups/ping a {wk['a']/count:.1f} b {wk['b']/count:.1f} "
          f"| syscalls/ping a {sc['a']/count:.0f} b {sc['b']/count:.0f}", flush=True)
