"""What the fuzz harnesses and tests/test_fuzz.py share.

* Sources: where the harness's choices come from.  ``FDPSource`` wraps
  atheris' FuzzedDataProvider (libFuzzer's bytes), ``HypSource`` hypothesis'
  ``data.draw`` (the property tests in tests/test_fuzz.py), ``SeedSource``
  writes the bytes a FuzzedDataProvider decodes into chosen values (the
  seed corpus, see make_corpus.py).  Every pull is labelled, so a seed is
  written as ``{label: value}``.
* Decoders: fuzz input -> a pump configuration and what to feed it:
  datagrams (``decode_ingress``) or a len16 byte stream cut into recv()
  chunks (``decode_stream``; its records plain packets or, with aead,
  sealed datagrams).  Besides plain bytes they build what random bytes
  almost never are: runs of TCP segments with valid checksums (the
  coalescer's input), IP packets with length fields that lie a little, len16
  headers, and aead datagrams (wire version 2) sealed with a fixed test key
  as the peer (role "a") under many sessions and start times, then
  replayed, mutated, reflected, forged or cut (``seal_aead``).
* References: the expected outcome of every datagram or frame is computed
  from the bytes actually fed, in Python: ``framing.validate`` and
  ``framing.Len16Parser`` (the project's references), a model of
  ``ingress_message`` (oversize, len16 header) and of the pump's Keyring
  receiving (``AeadReceiver``: header checks in aead_open()'s order, its
  session table of 8 with LRU and the 16 ids it remembers, stale starts and
  evictions, replay windows, tags checked with OpenSSL through ctypes, and
  its counts()), and property checks of what the coalescer wrote
  (offload).
* ``Rig``: the pumps (one per configuration, made once and reused), a UDP
  socket, a TCP connection and the TUN stand-in.  ``feed_datagram`` and
  ``feed_stream_chunk`` run one message / one recv() through the compiled
  pump and raise ``Violation`` when anything differs from the reference.

The stand-in for the TUN fd is one end of a SOCK_SEQPACKET socketpair,
shared by all pumps (only one runs at a time).  A thread drains the other
end, so however much one input makes the pump write, its writes never
block; after each input the harness queues an empty message behind the
pump's writes and waits for the thread to reach it (a pump never writes an
empty packet: validation drops those, and with offloads every write has a
virtio_net_hdr).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import socket
import struct
import threading
from collections import Counter, deque
from dataclasses import dataclass, field

from tunrelay import aead as aead_keys
from tunrelay import counters as counter_names
from tunrelay.framing import LEN16_LIMIT, Len16Parser, max_frame, validate

# ================================================================ sources


class Source:
    """Where choices come from.  ``rest`` must be the last pull."""

    def int(self, label: str, lo: int, hi: int) -> int:
        raise NotImplementedError

    def bytes(self, label: str, n: int) -> bytes:
        """Up to n bytes (fewer when the input runs out)."""
        raise NotImplementedError

    def rest(self, label: str) -> bytes:
        raise NotImplementedError

    def choice(self, label: str, options):
        return options[self.int(label, 0, len(options) - 1)]


class FDPSource(Source):
    """atheris.FuzzedDataProvider: integers come from the end of the input,
    byte strings from its front (as libFuzzer's FuzzedDataProvider)."""

    def __init__(self, fdp) -> None:
        self.fdp = fdp

    def int(self, label, lo, hi):
        return self.fdp.ConsumeIntInRange(lo, hi)

    def bytes(self, label, n):
        return self.fdp.ConsumeBytes(n)

    def rest(self, label):
        return self.fdp.ConsumeBytes(self.fdp.remaining_bytes())


class HypSource(Source):
    """hypothesis' ``data.draw``.  Byte strings are kept short (hypothesis
    has an 8 KiB budget): the decoders pad them with a pattern."""

    def __init__(self, draw, max_bytes: int = 512) -> None:
        from hypothesis import strategies
        self.draw = draw
        self.st = strategies
        self.max_bytes = max_bytes

    def int(self, label, lo, hi):
        return self.draw(self.st.integers(lo, hi), label=label)

    def bytes(self, label, n):
        return self.draw(self.st.binary(max_size=min(n, self.max_bytes)), label=label)

    def rest(self, label):
        return self.draw(self.st.binary(max_size=4 * self.max_bytes), label=label)


class SeedSource(Source):
    """Answers each pull from a plan ``{label: value or [values...]}``
    (missing: the lowest value, or zero bytes) and records the bytes that
    make atheris' FuzzedDataProvider decode to exactly those answers: an
    integer in [lo, hi] takes ceil(bits(hi - lo) / 8) bytes from the end of
    the input (most significant first), ``lo + value % (hi - lo + 1)``;
    byte strings come from the front."""

    def __init__(self, plan: dict) -> None:
        self.plan = {k: list(v) if isinstance(v, list) else v for k, v in plan.items()}
        self.front = bytearray()
        self.tail = bytearray()      # in the order consumed (the file's end first)
        self.log: list[tuple[str, object]] = []
        self.done = False

    def _answer(self, label, default):
        assert not self.done, "rest() must be the last pull"
        value = self.plan.get(label, default)
        if isinstance(value, list):
            value = value.pop(0) if value else default
        return value

    def choice(self, label, options):
        value = self._answer(label, options[0])
        index = options.index(value)
        self._put_int(index, 0, len(options) - 1)
        self.log.append((label, index))
        return value

    def int(self, label, lo, hi):
        value = self._answer(label, lo)
        assert lo <= value <= hi, (label, lo, value, hi)
        self._put_int(value, lo, hi)
        self.log.append((label, value))
        return value

    def _put_int(self, value, lo, hi):
        span = hi - lo
        nbytes = (span.bit_length() + 7) // 8
        self.tail += (value - lo).to_bytes(nbytes, "big") if nbytes else b""

    def bytes(self, label, n):
        value = bytes(self._answer(label, b""))
        value = (value + bytes(n))[:n]   # exactly n: FDP would take the next bytes
        self.front += value
        self.log.append((label, value))
        return value

    def rest(self, label):
        value = bytes(self._answer(label, b""))
        self.front += value
        self.log.append((label, value))
        self.done = True
        return value

    def data(self) -> bytes:
        return bytes(self.front) + bytes(reversed(self.tail))


class RecordingSource(Source):
    """Wraps a source and logs (label, value) like SeedSource does."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.log: list[tuple[str, object]] = []

    def int(self, label, lo, hi):
        value = self.inner.int(label, lo, hi)
        self.log.append((label, value))
        return value

    def choice(self, label, options):
        index = self.inner.int(label, 0, len(options) - 1)
        self.log.append((label, index))
        return options[index]

    def bytes(self, label, n):
        value = self.inner.bytes(label, n)
        self.log.append((label, value))
        return value

    def rest(self, label):
        value = self.inner.rest(label)
        self.log.append((label, value))
        return value


# ================================================================ checksums, packets

PATTERN = bytes((i * 7 + (i >> 8) * 13 + 5) & 0xFF for i in range(1 << 17))


def fill(prefix: bytes, size: int) -> bytes:
    """size bytes: prefix, then a pattern."""
    if len(prefix) >= size:
        return bytes(prefix[:size])
    return bytes(prefix) + PATTERN[len(prefix):size]


def ones_sum(data, initial: int = 0) -> int:
    """RFC 1071 ones' complement sum of big-endian 16-bit words, folded (not
    inverted): 0 only for all-zero input.  2^16 = 1 (mod 0xFFFF), so the
    sum is the whole buffer as one big integer, mod 0xFFFF."""
    data = bytes(data)
    if len(data) % 2:
        data += b"\0"
    total = int.from_bytes(data, "big") + initial
    if total == 0:
        return 0
    return total % 0xFFFF or 0xFFFF


def pseudo_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    if len(src) == 4:
        return ones_sum(src + dst + struct.pack("!BBH", 0, proto, length))
    return ones_sum(src + dst + struct.pack("!I3xB", length, proto))


def be16(data, offset: int) -> int:
    return (data[offset] << 8) | data[offset + 1]


def be32(data, offset: int) -> int:
    return int.from_bytes(data[offset:offset + 4], "big")


TCP, UDP = 6, 17
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
DF, MF = 0x4000, 0x2000
SRC4, DST4 = bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2))
SRC6 = bytes.fromhex("fd000000000000000000000000000001")
DST6 = bytes.fromhex("fd000000000000000000000000000002")
#: NOP, NOP, timestamps (what Linux sends: data offset 8) and plain NOPs.
TIMESTAMPS = b"\x01\x01\x08\x0a" + struct.pack("!II", 0x01020304, 0x0A0B0C0D)
NOPS = b"\x01\x01\x01\x01"


def addrs_of(packet) -> tuple[bytes, bytes]:
    if packet[0] >> 4 == 4:
        return bytes(packet[12:16]), bytes(packet[16:20])
    return bytes(packet[8:24]), bytes(packet[24:40])


def ipv4_header(proto: int, l4_length: int, *, tos=0, ident=0x1234, frag=DF, ttl=64,
                options=b"", csum_ok=True, src=SRC4, dst=DST4) -> bytes:
    ihl = 5 + len(options) // 4
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, (4 * ihl + l4_length) & 0xFFFF,
                                   ident & 0xFFFF, frag, ttl, proto, 0, src, dst) + options)
    csum = ~ones_sum(header) & 0xFFFF
    if not csum_ok:
        csum ^= 0x0101
    header[10:12] = csum.to_bytes(2, "big")
    return bytes(header)


def ipv6_header(proto: int, l4_length: int, *, tos=0, flow=0, ttl=64, src=SRC6, dst=DST6) -> bytes:
    return struct.pack("!IHBB", (6 << 28) | (tos << 20) | flow, l4_length & 0xFFFF, proto, ttl) + src + dst


def tcp_packet(version: int, payload: bytes, *, seq=1000, ack=77, flags=ACK, sport=40000,
               dport=5201, window=502, options=TIMESTAMPS, csum_ok=True, tos=0, ident=0x1234,
               frag=DF, ttl=64, ip_options=b"", ip_csum_ok=True, flow=0) -> bytes:
    """A TCP segment; `options` are TCP options, `ip_options` IPv4 ones."""
    thl = 5 + len(options) // 4
    l4 = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                               thl << 4, flags, window & 0xFFFF, 0, 0) + options + payload)
    if version == 4:
        header = ipv4_header(TCP, len(l4), tos=tos, ident=ident, frag=frag, ttl=ttl,
                             options=ip_options, csum_ok=ip_csum_ok)
    else:
        header = ipv6_header(TCP, len(l4), tos=tos, flow=flow, ttl=ttl)
    src, dst = addrs_of(header)
    csum = ~ones_sum(l4, pseudo_sum(src, dst, TCP, len(l4))) & 0xFFFF
    if not csum_ok:
        csum ^= 0x5555
    l4[16:18] = csum.to_bytes(2, "big")
    return header + bytes(l4)


def ip_packet(version: int, size: int, *, proto=UDP, ihl=5, body=b"") -> bytes:
    """An IP packet of `size` bytes with true length fields where they fit
    (the header cut short when size is below it)."""
    if version == 4:
        header = ipv4_header(proto, max(0, size - 4 * ihl), options=bytes(4 * (ihl - 5)))
    else:
        header = ipv6_header(proto, max(0, size - 40))
    return (header + fill(body, max(0, size - len(header))))[:size]


def ethernet_frame(size: int, body=b"") -> bytes:
    return (bytes.fromhex("020000000002" "020000000001" "0800") + fill(body, size))[:size]


# ================================================================ aead (reference, OpenSSL via ctypes)

TEST_PSK = bytes(range(32))
#: The pump under test is role "b"; the harness seals as its peer, role "a"
#: (and, to reflect, as "b" itself).
PUMP_ROLE, PEER_ROLE = "b", "a"
ROLE_BYTE = {role: i for i, role in enumerate(aead_keys.ROLES)}
#: The harness' first start time (its sessions' ids begin with it); a
#: "restart" moves it on.
FIRST_START = 0x66000000
AEAD_HEADER, AEAD_TAG = aead_keys.HEADER_LEN, aead_keys.TAG_LEN
AEAD_OVERHEAD = aead_keys.OVERHEAD
# _fastpath.pxd (not visible from Python; test_aead_model_follows_the_design
# in tests/test_fuzz.py pins them against the pump):
AEAD_WINDOW = 128 * 64         # (AEAD_WINDOW_WORDS - 1) * 64
AEAD_SLOTS = 8                 # peer sessions one Keyring keeps
AEAD_RETIRED = 16              # ids pushed out of a full table, remembered (a ring)
EVP_CTRL_AEAD_GET_TAG, EVP_CTRL_AEAD_SET_TAG = 0x10, 0x11
U64 = 2**64 - 1


class _Crypto:
    _lib = None

    @classmethod
    def lib(cls):
        if cls._lib is None:
            name = ctypes.util.find_library("crypto") or "libcrypto.so.3"
            lib = ctypes.CDLL(name)
            vp, cp, ip = ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)
            for fn in ("EVP_chacha20_poly1305", "EVP_aes_256_gcm", "EVP_CIPHER_CTX_new"):
                getattr(lib, fn).restype = vp
                getattr(lib, fn).argtypes = []
            for fn in ("EVP_EncryptInit_ex", "EVP_DecryptInit_ex"):
                getattr(lib, fn).argtypes = [vp, vp, vp, cp, cp]
            for fn in ("EVP_EncryptUpdate", "EVP_DecryptUpdate"):
                getattr(lib, fn).argtypes = [vp, vp, ip, cp, ctypes.c_int]
            for fn in ("EVP_EncryptFinal_ex", "EVP_DecryptFinal_ex"):
                getattr(lib, fn).argtypes = [vp, vp, ip]
            lib.EVP_CIPHER_CTX_ctrl.argtypes = [vp, ctypes.c_int, ctypes.c_int, vp]
            cls._lib = lib
        return cls._lib


def aead_header(session: bytes, counter: int, *, kind: int = aead_keys.TYPE_DATA,
                role: str = PEER_ROLE) -> bytes:
    """type | sender's role | 2 zero bytes | session id (12) | counter (8, BE)."""
    return bytes((kind, ROLE_BYTE[role], 0, 0)) + session + counter.to_bytes(8, "big")


