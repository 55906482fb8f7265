"""Run the compiled pump alone over a SOCK_SEQPACKET stand-in and loopback
UDP with 64-byte packets, for a profiler to attach to.  The profile in
RESULTS.md ("Where the compiled pump's time goes") was taken with:

    .venv/bin/python -m benchmarks.profile_pump egress &   # prints its pid
    perf record -e cpu-clock -g -p PID -- sleep 4
    perf report --no-children --sort symbol --stdio -g none

(and the same with ``ingress``).  The load comes from benchmarks.loadgen
(sendmmsg in another process); the pump runs for 8 s and prints its rate.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from tunrelay._fastpath import Pump
from tunrelay.daemon.transport import SO_RCVBUFFORCE, SO_SNDBUFFORCE, SOCKET_BUFFER_BYTES

SECONDS = 8


def _loadgen(*args: str, fd: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "benchmarks.loadgen", *args], pass_fds=[fd])


def main(direction: str) -> None:
    app, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for sock in (a, b):
        sock.bind(("127.0.0.1", 0))
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCKET_BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SOCKET_BUFFER_BYTES)
    pump = Pump(tun, a, peer=b.getsockname())
    if direction == "egress":
        helpers = [_loadgen("send", str(app.fileno()), "64", fd=app.fileno())]
    else:
        b.connect(a.getsockname())
        helpers = [_loadgen("send", str(b.fileno()), "64", fd=b.fileno()),
                   _loadgen("drain", str(app.fileno()), fd=app.fileno())]
    pump.start()
    print(os.getpid(), flush=True)
    try:
        time.sleep(SECONDS)
        print(f"{pump.stats()[direction]['packets'] / SECONDS:.0f} packets/s {direction}", flush=True)
    finally:
        for helper in helpers:
            helper.kill()
        pump.stop()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "egress")
