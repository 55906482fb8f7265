"""Known answers and round trips for tunrelay.wireguard.noise: the Noise
primitives (RFC 7693 BLAKE2s, RFC 2104 HMAC over BLAKE2s, the KDF chain,
the protocol's constant chaining key and hash), the four handshake steps,
the key text forms, and exchanges recorded against wireguard-go
v0.0.20230223 (tests/data/wg, throwaway keys): our messages come out
byte-identical from the recorded inputs, and wireguard-go's open under
the keys we derive."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tunrelay.wireguard import cookie, noise
from tunrelay.wireguard.noise import HandshakeError, Identity

VECTORS = Path(__file__).resolve().parent / "data" / "wg"


def test_blake2s_rfc7693_abc() -> None:
    # RFC 7693 appendix B
    assert noise.blake2s(b"abc").hex() == (
        "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982")
    assert noise.blake2s(b"a", b"bc") == noise.blake2s(b"abc")


def test_initial_chain_and_hash() -> None:
    # Ci = HASH(construction), Hi = HASH(Ci || identifier): constants every
    # implementation shares.
    assert noise.INITIAL_CHAIN == bytes([
        96, 226, 109, 174, 243, 39, 239, 192, 46, 195, 53, 226, 160, 37, 210, 208, 22, 235,
        66, 6, 248, 114, 119, 245, 45, 56, 209, 152, 139, 120, 205, 54])
    assert noise.INITIAL_HASH == bytes([
        34, 17, 179, 97, 8, 26, 197, 102, 105, 18, 67, 219, 69, 138, 213, 50, 45, 156, 108,
        102, 34, 147, 232, 183, 14, 225, 156, 101, 186, 7, 158, 243])


def _rfc2104(key: bytes, data: bytes) -> bytes:
    # HMAC written out by hand over BLAKE2s's 64-byte block.
    block = 64
    if len(key) > block:
        key = hashlib.blake2s(key).digest()
    key = key.ljust(block, b"\0")
    inner = hashlib.blake2s(bytes(k ^ 0x36 for k in key) + data).digest()
    return hashlib.blake2s(bytes(k ^ 0x5C for k in key) + inner).digest()


@pytest.mark.parametrize("key,data", [(b"", b""), (b"k" * 32, b"abc"), (b"x" * 80, b"y" * 200)])
def test_hmac_is_rfc2104_over_blake2s(key: bytes, data: bytes) -> None:
    assert noise.hmac_blake2s(key, data) == _rfc2104(key, data)
    # and not BLAKE2s's keyed mode, a classic mistake
    if 0 < len(key) <= 32:
        assert noise.hmac_blake2s(key, data) != hashlib.blake2s(data, key=key).digest()


def test_kdf_chain() -> None:
    ck, data = bytes(range(32)), b"input key material"
    t0 = _rfc2104(ck, data)
    t1 = _rfc2104(t0, b"\x01")
    t2 = _rfc2104(t0, t1 + b"\x02")
    t3 = _rfc2104(t0, t2 + b"\x03")
    assert noise.kdf(1, ck, data) == (t1,)
    assert noise.kdf(2, ck, data) == (t1, t2)
    assert noise.kdf(3, ck, data) == (t1, t2, t3)


def test_tai64n_layout_and_order() -> None:
    ts = noise.tai64n(1_700_000_000.123456789, whiten=False)
    sec, nsec = struct.unpack(">QI", ts)
    assert len(ts) == 12 and sec == (1 << 62) + 10 + 1_700_000_000
    assert abs(nsec - 123456789) < 1000
    assert noise.tai64n(1.5) < noise.tai64n(2.0) < noise.tai64n(2.1)   # bytewise == time order
    assert struct.unpack(">QI", noise.tai64n(1.999))[1] % (1 << 24) == 0


def test_tai64n_after_is_strictly_greater() -> None:
    # Whitening makes stamps 10 ms apart equal; the peer would refuse the
    # second as a replay, so the sender steps past its last one.
    first = noise.tai64n(100.001)
    assert noise.tai64n(100.002) == first
    second = noise.tai64n_after(first, 100.002)
    assert second > first
    assert noise.tai64n_after(second, 100.002) > second
    assert noise.tai64n_after(first, 200.0) == noise.tai64n(200.0)
    # the step carries into the seconds
    edge = struct.pack(">QI", noise.TAI64_BASE + 5, 999_000_000)
    assert noise.tai64n_after(edge, 0.0) == struct.pack(">QI", noise.TAI64_BASE + 6, 0)


# ---------------------------------------------------------------- key text forms

def test_parse_key_round_trip() -> None:
    raw = bytes(range(32))
    text = noise.key_to_base64(raw)
    assert len(text) == 44 and noise.parse_key(text) == raw
    assert noise.parse_key(f"  {text}\n") == raw          # a key file's newline
    assert noise.key_from_hex(noise.key_to_hex(raw)) == raw
    assert noise.key_to_hex(raw) == raw.hex()


@pytest.mark.parametrize("text", [
    "", "abc", base64.b64encode(bytes(31)).decode(), base64.b64encode(bytes(33)).decode(),
    base64.b64encode(bytes(32)).decode()[:-1],              # padding missing
    "!" + base64.b64encode(bytes(32)).decode()[1:],        # not base64
    base64.b64encode(bytes(32)).decode()[:-2] + "B=",      # non-canonical last character
])
def test_parse_key_is_strict(text: str) -> None:
    with pytest.raises(ValueError, match="key"):
        noise.parse_key(text)


@pytest.mark.parametrize("text", ["", "00" * 31, "00" * 33, "zz" * 32, "00 " * 21 + "0"])
def test_key_from_hex_is_strict(text: str) -> None:
    with pytest.raises(ValueError, match="hex"):
        noise.key_from_hex(text)


def test_key_helpers_refuse_wrong_sizes() -> None:
    with pytest.raises(ValueError):
        noise.key_to_base64(bytes(31))
    with pytest.raises(ValueError):
        noise.private_to_public(bytes(33))


def test_generated_private_key_is_clamped_and_public_matches() -> None:
    priv = noise.generate_private_key()
    assert priv[0] & 7 == 0 and priv[31] & 0x80 == 0 and priv[31] & 0x40
    assert noise.private_to_public(priv) == Identity.from_bytes(priv).public
    assert noise.generate_private_key() != priv


def test_private_to_public_known_answer() -> None:
    # RFC 7748 section 6.1: Alice's key pair
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    assert noise.private_to_public(alice).hex() == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")


# ---------------------------------------------------------------- the handshake

def _handshake(psk: bytes = noise.ZERO32, psk_r: bytes | None = None
               ) -> tuple[Identity, Identity, bytes, bytes, noise.Keys, noise.Keys]:
    a, b = Identity.generate(), Identity.generate()
    init, st = noise.create_initiation(a, b.public, 0x11223344, psk=psk)
    got = noise.consume_initiation(b, init)
    assert got.remote_static == a.public and got.remote_index == 0x11223344
    resp, kb = noise.create_response(got, 0x55667788, psk=psk if psk_r is None else psk_r)
    ka = noise.consume_response(st, a, resp)
    return a, b, init, resp, ka, kb


@pytest.mark.parametrize("psk", [noise.ZERO32, bytes(range(32))])
def test_round_trip_keys_match(psk: bytes) -> None:
    _, _, init, resp, ka, kb = _handshake(psk)
    assert len(init) == 148 and len(resp) == 92
    assert init[:4] == b"\x01\0\0\0" and resp[:4] == b"\x02\0\0\0"
    assert ka.send_key == kb.recv_key and ka.recv_key == kb.send_key
    assert ka.send_key != ka.recv_key
    assert (ka.local_index, ka.remote_index) == (0x11223344, 0x55667788)
    assert (kb.local_index, kb.remote_index) == (0x55667788, 0x11223344)
    assert ka.initiator and not kb.initiator
    pkt = bytes.fromhex("4500001c0000000040010000c0a80001c0a80002") + b"\x08\0\xf7\xff\0\0\0\0"
    msg = noise.seal_transport(ka.send_key, kb.local_index, 0, pkt)
    assert len(msg) == 16 + 32 + 16 and len(msg) % 16 == 0
    r, c, plain = noise.open_transport(kb.recv_key, msg)
    assert (r, c) == (kb.local_index, 0)
    assert plain[:len(pkt)] == pkt and plain[len(pkt):] == bytes(4)
    keepalive = noise.seal_transport(kb.send_key, ka.local_index, 0, b"")
    assert len(keepalive) == 32 and noise.open_transport(ka.recv_key, keepalive)[2] == b""


def test_precomputed_static_secret_gives_the_same_keys() -> None:
    a, b = Identity.generate(), Identity.generate()
    ss = noise.dh(a.private, b.public)
    eph = X25519PrivateKey.generate()
    ts = noise.tai64n()
    plain, _ = noise.create_initiation(a, b.public, 3, timestamp=ts, ephemeral=eph)
    pre, _ = noise.create_initiation(a, b.public, 3, timestamp=ts, ephemeral=eph, static_secret=ss)
    assert plain == pre
    seen: list[bytes] = []

    def lookup(static: bytes) -> bytes:
        seen.append(static)
        return ss

    got = noise.consume_initiation(b, pre, lookup)
    assert seen == [a.public] and got.timestamp == ts
    # a wrong precomputed secret makes the timestamp fail to open
    with pytest.raises(HandshakeError):
        noise.consume_initiation(b, pre, lambda static: bytes(32))


def test_psk_mismatch_fails_at_response() -> None:
    with pytest.raises(HandshakeError):
        _handshake(psk=noise.ZERO32, psk_r=b"\x01" * 32)


def test_wrong_responder_cannot_read_initiation() -> None:
    a, b, c = Identity.generate(), Identity.generate(), Identity.generate()
    init, _ = noise.create_initiation(a, b.public, 1)
    with pytest.raises(HandshakeError):
        noise.consume_initiation(c, init)


@pytest.mark.parametrize("offset", [0, 1, 8, 40, 100, 115])
def test_tampered_initiation_rejected(offset: int) -> None:
    a, b = Identity.generate(), Identity.generate()
    init, _ = noise.create_initiation(a, b.public, 1)
    bad = bytearray(init)
    bad[offset] ^= 1
    with pytest.raises(HandshakeError):
        noise.consume_initiation(b, bytes(bad))


def test_low_order_ephemeral_is_a_handshake_error() -> None:
    # An all-zero ephemeral key is a low-order point: the DH result is zero,
    # which must be a refusal, not an exception of another kind.
    a, b = Identity.generate(), Identity.generate()
    init, _ = noise.create_initiation(a, b.public, 1)
    bad = init[:8] + bytes(32) + init[40:]
    with pytest.raises(HandshakeError):
        noise.consume_initiation(b, bad)


@pytest.mark.parametrize("size", [0, 1, 91, 93, 147, 149])
def test_wrong_sizes_rejected(size: int) -> None:
    a, b = Identity.generate(), Identity.generate()
    init, st = noise.create_initiation(a, b.public, 1)
    with pytest.raises(HandshakeError):
        noise.consume_initiation(b, (init * 2)[:size])
    with pytest.raises(HandshakeError):
        noise.consume_response(st, a, (b"\x02" + bytes(200))[:size])


def test_response_to_other_index_rejected() -> None:
    a, b = Identity.generate(), Identity.generate()
    init, st = noise.create_initiation(a, b.public, 7)
    resp, _ = noise.create_response(noise.consume_initiation(b, init), 9)
    bad = bytearray(resp)
    bad[8] ^= 1
    with pytest.raises(HandshakeError):
        noise.consume_response(st, a, bytes(bad))


def test_deterministic_with_fixed_ephemerals() -> None:
    # Same inputs, same bytes: the basis for the recorded (interop) vectors.
    a = Identity.from_bytes(bytes([1] * 32))
    b = Identity.from_bytes(bytes([2] * 32))
    ea = X25519PrivateKey.from_private_bytes(bytes([3] * 32))
    eb = X25519PrivateKey.from_private_bytes(bytes([4] * 32))
    ts = noise.tai64n(1_000_000_000.0)
    m1, st = noise.create_initiation(a, b.public, 1, timestamp=ts, ephemeral=ea)
    m1b, _ = noise.create_initiation(a, b.public, 1, timestamp=ts, ephemeral=ea)
    assert m1 == m1b
    got = noise.consume_initiation(b, m1)
    assert got.timestamp == ts
    m2, kb = noise.create_response(got, 2, ephemeral=eb)
    ka = noise.consume_response(st, a, m2)
    assert ka.send_key == kb.recv_key


# ---------------------------------------------------------------- recorded against wireguard-go

def load(name: str) -> dict[str, bytes]:
    raw = json.loads((VECTORS / name).read_text())
    return {k: bytes.fromhex(v) for k, v in raw.items() if k != "role"}


def test_we_initiate_wireguard_go_responds() -> None:
    v = load("vector-initiator.json")
    me = Identity.from_bytes(v["my_private"])
    (index,) = struct.unpack_from("<I", v["initiation"], 4)
    init, st = noise.create_initiation(
        me, v["peer_public"], index, timestamp=v["timestamp"],
        ephemeral=X25519PrivateKey.from_private_bytes(v["ephemeral"]))
    assert cookie.MacSigner(v["peer_public"]).sign(init) == v["initiation"]
    assert cookie.MacVerifier(me.public).mac1_ok(v["response"])
    keys = noise.consume_response(st, me, v["response"])
    assert (keys.send_key, keys.recv_key) == (v["send_key"], v["recv_key"])
    assert noise.seal_transport(keys.send_key, keys.remote_index, 0,
                                noise.open_transport(v["send_key"], v["sent"])[2]) == v["sent"]
    receiver, counter, plain = noise.open_transport(keys.recv_key, v["received"])
    assert receiver == index and counter == 0 and plain[20] == 0      # ICMP echo reply


def test_wireguard_go_initiates_we_respond() -> None:
    v = load("vector-responder.json")
    me = Identity.from_bytes(v["my_private"])
    assert cookie.MacVerifier(me.public).mac1_ok(v["initiation"])
    got = noise.consume_initiation(me, v["initiation"])
    assert got.remote_static == v["peer_public"]
    # wireguard-go whitens its TAI64N: nanoseconds are a multiple of 2^24
    assert struct.unpack(">QI", got.timestamp)[1] % (1 << 24) == 0
    (index,) = struct.unpack_from("<I", v["response"], 4)
    resp, keys = noise.create_response(
        got, index, ephemeral=X25519PrivateKey.from_private_bytes(v["ephemeral"]))
    assert cookie.MacSigner(v["peer_public"]).sign(resp) == v["response"]
    assert (keys.send_key, keys.recv_key) == (v["send_key"], v["recv_key"])
    receiver, counter, plain = noise.open_transport(keys.recv_key, v["received"])
    assert receiver == index and plain[20] == 8                        # ICMP echo request
