"""examples/toyvpn: two nodes on loopback (socketpair TUN stand-ins, no
root) do the toy handshake over the control channel, carry packets both
ways byte-exact, rekey while the traffic flows without losing a packet,
and stop cleanly.

Traffic is lockstep (a packet each way, each awaited), so one lost packet
is a TimeoutError on the stand-in, not a count that happens to differ.
Every wait is for a condition under a deadline that only stops a hang.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
from pumprig import WAIT, wait_for

pytest.importorskip("tunrelay._fastpath")
pytest.importorskip("cryptography")

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305  # noqa: E402

from examples.toyvpn import handshake  # noqa: E402
from examples.toyvpn.demo import INITIATOR_IP, RESPONDER_IP, exchange, loopback_pair, packet  # noqa: E402
from examples.toyvpn.node import Node  # noqa: E402
from tunrelay import Outcome, Reason  # noqa: E402

T = TypeVar("T")


async def within(awaitable: Awaitable[T], what: str) -> T:
    try:
        return await asyncio.wait_for(awaitable, WAIT)
    except TimeoutError:
        pytest.fail(f"gave up after {WAIT} s waiting for {what}")


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Let the loop run until ``predicate()`` holds (a hang fails)."""
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.001)
    await within(poll(), what)


def drops(node: Node) -> dict[str, int]:
    stats = node.pump.stats()
    return {f"{direction}.{k}": v for direction in ("egress", "ingress")
            for k, v in stats[direction]["drops"].items() if v}


class Traffic:
    """Lockstep packets both ways in a thread until stopped: rounds of
    ``chunk`` packets each way, counted in ``sent``."""

    def __init__(self, a_tun: socket.socket, b_tun: socket.socket, chunk: int = 10) -> None:
        self.stop = threading.Event()
        self.sent = 0
        self.error: BaseException | None = None

        def body() -> None:
            try:
                while not self.stop.is_set():
                    exchange(a_tun, b_tun, chunk, start=self.sent)
                    self.sent += chunk
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=body, name="toyvpn-traffic", daemon=True)
        self.thread.start()

    async def finish(self) -> int:
        self.stop.set()
        await asyncio.to_thread(self.thread.join, WAIT)
        assert not self.thread.is_alive(), "the traffic thread hangs"
        if self.error is not None:
            raise self.error
        return self.sent


def test_handshake_then_packets_both_ways_byte_exact():
    async def main() -> None:
        async with loopback_pair(psk=b"a toy secret") as (a, a_tun, b, b_tun):
            await within(asyncio.gather(a.ready(), b.ready()), "the first handshake")
            assert a.handshakes == b.handshakes == 1
            sa, sb = a.sessions(), b.sessions()
            assert sa["current"] is not None and sb["current"] is not None
            await asyncio.to_thread(exchange, a_tun, b_tun, 300)
            # Sizes up to the MTU, and an IPv4 packet padded by nobody.
            big = packet(INITIATOR_IP, RESPONDER_IP, 7, size=1400)
            a_tun.send(big)
            assert await asyncio.to_thread(b_tun.recv, 65535) == big
            assert drops(a) == drops(b) == {}
            assert a.table.info(a.peer)["egress"]["packets"] == 301
            pumps = (a.pump, b.pump)
        assert not any(p.running for p in pumps)
        assert a.ap is not None and b.ap is not None
        assert a.ap.outcomes == b.ap.outcomes == [Outcome(Reason.STOPPED)]
        assert not a.ap.reading and not b.ap.reading

    asyncio.run(main())


@pytest.mark.parametrize("limits", [{"rekey_after_messages": 40},
                                    {"rekey_after_time": 0.02}],
                         ids=["messages", "time"])
def test_rekeys_while_traffic_flows_lose_no_packet(limits):
    async def main() -> None:
        async with loopback_pair(**limits) as (a, a_tun, b, b_tun):
            await within(asyncio.gather(a.ready(), b.ready()), "the first handshake")
            first = a.sessions()["current"], b.sessions()["current"]
            traffic = Traffic(a_tun, b_tun)
            try:
                # Renew events (the limits) start the rekeys, under traffic.
                await within(asyncio.gather(a.installed(5), b.installed(5)), "four rekeys")
            finally:
                sent = await traffic.finish()
            # Started by the initiator's renew events or the responder's
            # REKEY (its renew events), whichever came first.
            assert a.initiations["renew"] + a.initiations["the responder asked"] >= 4
            assert set(a.initiations) <= {"start", "renew", "the responder asked"}
            now = a.sessions()["current"], b.sessions()["current"]
            assert now[0] != first[0] and now[1] != first[1]
            # The responder took each new session when the initiator first
            # used it (promotion; the newest one may still wait for that),
            # and nothing was refused on the way.
            assert b.promotions >= b.handshakes - 2
            bad = {k: v for k, v in {**drops(a), **drops(b)}.items()
                   if k.split(".")[1] in ("no_session", "session_expired", "bad_tag", "replay")}
            assert bad == {}, f"after {sent} packets each way"
            # And the traffic carries on with the newest keys.
            await asyncio.to_thread(exchange, a_tun, b_tun, 20, sent)

    asyncio.run(main())


