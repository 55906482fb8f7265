"""Soak: a minute under full load without growing, reconnects without leaking.

RSS of both relays is sampled once a second while iperf3 saturates the
tunnel; after a warm-up it must stay flat (the pumps allocate everything up
front, so anything else is a leak).  File descriptors of a TCP server are
counted before and after many reconnects of its client.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests._root import require_root
from tunrelay.testrig.netns import Testbed
from tunrelay.testrig.pair import TUNNEL_B, RelayPair

pytestmark = [pytest.mark.root, pytest.mark.slow]

SOAK_SECONDS = float(os.environ.get("TUNRELAY_SOAK_SECONDS", "60"))
WARM_UP_SECONDS = min(10.0, SOAK_SECONDS / 4)
# Slack for the allocator and Python's own caches (log records, the stats
# thread's JSON): a leak of one buffer per packet would be megabytes a second.
RSS_SLACK_KIB = 2048


@pytest.fixture
def bed():
    require_root()
    with Testbed() as tb:
        yield tb


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("protocol", ["udp", "tcp"])
def test_rss_stays_flat_under_full_load(bed: Testbed, protocol: str):
    with RelayPair(bed, protocol=protocol) as pair:
        pair.start()
        pids = {name: side.proc.pid for name, side in pair.sides.items()}
        server = bed.popen(bed.ns_b, ["iperf3", "-s", "-1", "-B", TUNNEL_B],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        client = bed.popen(bed.ns_a, ["iperf3", "-c", TUNNEL_B, "-t", str(int(SOAK_SECONDS)),
                                      "-P", "2", "-J"], stdout=subprocess.PIPE, text=True)
        samples = {name: [] for name in pids}
        start = time.monotonic()
        while client.poll() is None and time.monotonic() - start < SOAK_SECONDS + 30:
            for name, pid in pids.items():
                samples[name].append((time.monotonic() - start, rss_kib(pid)))
            time.sleep(1)
        out, _ = client.communicate(timeout=30)
        server.wait(timeout=10)
        assert client.returncode == 0, out[-2000:]
        moved = json.loads(out)["end"]["sum_received"]["bytes"]
        assert moved > 0
        for name, series in samples.items():
            after = [kib for t, kib in series if t >= WARM_UP_SECONDS]
            assert len(after) >= 3, series
            baseline = after[0]
            assert max(after) - baseline <= RSS_SLACK_KIB, (
                f"relay {name} grew from {baseline} KiB to {max(after)} KiB under load: {series}")
        for name in pids:
            assert pair.stop(name) == 0, pair.log(name)


def test_reconnects_leak_no_descriptors(bed: Testbed):
    with RelayPair(bed, protocol="tcp") as pair:
        pair.start()
        server_pid = pair.sides["a"].proc.pid
        before = fd_count(server_pid)
        for _ in range(8):
            pair.stop("b", sig=signal.SIGKILL)
            pair.start_side("b")          # waits until connected again
        pair.wait_ready("a")
        # The server notices each old connection's end (RST/FIN) and
        # accepts the new one; give the last close a moment to land.
        deadline = time.monotonic() + 10
        while fd_count(server_pid) != before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert fd_count(server_pid) == before, sorted(os.listdir(f"/proc/{server_pid}/fd"))
        assert pair.stats("a")["connections"] >= 9
        assert pair.stop("a") == 0
