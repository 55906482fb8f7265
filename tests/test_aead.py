"""The aead framing (wire version 2) end to end, without root.

Two compiled pumps with ``framing="aead"`` and a pre-shared key; the TUN
of each is one end of a SOCK_SEQPACKET socketpair.  Each end has a role:
A is "a", B is "b"; a relay seals with its own role's keys and opens only
the other role's datagrams.  Most tests put a man in the middle: both
pumps' peer is a plain UDP socket M owned by the test, so the test sees
every datagram on the wire and decides what reaches the other pump
(forwarded from M), untouched, replayed, reordered, cut, reflected or with
a bit flipped.  Others talk to a pump from several sockets (aead tries a
datagram from anywhere and the peer's endpoint roams), run several pumps
on one ``Keyring`` (a relay's queues: one session table), or run the
framing over a real loopback TCP connection (len16 records, hellos first).

The test checks the cryptography independently: it opens and seals
datagrams with OpenSSL's libcrypto through ctypes (EVP), using the keys
from ``tunrelay.aead.derive_key`` (checked against OpenSSL's own HKDF).  A
datagram the test sealed being accepted by a pump shows that the C key
derivation (the receiver's) agrees with the Python one.

Nothing here can hang: test-side sockets have timeouts, every wait has a
deadline, and the rig stops every pump before it closes an fd.  Nothing
asserts a timing.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import hashlib
import hmac
import os
import random
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pumprig import (
    TIMEOUT,
    WAIT,
    Rig,
    assert_quiet,
    counted,
    drops,
    errors,
    recv_exactly,
    wait_for,
)

from conftest import ethernet_frame, ip_packet, ipv4_packet, load_fastpath, ones_sum
from tunrelay import aead
from tunrelay.counters import DIRECTION_DROPS, DROP_REASONS
from tunrelay.daemon.config import load, loads
from tunrelay.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CIPHERS = aead.CIPHERS
MTU = 1400

HEADER, TAG, OVERHEAD = aead.HEADER_LEN, aead.TAG_LEN, aead.OVERHEAD
SESSION = aead.SESSION_LEN
WINDOW = 8192          # counters behind the newest that are still accepted: 8191
SLOTS = 8              # peer sessions one Keyring keeps (AEAD_SLOTS)
ROLE_BYTE = {role: i for i, role in enumerate(aead.ROLES)}   # "a" -> 0, "b" -> 1
LAST_COUNTER = 2**64 - 1   # never used: a seal at it fails

VNET_HDR = struct.Struct("<BBHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_LEN = VNET_HDR.size
ZERO_VNET = bytes(VNET_LEN)
NEEDS_CSUM, GSO_TCPV4, GSO_UDP_L4 = 1, 1, 5
TCP_ACK, TCP_PSH = 0x10, 0x08
UDP_SEGMENT = 103      # linux/udp.h


def keyring(key: bytes, cipher: str = "chacha20-poly1305", role: str = "a"):
    return load_fastpath().Keyring(key, cipher, role)


# ================================================================ OpenSSL through ctypes

class LibCrypto:
    """The few EVP calls the test needs: AEAD seal/open and HKDF."""

    CTRL_AEAD_GET_TAG = 0x10
    CTRL_AEAD_SET_TAG = 0x11
    PKEY_HKDF = 1036    # NID_hkdf
    HKDF_EXPAND_ONLY = 2   # EVP_PKEY_HKDEF_MODE_EXPAND_ONLY

    def __init__(self) -> None:
        lib = ctypes.CDLL(ctypes.util.find_library("crypto") or "libcrypto.so.3")
        vp, ci, cp = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
        for name in ("EVP_chacha20_poly1305", "EVP_aes_256_gcm", "EVP_sha256",
                     "EVP_CIPHER_CTX_new"):
            getattr(lib, name).restype = vp
            getattr(lib, name).argtypes = []
        lib.EVP_CIPHER_CTX_free.argtypes = [vp]
        lib.EVP_CIPHER_CTX_free.restype = None
        for name in ("EVP_EncryptInit_ex", "EVP_DecryptInit_ex"):
            getattr(lib, name).argtypes = [vp, vp, vp, cp, cp]
            getattr(lib, name).restype = ci
        for name in ("EVP_EncryptUpdate", "EVP_DecryptUpdate"):
            getattr(lib, name).argtypes = [vp, vp, ctypes.POINTER(ci), cp, ci]
            getattr(lib, name).restype = ci
        for name in ("EVP_EncryptFinal_ex", "EVP_DecryptFinal_ex"):
            getattr(lib, name).argtypes = [vp, vp, ctypes.POINTER(ci)]
            getattr(lib, name).restype = ci
        lib.EVP_CIPHER_CTX_ctrl.argtypes = [vp, ci, ci, vp]
        lib.EVP_CIPHER_CTX_ctrl.restype = ci
        self.lib = lib

    def _cipher(self, cipher: str):
        return {"chacha20-poly1305": self.lib.EVP_chacha20_poly1305,
                "aes-256-gcm": self.lib.EVP_aes_256_gcm}[cipher]()

    def seal(self, cipher: str, key: bytes, nonce: bytes, aad: bytes, plain: bytes) -> bytes:
        """ciphertext + tag."""
        lib = self.lib
        ctx = lib.EVP_CIPHER_CTX_new()
        assert ctx
        try:
            n = ctypes.c_int(0)
            out = ctypes.create_string_buffer(len(plain) + 16)
            tag = ctypes.create_string_buffer(TAG)
            assert lib.EVP_EncryptInit_ex(ctx, self._cipher(cipher), None, key, nonce) == 1
            assert lib.EVP_EncryptUpdate(ctx, None, ctypes.byref(n), aad, len(aad)) == 1
            done = 0
            if plain:
                assert lib.EVP_EncryptUpdate(ctx, ctypes.cast(out, ctypes.c_void_p),
                                             ctypes.byref(n), plain, len(plain)) == 1
                done = n.value
            assert lib.EVP_EncryptFinal_ex(
                ctx, ctypes.c_void_p(ctypes.addressof(out) + done), ctypes.byref(n)) == 1
            done += n.value
            assert lib.EVP_CIPHER_CTX_ctrl(ctx, self.CTRL_AEAD_GET_TAG, TAG,
                                           ctypes.cast(tag, ctypes.c_void_p)) == 1
            return out.raw[:done] + tag.raw
        finally:
            lib.EVP_CIPHER_CTX_free(ctx)

    def open(self, cipher: str, key: bytes, nonce: bytes, aad: bytes,
             sealed: bytes) -> bytes | None:
        """The plaintext, or None when the tag does not verify."""
        lib = self.lib
        body, tag = sealed[:-TAG], sealed[-TAG:]
        ctx = lib.EVP_CIPHER_CTX_new()
        assert ctx
        try:
            n = ctypes.c_int(0)
            out = ctypes.create_string_buffer(len(body) + 16)
            tag_buf = ctypes.create_string_buffer(tag, TAG)
            assert lib.EVP_DecryptInit_ex(ctx, self._cipher(cipher), None, key, nonce) == 1
            assert lib.EVP_CIPHER_CTX_ctrl(ctx, self.CTRL_AEAD_SET_TAG, TAG,
                                           ctypes.cast(tag_buf, ctypes.c_void_p)) == 1
            assert lib.EVP_DecryptUpdate(ctx, None, ctypes.byref(n), aad, len(aad)) == 1
            done = 0
            if body:
                assert lib.EVP_DecryptUpdate(ctx, ctypes.cast(out, ctypes.c_void_p),
                                             ctypes.byref(n), body, len(body)) == 1
                done = n.value
            if lib.EVP_DecryptFinal_ex(ctx, ctypes.c_void_p(ctypes.addressof(out) + done),
                                       ctypes.byref(n)) != 1:
                return None
            return out.raw[:done + n.value]
        finally:
            lib.EVP_CIPHER_CTX_free(ctx)

    def hkdf_sha256(self, salt: bytes, ikm: bytes, info: bytes, length: int = 32, *,
                    expand_only: bool = False) -> bytes:
        """OpenSSL's own HKDF (EVP_PKEY_HKDF): extract and expand, or with
        expand_only the expand step alone (ikm is then the PRK)."""
        lib = self.lib
        vp, ci, cp = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
        try:
            new, derive_init = lib.EVP_PKEY_CTX_new_id, lib.EVP_PKEY_derive_init
            set_md, set_salt = lib.EVP_PKEY_CTX_set_hkdf_md, lib.EVP_PKEY_CTX_set1_hkdf_salt
            set_key, add_info = lib.EVP_PKEY_CTX_set1_hkdf_key, lib.EVP_PKEY_CTX_add1_hkdf_info
            set_mode = lib.EVP_PKEY_CTX_set_hkdf_mode
            derive, free = lib.EVP_PKEY_derive, lib.EVP_PKEY_CTX_free
        except AttributeError as exc:  # OpenSSL < 3: these are macros
            pytest.skip(f"libcrypto has no HKDF functions to call: {exc}")
        new.argtypes, new.restype = [ci, vp], vp
        derive_init.argtypes, derive_init.restype = [vp], ci
        set_md.argtypes, set_md.restype = [vp, vp], ci
        set_mode.argtypes, set_mode.restype = [vp, ci], ci
        for fn in (set_salt, set_key, add_info):
            fn.argtypes, fn.restype = [vp, cp, ci], ci
        derive.argtypes, derive.restype = [vp, vp, ctypes.POINTER(ctypes.c_size_t)], ci
        free.argtypes, free.restype = [vp], None
        ctx = new(self.PKEY_HKDF, None)
        assert ctx
        try:
            assert derive_init(ctx) == 1
            assert set_md(ctx, lib.EVP_sha256()) == 1
            if expand_only:
                assert set_mode(ctx, self.HKDF_EXPAND_ONLY) == 1
            else:
                assert set_salt(ctx, salt, len(salt)) == 1
            assert set_key(ctx, ikm, len(ikm)) == 1
            assert add_info(ctx, info, len(info)) == 1
            out = ctypes.create_string_buffer(length)
            size = ctypes.c_size_t(length)
            assert derive(ctx, ctypes.cast(out, vp), ctypes.byref(size)) == 1
            return out.raw[:size.value]
        finally:
            free(ctx)


_LIBCRYPTO: list = []


def libcrypto() -> LibCrypto:
    """libcrypto, or skip the calling check (only that one) without it."""
    if not _LIBCRYPTO:
        try:
            _LIBCRYPTO.append(LibCrypto())
        except (OSError, AttributeError) as exc:
            _LIBCRYPTO.append(exc)
    if isinstance(_LIBCRYPTO[0], Exception):
        pytest.skip(f"libcrypto not usable through ctypes: {_LIBCRYPTO[0]}")
    return _LIBCRYPTO[0]


# ================================================================ the wire format, in Python

def wire_header(session: bytes, counter: int, kind: int = aead.TYPE_DATA,
                role: str | int = "a", reserved: bytes = b"\0\0") -> bytes:
    """type | sender's role | 2 zero bytes | session id (12) | counter (8, BE).
    ``role`` is "a"/"b" or the raw byte."""
    role_byte = ROLE_BYTE[role] if isinstance(role, str) else role
    return bytes([kind, role_byte]) + reserved + session + counter.to_bytes(8, "big")


def nonce_of(counter: int) -> bytes:
    return bytes(4) + counter.to_bytes(8, "big")


def seal_datagram(psk: bytes, session: bytes, counter: int, packet: bytes,
                  cipher: str = "chacha20-poly1305", role: str = "a", *,
                  kind: int = aead.TYPE_DATA, key_role: str | None = None) -> bytes:
    """A datagram as a sender of this role and session would make it (with
    ``key_role``: labelled ``role`` but sealed with that role's key)."""
    header = wire_header(session, counter, kind, role)
    key = aead.derive_key(psk, session, cipher, key_role or role)
    return header + libcrypto().seal(cipher, key, nonce_of(counter), header, packet)


def open_datagram(psk: bytes, datagram: bytes, cipher: str,
                  role: str | None = None) -> bytes | None:
    """The packet in a datagram, decrypted by the test with the key of the
    role on the wire (or of ``role``), or None."""
    header = datagram[:HEADER]
    key = aead.derive_key(psk, header[4:16], cipher, role or aead.ROLES[header[1]])
    return libcrypto().open(cipher, key, nonce_of(counter_of(datagram)), header,
                            datagram[HEADER:])


def session_at(start: int) -> bytes:
    """A session id as aead.new_session() makes it, for a given start time."""
    return struct.pack("!I", start & 0xFFFFFFFF) + os.urandom(8)


def start_of(session_or_datagram: bytes, offset: int = 0) -> int:
    return int.from_bytes(session_or_datagram[offset:offset + 4], "big")


def counter_of(datagram: bytes) -> int:
    return int.from_bytes(datagram[16:24], "big")


def session_of(datagram: bytes) -> bytes:
    return datagram[4:16]


def garbage(rng: random.Random, size: int = 100, *, start: int | None = None,
            role: str = "a") -> bytes:
    """A well-formed header of a made-up session, random body and tag.  Its
    start time is ``start``, by default later than any real session's (so
    it is tried, never refused as stale)."""
    if start is None:
        start = aead.start_time() + rng.randrange(1, 1 << 16)
    session = struct.pack("!I", start & 0xFFFFFFFF) + rng.randbytes(8)
    return wire_header(session, rng.getrandbits(64), role=role) + rng.randbytes(size - HEADER)


def v1_datagram(rng: random.Random, size: int, counter: int = 0) -> bytes:
    """What a tunrelay of wire version 1 sent: type 0x01, 3 zero bytes,
    an 8-byte session id, the counter, ciphertext and tag (20 + n + 16)."""
    return (bytes([aead.TYPE_V1_DATA, 0, 0, 0]) + rng.randbytes(8) + counter.to_bytes(8, "big")
            + rng.randbytes(size - 20))


def record(datagram: bytes) -> bytes:
    """A TCP record: len16 length (of header + ciphertext + tag), the datagram."""
    return len(datagram).to_bytes(2, "big") + datagram


def read_record(sock: socket.socket) -> bytes:
    length = int.from_bytes(recv_exactly(sock, 2), "big")
    return recv_exactly(sock, length)


def random_packet(size: int, seq: int) -> bytes:
    """A valid IPv4 packet whose payload is random (it cannot show up on the
    wire by chance)."""
    return ipv4_packet(size, seq)[:20] + os.urandom(size - 20)


# ================================================================ IP builders (offload)

def ipv4_header(proto: int, l4_length: int, ident: int = 0x2345) -> bytearray:
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + l4_length, ident, 0x4000,
                                   64, proto, 0, bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2))))
    header[10:12] = (~ones_sum(bytes(header)) & 0xFFFF).to_bytes(2, "big")
    return header


