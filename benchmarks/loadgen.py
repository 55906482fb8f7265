"""A load generator and a drain for the pump micro benchmarks, at C speed.

A Python loop calling ``send()`` once per packet costs about as much per
packet as the pump under test, so it would measure itself.  Here one
``sendmmsg``/``recvmmsg`` call (libc through ctypes, on pre-built
``mmsghdr`` arrays) moves ``BATCH`` packets: the per-packet cost is the
kernel's alone.  Both run in a child process (``python -m
benchmarks.loadgen``) so that they never hold the benchmark process's GIL,
which the pure-Python pump needs.

    python -m benchmarks.loadgen send FD SIZE   # write SIZE-byte IPv4 packets to FD until killed
    python -m benchmarks.loadgen drain FD       # read and discard packets from FD until killed

FD is a blocking socket inherited from the parent (a SOCK_SEQPACKET end or
a connected UDP socket): sendmmsg on a full SOCK_SEQPACKET blocks, so the
generator never runs ahead of the pump and nothing is lost on that side.
"""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import sys

BATCH = 256

_libc = ctypes.CDLL(None, use_errno=True)


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_Iovec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


_libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.POINTER(_Mmsghdr), ctypes.c_uint, ctypes.c_int]
_libc.recvmmsg.argtypes = [ctypes.c_int, ctypes.POINTER(_Mmsghdr), ctypes.c_uint, ctypes.c_int,
                           ctypes.c_void_p]
MSG_WAITFORONE = 0x10000
PR_SET_PDEATHSIG = 1


def ipv4_packet(size: int, seq: int = 0) -> bytes:
    """A well-formed IPv4/UDP packet of exactly ``size`` bytes (the pump
    validates the version nibble and the length field on the way in)."""
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, seq & 0xFFFF, 0, 64, 17, 0,
                         bytes((10, 99, 0, 2)), bytes((10, 99, 0, 1)))
    return header + bytes(size - len(header))


class Batch:
    """``BATCH`` message headers over ``BATCH`` buffers of ``size`` bytes,
    built once; ``packet`` fills the buffers for sending."""

    def __init__(self, size: int, packet: bytes | None = None) -> None:
        self.buffers = ctypes.create_string_buffer(size * BATCH)
        if packet is not None:
            ctypes.memmove(self.buffers, packet * BATCH, size * BATCH)
        self.iov = (_Iovec * BATCH)()
        self.msgs = (_Mmsghdr * BATCH)()
        base = ctypes.addressof(self.buffers)
        for i in range(BATCH):
            self.iov[i].iov_base = base + i * size
            self.iov[i].iov_len = size
            self.msgs[i].msg_hdr.msg_iov = ctypes.pointer(self.iov[i])
            self.msgs[i].msg_hdr.msg_iovlen = 1


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def send_forever(fd: int, size: int) -> None:
    batch = Batch(size, ipv4_packet(size))
    sendmmsg, msgs = _libc.sendmmsg, batch.msgs
    while True:
        _check(sendmmsg(fd, msgs, BATCH, 0), "sendmmsg")


def drain_forever(fd: int, size: int = 65536) -> None:
    batch = Batch(size)
    recvmmsg, msgs = _libc.recvmmsg, batch.msgs
    while _check(recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, None), "recvmmsg"):
        pass  # 0 messages: end of file, the other end is closed


def die_with_parent() -> None:
    """A generator left running would load the machine for good."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        sys.exit(0)


def main(argv: list[str]) -> int:
    die_with_parent()
    try:
        if argv[0] == "send":
            send_forever(int(argv[1]), int(argv[2]))
        elif argv[0] == "drain":
            drain_forever(int(argv[1]))
        else:
            raise IndexError
    except IndexError:
        print(__doc__, file=sys.stderr)
        return 2
    except (ConnectionError, KeyboardInterrupt):
        return 0  # the other end went away: the benchmark is over
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
