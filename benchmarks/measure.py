"""Measurements across a tunnel between the two namespaces of a Testbed.

The iperf3 server and the ping target are in ``ns_a`` at the tunnel's
``server_ip``; the client is in ``ns_b``, so data flows b -> a and every
figure is the receiver's.  Each function runs one measurement and returns
numbers; ``measure_tunnel`` runs a tunnel's measures (all but "ping
burst" unless it names its own) ``runs`` times and keeps the medians.  All
traffic goes to addresses inside the test bed's namespaces.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field

from tunrelay.testrig.netns import Testbed

IPERF_PORT = 5201
PING_COUNT = 20
PING_INTERVAL_S = 0.05      # root may go below ping's 0.2 s floor for users
PING_BURST = 4              # echo requests sent at once (ping -l: above 3 needs root)
PING_BURSTS = 20            # bursts per measure, one ping process each (~0.5 s)
UDP_PAYLOAD = 64            # bytes of UDP payload: a 92-byte IPv4 packet
SANITY_TIMEOUT_S = 15.0     # OpenVPN needs ~2 s, WireGuard a handshake
_SLACK_S = 30.0             # on top of the test length before iperf3 is killed
_CLK_TCK = os.sysconf("SC_CLK_TCK")

#: The medians reported per tunnel, in table order.
METRICS = ("tcp1_gbps", "tcp4_gbps", "udp64_kpps", "udp64_loss_pct", "ping_rtt_us",
           "ping_burst_us", "cpu_s_per_gb")

#: The measures ``measure_once`` can take, in the order it takes them (the
#: idle tunnel first), and those a tunnel gets unless it names its own
#: (``Tunnel.measures``).  "ping burst" is for the Nagle peers (issue 10):
#: a peer that holds a small segment until the relay's ACK delays the
#: replies after the first of a burst, not a lone echo's.
MEASURES = ("ping", "ping burst", "tcp 1 stream", "tcp 4 streams", "udp 64 B")
DEFAULT_MEASURES = ("ping", "tcp 1 stream", "tcp 4 streams", "udp 64 B")


class MeasureError(Exception):
    """A measurement could not be taken; the message says what was seen."""


# ---------------------------------------------------------------- parsing

def parse_iperf3(text: str) -> dict:
    """iperf3 -J output -> its ``end`` section.  iperf3 exits 0 even when
    the test failed, with the reason in ``error``."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        raise MeasureError(f"iperf3 printed no JSON: {text.strip()[-300:]!r}") from None
    if doc.get("error"):
        raise MeasureError(f"iperf3: {doc['error']}")
    end = doc.get("end") or {}
    if "sum_received" not in end:
        raise MeasureError(f"iperf3 reported no receiver summary (keys: {sorted(end)})")
    return end


def tcp_result(end: dict) -> tuple[float, int]:
    """(Gbit/s, bytes) as the receiver counted them."""
    received = end["sum_received"]
    return received["bits_per_second"] / 1e9, int(received["bytes"])


def udp_result(end: dict) -> tuple[float, float]:
    """(delivered packets/s, loss %) as the receiver counted them."""
    received = end["sum_received"]
    delivered = received["packets"] - received["lost_packets"]
    return delivered / received["seconds"], float(received["lost_percent"])


_RTT = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/[\d.]+ ms")


def parse_ping_us(text: str, which: str = "avg") -> float:
    """``which`` ("min", "avg" or "max") of ping's 'rtt min/avg/max/mdev =
    ...' line, in microseconds."""
    match = _RTT.search(text)
    if match is None:
        raise MeasureError(f"ping printed no rtt summary: {text.strip()[-200:]!r}")
    return float(match.group(("min", "avg", "max").index(which) + 1)) * 1000