def l4_checksum_ok(packet: bytes) -> bool:
    proto, l4 = packet[9], packet[20:]
    pseudo = packet[12:20] + struct.pack("!BBH", 0, proto, len(l4))
    return ones_sum(pseudo + l4) == 0xFFFF


def udp_super_packet(payload: bytes, mss: int) -> bytes:
    """vnet header (USO) + an IPv4/UDP packet to be cut in mss-sized datagrams."""
    udp = struct.pack("!HHHH", 40001, 4789, 8 + len(payload), 0) + payload
    vnet = VNET_HDR.pack(NEEDS_CSUM, GSO_UDP_L4, 28, mss, 20, 6)
    return vnet + bytes(ipv4_header(17, len(udp))) + udp


def tcp_super_packet(payload: bytes, mss: int, seq: int = 1000) -> bytes:
    """vnet header (TSO) + an IPv4/TCP packet to be cut in mss-sized segments."""
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 77, 5 << 4, TCP_ACK | TCP_PSH,
                      502, 0, 0) + payload
    vnet = VNET_HDR.pack(NEEDS_CSUM, GSO_TCPV4, 40, mss, 20, 16)
    return vnet + bytes(ipv4_header(6, len(tcp))) + tcp


# ================================================================ rig

def settle(pump, direction: str, total: int) -> None:
    """Wait until a direction dealt with `total` packets (moved or dropped)."""
    wait_for(lambda: counted(pump, direction) >= total, f"{total} {direction} packets counted",
             lambda: pump.stats()[direction])


class Side:
    """One pump and the test's end of its TUN stand-in.  ``key``: the PSK
    (the pump gets a Keyring of its own, with ``role``) or a Keyring."""

    def __init__(self, rig: AeadRig, sock: socket.socket, key, cipher: str, peer,
                 offload: bool, start: bool = True, mode: str = "tun", role: str = "a") -> None:
        self.tun, pump_end = rig.tun()
        self.sock = sock
        self.offload = offload
        self.pump = rig.pump(pump_end, sock, framing="aead", key=key, cipher=cipher,
                             role=role, peer=peer, offload=offload, mode=mode)
        if start:
            self.pump.start()

    @property
    def address(self):
        return self.sock.getsockname()

    @property
    def keyring(self):
        return self.pump.keyring

    @property
    def session(self) -> bytes:
        return bytes.fromhex(self.pump.aead_session)

    def write(self, packet: bytes) -> None:
        """A plain packet into the TUN (behind a zero vnet header with offloads)."""
        self.tun.send((ZERO_VNET if self.offload else b"") + packet)

    def write_raw(self, data: bytes) -> None:
        self.tun.send(data)

    def read(self) -> bytes:
        """A plain packet out of the TUN (a zero vnet header with offloads)."""
        data = self.tun.recv(1 << 17)
        if self.offload:
            assert data[:VNET_LEN] == ZERO_VNET, VNET_HDR.unpack(data[:VNET_LEN])
            return data[VNET_LEN:]
        return data

    def expect(self, packets: list[bytes]) -> None:
        """These packets come out of the TUN, byte-exact and in this order."""
        for i, packet in enumerate(packets):
            got = self.read()
            assert got == packet, f"packet {i} of {len(packets)}: {len(got)} bytes " \
                                  f"instead of {len(packet)}, or other bytes"

    def quiet(self) -> None:
        """Nothing (more) came out of the TUN."""
        if not select.select([self.tun], [], [], 0.02)[0]:
            return
        data = self.tun.recv(1 << 17)
        pytest.fail(f"an unexpected {len(data)}-byte write reached the TUN")


class AeadRig(Rig):
    """The shared rig with compiled pumps, and aead sides made in one call."""

    def __init__(self) -> None:
        super().__init__(load_fastpath().Pump, mtu=MTU)

    def side(self, key, cipher: str = "chacha20-poly1305", *, peer, sock=None,
             offload: bool = False, start: bool = True, mode: str = "tun",
             role: str = "a") -> Side:
        return Side(self, sock or self.udp(timeout=None), key, cipher, peer, offload, start,
                    mode, role)

    def tcp_connection(self) -> tuple[socket.socket, socket.socket]:
        """(client end, server end) of a real loopback TCP connection (not a
        socketpair), TCP_NODELAY and the test's timeout on both ends."""
        client, server = self.tcp()
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server.settimeout(TIMEOUT)
        return client, server


@pytest.fixture
def rig():
    rig = AeadRig()
    yield rig
    rig.close()


class Mitm:
    """Pumps A (role "a") and B (role "b") whose peer is the test's socket
    M: A's datagrams are captured at M and forwarded to B (or not) by the
    test, and B's to A.  Datagrams the test seals for B are role "a"."""

    def __init__(self, rig: AeadRig, cipher: str = "chacha20-poly1305", *,
                 key: bytes | None = None, offload: bool = False, start_a: bool = True) -> None:
        self.rig = rig
        self.key = key or os.urandom(32)
        self.cipher = cipher
        self.m = rig.udp()
        self.a = rig.side(self.key, cipher, peer=self.m.getsockname(), offload=offload,
                          start=start_a, role="a")
        self.b = rig.side(self.key, cipher, peer=self.m.getsockname(), offload=offload,
                          role="b")

    def seal(self, session: bytes, counter: int, packet: bytes, role: str = "a",
             **kw) -> bytes:
        """A datagram the test seals with this pair's key and cipher."""
        return seal_datagram(self.key, session, counter, packet, self.cipher, role, **kw)

    def capture(self, count: int, source=None) -> list[bytes]:
        """count datagrams arriving at M (from A unless told)."""
        source = source or self.a
        out = []
        for _ in range(count):
            data, sender = self.m.recvfrom(1 << 17)
            assert sender == source.address, f"a datagram from {sender} at M"
            out.append(data)
        return out

    def from_a(self, packets: list[bytes], side: Side | None = None) -> list[bytes]:
        """Write packets into A's TUN; return A's datagrams, as M received them."""
        side = side or self.a
        out: list[bytes] = []
        for first in range(0, len(packets), 64):
            chunk = packets[first:first + 64]
            for packet in chunk:
                side.write(packet)
            out += self.capture(len(chunk), side)
        return out

    def from_b(self, packets: list[bytes]) -> list[bytes]:
        """Write packets into B's TUN; return B's datagrams, as M received them."""
        return self.from_a(packets, self.b)

    def to_b(self, *datagrams: bytes) -> None:
        for datagram in datagrams:
            self.m.sendto(datagram, self.b.address)

    def to_a(self, *datagrams: bytes) -> None:
        for datagram in datagrams:
            self.m.sendto(datagram, self.a.address)

    def pass_to_b(self, datagrams: list[bytes], packets: list[bytes], chunk: int = 250) -> None:
        """Forward datagrams in chunks (so no socket buffer overflows); what
        B accepts of each chunk must be the next of ``packets``, in order,
        and all of them in the end."""
        expected = iter(packets)
        for first in range(0, len(datagrams), chunk):
            part = datagrams[first:first + chunk]
            before = self.b.pump.stats()["ingress"]["packets"]
            total = counted(self.b.pump)
            self.to_b(*part)
            self.settle_b(total + len(part))
            delivered = self.b.pump.stats()["ingress"]["packets"] - before
            self.b.expect([next(expected) for _ in range(delivered)])
        assert next(expected, None) is None, "fewer packets accepted than expected"

    def settle_b(self, total: int) -> None:
        """Wait until B's ingress dealt with `total` datagrams (moved or dropped)."""
        settle(self.b.pump, "ingress", total)


def read_any(sides: list[Side], count: int) -> list[list[bytes]]:
    """count packets out of the TUNs of several sides, whichever they come
    out of: one list per side."""
    got: list[list[bytes]] = [[] for _ in sides]
    deadline = time.monotonic() + WAIT
    while sum(map(len, got)) < count:
        readable, _, _ = select.select([s.tun for s in sides], [], [], 0.1)
        for i, side in enumerate(sides):
            if side.tun in readable:
                got[i].append(side.read())
        if time.monotonic() > deadline:
            pytest.fail(f"{sum(map(len, got))} of {count} packets came out of the TUNs")
    return got


# ================================================================ constants

def test_wire_version_2_constants():
    """The wire format the rest of this file builds by hand."""
    assert aead.WIRE_VERSION == 2
    assert (aead.HEADER_LEN, aead.TAG_LEN, aead.OVERHEAD, aead.SESSION_LEN) == (24, 16, 40, 12)
    assert (aead.TYPE_V1_DATA, aead.TYPE_DATA, aead.TYPE_HELLO) == (0x01, 0x02, 0x03)
    assert aead.HELLO_RECORD_LEN == 2 + 40
    assert aead.ROLES == ("a", "b")
    assert aead.other_role("a") == "b" and aead.other_role("b") == "a"
    session = aead.new_session(0x01020304)
    assert len(session) == 12 and session[:4] == bytes((1, 2, 3, 4))
    assert aead.new_session(0x01020304)[4:] != session[4:]     # 64 random bits
    assert abs(aead.start_time() - time.time()) < 2
    # The drop reasons of the new design (unknown_session, the rate limit's, is gone).
    assert {"stale_session", "reflected", "aead_version"} <= set(DIRECTION_DROPS["ingress"])
    assert "stopped" in DIRECTION_DROPS["egress"] and "unknown_session" not in DROP_REASONS


