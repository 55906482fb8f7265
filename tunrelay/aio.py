"""asyncio for embedders: ``AsyncPump`` runs pumps and a PeerTable's
control channel on an event loop.  The thread API stays as it is; this
module only drives it.

    async with AsyncPump(pump_a, pump_b, peers=table) as ap:
        ap.on("renew", start_handshake)          # sync or async callbacks
        async for event in ap.events():          # or an async iterator
            ...
        outcome = await ap.wait()                # the first pump that ended

Design
------
Nothing here blocks the event loop, and nothing polls:

* **Outcomes.**  Entering starts every pump (``start()`` only spawns its
  two threads).  One watcher thread per pump blocks in ``pump.wait()``
  and hands the outcome to the loop with ``call_soon_threadsafe``: that
  thread is the bridge from the pump's threads to a future.  ``wait()``
  awaits the first outcome.  ``stop()`` (and leaving the ``async with``)
  calls ``request_stop()`` on every pump, a single eventfd write, and
  awaits the watchers, which join the pump threads off the loop.
* **Events.**  With ``peers=``, the table's eventfd is registered with
  ``loop.add_reader``.  When it is readable the loop thread calls
  ``take()`` and dispatches each Event: first to the callbacks registered
  with ``on()``, then into the queue that ``events()`` iterates.  So the
  table is touched from Python by the loop thread only, as PeerTable
  requires (one control plane per table): change it from callbacks or
  tasks on the same loop.  When every pump has ended, one last ``take()``
  delivers what they left, the reader is removed and ``events()`` ends.
* **The bound.**  The event queue holds at most ``queue_size`` control
  datagrams: when the consumer falls behind a flood, the oldest control
  event goes and ``dropped_events`` counts it (the data path itself
  already bounds the table's queue: ``control_slots``, drop reason
  ``control_full``).  Endpoint, renew and promoted events are never
  dropped; one that still waits is merged with a newer one of the same
  kind and peer (the newer takes its place, with its address), so they
  number at most three per peer however slow the consumer.  That policy
  is why the queue is a small class of its own rather than an
  ``asyncio.Queue``, which can only refuse the newest item when full.
* **Callbacks.**  A sync callback runs inside the reader; an async one
  (a coroutine function, or any callback returning an awaitable) becomes
  a task.  An exception in either is logged through ``logging`` (logger
  ``tunrelay.aio``), never raised into the reader.  Tasks still running
  when the AsyncPump stops are cancelled.

An AsyncPump runs once: make a new one (with the same pumps, once they
stopped) to start again.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self, get_args, runtime_checkable

from ._runner import Outcome, Reason
from .errors import PumpArgumentError, PumpStateError
from .pumps import Address, PumpLike

if TYPE_CHECKING:
    # The compiled module loads only when a table is used: an AsyncPump of
    # pure-Python pumps works where the extension did not build.
    from ._fastpath import Event, PeerTable

__all__ = ["AsyncPump", "EventKind", "EventCallback", "EventQueue"]

log = logging.getLogger(__name__)

#: The kinds of ``tunrelay._fastpath.Event``.
EventKind = Literal["control", "endpoint", "renew", "promoted", "staged"]
KINDS: tuple[str, ...] = get_args(EventKind)

#: What ``AsyncPump.on()`` takes: called with each Event of its kind; may
#: return an awaitable (an ``async def``), which then runs as a task.
EventCallback = Callable[["Event"], Awaitable[object] | None]


@runtime_checkable
class _SendsControl(Protocol):
    def send_control(self, address: Address, data: bytes | bytearray | memoryview) -> None: ...


class EventQueue:
    """The queue behind ``AsyncPump.events()``: at most ``limit`` control
    events (the oldest dropped and counted in ``dropped``), and at most one
    waiting event per (kind, peer) of the others, merged, never dropped.
    Events come out in the order they went in (a merged event at the
    place of the newer one).  Any number of tasks may iterate it; each
    event goes to one of them.  Iteration ends once ``close()`` was called
    and the queue is empty.  Loop thread only."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise PumpArgumentError(f"queue_size must be at least 1, got {limit}")
        self.limit = limit
        self.dropped = 0
        self._control: collections.deque[tuple[int, Event]] = collections.deque()
        self._peers: dict[tuple[str, int | None], tuple[int, Event]] = {}
        self._seq = 0
        self._closed = False
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._control) + len(self._peers)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, event: Event) -> None:
        if self._closed:
            return
        self._seq += 1
        if event.kind == "control":
            if len(self._control) >= self.limit:
                self._control.popleft()
                self.dropped += 1
            self._control.append((self._seq, event))
        else:
            key = (event.kind, event.peer)
            self._peers.pop(key, None)      # a dict keeps insertion order:
            self._peers[key] = (self._seq, event)   # the merged one moves last
        self._ready.set()

    def get_nowait(self) -> Event | None:
        """The oldest waiting event, or None."""
        control = self._control[0] if self._control else None
        peer = next(iter(self._peers.items()), None)
        if peer is not None and (control is None or peer[1][0] < control[0]):
            del self._peers[peer[0]]
            return peer[1][1]
        if control is not None:
            self._control.popleft()
            return control[1]
        return None

    async def get(self) -> Event | None:
        """The oldest event, waiting for one; None once closed and empty."""
        while True:
            event = self.get_nowait()
            if event is not None or self._closed:
                return event
            self._ready.clear()
            await self._ready.wait()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        event = await self.get()
        if event is None:
            raise StopAsyncIteration
        return event


