"""The aead framing end to end, without root.

Two compiled pumps with ``framing="aead"`` and a pre-shared key; the TUN
of each is one end of a SOCK_SEQPACKET socketpair.  Most tests put a man in
the middle: both pumps' peer is a plain UDP socket M owned by the test, so
the test sees every datagram on the wire and decides what reaches the other
pump (forwarded from M, the address that pump accepts), untouched, replayed,
reordered, cut or with a bit flipped.

The test checks the cryptography independently: it opens and seals
datagrams with OpenSSL's libcrypto through ctypes (EVP), using the key from
``tunrelay.aead.derive_key``.  A datagram the test sealed being accepted by
a pump shows that the C HKDF (the receiver's) agrees with the Python one.

Nothing here can hang: test-side sockets have timeouts, every wait has a
deadline, and the rig stops every pump before it closes an fd.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
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
from conftest import ethernet_frame, ip_packet, ipv4_packet, load_fastpath
from pumprig import WAIT, Rig, counted, drops, wait_for

from tunrelay import aead
from tunrelay.config import load, loads
from tunrelay.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CIPHERS = aead.CIPHERS
MTU = 1400

HEADER, TAG, OVERHEAD = 20, 16, 36
WINDOW = 2048          # counters behind the newest that are still accepted: 2047
TRIALS_PER_S = 20      # key derivations for unknown sessions (token bucket)
SESSION_SLACK = 30     # s a new session may have started before the newest

VNET_HDR = struct.Struct("<BBHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_LEN = VNET_HDR.size
ZERO_VNET = bytes(VNET_LEN)
NEEDS_CSUM, GSO_TCPV4, GSO_UDP_L4 = 1, 1, 5
TCP_ACK, TCP_PSH = 0x10, 0x08
UDP_SEGMENT = 103      # linux/udp.h


# ================================================================ OpenSSL through ctypes

class LibCrypto:
    """The few EVP calls the test needs: AEAD seal/open and HKDF."""

    CTRL_AEAD_GET_TAG = 0x10
    CTRL_AEAD_SET_TAG = 0x11
    PKEY_HKDF = 1036    # NID_hkdf

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

    def hkdf_sha256(self, salt: bytes, ikm: bytes, info: bytes, length: int = 32) -> bytes:
        """OpenSSL's own HKDF (EVP_PKEY_HKDF, extract and expand)."""
        lib = self.lib
        vp, ci, cp = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
        try:
            new, derive_init = lib.EVP_PKEY_CTX_new_id, lib.EVP_PKEY_derive_init
            set_md, set_salt = lib.EVP_PKEY_CTX_set_hkdf_md, lib.EVP_PKEY_CTX_set1_hkdf_salt
            set_key, add_info = lib.EVP_PKEY_CTX_set1_hkdf_key, lib.EVP_PKEY_CTX_add1_hkdf_info
            derive, free = lib.EVP_PKEY_derive, lib.EVP_PKEY_CTX_free
        except AttributeError as exc:  # OpenSSL < 3: these are macros
            pytest.skip(f"libcrypto has no HKDF functions to call: {exc}")
        new.argtypes, new.restype = [ci, vp], vp
        derive_init.argtypes, derive_init.restype = [vp], ci
        set_md.argtypes, set_md.restype = [vp, vp], ci
        for fn in (set_salt, set_key, add_info):
            fn.argtypes, fn.restype = [vp, cp, ci], ci
        derive.argtypes, derive.restype = [vp, vp, ctypes.POINTER(ctypes.c_size_t)], ci
        free.argtypes, free.restype = [vp], None
        ctx = new(self.PKEY_HKDF, None)
        assert ctx
        try:
            assert derive_init(ctx) == 1
            assert set_md(ctx, lib.EVP_sha256()) == 1
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

def wire_header(session: bytes, counter: int, kind: int = 1,
                reserved: bytes = b"\0\0\0") -> bytes:
    return bytes([kind]) + reserved + session + counter.to_bytes(8, "big")


def nonce_of(counter: int) -> bytes:
    return bytes(4) + counter.to_bytes(8, "big")


def seal_datagram(psk: bytes, session: bytes, counter: int, packet: bytes,
                  cipher: str = "chacha20-poly1305") -> bytes:
    """A datagram as a sender with this session would make it."""
    header = wire_header(session, counter)
    key = aead.derive_key(psk, session, cipher)
    return header + libcrypto().seal(cipher, key, nonce_of(counter), header, packet)


