"""What every pump is: the ``PumpLike`` protocol that the compiled
``tunrelay._fastpath.Pump`` and the pure-Python ``tunrelay.pypump.PyPump``
both implement, and the types of its surface.

Code that drives a pump (a relay, an embedder's control plane, a test)
types against ``PumpLike`` and takes either.  tests/test_api.py checks
that both classes satisfy it, with the same signatures.
"""

from __future__ import annotations

from typing import Literal, Protocol, Self, TypedDict, runtime_checkable

from ._runner import Outcome
from .framing import Framing, Mode, PeerFraming


class HasFileno(Protocol):
    def fileno(self) -> int: ...


#: A file descriptor, or an object that has one (a socket, a file).  The
#: pumps never close what they are given.
FileDescriptorLike = int | HasFileno

#: A UDP peer as ``socket`` gives it: (host, port), or (host, port,
#: flowinfo, scope_id) for a scoped (link-local) IPv6 address.
Address = tuple[str, int] | tuple[str, int, int, int]


class DirectionStats(TypedDict):
    """One direction's counters (see ``tunrelay.counters`` for the names)."""

    packets: int
    bytes: int
    batches: int
    syscalls: int
    wakeups: int
    tun_io: int
    drops: dict[str, int]
    errors: dict[str, int]
    last_errno: int


class PumpStats(TypedDict):
    """What ``stats()`` returns: a snapshot of both directions."""

    egress: DirectionStats
    ingress: DirectionStats


@runtime_checkable
class PumpLike(Protocol):
    """Moves packets between a TUN/TAP fd and a socket fd, one loop per
    direction, until stopped."""

    @property
    def framing(self) -> Framing | PeerFraming: ...

    @property
    def mode(self) -> Mode: ...

    @property
    def mtu(self) -> int: ...

    @property
    def batch(self) -> int: ...

    @property
    def running(self) -> bool: ...

    @property
    def peer(self) -> Address | None:
        """The UDP peer, given or learned; None for TCP or before it is known."""
        ...

    @property
    def learns_peer(self) -> bool: ...

    @property
    def io(self) -> Literal["uring", "syscalls"]:
        """The TUN I/O engine running (what io="auto" chose)."""
        ...

    def start(self) -> None:
        """Start both loops, each in its own thread."""
        ...

    def request_stop(self) -> None:
        """Signal both loops to end and return at once (signal-handler safe)."""
        ...

    def stop(self, timeout: float | None = None) -> Outcome | None:
        """Signal both loops and wait for them; None if they did not end
        within ``timeout``.  Only then may the fds be closed."""
        ...

    def wait(self, timeout: float | None = None) -> Outcome | None:
        """Block until both loops ended; None on timeout."""
        ...

    def run(self) -> Outcome:
        """start() then wait() until the pump ends."""
        ...

    def stats(self) -> PumpStats: ...

    def attach(self, sock_fd: FileDescriptorLike, *, peer: Address | None = None) -> None:
        """Swap in a new socket (a TCP reconnect) while stopped."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...

