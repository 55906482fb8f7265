"""One end of the toy VPN: a Pump with framing "session", its PeerTable
(one peer: the other end) and the toy handshake (handshake.py) on an
asyncio loop through tunrelay.aio.AsyncPump.

Who does what:

* The initiator knows the responder's endpoint.  It sends INIT on start,
  when its table asks for renewal (event "renew": no session to send
  with, or ``rekey_after_messages`` / ``rekey_after_time`` reached), when
  the responder sends REKEY, and every ``rekey_interval`` s if given.  On
  RESP it installs the session with ``initiator=True``: current at once.
* The responder answers INIT with RESP and installs the session with
  ``initiator=False`` (next), which the data path promotes to current
  when the initiator's first datagram under it authenticates.  Until then
  both ends still take the old session, so a rekey loses no packet.  Its
  own renew events become a REKEY to the initiator.  Its very first
  session (there is no old one) is current at once, and the INIT's source
  is the endpoint until data roams it.
* An INIT that arrives while the responder still has an unconfirmed next
  session waits for its promotion (at most ``confirm_timeout`` s):
  answering it at once would replace that session while the initiator
  may be sending under it.

``tun`` is a TUN fd (tunrelay.open_tun) or, in tests and the demo, one
end of a SOCK_SEQPACKET socketpair; ``sock`` a bound UDP socket.  The
caller owns both and closes them after the node stopped.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Self

from tunrelay import Event, Outcome, PeerTable, Pump
from tunrelay.aio import AsyncPump
from tunrelay.pumps import Address, FileDescriptorLike

from . import handshake

log = logging.getLogger("toyvpn")


class Node:
    def __init__(self, tun: FileDescriptorLike, sock: FileDescriptorLike, *,
                 initiator: bool, peer_ips: Iterable[str], endpoint: Address | None = None,
                 psk: bytes | None = None, rekey_after_messages: int | None = None,
                 rekey_after_time: float | None = None, rekey_interval: float | None = None,
                 retry: float = 0.5, attempts: int = 20, confirm_timeout: float = 1.0,
                 mtu: int = 1400, name: str = "") -> None:
        if initiator and endpoint is None:
            raise ValueError("the initiator needs the responder's endpoint")
        self.initiator = initiator
        self.name = name or ("initiator" if initiator else "responder")
        self.psk = psk
        self.rekey_interval = rekey_interval
        self.retry, self.attempts, self.confirm_timeout = retry, attempts, confirm_timeout
        self.table = PeerTable(rekey_after_messages=rekey_after_messages,
                               rekey_after_time=rekey_after_time)
        self.peer = self.table.add("peer", endpoint=endpoint, allowed_ips=list(peer_ips))
        self.pump = Pump(tun, sock, framing="session", peers=self.table, mtu=mtu)
        self.handshakes = 0            # sessions installed
        self.promotions = 0
        self.initiations: collections.Counter[str] = collections.Counter()   # by reason
        self.ap: AsyncPump | None = None           # while running
        self._ready: asyncio.Event | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._remote: dict[int, int] = {}          # our index -> theirs, live sessions
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._closing = False
        # initiator
        self._pending: handshake.Initiation | None = None
        self._tries = 0
        # responder
        self._answered: tuple[bytes, bytes] | None = None     # (last INIT, its RESP)
        self._deferred: tuple[bytes, Address] | None = None
        self._asked_for: int | None = None

    # ------------------------------------------------------------ running

    async def __aenter__(self) -> Self:
        self._ready = asyncio.Event()
        self.ap = AsyncPump(self.pump, peers=self.table)
        self.ap.on("control", self._on_control)
        self.ap.on("renew", self._on_renew)
        self.ap.on("promoted", self._on_promoted)
        self.ap.on("endpoint", lambda e: log.info("%s: peer now at %s", self.name, e.address))
        await self.ap.start()
        if self.initiator:
            self._initiate("start")
            if self.rekey_interval:
                self._every(self.rekey_interval)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    async def stop(self) -> Outcome | None:
        self._closing = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        return await self.ap.stop() if self.ap is not None else None

    async def wait(self) -> Outcome:
        """Until the pump ends by itself (the device or socket failed)."""
        assert self.ap is not None, "not started"
        return await self.ap.wait()

    async def ready(self) -> None:
        """Until a session is current (this end can send)."""
        assert self._ready is not None, "not started"
        await self._ready.wait()

    async def installed(self, count: int) -> None:
        """Until ``count`` sessions were installed in all."""
        if self.handshakes < count:
            future = asyncio.get_running_loop().create_future()
            self._waiters.append((count, future))
            await future

    def sessions(self) -> dict[str, int | None]:
        """Local indexes of the current, previous and next session."""
        sessions: dict[str, int | None] = self.table.info(self.peer)["sessions"]
        return sessions

    # ------------------------------------------------------------ helpers

    def _send(self, address: Address | None, data: bytes) -> None:
        if address is None or self.ap is None:
            return
        try:
            self.ap.send_control(address, data)
        except OSError as exc:         # a full socket buffer: the retry sends again
            log.warning("%s: control message not sent: %s", self.name, exc)

    def _later(self, key: str, delay: float, callback: Callable[[], None]) -> None:
        self._cancel(key)
        self._timers[key] = asyncio.get_running_loop().call_later(delay, callback)

    def _cancel(self, key: str) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def _new_index(self) -> int:
        live = {i for i in self.sessions().values() if i is not None}
        while True:
            index = secrets.randbits(32)
            if index not in live:
                return index

    def _install(self, session: handshake.Session, *, current: bool) -> None:
        self.table.install_session(self.peer, local_index=session.local_index,
                                   remote_index=session.remote_index, send_key=session.send_key,
                                   recv_key=session.recv_key, initiator=current)
        self._remote[session.local_index] = session.remote_index
        live = set(self.sessions().values())
        self._remote = {k: v for k, v in self._remote.items() if k in live}
        self.handshakes += 1
        log.info("%s: session %08x installed (%s)", self.name, session.local_index,
                 "current" if current else "next")
        if current and self._ready is not None:
            self._ready.set()
        for count, future in self._waiters:
            if count <= self.handshakes and not future.done():
                future.set_result(None)
        self._waiters = [w for w in self._waiters if not w[1].done()]

    # ------------------------------------------------------------ events

    def _on_control(self, event: Event) -> None:
        data, address = event.data, event.address
        if self._closing or not data or address is None:
            return
        if not self.initiator and data[0] == handshake.INIT:
            self._on_init(data, address)
        elif self.initiator and data[0] == handshake.RESP:
            self._on_response(data)
        elif self.initiator and data[0] == handshake.REKEY:
            if handshake.parse_rekey(data) == self.sessions()["current"]:
                self._initiate("the responder asked")
        else:
            log.debug("%s: ignored control message %r from %s", self.name, data[:8], address)

    def _on_renew(self, event: Event) -> None:
        if self._closing:
            return
        if self.initiator:
            self._initiate("renew")
            return
        # Responder: ask the initiator, once per session.
        current = self.sessions()["current"]
        if current is None or current == self._asked_for or current not in self._remote:
            return
        self._asked_for = current
        self._send(self.table.info(self.peer)["endpoint"], handshake.rekey(self._remote[current]))

    def _on_promoted(self, event: Event) -> None:
        self.promotions += 1
        if self._deferred is not None and not self._closing:
            data, address = self._deferred
            self._deferred = None
            self._cancel("deferred")
            self._answer(data, address)

    # ------------------------------------------------------------ initiator

    def _initiate(self, why: str) -> None:
        if self._pending is not None:
            return
        log.info("%s: handshake (%s)", self.name, why)
        self.initiations[why] += 1
        self._pending = handshake.Initiation(self._new_index())
        self._tries = 0
        self._send_init()

    def _send_init(self) -> None:
        if self._pending is None or self._closing:
            return
        if self._tries == self.attempts:
            log.warning("%s: no answer to %d INITs; waiting for the next renew", self.name,
                        self._tries)
            self._pending = None
            return
        self._tries += 1
        self._send(self.table.info(self.peer)["endpoint"], self._pending.message)
        self._later("retry", self.retry, self._send_init)

    def _on_response(self, data: bytes) -> None:
        if self._pending is None:
            return
        session = self._pending.finish(data, self.psk)
        if session is None:
            return
        self._pending = None
        self._cancel("retry")
        self._install(session, current=True)

    def _every(self, interval: float) -> None:
        def tick() -> None:
            self._initiate("timer")
            self._later("interval", interval, tick)
        self._later("interval", interval, tick)

    # ------------------------------------------------------------ responder

    def _on_init(self, data: bytes, address: Address) -> None:
        if self._answered is not None and data == self._answered[0]:
            self._send(address, self._answered[1])      # our RESP was lost
        elif self._deferred is not None and data == self._deferred[0]:
            pass                                        # a retry of the waiting one
        elif self.sessions()["next"] is not None:
            log.info("%s: INIT waits for the next session's confirmation", self.name)
            self._deferred = (data, address)
            self._later("deferred", self.confirm_timeout, self._answer_deferred)
        else:
            self._answer(data, address)

    def _answer_deferred(self) -> None:
        self._timers.pop("deferred", None)
        if self._deferred is not None and not self._closing:
            data, address = self._deferred
            self._deferred = None
            self._answer(data, address)

    def _answer(self, data: bytes, address: Address) -> None:
        answer = handshake.respond(data, self._new_index(), self.psk)
        if answer is None:
            return
        session, response = answer
        first = self.sessions()["current"] is None
        if first:
            self.table.update(self.peer, endpoint=address)
        self._install(session, current=first)
        self._answered = (data, response)
        self._send(address, response)