# ================================================================ two pumps

def roundtrip_packets(count: int, base: int) -> list[bytes]:
    sizes = (20, 40, 41, 64, 100, 576, 1279, 1280, MTU - 1, MTU)
    return [ip_packet(sizes[i % len(sizes)], base + i) for i in range(count)]


def exchange(a, b, bursts: int) -> dict[str, list[bytes]]:
    """Bursts of 40 packets each way, each burst checked byte-exact and in
    order at the other end; what each side sent."""
    sent: dict[str, list[bytes]] = {"a": [], "b": []}
    for burst in range(bursts):
        for src, dst, name in ((a, b, "a"), (b, a, "b")):
            packets = roundtrip_packets(40, 1000 * burst + (500 if name == "b" else 0))
            for packet in packets:
                src.write(packet)
            dst.expect(packets)
            sent[name] += packets
    a.quiet()
    b.quiet()
    return sent


@pytest.mark.parametrize("offload", [False, True], ids=["plain", "offload"])
@pytest.mark.parametrize("cipher", CIPHERS)
def test_two_pumps_relay_both_ways_byte_exact(rig, cipher, offload):
    key = os.urandom(32)
    sock_a, sock_b = rig.udp(timeout=None), rig.udp(timeout=None)
    a = rig.side(key, cipher, sock=sock_a, peer=sock_b.getsockname(), offload=offload, role="a")
    b = rig.side(key, cipher, sock=sock_b, peer=sock_a.getsockname(), offload=offload, role="b")
    assert a.pump.framing == "aead" and a.pump.cipher == cipher
    assert (a.keyring.role, b.keyring.role) == ("a", "b") and a.keyring.cipher == cipher
    assert len(a.pump.aead_session) == 2 * SESSION and a.pump.aead_session != b.pump.aead_session
    assert a.pump.offloads["vnet_hdr"] == offload
    sent = exchange(a, b, 6)
    for side, name, other in ((a, "a", "b"), (b, "b", "a")):
        # Counters move just after the syscall: maybe after the test saw the packet.
        settle(side.pump, "egress", len(sent[name]))
        settle(side.pump, "ingress", len(sent[other]))
        stats = side.pump.stats()
        assert drops(side.pump, "ingress") == {} and drops(side.pump, "egress") == {}
        assert stats["egress"]["packets"] == len(sent[name])
        assert stats["egress"]["bytes"] == sum(map(len, sent[name]))
        assert stats["ingress"]["packets"] == len(sent[other])
        assert stats["ingress"]["bytes"] == sum(map(len, sent[other]))
        assert side.pump.aead_peer_sessions == 1
        # The peer stayed where it was configured: no roam.
        assert side.keyring.counts() == {"sessions": 1, "evicted": 0, "roams": 0, "live": 1}
    assert a.pump.peer == sock_b.getsockname() and b.pump.peer == sock_a.getsockname()


def test_tap_frames_pass_sealed(rig):
    key = os.urandom(32)
    sock_a, sock_b = rig.udp(timeout=None), rig.udp(timeout=None)
    a = rig.side(key, sock=sock_a, peer=sock_b.getsockname(), mode="tap", role="a")
    b = rig.side(key, sock=sock_b, peer=sock_a.getsockname(), mode="tap", role="b")
    frames = [ethernet_frame(size, i) for i, size in enumerate((14, 60, 1000, MTU + 14, MTU + 18))]
    for frame in frames:
        a.write(frame)
    b.expect(frames)
    for frame in frames:
        b.write(frame)
    a.expect(frames)
    assert drops(a.pump) == drops(b.pump) == {}


@pytest.mark.parametrize("cipher", CIPHERS)
def test_tcp_super_packet_is_sealed_per_segment_and_coalesced_back(rig, cipher):
    """With offloads, a TSO super-packet is cut in segments, each sealed
    (header copy + payload in place + tag); the far side opens them and its
    coalescer joins them again: the payload arrives whole."""
    key = os.urandom(32)
    sock_a, sock_b = rig.udp(timeout=None), rig.udp(timeout=None)
    a = rig.side(key, cipher, sock=sock_a, peer=sock_b.getsockname(), offload=True, role="a")
    b = rig.side(key, cipher, sock=sock_b, peer=sock_a.getsockname(), offload=True, role="b")
    mss = 1000
    for round_ in range(3):
        payload = os.urandom(5 * mss + 321 * round_ + 1)
        a.write_raw(tcp_super_packet(payload, mss, seq=1000 + round_ * 100000))
        got, writes = b"", 0
        while len(got) < len(payload):
            data = b.tun.recv(1 << 17)
            writes += 1
            header, packet = data[:VNET_LEN], data[VNET_LEN:]
            flags, gso_type, _, gso_size, _, _ = VNET_HDR.unpack(header)
            assert packet[0] == 0x45 and packet[9] == 6
            assert gso_type in (0, GSO_TCPV4)
            if gso_type:
                assert gso_size == mss
            assert int.from_bytes(packet[2:4], "big") == len(packet)
            got += packet[40:]
        assert got == payload
    b.quiet()
    settle(a.pump, "egress", 3 * 6)
    settle(b.pump, "ingress", 3 * 6)
    assert drops(b.pump) == {} and drops(a.pump, "egress") == {}
    assert a.pump.stats()["egress"]["packets"] == b.pump.stats()["ingress"]["packets"] == 3 * 6
    assert b.pump.aead_peer_sessions == 1


# ================================================================ the wire, seen by M

@pytest.mark.parametrize("cipher", CIPHERS)
def test_wire_format_and_independent_decryption(rig, cipher):
    mitm = Mitm(rig, cipher)
    session = mitm.a.session
    assert len(session) == SESSION
    started = start_of(session)
    assert abs(started - time.time()) < 120, "a session id starts with its start time"
    packets = [random_packet(size, i) for i, size in
               enumerate((20, 21, 60, 100, 555, 1000, MTU - 1, MTU) * 3)]
    datagrams = mitm.from_a(packets)
    for counter, (packet, datagram) in enumerate(zip(packets, datagrams)):
        assert len(datagram) == len(packet) + OVERHEAD
        assert datagram[0] == aead.TYPE_DATA == 0x02
        assert datagram[1] == ROLE_BYTE["a"] == 0 and datagram[2:4] == b"\0\0"
        assert session_of(datagram) == session
        assert counter_of(datagram) == counter
        assert packet[:20] not in datagram
        assert len(packet) < 36 or packet[20:] not in datagram   # 16+ random bytes
        # Decrypted by the test with derive_key's key for role "a": the
        # sender's key is HKDF(PSK, role) expanded with the session, and
        # the header is the AAD.
        assert open_datagram(mitm.key, datagram, cipher) == packet
        # The key is the sender's role's: role "b"'s key for the same
        # session does not open it, nor does a changed session or header.
        assert open_datagram(mitm.key, datagram, cipher, role="b") is None
        assert open_datagram(mitm.key, datagram[:5] + bytes([datagram[5] ^ 1]) + datagram[6:],
                             cipher) is None
    mitm.to_b(*datagrams)
    mitm.b.expect(packets)
    mitm.b.quiet()
    assert drops(mitm.b.pump) == {}
    assert mitm.b.pump.aead_peer_sessions == 1
    # B's datagrams carry role "b" and open with role "b"'s key only.
    back = [random_packet(100 + i, 50 + i) for i in range(3)]
    replies = mitm.from_b(back)
    for counter, (packet, datagram) in enumerate(zip(back, replies)):
        assert datagram[:4] == bytes((aead.TYPE_DATA, ROLE_BYTE["b"], 0, 0))
        assert session_of(datagram) == mitm.b.session and counter_of(datagram) == counter
        assert open_datagram(mitm.key, datagram, cipher) == packet
        assert open_datagram(mitm.key, datagram, cipher, role="a") is None
    assert start_of(mitm.b.session) == start_of(mitm.b.keyring.new_session())


@pytest.mark.parametrize("cipher", CIPHERS)
def test_c_key_derivation_agrees_with_derive_key(rig, cipher):
    """The receiver derives keys in C: datagrams the test sealed with
    derive_key()'s key for a session of its own are accepted, both ways
    (role "a" at B, role "b" at A)."""
    mitm = Mitm(rig, cipher)
    packets = [random_packet(60 + i, i) for i in range(5)]
    for role, side in (("a", mitm.b), ("b", mitm.a)):
        session = aead.new_session(aead.start_time())
        for i, packet in enumerate(packets):
            mitm.m.sendto(mitm.seal(session, i, packet, role), side.address)
        side.expect(packets)
        assert side.pump.aead_peer_sessions == 1
        assert drops(side.pump) == {}


def test_direction_and_session_keys_are_hkdf_sha256():
    """direction_key() is OpenSSL's HKDF-SHA256 (salt aead.SALT, info naming
    the version, cipher and sending role); derive_key() is HKDF-Expand of
    it with the session id: HMAC-SHA256(direction key, session | 0x01).
    Every cipher, role and session has a key of its own."""
    crypto = libcrypto()
    assert aead.SALT == b"tunrelay aead v2"
    psk, session = os.urandom(32), aead.new_session(aead.start_time())
    other_session = session[:11] + bytes([session[11] ^ 1])
    keys = set()
    for cipher in CIPHERS:
        for role in aead.ROLES:
            direction = aead.direction_key(psk, cipher, role)
            info = f"tunrelay aead v2 {cipher} from {role}".encode()
            assert direction == crypto.hkdf_sha256(aead.SALT, psk, info)
            key = aead.derive_key(psk, session, cipher, role)
            assert key == hmac.new(direction, session + b"\x01", hashlib.sha256).digest()
            assert key == crypto.hkdf_sha256(b"", direction, session, expand_only=True)
            keys |= {direction, key, aead.derive_key(psk, other_session, cipher, role)}
    assert len(keys) == 3 * len(CIPHERS) * len(aead.ROLES)
    assert aead.direction_key(os.urandom(32), CIPHERS[0], "a") not in keys
    for bad in (dict(psk=psk[:31]), dict(session=session[:11]), dict(session=session + b"\0"),
                dict(session=session[:8]), dict(cipher="aes-128-gcm"), dict(role="c"),
                dict(role="A")):
        args = {"psk": psk, "session": session, "cipher": CIPHERS[0], "role": "a", **bad}
        with pytest.raises(ValueError):
            aead.derive_key(**args)


@pytest.mark.parametrize("cipher", CIPHERS)
def test_replayed_datagram_is_dropped(rig, cipher):
    mitm = Mitm(rig, cipher)
    packets = [random_packet(80, i) for i in range(4)]
    d = mitm.from_a(packets)
    mitm.to_b(d[0], d[1])
    mitm.b.expect(packets[:2])
    mitm.to_b(d[0], d[1], d[0], d[2], d[2], d[3])
    mitm.b.expect([packets[2], packets[3]])
    mitm.settle_b(8)
    assert drops(mitm.b.pump) == {"replay": 4}
    mitm.b.quiet()
    assert mitm.b.pump.aead_peer_sessions == 1


