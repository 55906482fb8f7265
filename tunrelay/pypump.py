"""The pure-Python pump: the same interface and counters as the compiled
``Pump``, one packet per system call, ``select`` for waiting.

It is the reference the compiled pump is tested against (both run the same
suite) and the baseline the benchmarks measure it against.  It is slow on
purpose: clarity over speed.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
from typing import Literal, Self, cast

from . import counters
from ._runner import CLOSED, FATAL, PROTOCOL_ERROR, STOPPED, LoopRunner, Outcome, Reason
from .aead import CIPHERS, ROLES, Cipher, Role
from .errors import PumpArgumentError, PumpStateError
from .framing import (
    DEFAULT_MTU,
    FRAMINGS,
    IO_ENGINES,
    LEN16_HEADER,
    MAX_BATCH,
    MAX_MTU,
    MIN_MTU,
    MODES,
    Framing,
    IoEngine,
    Len16Parser,
    Mode,
    MssClamp,
    clamp_mss,
    len16_encode,
    max_frame,
    mss_clamps,
    validate,
)
from .pumps import Address, FileDescriptorLike, PumpStats

_DEVICE_GONE = (errno.EBADFD, errno.EBADF)


def _fileno(obj) -> int:
    return obj if isinstance(obj, int) else obj.fileno()


def _normalise(address, family: int):
    """(host, port[, flow, scope]) -> the address as this socket reports a
    sender: (host, port), or (host, port, 0, scope) for a scoped IPv6 one
    (link-local), as the compiled pump does."""
    host, port = address[0], int(address[1])
    scope = int(address[3]) if len(address) > 3 else 0
    if not 0 < port < 65536:  # as the compiled pump: port 0 cannot be sent to
        raise PumpArgumentError(f"peer port must be 1..65535, got {port}")
    if family == socket.AF_INET6 and ":" not in host:
        host = "::ffff:" + host
    if "%" in host:
        host, _, name = host.partition("%")
        scope = int(name) if name.isdigit() else socket.if_nametoindex(name)
    packed = socket.inet_pton(family, host)
    host = socket.inet_ntop(family, packed)
    return (host, port, 0, scope) if scope else (host, port)


def _sender(address, family: int):
    """recvfrom's address in the form _normalise gives."""
    if family == socket.AF_INET6 and address[3]:
        return address[0].partition("%")[0], address[1], 0, address[3]
    return address[:2]


def _read_failed(c: dict, exc: OSError) -> None:
    """A read/recv that failed with more than EAGAIN/EINTR: counted; the
    device (or fd) being gone ends the loop."""
    c["syscalls"] += 1
    c["errors"]["read"] += 1
    c["last_errno"] = exc.errno
    if exc.errno in _DEVICE_GONE:
        raise exc


class _Stop(Exception):
    """The stop signal fired while a loop was waiting."""


