"""Shared test fixtures: both pumps, and packets to feed them.

Every pump test runs against the compiled pump (the product), with each of
its TUN I/O engines (io "syscalls" and "uring"), and its pure-Python twin
(the reference).  The compiled module must be built: if it
is missing the pump tests fail, they are never skipped.
"""

from __future__ import annotations

import importlib
import struct

import pytest

BUILD_HINT = "build it: .venv/bin/python setup.py build_ext --inplace -q"


def load_fastpath():
    """The compiled module; fails the calling test when it is not built."""
    try:
        return importlib.import_module("tunrelay._fastpath")
    except ImportError as exc:
        pytest.fail(f"tunrelay._fastpath does not import ({exc}); {BUILD_HINT}",
                    pytrace=False)


PUMP_KINDS = ("c", "c-uring", "python")
#: The compiled pump's TUN I/O engine per kind ("c" names the syscall one).
IO_OF_KIND = {"c": "syscalls", "c-uring": "uring"}


def compiled_with_io(io: str):
    """A constructor of the compiled Pump with ``io=`` given unless the
    caller gives it (the test's engine); it passes for the class itself
    where a test asks which pump it has (``__module__``, ``io``)."""
    pump = load_fastpath().Pump

    def make(*args, **kwargs):
        return pump(*args, **{"io": io, **kwargs})

    make.__module__ = pump.__module__
    make.__qualname__ = make.__name__ = f"Pump[io={io}]"
    make.io = io
    return make


def load_pump_class(kind: str):
    """The pump of a kind: "c" the compiled Pump with io="syscalls",
    "c-uring" with io="uring", "python" the PyPump.  (The class itself:
    load_fastpath().Pump.)"""
    if kind in IO_OF_KIND:
        return compiled_with_io(IO_OF_KIND[kind])
    from tunrelay.pypump import PyPump
    return PyPump


@pytest.fixture
def relay_io():
    """The [relay] io of the relays a test's make_pair starts: None leaves
    the key out (io "auto").  tests/test_integration.py parametrizes it
    with both engines."""
    return None


@pytest.fixture(params=PUMP_KINDS)
def pump_class(request):
    """The compiled ``Pump`` with io "syscalls" ("c") or "uring"
    ("c-uring"), or the pure-Python ``PyPump`` ("python")."""
    return load_pump_class(request.param)


# ---------------------------------------------------------------- packets

def _fill(size: int, seq: int) -> bytes:
    """size bytes that tell packets apart (seq repeated)."""
    return (struct.pack("!I", seq & 0xFFFFFFFF) * (size // 4 + 1))[:size]


def ipv4_packet(size: int, seq: int = 0) -> bytes:
    """A valid IPv4/UDP-looking packet of exactly ``size`` bytes (20..65535)."""
    if not 20 <= size <= 0xFFFF:
        raise ValueError(f"an IPv4 packet has 20..65535 bytes, not {size}")
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, seq & 0xFFFF, 0, 64, 17, 0,
                         bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2)))
    return header + _fill(size - 20, seq)


def ipv6_packet(size: int, seq: int = 0) -> bytes:
    """A valid IPv6/UDP-looking packet of exactly ``size`` bytes (40..65575)."""
    if not 40 <= size <= 40 + 0xFFFF:
        raise ValueError(f"an IPv6 packet has 40..65575 bytes, not {size}")
    header = struct.pack("!IHBB16s16s", 0x60000000 | (seq & 0xFFFFF), size - 40, 17, 64,
                         b"\xfd" + b"\0" * 14 + b"\x01", b"\xfd" + b"\0" * 14 + b"\x02")
    return header + _fill(size - 40, seq)


def ip_packet(size: int, seq: int = 0) -> bytes:
    """IPv4 or IPv6 (alternating with seq where both fit) of ``size`` bytes."""
    if size >= 40 and seq % 2:
        return ipv6_packet(size, seq)
    return ipv4_packet(size, seq)


def ethernet_frame(size: int, seq: int = 0) -> bytes:
    """An Ethernet II frame of exactly ``size`` bytes (at least the 14-byte header)."""
    if size < 14:
        raise ValueError(f"an Ethernet frame has at least 14 bytes, not {size}")
    header = bytes.fromhex("020000000002" "020000000001" "0800")
    return header + _fill(size - 14, seq)
