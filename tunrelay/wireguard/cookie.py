"""mac1, mac2 and cookie replies: WireGuard's defence against handshake floods.

* mac1 = MAC(HASH("mac1----" || receiver's static public), msg[:-32]) is on
  every handshake message and is checked first, before any DH: a sender
  that does not know our public key costs us one BLAKE2s.
* Under load a responder asks for proof of the source address: mac2 =
  MAC(cookie, msg[:-16]), where the cookie is MAC(secret, source ip ||
  port) and reaches the sender sealed in a cookie reply.  The secret
  changes every COOKIE_REFRESH_TIME.

XChaCha20-Poly1305 (the cookie reply's cipher) is HChaCha20, here 20
rounds in pure Python (~30 us, only on cookie replies), plus the IETF
ChaCha20-Poly1305 of ``cryptography``.

cookie reply (64): u8 type=3, 3 zero, u32 receiver (the sender index of
the message it answers), 24 nonce, 32 sealed cookie (16 + 16 tag); the
associated data is the mac1 of the message it answers.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .noise import COOKIE_SIZE, MSG_COOKIE, blake2s, keyed_mac

__all__ = ["COOKIE_REFRESH_TIME", "MacSigner", "MacVerifier", "address_bytes", "hchacha20",
           "parse_cookie_reply", "xopen", "xseal"]

LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"
COOKIE_REFRESH_TIME = 120.0      # the responder's secret changes; a held cookie is stale
MAC_SIZE = 16

Clock = Callable[[], float]


# ---------------------------------------------------------------- XChaCha20-Poly1305

_SIGMA = struct.unpack("<4I", b"expand 32-byte k")
_M = 0xFFFFFFFF


def _rotl(v: int, n: int) -> int:
    return ((v << n) & _M) | (v >> (32 - n))


def _quarter(s: list[int], a: int, b: int, c: int, d: int) -> None:
    s[a] = (s[a] + s[b]) & _M
    s[d] = _rotl(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & _M
    s[b] = _rotl(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b]) & _M
    s[d] = _rotl(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & _M
    s[b] = _rotl(s[b] ^ s[c], 7)


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """The ChaCha20 core over (constants, key, 16-byte nonce), no final
    addition, keeping words 0..3 and 12..15: a 32-byte subkey."""
    if len(key) != 32 or len(nonce16) != 16:
        raise ValueError("hchacha20 takes a 32-byte key and a 16-byte nonce")
    s = list(_SIGMA) + list(struct.unpack("<8I", key)) + list(struct.unpack("<4I", nonce16))
    for _ in range(10):
        _quarter(s, 0, 4, 8, 12)
        _quarter(s, 1, 5, 9, 13)
        _quarter(s, 2, 6, 10, 14)
        _quarter(s, 3, 7, 11, 15)
        _quarter(s, 0, 5, 10, 15)
        _quarter(s, 1, 6, 11, 12)
        _quarter(s, 2, 7, 8, 13)
        _quarter(s, 3, 4, 9, 14)
    return struct.pack("<8I", *(s[0:4] + s[12:16]))


def _split(key: bytes, nonce24: bytes) -> tuple[ChaCha20Poly1305, bytes]:
    if len(nonce24) != 24:
        raise ValueError("xchacha20-poly1305 takes a 24-byte nonce")
    return ChaCha20Poly1305(hchacha20(key, nonce24[:16])), b"\0\0\0\0" + nonce24[16:]


def xseal(key: bytes, nonce24: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha-03)."""
    aead, nonce = _split(key, nonce24)
    return aead.encrypt(nonce, plaintext, aad)


def xopen(key: bytes, nonce24: bytes, sealed: bytes, aad: bytes) -> bytes | None:
    """The plaintext, or None when it does not authenticate."""
    aead, nonce = _split(key, nonce24)
    try:
        return aead.decrypt(nonce, sealed, aad)
    except InvalidTag:
        return None


def parse_cookie_reply(reply: bytes) -> int | None:
    """The receiver index of a well-formed cookie reply, or None."""
    if len(reply) != COOKIE_SIZE or reply[0] != MSG_COOKIE or reply[1:4] != b"\0\0\0":
        return None
    (receiver,) = struct.unpack_from("<I", reply, 4)
    return int(receiver)


# ---------------------------------------------------------------- sending side