def flip_reason(original: bytes, position: int, bit: int, newest_start: int) -> str:
    """Why B (role "b", A's session the newest it has) drops A's datagram
    `original` (counter 3) with one bit flipped, as the design says."""
    if position == 0:
        return "bad_frame"        # 0x02 -> never 0x01 (one bit away: 0x03, 0x00, 0x06, ...)
    if position == 1:
        # 0x00 -> 0x01 is B's own role; anything else is no role.
        return "reflected" if bit == 0 else "bad_frame"
    if position in (2, 3):
        return "bad_frame"
    if 4 <= position < 8:
        # The start time: an unknown session that started before the newest
        # is refused without crypto; a later one is tried and fails.
        flipped = bytearray(original[4:8])
        flipped[position - 4] ^= 1 << bit
        return "stale_session" if int.from_bytes(flipped, "big") < newest_start else "bad_tag"
    # The session's random part: an unknown session, tried.  The counter:
    # the session's slot, a fresh counter (3 is never one flip from 0, the
    # one seen), the tag fails.  The rest: ciphertext and tag.
    return "bad_tag"


@pytest.mark.parametrize("cipher", CIPHERS)
def test_every_flipped_bit_is_dropped_for_its_reason(rig, cipher):
    """One bit flipped anywhere: each header bit gets exactly the reason
    the design gives it (bad_frame, reflected, stale_session or bad_tag;
    never aead_version: no single flip turns 0x02 into 0x01), sent one at a
    time; every other byte's flip is bad_tag.  Forged counters and start
    times never move the replay window or evict anything: the untouched
    datagram is accepted afterwards."""
    mitm = Mitm(rig, cipher)
    packets = [random_packet(60 + i, i) for i in range(4)]
    d = mitm.from_a(packets)
    mitm.to_b(d[0])
    mitm.b.expect(packets[:1])
    original = d[3]   # counter 3: no single flipped bit makes it 0, the one seen
    newest = start_of(original, 4)
    total, expected = 1, {}
    for position in range(HEADER):
        for bit in range(8):
            damaged = bytearray(original)
            damaged[position] ^= 1 << bit
            reason = flip_reason(original, position, bit, newest)
            mitm.to_b(bytes(damaged))
            total += 1
            expected[reason] = expected.get(reason, 0) + 1
            mitm.settle_b(total)
            assert drops(mitm.b.pump) == expected, f"byte {position} bit {bit}: {reason}?"
    assert expected["reflected"] == 1 and expected["bad_frame"] == 8 + 7 + 16
    assert "aead_version" not in expected
    body = []
    for position in range(HEADER, len(original)):
        damaged = bytearray(original)
        damaged[position] ^= 1 << (position % 8)
        body.append(bytes(damaged))
    mitm.to_b(*body)
    expected["bad_tag"] += len(body)
    mitm.settle_b(total + len(body))
    assert drops(mitm.b.pump) == expected
    mitm.b.quiet()
    mitm.to_b(original)
    mitm.b.expect(packets[3:])
    mitm.b.quiet()
    assert mitm.b.keyring.counts() == {"sessions": 1, "evicted": 0, "roams": 0, "live": 1}


def test_truncated_and_bad_frames_are_dropped(rig):
    mitm = Mitm(rig)
    packets = [random_packet(100, i) for i in range(3)]
    d = mitm.from_a(packets)
    mitm.to_b(d[0])
    mitm.b.expect(packets[:1])
    victim = d[1]
    # Shorter than header + tag, whatever the first byte says.
    short = [victim[:n] for n in (0, 1, HEADER - 1, HEADER, HEADER + 1, OVERHEAD - 1)]
    short.append(bytes([aead.TYPE_V1_DATA]) + victim[1:OVERHEAD - 1])
    cut = [victim[:n] for n in (OVERHEAD, OVERHEAD + 1, len(victim) - TAG, len(victim) - 1)]
    frames = [bytes([kind]) + victim[1:] for kind in (0x00, aead.TYPE_HELLO, 0x04, 0x82, 0xFF)]
    frames += [victim[:1] + bytes([role]) + victim[2:] for role in (2, 0x80, 0xFF)]
    frames += [victim[:i] + b"\x01" + victim[i + 1:] for i in (2, 3)]
    reflected = [victim[:1] + bytes([ROLE_BYTE["b"]]) + victim[2:]]
    old_version = [bytes([aead.TYPE_V1_DATA]) + victim[1:]]
    mitm.to_b(*short, *cut, *frames, *reflected, *old_version)
    mitm.settle_b(1 + len(short) + len(cut) + len(frames) + 2)
    assert drops(mitm.b.pump) == {"too_short": len(short), "bad_tag": len(cut),
                                  "bad_frame": len(frames), "reflected": 1, "aead_version": 1}
    mitm.b.quiet()
    # None of them used up the victim's counter.
    mitm.to_b(victim, d[2])
    mitm.b.expect(packets[1:])
    mitm.b.quiet()


def test_reordered_datagrams_are_accepted_once_each(rig):
    mitm = Mitm(rig)
    packets = [random_packet(40 + i, i) for i in range(40)]
    d = mitm.from_a(packets)
    order = list(range(40))
    random.Random(6479).shuffle(order)
    mitm.to_b(*(d[i] for i in order))
    mitm.b.expect([packets[i] for i in order])
    mitm.to_b(*reversed(d))
    mitm.settle_b(80)
    assert drops(mitm.b.pump) == {"replay": 40}
    mitm.b.quiet()


def test_replay_window_edges(rig):
    """8192 or more behind the newest: replay, even if never seen; 8191
    behind and unseen: accepted (once).  The edge moves with the newest."""
    mitm = Mitm(rig)
    total = 2 * WINDOW + 300
    packets = [ipv4_packet(28, i) for i in range(total)]
    d = mitm.from_a(packets)
    assert [counter_of(x) for x in d] == list(range(total))
    top = WINDOW + 40
    mitm.to_b(d[top])
    mitm.b.expect([packets[top]])
    mitm.to_b(d[top - WINDOW], d[top - WINDOW - 1], d[0])           # too old: replay
    mitm.to_b(d[top - WINDOW + 1], d[top - WINDOW + 1], d[top - 1])  # accepted once
    mitm.b.expect([packets[top - WINDOW + 1], packets[top - 1]])
    mitm.settle_b(7)
    assert drops(mitm.b.pump) == {"replay": 4}
    # The newest moves on by 2: what was 8190 behind is now 8192 behind.
    top += 2
    mitm.to_b(d[top], d[top - WINDOW], d[top - WINDOW + 1], d[top - 1])
    mitm.b.expect([packets[top], packets[top - WINDOW + 1], packets[top - 1]])
    mitm.settle_b(11)
    assert drops(mitm.b.pump) == {"replay": 5}
    # Every other counter of the window is accepted, once, in any order
    # (all 129 words of the bitmap, the one reused for the newest included).
    rest = list(range(top - WINDOW + 2, top - 3))
    random.Random(33).shuffle(rest)
    mitm.pass_to_b([d[c] for c in rest], [packets[c] for c in rest])
    mitm.to_b(*(d[c] for c in rest[:50]))
    mitm.settle_b(11 + len(rest) + 50)
    assert drops(mitm.b.pump) == {"replay": 55}
    # A jump past the whole bitmap forgets everything older; the new edge
    # holds as before.
    far = total - 1
    assert far - top > 129 * 64
    mitm.to_b(d[far], d[far - WINDOW], d[top], d[top - 1], d[far - WINDOW + 1], d[far - 1])
    mitm.b.expect([packets[far], packets[far - WINDOW + 1], packets[far - 1]])
    mitm.settle_b(11 + len(rest) + 50 + 6)
    assert drops(mitm.b.pump) == {"replay": 58}
    mitm.b.quiet()


def replay_model(order: list[int]) -> list[bool]:
    """What an RFC 6479 receiver with an 8192-counter window accepts."""
    seen: set[int] = set()
    top = -1
    verdicts = []
    for counter in order:
        ok = counter > top or (top - counter < WINDOW and counter not in seen)
        if ok:
            seen.add(counter)
            top = max(top, counter)
        verdicts.append(ok)
    return verdicts


@pytest.mark.parametrize("seed", [20260, 7])
def test_replay_window_against_a_model(rig, seed):
    """A long, seeded schedule of reordered, late and repeated datagrams:
    B accepts exactly what a model of the window accepts, in that order."""
    rng = random.Random(seed)
    total = WINDOW + 2000
    mitm = Mitm(rig)
    packets = [ipv4_packet(28, i) for i in range(total)]
    d = mitm.from_a(packets)
    order = sorted(range(total), key=lambda i: i + rng.uniform(0, 200))
    for _ in range(150):            # very late: near or past the window's end
        at = rng.randrange(len(order) - WINDOW - 300)
        order.insert(at + rng.randint(WINDOW - 300, WINDOW + 200), order.pop(at))
    for _ in range(600):            # repeats of something already forwarded
        at = rng.randrange(1, len(order))
        order.insert(at, order[rng.randrange(max(0, at - WINDOW - 400), at)])
    verdicts = replay_model(order)
    assert 200 < verdicts.count(False) < len(order) - 2000   # the schedule tests something
    forwarded, too_late = set(), 0      # refused though never forwarded before
    for counter, ok in zip(order, verdicts):
        too_late += not ok and counter not in forwarded
        forwarded.add(counter)
    assert too_late > 20
    mitm.pass_to_b([d[i] for i in order], [packets[i] for i, ok in zip(order, verdicts) if ok])
    mitm.b.quiet()
    assert drops(mitm.b.pump) == {"replay": verdicts.count(False)}
    assert mitm.b.pump.stats()["ingress"]["packets"] == verdicts.count(True)


# ================================================================ reflection and old ends

def test_own_datagrams_sent_back_are_dropped_as_reflected(rig):
    """Issue 7, finding 1: B's own datagrams, taken off the wire at M and
    sent back to B (from M, and from A's own address) are dropped as
    "reflected" before any crypto: none reaches B's TUN, none becomes a
    peer session, none moves B's peer.  They are authentic: A, their real
    receiver, takes every one."""
    mitm = Mitm(rig)
    packets = [random_packet(90, i) for i in range(30)]
    own = mitm.from_b(packets)
    assert {d[1] for d in own} == {ROLE_BYTE["b"]}
    mitm.to_b(*own[:15])
    for datagram in own[15:]:
        mitm.a.sock.sendto(datagram, mitm.b.address)
    mitm.settle_b(30)
    assert drops(mitm.b.pump) == {"reflected": 30}
    mitm.b.quiet()
    assert mitm.b.keyring.counts() == {"sessions": 0, "evicted": 0, "roams": 0, "live": 0}
    assert mitm.b.pump.peer == mitm.m.getsockname()
    mitm.to_a(*own)
    mitm.a.expect(packets)
    assert drops(mitm.a.pump) == {}


def test_the_role_byte_is_authenticated(rig):
    """A datagram labelled role "a" but sealed with role "b"'s key (all a
    reflector could have) is bad_tag at B, and so is B's own datagram with
    its role byte rewritten to "a"; the same lie the other way is bad_tag
    at A.  None becomes a session."""
    mitm = Mitm(rig)
    packets = [random_packet(70, i) for i in range(5)]
    session = mitm.b.session        # even B's own session id
    lying = [mitm.seal(session, 1000 + i, p, role="a", key_role="b")
             for i, p in enumerate(packets)]
    relabelled = [d[:1] + bytes([ROLE_BYTE["a"]]) + d[2:] for d in mitm.from_b(packets)]
    mitm.to_b(*lying, *relabelled)
    mitm.settle_b(10)
    assert drops(mitm.b.pump) == {"bad_tag": 10}
    mitm.b.quiet()
    mitm.to_a(*(mitm.seal(mitm.a.session, i, p, role="b", key_role="a")
                for i, p in enumerate(packets)))
    settle(mitm.a.pump, "ingress", 5)
    assert drops(mitm.a.pump) == {"bad_tag": 5}
    mitm.a.quiet()
    assert mitm.a.pump.aead_peer_sessions == mitm.b.pump.aead_peer_sessions == 0
    # Told the truth, the same packets pass.
    mitm.to_b(*(mitm.seal(aead.new_session(aead.start_time()), i, p)
                for i, p in enumerate(packets)))
    mitm.b.expect(packets)


