"""Batch-size sweep: TCP 1 stream and a UDP 64-byte flood through tunrelay
with ``[relay] batch`` = 8, 64, 256, offloads on and off; one test bed per
row.  The figures in RESULTS.md "Choices made by measurement" come from it.

    sudo .venv/bin/python -m benchmarks.sweep_batch
"""

from __future__ import annotations

import json
import subprocess
import time

from tunrelay.testrig.netns import Testbed
from tunrelay.testrig.pair import TUNNEL_B, RelayPair


def _iperf3(bed: Testbed, *args: str) -> dict:
    server = bed.popen(bed.ns_b, ["iperf3", "-s", "-1", "-B", TUNNEL_B], stdout=subprocess.DEVNULL)
    time.sleep(0.4)
    done = bed.run(bed.ns_a, ["iperf3", "-c", TUNNEL_B, "-J", *args], capture_output=True, text=True)
    server.wait(10)
    return json.loads(done.stdout)["end"]


def tcp1_gbps(bed: Testbed, seconds: int = 3) -> float:
    return _iperf3(bed, "-t", str(seconds))["sum_received"]["bits_per_second"] / 1e9


def udp64_kpps(bed: Testbed, seconds: int = 3) -> float:
    summary = _iperf3(bed, "-t", str(seconds), "-u", "-l", "64", "-b", "0")["sum"]
    return (summary["packets"] - summary["lost_packets"]) / summary["seconds"] / 1e3


def main() -> None:
    print("| offload | batch | TCP 1 stream Gbit/s (best of 2 x 3 s) | UDP 64 B kpps delivered |")
    print("|---|--:|--:|--:|")
    for offload in ("true", "false"):
        for batch in (8, 64, 256):
            lines = {"relay": [f"batch = {batch}", f"offload = {offload}"]}
            with Testbed() as bed, RelayPair(bed, overrides=lines) as pair:
                pair.start()
                tcp = max(tcp1_gbps(bed) for _ in range(2))
                print(f"| {'on' if offload == 'true' else 'off'} | {batch} | {tcp:.2f} | "
                      f"{udp64_kpps(bed):.0f} |", flush=True)


if __name__ == "__main__":
    main()
