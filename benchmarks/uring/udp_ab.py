import statistics
import sys
import tempfile

from benchmarks.measure import cpu_seconds, iperf3, tcp_result, udp_result, wait_for_ping
from tunrelay.testrig.netns import Testbed
from tunrelay.testrig.pair import TUNNEL_A, RelayPair

rounds = int(sys.argv[1])
secs = float(sys.argv[2])
offloads = sys.argv[3].split(",")
res = {}
with Testbed() as bed:
    for r in range(rounds):
        for offload in offloads:
            for io in (("syscalls", "uring") if r % 2 == 0 else ("uring", "syscalls")):
                pair = RelayPair(bed, overrides={"relay": [f'io = "{io}"', f"offload = {offload}"],
                                                 "device": ["queues = 1"]},
                                 workdir=tempfile.mkdtemp(prefix="pab-"))
                try:
                    pair.start()
                    wait_for_ping(bed, TUNNEL_A)
                    pids = [s.proc.pid for s in pair.sides.values()]
                    c0 = cpu_seconds(pids)
                    pps, loss = udp_result(iperf3(bed, TUNNEL_A, secs, "-u", "-l", "64", "-b", "0"))
                    c1 = cpu_seconds(pids)
                    gbps, moved = tcp_result(iperf3(bed, TUNNEL_A, secs))
                    c2 = cpu_seconds(pids)
                    key = (offload, io)
                    res.setdefault(key, []).append((pps / 1e3, loss, (c1 - c0) / secs, gbps,
                                                    (c2 - c1) / (moved / 1e9)))
                    print(key, "udp64 %.1f kpps loss %.1f%% relay cpu %.2f cores "
                          "| tcp %.2f Gbit/s %.2f cpu s/GB" % res[key][-1], flush=True)
                finally:
                    pair.close()
print()
for key, v in res.items():
    print(key, "median udp64 kpps %.1f  loss %.1f  relay-cpu %.2f | tcp1 %.2f Gbit/s  cpu s/GB %.2f"
          % tuple(statistics.median(x[i] for x in v) for i in range(5)))
