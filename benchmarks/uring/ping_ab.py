import statistics
import sys
import tempfile

from benchmarks.measure import parse_ping_avg_us, wait_for_ping
from tunrelay.testrig.netns import Testbed
from tunrelay.testrig.pair import TUNNEL_A, RelayPair

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
offload = sys.argv[2] if len(sys.argv) > 2 else "true"
res = {"syscalls": [], "uring": []}
with Testbed() as bed:
    for r in range(rounds):
        for io in (list(res) if r % 2 == 0 else list(res)[::-1]):
            pair = RelayPair(bed, overrides={"relay": [f'io = "{io}"', f"offload = {offload}"]},
                             workdir=tempfile.mkdtemp(prefix="pab-"))
            try:
                pair.start()
                wait_for_ping(bed, TUNNEL_A)
                done = bed.run(bed.ns_b, ["ping", "-q", "-c", sys.argv[3], "-i", sys.argv[4], "-W", "1",
                                          TUNNEL_A], capture_output=True, text=True)
                res[io].append(parse_ping_avg_us(done.stdout))
                st = pair.stats("b")
                print(io, f"{res[io][-1]:.0f} us", st["io"],
                      "eg syscalls/pkt %.2f" % (st["egress"]["syscalls"]/max(1, st["egress"]["packets"])),
                      "ing syscalls/pkt %.2f" % (st["ingress"]["syscalls"]/max(1, st["ingress"]["packets"])),
                      flush=True)
            finally:
                pair.close()
for io, v in res.items():
    print(io, "median", statistics.median(v), v)