class AeadCipher:
    """Seal and open aead datagrams as _aead.pxi's wire format (version 2)
    says: the 24-byte header as associated data, nonce = 4 zero bytes +
    counter, tag behind the ciphertext; the key of a session is
    aead.derive_key(psk, session, cipher, sender's role)."""

    def __init__(self, cipher: str) -> None:
        lib = self.lib = _Crypto.lib()
        self.name = cipher
        self.evp = (lib.EVP_chacha20_poly1305() if cipher == "chacha20-poly1305"
                    else lib.EVP_aes_256_gcm())
        self.ctx = lib.EVP_CIPHER_CTX_new()
        self._keys: dict[tuple[bytes, str], bytes] = {}

    def key(self, session: bytes, role: str = PEER_ROLE) -> bytes:
        """aead.derive_key (the receiver derives the same in C), cached."""
        key = self._keys.get((session, role))
        if key is None:
            if len(self._keys) > 4096:
                self._keys.clear()
            key = self._keys[(session, role)] = aead_keys.derive_key(TEST_PSK, session, self.name, role)
        return key

    def seal(self, header: bytes, plaintext: bytes, key: bytes) -> bytes:
        lib, ctx, n = self.lib, self.ctx, ctypes.c_int()
        out = ctypes.create_string_buffer(len(plaintext) + AEAD_TAG + 16)
        tag = ctypes.create_string_buffer(AEAD_TAG)
        ok = lib.EVP_EncryptInit_ex(ctx, self.evp, None, key, b"\0" * 4 + header[16:24])
        ok &= lib.EVP_EncryptUpdate(ctx, None, ctypes.byref(n), header, AEAD_HEADER)
        if plaintext:
            ok &= lib.EVP_EncryptUpdate(ctx, out, ctypes.byref(n), plaintext, len(plaintext))
        ok &= lib.EVP_EncryptFinal_ex(ctx, None, ctypes.byref(n))
        ok &= lib.EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, AEAD_TAG, tag)
        if ok != 1:
            raise RuntimeError("OpenSSL refused to seal")
        return header + out.raw[:len(plaintext)] + tag.raw

    def open(self, key: bytes, datagram: bytes) -> bytes | None:
        lib, ctx, n = self.lib, self.ctx, ctypes.c_int()
        body = datagram[AEAD_HEADER:-AEAD_TAG]
        tag = ctypes.create_string_buffer(datagram[-AEAD_TAG:], AEAD_TAG)
        out = ctypes.create_string_buffer(len(body) + 16)
        ok = lib.EVP_DecryptInit_ex(ctx, self.evp, None, key, b"\0" * 4 + datagram[16:24])
        ok &= lib.EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, AEAD_TAG, tag)
        ok &= lib.EVP_DecryptUpdate(ctx, None, ctypes.byref(n), datagram[:AEAD_HEADER], AEAD_HEADER)
        if body:
            ok &= lib.EVP_DecryptUpdate(ctx, out, ctypes.byref(n), body, len(body))
        if ok != 1:
            return None
        final = ctypes.create_string_buffer(16)
        if lib.EVP_DecryptFinal_ex(ctx, final, ctypes.byref(n)) != 1:
            return None
        return out.raw[:len(body)]