@pytest.mark.parametrize("cipher", CIPHERS)
def test_wire_version_1_datagrams_are_counted_as_aead_version(rig, cipher):
    """An older tunrelay at the other end (type byte 0x01, 20-byte header):
    counted as "aead_version" (the relay logs it), never tried, never
    delivered; the real peer's traffic is not disturbed."""
    rng = random.Random(1)
    mitm = Mitm(rig, cipher)
    old = [v1_datagram(rng, 20 + size + TAG, i) for i, size in enumerate((20, 28, 100, MTU))]
    old.append(v1_datagram(rng, OVERHEAD))               # the shortest that is counted
    mitm.to_b(*old, v1_datagram(rng, OVERHEAD - 1))      # shorter: too_short, as any
    mitm.settle_b(len(old) + 1)
    assert drops(mitm.b.pump) == {"aead_version": len(old), "too_short": 1}
    mitm.b.quiet()
    assert mitm.b.pump.aead_peer_sessions == 0
    packets = [random_packet(60, i) for i in range(3)]
    mitm.to_b(*mitm.from_a(packets))
    mitm.b.expect(packets)


# ================================================================ sessions

@pytest.mark.parametrize("later", [0, 1], ids=["same-second", "later"])
def test_restarted_sender_is_accepted_and_old_replays_are_not(rig, monkeypatch, later):
    """A restarts (a new Keyring, same socket and key).  Restarted later
    than it first started, its new session evicts the old one: the old
    recordings are stale_session.  Restarted within the same second, both
    sessions are live (as two queues would be) and the old recordings are
    replays of the old window."""
    started = aead.start_time()
    monkeypatch.setattr(aead, "start_time", lambda: started)
    mitm = Mitm(rig)
    first = [random_packet(70, i) for i in range(5)]
    old = mitm.from_a(first)
    mitm.to_b(*old)
    mitm.b.expect(first)
    assert mitm.b.pump.aead_peer_sessions == 1
    assert mitm.a.pump.stop(WAIT) is not None
    monkeypatch.setattr(aead, "start_time", lambda: started + later)
    restarted = rig.side(mitm.key, peer=mitm.m.getsockname(), sock=mitm.a.sock, role="a")
    assert restarted.keyring is not mitm.a.keyring
    assert start_of(restarted.session) == started + later
    assert restarted.session != mitm.a.session
    second = [random_packet(71, 100 + i) for i in range(5)]
    new = mitm.from_a(second, restarted)
    assert [counter_of(x) for x in new] == list(range(5))   # a new session starts at 0
    assert {session_of(x) for x in new} == {restarted.session}
    mitm.to_b(*new[:3])
    mitm.b.expect(second[:3])
    assert mitm.b.pump.aead_peer_sessions == 2
    assert mitm.b.keyring.counts() == {"sessions": 2, "evicted": later, "roams": 0,
                                       "live": 2 - later}
    mitm.to_b(*old)
    mitm.to_b(*new[3:])
    mitm.b.expect(second[3:])
    mitm.settle_b(15)
    assert drops(mitm.b.pump) == {"stale_session" if later else "replay": 5}
    mitm.b.quiet()
    assert mitm.b.pump.aead_peer_sessions == 2
    # And B -> restarted A works: B's datagrams at M, forwarded to A's address.
    back = [random_packet(72, 200 + i) for i in range(3)]
    for packet in back:
        mitm.b.write(packet)
    for datagram in mitm.capture(3, mitm.b):
        mitm.m.sendto(datagram, restarted.address)
    restarted.expect(back)
    assert restarted.pump.aead_peer_sessions == 1


def test_a_newer_session_evicts_the_older_ones_for_good(rig):
    """Issue 7, finding 4.  Sessions of one start time coexist, each with
    its window.  When a session with a newer start authenticates, every
    older one is evicted: its recordings, and even counters it never sent,
    are stale_session from then on (never a fresh window), as is any
    session that started before the newest, authentic or not (refused
    without crypto).  A sibling of the newest (same start) is welcome."""
    mitm = Mitm(rig)
    b, ring = mitm.b, mitm.b.keyring
    rng = random.Random(4)
    now = aead.start_time()
    packet = random_packet(64, 7)
    olds = [session_at(now - 100) for _ in range(3)]
    recorded = [mitm.seal(s, 0, packet) for s in olds]
    mitm.to_b(*recorded)
    b.expect([packet] * 3)
    mitm.to_b(*(mitm.seal(s, 1, packet) for s in olds))
    b.expect([packet] * 3)
    assert ring.counts() == {"sessions": 3, "evicted": 0, "roams": 0, "live": 3}
    mitm.to_b(recorded[0])
    mitm.settle_b(7)
    assert drops(b.pump) == {"replay": 1}          # while live: its own window
    live = session_at(now)
    mitm.to_b(mitm.seal(live, 0, packet))
    b.expect([packet])
    assert ring.counts() == {"sessions": 4, "evicted": 3, "roams": 0, "live": 1}
    stale = [*recorded, *(mitm.seal(s, 5, packet) for s in olds),
             mitm.seal(session_at(now - 1), 0, packet),    # authentic, started before
             garbage(rng, start=now - 1),                  # not even authentic
             garbage(rng, start=now - 100)]
    mitm.to_b(*stale)
    mitm.settle_b(8 + len(stale))
    assert drops(b.pump) == {"replay": 1, "stale_session": len(stale)}
    b.quiet()
    assert ring.counts() == {"sessions": 4, "evicted": 3, "roams": 0, "live": 1}
    sibling = session_at(now)
    mitm.to_b(mitm.seal(sibling, 0, packet), mitm.seal(live, 1, packet),
              mitm.seal(sibling, 1, packet))
    b.expect([packet] * 3)
    assert ring.counts() == {"sessions": 5, "evicted": 3, "roams": 0, "live": 2}
    mitm.to_b(mitm.seal(live, 0, packet), mitm.seal(sibling, 1, packet))
    mitm.settle_b(8 + len(stale) + 5)
    assert drops(b.pump) == {"replay": 3, "stale_session": len(stale)}
    b.quiet()


def test_equal_start_sessions_fill_the_table_least_recently_used_first(rig):
    """The table holds SLOTS sessions.  One more of the same start pushes
    out the least recently used; the others keep their windows."""
    mitm = Mitm(rig)
    b, ring = mitm.b, mitm.b.keyring
    now = aead.start_time()
    packet = random_packet(64, 9)
    sessions = [session_at(now) for _ in range(SLOTS)]
    for session in sessions:
        mitm.to_b(mitm.seal(session, 0, packet))
        b.expect([packet])
    # Touch all but sessions[0]: it is now the least recently used.
    mitm.to_b(*(mitm.seal(s, 1, packet) for s in sessions[1:]))
    b.expect([packet] * (SLOTS - 1))
    assert ring.counts() == {"sessions": SLOTS, "evicted": 0, "roams": 0, "live": SLOTS}
    ninth = session_at(now)
    mitm.to_b(mitm.seal(ninth, 0, packet))
    b.expect([packet])
    assert ring.counts() == {"sessions": SLOTS + 1, "evicted": 1, "roams": 0, "live": SLOTS}
    # The survivors' windows are intact: their counter 1 is still a replay.
    mitm.to_b(*(mitm.seal(s, 1, packet) for s in sessions[1:]), mitm.seal(ninth, 0, packet))
    mitm.settle_b(SLOTS + (SLOTS - 1) + 1 + SLOTS)
    assert drops(b.pump) == {"replay": SLOTS}
    b.quiet()


def test_a_flood_of_made_up_sessions_cannot_starve_a_restarted_peer(rig, monkeypatch):
    """Issue 7, finding 5: 5000 datagrams of made-up sessions (well-formed
    headers, role "a", start times no older than the newest), from the
    peer's address and from a stranger, while A restarts: every datagram of
    A's new session is delivered, the flood is bad_tag to the last one."""
    started = aead.start_time() - 60
    monkeypatch.setattr(aead, "start_time", lambda: started)
    mitm = Mitm(rig)
    stranger = rig.udp()
    first = [random_packet(70, i) for i in range(3)]
    old = mitm.from_a(first)
    mitm.to_b(*old)
    mitm.b.expect(first)
    assert mitm.a.pump.stop(WAIT) is not None
    monkeypatch.setattr(aead, "start_time", lambda: started + 5)
    restarted = rig.side(mitm.key, peer=mitm.m.getsockname(), sock=mitm.a.sock, role="a")
    second = [random_packet(80, 100 + i) for i in range(50)]
    new = mitm.from_a(second, restarted)
    rng = random.Random(5000)
    total = 3
    for datagram in new:
        for _ in range(100):
            start = started + 5 + (0 if rng.random() < 0.5 else rng.randrange(1, 1000))
            fake = garbage(rng, rng.choice((OVERHEAD, 60, 100, MTU + OVERHEAD)), start=start)
            if rng.random() < 0.5:
                mitm.to_b(fake)
            else:
                stranger.sendto(fake, mitm.b.address)
        mitm.to_b(datagram)       # the first: in the thick of the flood
        total += 101
        mitm.settle_b(total)      # (paced: no socket buffer overflows)
    mitm.b.expect(second)
    mitm.b.quiet()
    assert drops(mitm.b.pump) == {"bad_tag": 5000}
    assert mitm.b.pump.stats()["ingress"]["packets"] == 3 + 50
    assert mitm.b.keyring.counts() == {"sessions": 2, "evicted": 1, "roams": 0, "live": 1}
    mitm.to_b(*old)
    mitm.settle_b(total + 3)
    assert drops(mitm.b.pump) == {"bad_tag": 5000, "stale_session": 3}


# ================================================================ the peer's endpoint

def test_without_a_peer_nothing_is_sent_until_an_authentic_datagram(rig):
    """B without a configured peer (IPv6): its packets are no_peer drops
    until A's first authentic datagram; garbage, a datagram of another
    key, a cut one, a v1 one and a reflected one from M do not choose the
    peer.  Afterwards datagrams from M are still tried (aead has no
    not_peer): they are dropped for what they are."""
    key = os.urandom(32)
    m = rig.udp(socket.AF_INET6)
    sock_b = rig.udp(socket.AF_INET6, timeout=None)
    b = rig.side(key, sock=sock_b, peer=None, role="b")
    assert b.pump.peer is None and b.keyring.endpoint is None and not b.pump.learns_peer
    a = rig.side(key, sock=rig.udp(socket.AF_INET6, timeout=None),
                 peer=sock_b.getsockname()[:2], role="a")
    b.write(random_packet(60, 0))
    settle(b.pump, "egress", 1)
    assert drops(b.pump, "egress") == {"no_peer": 1}
    rng = random.Random(5)
    packet = random_packet(80, 1)
    now = aead.start_time()     # (a made-up session older than A's would be stale_session)
    forged = [garbage(rng), seal_datagram(os.urandom(32), aead.new_session(now), 0, packet),
              seal_datagram(key, aead.new_session(now), 0, packet)[:30],
              v1_datagram(rng, 100), seal_datagram(key, aead.new_session(now), 0, packet, role="b")]
    reasons = {"bad_tag": 2, "too_short": 1, "aead_version": 1, "reflected": 1}
    for datagram in forged:
        m.sendto(datagram, sock_b.getsockname())
    settle(b.pump, "ingress", 5)
    assert drops(b.pump) == reasons
    assert b.pump.peer is None
    b.write(random_packet(60, 2))
    settle(b.pump, "egress", 2)
    assert drops(b.pump, "egress") == {"no_peer": 2}
    packets = [random_packet(90, i) for i in range(3)]
    for p in packets:
        a.write(p)
    b.expect(packets)
    assert b.pump.peer == a.address[:2]
    for datagram in forged:
        m.sendto(datagram, sock_b.getsockname())
    settle(b.pump, "ingress", 13)
    assert drops(b.pump) == {reason: 2 * n for reason, n in reasons.items()}
    assert b.pump.peer == a.address[:2]
    back = [random_packet(100, 10 + i) for i in range(3)]
    for p in back:
        b.write(p)
    a.expect(back)
    a.quiet()
    b.quiet()
    assert drops(b.pump, "egress") == {"no_peer": 2}