def test_the_responder_asks_the_initiator_to_rekey():
    """Only the responder has a limit: its renew events become REKEY
    messages (type 3), and the initiator starts the handshakes."""
    async def main() -> None:
        async with loopback_pair(responder_options={"rekey_after_messages": 30}) as (
                a, a_tun, b, b_tun):
            await within(asyncio.gather(a.ready(), b.ready()), "the first handshake")
            traffic = Traffic(a_tun, b_tun)
            try:
                await within(a.installed(3), "two rekeys the responder asked for")
            finally:
                await traffic.finish()
            assert a.initiations["the responder asked"] >= 2
            assert a.initiations["renew"] == 0

    asyncio.run(main())


def seal(key: bytes, index: int, counter: int, data: bytes) -> bytes:
    """A framing "session" data message made by hand (see tests/test_peers.py)."""
    nonce = b"\0" * 4 + struct.pack("<Q", counter)
    return struct.pack("<BxxxIQ", 4, index, counter) + ChaCha20Poly1305(key).encrypt(nonce, data, b"")


def test_an_init_waits_while_the_responder_has_an_unconfirmed_session(caplog):
    """A fake initiator (a plain UDP socket) runs three handshakes against
    a responder node.  The third INIT arrives while the second session
    is still `next`: the responder answers it only once a datagram under
    the second session confirmed (promoted) it, so it never throws away a
    session the initiator may be sending with."""
    tun_test, tun_node = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fake = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (sock, fake):
        s.bind(("127.0.0.1", 0))
    fake.settimeout(WAIT)
    tun_test.settimeout(WAIT)
    node = Node(tun_node, sock, initiator=False, peer_ips=[f"{INITIATOR_IP}/32"],
                confirm_timeout=3600)

    def handshake_with(index: int) -> handshake.Session:
        init = handshake.Initiation(index)
        fake.sendto(init.message, sock.getsockname())
        session = init.finish(fake.recv(100), None)
        assert session is not None
        return session

    async def main() -> None:
        async with node:
            first = await asyncio.to_thread(handshake_with, 1)
            assert node.sessions()["current"] == first.remote_index          # current at once
            second = await asyncio.to_thread(handshake_with, 2)
            assert node.sessions()["next"] == second.remote_index
            third = handshake.Initiation(3)
            with caplog.at_level(logging.INFO, logger="toyvpn"):
                fake.sendto(third.message, sock.getsockname())
                await until(lambda: any("waits" in r.getMessage() for r in caplog.records),
                            "the third INIT taken and put aside")
            assert node.sessions()["next"] == second.remote_index            # kept
            # A datagram under the second session promotes it; then the
            # responder answers the third INIT.
            inner = packet(INITIATOR_IP, RESPONDER_IP, 1)
            fake.sendto(seal(second.send_key, second.remote_index, 0, inner), sock.getsockname())
            assert await asyncio.to_thread(tun_test.recv, 65535) == inner
            session = third.finish(await asyncio.to_thread(fake.recv, 100), None)
            assert session is not None
            assert node.sessions() == {"current": second.remote_index,
                                       "previous": first.remote_index,
                                       "next": session.remote_index}
            assert node.promotions == 1

    try:
        asyncio.run(main())
    finally:
        for s in (tun_test, tun_node, sock, fake):
            s.close()


def test_mismatched_psks_carry_nothing():
    """The toy has no key confirmation: the handshake "completes" with
    different PSKs and the data is then refused (bad_tag)."""
    async def main() -> None:
        async with loopback_pair(initiator_options={"psk": b"one"},
                                 responder_options={"psk": b"two"}) as (a, a_tun, b, b_tun):
            await within(asyncio.gather(a.ready(), b.ready()), "the handshake")
            a_tun.send(packet(INITIATOR_IP, RESPONDER_IP, 1))
            wait_for(lambda: drops(b).get("ingress.bad_tag") == 1, "the packet refused")

    asyncio.run(main())


def test_the_demo_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "examples.toyvpn", "demo", "--packets", "400",
                             "--rekey-after-messages", "50"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "400 packets each way" in result.stdout and "none lost" in result.stdout
