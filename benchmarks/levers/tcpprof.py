"""perf profile of the whole machine during TCP 1 stream through a pair."""
import subprocess
import sys
import time

from tunrelay.testrig.netns import Testbed
from tunrelay.testrig.pair import TUNNEL_A, RelayPair

sets = sys.argv[1] if len(sys.argv) > 1 else ""
out = sys.argv[2] if len(sys.argv) > 2 else "/tmp/tcp.perf"
EXTRA = sys.argv[3:]
relay = ["offload = true"] + [s for s in sets.split(";") if s]
with Testbed() as bed:
    with RelayPair(bed, protocol="udp", overrides={"relay": relay, "device": ["queues = 1"]}) as pair:
        pair.start()
        srv = bed.popen(bed.ns_a, ["iperf3", "-s", "-1"], stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        cli = bed.popen(bed.ns_b, ["iperf3", "-c", TUNNEL_A, "-t", "8", "-f", "g", *EXTRA],
                        stdout=subprocess.PIPE, text=True)
        time.sleep(2)
        subprocess.run(["perf", "record", "-a", "-g", "-o", out, "--", "sleep", "4"], capture_output=True)
        print(cli.communicate()[0].strip().splitlines()[-3])
        srv.wait()