def test_the_peer_roams_with_its_newest_authentic_datagram(rig):
    """Issue 7, finding 6.  B's configured peer P1 is only where it sends
    first.  A's datagrams (captured at M) arriving from A's own socket P2
    move B's peer there, and B's replies reach A.  From a third socket P3,
    a replay, an older datagram never seen, forgeries and a recording of an
    older session do not move it; only an authentic newest one would."""
    key = os.urandom(32)
    m, p1, p3 = rig.udp(), rig.udp(), rig.udp()
    b = rig.side(key, peer=p1.getsockname(), role="b")
    a = rig.side(key, peer=m.getsockname(), role="a")
    assert b.pump.peer == p1.getsockname()
    hello = random_packet(60, 0)
    b.write(hello)
    assert open_datagram(key, p1.recv(1 << 17), "chacha20-poly1305") == hello
    packets = [random_packet(70, i) for i in range(8)]
    for p in packets:
        a.write(p)
    d = [m.recvfrom(1 << 17) for _ in packets]
    assert {sender for _, sender in d} == {a.address}
    d = [data for data, _ in d]
    ring = b.keyring

    def from_socket(sock, *datagrams):
        for datagram in datagrams:
            sock.sendto(datagram, b.address)

    from_socket(a.sock, d[0], d[3])
    b.expect([packets[0], packets[3]])
    assert b.pump.peer == a.address and ring.counts()["roams"] == 1
    rng = random.Random(6)
    flipped = bytearray(d[5])
    flipped[-1] ^= 1
    forged = [d[0], d[3],                               # replays
              bytes(flipped), garbage(rng),             # forgeries
              seal_datagram(os.urandom(32), a.session, 7, packets[7]),
              seal_datagram(key, session_at(start_of(a.session) - 1), 0, packets[7])]
    from_socket(p3, *forged)
    settle(b.pump, "ingress", 2 + len(forged))
    assert drops(b.pump) == {"replay": 2, "bad_tag": 3, "stale_session": 1}
    from_socket(p3, d[2])                               # authentic, unseen, not the newest
    b.expect([packets[2]])
    assert b.pump.peer == a.address and ring.counts()["roams"] == 1
    back = [random_packet(80, 20 + i) for i in range(3)]
    for p in back:
        b.write(p)
    a.expect(back)
    # The newest authentic datagram moves it wherever it comes from (the
    # peer moved again), and the next from A moves it back.
    from_socket(p3, d[4])
    b.expect([packets[4]])
    assert b.pump.peer == p3.getsockname() and ring.counts()["roams"] == 2
    b.write(back[0])
    assert open_datagram(key, p3.recv(1 << 17), "chacha20-poly1305") == back[0]
    from_socket(a.sock, d[6], d[5])
    b.expect([packets[6], packets[5]])
    assert b.pump.peer == a.address and ring.counts()["roams"] == 3
    for p in back:
        b.write(p)
    a.expect(back)
    for sock in (p1, p3, m):
        assert_quiet(sock)
    b.quiet()


def test_queues_sharing_a_keyring_share_the_peer_endpoint(rig):
    """Two pumps (queues) on one Keyring, configured peer P1: A's datagram
    arriving at one queue moves the endpoint of both, so the other queue's
    packets go to A too."""
    key = os.urandom(32)
    m, p1 = rig.udp(), rig.udp()
    ring = keyring(key, role="b")
    queues = [rig.side(ring, peer=p1.getsockname()) for _ in range(2)]
    a = rig.side(key, peer=m.getsockname(), role="a")
    assert queues[0].pump.peer == queues[1].pump.peer == ring.endpoint == p1.getsockname()
    packet = random_packet(60, 1)
    a.write(packet)
    a.sock.sendto(m.recv(1 << 17), queues[0].address)
    queues[0].expect([packet])
    assert queues[0].pump.peer == queues[1].pump.peer == ring.endpoint == a.address
    back = [random_packet(70, 10 + i) for i in range(3)]
    for p in back:
        queues[1].write(p)
    a.expect(back)
    assert_quiet(p1)
    assert ring.counts() == {"sessions": 1, "evicted": 0, "roams": 1, "live": 1}


# ================================================================ queues

def test_four_queues_share_one_keyring_and_the_receiver_keeps_all_their_sessions(rig):
    """A relay with queues = 4: four pumps on one Keyring (one start time,
    four sessions) sending through SO_REUSEPORT sockets on one address.
    The receiving pump keeps all four sessions, so packets from every
    queue, interleaved, pass; and its replies reach the relay whichever
    queue's socket the kernel picks."""
    key = os.urandom(32)
    receiver_sock = rig.udp(timeout=None)
    ring = keyring(key, role="a")
    port, queues = 0, []
    for _ in range(4):
        sock = rig.keep(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        port = sock.getsockname()[1]
        queues.append(rig.side(ring, sock=sock, peer=receiver_sock.getsockname()))
    receiver = rig.side(key, sock=receiver_sock, peer=("127.0.0.1", port), role="b")
    assert all(q.pump.keyring is ring for q in queues)
    assert len({q.session for q in queues}) == 4
    assert {start_of(q.session) for q in queues} == {start_of(ring.new_session())}
    packets = [random_packet(60, i) for i in range(200)]
    for i, packet in enumerate(packets):
        queues[i % 4].write(packet)
        assert receiver.read() == packet
    receiver.quiet()
    assert drops(receiver.pump) == {}
    assert receiver.keyring.counts() == {"sessions": 4, "evicted": 0, "roams": 0, "live": 4}
    back = [random_packet(70, 1000 + i) for i in range(20)]
    for packet in back:
        receiver.write(packet)
    got = read_any(queues, len(back))
    assert sorted(sum(got, [])) == sorted(back)
    for q in queues:
        q.quiet()
    assert ring.counts()["sessions"] == 1 and all(q.pump.aead_peer_sessions == 1 for q in queues)


@pytest.mark.parametrize("shared", [True, False], ids=["one-keyring", "keyring-per-queue"])
def test_a_datagram_is_accepted_once_whatever_queue_receives_it(rig, shared):
    """Issue 7, finding 3: two receiving pumps (two queues, two sockets).
    M sends every datagram of A to both, first one queue then the other,
    then to both at once.  Sharing one Keyring, each packet is delivered
    once in total and the other copy is a replay.  (With a Keyring per
    queue, each queue has its own window and every packet comes out
    twice: what the shared table prevents.)"""
    key = os.urandom(32)
    m = rig.udp()
    a = rig.side(key, peer=m.getsockname(), role="a")
    rings = [keyring(key, role="b")] * 2 if shared else [key, key]
    queues = [rig.side(k, peer=m.getsockname(), role="b") for k in rings]
    assert (queues[0].keyring is queues[1].keyring) == shared
    packets = [random_packet(80, i) for i in range(60)]
    for p in packets:
        a.write(p)
    d = [m.recv(1 << 17) for _ in packets]
    for datagram in d[:20]:
        m.sendto(datagram, queues[0].address)
    queues[0].expect(packets[:20])
    for datagram in d[:20]:
        m.sendto(datagram, queues[1].address)
    settle(queues[1].pump, "ingress", 20)
    if shared:
        assert drops(queues[1].pump) == {"replay": 20}
        queues[1].quiet()
    else:
        queues[1].expect(packets[:20])
        assert drops(queues[1].pump) == {}
    for datagram in d[20:]:
        m.sendto(datagram, queues[0].address)
        m.sendto(datagram, queues[1].address)
    copies = 1 if shared else 2
    got = read_any(queues, 40 * copies)
    for q in queues:
        q.quiet()
    for q in queues:
        settle(q.pump, "ingress", 20 + 40)
    delivered = sum(got, [])
    assert sorted(delivered) == sorted(packets[20:] * copies)
    replays = sum(drops(q.pump).get("replay", 0) for q in queues)
    assert replays == (20 + 40 if shared else 0)
    assert sum(sum(drops(q.pump).values()) for q in queues) == replays
    if shared:
        assert queues[0].keyring.counts() == {"sessions": 1, "evicted": 0, "roams": 0, "live": 1}
        assert queues[0].pump.aead_peer_sessions == queues[1].pump.aead_peer_sessions == 1


# ================================================================ wrong keys

@pytest.mark.parametrize("mismatch", ["key", "cipher", "role"])
def test_other_key_cipher_or_role_passes_nothing(rig, mismatch):
    """Another key or cipher: every datagram is tried and fails (bad_tag).
    Both ends given the same role: every datagram carries the receiver's
    own role (reflected, no crypto at all)."""
    key = os.urandom(32)
    other_key = os.urandom(32) if mismatch == "key" else key
    other_cipher = "aes-256-gcm" if mismatch == "cipher" else "chacha20-poly1305"
    other_role = "a" if mismatch == "role" else "b"
    sock_a, sock_b = rig.udp(timeout=None), rig.udp(timeout=None)
    a = rig.side(key, "chacha20-poly1305", sock=sock_a, peer=sock_b.getsockname(), role="a")
    b = rig.side(other_key, other_cipher, sock=sock_b, peer=sock_a.getsockname(),
                 role=other_role)
    count = 10
    for i in range(count):
        a.write(ip_packet(100, i))
        b.write(ip_packet(100, 100 + i))
    reason = "reflected" if mismatch == "role" else "bad_tag"
    for side in (a, b):
        settle(side.pump, "ingress", count)
        # (a sender counts a datagram after sendmmsg returned: maybe after
        # the receiver saw it)
        settle(side.pump, "egress", count)
        assert drops(side.pump) == {reason: count}
        assert side.pump.stats()["ingress"]["packets"] == 0
        assert side.pump.aead_peer_sessions == 0
        assert side.pump.stats()["egress"]["packets"] == count
    a.quiet()
    b.quiet()


# ================================================================ offloads, seen by M

@pytest.mark.parametrize("cipher", CIPHERS)
def test_udp_super_packet_segments_are_each_sealed(rig, cipher):
    mitm = Mitm(rig, cipher, offload=True)
    mss = 500
    payload = os.urandom(5 * mss + 123)
    mitm.a.write_raw(udp_super_packet(payload, mss))
    d = mitm.capture(6)
    plains = []
    for i, datagram in enumerate(d):
        piece = payload[i * mss:(i + 1) * mss]
        assert len(datagram) == HEADER + 28 + len(piece) + TAG
        assert datagram[:4] == bytes((aead.TYPE_DATA, ROLE_BYTE["a"], 0, 0))
        assert counter_of(datagram) == i
        assert session_of(datagram) == mitm.a.session
        assert piece not in datagram
        plain = open_datagram(mitm.key, datagram, cipher)
        assert plain is not None
        assert int.from_bytes(plain[2:4], "big") == len(plain) == 28 + len(piece)
        assert int.from_bytes(plain[24:26], "big") == 8 + len(piece)
        assert plain[28:] == piece
        assert ones_sum(plain[:20]) == 0xFFFF and l4_checksum_ok(plain)
        plains.append(plain)
    mitm.to_b(*d)
    mitm.b.expect(plains)      # UDP is never coalesced: each behind a zero vnet header
    mitm.b.quiet()
    assert drops(mitm.b.pump) == {}


def test_a_forged_datagram_inside_a_gro_batch_drops_alone(rig):
    """M sends one UDP_SEGMENT (GSO) message of equal-sized datagrams to B,
    which receives it with UDP_GRO as one buffer: each datagram in it is
    opened on its own, a forged, replayed or reflected one is dropped
    alone."""
    mitm = Mitm(rig, offload=True)
    assert mitm.b.pump.offloads["gro"]
    packets = [random_packet(200, i) for i in range(8)]
    d = mitm.from_a(packets)
    mitm.to_b(d[0])
    mitm.b.expect(packets[:1])
    forged = bytearray(d[3])
    forged[100] ^= 0x40
    reflected = mitm.from_b([random_packet(200, 100)])[0]
    assert len(reflected) == len(d[1])
    batch = [d[1], d[2], bytes(forged), d[4], d[1], reflected, d[5], d[6][:150]]
    size = len(d[1])
    mitm.m.sendmsg([b"".join(batch)], [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))],
                   0, mitm.b.address)
    mitm.b.expect([packets[1], packets[2], packets[4], packets[5]])
    mitm.settle_b(1 + len(batch))
    assert drops(mitm.b.pump) == {"bad_tag": 2, "replay": 1, "reflected": 1}
    mitm.b.quiet()
    mitm.to_b(d[3], d[6], d[7])
    mitm.b.expect([packets[3], packets[6], packets[7]])


