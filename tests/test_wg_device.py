"""WireGuardDevice end to end, in one process: two devices over loopback
UDP, each with one end of a SOCK_SEQPACKET socketpair as its "TUN" (the
test holds the other end).  The handshake runs both ways, a first packet
waits for it (staged) and arrives, packets arrive byte-exact both ways,
sessions rekey under traffic with shortened Timers and lose nothing, a
restarted side (new device, same keys) handshakes again, peers are changed
while running, and a peer that moves to another port is followed.

Plain pytest tests that each call asyncio.run(); every wait has a generous
timeout and nothing asserts on timing.  Also the timer decisions
(timers.due) and the rate limiter, which are pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from conftest import load_fastpath
from tunrelay.wireguard import noise
from tunrelay.wireguard.device import WireGuardDevice
from tunrelay.wireguard.ratelimit import SourceBuckets
from tunrelay.wireguard.timers import Action, PeerClock, Timers, due, unanswered_since

WAIT = 20.0          # any one condition, generously
#: Short enough for a test to see every timer, long enough for a slow,
#: shared 2-core machine not to trip over them.
FAST = dataclasses.replace(Timers(), rekey_timeout=0.5, rekey_timeout_jitter=0.05,
                           keepalive_timeout=1.0, rekey_attempt_time=10.0, tick=0.05)

A_NETS = ("10.9.0.1/32", "fd09::1/128")
B_NETS = ("10.9.0.2/32", "fd09::2/128")


def packet(src: str, dst: str, size: int = 100, seq: int = 0) -> bytes:
    """A valid IPv4 or IPv6 UDP-looking packet of ``size`` bytes whose
    payload carries ``seq`` (so each is distinct and checkable)."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    fill = (struct.pack("!I", seq) * (size // 4 + 1))
    if s.version == 4:
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, seq & 0xFFFF, 0, 64, 17, 0,
                             s.packed, d.packed)
        return header + fill[:size - 20]
    header = struct.pack("!IHBB16s16s", 0x60000000, size - 40, 17, 64, s.packed, d.packed)
    return header + fill[:size - 40]


