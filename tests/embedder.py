# mypy: disallow-untyped-defs, disallow-incomplete-defs, disallow-any-generics, warn-return-any
"""A small embedder written only against tunrelay's public API.

tests/test_stubs.py type-checks it with mypy (so the extension's stubs,
the PumpLike protocol and the enums are exercised the way a user's code
would use them) and runs ``main()``.  ``mistakes()`` is never run: each
of its lines is an error the stubs must catch, and mypy's
--warn-unused-ignores fails the test when one is no longer caught.
"""

from __future__ import annotations

import socket
import struct

from tunrelay import Outcome, Pump, PumpArgumentError, PumpLike, PumpStateError, PyPump, Reason
from tunrelay._fastpath import Keyring, len16_split, validate
from tunrelay.pumps import PumpStats


def ipv4_packet(size: int = 60) -> bytes:
    packet = bytearray(size)
    packet[0] = 0x45
    packet[2:4] = struct.pack("!H", size)
    return bytes(packet)


def exchange(pump: PumpLike, app_side: socket.socket, far_end: socket.socket) -> int:
    """One packet from "the kernel" to the far end; returns egress packets."""
    with pump:
        pump.start()
        app_side.send(ipv4_packet())
        data, _ = far_end.recvfrom(2048)
        assert data == ipv4_packet()
        outcome: Outcome | None = pump.stop(5.0)
        stats: PumpStats = pump.stats()    # counters stay readable once stopped
    assert outcome is not None and outcome.reason is Reason.STOPPED
    assert not outcome.restartable
    return stats["egress"]["packets"]


def run_both_pumps() -> list[int]:
    counts = []
    for make in (Pump, PyPump):
        app_side, tun_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        far_end = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind(("127.0.0.1", 0))
            far_end.bind(("127.0.0.1", 0))
            far_end.settimeout(5)
            peer: tuple[str, int] = far_end.getsockname()
            pump: PumpLike = make(tun_end, sock, peer=peer, mtu=1400, batch=8)
            assert pump.peer == peer and pump.framing == "raw" and not pump.learns_peer
            counts.append(exchange(pump, app_side, far_end))
            pump.attach(sock, peer=peer)   # stopped: allowed
            pump.start()
            try:
                pump.start()
            except PumpStateError:          # running already
                pass
            finally:
                pump.stop(5.0)
        finally:
            for s in (sock, far_end, app_side, tun_end):
                s.close()
    return counts


def keyrings() -> bool:
    """Two ends of an aead TCP tunnel prove they hold the key."""
    key = bytes(32)
    client, server = Keyring(key, "chacha20-poly1305", "a"), Keyring(key, role="b")
    counts: dict[str, int] = server.counts()
    return server.verify_hello(client.hello()) and counts["sessions"] == 0


def checks() -> tuple[str | None, int]:
    reason = validate(b"\x60", "tun", 1400)
    frames, buffered, error = len16_split([b"\x00\x02ab\x00"], 1400)
    assert frames == [b"ab"] and error is None
    return reason, buffered


def main() -> None:
    assert run_both_pumps() == [1, 1]
    assert keyrings()
    assert checks() == ("truncated", 1)
    try:
        PyPump(0, 0, batch=0)
    except PumpArgumentError as error:
        assert isinstance(error, ValueError)


def mistakes(tun: socket.socket, sock: socket.socket, pump: Pump) -> None:
    Pump(tun, sock, framing="len-16")  # type: ignore[arg-type]
    Pump(tun, sock, mode="tan")  # type: ignore[arg-type]
    Pump(tun, sock, mtu="1400")  # type: ignore[arg-type]
    Pump(tun, sock, "raw")  # type: ignore[call-arg]
    Pump(tun, sock, key="not bytes")  # type: ignore[arg-type]
    PyPump(tun, sock, cipher="rot13")  # type: ignore[arg-type]
    Keyring(bytes(32), role="c")  # type: ignore[arg-type]
    pump.stats()["egress"]["pakets"]  # type: ignore[typeddict-item]
    pump.stop().reason  # type: ignore[union-attr]  # noqa: B018 (for mypy: the access is the test)
    size: str = pump.mtu  # type: ignore[assignment]
    pump.attach(sock, ("127.0.0.1", 9))  # type: ignore[call-arg]
    len16_split(b"\x00\x01a", 1400)[0].append("text")  # type: ignore[arg-type]
    del size


if __name__ == "__main__":
    main()