def open_datagram(psk: bytes, datagram: bytes, cipher: str) -> bytes | None:
    """The packet in a datagram, decrypted by the test, or None."""
    header = datagram[:HEADER]
    key = aead.derive_key(psk, header[4:12], cipher)
    return libcrypto().open(cipher, key, nonce_of(int.from_bytes(header[12:20], "big")),
                            header, datagram[HEADER:])


def session_at(start: int) -> bytes:
    """A session id as aead.new_session() makes it, for a given start time."""
    return struct.pack("!I", start & 0xFFFFFFFF) + os.urandom(4)


def counter_of(datagram: bytes) -> int:
    return int.from_bytes(datagram[12:20], "big")


def random_packet(size: int, seq: int) -> bytes:
    """A valid IPv4 packet whose payload is random (it cannot show up on the
    wire by chance)."""
    return ipv4_packet(size, seq)[:20] + os.urandom(size - 20)


# ================================================================ IP builders (offload)

def ones_sum(data: bytes, initial: int = 0) -> int:
    if len(data) % 2:
        data += b"\0"
    total = initial + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


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
    """One pump and the test's end of its TUN stand-in."""

    def __init__(self, rig: "AeadRig", sock: socket.socket, key: bytes, cipher: str,
                 peer, offload: bool, start: bool = True, mode: str = "tun") -> None:
        self.tun, pump_end = rig.tun()
        self.sock = sock
        self.offload = offload
        self.pump = rig.pump(pump_end, sock, framing="aead", key=key, cipher=cipher,
                             peer=peer, offload=offload, mode=mode)
        if start:
            self.pump.start()

    @property
    def address(self):
        return self.sock.getsockname()

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

    def side(self, key: bytes, cipher: str = "chacha20-poly1305", *, peer, sock=None,
             offload: bool = False, start: bool = True, mode: str = "tun") -> Side:
        return Side(self, sock or self.udp(timeout=None), key, cipher, peer, offload, start,
                    mode)


@pytest.fixture
def rig():
    rig = AeadRig()
    yield rig
    rig.close()


class Mitm:
    """Pumps A and B whose peer is the test's socket M: A's datagrams are
    captured at M and forwarded to B (or not) by the test."""

    def __init__(self, rig: Rig, cipher: str = "chacha20-poly1305", *, key: bytes | None = None,
                 offload: bool = False) -> None:
        self.rig = rig
        self.key = key or os.urandom(32)
        self.cipher = cipher
        self.m = rig.udp()
        self.a = rig.side(self.key, cipher, peer=self.m.getsockname(), offload=offload)
        self.b = rig.side(self.key, cipher, peer=self.m.getsockname(), offload=offload)

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

    def to_b(self, *datagrams: bytes) -> None:
        for datagram in datagrams:
            self.m.sendto(datagram, self.b.address)

    def settle_b(self, total: int) -> None:
        """Wait until B's ingress dealt with `total` datagrams (moved or dropped)."""
        settle(self.b.pump, "ingress", total)


# ================================================================ two pumps

def roundtrip_packets(count: int, base: int) -> list[bytes]:
    sizes = (20, 40, 41, 64, 100, 576, 1279, 1280, MTU - 1, MTU)
    return [ip_packet(sizes[i % len(sizes)], base + i) for i in range(count)]


@pytest.mark.parametrize("offload", [False, True], ids=["plain", "offload"])
@pytest.mark.parametrize("cipher", CIPHERS)
def test_two_pumps_relay_both_ways_byte_exact(rig, cipher, offload):
    key = os.urandom(32)
    sock_a, sock_b = rig.udp(timeout=None), rig.udp(timeout=None)
    a = rig.side(key, cipher, sock=sock_a, peer=sock_b.getsockname(), offload=offload)
    b = rig.side(key, cipher, sock=sock_b, peer=sock_a.getsockname(), offload=offload)
    assert a.pump.framing == "aead" and a.pump.cipher == cipher
    assert len(a.pump.aead_session) == 16 and a.pump.aead_session != b.pump.aead_session
    assert a.pump.offloads["vnet_hdr"] == offload
    sent = {"a": [], "b": []}
    for burst in range(6):
        for src, dst, name in ((a, b, "a"), (b, a, "b")):
            packets = roundtrip_packets(40, 1000 * burst + (500 if name == "b" else 0))
            for packet in packets:
                src.write(packet)
            dst.expect(packets)
            sent[name] += packets
    a.quiet()
    b.quiet()
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