async def until(condition: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    """Poll ``condition`` until it is true; fail naming ``what`` after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}", pytrace=False)
        await asyncio.sleep(0.02)


class End:
    """One device, its TUN stand-in and its keys."""

    def __init__(self, name: str, nets: tuple[str, ...], *, timers: Timers = FAST,
                 private_key: bytes | None = None, bind: str = "127.0.0.1", port: int = 0) -> None:
        self.name = name
        self.nets = nets
        self.private = private_key or noise.generate_private_key()
        self.public = noise.private_to_public(self.private)
        self.test_end, self.dev_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.test_end.setblocking(False)
        self.device = WireGuardDevice([self.dev_end.fileno()], private_key=self.private,
                                      listen_port=port, bind=bind, timers=timers, mtu=1420)

    @property
    def v4(self) -> str:
        return self.nets[0].split("/")[0]

    @property
    def v6(self) -> str:
        return self.nets[1].split("/")[0]

    @property
    def port(self) -> int:
        return self.device.listen_port

    def send(self, data: bytes) -> None:
        """A packet into the device, as if the kernel routed it there."""
        self.test_end.send(data)

    async def recv(self, timeout: float = WAIT) -> bytes:
        """The next packet the device delivers to its TUN."""
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.sock_recv(self.test_end, 65536), timeout)
        except TimeoutError:
            pytest.fail(f"{self.name}: no packet within {timeout:g} s; stats "
                        f"{self.device.stats()}", pytrace=False)

    def pending_packets(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.test_end.recv(65536))
            except BlockingIOError:
                return out

    def refused(self, reason: str) -> int:
        return int(self.device.stats()["refused"][reason])

    def drops(self) -> dict[str, int]:
        """The pumps' drops by reason, both directions, only the non-zero."""
        total: dict[str, int] = {}
        for pump in self.device.stats()["pumps"]:
            for direction in ("egress", "ingress"):
                for reason, n in pump[direction]["drops"].items():
                    if n:
                        total[reason] = total.get(reason, 0) + n
        return total

    def handshakes(self, key: str = "completed") -> int:
        return int(self.device.stats()["handshakes"][key])

    async def close(self) -> None:
        await self.device.stop()
        self.test_end.close()
        self.dev_end.close()


def connect(a: End, b: End, *, endpoints: tuple[bool, bool] = (True, True)) -> None:
    """Make each the other's peer (with the other's port as endpoint, where asked)."""
    for me, other, give in ((a, b, endpoints[0]), (b, a, endpoints[1])):
        me.device.add_peer(other.public, other.name)
        me.device.set_peer(other.public, allowed_ips=other.nets,
                           endpoint=("127.0.0.1", other.port) if give else None)


@contextlib.asynccontextmanager
async def pair(timers: Timers = FAST, *, endpoints: tuple[bool, bool] = (True, True)
               ) -> AsyncIterator[tuple[End, End]]:
    load_fastpath()
    a, b = End("a", A_NETS, timers=timers), End("b", B_NETS, timers=timers)
    try:
        await a.device.start()
        await b.device.start()
        connect(a, b, endpoints=endpoints)
        yield a, b
    finally:
        await a.close()
        await b.close()


async def exchange(a: End, b: End, count: int = 1, size: int = 200, seq: int = 0) -> None:
    """``count`` packets a -> b and b -> a, each arriving byte-exact."""
    for i in range(count):
        ab = packet(a.v4 if i % 2 == 0 else a.v6, b.v4 if i % 2 == 0 else b.v6, size, seq + i)
        a.send(ab)
        assert await b.recv() == ab
        ba = packet(b.v4, a.v4, size + 1, seq + i)
        b.send(ba)
        assert await a.recv() == ba


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


# ---------------------------------------------------------------- handshakes and data

@pytest.mark.parametrize("first", ["a", "b"])
def test_staged_first_packet_starts_the_handshake_and_arrives(first: str) -> None:
    async def main() -> None:
        async with pair() as (a, b):
            src, dst = (a, b) if first == "a" else (b, a)
            data = packet(src.v4, dst.v4, 300, 7)
            src.send(data)                      # no session yet: held, then sent
            assert await dst.recv() == data
            assert src.device.stats()["staged"]["staged_sent"] >= 1
            assert src.handshakes("initiations_sent") >= 1
            assert dst.handshakes("responses_sent") >= 1
            await exchange(a, b, 4)
            status = src.device.peer_status(dst.public)
            assert status.last_handshake is not None and status.endpoint == ("127.0.0.1", dst.port)
            assert status.tx_bytes > 300 and status.rx_bytes > 0
            assert src.device.peer_status(dst.public).allowed_ips == [
                ipaddress.ip_network(n) for n in dst.nets]
    run(main)


def test_simultaneous_initiations_settle_on_one_session() -> None:
    async def main() -> None:
        async with pair() as (a, b):
            ab, ba = packet(a.v4, b.v4, 100, 1), packet(b.v4, a.v4, 100, 2)
            a.send(ab)
            b.send(ba)                 # both initiate before either hears the other
            assert await b.recv() == ab
            assert await a.recv() == ba
            await exchange(a, b, 3, seq=10)
            assert a.drops() == {} and b.drops() == {}
    run(main)


def test_packets_byte_exact_both_ways_all_sizes() -> None:
    async def main() -> None:
        async with pair() as (a, b):
            await exchange(a, b, 1)
            for size in (20, 21, 40, 41, 63, 64, 65, 576, 1279, 1400, 1420):
                v6 = size >= 40 and size % 2
                ab = packet(a.v6 if v6 else a.v4, b.v6 if v6 else b.v4, size, size)
                a.send(ab)
                assert await b.recv() == ab
                ba = packet(b.v4, a.v4, max(size, 20), size)
                b.send(ba)
                assert await a.recv() == ba
            assert a.drops() == {} and b.drops() == {}
    run(main)


def test_responder_without_endpoint_learns_it_from_the_handshake() -> None:
    async def main() -> None:
        async with pair(endpoints=(True, False)) as (a, b):
            # b does not know where a is: b's packet for a is not staged
            # (no endpoint) until a's handshake tells b.
            data = packet(a.v4, b.v4, 120, 1)
            a.send(data)
            assert await b.recv() == data
            assert b.device.peer_status(a.public).endpoint == ("127.0.0.1", a.port)
            reply = packet(b.v4, a.v4, 120, 2)
            b.send(reply)
            assert await a.recv() == reply
    run(main)


def test_rekey_under_traffic_loses_nothing() -> None:
    timers = dataclasses.replace(FAST, rekey_after_time=1.0, reject_after_time=3.0)

    async def main() -> None:
        async with pair(timers) as (a, b):
            await exchange(a, b, 1)
            first = a.handshakes() + b.handshakes()
            seq = 100
            loop = asyncio.get_running_loop()
            end = loop.time() + 3.5               # more than three rekey periods
            while loop.time() < end or a.handshakes() + b.handshakes() < first + 4:
                await exchange(a, b, 5, size=500, seq=seq)
                seq += 5
                await asyncio.sleep(0.02)
                if loop.time() > end + WAIT:
                    pytest.fail(f"no rekey: {a.device.stats()} {b.device.stats()}")
            # Rekeys happened on time (only the initiator of each session
            # acts on its age) and every packet arrived, in order.
            assert a.handshakes("initiations_sent") + b.handshakes("initiations_sent") >= 3
            for end_ in (a, b):
                assert end_.drops() == {}
                assert end_.device.stats()["staged"]["staged_dropped_overflow"] == 0
    run(main)


def test_rekey_after_messages_both_ways_loses_nothing() -> None:
    timers = dataclasses.replace(FAST, rekey_after_messages=40)

    async def main() -> None:
        async with pair(timers) as (a, b):
            seq = 0
            loop = asyncio.get_running_loop()
            deadline = loop.time() + WAIT
            while a.handshakes() + b.handshakes() < 6:
                await exchange(a, b, 5, size=300, seq=seq)
                seq += 5
                await asyncio.sleep(0.01)
                if loop.time() > deadline:
                    pytest.fail(f"no rekeys: {a.device.stats()} {b.device.stats()}")
            assert a.drops() == {} and b.drops() == {}
            # both ends count messages, so both ask; the responder of the
            # current session rekeys on messages too (its session is young)
            assert b.handshakes("initiations_sent") >= 1 and a.handshakes("initiations_sent") >= 1
    run(main)


async def restart(b: End, a: End) -> End:
    """b stopped and started again with the same keys on the same port (a's
    session is gone on its side), a as its one peer again."""
    port, private = b.port, b.private
    await b.close()
    b2 = End("b", B_NETS, private_key=private, port=port)
    try:
        await b2.device.start()
        b2.device.add_peer(a.public, "a")
        b2.device.set_peer(a.public, allowed_ips=a.nets, endpoint=("127.0.0.1", a.port))
    except BaseException:
        await b2.close()
        raise
    return b2


def test_restarted_peer_handshakes_again() -> None:
    async def main() -> None:
        async with pair() as (a, b):
            await exchange(a, b, 2)
            b2 = await restart(b, a)
            try:
                data = packet(b2.v4, a.v4, 150, 9)
                b2.send(data)                     # b2 initiates; its TAI64N is newer
                assert await a.recv() == data
                back = packet(a.v4, b2.v4, 150, 10)
                a.send(back)
                assert await b2.recv() == back
                assert a.refused("replayed_timestamp") == 0
            finally:
                await b2.close()
    run(main)


def test_restarted_peer_is_found_by_steady_sending() -> None:
    """b restarts (a's session gone on its side, b has nothing to send) and
    a keeps sending, more often than KEEPALIVE + REKEY_TIMEOUT: nothing
    comes back, and a must handshake again, from its first unanswered send."""
    async def main() -> None:
        async with pair() as (a, b):
            await exchange(a, b, 2)
            b2 = await restart(b, a)
            try:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + WAIT
                got: list[bytes] = []
                seq = 100
                while not got:
                    if loop.time() > deadline:
                        pytest.fail(f"a never handshook again while sending steadily: "
                                    f"{a.device.stats()['handshakes']}", pytrace=False)
                    a.send(packet(a.v4, b2.v4, 120, seq))
                    seq += 1
                    await asyncio.sleep(FAST.new_handshake_after / 6)
                    got = b2.pending_packets()
                assert a.handshakes("initiations_sent") >= 2
                back = packet(b2.v4, a.v4, 130, 1)
                b2.send(back)
                assert await a.recv() == back
            finally:
                await b2.close()
    run(main)


def test_set_and_remove_peer_while_running() -> None:
    async def main() -> None:
        async with pair() as (a, b):
            await exchange(a, b, 1)
            a.device.remove_peer(b.public)
            assert a.device.peers() == []
            a.send(packet(a.v4, b.v4, 100, 1))        # no route now: dropped by the pump
            await until(lambda: a.drops().get("no_route", 0) >= 1,
                        "the packet without a route to be counted")
            # b's packets under the old session are refused (unknown index).
            b.send(packet(b.v4, a.v4, 100, 2))
            await until(lambda: a.drops().get("no_session", 0) >= 1,
                        "b's packet under a forgotten session to be counted")
            # Back, with a narrower prefix list set in one batch.
            with a.device.batch():
                a.device.add_peer(b.public, "b")
                a.device.set_peer(b.public, endpoint=("127.0.0.1", b.port),
                                  allowed_ips=[b.nets[0]], persistent_keepalive=0)
            data = packet(a.v4, b.v4, 100, 3)
            a.send(data)
            assert await b.recv() == data
            # an allowed IP moves between peers with add_allowed_ips
            other = noise.private_to_public(noise.generate_private_key())
            a.device.add_peer(other)
            a.device.set_peer(other, allowed_ips=["10.99.0.0/16"])
            a.device.set_peer(b.public, add_allowed_ips=["10.99.0.0/16", b.nets[1]])
            moved = ipaddress.ip_network("10.99.0.0/16")
            assert moved in a.device.peer_status(b.public).allowed_ips
            assert a.device.peer_status(other).allowed_ips == []
            with pytest.raises(ValueError):
                a.device.add_peer(a.public)               # our own key
            with pytest.raises(KeyError):
                a.device.set_peer(bytes(32), endpoint=None)
            with pytest.raises(ValueError):
                a.device.set_peer(b.public, persistent_keepalive=70000)
    run(main)


def test_peer_moving_port_is_followed() -> None:
    async def main() -> None:
        async with pair() as (a, b):
            await exchange(a, b, 1)
            old = a.port
            a.device.set_listen_port(0)           # rebind: a new port, sessions kept
            await a.device.rebound()
            assert a.port != old
            data = packet(a.v4, b.v4, 100, 5)
            a.send(data)                          # from the new port: b follows it
            assert await b.recv() == data
            await until(lambda: b.device.peer_status(a.public).endpoint == ("127.0.0.1", a.port),
                        "b to follow a to its new port")
            back = packet(b.v4, a.v4, 100, 6)
            b.send(back)
            assert await a.recv() == back
            assert a.handshakes("initiations_sent") + b.handshakes("initiations_sent") == 1
    run(main)


def test_listen_port_in_use_changes_nothing() -> None:
    async def main() -> None:
        async with pair() as (a, b):
            await exchange(a, b, 1)
            taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            taken.bind(("127.0.0.1", 0))
            try:
                port = a.port
                with pytest.raises(OSError) as raised:
                    a.device.set_listen_port(taken.getsockname()[1])
                assert raised.value.errno == errno.EADDRINUSE
                assert a.port == port
                await exchange(a, b, 1, seq=5)      # still on the old socket
            finally:
                taken.close()
    run(main)


def test_idle_sessions_expire_and_traffic_handshakes_again() -> None:
    timers = dataclasses.replace(FAST, rekey_after_time=0.5, reject_after_time=1.0)

    async def main() -> None:
        async with pair(timers) as (a, b):
            await exchange(a, b, 1)
            # no traffic: past REJECT_AFTER_TIME every session is cleared
            await until(lambda: a.device.stats()["timers"]["sessions_expired"] >= 1
                        and b.device.stats()["timers"]["sessions_expired"] >= 1,
                        "both ends to clear their expired sessions")
            for end in (a, b):
                sessions = end.device.table.info(end.device.table.ids()[0])["sessions"]
                assert set(sessions.values()) == {None}
            await exchange(a, b, 2, seq=20)         # staged, a new handshake, delivered
            assert a.drops() == {} and b.drops() == {}
    run(main)


def test_private_key_change_clears_sessions_and_refuses_own_key_peer() -> None:
    async def main() -> None:
        async with pair() as (a, b):
            await exchange(a, b, 1)
            info = a.device.table.info(a.device.table.ids()[0])
            assert info["sessions"]["current"] is not None
            # b's public key becomes ours: b is removed, not talked to.
            a.device.set_private_key(b.private)
            assert a.device.public_key == b.public and a.device.peers() == []
            a.device.set_private_key(a.private)
            assert a.device.public_key == a.public
    run(main)


def test_persistent_keepalive_and_passive_keepalive() -> None:
    async def main() -> None:
        async with pair() as (a, b):
            await exchange(a, b, 1)
            a.device.set_peer(b.public, persistent_keepalive=1)
            await until(lambda: a.device.stats()["timers"]["keepalives_sent"] >= 3,
                        "persistent keepalives")
            # data one way only: the receiver answers with a passive keepalive
            before = b.device.stats()["timers"]["keepalives_sent"]
            a.device.set_peer(b.public, persistent_keepalive=0)
            data = packet(a.v4, b.v4, 100, 1)
            a.send(data)
            assert await b.recv() == data
            await until(lambda: b.device.stats()["timers"]["keepalives_sent"] > before,
                        "b's passive keepalive")
    run(main)


def test_unanswered_handshake_retries_then_gives_up() -> None:
    timers = dataclasses.replace(FAST, rekey_attempt_time=1.5)

    async def main() -> None:
        load_fastpath()
        a = End("a", A_NETS, timers=timers)
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        try:
            await a.device.start()
            peer = noise.private_to_public(noise.generate_private_key())
            a.device.add_peer(peer)
            a.device.set_peer(peer, endpoint=silent.getsockname(), allowed_ips=B_NETS)
            for i in range(3):
                a.send(packet(a.v4, "10.9.0.2", 100, i))
            await until(lambda: a.handshakes("given_up") >= 1, "giving up")
            stats = a.device.stats()
            assert stats["handshakes"]["retransmits"] >= 1
            assert stats["staged"]["staged_dropped_gave_up"] == 3
            assert stats["staged"]["staged_queued"] == 3
        finally:
            await a.close()
            silent.close()
    run(main)


def test_stop_is_idempotent_and_wait_returns() -> None:
    async def main() -> None:
        load_fastpath()
        a = End("a", A_NETS)
        await a.device.start()
        assert a.port != 0
        waiter = asyncio.ensure_future(a.device.wait())
        await a.device.stop()
        await a.device.stop()
        assert (await asyncio.wait_for(waiter, WAIT)).reason == "stopped"
        await a.close()
    run(main)


def test_bind_dual_stack_reaches_ipv4_and_ipv6_peers() -> None:
    async def main() -> None:
        load_fastpath()
        a = End("a", A_NETS, bind="::")
        b = End("b", B_NETS, bind="127.0.0.1")
        try:
            await a.device.start()
            await b.device.start()
            connect(a, b)
            await exchange(a, b, 2)
        finally:
            await a.close()
            await b.close()
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    run(main)


def test_two_queues_share_the_port() -> None:
    async def main() -> None:
        load_fastpath()
        b = End("b", B_NETS)
        q0, d0 = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        q1, d1 = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        a_private = noise.generate_private_key()
        a = WireGuardDevice([d0.fileno(), d1.fileno()], private_key=a_private,
                            bind="127.0.0.1", timers=FAST)
        try:
            await a.start()
            await b.device.start()
            assert len(a.stats()["pumps"]) == 2
            a_public = noise.private_to_public(a_private)
            a.add_peer(b.public, "b")
            a.set_peer(b.public, allowed_ips=B_NETS, endpoint=("127.0.0.1", b.port))
            b.device.add_peer(a_public, "a")
            b.device.set_peer(a_public, allowed_ips=A_NETS, endpoint=("127.0.0.1", a.listen_port))
            for i, queue in enumerate((q0, q1, q0, q1)):
                data = packet(A_NETS[0].split("/")[0], b.v4, 100 + i, i)
                queue.send(data)               # from either queue, one session
                assert await b.recv() == data
            assert a.stats()["handshakes"]["completed"] == 1
        finally:
            await a.stop()
            await b.close()
            for s in (q0, d0, q1, d1):
                s.close()
    run(main)


def test_fwmark_is_set_on_the_sockets_while_running() -> None:
    async def main() -> None:
        load_fastpath()
        a = End("a", A_NETS)
        try:
            await a.device.start()
            try:
                a.device.set_fwmark(0x51)
            except PermissionError:
                pytest.skip("SO_MARK needs CAP_NET_ADMIN")
            assert a.device.fwmark == 0x51
            sock = a.device._socks[0]
            assert sock.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_MARK", 36)) == 0x51
            with pytest.raises(ValueError):
                a.device.set_fwmark(-1)
        finally:
            await a.close()
    run(main)


def test_from_config_builds_the_same_device() -> None:
    from tunrelay.wireguard.config import PeerConfig, WgConfig

    async def main() -> None:
        load_fastpath()
        b = End("b", B_NETS)
        a_private = noise.generate_private_key()
        test_end, dev_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        test_end.setblocking(False)
        try:
            await b.device.start()
            config = WgConfig(private_key=a_private, peers=(PeerConfig(
                public_key=b.public, endpoint=("127.0.0.1", b.port), name="b",
                allowed_ips=tuple(ipaddress.ip_network(n) for n in B_NETS),
                persistent_keepalive=25),))
            a = WireGuardDevice.from_config(config, [dev_end.fileno()], timers=FAST,
                                            bind="127.0.0.1")
            assert a.peers() == [b.public] and a.public_key == noise.private_to_public(a_private)
            status = a.peer_status(b.public)
            assert status.name == "b" and status.persistent_keepalive == 25
            assert status.endpoint == ("127.0.0.1", b.port) and status.last_handshake is None
            await a.start()
            b.device.add_peer(a.public_key, "a")   # type: ignore[arg-type]
            b.device.set_peer(a.public_key, allowed_ips=A_NETS)  # type: ignore[arg-type]
            data = packet(A_NETS[0].split("/")[0], b.v4, 100, 1)
            test_end.send(data)
            assert await b.recv() == data
            await a.stop()
        finally:
            await b.close()
            test_end.close()
            dev_end.close()
    run(main)


# ---------------------------------------------------------------- pure parts

def test_timers_validate() -> None:
    with pytest.raises(ValueError):
        Timers(rekey_after_time=200.0)
    with pytest.raises(ValueError):
        Timers(tick=0)
    t = Timers()
    assert t.new_handshake_after == 15.0 and t.rekey_on_receive_after == 165.0
    assert t.zero_keys_after == 540.0


def test_due_decisions() -> None:
    t = Timers()
    base = dict(has_endpoint=True, has_sessions=True, current_created=0.0, newest_session=0.0,
                current_initiator=True, last_handshake_completed=0.0)
    # sent without reply for 15 s: a new handshake; once it fired, only
    # data sent after that starts the timer again
    c = PeerClock(now=20.0, last_data_sent=4.0, last_seen=3.0, **base)
    assert Action.INITIATE in due(c, t)
    c.new_handshake_fired = 20.0
    assert Action.INITIATE not in due(c, t)
    # the first unanswered send counts, not the last
    c = PeerClock(now=20.0, last_data_sent=19.5, last_seen=3.0, unanswered_since=4.0, **base)
    assert Action.INITIATE in due(c, t)
    # not while an initiation is in flight
    c.attempt_started, c.retransmit_at = 18.0, 23.0
    assert Action.INITIATE not in due(c, t)
    # received data, sent nothing for 10 s: passive keepalive
    c = PeerClock(now=12.0, last_data_received=1.5, last_seen=1.5, last_data_sent=1.0, **base)
    assert due(c, t) == [Action.KEEPALIVE]
    c.last_keepalive_sent = 2.0
    assert due(c, t) == []
    # pending handshake: retransmit, then give up after 90 s
    c = PeerClock(now=6.0, attempt_started=0.0, retransmit_at=5.2, **base)
    assert Action.RETRANSMIT in due(c, t)
    c.now = 90.0
    assert Action.GIVE_UP in due(c, t) and Action.RETRANSMIT not in due(c, t)
    # every session past REJECT_AFTER_TIME: cleared
    c = PeerClock(now=181.0, **{**base, "last_handshake_completed": 0.0})
    assert Action.EXPIRE in due(c, t)
    c = PeerClock(now=541.0, **base)
    assert due(c, t) == [Action.ZERO]
    # the initiator of an old session that receives: rekeys at 165 s
    c = PeerClock(now=166.0, last_data_received=165.5, last_seen=165.5, last_data_sent=165.0,
                  last_keepalive_sent=165.9, **base)
    assert due(c, t) == [Action.INITIATE]
    c = dataclasses.replace(c, current_initiator=False)
    assert due(c, t) == []
    # persistent keepalive: after N s of silence; with no session, a handshake
    c = PeerClock(now=30.0, persistent_keepalive=25, last_seen=4.0, **base)
    assert due(c, t) == [Action.KEEPALIVE]
    c = PeerClock(now=30.0, persistent_keepalive=25, has_endpoint=True)
    assert due(c, t) == [Action.INITIATE]
    # nothing to do without an endpoint
    c = PeerClock(now=30.0, persistent_keepalive=25)
    assert due(c, t) == []


def steady_sender(timers: Timers, *, until: float, every: float = 0.5,
                  received: tuple[float, ...] = ()) -> list[float]:
    """Simulated times (no clock, no sockets) at which the timers start a
    new handshake for a peer we send data to every ``every`` s from 0 on and
    that answers only at the ``received`` times (keepalives: last_seen only),
    with the new-handshake timer carried from tick to tick the way the
    device does it (moved on each tick, stopped when it fires)."""
    clock = PeerClock(now=0.0, last_seen=-1.0, last_data_received=-1.0, has_endpoint=True,
                      has_sessions=True, current_created=-2.0, newest_session=-2.0,
                      current_initiator=True, last_handshake_completed=-2.0)
    fired = []
    step = 0
    while step * timers.tick <= until:
        now = clock.now = step * timers.tick
        clock.last_data_sent = (now // every) * every        # the table's newest send
        clock.last_seen = max([-1.0] + [r for r in received if r <= now])
        clock.unanswered_since = unanswered_since(clock)
        if Action.INITIATE in due(clock, timers):
            fired.append(now)
            clock.unanswered_since, clock.new_handshake_fired = None, now
        step += 1
    return fired


def test_new_handshake_counts_from_the_first_unanswered_send() -> None:
    # KEEPALIVE + REKEY_TIMEOUT shortened to 2 s, a send every 0.5 s, a peer
    # that never answers (restarted, our session gone): the timer runs from
    # the first send, however often we keep sending, and fires after 2 s
    # (plus at most one tick, the table showing only the newest send).
    t = dataclasses.replace(Timers(), keepalive_timeout=1.0, rekey_timeout=1.0, tick=0.25)
    assert t.new_handshake_after == 2.0
    fired = steady_sender(t, until=10.0)
    assert fired and t.new_handshake_after <= fired[0] <= t.new_handshake_after + t.tick
    # once fired it starts again from the next send: one per period, not per tick
    assert all(b - a >= t.new_handshake_after for a, b in zip(fired, fired[1:]))
    assert len(fired) >= 3
    # a keepalive received stops it: it runs again from the next send after it
    fired = steady_sender(t, until=10.0, received=(1.5, 3.0))
    assert fired and fired[0] >= 3.5 + t.new_handshake_after
    # a peer that answers within the period: never
    assert steady_sender(t, until=10.0, received=tuple(x * 1.5 for x in range(8))) == []


def test_new_handshake_timer_state() -> None:
    c = PeerClock(now=10.0, last_seen=1.0, last_data_sent=2.0)
    assert unanswered_since(c) == 2.0                # the first unanswered send seen
    c.unanswered_since, c.last_data_sent = 2.0, 9.0
    assert unanswered_since(c) == 2.0                # later sends do not move it
    c.last_seen = 5.0
    assert unanswered_since(c) == 9.0                # received: the next send restarts it
    c.last_seen = 9.5
    assert unanswered_since(c) is None               # answered, nothing sent since
    c = PeerClock(now=10.0, last_seen=1.0, last_data_sent=2.0, new_handshake_fired=3.0)
    assert unanswered_since(c) is None               # fired after that send
    c.last_initiation_received, c.last_seen = 2.5, None
    c.new_handshake_fired, c.unanswered_since = None, 2.0
    assert unanswered_since(c) is None               # a handshake message received counts


def test_source_buckets() -> None:
    now = [0.0]
    buckets = SourceBuckets(20.0, 5, max_sources=2, clock=lambda: now[0])
    assert [buckets.allow("192.0.2.1") for _ in range(6)] == [True] * 5 + [False]
    assert buckets.allow("::ffff:192.0.2.2")        # another source has its own
    assert not buckets.allow("192.0.2.3")           # full table of busy sources
    now[0] += 0.05                                  # one token back at 20/s
    assert buckets.allow("192.0.2.1") and not buckets.allow("192.0.2.1")
    now[0] += 5.0                                   # everyone refilled: swept
    assert buckets.allow("192.0.2.3") and len(buckets) == 1
