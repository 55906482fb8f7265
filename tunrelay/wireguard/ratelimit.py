"""Rate limits for handshake messages.

* ``SourceBuckets``: a token bucket per source IP (20 a second, a burst of
  5, as wireguard-go), consulted only while the device is under load and
  only for messages whose mac2 proved their source address.  So a flood
  from one address costs at most 20 DH computations a second, and the
  other addresses keep theirs.  The table of buckets is bounded: when it
  is full of addresses seen within the last second, a new address is
  refused (counted by the caller) rather than growing memory.
* The 50 initiations/s/peer limit is a per-peer spacing kept on the peer
  (``WgPeer.last_initiation_consumed``), checked after decryption.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable

__all__ = ["SourceBuckets"]


class SourceBuckets:
    """Token buckets keyed by source IP (the port is not part of the key:
    ports are free to pick)."""

    def __init__(self, rate: float = 20.0, burst: int = 5, *, max_sources: int = 65536,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1 or max_sources < 1:
            raise ValueError("SourceBuckets needs rate > 0, burst >= 1, max_sources >= 1")
        self.rate = rate
        self.burst = float(burst)
        self.max_sources = max_sources
        self._clock = clock
        self._buckets: dict[bytes, tuple[float, float]] = {}   # ip -> (tokens, when)
        self._swept = clock()

    def __len__(self) -> int:
        return len(self._buckets)

    @staticmethod
    def key(host: str) -> bytes:
        """An IPv4-mapped IPv6 source counts as the IPv4 address it is."""
        ip = ipaddress.ip_address(host.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.packed

    def allow(self, host: str) -> bool:
        """Take a token for ``host``: True if it had one."""
        now = self._clock()
        if now - self._swept >= 1.0:
            self._sweep(now)
        key = self.key(host)
        tokens, when = self._buckets.get(key, (self.burst, now))
        if key not in self._buckets and len(self._buckets) >= self.max_sources:
            self._sweep(now)
            if len(self._buckets) >= self.max_sources:
                return False
        tokens = min(self.burst, tokens + (now - when) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        return True

    def _sweep(self, now: float) -> None:
        """Forget buckets that have refilled: they hold nothing a fresh one would not."""
        full_after = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}
        self._swept = now