class PyPump:
    """See ``tunrelay._fastpath.Pump``: same constructor, methods, counters
    (a ``tunrelay.pumps.PumpLike``)."""

    _sock: socket.socket   # this pump's dup of the caller's socket fd

    def __init__(self, tun_fd: FileDescriptorLike, sock_fd: FileDescriptorLike, *,
                 framing: Framing | None = None, mode: Mode = "tun", mtu: int = DEFAULT_MTU,
                 batch: int = 64, peer: Address | None = None, offload: bool = False,
                 key: object = None, cipher: Cipher = CIPHERS[0], role: Role = ROLES[0],
                 gso: bool = True, peers: object = None, duplex: bool = False,
                 busy_poll_us: int = 0, io: IoEngine = "auto",
                 mss_clamp: MssClamp = None) -> None:
        # Same signature as the compiled Pump, so either is made by one call;
        # this pump sends one datagram per call (gso has no effect), and has
        # no TUN offloads, no aead framing (key, cipher and role) and no
        # peer tables: it is the reference for the point-to-point pump.
        if peers is not None:
            raise PumpArgumentError("the Python pump serves one peer: peers= needs the compiled Pump")
        if offload:
            raise PumpArgumentError("the Python pump has no TUN offloads: use the compiled Pump")
        if duplex or busy_poll_us:
            raise PumpArgumentError("the Python pump runs a sleeping thread per direction: "
                                    "duplex= and busy_poll_us= need the compiled Pump")
        if io not in IO_ENGINES:
            raise PumpArgumentError(f"io must be one of {IO_ENGINES}, got {io!r}")
        if io == "uring":
            raise PumpArgumentError('the Python pump has no io_uring engine (io "uring"): '
                                    'use the compiled Pump, or io "auto" or "syscalls"')
        if mode not in MODES:
            raise PumpArgumentError(f"mode must be one of {MODES}, got {mode!r}")
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise PumpArgumentError(f"mtu must be {MIN_MTU}..{MAX_MTU}, got {mtu}")
        if not 1 <= batch <= MAX_BATCH:
            raise PumpArgumentError(f"batch must be 1..{MAX_BATCH}, got {batch}")
        if key is not None and framing != "aead":
            raise PumpArgumentError(f"key is for framing 'aead', got framing {framing!r}")
        self.mode, self.mtu, self.batch = mode, mtu, batch
        self.duplex, self.busy_poll_us = False, 0
        self.mss_clamp = mss_clamps(mss_clamp, mtu)
        self._limit = max_frame(mode, mtu)
        self._tun_ref = tun_fd
        self._tun = _fileno(tun_fd)
        os.set_blocking(self._tun, False)
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._counters = {d: counters.empty_direction(d) for d in counters.DIRECTIONS}
        for direction in counters.DIRECTIONS:
            self._counters[direction]["last_errno"] = 0
        self._peer_lock = threading.Lock()
        self._runner = LoopRunner(self._run_direction, self._signal_stop,
                                  self._reset_stop, name="pypump")
        self.framing: Framing
        self._attach(sock_fd, framing, peer)

    # ------------------------------------------------------------ set-up

    def attach(self, sock_fd: FileDescriptorLike, *, peer: Address | None = None) -> None:
        """Swap in a new socket (a TCP reconnect) while stopped.  Counters
        carry on; a partial len16 frame of the old stream is discarded."""
        self._attach(sock_fd, self.framing, peer)

    def _attach(self, sock_fd, framing: Framing | None, peer) -> None:
        if self._runner.running:
            raise PumpStateError("attach() needs a stopped pump: stop() it first")
        self._sock_ref = sock_fd
        if getattr(self, "_sock", None) is not None:
            self._sock.close()
        # A socket object that does not own the fd: closing it is the caller's job.
        self._sock = socket.socket(fileno=os.dup(_fileno(sock_fd)))
        self._stream = self._sock.type == socket.SOCK_STREAM
        if framing is None:
            framing = "len16" if self._stream else "raw"
        if framing not in FRAMINGS:
            raise PumpArgumentError(f"framing must be one of {FRAMINGS}, got {framing!r}")
        if framing == "aead":
            raise PumpArgumentError("the Python pump has no aead framing: use the compiled Pump")
        if self._stream and framing != "len16":
            raise PumpArgumentError(f"a stream socket needs framing 'len16', got {framing!r}: "
                                    "raw has no packet boundaries")
        self.framing = framing
        self._parser = Len16Parser(self._limit)
        # TCP egress: the unsent rest of a record a stop interrupted; sent
        # first when the pump starts again on this connection, dropped with
        # the connection (see the compiled pump's keep_tail).
        self._tail: tuple[bytes, int] | None = None
        self._check_peer = self._learn_peer = False
        self._peer = None
        if self._stream:
            if peer is not None:
                raise PumpArgumentError("peer is for datagram sockets; a TCP socket is already connected")
            return
        if peer is not None:
            self._peer = _normalise(peer, self._sock.family)
            self._check_peer = True
            return
        try:
            self._sock.getpeername()
        except OSError:
            self._learn_peer = True

    def close(self) -> None:
        """Release the pump's own fds (its stop pipe and its dup of the
        socket); never the caller's.  Safe to call twice: a second close of
        a number the kernel has since reused would close someone else's fd."""
        fds, self._stop_r, self._stop_w = (self._stop_r, self._stop_w), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        self._sock.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------ running

    def _signal_stop(self) -> None:
        try:
            os.write(self._stop_w, b"x")
        except BlockingIOError:
            pass

    def _reset_stop(self) -> None:
        try:
            while os.read(self._stop_r, 64):
                pass
        except BlockingIOError:
            pass

    def _wait(self, c: dict, fd: int, writable: bool = False) -> None:
        """Block until fd is ready; raise _Stop when the stop signal fires."""
        while True:
            readers = [self._stop_r] if writable else [fd, self._stop_r]
            writers = [fd] if writable else []
            r, w, _ = select.select(readers, writers, [])
            c["syscalls"] += 1
            c["wakeups"] += 1
            if self._stop_r in r:
                raise _Stop
            if r or w:
                return

    def _run_direction(self, direction: str) -> Outcome:
        c = self._counters[direction]
        loop = self._egress if direction == "egress" else self._ingress
        try:
            loop(c)
        except _Stop:
            return Outcome(STOPPED, direction)
        except _Closed as closed:
            return Outcome(closed.reason, direction, closed.errno)
        except OSError as exc:
            return Outcome(FATAL, direction, exc.errno or 0)
        return Outcome(FATAL, direction)

    def _egress(self, c: dict) -> None:
        if self._tail is not None:
            (rest, length), self._tail = self._tail, None
            self._write_stream(c, memoryview(rest), length)
        while True:
            self._wait(c, self._tun)
            for _ in range(self.batch):
                try:
                    packet = os.read(self._tun, self._limit + 1)
                except BlockingIOError:
                    c["syscalls"] += 1
                    break
                except InterruptedError:
                    continue
                except OSError as exc:
                    _read_failed(c, exc)
                    break
                c["syscalls"] += 1
                if not packet:
                    raise OSError(0, "end of file on the device fd")
                c["tun_io"] += 1
                if len(packet) > self._limit:
                    c["drops"]["oversize"] += 1
                    continue
                self._send(c, self._clamp(c, packet))

    def _send(self, c: dict, packet: bytes) -> None:
        data = len16_encode(packet) if self.framing == "len16" else packet
        if self._stream:
            self._write_stream(c, memoryview(data), len(packet))
            return
        else:
            with self._peer_lock:
                peer = self._peer
            if (self._check_peer or self._learn_peer) and peer is None:
                c["drops"]["no_peer"] += 1
                return
            while True:
                try:
                    if peer is None:
                        self._sock.send(data)
                    else:
                        self._sock.sendto(data, peer)
                except (BlockingIOError, InterruptedError):
                    c["syscalls"] += 1
                    try:
                        self._wait(c, self._sock.fileno(), writable=True)
                    except _Stop:
                        c["drops"]["stopped"] += 1
                        raise
                    continue
                except OSError as exc:
                    c["syscalls"] += 1
                    c["errors"]["write"] += 1
                    c["drops"]["send_error"] += 1
                    c["last_errno"] = exc.errno
                    return
                break
            c["syscalls"] += 1
            c["batches"] += 1
        c["packets"] += 1
        c["bytes"] += len(packet)

    def _write_stream(self, c: dict, view: memoryview, packet_length: int) -> None:
        """Write one record.  Not sendall(): a peer that stops reading would
        block it for good and stop() could never end the loop.  A stop that
        comes when part of the record is out keeps the rest for the next
        start on this connection (never half a record, then another)."""
        whole = len(view)
        while view:
            try:
                sent = self._sock.send(view, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                c["syscalls"] += 1
                try:
                    self._wait(c, self._sock.fileno(), writable=True)
                except _Stop:
                    if len(view) < whole:
                        self._tail = (bytes(view), packet_length)
                    else:
                        c["drops"]["stopped"] += 1
                    raise
                continue
            except OSError as exc:
                c["syscalls"] += 1
                c["errors"]["disconnect"] += 1
                c["drops"]["disconnected"] += 1
                c["last_errno"] = exc.errno
                raise _Closed(CLOSED, exc.errno or 0) from exc
            c["syscalls"] += 1
            view = view[sent:]
        c["batches"] += 1
        c["packets"] += 1
        c["bytes"] += packet_length

    def _ingress(self, c: dict) -> None:
        sock = self._sock
        while True:
            self._wait(c, sock.fileno())
            if self._stream:
                self._ingress_stream(c)
                continue
            try:
                data, sender = sock.recvfrom(LEN16_HEADER + self._limit + 1)
            except (BlockingIOError, InterruptedError):
                c["syscalls"] += 1
                continue
            except OSError as exc:
                _read_failed(c, exc)
                continue
            c["syscalls"] += 1
            c["batches"] += 1
            if sender is not None and not isinstance(sender, str):
                sender = _sender(sender, self._sock.family)
            with self._peer_lock:
                peer = self._peer
            if self._check_peer or (self._learn_peer and peer is not None):
                if sender != peer:
                    c["drops"]["not_peer"] += 1
                    continue
            if len(data) > LEN16_HEADER + self._limit:
                c["drops"]["oversize"] += 1
                continue
            if self.framing == "len16":
                if len(data) <= LEN16_HEADER or int.from_bytes(data[:2], "big") != len(data) - 2:
                    c["drops"]["bad_frame"] += 1
                    continue
                data = data[LEN16_HEADER:]
            reason = validate(data, self.mode, self._limit)
            if reason:
                c["drops"][reason] += 1
                continue
            if self._learn_peer and peer is None:
                with self._peer_lock:
                    self._peer = sender
            self._write_tun(c, self._clamp(c, data))

    def _ingress_stream(self, c: dict) -> None:
        try:
            data = self._sock.recv(256 * 1024, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            c["syscalls"] += 1
            return
        except OSError as exc:
            c["syscalls"] += 1
            c["errors"]["disconnect"] += 1
            c["last_errno"] = exc.errno
            raise _Closed(CLOSED, exc.errno or 0) from exc
        c["syscalls"] += 1
        if not data:
            c["errors"]["disconnect"] += 1
            raise _Closed(CLOSED, 0)
        c["batches"] += 1
        frames, bad = self._parser.feed(data)
        for frame in frames:
            reason = validate(frame, self.mode, self._limit)
            if reason:
                c["drops"][reason] += 1
                continue
            self._write_tun(c, self._clamp(c, frame))
        if bad:
            c["drops"]["bad_frame"] += 1
            c["errors"]["disconnect"] += 1
            raise _Closed(PROTOCOL_ERROR, 0)

    def _clamp(self, c: dict, packet: bytes) -> bytes:
        """MSS clamping (framing.clamp_mss), counted."""
        if not any(self.mss_clamp):
            return packet
        clamped = clamp_mss(packet, *self.mss_clamp, mode=self.mode)
        if clamped is None:
            return packet
        c["mss_clamped"] += 1
        return clamped

    def _write_tun(self, c: dict, packet: bytes) -> None:
        while True:
            try:
                os.write(self._tun, packet)
            except InterruptedError:
                continue
            except BlockingIOError:
                c["syscalls"] += 1
                self._wait(c, self._tun, writable=True)
                continue
            except OSError as exc:
                c["syscalls"] += 1
                c["errors"]["write"] += 1
                c["last_errno"] = exc.errno
                if exc.errno in _DEVICE_GONE:
                    raise
                c["drops"]["tun_write"] += 1
                return
            break
        c["syscalls"] += 1
        c["tun_io"] += 1
        c["packets"] += 1
        c["bytes"] += len(packet)

    def start(self) -> None:
        self._runner.start()

    def request_stop(self) -> None:
        self._signal_stop()

    def stop(self, timeout: float | None = None) -> Outcome | None:
        return self._runner.stop(timeout)

    def wait(self, timeout: float | None = None) -> Outcome | None:
        return self._runner.wait(timeout)

    def run(self) -> Outcome:
        self.start()
        return cast(Outcome, self.wait())   # no timeout: only once both loops ended

    @property
    def running(self) -> bool:
        return self._runner.running

    def stats(self) -> PumpStats:
        return cast(PumpStats, {d: {k: (dict(v) if isinstance(v, dict) else v) for k, v in c.items()}
                                for d, c in self._counters.items()})

    @property
    def peer(self) -> Address | None:
        if self._stream or not (self._check_peer or self._learn_peer):
            return None
        with self._peer_lock:
            return self._peer

    @property
    def learns_peer(self) -> bool:
        return self._learn_peer

    @property
    def io(self) -> Literal["uring", "syscalls"]:
        """The TUN I/O engine: a read or write per packet, always."""
        return "syscalls"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Closed(Exception):
    def __init__(self, reason: Reason, err: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.errno = err
