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


PUMP_KINDS = ("c", "c-uring", "c-duplex", "python")

#: The busy-polling budget of the "c-duplex" kind: every test of it runs
#: the spinning code too.
DUPLEX_SPIN_US = 50

#: The compiled kinds: the options each gives the Pump unless a test gives
#: them itself.  "c" is the pump as before issue 10 (a thread per
#: direction, TUN writes one system call each); "c-uring" its io_uring
#: engine; "c-duplex" one thread for both directions, busy polling, and the
#: engine "auto" picks.
COMPILED_KINDS = {"c": {"io": "syscalls"}, "c-uring": {"io": "uring"},
                  "c-duplex": {"duplex": True, "busy_poll_us": DUPLEX_SPIN_US}}

_compiled_classes: dict = {}


def load_pump_class(kind: str):
    """The pump class of a kind: a subclass of the compiled Pump with the
    kind's options as defaults (COMPILED_KINDS), or "python" the PyPump."""
    if kind in COMPILED_KINDS:
        if kind not in _compiled_classes:
            base, defaults = load_fastpath().Pump, COMPILED_KINDS[kind]

            class KindPump(base):
                def __new__(cls, *args, **kwargs):
                    return base.__new__(cls, *args, **{**defaults, **kwargs})

            KindPump.__name__ = KindPump.__qualname__ = f"Pump[{kind}]"
            _compiled_classes[kind] = KindPump
        return _compiled_classes[kind]
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
    ("c-uring"), in one thread for both directions ("c-duplex"), or the
    pure-Python ``PyPump`` ("python")."""
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


def ones_sum(data: bytes, initial: int = 0) -> int:
    """RFC 1071: the folded ones' complement sum of big-endian 16-bit words
    (not inverted); an odd last byte is the high byte of a zero-padded word.
    The tests' own checksum, never the code under test's."""
    data = bytes(data)
    if len(data) % 2:
        data += b"\0"
    total = initial + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total
