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
from typing import Literal, get_args

from .errors import ConfigError
from .framing import DEFAULT_MTU as _RAW_DEFAULT_MTU

KEY_LEN = 32
#: Wire version 2 (24-byte header).  Version 1 (20 bytes, keys bound to
#: nothing but the sender's session) accepted a relay's own datagrams
#: reflected back to it; its datagrams are counted as "aead_version".
WIRE_VERSION = 2
TYPE_V1_DATA = 0x01
TYPE_DATA = 0x02
TYPE_HELLO = 0x03
SESSION_LEN = 12
HEADER_LEN = 24
TAG_LEN = 16
#: Bytes the aead framing adds to each packet on the wire.
OVERHEAD = HEADER_LEN + TAG_LEN
#: The default MTU with aead: smaller by the overhead, so the datagrams on
#: the wire are no larger than raw framing's at its default.
DEFAULT_MTU = _RAW_DEFAULT_MTU - OVERHEAD
#: The first record of an aead TCP connection, each way: a len16 length and
#: a sealed hello with nothing inside.  It proves the sender holds the key
#: before the connection may carry the tunnel.
HELLO_RECORD_LEN = 2 + OVERHEAD

Cipher = Literal["chacha20-poly1305", "aes-256-gcm"]
CIPHERS: tuple[Cipher, ...] = get_args(Cipher)
#: The two directions of a tunnel.  Both ends hold the same key, so each
#: end needs a role of its own: it seals with its role's key and opens with
#: the other's, and its own datagrams sent back to it never authenticate.
Role = Literal["a", "b"]
ROLES: tuple[Role, ...] = get_args(Role)
#: HKDF salt: fixed, so both ends derive alike; the PSK is the secret.
SALT = b"tunrelay aead v2"


def other_role(role: str) -> str:
    return ROLES[1 - ROLES.index(role)]


def direction_key(psk: bytes, cipher: str, role: str) -> bytes:
    """The key of one direction: HKDF-SHA256 (RFC 5869) of the PSK, with
    the cipher and the sending role in the info, one 32-byte block."""
    if len(psk) != KEY_LEN:
        raise ValueError(f"the key must be {KEY_LEN} bytes, got {len(psk)}")
    if role not in ROLES or cipher not in CIPHERS:
        raise ValueError(f"role must be one of {ROLES} and cipher one of {CIPHERS}")
    prk = hmac.new(SALT, psk, hashlib.sha256).digest()
    info = f"tunrelay aead v{WIRE_VERSION} {cipher} from {role}".encode()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def derive_key(psk: bytes, session: bytes, cipher: str, role: str) -> bytes:
    """A session's key: HKDF-Expand with the direction key as PRK and the
    session id as info (one HMAC-SHA256, cheap enough that every unknown
    session can be tried: no budget to starve).  The C side (_aead.pxi)
    derives the same; a test checks that both agree."""
    if len(session) != SESSION_LEN:
        raise ValueError(f"a session id is {SESSION_LEN} bytes, got {len(session)}")
    return hmac.new(direction_key(psk, cipher, role), session + b"\x01", hashlib.sha256).digest()


def start_time() -> int:
    """A relay's start time: every session it makes carries it, so the
    receiver can tell a restart (newer) from a recording (older)."""
    return int(time.time()) & 0xFFFFFFFF


def new_session(start: int) -> bytes:
    """A session id: the start time (seconds, big-endian), then 64 random
    bits, so two queues, both ends, or a restored VM snapshot never pick
    the same (key, nonce) in practice."""
    return struct.pack("!I", start) + os.urandom(8)


def genkey() -> str:
    """A new random pre-shared key, base64 (what `tunrelay genkey` prints)."""
    return base64.b64encode(os.urandom(KEY_LEN)).decode()


def load_key(path: str, config_path: str = "<config>", key: str = "security.key_file") -> bytes:
    """Read a key file: one line of base64 encoding 32 bytes, in a regular
    file owned by this user (or root) and readable by its owner only.
    Errors name the config file and key that pointed here.

    The checks are made on the open file (fstat), so the file checked is the
    file read: nothing can be swapped in between.  A symbolic link is not
    followed (O_NOFOLLOW): whoever may change the link would choose the key.
    O_NONBLOCK, so that a FIFO in its place is refused, not waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if os.path.islink(path):  # ELOOP: the last component is a link
            raise ConfigError(
                config_path, key,
                f"key file {path} is a symbolic link; expected the file itself (links are not "
                f"followed: whoever can change the link would choose the key): set key_file to "
                f"{os.path.realpath(path)}") from None
        raise ConfigError(config_path, key, f"cannot read key file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kinds = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
                     stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}
            raise ConfigError(config_path, key, f"key file {path} is "
                              f"{kinds.get(stat.S_IFMT(info.st_mode), 'not a regular file')}; "
                              "expected a regular file")
        euid = os.geteuid()
        if info.st_uid not in (euid, 0):
            raise ConfigError(
                config_path, key,
                f"key file {path} is owned by uid {info.st_uid}; expected uid {euid} (the user "
                f"tunrelay runs as) or root, as its owner can replace the key: chown {euid} {path}")
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                config_path, key,
                f"key file {path} is open to group or others (mode {stat.S_IMODE(info.st_mode):o}); "
                f"expected 600: chmod 600 {path}")
        text = b""
        while len(text) < 256 and (chunk := os.read(fd, 256 - len(text))):
            text += chunk
        text = text.strip()
    except OSError as exc:
        raise ConfigError(config_path, key, f"cannot read key file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        psk = base64.b64decode(text, validate=True)
    except ValueError:
        psk = b""
    if len(psk) != KEY_LEN:
        raise ConfigError(config_path, key,
                          f"key file {path}: expected 32 bytes in base64 "
                          "(make one with `tunrelay genkey`)")
    return psk
