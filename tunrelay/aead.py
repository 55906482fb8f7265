"""The aead framing's Python side: keys, key files and key derivation.

The packets themselves are sealed and opened in C (``_aead.pxi``); this
module holds what the C side is configured with, and ``derive_key``, the
Python twin of its HKDF (a sender derives its own key here; the receiver
derives it in C from the session id on the wire, and a test checks that
both agree).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
import struct
import time

from .errors import ConfigError

KEY_LEN = 32
SESSION_LEN = 8
HEADER_LEN = 20
TAG_LEN = 16
#: Bytes the aead framing adds to each packet on the wire.
OVERHEAD = HEADER_LEN + TAG_LEN

CIPHERS = ("chacha20-poly1305", "aes-256-gcm")
#: HKDF salt: fixed, so both ends derive alike; the PSK is the secret.
SALT = b"tunrelay aead v1"


def label(cipher: str) -> bytes:
    """HKDF info prefix; the session id follows.  Naming the cipher gives
    each cipher its own keys from the same PSK."""
    return f"tunrelay aead v1 {cipher} ".encode()


def new_session() -> bytes:
    """A sender's session id: its start time (seconds, big-endian) and 4
    random bytes.  The receiver refuses sessions that started well before
    the newest it has seen (replayed recordings)."""
    return struct.pack("!I", int(time.time()) & 0xFFFFFFFF) + os.urandom(4)


def derive_key(psk: bytes, session: bytes, cipher: str) -> bytes:
    """HKDF-SHA256 (RFC 5869), one 32-byte output block."""
    if len(psk) != KEY_LEN or len(session) != SESSION_LEN:
        raise ValueError("derive_key needs a 32-byte key and an 8-byte session id")
    prk = hmac.new(SALT, psk, hashlib.sha256).digest()
    return hmac.new(prk, label(cipher) + session + b"\x01", hashlib.sha256).digest()


def genkey() -> str:
    """A new random pre-shared key, base64 (what `tunrelay genkey` prints)."""
    return base64.b64encode(os.urandom(KEY_LEN)).decode()


def load_key(path: str, config_path: str = "<config>", key: str = "security.key_file") -> bytes:
    """Read a key file: one line of base64 encoding 32 bytes, readable by
    its owner only.  Errors name the config file and key that pointed here."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ConfigError(config_path, key, f"cannot read key file {path}: {exc.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            config_path, key,
            f"key file {path} is readable by group or others (mode {stat.S_IMODE(info.st_mode):o}); "
            f"expected 600: chmod 600 {path}")
    try:
        with open(path, "rb") as f:
            text = f.read(256).strip()
    except OSError as exc:
        raise ConfigError(config_path, key, f"cannot read key file {path}: {exc.strerror}") from None
    try:
        psk = base64.b64decode(text, validate=True)
    except ValueError:
        psk = b""
    if len(psk) != KEY_LEN:
        raise ConfigError(config_path, key,
                          f"key file {path}: expected 32 bytes in base64 "
                          "(make one with `tunrelay genkey`)")
    return psk