@dataclass
class MacSigner:
    """Signs our handshake messages to one peer (its static public key) and
    takes that peer's cookie replies."""
    peer_public: bytes
    clock: Clock = time.monotonic
    refresh: float = COOKIE_REFRESH_TIME
    mac1_key: bytes = field(init=False)
    cookie_key: bytes = field(init=False)
    cookie: bytes | None = None
    cookie_time: float = 0.0
    last_mac1: bytes | None = None     # of our last message: the aad of a reply to it

    def __post_init__(self) -> None:
        self.mac1_key = blake2s(LABEL_MAC1, self.peer_public)
        self.cookie_key = blake2s(LABEL_COOKIE, self.peer_public)

    def sign(self, msg: bytes) -> bytes:
        """msg with its last 32 bytes replaced by mac1 and mac2."""
        body = msg[:-32]
        mac1 = keyed_mac(self.mac1_key, body)
        self.last_mac1 = mac1
        if self.cookie is not None and self.clock() - self.cookie_time < self.refresh:
            mac2 = keyed_mac(self.cookie, body + mac1)
        else:
            mac2 = bytes(MAC_SIZE)
        return body + mac1 + mac2

    def take_reply(self, reply: bytes) -> bool:
        """Store the cookie of a reply to our last message; False if it is not one."""
        if parse_cookie_reply(reply) is None or self.last_mac1 is None:
            return False
        nonce, sealed = reply[8:32], reply[32:64]
        cookie = xopen(self.cookie_key, nonce, sealed, self.last_mac1)
        if cookie is None:
            return False
        self.cookie, self.cookie_time = cookie, self.clock()
        return True


# ---------------------------------------------------------------- receiving side

def address_bytes(address: tuple[str, int] | tuple[str, int, int, int]) -> bytes:
    """The source as the cookie binds it: packed IP, then the port
    (big-endian).  An IPv4-mapped IPv6 address counts as its IPv4 one, so a
    dual-stack socket binds the same cookie as a v4 one would."""
    ip = ipaddress.ip_address(address[0].split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.packed + struct.pack(">H", address[1])


@dataclass
class MacVerifier:
    """Checks mac1/mac2 of messages to us and makes cookie replies."""
    my_public: bytes
    clock: Clock = time.monotonic
    refresh: float = COOKIE_REFRESH_TIME
    #: Called with (secret, seconds it stays valid) whenever the secret
    #: changes: the loops' handshake gate (PeerTable.set_handshake_gate)
    #: checks mac2 with the same secret.
    on_rotate: Callable[[bytes, float], None] | None = None
    mac1_key: bytes = field(init=False)
    cookie_key: bytes = field(init=False)
    _secret: bytes = field(init=False, default=b"")
    _secret_time: float = field(init=False, default=float("-inf"))

    def __post_init__(self) -> None:
        self.mac1_key = blake2s(LABEL_MAC1, self.my_public)
        self.cookie_key = blake2s(LABEL_COOKIE, self.my_public)

    def current_secret(self) -> tuple[bytes, float]:
        """The cookie secret (made or rotated now if it is due) and how many
        seconds it stays valid."""
        now = self.clock()
        if now - self._secret_time >= self.refresh:
            self._secret, self._secret_time = os.urandom(32), now
            if self.on_rotate is not None:
                self.on_rotate(self._secret, self.refresh)
        return self._secret, self.refresh - (now - self._secret_time)

    def mac1_ok(self, msg: bytes) -> bool:
        """Cheap (one keyed BLAKE2s): the first check of every handshake message."""
        if len(msg) < 32:
            return False
        return hmac.compare_digest(keyed_mac(self.mac1_key, msg[:-32]), msg[-32:-16])

    def _cookie_for(self, address: tuple[str, int] | tuple[str, int, int, int]) -> bytes:
        secret, _ = self.current_secret()
        return keyed_mac(secret, address_bytes(address))

    def mac2_ok(self, msg: bytes, address: tuple[str, int] | tuple[str, int, int, int]) -> bool:
        """Under load: only messages whose mac2 proves the source address pass."""
        if len(msg) < 32 or self.clock() - self._secret_time >= self.refresh:
            return False
        return hmac.compare_digest(keyed_mac(self._cookie_for(address), msg[:-16]), msg[-16:])

    def reply(self, msg: bytes, address: tuple[str, int] | tuple[str, int, int, int]) -> bytes:
        """The 64-byte cookie reply to a handshake message (its mac1 checked)."""
        (sender,) = struct.unpack_from("<I", msg, 4)
        nonce = os.urandom(24)
        sealed = xseal(self.cookie_key, nonce, self._cookie_for(address), msg[-32:-16])
        out = struct.pack("<B3xI", MSG_COOKIE, sender) + nonce + sealed
        assert len(out) == COOKIE_SIZE
        return out
