"""Pump micro benchmark: packets per second through one pump, compiled
``Pump`` against the pure-Python ``PyPump``, without root.

The pump sits between a SOCK_SEQPACKET socketpair (the TUN stand-in: it
keeps packet boundaries) and a loopback UDP socket (the network):

    egress:   generator --sendmmsg--> [seqpacket] --pump--> UDP --> sink (never read)
    ingress:  generator --sendmmsg--> UDP --pump--> [seqpacket] --recvmmsg--> drain

What limits the number, and why the load generator is not it:
- The rate is read from the pump's own counters over a fixed window after a
  warm-up, so start-up and the generator's pace outside the window do not
  count.
- The generator and the drain are other processes (no share of the GIL the
  Python pump needs) that move 256 packets per system call (loadgen.py),
  so their per-packet cost is the kernel's alone.  Egress: the generator
  blocks when the socketpair is full (a spinning one was tried: it takes
  the pump's core and halves the rate), so the pump's input never runs dry
  and nothing is lost before it.  Ingress: the generator outruns the pump
  and the kernel drops the excess at the pump's UDP socket (4 MiB buffers,
  as the relay's), outside the count.
- "input backlog" samples the pump's input queue every 20 ms: near 100 %,
  the pump was the limit; well below, it waited for the generator (or for
  a core) and its figure is a lower bound.
- What the pump pays per packet shows as user and sys µs/pkt (its process's
  CPU time over the window, per packet).  The compiled pump's is almost all
  kernel time: one read() (egress) or write() (ingress) on the stand-in per
  packet, since a TUN fd has no batched read or write; waking the blocked
  writer on each read; and the loopback UDP send, which runs the whole
  receive path of the far socket inside the sender's system call.  The
  Python pump pays the same kernel work plus its interpreter, so the C /
  Python ratio here is bounded by (kernel + interpreter) / kernel.
- On the 2-core machine the generator (and, on ingress, the drain) share
  the cores with the pump; ``extra_info`` records their CPU share per run.
"""

from __future__ import annotations

import fcntl
import gc
import os
import socket
import statistics
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass

import pytest

from benchmarks.figures import micro_figures
from benchmarks.measure import cpu_seconds, cpu_times
from benchmarks.report import MicroRow
from tunrelay.daemon.transport import SOCKET_BUFFER_BYTES

SIZES = (64, 1400)
DIRECTIONS = ("egress", "ingress")
MTU = 1400
BATCH = 64          # the relay's default [relay] batch
WARMUP_S = 0.5
BACKLOG_SAMPLE_S = 0.02
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pump_classes() -> dict:
    try:
        from tunrelay._fastpath import Pump
    except ImportError as exc:
        pytest.fail(f"tunrelay._fastpath does not import ({exc}); build it: "
                    f".venv/bin/python setup.py build_ext --inplace -q", pytrace=False)
    from tunrelay.pypump import PyPump
    return {"c": Pump, "python": PyPump}


@dataclass
class Rate:
    pps: float
    syscalls_per_packet: float
    backlog: float              # share of samples with packets waiting at the pump's input
    user_us_per_packet: float   # the pump's CPU time per packet: in the pump's own code...
    sys_us_per_packet: float    # ...and in the kernel, for its system calls
    generator_cpu: float        # share of one core used by the load generator (+ drain)


def _loadgen(*args: str, fd: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "benchmarks.loadgen", *args],
                            pass_fds=(fd,), cwd=ROOT)


def pump_rate(pump_class, direction: str, size: int, seconds: float) -> Rate:
    """One pump, one direction, one window of ``seconds``."""
    app, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    relay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    far = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    children: list[subprocess.Popen] = []
    pump = None
    try:
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):  # as the relay's (capped by [rw]mem_max)
            relay.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        relay.bind(("127.0.0.1", 0))
        far.bind(("127.0.0.1", 0))
        far.connect(relay.getsockname())
        pump = pump_class(tun, relay, peer=far.getsockname(), mtu=MTU, batch=BATCH)
        pump.start()
        if direction == "egress":
            children.append(_loadgen("send", str(app.fileno()), str(size), fd=app.fileno()))
        else:
            children.append(_loadgen("send", str(far.fileno()), str(size), fd=far.fileno()))
            children.append(_loadgen("drain", str(app.fileno()), fd=app.fileno()))
        time.sleep(WARMUP_S)
        pids = [c.pid for c in children]
        pump_input = tun if direction == "egress" else relay
        before, t0 = pump.stats()[direction], time.monotonic()
        cpu0, gen0 = cpu_times([os.getpid()]), cpu_seconds(pids)
        backlog = _input_backlog(pump_input, t0 + seconds)
        after, t1 = pump.stats()[direction], time.monotonic()
        cpu1, gen1 = cpu_times([os.getpid()]), cpu_seconds(pids)
        for child in children:
            if child.poll() is not None:
                raise RuntimeError(f"load generator {child.args[3:]} exited with {child.returncode}")
    finally:
        for child in children:
            child.kill()
            child.wait()
        if pump is not None:
            pump.stop()
        # Not PyPump.close(): its __del__ closes the same fds again later,
        # by then possibly someone else's.  Dropping the last reference
        # closes them once.
        del pump
        gc.collect()
        for s in (app, tun, relay, far):
            s.close()
    packets = max(after["packets"] - before["packets"], 1)
    elapsed = t1 - t0
    return Rate(pps=packets / elapsed,
                syscalls_per_packet=(after["syscalls"] - before["syscalls"]) / packets,
                backlog=backlog,
                user_us_per_packet=(cpu1[0] - cpu0[0]) / packets * 1e6,
                sys_us_per_packet=(cpu1[1] - cpu0[1]) / packets * 1e6,
                generator_cpu=(gen1 - gen0) / elapsed)


def _input_backlog(sock: socket.socket, until: float) -> float:
    """Sleep until ``until`` while sampling the pump's input queue: the share
    of samples in which packets were waiting.  Near 1, the pump is the limit;
    lower, the pump waited for the load generator (or for a core)."""
    busy = samples = 0
    while (left := until - time.monotonic()) > 0:
        time.sleep(min(BACKLOG_SAMPLE_S, left))
        queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
        busy += queued > 0
        samples += 1
    return busy / max(samples, 1)


@pytest.mark.parametrize("size", SIZES, ids=[f"{s}B" for s in SIZES])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_pump_pps(direction: str, size: int, benchmark, bench_results) -> None:
    classes = pump_classes()

    def measure() -> dict:
        # The two pumps alternate, run after run, so a change in the
        # machine's load hits both alike and the ratio holds.
        rates: dict = {name: [] for name in classes}
        for _ in range(bench_results.runs):
            for name, cls in classes.items():
                rates[name].append(pump_rate(cls, direction, size, bench_results.seconds))
        return rates

    benchmark.group = "pump micro benchmark"
    rates = benchmark.pedantic(measure, rounds=1, iterations=1)
    medians = {name: {key: statistics.median(getattr(r, key) for r in runs)
                      for key in ("pps", "syscalls_per_packet", "backlog",
                                  "user_us_per_packet", "sys_us_per_packet")}
               for name, runs in rates.items()}
    row = MicroRow(direction, size, medians)
    bench_results.micro.append(row)
    benchmark.extra_info.update({
        "direction": direction, "packet_bytes": size, "medians": medians,
        "c_over_python": row.ratio,
        "runs": {name: [vars(r) for r in runs] for name, runs in rates.items()},
        "figures": micro_figures(rates),
    })
    assert all(m["pps"] > 1 for m in medians.values()), f"a pump moved no packets: {medians}"