class ReplayWindow:
    """The receiver's view of one session: RFC 6479's bitmap is exactly
    'seen before, or 8192 or more behind the newest'."""

    def __init__(self) -> None:
        self.top: int | None = None
        self.seen: set[int] = set()

    def fresh(self, counter: int) -> bool:
        if self.top is None or counter > self.top:
            return True
        return self.top - counter < AEAD_WINDOW and counter not in self.seen

    def mark(self, counter: int) -> None:
        if self.top is None or counter > self.top:
            self.top = counter
        self.seen.add(counter)
        if len(self.seen) > 4 * AEAD_WINDOW:
            self.seen = {c for c in self.seen if self.top - c < AEAD_WINDOW}


@dataclass
class PeerSession:
    """A slot of the receiver's table."""
    start: int
    window: ReplayWindow = field(default_factory=ReplayWindow)
    last_used: int = 0


class AeadReceiver:
    """A model of one Keyring (role "b") receiving: aead_open() and admit()
    of _aead.pxi, from the bytes alone (the harness' intentions are not
    consulted: a session is what its header says, a tag is checked with
    OpenSSL).  Also the Keyring's counts()."""

    def __init__(self, cipher: AeadCipher) -> None:
        self.cipher = cipher
        self.table: dict[bytes, PeerSession] = {}
        self.newest_start = 0
        self.retired: deque[bytes] = deque(maxlen=AEAD_RETIRED)
        self.clock = 0
        self.counts = {"sessions": 0, "evicted": 0, "roams": 0, "live": 0}

    def open(self, datagram: bytes):
        """The packet (bytes) or the drop reason, as aead_open() must decide
        for a datagram or a TCP record.  Neither moves the peer's endpoint
        ("roams" stays 0): a TCP record has no sender, and Pump._feed gives
        an aead pump none either."""
        if len(datagram) < AEAD_OVERHEAD:
            return "too_short"
        if datagram[0] == aead_keys.TYPE_V1_DATA:
            return "aead_version"
        if datagram[0] != aead_keys.TYPE_DATA or datagram[1] > 1 or datagram[2] or datagram[3]:
            return "bad_frame"
        if datagram[1] == ROLE_BYTE[PUMP_ROLE]:
            return "reflected"
        session = bytes(datagram[4:16])
        start = be32(datagram, 4)
        counter = int.from_bytes(datagram[16:24], "big")
        slot = self.table.get(session)
        if slot is not None:
            # A table session: the window first (no crypto for a replay).
            if not slot.window.fresh(counter):
                return "replay"
            plaintext = self.cipher.open(self.cipher.key(session), datagram)
            if plaintext is None:
                return "bad_tag"
        else:
            if start < self.newest_start:
                return "stale_session"          # a recording: refused without crypto
            plaintext = self.cipher.open(self.cipher.key(session), datagram)
            if plaintext is None:
                return "bad_tag"                # every unknown session is tried
            if session in self.retired:
                return "stale_session"          # pushed out while current
            if start > self.newest_start:       # the peer restarted: older sessions end
                for old in [s for s, p in self.table.items() if p.start < start]:
                    del self.table[old]
                    self.counts["evicted"] += 1
                self.newest_start = start
            if len(self.table) == AEAD_SLOTS:   # full: the least recently used goes
                victim = min(self.table, key=lambda s: self.table[s].last_used)
                del self.table[victim]
                self.retired.append(victim)
                self.counts["evicted"] += 1
            slot = self.table[session] = PeerSession(start)
            self.counts["sessions"] += 1
        slot.window.mark(counter)
        self.clock += 1
        slot.last_used = self.clock
        self.counts["live"] = len(self.table)
        return plaintext