def test_tap_frames_pass_sealed(rig):
    key = os.urandom(32)
    sock_a, sock_b = rig.udp(timeout=None), rig.udp(timeout=None)
    a = rig.side(key, sock=sock_a, peer=sock_b.getsockname(), mode="tap")
    b = rig.side(key, sock=sock_b, peer=sock_a.getsockname(), mode="tap")
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
    a = rig.side(key, cipher, sock=sock_a, peer=sock_b.getsockname(), offload=True)
    b = rig.side(key, cipher, sock=sock_b, peer=sock_a.getsockname(), offload=True)
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
    session = bytes.fromhex(mitm.a.pump.aead_session)
    started = int.from_bytes(session[:4], "big")
    assert abs(started - time.time()) < 120, "a session id starts with its start time"
    packets = [random_packet(size, i) for i, size in
               enumerate((20, 21, 60, 100, 555, 1000, MTU - 1, MTU) * 3)]
    datagrams = mitm.from_a(packets)
    for counter, (packet, datagram) in enumerate(zip(packets, datagrams)):
        assert len(datagram) == len(packet) + OVERHEAD
        assert datagram[0] == 0x01 and datagram[1:4] == b"\0\0\0"
        assert datagram[4:12] == session
        assert counter_of(datagram) == counter
        assert packet[:20] not in datagram
        assert len(packet) < 36 or packet[20:] not in datagram   # 16+ random bytes
        # Decrypted by the test with derive_key's key: the sender's key is
        # HKDF(PSK, session) of the Python twin, and the header is the AAD.
        assert open_datagram(mitm.key, datagram, cipher) == packet
        assert open_datagram(mitm.key, datagram[:5] + bytes([datagram[5] ^ 1]) + datagram[6:],
                             cipher) is None
    mitm.to_b(*datagrams)
    mitm.b.expect(packets)
    mitm.b.quiet()
    assert drops(mitm.b.pump) == {}
    assert mitm.b.pump.aead_peer_sessions == 1


@pytest.mark.parametrize("cipher", CIPHERS)
def test_c_hkdf_agrees_with_derive_key(rig, cipher):
    """The receiver derives keys in C: a datagram the test sealed with
    derive_key()'s key for a session of its own is accepted."""
    mitm = Mitm(rig, cipher)
    session = aead.new_session()
    packets = [random_packet(60 + i, i) for i in range(5)]
    mitm.to_b(*(seal_datagram(mitm.key, session, i, p, cipher) for i, p in enumerate(packets)))
    mitm.b.expect(packets)
    assert mitm.b.pump.aead_peer_sessions == 1
    assert drops(mitm.b.pump) == {}


def test_derive_key_is_rfc5869_hkdf_sha256():
    """derive_key() agrees with OpenSSL's HKDF, and gives each cipher and
    each session its own key."""
    crypto = libcrypto()
    psk, session = os.urandom(32), os.urandom(8)
    keys = set()
    for cipher in CIPHERS:
        key = aead.derive_key(psk, session, cipher)
        assert key == crypto.hkdf_sha256(aead.SALT, psk, aead.label(cipher) + session)
        keys.add(key)
        keys.add(aead.derive_key(psk, session[:7] + bytes([session[7] ^ 1]), cipher))
    assert len(keys) == 4
    with pytest.raises(ValueError):
        aead.derive_key(psk[:31], session, CIPHERS[0])
    with pytest.raises(ValueError):
        aead.derive_key(psk, session + b"\0", CIPHERS[0])


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


