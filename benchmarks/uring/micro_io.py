import functools
import statistics
import sys

from benchmarks.test_micro import pump_rate
from tunrelay._fastpath import Pump

secs = float(sys.argv[1]) if len(sys.argv) > 1 else 2
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 2
for direction in ("egress", "ingress"):
    for size in (64,):
        res = {io: [] for io in ("syscalls", "uring")}
        for _ in range(runs):
            for io in res:
                res[io].append(pump_rate(functools.partial(Pump, io=io), direction, size, secs))
        for io, rs in res.items():
            print(f"{direction:7} {size:5} {io:8} kpps {statistics.median(r.pps for r in rs)/1e3:7.1f} "
                  f"sys/pkt {statistics.median(r.syscalls_per_packet for r in rs):.3f} "
                  f"us/pkt usr {statistics.median(r.user_us_per_packet for r in rs):.2f} "
                  f"sys {statistics.median(r.sys_us_per_packet for r in rs):.2f} "
                  f"backlog {statistics.median(r.backlog for r in rs):.2f}", flush=True)
