"""How fast a PeerTable takes changes: each change publishes a new lookup
snapshot (built from every peer's prefixes), so its cost grows with the
table; ``batch()`` makes many changes one publication.

    python -m benchmarks.peer_changes [--seconds 1]

For tables of 10, 1,000 and 10,000 peers (one /32 and an endpoint each), it times
``update(allowed_ips=...)`` of one peer, one publication per change and
100 changes per publication, and prints changes per second.  A pump with
the table runs meanwhile (idle), so each publication also pays the
reclamation check of its two loops.
"""

from __future__ import annotations

import argparse
import socket
import time

from tunrelay import PeerTable, Pump


def table_of(size: int) -> PeerTable:
    table = PeerTable()
    with table.batch():
        for n in range(size):
            table.add(f"p{n}", endpoint=(f"192.0.{n >> 8 & 255}.{n & 255}", 51820),
                      allowed_ips=[f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}/32"])
    return table


def rate(table: PeerTable, seconds: float, per_batch: int) -> float:
    pid = table.add("moving", allowed_ips=["172.16.0.0/24"])
    changes = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        with table.batch():
            for _ in range(per_batch):
                table.update(pid, allowed_ips=[f"172.16.{changes & 255}.0/24"])
                changes += 1
    table.remove(pid)
    return changes / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    print("| peers (prefixes) | changes/s, one publication each | changes/s, 100 per publication |")
    print("|---|---|---|")
    for size in (10, 1000, 10000):
        table = table_of(size)
        app, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        pump = Pump(tun, sock, peers=table)
        pump.start()
        try:
            single = rate(table, args.seconds, 1)
            batched = rate(table, args.seconds, 100)
        finally:
            pump.stop()
            for s in (app, tun, sock):
                s.close()
        print(f"| {size:,} | {single:,.0f} | {batched:,.0f} |")


if __name__ == "__main__":
    main()