@pytest.mark.parametrize("cipher", CIPHERS)
def test_every_flipped_bit_is_dropped(rig, cipher):
    """One bit flipped in any byte: the type and reserved bytes make
    bad_frame, everything else bad_tag (a flipped session id goes through
    the trial derivation and fails there).  Forged counters never move the
    replay window: the untouched datagram is accepted afterwards."""
    mitm = Mitm(rig, cipher)
    packets = [random_packet(60 + i, i) for i in range(4)]
    d = mitm.from_a(packets)
    mitm.to_b(d[0])
    mitm.b.expect(packets[:1])
    original = d[3]   # counter 3: no single flipped bit makes it 0, the one seen
    forged = []
    for position in range(len(original)):
        for bit in ((position % 8,) if position not in (12, 19) else range(8)):
            damaged = bytearray(original)
            damaged[position] ^= 1 << bit
            forged.append(bytes(damaged))
    mitm.to_b(*forged)
    mitm.settle_b(1 + len(forged))
    frame_bits = 4          # one per byte 0..3
    assert drops(mitm.b.pump) == {"bad_frame": frame_bits, "bad_tag": len(forged) - frame_bits}
    mitm.b.quiet()
    mitm.to_b(original)
    mitm.b.expect(packets[3:])
    mitm.b.quiet()
    assert mitm.b.pump.aead_peer_sessions == 1


