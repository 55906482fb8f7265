"""``tunrelay demo``: the main job, on one machine.

Builds two network namespaces joined by a veth pair, runs a relay in each
(through the CLI, with generated relay.toml files), pings across the
tunnel (IPv4 and IPv6), measures throughput for a few seconds, prints both
sides' counters and tears everything down, even on failure or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from ..daemon.stats import format_table
from ..errors import TunrelayError
from .netns import Testbed
from .pair import TUNNEL6_B, TUNNEL_B, RelayPair


def _say(text: str) -> None:
    print(f"==> {text}", flush=True)


def _ping(bed: Testbed, target: str, v6: bool = False) -> None:
    argv = ["ping", "-c", "5", "-i", "0.2", "-W", "2"] + (["-6"] if v6 else []) + [target]
    result = bed.run(bed.ns_a, argv, capture_output=True, text=True)
    summary = [line for line in result.stdout.splitlines() if "packet loss" in line or "rtt" in line]
    print("\n".join("    " + line for line in summary))
    if result.returncode != 0:
        raise TunrelayError(f"ping {target} through the tunnel failed:\n{result.stdout}{result.stderr}")


def _throughput(bed: Testbed, seconds: float) -> None:
    if shutil.which("iperf3"):
        server = bed.popen(bed.ns_b, ["iperf3", "-s", "-1", "-B", TUNNEL_B],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        result = bed.run(bed.ns_a, ["iperf3", "-c", TUNNEL_B, "-t", str(seconds), "-J"],
                         capture_output=True, text=True)
        server.wait(timeout=10)
        if result.returncode != 0:
            raise TunrelayError(f"iperf3 through the tunnel failed: {result.stdout[-500:]}{result.stderr}")
        end = json.loads(result.stdout)["end"]
        bps = end["sum_received"]["bits_per_second"]
        print(f"    iperf3 TCP, 1 stream, {seconds:g} s: {bps / 1e9:.2f} Gbit/s received")
        return
    # No iperf3: a plain TCP transfer through the tunnel, timed.
    receiver = (
        "import socket,time\n"
        f"s=socket.create_server(('{TUNNEL_B}',5201));c,_=s.accept();n=0;t=time.monotonic()\n"
        "while (d:=c.recv(1<<20)): n+=len(d)\n"
        "print(n*8/(time.monotonic()-t)/1e9)\n")
    server = bed.popen(bed.ns_b, [sys.executable, "-c", receiver], stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    sender = (
        "import socket,time\n"
        f"c=socket.create_connection(('{TUNNEL_B}',5201));b=bytes(1<<16);end=time.monotonic()+{seconds}\n"
        "while time.monotonic()<end: c.sendall(b)\n"
        "c.close()\n")
    bed.run(bed.ns_a, [sys.executable, "-c", sender], check=True)
    out, _ = server.communicate(timeout=30)
    print(f"    TCP transfer, {seconds:g} s: {float(out):.2f} Gbit/s received")


def run_demo(seconds: float = 3.0, protocol: str = "udp") -> int:
    if os.geteuid() != 0:
        raise TunrelayError("the demo needs root: it creates network namespaces and "
                            "TUN devices (run it with sudo, or as root)")
    _say("building two network namespaces joined by a veth pair")
    with Testbed() as bed:
        print(f"    {bed.ns_a} ({bed.addr_a})  <--veth-->  {bed.ns_b} ({bed.addr_b})")
        with RelayPair(bed, protocol=protocol) as pair:
            _say(f"starting a relay in each namespace ({protocol}, "
                 f"config files in {pair.workdir})")
            pair.start()
            _say("ping through the tunnel, IPv4 and IPv6")
            _ping(bed, TUNNEL_B)
            _ping(bed, TUNNEL6_B, v6=True)
            _say("throughput through the tunnel")
            _throughput(bed, seconds)
            for name, ns in (("a", bed.ns_a), ("b", bed.ns_b)):
                _say(f"counters of relay {name} ({ns}): tunrelay stats --config {pair.sides[name].config_path}")
                print("    " + format_table(pair.stats(name)).replace("\n", "\n    "))
            _say("stopping both relays (SIGTERM)")
            codes = [pair.stop(name) for name in ("a", "b")]
            if any(codes):
                raise TunrelayError(f"relays exited with {codes}:\n{pair.log('a')}\n{pair.log('b')}")
        _say("removing the namespaces")
    _say("done")
    return 0
