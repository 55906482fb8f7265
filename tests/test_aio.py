"""tunrelay.aio: AsyncPump runs pumps and a PeerTable's events on an
asyncio loop.

Plain pytest tests that each call asyncio.run() (no pytest-asyncio).
Loopback UDP or TCP and socketpair TUN stand-ins, no root.  Nothing here
passes or fails on timing: every wait is for an event, a future or a
counter, under a generous deadline (``within``) that only stops a hang.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest
from pumprig import WAIT, Rig, wait_for

from tunrelay import Outcome, PumpArgumentError, PumpStateError, Reason
from tunrelay.aio import AsyncPump, EventQueue
from tunrelay.pypump import PyPump

fp = pytest.importorskip("tunrelay._fastpath")
PeerTable, Pump, Event = fp.PeerTable, fp.Pump, fp.Event

T = TypeVar("T")
KEY_AB = bytes(range(32))
KEY_BA = bytes(range(32, 64))


async def within(awaitable: Awaitable[T], what: str) -> T:
    """Await, failing (not hanging) if it takes longer than WAIT s."""
    try:
        return await asyncio.wait_for(awaitable, WAIT)
    except TimeoutError:
        pytest.fail(f"gave up after {WAIT} s waiting for {what}")


def v4(src: str, dst: str, size: int = 60, seq: int = 0) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, seq & 0xFFFF, 0, 64, 17, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    return header + bytes((seq + i) & 0xFF for i in range(size - 20))


@pytest.fixture
def rig():
    rig = Rig(Pump)
    yield rig
    rig.close()


def session_pair(rig: Rig, **table_options: Any):
    """Two session pumps on loopback, each the other's only peer: a has a
    current session, b the matching next one and no endpoint for a yet
    (it learns it from a's first authenticated datagram)."""
    socks = [rig.udp(timeout=None), rig.udp(timeout=None)]
    ends = []
    for n in range(2):
        table = PeerTable(**table_options)
        tun_test, tun_pump = rig.tun()
        pid = table.add("other", endpoint=socks[1].getsockname() if n == 0 else None,
                        allowed_ips=["10.8.2.0/24"] if n == 0 else ["10.8.1.0/24"])
        pump = rig.pump(tun_pump, socks[n], framing="session", peers=table)
        ends.append((tun_test, pump, table, pid, socks[n]))
    (_, _, tab_a, peer_b, _), (_, _, tab_b, peer_a, _) = ends
    tab_a.install_session(peer_b, local_index=11, remote_index=22, send_key=KEY_AB,
                          recv_key=KEY_BA, initiator=True)
    tab_b.install_session(peer_a, local_index=22, remote_index=11, send_key=KEY_BA,
                          recv_key=KEY_AB, initiator=False)
    return ends


async def provoke_all_kinds(rig: Rig, a, b) -> None:
    """a gets a control datagram and (rekey_after_messages=2) a renew; b
    learns a's endpoint and promotes its next session."""
    tun_a, _, _, _, sock_a = a
    tun_b = b[0]
    rig.udp().sendto(b"\x01hello", sock_a.getsockname())
    for seq in range(3):
        packet = v4("10.8.1.1", "10.8.2.1", seq=seq)
        tun_a.send(packet)
        assert await asyncio.to_thread(tun_b.recv, 65535) == packet


# ---------------------------------------------------------------- start, wait, stop

@pytest.mark.parametrize("pump_class", [Pump, PyPump], ids=["c", "python"])
def test_async_with_starts_and_stops_the_pumps(pump_class):
    rig = Rig(pump_class)
    try:
        pumps = [rig.pump(rig.tun()[1], rig.udp(timeout=None), peer=("127.0.0.1", 9))
                 for _ in range(2)]

        async def main() -> None:
            async with AsyncPump(*pumps) as ap:
                assert all(p.running for p in pumps) and ap.running
                assert ap.outcomes == [None, None]
            assert not any(p.running for p in pumps) and not ap.running
            assert ap.outcomes == [Outcome(Reason.STOPPED)] * 2
            assert await ap.stop() == Outcome(Reason.STOPPED)      # again: fine
            assert await ap.wait() == Outcome(Reason.STOPPED)
            with pytest.raises(PumpStateError, match="started already"):
                await ap.start()

        asyncio.run(main())
    finally:
        rig.close()


def test_await_wait_returns_the_first_pump_that_ended(rig):
    # One pump over TCP (it ends when the peer closes), one over UDP.
    tcp_test, tcp_pump = rig.tcp()
    ending = rig.pump(rig.tun()[1], tcp_pump, framing="len16")
    lasting = rig.pump(rig.tun()[1], rig.udp(timeout=None), peer=("127.0.0.1", 9))

    async def main() -> None:
        async with AsyncPump(ending, lasting) as ap:
            waiter = asyncio.ensure_future(ap.wait())
            await asyncio.sleep(0)
            assert not waiter.done()
            tcp_test.close()
            outcome = await within(waiter, "wait() after the TCP peer closed")
            assert outcome.reason == Reason.CLOSED
            assert lasting.running and ap.running
            assert await ap.wait() == outcome                       # the same, again
        assert ap.outcomes[0] == outcome and ap.outcomes[1] == Outcome(Reason.STOPPED)
        assert not lasting.running

    asyncio.run(main())


class StuckPump:
    """A PumpLike whose loops end only when the test releases them: stop()
    must wait for it without holding the event loop."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.stop_requested = threading.Event()
        self.running = False

    def start(self) -> None:
        self.running = True

    def request_stop(self) -> None:
        self.stop_requested.set()

    def wait(self, timeout: float | None = None) -> Outcome | None:
        if not self.release.wait(timeout):
            return None
        self.running = False
        return Outcome(Reason.STOPPED)


def test_stop_joins_off_the_event_loop():
    stuck = StuckPump()

    async def main() -> None:
        ap = AsyncPump(stuck)      # type: ignore[arg-type]  (a partial PumpLike)
        await ap.start()
        assert await ap.stop(timeout=0.01) is None       # never ends by itself
        assert stuck.stop_requested.is_set() and ap.running
        stopping = asyncio.ensure_future(ap.stop())
        for _ in range(10):
            await asyncio.sleep(0)                        # the loop runs meanwhile
        assert not stopping.done()
        # Released from a callback on the loop: stop() must not hold it.
        asyncio.get_running_loop().call_soon(stuck.release.set)
        assert await within(stopping, "stop() once released") == Outcome(Reason.STOPPED)
        assert not ap.running

    asyncio.run(main())


def test_a_pump_that_fails_to_start_stops_the_others(rig):
    good = rig.pump(rig.tun()[1], rig.udp(timeout=None), peer=("127.0.0.1", 9))
    busy = rig.pump(rig.tun()[1], rig.udp(timeout=None), peer=("127.0.0.1", 9))
    busy.start()

    async def main() -> None:
        with pytest.raises(PumpStateError, match="already running"):
            await AsyncPump(good, busy).start()
        assert not good.running and busy.running

    asyncio.run(main())


def test_arguments_are_checked(rig):
    table, other = PeerTable(), PeerTable()
    pump = rig.pump(rig.tun()[1], rig.udp(timeout=None), peers=table)
    plain = rig.pump(rig.tun()[1], rig.udp(timeout=None), peer=("127.0.0.1", 9))
    with pytest.raises(PumpArgumentError, match="at least one"):
        AsyncPump()
    with pytest.raises(PumpArgumentError, match="twice"):
        AsyncPump(pump, pump)
    with pytest.raises(PumpArgumentError, match="another one"):
        AsyncPump(pump, peers=other)
    with pytest.raises(PumpArgumentError, match="none"):
        AsyncPump(pump, plain, peers=table)
    with pytest.raises(PumpArgumentError, match="kind"):
        AsyncPump(pump).on("bogus", print)  # type: ignore[arg-type]
    with pytest.raises(PumpArgumentError, match="queue_size"):
        AsyncPump(pump, queue_size=0)

    async def main() -> None:
        with pytest.raises(PumpStateError, match="before start"):
            await AsyncPump(pump).wait()
        with pytest.raises(PumpStateError, match="before start"):
            await AsyncPump(pump).stop()

    asyncio.run(main())


# ---------------------------------------------------------------- events

def test_events_arrive_through_async_for(rig):
    a, b = session_pair(rig, rekey_after_messages=2)

    async def collect(ap: AsyncPump, kinds: set[str]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async for event in ap.events():
            seen[event.kind] = event
            if kinds <= seen.keys():
                return seen
        pytest.fail(f"events() ended with only {sorted(seen)}")

    async def main() -> None:
        async with AsyncPump(a[1], peers=a[2]) as ap_a, AsyncPump(b[1], peers=b[2]) as ap_b:
            assert ap_a.reading and ap_b.reading
            await provoke_all_kinds(rig, a, b)
            at_a = await within(collect(ap_a, {"control", "renew"}), "control and renew at a")
            at_b = await within(collect(ap_b, {"endpoint", "promoted"}), "endpoint and promoted at b")
        assert at_a["control"].data == b"\x01hello" and at_a["control"].peer is None
        assert at_a["renew"] == Event("renew", a[3], None, None, 11)   # a's session 11 asks
        assert at_b["endpoint"] == Event("endpoint", b[3], a[4].getsockname(), None)
        assert at_b["promoted"] == Event("promoted", b[3], None, None, 22)
        assert b[2].info(b[3])["sessions"]["current"] == 22
        assert ap_a.dropped_events == ap_b.dropped_events == 0

    asyncio.run(main())


def test_events_arrive_through_callbacks_sync_and_async(rig, caplog):
    a, b = session_pair(rig, rekey_after_messages=2)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        got: dict[str, asyncio.Future[Any]] = {
            kind: loop.create_future() for kind in ("control", "renew", "endpoint", "promoted")}

        def sync_callback(event: Any) -> None:
            if not got[event.kind].done():
                got[event.kind].set_result(event)

        async def async_callback(event: Any) -> None:
            await asyncio.sleep(0)
            sync_callback(event)

        def broken(event: Any) -> None:
            raise RuntimeError("a callback bug")

        async def broken_async(event: Any) -> None:
            raise RuntimeError("an async callback bug")

        async with AsyncPump(a[1], peers=a[2]) as ap_a, AsyncPump(b[1], peers=b[2]) as ap_b:
            ap_a.on("control", broken)                     # first: the others still run
            ap_a.on("control", sync_callback)
            ap_a.on("renew", async_callback)
            ap_b.on("endpoint", sync_callback)
            ap_b.on("promoted", broken_async)
            ap_b.on("promoted", async_callback)
            unsubscribe = ap_a.on("control", broken)
            unsubscribe()
            await provoke_all_kinds(rig, a, b)
            events = {kind: await within(future, f"the {kind} callback")
                      for kind, future in got.items()}
            # The reader survived the failing callbacks: a second control
            # datagram is dispatched too.
            again = loop.create_future()
            ap_a.on("control", lambda event: again.done() or again.set_result(event.data))
            rig.udp().sendto(b"\x02again", a[4].getsockname())
            assert await within(again, "a control datagram after the failures") == b"\x02again"
        assert events["control"].data == b"\x01hello"
        assert events["renew"].peer == a[3]
        assert events["endpoint"].address == a[4].getsockname()
        assert events["promoted"].peer == b[3]

    with caplog.at_level(logging.ERROR, logger="tunrelay.aio"):
        asyncio.run(main())
    messages = [r.getMessage() + str(r.exc_info[1] if r.exc_info else "") for r in caplog.records]
    assert sum("a callback bug" in m for m in messages) == 2      # two control datagrams
    assert sum("an async callback bug" in m for m in messages) == 1


def test_a_control_flood_is_bounded_and_peer_events_are_kept(rig):
    table = PeerTable(control_types=[0x01], control_slots=64)
    tun, tun_pump = rig.tun()
    sock = rig.udp(timeout=None)
    pid = table.add("mobile", allowed_ips=["10.9.1.0/24"], roaming=True)
    pump = rig.pump(tun_pump, sock, peers=table)
    mobile, flooder = rig.udp(), rig.udp()
    flood = [b"\x01flood %d" % n for n in range(40)]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        fd = table.fileno()
        counted = 0
        all_taken = loop.create_future()

        def count(event: Any) -> None:
            nonlocal counted
            counted += 1
            if counted == len(flood) and not all_taken.done():
                all_taken.set_result(None)

        async with AsyncPump(pump, peers=table, queue_size=8) as ap:
            ap.on("control", count)
            roamed = loop.create_future()
            ap.on("endpoint", lambda event: roamed.done() or roamed.set_result(None))
            # An endpoint event first (the peer roams in), then the flood,
            # which nobody consumes yet.
            packet = v4("10.9.1.2", "10.0.0.1")
            mobile.sendto(packet, sock.getsockname())
            assert await asyncio.to_thread(tun.recv, 65535) == packet
            await within(roamed, "the endpoint event")
            for datagram in flood:
                flooder.sendto(datagram, sock.getsockname())
            await within(all_taken, "every flood datagram taken from the table")
            assert table.counts()["control_dropped"] == 0      # the table kept up
            assert ap.dropped_events == len(flood) - 8
            assert len(ap.events()) == 1 + 8
            first = await ap.events().get()
            assert first == Event("endpoint", pid, mobile.getsockname(), None)
            rest = [(await ap.events().get()) for _ in range(8)]
            assert [e.data for e in rest] == flood[-8:]
        assert not ap.reading
        assert loop.remove_reader(fd) is False                 # nothing registered now
        assert [e async for e in ap.events()] == []            # and events() ended

    asyncio.run(main())


def test_the_reader_is_removed_on_exit_and_the_table_can_be_read_again(rig):
    table = PeerTable()
    sock = rig.udp(timeout=None)
    pump = rig.pump(rig.tun()[1], sock, framing="session", peers=table)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with AsyncPump(pump, peers=table) as ap:
            assert ap.reading
            with pytest.raises(PumpStateError, match="another AsyncPump"):
                await AsyncPump(pump, peers=table).start()
        assert not ap.reading
        assert loop.remove_reader(table.fileno()) is False    # nothing registered now
        # Sent while no pump runs: it waits in the socket for the next one.
        rig.udp().sendto(b"\x03late", sock.getsockname())
        async with AsyncPump(pump, peers=table) as ap2:
            event = await within(ap2.events().get(), "the late datagram")
            assert event is not None and event.data == b"\x03late"
        assert loop.remove_reader(table.fileno()) is False

    asyncio.run(main())


def test_events_left_by_the_pumps_are_delivered_on_stop(rig):
    table = PeerTable()
    sock = rig.udp(timeout=None)
    pump = rig.pump(rig.tun()[1], sock, framing="session", peers=table)

    async def main() -> None:
        async with AsyncPump(pump, peers=table) as ap:
            rig.udp().sendto(b"\x01last words", sock.getsockname())
            wait_for(lambda: table.counts()["control_queued"] == 1, "the datagram queued")
            # Whether the reader or stop()'s last take() gets it, it is
            # there for events() once the AsyncPump stopped.
        assert [e.data async for e in ap.events()] == [b"\x01last words"]

    asyncio.run(main())


def test_an_async_callback_may_stop_the_async_pump(rig):
    table = PeerTable()
    sock = rig.udp(timeout=None)
    pump = rig.pump(rig.tun()[1], sock, framing="session", peers=table)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        finished = [loop.create_future(), loop.create_future()]

        async with AsyncPump(pump, peers=table) as ap:
            def bye(n: int) -> Any:
                async def callback(event: Any) -> None:
                    outcome = await ap.stop()      # not cancelled by its own stop()
                    finished[n].set_result(outcome)
                return callback

            ap.on("control", bye(0))
            ap.on("control", bye(1))               # two at once do not wait for each other
            rig.udp().sendto(b"\x03bye", sock.getsockname())
            assert await within(asyncio.gather(*finished), "the callbacks' stop()") == [
                Outcome(Reason.STOPPED)] * 2
            assert not pump.running and not ap.reading

    asyncio.run(main())


def test_an_async_pump_left_running_on_a_closed_loop_does_not_hold_its_table(rig):
    table = PeerTable()
    first = rig.pump(rig.tun()[1], rig.udp(timeout=None), framing="session", peers=table)
    second = rig.pump(rig.tun()[1], rig.udp(timeout=None), framing="session", peers=table)
    left: list[AsyncPump] = []

    async def forget() -> None:
        ap = AsyncPump(first, peers=table)
        await ap.start()                           # and never stopped
        left.append(ap)

    async def again() -> None:
        async with AsyncPump(second, peers=table) as ap:
            assert ap.reading

    asyncio.run(forget())
    asyncio.run(again())
    assert first.running                           # rig.close() stops it


def test_send_control_goes_through_the_first_pump(rig):
    table = PeerTable()
    sock = rig.udp(timeout=None)
    pump = rig.pump(rig.tun()[1], sock, framing="session", peers=table)
    peer = rig.udp()

    async def main() -> None:
        async with AsyncPump(pump, peers=table) as ap:
            ap.send_control(peer.getsockname(), b"\x02hi")
            data, source = await asyncio.to_thread(peer.recvfrom, 100)
            assert (data, source) == (b"\x02hi", sock.getsockname())

    asyncio.run(main())


# ---------------------------------------------------------------- the queue alone

def test_event_queue_merges_peer_events_and_keeps_the_order():
    async def main() -> None:
        queue = EventQueue(2)
        queue.put(Event("renew", 1, None, None))
        queue.put(Event("control", None, ("h", 1), b"\x01a"))
        queue.put(Event("endpoint", 1, ("h", 2), None))
        queue.put(Event("renew", 1, None, None))              # merged, moves last
        queue.put(Event("control", None, ("h", 1), b"\x01b"))
        queue.put(Event("endpoint", 1, ("h", 3), None))       # merged, newest address
        queue.put(Event("control", None, ("h", 1), b"\x01c"))  # drops a
        queue.close()
        out = [(e.kind, e.address if e.kind == "endpoint" else e.data) async for e in queue]
        assert out == [("renew", None), ("control", b"\x01b"), ("endpoint", ("h", 3)),
                       ("control", b"\x01c")]
        assert queue.dropped == 1

    asyncio.run(main())