def test_truncated_and_bad_frames_are_dropped(rig):
    mitm = Mitm(rig)
    packets = [random_packet(100, i) for i in range(3)]
    d = mitm.from_a(packets)
    mitm.to_b(d[0])
    mitm.b.expect(packets[:1])
    victim = d[1]
    short = [victim[:n] for n in (0, 1, 19, 20, 21, 35)]
    cut = [victim[:n] for n in (36, 37, len(victim) - 16, len(victim) - 1)]
    frames = [bytes([kind]) + victim[1:] for kind in (0x00, 0x02, 0x81, 0xFF)]
    frames += [victim[:i] + b"\x01" + victim[i + 1:] for i in (1, 2, 3)]
    mitm.to_b(*short, *cut, *frames)
    mitm.settle_b(1 + len(short) + len(cut) + len(frames))
    assert drops(mitm.b.pump) == {"too_short": len(short), "bad_tag": len(cut),
                                  "bad_frame": len(frames)}
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
    """2048 or more behind the newest: replay, even if never seen; 2047
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
    # The newest moves on by 2: what was 2046 behind is now 2048 behind.
    top += 2
    mitm.to_b(d[top], d[top - WINDOW], d[top - WINDOW + 1], d[top - 1])
    mitm.b.expect([packets[top], packets[top - WINDOW + 1], packets[top - 1]])
    mitm.settle_b(11)
    assert drops(mitm.b.pump) == {"replay": 5}
    # Every other counter of the window is accepted, once, in any order
    # (all 33 words of the bitmap, the one reused for the newest included).
    rest = list(range(top - WINDOW + 2, top - 3))
    random.Random(33).shuffle(rest)
    mitm.to_b(*(d[c] for c in rest))
    mitm.b.expect([packets[c] for c in rest])
    mitm.to_b(*(d[c] for c in rest[:50]))
    mitm.settle_b(11 + len(rest) + 50)
    assert drops(mitm.b.pump) == {"replay": 55}
    # A jump past the whole bitmap forgets everything older; the new edge
    # holds as before.
    far = total - 1
    assert far - top > 33 * 64
    mitm.to_b(d[far], d[far - WINDOW], d[top], d[top - 1], d[far - WINDOW + 1], d[far - 1])
    mitm.b.expect([packets[far], packets[far - WINDOW + 1], packets[far - 1]])
    mitm.settle_b(11 + len(rest) + 50 + 6)
    assert drops(mitm.b.pump) == {"replay": 58}
    mitm.b.quiet()


def replay_model(order: list[int]) -> list[bool]:
    """What an RFC 6479 receiver with a 2048-counter window accepts."""
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


@pytest.mark.parametrize("seed", [20260, 6479, 7])
def test_replay_window_against_a_model(rig, seed):
    """A long, seeded schedule of reordered, late and repeated datagrams:
    B accepts exactly what a model of the window accepts, in that order."""
    rng = random.Random(seed)
    total = 3000
    mitm = Mitm(rig)
    packets = [ipv4_packet(28, i) for i in range(total)]
    d = mitm.from_a(packets)
    order = sorted(range(total), key=lambda i: i + rng.uniform(0, 200))
    for _ in range(150):            # very late: near or past the window's end
        at = rng.randrange(len(order) - 2300)
        order.insert(at + rng.randint(1900, 2200), order.pop(at))
    for _ in range(600):            # repeats of something already forwarded
        at = rng.randrange(1, len(order))
        order.insert(at, order[rng.randrange(max(0, at - 2500), at)])
    verdicts = replay_model(order)
    assert 200 < verdicts.count(False) < len(order) - 2000   # the schedule tests something
    done = 0
    for first in range(0, len(order), 250):
        chunk = order[first:first + 250]
        mitm.to_b(*(d[i] for i in chunk))
        mitm.b.expect([packets[i] for i, ok in zip(chunk, verdicts[first:first + 250]) if ok])
        done += len(chunk)
        mitm.settle_b(done)
    mitm.b.quiet()
    assert drops(mitm.b.pump) == {"replay": verdicts.count(False)}
    assert mitm.b.pump.stats()["ingress"]["packets"] == verdicts.count(True)


def garbage(rng: random.Random, size: int = 100) -> bytes:
    """A well-formed header of a made-up session, random body and tag."""
    return wire_header(rng.randbytes(8), rng.getrandbits(64)) + rng.randbytes(size - HEADER)


def test_unknown_sessions_cost_bad_tag_then_are_rate_limited(rig):
    rng = random.Random(1)
    mitm = Mitm(rig)
    packets = [random_packet(50 + i, i) for i in range(16)]
    d = mitm.from_a(packets)
    mitm.to_b(d[0])
    mitm.b.expect(packets[:1])
    mitm.to_b(garbage(rng))
    mitm.settle_b(2)
    assert drops(mitm.b.pump) == {"bad_tag": 1}
    # A flood of made-up sessions, the live stream interleaved.
    flood = [garbage(rng) for _ in range(150)]
    start = time.monotonic()
    for i, datagram in enumerate(flood):
        mitm.to_b(datagram)
        if i % 10 == 9:
            mitm.to_b(d[1 + i // 10])
    mitm.b.expect(packets[1:16])
    mitm.settle_b(2 + len(flood) + 15)
    elapsed = time.monotonic() - start
    mitm.b.quiet()
    seen = drops(mitm.b.pump)
    bad_tag = seen.pop("bad_tag") - 1
    limited = seen.pop("unknown_session", 0)
    assert seen == {}
    assert bad_tag + limited == len(flood)
    # The bucket held 18..20 tokens (two derivations were just spent), and
    # refills 20 a second.
    assert TRIALS_PER_S - 2 <= bad_tag <= TRIALS_PER_S + 1 + TRIALS_PER_S * elapsed, elapsed
    if elapsed < 1.0:
        assert limited > 100, (elapsed, bad_tag, limited)
    assert mitm.b.pump.aead_peer_sessions == 1
    assert mitm.b.pump.stats()["ingress"]["packets"] == 16


# ================================================================ sessions

def test_restarted_sender_is_accepted_and_old_replays_are_not(rig):
    mitm = Mitm(rig)
    first = [random_packet(70, i) for i in range(5)]
    old = mitm.from_a(first)
    mitm.to_b(*old)
    mitm.b.expect(first)
    assert mitm.b.pump.aead_peer_sessions == 1
    # A restarts: a new pump on the same socket (same address), same key.
    assert mitm.a.pump.stop(WAIT) is not None
    restarted = rig.side(mitm.key, peer=mitm.m.getsockname(), sock=mitm.a.sock)
    assert restarted.pump.aead_session != mitm.a.pump.aead_session
    second = [random_packet(71, 100 + i) for i in range(5)]
    new = mitm.from_a(second, restarted)
    assert [counter_of(x) for x in new] == list(range(5))   # a new session starts at 0
    assert {x[4:12] for x in new} == {bytes.fromhex(restarted.pump.aead_session)}
    mitm.to_b(*new[:3])
    mitm.b.expect(second[:3])
    assert mitm.b.pump.aead_peer_sessions == 2
    # The old session is still cached: its datagrams are replays.
    mitm.to_b(*old)
    mitm.to_b(*new[3:])
    mitm.b.expect(second[3:])
    mitm.settle_b(15)
    assert drops(mitm.b.pump) == {"replay": 5}
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


def test_old_sessions_cannot_evict_the_live_one_or_be_replayed(rig):
    """Four cached sessions; a newer one evicts the least recently used.
    A session that started more than 30 s before the newest is refused as a
    replay when it is not cached, so an evicted session's recordings do not
    come back into a fresh window."""
    mitm = Mitm(rig)
    key, b = mitm.key, mitm.b
    now = int(time.time())
    olds = [session_at(now - 100) for _ in range(4)]
    packet = random_packet(64, 7)
    first = [seal_datagram(key, s, 0, packet) for s in olds]
    for i, datagram in enumerate(first):
        mitm.to_b(datagram)
        b.expect([packet])
        assert b.pump.aead_peer_sessions == i + 1
    # Use olds[0] again: olds[1] becomes the least recently used.
    mitm.to_b(seal_datagram(key, olds[0], 1, packet))
    b.expect([packet])
    live = session_at(now)
    mitm.to_b(seal_datagram(key, live, 0, packet))
    b.expect([packet])
    assert b.pump.aead_peer_sessions == 5
    mitm.to_b(first[1])                     # evicted, too old: replay (no new window)
    mitm.to_b(first[0], first[2], first[3])  # cached: the window says replay
    mitm.settle_b(10)
    assert drops(b.pump) == {"replay": 4}
    b.quiet()
    assert b.pump.aead_peer_sessions == 5
    # Cached old sessions keep working; a new session within the slack is
    # a restart, one beyond it a replay.
    mitm.to_b(seal_datagram(key, olds[2], 1, packet))
    mitm.to_b(seal_datagram(key, session_at(now - SESSION_SLACK), 0, packet))
    mitm.to_b(seal_datagram(key, session_at(now - SESSION_SLACK - 1), 0, packet))
    b.expect([packet, packet])
    mitm.settle_b(13)
    assert drops(b.pump) == {"replay": 5}
    assert b.pump.aead_peer_sessions == 6
    b.quiet()


def test_a_learned_peer_is_chosen_only_by_an_authentic_datagram(rig):
    """B without a configured peer (IPv6): garbage, a datagram of another
    key and a cut one from M do not choose the peer; A's first datagram
    does, and from then on M is not_peer (no key derivation spent)."""
    key = os.urandom(32)
    m = rig.udp(socket.AF_INET6)
    sock_b = rig.udp(socket.AF_INET6, timeout=None)
    b = rig.side(key, sock=sock_b, peer=None)
    assert b.pump.learns_peer and b.pump.peer is None
    a = rig.side(key, sock=rig.udp(socket.AF_INET6, timeout=None), peer=sock_b.getsockname()[:2])
    rng = random.Random(5)
    packet = random_packet(80, 1)
    forged = [garbage(rng), seal_datagram(os.urandom(32), aead.new_session(), 0, packet),
              seal_datagram(key, aead.new_session(), 0, packet)[:30]]
    for datagram in forged:
        m.sendto(datagram, sock_b.getsockname())
    settle(b.pump, "ingress", 3)
    assert drops(b.pump) == {"bad_tag": 2, "too_short": 1}
    assert b.pump.peer is None
    packets = [random_packet(90, i) for i in range(3)]
    for p in packets:
        a.write(p)
    b.expect(packets)
    assert b.pump.peer == a.address[:2]
    for datagram in forged:
        m.sendto(datagram, sock_b.getsockname())
    settle(b.pump, "ingress", 9)
    assert drops(b.pump) == {"bad_tag": 2, "too_short": 1, "not_peer": 3}
    back = [random_packet(100, 10 + i) for i in range(3)]
    for p in back:
        b.write(p)
    a.expect(back)
    a.quiet()
    b.quiet()


def test_four_queues_share_one_address_and_all_their_sessions_are_kept(rig):
    """A relay with queues = 4 sends from 4 pumps (4 sessions) through
    SO_REUSEPORT sockets on one address: the receiving pump keeps all four
    sessions (the config refuses more queues with aead), so packets from
    every queue, interleaved, pass without a single key derivation more."""
    key = os.urandom(32)
    receiver_sock = rig.udp(timeout=None)
    port, queues = 0, []
    for _ in range(4):
        sock = rig.keep(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        port = sock.getsockname()[1]
        queues.append(rig.side(key, sock=sock, peer=receiver_sock.getsockname()))
    receiver = rig.side(key, sock=receiver_sock, peer=("127.0.0.1", port))
    assert len({q.pump.aead_session for q in queues}) == 4
    packets = [random_packet(60, i) for i in range(200)]
    for i, packet in enumerate(packets):
        queues[i % 4].write(packet)
        assert receiver.read() == packet
    receiver.quiet()
    assert drops(receiver.pump) == {}
    assert receiver.pump.aead_peer_sessions == 4


# ================================================================ wrong keys

@pytest.mark.parametrize("mismatch", ["key", "cipher"])
def test_other_key_or_cipher_passes_nothing(rig, mismatch):
    key = os.urandom(32)
    other_key = os.urandom(32) if mismatch == "key" else key
    other_cipher = "aes-256-gcm" if mismatch == "cipher" else "chacha20-poly1305"
    sock_a, sock_b = rig.udp(timeout=None), rig.udp(timeout=None)
    a = rig.side(key, "chacha20-poly1305", sock=sock_a, peer=sock_b.getsockname())
    b = rig.side(other_key, other_cipher, sock=sock_b, peer=sock_a.getsockname())
    count = 10        # fewer than the derivations the bucket allows at once
    for i in range(count):
        a.write(ip_packet(100, i))
        b.write(ip_packet(100, 100 + i))
    for side in (a, b):
        settle(side.pump, "ingress", count)
        # (a sender counts a datagram after sendmmsg returned: maybe after
        # the receiver saw it)
        settle(side.pump, "egress", count)
        assert drops(side.pump) == {"bad_tag": count}
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
        assert counter_of(datagram) == i
        assert datagram[4:12] == bytes.fromhex(mitm.a.pump.aead_session)
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
    opened on its own, a forged or replayed one is dropped alone."""
    mitm = Mitm(rig, offload=True)
    assert mitm.b.pump.offloads["gro"]
    packets = [random_packet(200, i) for i in range(8)]
    d = mitm.from_a(packets)
    mitm.to_b(d[0])
    mitm.b.expect(packets[:1])
    forged = bytearray(d[3])
    forged[100] ^= 0x40
    batch = [d[1], d[2], bytes(forged), d[4], d[1], d[5], d[6][:150]]
    size = len(d[1])
    mitm.m.sendmsg([b"".join(batch)], [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))],
                   0, mitm.b.address)
    mitm.b.expect([packets[1], packets[2], packets[4], packets[5]])
    mitm.settle_b(1 + len(batch))
    assert drops(mitm.b.pump) == {"bad_tag": 2, "replay": 1}
    mitm.b.quiet()
    mitm.to_b(d[3], d[6], d[7])
    mitm.b.expect([packets[3], packets[6], packets[7]])


