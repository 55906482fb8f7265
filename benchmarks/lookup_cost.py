"""Allowed-IPs lookup cost (issue 8: at most 100 ns per packet with 10,000
prefixes).  Builds a PrefixTable of 10,000 random prefixes (70 % IPv4 of
lengths 16-32, 30 % IPv6 of lengths 48-64), then times, in C without the
GIL, lookups of 100,000 addresses per family: half inside a random prefix
of the table (the walk goes deep), half uniformly random.
``python -m benchmarks.lookup_cost [--prefixes N]``."""

from __future__ import annotations

import argparse
import ipaddress
import random
import time

from tunrelay._fastpath import PrefixTable


def build(count: int, rng: random.Random) -> list[tuple]:
    entries, seen = [], set()
    while len(entries) < count:
        if rng.random() < 0.3:
            net = ipaddress.IPv6Network((rng.getrandbits(128), rng.choice((48, 56, 64))), strict=False)
        else:
            net = ipaddress.IPv4Network((rng.getrandbits(32), rng.choice((16, 20, 24, 28, 32))),
                                        strict=False)
        if net not in seen:
            seen.add(net)
            entries.append((net, len(entries)))
    return entries


def addresses(entries, version: int, count: int, rng: random.Random) -> bytes:
    nets = [net for net, _ in entries if net.version == version]
    bits = 32 if version == 4 else 128
    out = bytearray()
    for i in range(count):
        if i % 2:
            out += ipaddress.ip_address(rng.getrandbits(bits)).packed if version == 4 else \
                ipaddress.IPv6Address(rng.getrandbits(bits)).packed
        else:
            net = rng.choice(nets)
            out += (net[0] + rng.randrange(net.num_addresses)).packed
    return bytes(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefixes", type=int, default=10_000)
    args = parser.parse_args()
    rng = random.Random(8)
    entries = build(args.prefixes, rng)
    start = time.perf_counter()
    table = PrefixTable(entries)
    built = time.perf_counter() - start
    v4, v6 = table.nodes
    print(f"{args.prefixes} prefixes: built in {built * 1e3:.1f} ms (with Python parsing), "
          f"{v4} + {v6} trie nodes ({(v4 + v6) * 144 / 2**20:.1f} MiB)")
    for version in (4, 6):
        packed = addresses(entries, version, 100_000, rng)
        best = min(table._time_lookups(packed, version, 20) for _ in range(5))
        print(f"IPv{version}: {best:.1f} ns per lookup (best of 5 x 2,000,000 lookups)")


if __name__ == "__main__":
    main()
