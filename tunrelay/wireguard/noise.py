"""WireGuard's handshake, Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s, and its keys.

Pure functions and small state objects: no sockets, and no clock unless
one is given.  The device (device.py) drives them; the data path (type 4,
transport) is the compiled "session" framing, so only the handshake lives
here.  mac1/mac2 are cookie.py's: this module builds the message bodies
and leaves 32 zero bytes for the macs, which cookie.MacSigner fills in.

Wire formats (all integers little-endian):

  initiation (148): u8 type=1, 3 zero, u32 sender, 32 ephemeral,
                    48 sealed static (32+16), 28 sealed TAI64N (12+16),
                    16 mac1, 16 mac2
  response    (92): u8 type=2, 3 zero, u32 sender, u32 receiver,
                    32 ephemeral, 16 sealed empty, 16 mac1, 16 mac2
  transport (>=32): u8 type=4, 3 zero, u32 receiver, u64 counter,
                    sealed padded packet (len%16==0) + 16 tag

Every refusal of untrusted input is a HandshakeError (a ValueError), so a
caller catches exactly one thing and counts it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac as _hmac
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

__all__ = [
    "CONSTRUCTION", "IDENTIFIER", "HandshakeError", "UnknownPeer", "Identity", "Initiation",
    "InitiatorState",
    "Keys", "KEY_SIZE", "blake2s", "consume_initiation", "consume_response",
    "create_initiation", "create_response", "generate_private_key", "hmac_blake2s", "kdf",
    "key_from_hex", "key_to_base64", "key_to_hex", "keyed_mac", "parse_key",
    "private_to_public", "random_index", "tai64n",
]

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"

MSG_INITIATION, MSG_RESPONSE, MSG_COOKIE, MSG_TRANSPORT = 1, 2, 3, 4
INITIATION_SIZE, RESPONSE_SIZE, COOKIE_SIZE, TRANSPORT_MIN = 148, 92, 64, 32
TRANSPORT_HEADER = 16
KEY_SIZE = 32
EMPTY = b""
ZERO32 = bytes(32)


class HandshakeError(ValueError):
    """A handshake message that does not parse or does not authenticate."""


class UnknownPeer(HandshakeError):
    """An initiation that opens, from a static key we do not know (raised by
    consume_initiation's ``static_secret`` lookup, before the second DH)."""


# ---------------------------------------------------------------- keys (text forms)

def parse_key(text: str) -> bytes:
    """A key as ``wg`` writes it: base64 of exactly 32 bytes (44 characters,
    one ``=`` of padding).  Strict, so a truncated or pasted-wrong key is an
    error rather than a different key."""
    if not isinstance(text, str):
        raise ValueError(f"a key is base64 text, got {type(text).__name__}")
    stripped = text.strip()
    if len(stripped) != 44 or not stripped.endswith("=") or stripped.endswith("=="):
        raise ValueError(f"a key is 44 characters of base64 (32 bytes), got {len(stripped)} "
                         f"characters")
    try:
        raw = base64.b64decode(stripped, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"a key is base64 of 32 bytes: {exc}") from None
    if len(raw) != KEY_SIZE or base64.b64encode(raw).decode("ascii") != stripped:
        raise ValueError("a key is base64 of 32 bytes (non-canonical encoding)")
    return raw


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_SIZE:
        found = len(key) if isinstance(key, (bytes, bytearray)) else type(key).__name__
        raise ValueError(f"a key is 32 bytes, got {found}")
    return bytes(key)


def key_to_base64(key: bytes) -> str:
    """The form ``wg`` shows and config files hold."""
    return base64.b64encode(_check_key(key)).decode("ascii")


def key_to_hex(key: bytes) -> str:
    """The form the UAPI speaks (64 lowercase hex digits)."""
    return _check_key(key).hex()


def key_from_hex(text: str) -> bytes:
    """A UAPI key: exactly 64 hex digits."""
    if not isinstance(text, str) or len(text) != 2 * KEY_SIZE:
        found = len(text) if isinstance(text, str) else type(text).__name__
        raise ValueError(f"a hex key is 64 hex digits, got {found}")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ValueError("a hex key is 64 hex digits (0-9, a-f)") from None
    if len(raw) != KEY_SIZE:      # fromhex skips spaces: "00 11 ..." is no key
        raise ValueError("a hex key is 64 hex digits (0-9, a-f), no spaces")
    return raw


def generate_private_key() -> bytes:
    """A fresh X25519 private key, clamped as ``wg genkey`` writes it."""
    raw = bytearray(os.urandom(KEY_SIZE))
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return bytes(raw)


def private_to_public(private: bytes) -> bytes:
    """The public key of a private key (``wg pubkey``)."""
    return public_bytes(X25519PrivateKey.from_private_bytes(_check_key(private)))


# ---------------------------------------------------------------- primitives

def blake2s(*parts: bytes) -> bytes:
    """BLAKE2s-256 of the concatenation (Noise's HASH)."""
    h = hashlib.blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def hmac_blake2s(key: bytes, data: bytes) -> bytes:
    """RFC 2104 over BLAKE2s (64-byte block), *not* BLAKE2s's own keyed
    mode: Noise's HMAC-HASH, the base of its KDF."""
    return _hmac.new(key, data, hashlib.blake2s).digest()


def kdf(n: int, chaining_key: bytes, data: bytes) -> tuple[bytes, ...]:
    """HKDF with HMAC-BLAKE2s, n outputs of 32 bytes, empty info."""
    prk = hmac_blake2s(chaining_key, data)
    out: list[bytes] = []
    prev = b""
    for i in range(1, n + 1):
        prev = hmac_blake2s(prk, prev + bytes([i]))
        out.append(prev)
    return tuple(out)


def keyed_mac(key: bytes, data: bytes) -> bytes:
    """BLAKE2s in its own keyed mode, 16-byte digest (mac1, mac2, cookies)."""
    return hashlib.blake2s(data, key=key, digest_size=16).digest()


def _nonce(counter: int) -> bytes:
    return b"\0\0\0\0" + struct.pack("<Q", counter)


def seal(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_nonce(counter), plaintext, aad)


def open_(key: bytes, counter: int, sealed: bytes, aad: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(_nonce(counter), sealed, aad)
    except InvalidTag:
        raise HandshakeError("does not authenticate") from None


def dh(private: X25519PrivateKey, public: bytes) -> bytes:
    """X25519.  A low-order public key gives the all-zero secret, which
    ``cryptography`` refuses: that is a HandshakeError, not a crash."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:
        raise HandshakeError(f"key exchange refused: {exc}") from None


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def private_bytes(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


TAI64_BASE = (1 << 62) + 10      # TAI64 label plus TAI-UTC offset (as wireguard-go does)
TAI64N_WHITEN = 1 << 24          # ns: timestamps carry no finer timing than this


def tai64n(now: float | None = None, *, whiten: bool = True) -> bytes:
    """12 bytes: big-endian TAI64 seconds, big-endian nanoseconds.  Whitened
    (nanoseconds rounded down to 2^24 ns) so the timestamp leaks less timing."""
    ns = time.time_ns() if now is None else int(now * 1e9)
    sec, nsec = divmod(ns, 1_000_000_000)
    if whiten:
        nsec -= nsec % TAI64N_WHITEN
    return struct.pack(">QI", TAI64_BASE + sec, nsec)


def tai64n_after(previous: bytes | None, now: float | None = None) -> bytes:
    """A timestamp strictly greater than ``previous``: whitening makes two
    initiations within ~16.8 ms equal, and the peer refuses an equal one
    as a replay.  So one whitening step later than ``previous`` when the
    clock has not moved on far enough."""
    stamp = tai64n(now)
    if previous is None or stamp > previous:
        return stamp
    sec, nsec = struct.unpack(">QI", previous)
    nsec += TAI64N_WHITEN
    if nsec >= 1_000_000_000:
        sec, nsec = sec + 1, 0
    return struct.pack(">QI", sec, nsec)


# Ci and Hi: the same for every handshake.
INITIAL_CHAIN = blake2s(CONSTRUCTION)
INITIAL_HASH = blake2s(INITIAL_CHAIN, IDENTIFIER)


@dataclass
class Keys:
    """A finished handshake: what PeerTable.install_session takes."""
    local_index: int
    remote_index: int
    send_key: bytes
    recv_key: bytes
    initiator: bool


@dataclass
class Identity:
    """Our static key pair."""
    private: X25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_bytes(cls, raw: bytes) -> Identity:
        return cls(X25519PrivateKey.from_private_bytes(_check_key(raw)))

    @property
    def public(self) -> bytes:
        return public_bytes(self.private)


# ---------------------------------------------------------------- initiator

@dataclass
class InitiatorState:
    """What the initiator keeps between its initiation and the response."""
    local_index: int
    chain: bytes
    hash: bytes
    ephemeral: X25519PrivateKey
    remote_static: bytes
    psk: bytes


def create_initiation(me: Identity, remote_static: bytes, local_index: int, *,
                      psk: bytes = ZERO32, timestamp: bytes | None = None,
                      ephemeral: X25519PrivateKey | None = None,
                      static_secret: bytes | None = None) -> tuple[bytes, InitiatorState]:
    """The 148-byte initiation (macs zero) and the state to finish it.
    ``static_secret``: DH(our static, their static), precomputed per peer
    (it changes only with either key)."""
    e = ephemeral or X25519PrivateKey.generate()
    e_pub = public_bytes(e)
    h = blake2s(INITIAL_HASH, remote_static)
    c = INITIAL_CHAIN
    (c,) = kdf(1, c, e_pub)
    h = blake2s(h, e_pub)
    c, k = kdf(2, c, dh(e, remote_static))
    enc_static = seal(k, 0, me.public, h)
    h = blake2s(h, enc_static)
    ss = static_secret if static_secret is not None else dh(me.private, remote_static)
    c, k = kdf(2, c, ss)
    enc_time = seal(k, 0, timestamp if timestamp is not None else tai64n(), h)
    h = blake2s(h, enc_time)
    msg = (struct.pack("<B3xI", MSG_INITIATION, local_index) + e_pub + enc_static
           + enc_time + bytes(32))
    assert len(msg) == INITIATION_SIZE
    return msg, InitiatorState(local_index, c, h, e, remote_static, psk)


def response_indexes(msg: bytes) -> tuple[int, int]:
    """(sender, receiver) of a response, checking its size and header."""
    if len(msg) != RESPONSE_SIZE or msg[0] != MSG_RESPONSE or msg[1:4] != b"\0\0\0":
        raise HandshakeError("not a response")
    sender, receiver = struct.unpack_from("<II", msg, 4)
    return sender, receiver


def consume_response(state: InitiatorState, me: Identity, msg: bytes) -> Keys:
    """Check a response (macs are cookie.py's job) and derive the keys."""
    sender, receiver = response_indexes(msg)
    if receiver != state.local_index:
        raise HandshakeError("response to another initiation")
    e_r = msg[12:44]
    enc_empty = msg[44:60]
    c, h = state.chain, state.hash
    (c,) = kdf(1, c, e_r)
    h = blake2s(h, e_r)
    (c,) = kdf(1, c, dh(state.ephemeral, e_r))
    (c,) = kdf(1, c, dh(me.private, e_r))
    c, tau, k = kdf(3, c, state.psk)
    h = blake2s(h, tau)
    open_(k, 0, enc_empty, h)
    h = blake2s(h, enc_empty)
    send, recv = kdf(2, c, EMPTY)
    return Keys(state.local_index, sender, send, recv, initiator=True)


# ---------------------------------------------------------------- responder

@dataclass
class Initiation:
    """A parsed, authenticated initiation: who sent it and the state to answer."""
    remote_static: bytes
    remote_index: int
    timestamp: bytes
    remote_ephemeral: bytes
    chain: bytes
    hash: bytes


def consume_initiation(me: Identity, msg: bytes,
                       static_secret: Callable[[bytes], bytes | None] | None = None
                       ) -> Initiation:
    """Decrypt an initiation addressed to ``me``.  The caller then looks the
    static key up among its peers, checks the timestamp is newer than that
    peer's last one and the rate limit, and only then answers.

    ``static_secret``: a callable giving DH(our static, their static) for a
    decrypted static key from the peer's precomputation (None: compute
    it), or raising UnknownPeer: a known peer saves one DH, and an unknown
    one costs no second DH."""
    if len(msg) != INITIATION_SIZE or msg[0] != MSG_INITIATION or msg[1:4] != b"\0\0\0":
        raise HandshakeError("not an initiation")
    (sender,) = struct.unpack_from("<I", msg, 4)
    e_i, enc_static, enc_time = msg[8:40], msg[40:88], msg[88:116]
    h = blake2s(INITIAL_HASH, me.public)
    c = INITIAL_CHAIN
    (c,) = kdf(1, c, e_i)
    h = blake2s(h, e_i)
    c, k = kdf(2, c, dh(me.private, e_i))
    s_i = open_(k, 0, enc_static, h)
    h = blake2s(h, enc_static)
    ss = static_secret(s_i) if static_secret is not None else None
    c, k = kdf(2, c, ss if ss is not None else dh(me.private, s_i))
    ts = open_(k, 0, enc_time, h)
    h = blake2s(h, enc_time)
    return Initiation(s_i, sender, ts, e_i, c, h)


def create_response(init: Initiation, local_index: int, *, psk: bytes = ZERO32,
                    ephemeral: X25519PrivateKey | None = None) -> tuple[bytes, Keys]:
    """The 92-byte response (macs zero) and the responder's keys."""
    e = ephemeral or X25519PrivateKey.generate()
    e_pub = public_bytes(e)
    c, h = init.chain, init.hash
    (c,) = kdf(1, c, e_pub)
    h = blake2s(h, e_pub)
    (c,) = kdf(1, c, dh(e, init.remote_ephemeral))
    (c,) = kdf(1, c, dh(e, init.remote_static))
    c, tau, k = kdf(3, c, psk)
    h = blake2s(h, tau)
    enc_empty = seal(k, 0, EMPTY, h)
    h = blake2s(h, enc_empty)
    recv, send = kdf(2, c, EMPTY)
    msg = (struct.pack("<B3xII", MSG_RESPONSE, local_index, init.remote_index) + e_pub
           + enc_empty + bytes(32))
    assert len(msg) == RESPONSE_SIZE
    return msg, Keys(local_index, init.remote_index, send, recv, initiator=False)


# ---------------------------------------------------------------- transport
# Only for tests and probes: tunrelay's compiled "session" framing does
# this in the real data path.

def seal_transport(key: bytes, receiver: int, counter: int, packet: bytes) -> bytes:
    padded = packet + bytes(-len(packet) % 16)
    return (struct.pack("<B3xIQ", MSG_TRANSPORT, receiver, counter)
            + seal(key, counter, padded, EMPTY))


def open_transport(key: bytes, msg: bytes) -> tuple[int, int, bytes]:
    """(receiver, counter, padded plaintext)."""
    if len(msg) < TRANSPORT_MIN or msg[0] != MSG_TRANSPORT:
        raise HandshakeError("not a transport message")
    receiver, counter = struct.unpack_from("<IQ", msg, 4)
    return receiver, counter, open_(key, counter, msg[16:], EMPTY)


def random_index() -> int:
    return int.from_bytes(os.urandom(4), "little")
