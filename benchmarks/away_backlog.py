"""What a TCP peer gets after a reconnect: the packets queued in the TUN
while it was away, and how old they are when they arrive (issue 10).

Root, two namespaces (tunrelay.testrig).  Side a is the TCP server, side b
the client.  One run per case:

- ``server-away``: the server is stopped; the client keeps its device and
  reconnects.  A sender in b's namespace sends UDP datagrams into b's TUN
  (to a's tunnel address) for the outage; the server is started again and
  a receiver in a's namespace reports what arrives.
- ``client-away``: the same with the roles swapped: the client is stopped,
  the server waits; the sender is in a's namespace.
- ``link-down``: the underlay goes down under a live connection while b
  sends 1,300-byte datagrams at ``--rate``: b's pump fills the TCP socket
  buffer, stalls, and the device queue fills behind it.  When b's
  connection times out (TCP_USER_TIMEOUT, 30 s) the link comes back and b
  reconnects at once: the backlog found when the connection ended is tens
  of seconds old.  The server keeps running (a receiver beside it).

Every datagram carries its send time (CLOCK_REALTIME, which the namespaces
share), so the receiver reports each one's age on arrival.

    python -m benchmarks.away_backlog [--outage 3] [--rate 200] [--hold MS] [--case ...]

``--hold`` writes ``[transport] away_hold_ms`` into both configs (only
with a tunrelay that has it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

from tunrelay.testrig.netns import Testbed
from tunrelay.testrig.pair import DEVICE, TUNNEL_A, TUNNEL_B, RelayPair

PORT = 9999

SENDER = r"""
import socket, struct, sys, time
dest, seconds, rate, size = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end = time.monotonic() + seconds
n = 0
while time.monotonic() < end:
    try:
        s.sendto(struct.pack("!dI", time.time(), n) + bytes(size), (dest, %d))
    except OSError:
        pass
    n += 1
    time.sleep(1 / rate)
print(n)
""" % PORT

RECEIVER = r"""
import json, socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: a flushed backlog comes as one burst
s.bind(("0.0.0.0", %d))
s.settimeout(float(sys.argv[1]))
ages = []
try:
    while True:
        data, _ = s.recvfrom(2048)
        sent, n = struct.unpack("!dI", data[:12])
        ages.append((n, time.time() - sent))
        s.settimeout(2)
except socket.timeout:
    pass
print(json.dumps(ages))
""" % PORT


def run_case(case: str, outage: float, rate: float, hold: int | None) -> dict:
    overrides = {"transport": [f"away_hold_ms = {hold}"]} if hold is not None else None
    with Testbed() as bed:
        pair = RelayPair(bed, protocol="tcp", overrides=overrides,
                         workdir=tempfile.mkdtemp(prefix="trt-"))
        try:
            pair.start()
            if case == "link-down":
                return _link_down(bed, pair, outage, rate, hold)
            away, stays = ("a", "b") if case == "server-away" else ("b", "a")
            ns_away, ns_stays = pair.sides[away].ns, pair.sides[stays].ns
            dest = TUNNEL_A if away == "a" else TUNNEL_B
            pair.stop(away)
            deadline = time.monotonic() + 10
            while pair.stats(stays)["state"] == "connected":
                assert time.monotonic() < deadline, "the relay that stays did not notice"
                time.sleep(0.05)
            tx_dropped = _tx_dropped(bed, ns_stays)
            # The receiver waits where the peer comes back (bound to the
            # wildcard: the peer's device does not exist yet).
            receiver = bed.popen(ns_away, [sys.executable, "-c", RECEIVER, str(outage + 20)],
                                 stdout=subprocess.PIPE, text=True)
            sender = bed.run(ns_stays, [sys.executable, "-c", SENDER, dest, str(outage), str(rate),
                                        "100"],
                             capture_output=True, text=True, timeout=outage + 30)
            sent = int(sender.stdout)
            back = time.time()
            pair.start_side(away, wait=False)
            pair.wait_ready("a", "b")
            reconnect = time.time() - back
            out, _ = receiver.communicate(timeout=60)
            tx_dropped = _tx_dropped(bed, ns_stays) - tx_dropped
            return _result(case, hold, outage, sent, out, reconnect, tx_dropped, pair.stats(stays))
        finally:
            pair.close()


def _link_down(bed: Testbed, pair: RelayPair, outage: float, rate: float,
               hold: int | None) -> dict:
    receiver = bed.popen(bed.ns_a, [sys.executable, "-c", RECEIVER, "120"],
                         stdout=subprocess.PIPE, text=True)
    tx_dropped = _tx_dropped(bed, bed.ns_b)
    bed.link_set(bed.ns_b, bed.veth_b, False)
    sender = bed.run(bed.ns_b, [sys.executable, "-c", SENDER, TUNNEL_A, str(outage), str(rate),
                                "1300"], capture_output=True, text=True, timeout=outage + 30)
    deadline = time.monotonic() + 60
    while pair.stats("b")["state"] == "connected":
        assert time.monotonic() < deadline, "the client did not notice the dead connection"
        time.sleep(0.05)
    back = time.time()
    bed.link_set(bed.ns_b, bed.veth_b, True)
    pair.wait_ready("a", "b", timeout=60)
    reconnect = time.time() - back
    out, _ = receiver.communicate(timeout=120)
    tx_dropped = _tx_dropped(bed, bed.ns_b) - tx_dropped
    return _result("link-down", hold, outage, int(sender.stdout), out, reconnect, tx_dropped,
                   pair.stats("b"))


def _result(case: str, hold: int | None, outage: float, sent: int, received: str,
            reconnect: float, tx_dropped: int, snap: dict) -> dict:
    ages = [age for _, age in json.loads(received)]
    return {"case": case, "hold_ms": hold, "outage_s": outage, "sent": sent,
            "delivered": len(ages), "reconnect_s": round(reconnect, 2),
            "oldest_s": round(max(ages), 2) if ages else None,
            "youngest_s": round(min(ages), 2) if ages else None,
            "kernel_tx_dropped": tx_dropped,
            "drops": {k: v for k, v in snap["egress"]["drops"].items() if v}}


def _tx_dropped(bed: Testbed, ns: str) -> int:
    """The kernel's count of packets it dropped at the device (queue full)."""
    done = bed.run(ns, ["cat", f"/sys/class/net/{DEVICE}/statistics/tx_dropped"],
                   capture_output=True, text=True, timeout=10)
    return int(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage", type=float, default=3.0, help="seconds of traffic while away")
    parser.add_argument("--rate", type=float, default=200.0, help="datagrams per second")
    parser.add_argument("--hold", type=int, default=None, help="[transport] away_hold_ms")
    parser.add_argument("--case", choices=("server-away", "client-away", "link-down"),
                        action="append", help="default: server-away and client-away")
    args = parser.parse_args()
    for case in args.case or ("server-away", "client-away"):
        print(json.dumps(run_case(case, args.outage, args.rate, args.hold)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
