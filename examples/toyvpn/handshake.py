"""toyvpn's key exchange: a TOY.  It is NOT SECURE; do not protect
anything with it (README.md says why).

Three control messages, carried in the pump's own UDP port (framing
"session" hands every first byte but 4 to the control channel):

    1 INIT   01 | sender index u32 LE | ephemeral X25519 public key (32)
    2 RESP   02 | sender index u32 LE | receiver index u32 LE | ephemeral key (32)
    3 REKEY  03 | receiver index u32 LE     "your session with this index is old:
                                             start a new handshake"

Both ends derive the session keys from the X25519 shared secret with
HKDF-SHA256, salted with the optional pre-shared key and bound to both
ephemeral keys and both indexes.  Nothing authenticates the two ends:
without a PSK anyone on the path can sit in the middle.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

INIT, RESP, REKEY = 1, 2, 3
_INIT = struct.Struct("<BI32s")
_RESP = struct.Struct("<BII32s")
_REKEY = struct.Struct("<BI")
_LABEL = b"toyvpn v1 (a toy, not secure)"


@dataclass(frozen=True)
class Session:
    """What PeerTable.install_session() needs, from one end's view."""

    local_index: int
    remote_index: int
    send_key: bytes
    recv_key: bytes


def _public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _derive(private: X25519PrivateKey, their_public: bytes, psk: bytes | None,
            init_public: bytes, resp_public: bytes, init_index: int,
            resp_index: int) -> tuple[bytes, bytes] | None:
    """(initiator -> responder key, responder -> initiator key), or None
    for a public key that gives no shared secret (a low-order point)."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(their_public))
    except ValueError:
        return None
    info = _LABEL + init_public + resp_public + struct.pack("<II", init_index, resp_index)
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=psk, info=info).derive(shared)
    return okm[:32], okm[32:]


class Initiation:
    """The initiator's half of one handshake: ``message`` (INIT) goes out,
    ``finish(RESP)`` gives the session."""

    def __init__(self, index: int) -> None:
        self.index = index
        self._private = X25519PrivateKey.generate()
        self.message = _INIT.pack(INIT, index, _public(self._private))

    def finish(self, response: bytes, psk: bytes | None) -> Session | None:
        """The session, or None if ``response`` is not the RESP to this INIT."""
        if len(response) != _RESP.size:
            return None
        kind, sender, receiver, their_public = _RESP.unpack(response)
        if kind != RESP or receiver != self.index:
            return None
        keys = _derive(self._private, their_public, psk, _public(self._private), their_public,
                       self.index, sender)
        if keys is None:
            return None
        return Session(self.index, sender, send_key=keys[0], recv_key=keys[1])


def respond(init: bytes, index: int, psk: bytes | None) -> tuple[Session, bytes] | None:
    """The responder's session (local index ``index``) and the RESP to
    send, or None if ``init`` is not an INIT."""
    if len(init) != _INIT.size:
        return None
    kind, sender, their_public = _INIT.unpack(init)
    if kind != INIT:
        return None
    private = X25519PrivateKey.generate()
    keys = _derive(private, their_public, psk, their_public, _public(private), sender, index)
    if keys is None:
        return None
    message = _RESP.pack(RESP, index, sender, _public(private))
    return Session(index, sender, send_key=keys[1], recv_key=keys[0]), message


def rekey(receiver: int) -> bytes:
    return _REKEY.pack(REKEY, receiver)


def parse_rekey(data: bytes) -> int | None:
    """The receiver index of a REKEY, or None."""
    if len(data) != _REKEY.size or data[0] != REKEY:
        return None
    return int(_REKEY.unpack(data)[1])