class AeadState:
    """One aead pump: the receiver model, and the sender side the harness
    plays (its sessions, what it has sealed)."""

    def __init__(self, cipher: str) -> None:
        self.cipher = AeadCipher(cipher)
        self.receiver = AeadReceiver(self.cipher)
        self.start = FIRST_START           # the harness' current start time
        self.sent_top: dict[bytes, int] = {}
        self.history: list[bytes] = []
        self.one_off = 0

    def open(self, datagram: bytes):
        return self.receiver.open(datagram)

    @staticmethod
    def session(start: int, index: int) -> bytes:
        """Session `index` of a start time (ids as aead.new_session makes
        them: start, then 8 bytes that tell them apart)."""
        return struct.pack("!IB", start & 0xFFFFFFFF, 0xA0) + index.to_bytes(7, "big")

    def next_counter(self, session: bytes) -> int:
        """The session's next counter.  Odd sessions of the pool start far
        from 0 (a receiver takes any first counter), so that a counter the
        window's size behind is one there is."""
        top = self.sent_top.get(session)
        if top is None:
            index = int.from_bytes(session[5:], "big")
            return 3 * AEAD_WINDOW * (index + 1) if index < 32 and index % 2 else 0
        return min(top + 1, U64)

    def top(self, session: bytes) -> int:
        """The newest counter of a session: the receiver's (the model's)
        where it has the session, else the newest the harness sealed."""
        slot = self.receiver.table.get(session)
        if slot is not None and slot.window.top is not None:
            return slot.window.top
        return max(0, self.sent_top.get(session, 0))

    def seal(self, session: bytes, counter: int, plaintext: bytes, *, kind=aead_keys.TYPE_DATA,
             role: str = PEER_ROLE, key_role: str | None = None) -> bytes:
        """Sealed by a sender of `role` (with `key_role`'s key: a forgery
        when they differ), remembered for replays."""
        counter &= U64
        self.sent_top[session] = max(self.sent_top.get(session, -1), counter)
        if len(self.sent_top) > 4096:
            # A long campaign: forget what pick_session() cannot pick again
            # (one-offs, starts more than 3 before the current one).
            self.sent_top = {s: top for s, top in self.sent_top.items()
                             if be32(s, 0) >= self.start - 3 and int.from_bytes(s[5:], "big") < 32}
        header = aead_header(session, counter, kind=kind, role=role)
        datagram = self.cipher.seal(header, plaintext, self.cipher.key(session, key_role or role))
        self.history.append(datagram)
        del self.history[:-64]
        return datagram

    def pick_session(self, src: Source) -> bytes:
        """Which session of the harness seals the next datagram: one of 32
        of the current start (more than the receiver's 8 slots + 16
        retired), an older start's (a recording), a restart (a newer start:
        the receiver evicts the older sessions) or a one-off."""
        pick = src.int("aead_session", 0, 15)
        if pick < 11:
            return self.session(self.start, pick)
        if pick == 11:
            return self.session(self.start, 11 + src.int("aead_pool", 0, 20))
        if pick in (12, 13):
            return self.session(max(0, self.start - src.int("aead_age", 1, 3)), pick - 12)
        if pick == 14:
            self.start = min(self.start + src.int("aead_restart", 1, 3), 0xFFFFFFFF)
            return self.session(self.start, 0)
        self.one_off += 1
        return self.session(self.start, 0x800000 + self.one_off)


# ================================================================ configurations

MTUS = (68, 576, 1280, 1400, 1500, 9000, 65535)
CIPHERS = aead_keys.CIPHERS
STREAM_MAX = 190_000        # a stream input: under the pump's 256 KiB buffer
GRO_MAX = 64                # datagrams in one UDP_GRO message (the kernel's UDP_GRO_CNT_MAX)
IP_LENGTH_MAX = 65535


@dataclass(frozen=True)
class Config:
    kind: str               # "datagram" or "stream"
    mode: str
    mtu: int
    framing: str            # raw, len16, aead (datagram); len16, aead (stream)
    offload: bool
    cipher: str | None = None

    @property
    def limit(self) -> int:
        return max_frame(self.mode, self.mtu)

    @property
    def overhead(self) -> int:
        """Datagram: framing bytes around a packet.  Stream: around a packet
        inside a len16 record (aead's header and tag)."""
        if self.kind == "stream":
            return AEAD_OVERHEAD if self.framing == "aead" else 0
        return {"raw": 0, "len16": 2, "aead": AEAD_OVERHEAD}[self.framing]

    @property
    def record_limit(self) -> int:
        """Stream: the longest len16 record (a longer length is a bad one)."""
        return self.limit + self.overhead

    @property
    def ingress_slot(self) -> int:
        """The longest message Pump._feed takes (a receive slot)."""
        return IP_LENGTH_MAX + 1 if self.offload else AEAD_OVERHEAD + self.limit + 1


def decode_ingress_config(src: Source) -> Config:
    mode = src.choice("mode", ("tun", "tap"))
    framing = src.choice("framing", ("raw", "len16", "aead"))
    cipher = src.choice("cipher", CIPHERS) if framing == "aead" else None
    mtu = src.choice("mtu", MTUS)
    if framing == "len16":
        mtu = len16_mtu(mode, mtu, 0)
    offload = mode == "tun" and src.int("offload", 0, 1) == 1
    return Config("datagram", mode, mtu, framing, offload, cipher)


def len16_mtu(mode: str, mtu: int, overhead: int) -> int:
    """The MTU, lowered until a packet with its framing (`overhead` bytes
    besides the len16 length) fits a len16 length: the pump refuses more
    (TAP at 65535; aead over TCP above 65495)."""
    return min(mtu, LEN16_LIMIT - overhead - max_frame(mode, 0))


def decode_stream_config(src: Source) -> Config:
    mode = src.choice("mode", ("tun", "tap"))
    framing = src.choice("framing", ("len16", "aead"))
    cipher = src.choice("cipher", CIPHERS) if framing == "aead" else None
    mtu = len16_mtu(mode, src.choice("mtu", MTUS), AEAD_OVERHEAD if framing == "aead" else 0)
    offload = mode == "tun" and src.int("offload", 0, 1) == 1
    return Config("stream", mode, mtu, framing, offload, cipher)


# ================================================================ packet generators

def gen_packets(src: Source, n: int, limit: int) -> list[bytes]:
    """n packets of one kind: a run of TCP segments of one flow, IP packets
    of chosen sizes (some with lying length fields), or plain bytes."""
    kind = src.choice("kind", ("tcp", "ip", "bytes"))
    if kind == "tcp":
        return gen_tcp_run(src, n, limit)
    if kind == "ip":
        return [gen_ip(src, limit) for _ in range(n)]
    return [src.bytes("bytes", src.int("bytes_len", 0, limit + 40)) for _ in range(n)]


