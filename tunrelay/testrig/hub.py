"""A test bed shaped as a star: a hub namespace and N spoke namespaces.

Each spoke is joined to the hub by a veth pair of its own, so the hub has
one underlay link (and address) per spoke, IPv4 and IPv6, the way a VPN
hub with many peers sees them.  Forwarding is on in the hub's namespace
(the spokes of a hub relay reach each other through its kernel).  Nothing
appears in the root namespace; everything is removed by ``close()``, from
``__exit__`` even when the body raised, and from an atexit hook as a safety
net (``netns.Namespaces``).

Underlay of link i (spoke i, 1-based): hub 198.18.i.1/24 and
fd00:198:18:i::1/64, spoke 198.18.i.2/24 and fd00:198:18:i::2/64.
"""

from __future__ import annotations

from dataclasses import dataclass

from .netns import UNDERLAY6_PREFIX, UNDERLAY_PREFIX, Namespaces, add_veth, set_sysctl

__all__ = ["Spoke", "Star", "MAX_SPOKES"]

#: Each spoke's names end in one base-36 digit (1..z): names stay <= 15 bytes.
MAX_SPOKES = 35
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Spoke:
    """One spoke: its namespace, its veth end and the hub's, and the
    underlay addresses on that link (plain strings, no prefix)."""

    index: int          # 1-based
    ns: str
    veth: str           # the spoke's end
    hub_veth: str       # the hub's end of this spoke's link
    addr: str
    addr6: str
    hub_addr: str       # the hub's address on this link
    hub_addr6: str


class Star(Namespaces):
    """``Star(spokes=2)``: namespace ``hub`` and ``spokes[i].ns``, each spoke
    linked to the hub by its own veth pair; ``run``/``popen`` inside any of
    them, as with ``Testbed``."""

    __test__ = False
    what = "star"

    def __init__(self, spokes: int = 2) -> None:
        if not 1 <= spokes <= MAX_SPOKES:
            raise ValueError(f"a star has 1 to {MAX_SPOKES} spokes, not {spokes}")
        super().__init__()
        self.hub = f"{self.base}h"
        self.spokes: list[Spoke] = []
        for i in range(1, spokes + 1):
            digit = _DIGITS[i]
            self.spokes.append(Spoke(
                index=i, ns=f"{self.base}s{digit}", veth=f"{self.base}s{digit}",
                hub_veth=f"{self.base}h{digit}",
                addr=f"198.18.{i}.2", addr6=f"fd00:198:18:{i:x}::2",
                hub_addr=f"198.18.{i}.1", hub_addr6=f"fd00:198:18:{i:x}::1"))
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    @property
    def namespaces(self) -> list[str]:
        """The hub's namespace, then each spoke's."""
        return [self.hub, *(spoke.ns for spoke in self.spokes)]

    def _build(self) -> None:
        for ns in self.namespaces:
            self.add_namespace(ns)
        set_sysctl(self.hub, "net/ipv4/ip_forward", "1")
        set_sysctl(self.hub, "net/ipv6/conf/all/forwarding", "1")
        for s in self.spokes:
            add_veth(self.hub, s.hub_veth, s.ns, s.veth, [
                (self.hub, s.hub_veth, f"{s.hub_addr}/{UNDERLAY_PREFIX}"),
                (self.hub, s.hub_veth, f"{s.hub_addr6}/{UNDERLAY6_PREFIX}"),
                (s.ns, s.veth, f"{s.addr}/{UNDERLAY_PREFIX}"),
                (s.ns, s.veth, f"{s.addr6}/{UNDERLAY6_PREFIX}"),
            ])

    def __repr__(self) -> str:
        return (f"<Star {self.hub} with {len(self.spokes)} spokes"
                f"{' closed' if self._closed else ''}>")