# ================================================================ the end of the counter space

def test_the_last_counter_is_never_used_and_nothing_is_sent_for_it(rig):
    """A seal at counter 2**64 - 1 fails: the packet is dropped as
    send_error and nothing at all leaves for it (nor for any after it)."""
    mitm = Mitm(rig, start_a=False)
    mitm.a.pump._set_send_counter(LAST_COUNTER - 1)
    mitm.a.pump.start()
    packets = [random_packet(100, i) for i in range(3)]
    mitm.a.write(packets[0])
    (last,) = mitm.capture(1)
    assert counter_of(last) == LAST_COUNTER - 1
    assert open_datagram(mitm.key, last, mitm.cipher) == packets[0]
    mitm.to_b(last)
    mitm.b.expect(packets[:1])
    for packet in packets[1:]:
        mitm.a.write(packet)
    settle(mitm.a.pump, "egress", 3)
    assert drops(mitm.a.pump, "egress") == {"send_error": 2}
    assert errors(mitm.a.pump, "egress") == {"write": 2}
    assert mitm.a.pump.stats()["egress"]["packets"] == 1
    assert_quiet(mitm.m, 0.2)


@pytest.mark.parametrize("room", [0, 2, 5])
def test_segments_past_the_last_counter_are_left_out(rig, room):
    """Issue 7, finding 8: with offloads, a UDP super-packet of 6 segments
    when only `room` counters are left: the segments that got a counter
    arrive, each a full valid datagram; the others are left out entirely
    (no 16-byte datagram of stale slot memory), counted send_error."""
    mitm = Mitm(rig, offload=True, start_a=False)
    mitm.a.pump._set_send_counter(LAST_COUNTER - room)
    mitm.a.pump.start()
    mss = 500
    payload = os.urandom(6 * mss)
    mitm.a.write_raw(udp_super_packet(payload, mss))
    settle(mitm.a.pump, "egress", 6)
    d = mitm.capture(room)
    assert_quiet(mitm.m, 0.2)
    assert drops(mitm.a.pump, "egress") == {"send_error": 6 - room}
    assert mitm.a.pump.stats()["egress"]["packets"] == room
    plains = []
    for i, datagram in enumerate(d):
        assert len(datagram) == HEADER + 28 + mss + TAG
        assert counter_of(datagram) == LAST_COUNTER - room + i
        plain = open_datagram(mitm.key, datagram, mitm.cipher)
        assert plain is not None and plain[28:] == payload[i * mss:(i + 1) * mss]
        plains.append(plain)
    mitm.to_b(*d)
    mitm.b.expect(plains)
    mitm.b.quiet()
    assert drops(mitm.b.pump) == {}


# ================================================================ hellos

@pytest.mark.parametrize("cipher", CIPHERS)
def test_a_hello_verifies_once_and_only_at_the_other_role(cipher):
    """Keyring("a").hello() is a sealed, empty record of type 0x03 that
    Keyring("b") verifies once: not twice (replay), not at another "a"
    (reflected), not with another key or cipher, not damaged, not as data."""
    psk = os.urandom(32)
    other_cipher = next(c for c in CIPHERS if c != cipher)
    ka, kb = keyring(psk, cipher, "a"), keyring(psk, cipher, "b")
    hello = ka.hello()
    assert len(hello) == OVERHEAD == aead.HELLO_RECORD_LEN - 2
    assert hello[:4] == bytes((aead.TYPE_HELLO, ROLE_BYTE["a"], 0, 0))
    assert counter_of(hello) == 0 and abs(start_of(session_of(hello)) - time.time()) < 120
    assert open_datagram(psk, hello, cipher) == b""         # independently: empty, authentic
    for stranger in (keyring(psk, cipher, "a"), keyring(os.urandom(32), cipher, "b"),
                     keyring(psk, other_cipher, "b")):
        assert not stranger.verify_hello(hello)
        assert stranger.counts()["sessions"] == 0
    rng = random.Random(3)
    damaged = []
    for position in range(len(hello)):
        for bit in range(8):
            flipped = bytearray(hello)
            flipped[position] ^= 1 << bit
            damaged.append(bytes(flipped))
    assert not any(kb.verify_hello(x) for x in damaged)
    assert not any(kb.verify_hello(x) for x in (b"", hello[:-1], hello + b"\0",
                                                bytes([aead.TYPE_DATA]) + hello[1:],
                                                garbage(rng, OVERHEAD)))
    assert kb.counts()["sessions"] == 0
    assert kb.verify_hello(hello)
    assert not kb.verify_hello(hello)                     # replayed
    assert kb.counts() == {"sessions": 1, "evicted": 0, "roams": 0, "live": 1}
    second = ka.hello()
    assert session_of(second) == session_of(hello) and counter_of(second) == 1
    assert kb.verify_hello(bytearray(second)) and not kb.verify_hello(second)
    # A hello the test seals is accepted (the Python keys agree), data is not.
    session = aead.new_session(aead.start_time())
    assert not kb.verify_hello(seal_datagram(psk, session, 0, b"", cipher, "a"))
    assert kb.verify_hello(seal_datagram(psk, session, 1, b"", cipher, "a",
                                         kind=aead.TYPE_HELLO))
    # And the other way.
    assert ka.verify_hello(kb.hello()) and not kb.verify_hello(kb.hello())


def test_a_hello_is_not_a_data_datagram(rig):
    """A hello fed to a pump as a datagram is bad_frame."""
    mitm = Mitm(rig)
    ka = keyring(mitm.key, role="a")
    mitm.to_b(ka.hello(), ka.hello())
    mitm.settle_b(2)
    assert drops(mitm.b.pump) == {"bad_frame": 2}
    mitm.b.quiet()
    assert mitm.b.pump.aead_peer_sessions == 0


# ================================================================ aead over TCP

def handshake(client: socket.socket, server: socket.socket, ka, kb) -> None:
    """What the relays do before their pumps start: the client ("a") sends
    its hello record, the server ("b") verifies it and answers with its own,
    which the client verifies.  Then the ends go to the pumps, blocking."""
    client.sendall(record(ka.hello()))
    first = recv_exactly(server, aead.HELLO_RECORD_LEN)
    assert first[:2] == OVERHEAD.to_bytes(2, "big")
    assert kb.verify_hello(first[2:])
    server.sendall(record(kb.hello()))
    assert ka.verify_hello(read_record(client))
    client.setblocking(True)
    server.setblocking(True)


@pytest.mark.parametrize("cipher", CIPHERS)
def test_two_pumps_over_tcp_relay_both_ways_byte_exact(rig, cipher):
    """aead over a real loopback TCP connection: hellos first, then each
    packet a len16 record of a sealed datagram, both ways, byte-exact."""
    key = os.urandom(32)
    client, server = rig.tcp_connection()
    ka, kb = keyring(key, cipher, "a"), keyring(key, cipher, "b")
    handshake(client, server, ka, kb)
    a = rig.side(ka, sock=client, peer=None)
    b = rig.side(kb, sock=server, peer=None)
    assert a.pump.framing == b.pump.framing == "aead" and a.pump.cipher == cipher
    assert a.pump.peer is None and not a.pump.offloads["vnet_hdr"]
    sent = exchange(a, b, 4)
    for side, name, other in ((a, "a", "b"), (b, "b", "a")):
        settle(side.pump, "egress", len(sent[name]))
        settle(side.pump, "ingress", len(sent[other]))
        stats = side.pump.stats()
        assert drops(side.pump, "ingress") == {} and drops(side.pump, "egress") == {}
        assert errors(side.pump, "ingress") == {} and errors(side.pump, "egress") == {}
        assert stats["egress"]["packets"] == len(sent[name])
        assert stats["egress"]["bytes"] == sum(map(len, sent[name]))
        assert stats["ingress"]["packets"] == len(sent[other])
        assert stats["ingress"]["bytes"] == sum(map(len, sent[other]))
        # The peer's hello session and its pump's session: one start time.
        assert side.keyring.counts() == {"sessions": 2, "evicted": 0, "roams": 0, "live": 2}


@pytest.mark.parametrize("cipher", CIPHERS)
def test_aead_tcp_records_are_len16_and_a_sealed_datagram(rig, cipher):
    """Only B is a pump (role "b"); the test reads and writes the raw
    stream.  Each record is a len16 length (of header + ciphertext + tag)
    and a datagram exactly as over UDP; records the test seals reach B's
    TUN, also when fed a byte at a time; a bad record (a hello among
    them) is dropped alone and the stream stays in step."""
    key = os.urandom(32)
    test_end, pump_end = rig.tcp_connection()
    pump_end.setblocking(True)
    b = rig.side(key, cipher, sock=pump_end, peer=None, role="b")
    sizes = (20, 100, 1000, MTU - 1, MTU)
    packets = [random_packet(size, i) for i, size in enumerate(sizes)]
    for packet in packets:
        b.write(packet)
    own = []
    for counter, packet in enumerate(packets):
        length = int.from_bytes(recv_exactly(test_end, 2), "big")
        assert length == len(packet) + OVERHEAD
        datagram = recv_exactly(test_end, length)
        assert datagram[:4] == bytes((aead.TYPE_DATA, ROLE_BYTE["b"], 0, 0))
        assert session_of(datagram) == b.session and counter_of(datagram) == counter
        assert open_datagram(key, datagram, cipher) == packet
        own.append(datagram)
    session = aead.new_session(aead.start_time())
    ins = [random_packet(size, 100 + i) for i, size in enumerate(sizes)]
    sealed = [seal_datagram(key, session, i, p, cipher) for i, p in enumerate(ins)]
    test_end.sendall(b"".join(record(x) for x in sealed[:-1]))
    for byte in record(sealed[-1]):
        test_end.send(bytes([byte]))
    b.expect(ins)
    flipped = bytearray(seal_datagram(key, session, 50, ins[1], cipher))   # a fresh counter
    flipped[HEADER + 5] ^= 1
    rng = random.Random(8)
    bad = {"bad_frame": [keyring(key, cipher, "a").hello()],   # a hello inside the stream
           "bad_tag": [bytes(flipped), garbage(rng, 300)],
           "replay": [sealed[0]],
           "reflected": [own[0]],
           "aead_version": [v1_datagram(rng, 100)],
           "too_short": [sealed[2][:OVERHEAD - 1]]}
    last = seal_datagram(key, session, len(ins), packets[0], cipher)
    test_end.sendall(b"".join(record(x) for group in bad.values() for x in group)
                     + record(last))
    b.expect([packets[0]])
    settle(b.pump, "ingress", len(ins) + sum(map(len, bad.values())) + 1)
    assert drops(b.pump) == {reason: len(group) for reason, group in bad.items()}
    assert errors(b.pump) == {} and b.pump.running
    b.quiet()
    assert b.pump.aead_peer_sessions == 1
    # The longest record is a packet of the MTU and its overhead: one byte
    # more is no record of this relay, and the connection is given up.
    test_end.sendall(record(bytes(MTU + OVERHEAD + 1)))
    assert b.pump.wait(WAIT) is not None
    assert errors(b.pump)["disconnect"] == 1
    b.quiet()