def gen_ip(src: Source, limit: int) -> bytes:
    version = src.choice("ip_version", (4, 6))
    proto = src.choice("ip_proto", (UDP, TCP, 1, 58))
    ihl = src.int("ip_ihl", 5, 15) if version == 4 else 5
    size = src.int("ip_size", 0, limit + 2)
    body = src.bytes("ip_body", src.int("ip_body_len", 0, 64))
    packet = bytearray(ip_packet(version, size, proto=proto, ihl=ihl, body=body))
    lie = src.int("ip_lie", 0, 7)
    if lie == 4 and len(packet) >= 6:     # a length field off by a little
        at = 2 if version == 4 else 4
        packet[at:at + 2] = ((be16(packet, at) + src.int("ip_delta", 0, 6) - 3) & 0xFFFF).to_bytes(2, "big")
    elif lie == 5 and packet:             # another version / header length
        packet[0] = src.int("ip_first", 0, 255)
    elif lie == 6:                        # cut short
        del packet[max(0, len(packet) - src.int("ip_cut", 1, 8)):]
    elif lie == 7:                        # trailing bytes
        packet += PATTERN[:src.int("ip_extra", 1, 8)]
    return bytes(packet)


TCP_OPTIONS = (TIMESTAMPS, b"", NOPS)


