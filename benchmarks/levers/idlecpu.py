"""Relay CPU (both sides) idle and under a 20 Hz ping, per busy_poll_us."""
import sys
import time

from _pair import pairs

from benchmarks.measure import cpu_seconds
from tunrelay.testrig.pair import TUNNEL_A

secs = float(sys.argv[1])
for name, bed, pair in pairs(sys.argv[2:]):
    pids = [s.proc.pid for s in pair.sides.values()]
    time.sleep(1)
    c0 = cpu_seconds(pids)
    t0 = time.monotonic()
    time.sleep(secs)
    idle = (cpu_seconds(pids) - c0) / (time.monotonic() - t0)
    c0 = cpu_seconds(pids)
    t0 = time.monotonic()
    out = bed.run(bed.ns_b, ["ping", "-q", "-c", str(int(secs * 20)), "-i", "0.05", TUNNEL_A],
                  capture_output=True, text=True).stdout
    busy = (cpu_seconds(pids) - c0) / (time.monotonic() - t0)
    rtt = out.strip().splitlines()[-1]
    print(f"{name:10} idle {idle*100:.2f} % of a core (both relays) "
          f"| 20 Hz ping {busy*100:.2f} % | {rtt}", flush=True)
