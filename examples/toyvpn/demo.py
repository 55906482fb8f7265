"""Both ends of the toy VPN in one process, no root: each node's TUN is
one end of a SOCK_SEQPACKET socketpair (the pump reads and writes whole
packets on it, as on a TUN fd) and the network is loopback UDP.  The
test suite (tests/test_example.py) and ``python -m examples.toyvpn demo``
use it."""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

from .node import Node

INITIATOR_IP, RESPONDER_IP = "10.77.0.1", "10.77.0.2"
TIMEOUT = 5.0     # one packet on the stand-ins


def packet(src: str, dst: str, seq: int, size: int = 200) -> bytes:
    """An IPv4/UDP-looking packet of ``size`` bytes that says which it is."""
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, seq & 0xFFFF, 0, 64, 17, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    return header + (struct.pack("!I", seq) * size)[:size - 20]


@contextlib.asynccontextmanager
async def loopback_pair(initiator_options: dict[str, Any] | None = None,
                        responder_options: dict[str, Any] | None = None,
                        **options: Any) -> AsyncIterator[tuple[Node, socket.socket,
                                                               Node, socket.socket]]:
    """(initiator, its TUN's far end, responder, its TUN's far end), both
    running; ``options`` go to both Nodes, the others to one.  Stopped,
    then closed, on exit."""
    owned: list[socket.socket] = []
    try:
        tuns = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(2)]
        udps = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
        owned += [end for pair in tuns for end in pair] + udps
        for udp in udps:
            udp.bind(("127.0.0.1", 0))
        for far, _ in tuns:
            far.settimeout(TIMEOUT)
        initiator = Node(tuns[0][1], udps[0], initiator=True, endpoint=udps[1].getsockname(),
                         peer_ips=[f"{RESPONDER_IP}/32"], **options, **(initiator_options or {}))
        responder = Node(tuns[1][1], udps[1], initiator=False, peer_ips=[f"{INITIATOR_IP}/32"],
                         **options, **(responder_options or {}))
        async with responder, initiator:
            yield initiator, tuns[0][0], responder, tuns[1][0]
    finally:
        for sock in owned:      # the nodes stopped: no pump thread uses them
            sock.close()


def exchange(initiator_tun: socket.socket, responder_tun: socket.socket, count: int,
             start: int = 0) -> None:
    """``count`` packets each way in lockstep (blocking: run it in a
    thread).  Raises AssertionError if one differs, TimeoutError if one
    is lost."""
    for seq in range(start, start + count):
        out = packet(INITIATOR_IP, RESPONDER_IP, seq)
        initiator_tun.send(out)
        got = responder_tun.recv(65535)
        assert got == out, f"packet {seq} initiator -> responder differs"
        back = packet(RESPONDER_IP, INITIATOR_IP, seq, size=100 + seq % 1200)
        responder_tun.send(back)
        got = initiator_tun.recv(65535)
        assert got == back, f"packet {seq} responder -> initiator differs"