def gen_tcp_run(src: Source, n: int, limit: int) -> list[bytes]:
    """Consecutive segments of one TCP flow, all but the last of one size
    (what GRO hands over), each possibly mutated in a way that must keep it
    out of a coalesced run (or not: the checker decides from the bytes)."""
    version = src.choice("tcp_version", (4, 6))
    options = src.choice("tcp_options", TCP_OPTIONS)
    hdrs = (20 if version == 4 else 40) + 20 + len(options)
    mss = src.int("mss", 1, max(1, min(limit, IP_LENGTH_MAX) - hdrs))
    last = src.int("last_len", 0, mss)
    psh = src.int("psh_last", 0, 1)
    seq = src.int("seq", 0, 0xFFFFFFFF)
    sport = src.choice("sport", (40000, 40001))
    n = max(1, min(n, 70_000 // (mss + hdrs)))
    body = fill(src.bytes("tcp_body", src.int("tcp_body_len", 0, 256)), mss * (n - 1) + last)
    packets, offset = [], 0
    for i in range(n):
        size = mss if i < n - 1 else last
        payload = body[offset:offset + size]
        offset += size
        fields = dict(seq=seq, flags=ACK | (PSH if psh and i == n - 1 else 0), sport=sport,
                      options=options, ident=0x1000 + i)
        mutation = src.int("tcp_mutation", 0, 15)
        if mutation == 8:
            fields["csum_ok"] = False
        elif mutation == 9:   # IPv4: a bad header checksum; IPv6: another flow label
            fields.update({"ip_csum_ok": False} if version == 4 else {"flow": 1})
        elif mutation == 10:
            fields["seq"] = seq + src.int("tcp_seq_skew", 1, 3)
        elif mutation == 11:
            fields["ack"] = 78
        elif mutation == 12:
            fields["flags"] = src.choice("tcp_flags", (SYN | ACK, FIN | ACK, ACK | URG, ACK | ECE,
                                                        ACK | CWR, ACK | PSH, RST, 0))
        elif mutation == 13:
            payload = payload[:len(payload) // 2]
        elif mutation == 14:
            if version == 4:
                fields.update(src.choice("tcp_ip_change", ({"frag": MF}, {"frag": 0},
                                                           {"ip_options": NOPS}, {"ttl": 63})))
            else:
                fields["ttl"] = 63
        elif mutation == 15:
            fields.update(src.choice("tcp_other_change", ({"window": 503}, {"tos": 1},
                                                          {"sport": 40002})))
        packets.append(tcp_packet(version, payload, **fields))
        seq = (seq + size) & 0xFFFFFFFF
    return packets


# ================================================================ decoders

def wrap_datagram(src: Source, cfg: Config, aead: AeadState | None, packet: bytes) -> bytes:
    """A packet as the peer would frame it on UDP, or not quite."""
    if cfg.framing == "len16":
        how = src.int("len16_lie", 0, 7)
        if how == 7:
            return packet
        length = src.int("len16_header", 0, 0xFFFF) if how == 6 else len(packet) & 0xFFFF
        return length.to_bytes(2, "big") + packet
    if cfg.framing != "aead":
        return packet
    return seal_aead(src, aead, packet)


def seal_aead(src: Source, aead: AeadState, packet: bytes) -> bytes:
    """A packet as the peer (role "a") would seal it, or not quite: under
    one of the harness' sessions (see AeadState.pick_session) with a fresh,
    old, far-ahead or arbitrary counter, replayed, tampered with, cut,
    reflected (sealed by role "b", the pump's own), forged (labelled "a",
    sealed with "b"'s key), a hello, a wire version 1 datagram, or not
    sealed at all.  Pull ranges never depend on the state (a seed decodes
    the same whatever came before)."""
    how = src.int("aead_how", 0, 19)
    session = aead.pick_session(src)
    top = aead.top(session)
    fresh = aead.next_counter(session)
    if how <= 7:
        return aead.seal(session, fresh, packet)
    if how == 8:     # sealed by the pump's own role: a reflection
        return aead.seal(session, fresh, packet, role=PUMP_ROLE)
    if how == 9:     # behind the newest: inside the window or just out of it
        back = src.int("aead_back", 0, AEAD_WINDOW + 100)
        if src.int("aead_edge", 0, 1):          # within 8 of the window's edge
            back = AEAD_WINDOW - 8 + back % 17
        return aead.seal(session, max(0, top - back), packet)
    if how == 10:    # far ahead: the window slides (by about its size: the bitmap's wrap)
        jump = src.int("aead_jump", 1, 5 * AEAD_WINDOW)
        if src.int("aead_edge", 0, 1):
            jump = AEAD_WINDOW - 8 + jump % 144
        return aead.seal(session, top + jump, packet)
    if how == 11:
        return aead.seal(session, src.int("aead_counter", 0, U64), packet)
    if how == 12:    # a replay, byte for byte, of one of the last 64 sealed
        back = src.int("aead_replay", 0, 63)
        if aead.history:
            return aead.history[-1 - back % len(aead.history)]
        return aead.seal(session, fresh, packet)
    if how == 13:    # sealed, then one byte changed
        datagram = bytearray(aead.seal(session, fresh, packet))
        at = src.int("aead_flip_at", 0, len(datagram) - 1)
        datagram[at] ^= src.int("aead_flip", 1, 255)
        return bytes(datagram)
    if how == 14:    # a header byte (type, role, reserved) set to anything
        datagram = bytearray(aead.seal(session, fresh, packet))
        datagram[src.int("aead_type_at", 0, 3)] = src.int("aead_type", 0, 255)
        return bytes(datagram)
    if how == 16:    # labelled "a", sealed with the key of "b": a forgery
        return aead.seal(session, fresh, packet, key_role=PUMP_ROLE)
    if how == 17:    # a hello (the first record of a TCP connection): not data
        return aead.seal(session, fresh, b"", kind=aead_keys.TYPE_HELLO)
    if how == 18:    # sealed, then cut short
        datagram = aead.seal(session, fresh, packet)
        return datagram[:max(0, len(datagram) - src.int("aead_cut", 1, AEAD_OVERHEAD + 8))]
    if how == 19:    # wire version 1: type 0x01, 3 zero bytes, 8-byte session, counter (20 bytes)
        return (bytes((aead_keys.TYPE_V1_DATA, 0, 0, 0)) + session[4:] + fresh.to_bytes(8, "big")
                + packet + PATTERN[:AEAD_TAG])
    return packet    # not sealed at all


def decode_ingress(src: Source, cfg: Config, aead: AeadState | None) -> list[tuple[bytes, int]]:
    """The messages of one input: (bytes, UDP_GRO segment size or 0).  A
    GRO message holds at most GRO_MAX datagrams, as from the kernel."""
    slot = cfg.ingress_slot
    if src.int("style", 0, 1) == 0:
        segment = src.int("segment", 0, 0xFFFF) if cfg.offload else 0
        return [(src.rest("message")[:min(slot, GRO_MAX * segment or slot)], segment)]
    messages = []
    for _ in range(src.int("messages", 1, 8)):
        group = src.int("group", 1, 64) if cfg.offload else 1
        packets = gen_packets(src, group, cfg.limit)
        datagrams = [wrap_datagram(src, cfg, aead, p) for p in packets]
        if len(datagrams) == 1:
            messages.append((datagrams[0][:slot], 0))
            continue
        exact = src.int("segment_exact", 0, 3)
        segment = len(datagrams[0]) if exact else src.int("segment", 1, 0xFFFF)
        messages.append((b"".join(datagrams)[:min(slot, GRO_MAX * segment)], segment))
    return messages


def encode_frame(src: Source, cfg: Config, record: bytes) -> bytes:
    """A len16 record, or its length zero, over the limit, off by a few or
    missing."""
    how = src.int("len16_how", 0, 15)
    if how == 15:
        return record
    length = len(record)
    if how == 12:
        length = 0
    elif how == 13:
        length = src.int("len16_over", min(cfg.record_limit + 1, 0xFFFF), 0xFFFF)
    elif how == 14:
        length += src.int("len16_delta", 0, 6) - 3
    return (length & 0xFFFF).to_bytes(2, "big") + record


def decode_stream(src: Source, cfg: Config, aead: AeadState | None = None) -> list[bytes]:
    """A len16 byte stream cut into recv() chunks; with aead each record
    is a datagram sealed (or not quite) as seal_aead() makes them."""
    cuts = [src.int("cut", 0, 0xFFFF) for _ in range(src.int("cuts", 0, 32))]
    if src.int("style", 0, 1) == 0:
        stream = src.rest("stream")[:STREAM_MAX]
    else:
        parts = []
        for _ in range(src.int("groups", 1, 8)):
            packets = gen_packets(src, src.int("group", 1, 64), cfg.limit)
            if cfg.framing == "aead":
                packets = [seal_aead(src, aead, p) for p in packets]
            parts += [encode_frame(src, cfg, p) for p in packets]
        # Repeated: thousands of frames in one recv() (the coalescer's
        # packet list fills up and is flushed midway).
        stream = (b"".join(parts) * src.int("repeat", 1, 8))[:STREAM_MAX]
    bounds = [0] + sorted(c * len(stream) // 0xFFFF for c in cuts) + [len(stream)]
    return [stream[a:b] for a, b in zip(bounds, bounds[1:])]


# ================================================================ expectations

@dataclass
class Expect:
    fed: int = 0                                    # datagrams / frames fed
    accepted: list = field(default_factory=list)    # packets that must reach the device
    drops: Counter = field(default_factory=Counter)

    def packet(self, packet, mode, limit):
        reason = validate(packet, mode, limit)
        if reason:
            self.drops[reason] += 1
        else:
            self.accepted.append(bytes(packet))


def expect_message(cfg: Config, aead: AeadState | None, message: bytes, segment: int) -> Expect:
    """What ingress_message() must do with one received message: the model."""
    ex = Expect()
    limit = cfg.limit
    if not message:
        ex.fed = 1
        ex.drops["too_short" if cfg.framing == "aead" else
                 "bad_frame" if cfg.framing == "len16" else "empty"] += 1
        return ex
    step = segment or len(message)
    longest = cfg.overhead + limit
    for offset in range(0, len(message), step):
        chunk = message[offset:offset + step]
        ex.fed += 1
        if len(chunk) > longest:
            ex.drops["oversize"] += 1
            continue
        if cfg.framing == "aead":
            opened = aead.open(chunk)
            if isinstance(opened, str):
                ex.drops[opened] += 1
                continue
            chunk = opened
        elif cfg.framing == "len16":
            if len(chunk) <= 2 or be16(chunk, 0) != len(chunk) - 2:
                ex.drops["bad_frame"] += 1
                continue
            chunk = chunk[2:]
        ex.packet(chunk, cfg.mode, limit)
    return ex


# ================================================================ checks

class Violation(AssertionError):
    """An invariant of the pump does not hold for this input."""


VNET = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_LEN = VNET.size
GSO_TCPV4, GSO_TCPV6, NEEDS_CSUM = 1, 4, 1


def _show(data, n=48) -> str:
    data = bytes(data)
    return f"{len(data)} bytes {data[:n].hex()}{'...' if len(data) > n else ''}"


def check_plain_writes(writes: list[bytes], accepted: list[bytes]) -> None:
    if writes == accepted:
        return
    for i, (got, want) in enumerate(zip(writes, accepted)):
        if got != want:
            raise Violation(f"TUN write {i}: got {_show(got)}, expected {_show(want)}")
    raise Violation(f"{len(writes)} TUN writes, expected {len(accepted)}: "
                    f"{[_show(w) for w in (writes[len(accepted):] or accepted[len(writes):])[:3]]}")


def _tcp_layout(packet):
    """(l4, hdrs) of a plain TCP packet (IPv4 without options or IPv6)."""
    l4 = 20 if packet[0] >> 4 == 4 else 40
    return l4, l4 + (packet[l4 + 12] >> 4) * 4


def check_offload_writes(writes: list[bytes], accepted: list[bytes]) -> None:
    """Each write: a virtio_net_hdr and a valid IP packet.  In order, the
    writes carry exactly the accepted packets: one as it is (no GSO), or a
    coalesced run of TCP segments of one flow whose payloads, in sequence,
    are the super-packet's payload, each segment's checksums valid."""
    cursor = 0
    for index, write in enumerate(writes):
        where = f"TUN write {index} ({_show(write)})"
        if len(write) <= VNET_LEN:
            raise Violation(f"{where}: no packet behind the virtio_net_hdr")
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET.unpack_from(write)
        packet = write[VNET_LEN:]
        reason = validate(packet, "tun", IP_LENGTH_MAX + 40)
        if reason:
            raise Violation(f"{where}: not a valid IP packet ({reason})")
        if gso_type == 0:
            if (flags, hdr_len, gso_size, csum_start, csum_offset) != (0, 0, 0, 0, 0):
                raise Violation(f"{where}: a non-GSO header with fields set")
            if cursor >= len(accepted) or packet != accepted[cursor]:
                want = _show(accepted[cursor]) if cursor < len(accepted) else "nothing"
                raise Violation(f"{where}: expected packet {cursor}: {want}")
            cursor += 1
            continue
        version = packet[0] >> 4
        if gso_type != (GSO_TCPV4 if version == 4 else GSO_TCPV6) or (version == 4 and packet[0] != 0x45):
            raise Violation(f"{where}: gso_type {gso_type} for this packet")
        l4, hdrs = _tcp_layout(packet)
        if (flags, csum_start, csum_offset, hdr_len) != (NEEDS_CSUM, l4, 16, hdrs) or not gso_size:
            raise Violation(f"{where}: vnet header {VNET.unpack_from(write)}, expected "
                            f"NEEDS_CSUM, csum {l4}+16, hdr_len {hdrs}")
        if version == 4 and ones_sum(packet[:20]) != 0xFFFF:
            raise Violation(f"{where}: IPv4 header checksum of the super-packet")
        src, dst = addrs_of(packet)
        if be16(packet, l4 + 16) != pseudo_sum(src, dst, TCP, len(packet) - l4):
            raise Violation(f"{where}: TCP checksum field is not the pseudo-header sum")
        payload = packet[hdrs:]
        count = -(-len(payload) // gso_size)
        members = accepted[cursor:cursor + count]
        if count < 2 or len(members) != count:
            raise Violation(f"{where}: {count} segments of {gso_size}, "
                            f"{len(accepted) - cursor} accepted packets left")
        first = members[0]
        head, first_head = bytearray(packet[:hdrs]), bytearray(first[:hdrs])
        # What may differ from the first segment: IP length and checksum,
        # the TCP checksum, and PSH (taken from the last segment).
        for h in (head, first_head):
            h[2 if version == 4 else 4:(4 if version == 4 else 6)] = b"\0\0"
            if version == 4:
                h[10:12] = b"\0\0"
            h[l4 + 16:l4 + 18] = b"\0\0"
            h[l4 + 13] &= ~PSH & 0xFF
        if head != first_head or packet[l4 + 13] & ~PSH & 0xFF != ACK:
            raise Violation(f"{where}: super-packet header differs from its first segment "
                            f"{_show(first)}")
        seq0 = be32(packet, l4 + 4)
        for j, member in enumerate(members):
            what = f"{where}: segment {j} ({_show(member)})"
            if member[0] != packet[0] or _tcp_layout(member) != (l4, hdrs):
                raise Violation(f"{what}: another layout")
            if member[hdrs:] != payload[j * gso_size:(j + 1) * gso_size]:
                raise Violation(f"{what}: payload is not the super-packet's bytes "
                                f"{j * gso_size}..{(j + 1) * gso_size}")
            if be32(member, l4 + 4) != (seq0 + j * gso_size) & 0xFFFFFFFF:
                raise Violation(f"{what}: out of sequence")
            if member[l4 + 13] not in (ACK, ACK | PSH) or (member[l4 + 13] & PSH and j != count - 1):
                raise Violation(f"{what}: flags {member[l4 + 13]:#x} in a run")
            if version == 4:
                if ones_sum(member[:20]) != 0xFFFF:
                    raise Violation(f"{what}: bad IPv4 header checksum, coalesced")
                if member[1] != packet[1] or member[8] != packet[8] or (be16(member, 6) & 0x3FFF) \
                        or (member[6] & 0xE0) != (packet[6] & 0xE0) or member[9] != TCP \
                        or member[12:20] != packet[12:20]:
                    raise Violation(f"{what}: IPv4 fields differ from the run's")
            elif member[:4] != packet[:4] or member[6:8] != packet[6:8] or member[8:40] != packet[8:40]:
                raise Violation(f"{what}: IPv6 fields differ from the run's")
            if member[l4:l4 + 4] != packet[l4:l4 + 4] or member[l4 + 8:l4 + 13] != packet[l4 + 8:l4 + 13] \
                    or member[l4 + 14:l4 + 16] != packet[l4 + 14:l4 + 16] \
                    or member[l4 + 20:hdrs] != packet[l4 + 20:hdrs]:
                raise Violation(f"{what}: TCP fields differ from the run's")
            if ones_sum(member[l4:], pseudo_sum(src, dst, TCP, len(member) - l4)) != 0xFFFF:
                raise Violation(f"{what}: bad TCP checksum, coalesced")
        if bool(packet[l4 + 13] & PSH) != bool(members[-1][l4 + 13] & PSH):
            raise Violation(f"{where}: PSH is not the last segment's")
        cursor += count
    if cursor != len(accepted):
        raise Violation(f"{len(accepted) - cursor} accepted packet(s) never written, "
                        f"first: {_show(accepted[cursor])}")


def flat_counters(stats: dict) -> dict:
    out = {}
    for direction, counters in stats.items():
        for key, value in counters.items():
            if key == "last_errno":
                continue
            if isinstance(value, dict):
                for name, count in value.items():
                    out[(direction, key, name)] = count
            else:
                out[(direction, key)] = value
    return out


def check_counters(before: dict, after: dict, ex: Expect, writes: list[bytes]) -> None:
    for key, value in before.items():
        if after[key] < value:
            raise Violation(f"counter {key} went down: {value} -> {after[key]}")
    delta = {key: after[key] - before[key] for key in after}
    for key, value in delta.items():
        if key[0] == "egress" and value:
            raise Violation(f"egress counter {key} moved by {value} on ingress")
        if key[:2] == ("ingress", "errors") and value:
            raise Violation(f"ingress error {key[2]}: {value}")
    drops = {name: delta[("ingress", "drops", name)] for name in counter_names.DIRECTION_DROPS["ingress"]}
    want = {name: ex.drops.get(name, 0) for name in drops}
    unknown = set(ex.drops) - set(drops)
    if unknown:
        raise Violation(f"reference drop reasons the pump does not have: {unknown}")
    if drops != want:
        raise Violation(f"drops {({k: v for k, v in drops.items() if v})}, "
                        f"expected {({k: v for k, v in want.items() if v})}")
    packets, size = delta[("ingress", "packets")], delta[("ingress", "bytes")]
    if packets != len(ex.accepted) or size != sum(map(len, ex.accepted)):
        raise Violation(f"ingress counted {packets} packets / {size} bytes, "
                        f"expected {len(ex.accepted)} / {sum(map(len, ex.accepted))}")
    if delta[("ingress", "tun_io")] != len(writes):
        raise Violation(f"tun_io {delta[('ingress', 'tun_io')]}, {len(writes)} writes arrived")
    total_drops = sum(delta[("ingress", "drops", n)] for n in counter_names.DIRECTION_DROPS["ingress"])
    if packets + total_drops != ex.fed:
        raise Violation(f"{packets} delivered + {total_drops} dropped != {ex.fed} fed")


# ================================================================ the rig

class StandIn:
    """The TUN stand-in shared by every pump, drained by a thread."""

    BUFFER = 4 << 20

    def __init__(self) -> None:
        self.test_end, self.pump_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for end in (self.test_end, self.pump_end):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.BUFFER)
        self.cond = threading.Condition()
        self.got: list[bytes] = []
        self.markers = 0
        self.sent = 0
        self.closed = False
        self.thread = threading.Thread(target=self._drain, name="tun-stand-in", daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while True:
            try:
                data = self.test_end.recv(1 << 18)
            except OSError:
                return
            with self.cond:
                if self.closed:
                    return
                if data:
                    self.got.append(data)
                else:
                    self.markers += 1
                    self.cond.notify_all()

    def collect(self, timeout: float = 60.0) -> list[bytes]:
        """Everything the pump wrote since the last call."""
        self.sent += 1
        while True:
            try:
                self.pump_end.send(b"")
                break
            except BlockingIOError:
                threading.Event().wait(0.001)
        with self.cond:
            if not self.cond.wait_for(lambda: self.markers >= self.sent, timeout):
                raise Violation("the TUN stand-in was not drained: a write went missing")
            got, self.got = self.got, []
        return got

    def close(self) -> None:
        with self.cond:
            self.closed = True
        self.pump_end.close()
        self.thread.join(5)
        self.test_end.close()


@dataclass
class Entry:
    pump: object
    cfg: Config
    aead: AeadState | None = None


PEER = ("127.0.0.1", 9)


class Rig:
    """The pumps of a fuzzing process, one per configuration, made on first
    use and reused; never started (the hooks need a stopped pump)."""

    def __init__(self) -> None:
        from tunrelay._fastpath import Pump
        self.Pump = Pump
        self.standin = StandIn()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            self.tcp_peer = socket.create_connection(listener.getsockname(), 5)
            self.tcp, _ = listener.accept()
        self.entries: dict[Config, Entry] = {}

    def entry(self, cfg: Config) -> Entry:
        entry = self.entries.get(cfg)
        if entry is None:
            entry = self.entries[cfg] = self._make(cfg)
        return entry

    def _make(self, cfg: Config) -> Entry:
        options = dict(mode=cfg.mode, mtu=cfg.mtu, batch=1, offload=cfg.offload, framing=cfg.framing)
        aead = AeadState(cfg.cipher) if cfg.framing == "aead" else None
        if aead:
            options.update(key=TEST_PSK, cipher=cfg.cipher, role=PUMP_ROLE)
        if cfg.kind == "stream":
            entry = Entry(self.Pump(self.standin.pump_end, self.tcp, **options), cfg, aead)
        else:
            entry = Entry(self.Pump(self.standin.pump_end, self.udp, peer=PEER, **options), cfg, aead)
        if aead:
            # Not vacuous: a datagram (record) of the harness' first session
            # is accepted by the model and delivered by the pump.
            datagram = aead.seal(aead.session(aead.start, 0), 0, ip_packet(4, 20))
            if cfg.kind == "stream":
                entry.pump.attach(self.tcp)
                ex = feed_stream_chunk(self, entry, Len16Parser(cfg.record_limit),
                                       len(datagram).to_bytes(2, "big") + datagram)[0]
            else:
                ex = feed_datagram(self, entry, datagram, 0)
            if ex.accepted != [ip_packet(4, 20)]:
                raise Violation(f"{cfg}: the harness' first sealed packet was not accepted: {ex}")
        return entry

    def close(self) -> None:
        self.entries.clear()
        for sock in (self.udp, self.tcp, self.tcp_peer):
            sock.close()
        self.standin.close()


def feed_datagram(rig: Rig, entry: Entry, message: bytes, segment: int) -> Expect:
    """One received message through Pump._feed, checked against the model."""
    ex = expect_message(entry.cfg, entry.aead, message, segment)
    pump = entry.pump
    before = flat_counters(pump.stats())
    status = pump._feed(message, segment=segment)
    writes = rig.standin.collect()
    after = flat_counters(pump.stats())
    if status != 0:
        raise Violation(f"_feed returned {status}")
    _check(entry, writes, ex, before, after)
    return ex


def feed_stream_chunk(rig: Rig, entry: Entry, parser: Len16Parser, chunk: bytes) -> tuple[Expect, bool]:
    """One recv() of a stream through Pump._feed_stream and the reference
    (Len16Parser, then for aead the model of each record), checked."""
    cfg = entry.cfg
    frames, bad = parser.feed(chunk)
    ex = Expect(fed=len(frames))
    for frame in frames:
        if entry.aead:
            opened = entry.aead.open(frame)
            if isinstance(opened, str):
                ex.drops[opened] += 1
                continue
            frame = opened
        ex.packet(frame, cfg.mode, cfg.limit)
    pump = entry.pump
    before = flat_counters(pump.stats())
    status = pump._feed_stream(chunk)
    writes = rig.standin.collect()
    after = flat_counters(pump.stats())
    want = "bad_length" if bad else "ok"
    if status != want:
        raise Violation(f"_feed_stream said {status!r}, Len16Parser {want!r}")
    _check(entry, writes, ex, before, after)
    return ex, bad


def _check(entry, writes, ex, before, after):
    if entry.cfg.offload:
        check_offload_writes(writes, ex.accepted)
    else:
        check_plain_writes(writes, ex.accepted)
    check_counters(before, after, ex, writes)
    if entry.aead:
        got, want = entry.pump.keyring.counts(), entry.aead.receiver.counts
        if got != want:
            raise Violation(f"Keyring counts {got}, expected {want}")


def run_ingress(rig: Rig, src: Source) -> None:
    cfg = decode_ingress_config(src)
    entry = rig.entry(cfg)
    for message, segment in decode_ingress(src, cfg, entry.aead):
        try:
            feed_datagram(rig, entry, message, segment)
        except Violation as exc:
            raise Violation(f"{cfg}, message of {len(message)} bytes, segment {segment}: {exc}") from None


def run_stream(rig: Rig, src: Source) -> None:
    """A fresh len16 stream, chunk by chunk through Pump._feed_stream and
    framing.Len16Parser: same records, same verdicts (aead: the model's),
    same moment of going bad."""
    cfg = decode_stream_config(src)
    entry = rig.entry(cfg)
    chunks = decode_stream(src, cfg, entry.aead)
    entry.pump.attach(rig.tcp)       # a new connection: nothing buffered
    parser = Len16Parser(cfg.record_limit)
    for index, chunk in enumerate(chunks):
        try:
            bad = feed_stream_chunk(rig, entry, parser, chunk)[1]
        except Violation as exc:
            raise Violation(f"{cfg}, chunk {index} of {len(chunks)} "
                            f"({_show(chunk, 16)}): {exc}") from None
        if bad:
            break