def test_a_stop_while_the_connection_is_full_drops_unsent_records_whole(rig):
    """Egress drop "stopped": a batch read from the TUN, the connection
    full, the pump stopped.  The records not begun are counted "stopped";
    one already partly on the wire is finished when the pump starts again
    on the connection: the peer reads only whole, authentic records."""
    key = os.urandom(32)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(TIMEOUT)
        test_end = rig.keep(socket.socket())
        test_end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # a small window
        test_end.settimeout(TIMEOUT)
        test_end.connect(listener.getsockname())
        pump_end, _ = listener.accept()
    rig.keep(pump_end).setblocking(True)
    pump_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    a = rig.side(key, sock=pump_end, peer=None, start=False, role="a")
    a.tun.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)   # room for the batch
    batch = 64         # one read of the rig's pumps: far more than the connection holds
    packets = [random_packet(MTU, i) for i in range(batch)]
    for packet in packets:
        a.write(packet)
    a.pump.start()
    wait_for(lambda: a.pump.stats()["egress"]["packets"] >= 1, "a record on the wire",
             lambda: a.pump.stats()["egress"])
    assert a.pump.stop(WAIT) is not None
    stopped = drops(a.pump, "egress").get("stopped", 0)
    assert stopped > 0 and drops(a.pump, "egress") == {"stopped": stopped}
    begun = batch - stopped
    assert begun - a.pump.stats()["egress"]["packets"] in (0, 1)
    more = [random_packet(200, 100 + i) for i in range(3)]
    for packet in more:
        a.write(packet)
    a.pump.start()
    counters = []
    for packet in packets[:begun] + more:
        datagram = read_record(test_end)
        assert open_datagram(key, datagram, "chacha20-poly1305") == packet
        counters.append(counter_of(datagram))
    assert counters == sorted(set(counters))
    settle(a.pump, "egress", batch + len(more))
    assert a.pump.stats()["egress"]["packets"] == begun + len(more)
    assert drops(a.pump, "egress") == {"stopped": stopped}
    assert_quiet(test_end, 0.1)


# ================================================================ pump arguments

def test_pump_and_keyring_arguments(rig):
    fastpath = load_fastpath()
    Pump, Keyring = fastpath.Pump, fastpath.Keyring
    tun_test, tun_pump = rig.tun()
    sock = rig.udp(timeout=None)
    key = os.urandom(32)
    with pytest.raises(ValueError, match="32 bytes"):
        Pump(tun_pump, sock, framing="aead")
    with pytest.raises(ValueError, match="32 bytes"):
        Pump(tun_pump, sock, framing="aead", key=os.urandom(31))
    with pytest.raises(ValueError, match="cipher"):
        Pump(tun_pump, sock, framing="aead", key=key, cipher="aes-128-gcm")
    with pytest.raises(ValueError, match="role"):
        Pump(tun_pump, sock, framing="aead", key=key, role="c")
    with pytest.raises(ValueError, match="aead"):
        Pump(tun_pump, sock, framing="raw", key=key)
    with pytest.raises(ValueError, match="32 bytes"):
        Keyring(os.urandom(33))
    with pytest.raises(ValueError, match="cipher"):
        Keyring(key, "aes-128-gcm")
    for role in ("c", "A", ""):
        with pytest.raises(ValueError, match="role"):
            Keyring(key, "chacha20-poly1305", role)
    assert Keyring(key).role == "a" and Keyring(key).cipher == "chacha20-poly1305"
    ring = Keyring(key, "aes-256-gcm", "b")
    first = Pump(tun_pump, sock, framing="aead", key=ring)
    second = Pump(tun_pump, sock, framing="aead", key=ring)
    assert first.keyring is second.keyring is ring
    assert first.cipher == "aes-256-gcm"
    assert first.aead_session != second.aead_session
    assert first.aead_session[:8] == second.aead_session[:8]          # one start time
    own = Pump(tun_pump, sock, framing="aead", key=key, role="b")
    assert own.keyring is not ring and own.keyring.role == "b"
    client, server = rig.tcp_connection()
    server.setblocking(True)
    over_tcp = Pump(tun_pump, server, framing="aead", key=key, role="b")
    assert over_tcp.framing == "aead" and over_tcp.peer is None
    with pytest.raises(ValueError, match="peer"):
        Pump(tun_pump, server, framing="aead", key=key, peer=("127.0.0.1", 1))
    raw = Pump(tun_pump, sock)
    assert raw.aead_session is None and raw.aead_peer_sessions == 0
    with pytest.raises(ValueError, match="aead"):
        raw._set_send_counter(0)


def test_python_pump_refuses_aead(rig):
    from tunrelay.pypump import PyPump
    tun_test, tun_pump = rig.tun()
    sock = rig.udp(timeout=None)
    with pytest.raises(ValueError, match="aead"):
        PyPump(tun_pump, sock, framing="aead")


# ================================================================ keys and configuration

def key_file(directory: Path, mode: int = 0o600, text: str | None = None,
             name: str = "relay.key") -> Path:
    path = directory / name
    path.write_text(aead.genkey() + "\n" if text is None else text)
    os.chmod(path, mode)
    return path


def test_load_key_reads_an_owner_only_genkey_file(tmp_path):
    path = key_file(tmp_path)
    key = aead.load_key(str(path), "relay.toml")
    assert key == base64.b64decode(path.read_text().strip()) and len(key) == 32
    os.chmod(path, 0o400)
    assert aead.load_key(str(path)) == key


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o602, 0o644])
def test_load_key_refuses_a_key_others_can_reach(tmp_path, mode):
    path = key_file(tmp_path, mode)
    with pytest.raises(ConfigError) as info:
        aead.load_key(str(path), "/etc/tunrelay/relay.toml")
    error = info.value
    assert error.key == "security.key_file"
    message = str(error)
    assert "/etc/tunrelay/relay.toml" in message and "[security] key_file" in message
    assert f"{mode:o}" in message and "chmod 600" in message and str(path) in message


@pytest.mark.parametrize("text", [
    "", "\n", "not base64 at all!\n", base64.b64encode(os.urandom(31)).decode(),
    base64.b64encode(os.urandom(33)).decode(), base64.b64encode(os.urandom(32)).decode()[:-2],
    base64.b64encode(os.urandom(64)).decode()])
def test_load_key_refuses_anything_but_32_bytes_of_base64(tmp_path, text):
    path = key_file(tmp_path, text=text)
    with pytest.raises(ConfigError, match="32 bytes") as info:
        aead.load_key(str(path), "relay.toml")
    assert info.value.key == "security.key_file" and "genkey" in str(info.value)


def test_load_key_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read key file") as info:
        aead.load_key(str(tmp_path / "nope.key"), "relay.toml")
    assert info.value.key == "security.key_file"


AEAD_CONFIG = """\
[transport]
framing = "aead"

[security]
key_file = "{key}"
role = "a"
{extra}
"""


def test_config_with_aead_reads_the_key_relative_to_the_config_file(tmp_path, monkeypatch):
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    path = key_file(conf_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)   # relative to the config file, not to the cwd
    cfg = loads(AEAD_CONFIG.format(key="relay.key", extra=""), str(conf_dir / "relay.toml"))
    assert cfg.security.key == base64.b64decode(path.read_text())
    assert cfg.security.cipher == "chacha20-poly1305"
    assert cfg.device.mtu == 1360 == 1400 - OVERHEAD
    assert cfg.security.role == "a"
    cfg = load(_write(conf_dir / "relay.toml", AEAD_CONFIG.format(
        key="relay.key", extra='cipher = "aes-256-gcm"\n[device]\nmtu = 1400')))
    assert cfg.device.mtu == 1400 and cfg.security.cipher == "aes-256-gcm"
    cfg = load(_write(conf_dir / "relay.toml", AEAD_CONFIG.format(
        key=str(path), extra="[device]\nmtu = 9000")))
    assert cfg.device.mtu == 9000 and len(cfg.security.key) == 32
    assert loads("").device.mtu == 1400    # other framings keep their default


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_config_with_aead_needs_the_compiled_engine(tmp_path):
    key_file(tmp_path)
    with pytest.raises(ConfigError, match="aead") as info:
        loads('[transport]\nframing = "aead"\n[relay]\nengine = "python"\n'
              '[security]\nkey_file = "relay.key"\nrole = "a"\n', str(tmp_path / "relay.toml"))
    assert info.value.key == "relay.engine"


def test_config_with_aead_over_tcp_takes_its_role_from_client_and_server(tmp_path):
    key_file(tmp_path)
    base = '[transport]\nprotocol = "tcp"\nframing = "aead"\n{peer}[security]\nkey_file = "relay.key"\n'
    server = loads(base.format(peer=""), str(tmp_path / "relay.toml"))
    client = loads(base.format(peer='peer = "192.0.2.1:55555"\n'), str(tmp_path / "relay.toml"))
    assert (server.security.role, client.security.role) == ("b", "a")
    assert server.device.mtu == client.device.mtu == 1400 - OVERHEAD
    with pytest.raises(ConfigError, match="role") as info:
        loads(base.format(peer="") + 'role = "a"\n', str(tmp_path / "relay.toml"))
    assert info.value.key == "security.role"


def test_config_with_aead_over_udp_needs_a_role(tmp_path):
    key_file(tmp_path)
    with pytest.raises(ConfigError, match="role") as info:
        loads('[transport]\nframing = "aead"\n[security]\nkey_file = "relay.key"\n',
              str(tmp_path / "relay.toml"))
    assert info.value.key == "security.role"


def test_config_with_aead_allows_as_many_queues_as_the_peer_keeps_sessions(tmp_path):
    key_file(tmp_path)
    text = ('[device]\nqueues = {}\n[transport]\nframing = "aead"\npeer = "192.0.2.1:55555"\n'
            '[security]\nkey_file = "relay.key"\nrole = "b"\n')
    assert loads(text.format(4), str(tmp_path / "relay.toml")).device.queues == 4
    with pytest.raises(ConfigError, match="at most 4") as info:
        loads(text.format(5), str(tmp_path / "relay.toml"))
    assert info.value.key == "device.queues"


def test_config_with_aead_needs_a_key_file(tmp_path):
    with pytest.raises(ConfigError, match="genkey") as info:
        loads('[transport]\nframing = "aead"\n', str(tmp_path / "relay.toml"))
    assert info.value.key == "security.key_file"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "tunrelay", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env=env)


def test_cli_check_refuses_a_group_readable_key(tmp_path):
    key = key_file(tmp_path)
    config = _write(tmp_path / "relay.toml", AEAD_CONFIG.format(key="relay.key", extra=""))
    done = run_cli("check", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert "framing aead" in done.stdout and "mtu 1360" in done.stdout
    os.chmod(key, 0o640)
    done = run_cli("check", "--config", str(config))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert str(key) in done.stderr and "chmod 600" in done.stderr
    assert str(config) in done.stderr and "[security] key_file" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_genkey_prints_a_new_32_byte_key_each_time():
    keys = []
    for _ in range(2):
        done = run_cli("genkey")
        assert done.returncode == 0, done.stderr
        line = done.stdout.strip()
        assert done.stdout == line + "\n" and len(line) == 44
        assert len(base64.b64decode(line, validate=True)) == 32
        keys.append(line)
    assert keys[0] != keys[1]
    assert aead.genkey() != aead.genkey()


def test_a_genkey_key_file_drives_two_pumps(rig, tmp_path):
    """The whole path: genkey -> key file -> load_key -> pumps that agree."""
    psk = aead.load_key(str(key_file(tmp_path)))
    mitm = Mitm(rig, key=psk)
    packets = [random_packet(90, i) for i in range(3)]
    d = mitm.from_a(packets)
    assert [open_datagram(psk, x, mitm.cipher) for x in d] == packets
    mitm.to_b(*d)
    mitm.b.expect(packets)