# ================================================================ pump arguments

def test_pump_arguments(rig):
    Pump = load_fastpath().Pump
    tun_test, tun_pump = rig.tun()
    sock = rig.udp(timeout=None)
    with pytest.raises(ValueError, match="32 bytes"):
        Pump(tun_pump, sock, framing="aead")
    with pytest.raises(ValueError, match="32 bytes"):
        Pump(tun_pump, sock, framing="aead", key=os.urandom(31))
    with pytest.raises(ValueError, match="cipher"):
        Pump(tun_pump, sock, framing="aead", key=os.urandom(32), cipher="aes-128-gcm")
    with pytest.raises(ValueError, match="aead"):
        Pump(tun_pump, sock, framing="raw", key=os.urandom(32))
    with socket.socket() as tcp:
        with pytest.raises(ValueError):
            Pump(tun_pump, tcp, framing="aead", key=os.urandom(32))
    raw = Pump(tun_pump, sock)
    assert raw.aead_session is None and raw.aead_peer_sessions == 0


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
    assert cfg.device.mtu == 1364 == 1400 - OVERHEAD
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


@pytest.mark.parametrize("text, key", [
    ('[transport]\nprotocol = "tcp"\nframing = "aead"\n', "transport.framing"),
    ('[transport]\nframing = "aead"\n[relay]\nengine = "python"\n', "relay.engine"),
])
def test_config_with_aead_needs_udp_and_the_compiled_engine(tmp_path, text, key):
    key_file(tmp_path)
    with pytest.raises(ConfigError, match="aead") as info:
        loads(text + '[security]\nkey_file = "relay.key"\n', str(tmp_path / "relay.toml"))
    assert info.value.key == key


def test_config_with_aead_allows_as_many_queues_as_the_peer_keeps_sessions(tmp_path):
    key_file(tmp_path)
    text = ('[device]\nqueues = {}\n[transport]\nframing = "aead"\npeer = "192.0.2.1:55555"\n'
            '[security]\nkey_file = "relay.key"\n')
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
    assert "framing aead" in done.stdout and "mtu 1364" in done.stdout
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
