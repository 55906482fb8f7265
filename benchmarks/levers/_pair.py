"""A started, warmed-up relay pair per "NAME=key=value;key=value" spec."""
from collections.abc import Iterator
from contextlib import contextmanager

from tunrelay.testrig.netns import Testbed
from tunrelay.testrig.pair import TUNNEL_A, RelayPair


@contextmanager
def _pair(sets: str):
    relay = ["offload = true"] + [s for s in sets.split(";") if s]
    with Testbed() as bed:
        with RelayPair(bed, protocol="udp",
                       overrides={"relay": relay, "device": ["queues = 1"]}) as pair:
            pair.start()
            bed.run(bed.ns_b, ["ping", "-c", "3", "-i", "0.2", TUNNEL_A], capture_output=True)
            yield bed, pair


def pairs(specs: list[str]) -> Iterator[tuple[str, Testbed, RelayPair]]:
    """(name, bed, pair) for each spec, one after the other; ping has run."""
    for spec in specs:
        name, _, sets = spec.partition("=")
        with _pair(sets) as (bed, pair):
            yield name, bed, pair