def cpu_times(pids: list[int]) -> tuple[float, float]:
    """(user, system) seconds of these processes, all their threads."""
    user = system = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            # The command name may hold spaces: split after its ')'.
            fields = f.read().rsplit(")", 1)[1].split()
        user += int(fields[11])    # stat field 14, utime
        system += int(fields[12])  # stat field 15, stime
    return user / _CLK_TCK, system / _CLK_TCK


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes, in seconds."""
    return sum(cpu_times(pids))


# ---------------------------------------------------------------- running

def wait_for_ping(bed: Testbed, ip: str, timeout: float = SANITY_TIMEOUT_S) -> None:
    """The sanity check every tunnel passes before it is measured."""
    deadline = time.monotonic() + timeout
    while True:
        done = bed.run(bed.ns_b, ["ping", "-c", "1", "-W", "1", ip], capture_output=True, text=True)
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise MeasureError(f"sanity ping {bed.ns_b} -> {ip} got no reply within {timeout:.0f} s")
        time.sleep(0.2)


def ping_rtt_us(bed: Testbed, ip: str) -> float:
    done = bed.run(bed.ns_b, ["ping", "-q", "-c", str(PING_COUNT), "-i", str(PING_INTERVAL_S),
                              "-W", "1", ip], capture_output=True, text=True,
                   timeout=PING_COUNT * (PING_INTERVAL_S + 1) + 5)
    return parse_ping_us(done.stdout, "avg")


def ping_burst_us(bed: Testbed, ip: str) -> float:
    """PING_BURSTS times, PING_BURST echo requests sent at once (``ping
    -l``); the rtt of the slowest reply of each burst, their mean.  The
    mean, like ping's own avg: whether a relay's ACK is delayed depends
    on the kernel's delayed-ACK state, which changes from burst to burst,
    so a stall may hit some bursts only (a median would hide it)."""
    slowest = []
    for _ in range(PING_BURSTS):
        done = bed.run(bed.ns_b, ["ping", "-q", "-c", str(PING_BURST), "-l", str(PING_BURST),
                                  "-W", "1", ip], capture_output=True, text=True, timeout=10)
        slowest.append(parse_ping_us(done.stdout, "max"))
    return statistics.mean(slowest)


def iperf3(bed: Testbed, ip: str, seconds: float, *client_args: str) -> dict:
    """One iperf3 test from ns_b to a one-off server in ns_a; the ``end``
    section of the client's JSON (which carries the server's figures)."""
    server = bed.popen(bed.ns_a, ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_listening(bed, server)
        try:
            done = bed.run(bed.ns_b, ["iperf3", "-c", ip, "-p", str(IPERF_PORT), "-J",
                                      "-t", f"{seconds:g}", "--connect-timeout", "5000",
                                      *client_args],
                           capture_output=True, text=True, timeout=seconds + _SLACK_S)
        except subprocess.TimeoutExpired:
            raise MeasureError(f"iperf3 {' '.join(client_args)} did not finish within "
                               f"{seconds + _SLACK_S:.0f} s") from None
        return parse_iperf3(done.stdout)
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


def _wait_listening(bed: Testbed, server: subprocess.Popen, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done = bed.run(bed.ns_a, ["ss", "-Hltn", f"sport = :{IPERF_PORT}"],
                       capture_output=True, text=True)
        if done.stdout.strip():
            return
        if server.poll() is not None:
            raise MeasureError(f"iperf3 server exited with {server.returncode}: "
                               f"{server.stderr.read().strip()}")
        if time.monotonic() > deadline:
            raise MeasureError(f"iperf3 server not listening after {timeout:.0f} s")
        time.sleep(0.02)


# ---------------------------------------------------------------- one tunnel

@dataclass
class TunnelFigures:
    """The medians over ``runs`` (None where every run failed), every run's
    figures, and what went wrong."""

    medians: dict = field(default_factory=dict)
    runs: list = field(default_factory=list)
    errors: list = field(default_factory=list)


def measure_once(bed: Testbed, ip: str, pids: list[int], seconds: float,
                 measures: tuple[str, ...] = DEFAULT_MEASURES) -> tuple[dict, list]:
    """Each of ``measures`` once, in MEASURES order: idle tunnel first
    (ping), then TCP, then the UDP flood; a failed measure is recorded and
    the others still run."""
    unknown = set(measures) - set(MEASURES)
    if unknown:
        raise ValueError(f"unknown measures {sorted(unknown)}: expected some of {MEASURES}")
    figures: dict = {}
    errors: list = []

    def attempt(name: str, fn) -> None:
        try:
            fn()
        except (MeasureError, OSError, subprocess.SubprocessError, KeyError) as exc:
            errors.append(f"{name}: {exc}")

    def ping() -> None:
        figures["ping_rtt_us"] = ping_rtt_us(bed, ip)

    def burst() -> None:
        figures["ping_burst_us"] = ping_burst_us(bed, ip)

    def tcp1() -> None:
        before = cpu_seconds(pids) if pids else 0.0
        gbps, moved = tcp_result(iperf3(bed, ip, seconds))
        figures["tcp1_gbps"] = gbps
        if pids and moved:
            figures["cpu_s_per_gb"] = (cpu_seconds(pids) - before) / (moved / 1e9)

    def tcp4() -> None:
        figures["tcp4_gbps"] = tcp_result(iperf3(bed, ip, seconds, "-P", "4"))[0]

    def udp64() -> None:
        pps, loss = udp_result(iperf3(bed, ip, seconds, "-u", "-l", str(UDP_PAYLOAD), "-b", "0"))
        figures["udp64_kpps"], figures["udp64_loss_pct"] = pps / 1e3, loss

    steps = {"ping": ping, "ping burst": burst, "tcp 1 stream": tcp1, "tcp 4 streams": tcp4,
             "udp 64 B": udp64}
    for name in MEASURES:
        if name in measures:
            attempt(name, steps[name])
    return figures, errors


def measure_tunnel(bed: Testbed, ip: str, pids: list[int], seconds: float, runs: int,
                   measures: tuple[str, ...] = DEFAULT_MEASURES) -> TunnelFigures:
    result = TunnelFigures()
    for run in range(runs):
        figures, errors = measure_once(bed, ip, pids, seconds, measures)
        result.runs.append(figures)
        result.errors += [f"run {run + 1}: {e}" for e in errors]
    for metric in METRICS:
        values = [r[metric] for r in result.runs if metric in r]
        result.medians[metric] = statistics.median(values) if values else None
    return result