class AsyncPump:
    """Runs ``pumps`` (``PumpLike``: the compiled ``Pump`` or ``PyPump``)
    and, with ``peers``, the PeerTable they share, on the running event
    loop.  ``queue_size`` bounds the control events waiting in
    ``events()``.  See the module docstring for the design."""

    #: The AsyncPump draining each table (by id) now: two readers of one
    #: eventfd would steal each other's events.  Weak: one that was
    #: dropped without stop() does not hold its table forever.
    _readers: weakref.WeakValueDictionary[int, AsyncPump] = weakref.WeakValueDictionary()

    def __init__(self, *pumps: PumpLike, peers: PeerTable | None = None,
                 queue_size: int = 1024) -> None:
        if not pumps:
            raise PumpArgumentError("AsyncPump needs at least one pump")
        if len(set(map(id, pumps))) != len(pumps):
            raise PumpArgumentError("AsyncPump was given the same pump twice")
        if peers is not None:
            for pump in pumps:
                theirs = getattr(pump, "peers", None)
                if theirs is not peers:
                    raise PumpArgumentError(
                        f"peers= must be the PeerTable every pump routes by; {pump!r} has "
                        f"{'none' if theirs is None else 'another one'}")
        self._pumps = pumps
        self._peers = peers
        self._queue = EventQueue(queue_size)
        self._callbacks: dict[str, list[EventCallback]] = {kind: [] for kind in KINDS}
        self._tasks: set[asyncio.Future[object]] = set()
        self._stoppers: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ended: list[asyncio.Future[Outcome]] = []
        self._first: asyncio.Future[Outcome] | None = None
        self._reading = False
        self._finished = False

    # ------------------------------------------------------------ state

    @property
    def pumps(self) -> tuple[PumpLike, ...]:
        return self._pumps

    @property
    def peers(self) -> PeerTable | None:
        return self._peers

    @property
    def running(self) -> bool:
        """Started, and not every pump has ended yet."""
        return self._first is not None and not self._finished

    @property
    def outcomes(self) -> list[Outcome | None]:
        """Each pump's outcome, None while it runs (or before start)."""
        if not self._ended:
            return [None] * len(self._pumps)
        return [f.result() if f.done() and f.exception() is None else None for f in self._ended]

    @property
    def dropped_events(self) -> int:
        """Control events dropped from the ``events()`` queue (the oldest
        first) because its consumer fell behind (or there is none: an
        AsyncPump used with callbacks only counts all but the last
        ``queue_size`` control events here)."""
        return self._queue.dropped

    @property
    def reading(self) -> bool:
        """True while the table's fd is registered with the loop."""
        return self._reading

    # ------------------------------------------------------------ start, wait, stop

    async def start(self) -> None:
        """Start every pump, the watchers and (with peers) the reader.  If
        a pump refuses to start, the ones started are stopped again and
        the error is raised."""
        if self._first is not None:
            raise PumpStateError("this AsyncPump was started already; make a new one")
        loop = asyncio.get_running_loop()
        if self._peers is not None:
            other = AsyncPump._readers.get(id(self._peers))
            if other is not None and other._reading and not (
                    other._loop is not None and other._loop.is_closed()):
                raise PumpStateError("another AsyncPump reads this PeerTable's events")
        started: list[PumpLike] = []
        try:
            for pump in self._pumps:
                pump.start()
                started.append(pump)
        except BaseException:
            for pump in started:
                pump.request_stop()
            # Join them off the loop, as stop() would.
            await asyncio.gather(*(self._in_thread(loop, pump.wait) for pump in started))
            raise
        self._loop = loop
        self._first = loop.create_future()
        self._ended = [self._in_thread(loop, pump.wait, f"asyncpump-wait-{n}")
                       for n, pump in enumerate(self._pumps)]
        for future in self._ended:
            future.add_done_callback(self._pump_ended)
        if self._peers is not None:
            AsyncPump._readers[id(self._peers)] = self
            loop.add_reader(self._peers.fileno(), self._readable)
            self._reading = True

    async def wait(self) -> Outcome:
        """The outcome of the first pump that ended (the others may still
        run: ``stop()`` them, or leave the ``async with``)."""
        if self._first is None:
            raise PumpStateError("AsyncPump.wait() before start()")
        return await asyncio.shield(self._first)

    async def stop(self, timeout: float | None = None) -> Outcome | None:
        """Signal every pump to stop and wait (off the loop) until all have
        ended; returns ``wait()``'s outcome, or None if some pump did not
        end within ``timeout`` s (its fds must then stay open).  Callback
        tasks still running are cancelled, except the one calling stop().
        Calling it again is fine."""
        if self._first is None:
            raise PumpStateError("AsyncPump.stop() before start()")
        current = asyncio.current_task()
        if current is not None:
            self._stoppers.add(current)
        for pump in self._pumps:
            pump.request_stop()
        done, pending = await asyncio.wait(self._ended, timeout=timeout)
        if pending:
            return None
        for future in self._ended:      # each a no-op once its callback ran
            self._pump_ended(future)
        # Callback tasks were cancelled; wait for them to end, but not for
        # one that is in stop() itself (two such would wait for each other).
        others = [task for task in self._tasks if task not in self._stoppers]
        if others:
            await asyncio.gather(*others, return_exceptions=True)
        return self._first.result()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    @staticmethod
    def _in_thread(loop: asyncio.AbstractEventLoop, blocking: Callable[[], Outcome | None],
                   name: str = "asyncpump-join") -> asyncio.Future[Outcome]:
        """Run ``blocking`` in a thread of its own (not the default executor:
        a pump's wait() may take forever and must not hold one of its few
        workers) and return a future of its result."""
        future: asyncio.Future[Outcome] = loop.create_future()

        def settle(result: Outcome | None, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result if result is not None else Outcome(Reason.STOPPED))

        def body() -> None:
            result: Outcome | None = None
            error: BaseException | None = None
            try:
                result = blocking()
            except BaseException as exc:   # delivered to the awaiting task
                error = exc
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:           # the loop is closed: nobody awaits
                pass

        threading.Thread(target=body, name=name, daemon=True).start()
        return future

    def _pump_ended(self, future: asyncio.Future[Outcome]) -> None:
        assert self._first is not None
        if not self._first.done():
            error = future.exception()   # watchers are never cancelled
            if error is not None:
                self._first.set_exception(error)
            else:
                self._first.set_result(future.result())
        if all(f.done() for f in self._ended):
            self._finish()

    def _finish(self) -> None:
        """Every pump has ended: deliver what the table still holds, remove
        the reader, end events(), cancel the callback tasks."""
        if self._finished:
            return
        self._finished = True
        if self._peers is not None and self._reading:
            self._readable()
            assert self._loop is not None
            self._loop.remove_reader(self._peers.fileno())
            self._reading = False
            if AsyncPump._readers.get(id(self._peers)) is self:
                del AsyncPump._readers[id(self._peers)]
        self._queue.close()
        for task in self._tasks:
            if task not in self._stoppers:   # a callback that called stop() carries on
                task.cancel()

    # ------------------------------------------------------------ events

    def on(self, kind: EventKind, callback: EventCallback) -> Callable[[], None]:
        """Call ``callback(event)`` for each Event of ``kind``; returns a
        function that unregisters it (as ``off()`` does)."""
        if kind not in self._callbacks:
            raise PumpArgumentError(f"event kind must be one of {', '.join(KINDS)}; got {kind!r}")
        self._callbacks[kind].append(callback)
        return lambda: self.off(kind, callback)

    def off(self, kind: EventKind, callback: EventCallback) -> None:
        """Unregister a callback (nothing happens if it is not registered)."""
        try:
            self._callbacks[kind].remove(callback)
        except (KeyError, ValueError):
            pass

    def events(self) -> EventQueue:
        """An async iterator over the events from start() on; it ends when
        every pump has ended and what they left was taken."""
        return self._queue

    def send_control(self, address: Address, data: bytes | bytearray | memoryview) -> None:
        """One control datagram through the first pump's socket (the port
        the peers know).  Never blocks: a full socket buffer raises
        OSError (EAGAIN); control traffic is not queued."""
        pump = self._pumps[0]
        if not isinstance(pump, _SendsControl):
            raise PumpArgumentError(f"{type(pump).__name__} has no send_control()")
        pump.send_control(address, data)

    def _readable(self) -> None:
        """The loop's reader: drain the table and dispatch."""
        assert self._peers is not None
        try:
            events = self._peers.take()
        except Exception:
            log.exception("AsyncPump: PeerTable.take() failed")
            return
        for event in events:
            self._dispatch(event)

    def _dispatch(self, event: Event) -> None:
        for callback in tuple(self._callbacks.get(event.kind, ())):
            try:
                result = callback(event)
            except Exception:
                log.exception("AsyncPump: %s callback %r failed", event.kind, callback)
                continue
            if inspect.isawaitable(result):
                task: asyncio.Future[object] = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._task_done)
        self._queue.put(event)

    def _task_done(self, task: asyncio.Future[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("AsyncPump: an event callback failed", exc_info=task.exception())
