#!/usr/bin/env python3
"""atheris harness: WireGuard handshake messages into a WireGuardDevice.

Each input is a fresh device (not started: no sockets; what it would send
goes nowhere) with one peer whose keys the harness holds, and a short
sequence of messages fed through the device's control-message handler
(``WireGuardDevice._handle``, what each datagram of a take() batch goes
through): size and type checks, mac1, under load mac2 / cookie replies /
the token bucket, the Noise steps, the replay and flood checks, index
lookups, session installation.  Messages are raw fuzzed bytes, or genuine
ones (an initiation from the peer, a response to the device's pending
initiation, a cookie reply, an initiation from a stranger) with a fuzzed
byte flipped or cut to a fuzzed length; and the parsers alone
(consume_initiation, consume_response, take_reply, parse_key,
key_from_hex) on raw bytes.  Checked, raised as an exception (a libFuzzer
crash) when violated:

* nothing raises but the modules' own refusals (HandshakeError, and
  ValueError from the key parsers);
* every message is decided exactly once: one refusal counted under one
  reason, or one accepted step (initiation answered, response taken,
  cookie taken);
* the device's record of sessions is the table's: the local indexes it
  holds for the peer are exactly the table's live ones, and an index of a
  pending handshake is never one of a session.

Input layout (no FuzzedDataProvider: seeds are easy to write by hand):
byte 0 = flags (bit 0 under load, bit 1 a pending initiation of the
device, bits 2-3 the source address, bits 4-5 how far the clock moves
between steps: 0, 10 ms, 1 s); then steps of [kind, a, b, payload
...] (see ``step``).

Run: python tests/fuzz/fuzz_wg_handshake.py [libFuzzer flags] [corpus dirs]
(see README.md in this directory); ``--write-seeds DIR`` writes the seed
corpus.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

with atheris.instrument_imports(include=["tunrelay.wireguard"]):
    from tunrelay.wireguard import cookie, noise
    from tunrelay.wireguard.device import WireGuardDevice
    from tunrelay.wireguard.peer import Pending

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402

DEVICE_KEY = bytes(range(1, 33))
PEER_KEY = bytes(range(33, 65))
STRANGER_KEY = bytes(range(65, 97))
DEVICE = noise.Identity.from_bytes(DEVICE_KEY)
PEER = noise.Identity.from_bytes(PEER_KEY)
STRANGER = noise.Identity.from_bytes(STRANGER_KEY)
ADDRESSES = [("192.0.2.1", 51820), ("2001:db8::1", 51820, 0, 0), ("198.51.100.7", 1),
             ("::ffff:192.0.2.9", 65535, 0, 0)]
PENDING_INDEX = 0x0A0B0C0D
STAMP = noise.tai64n(1_700_000_000.0)


def _fixed(n: int) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes([n]) * 32)


def _genuine() -> dict[str, bytes]:
    """Genuine messages, made once (fixed ephemerals): each input's device is
    fresh, so the same bytes are new to it every time."""
    to_device = cookie.MacSigner(DEVICE.public)
    init1, _ = noise.create_initiation(PEER, DEVICE.public, 0x11111111, timestamp=STAMP,
                                       ephemeral=_fixed(7))
    init2, _ = noise.create_initiation(PEER, DEVICE.public, 0x22222222,
                                       timestamp=noise.tai64n_after(STAMP), ephemeral=_fixed(8))
    stranger, _ = noise.create_initiation(STRANGER, DEVICE.public, 0x33333333, timestamp=STAMP,
                                          ephemeral=_fixed(9))
    ours, _ = pending_initiation()
    got = noise.consume_initiation(PEER, ours)
    response, _ = noise.create_response(got, 0x44444444, ephemeral=_fixed(10))
    signed_ours = cookie.MacSigner(PEER.public).sign(ours)
    reply = cookie.MacVerifier(PEER.public).reply(signed_ours, ADDRESSES[0])
    return {"init1": to_device.sign(init1), "init2": to_device.sign(init2),
            "stranger": to_device.sign(stranger), "response": to_device.sign(response),
            "cookie": reply, "ours": signed_ours}


def pending_initiation() -> tuple[bytes, noise.InitiatorState]:
    return noise.create_initiation(DEVICE, PEER.public, PENDING_INDEX, timestamp=STAMP,
                                   ephemeral=_fixed(11))


GENUINE = _genuine()
KINDS = ["raw", "init1", "init2", "stranger", "response", "cookie", "cut", "parsers"]


class Input:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def byte(self) -> int:
        if self.at >= len(self.data):
            return 0
        self.at += 1
        return self.data[self.at - 1]

    def take(self, n: int) -> bytes:
        out = self.data[self.at:self.at + n]
        self.at += len(out)
        return out

    @property
    def done(self) -> bool:
        return self.at >= len(self.data)


def decided(device: WireGuardDevice) -> int:
    stats = device.stats()
    hs = stats["handshakes"]
    return (sum(stats["refused"].values()) + hs["initiations_received"]
            + hs["responses_received"] + hs["cookies_received"])


def make_device(flags: int) -> WireGuardDevice:
    device = WireGuardDevice([0], private_key=DEVICE_KEY)
    device.add_peer(PEER.public, "peer")
    device.set_peer(PEER.public, endpoint=("192.0.2.1", 51820), allowed_ips=["10.0.0.2/32"])
    if flags & 1:
        device._under_load_until = float("inf")
    if flags & 2:
        peer = device._peers[PEER.public]
        message, state = pending_initiation()
        peer.pending = Pending(state, 0.0)
        peer.attempt_started = 0.0
        device._pending[PENDING_INDEX] = peer
        peer.signer.sign(message)            # its mac1 is the aad of a cookie reply
    device._running = True                   # handled as by a running device (sends go nowhere)
    return device


def parsers(payload: bytes) -> None:
    """The parsers alone: only their own refusals may come out."""
    for kind, size in ((noise.MSG_INITIATION, noise.INITIATION_SIZE),
                       (noise.MSG_RESPONSE, noise.RESPONSE_SIZE)):
        # the payload as it is, and stretched to the size, with the header right
        body = (payload * (size // max(len(payload), 1) + 1))[:size] if payload else bytes(size)
        for data in (payload, bytes([kind, 0, 0, 0]) + body[4:]):
            try:
                noise.consume_initiation(DEVICE, data)
            except noise.HandshakeError:
                pass
            try:
                noise.consume_response(pending_initiation()[1], DEVICE, data)
            except noise.HandshakeError:
                pass
    signer = cookie.MacSigner(PEER.public)
    signer.last_mac1 = GENUINE["ours"][-32:-16]
    if signer.take_reply(payload):
        raise AssertionError("a fuzzed cookie reply opened")
    text = payload.decode("latin-1")
    for parse in (noise.parse_key, noise.key_from_hex):
        try:
            key = parse(text)
        except ValueError:
            continue
        if len(key) != 32:
            raise AssertionError(f"{parse.__name__} returned {len(key)} bytes")


def step(device: WireGuardDevice, src: Input, address: tuple, now: float) -> None:
    kind = KINDS[src.byte() % len(KINDS)]
    a, b = src.byte(), src.byte()
    if kind == "parsers":
        parsers(src.take(a))
        return
    if kind == "raw":
        message = src.take(a)
    elif kind == "cut":
        base = GENUINE[("init1", "response", "cookie")[b % 3]]
        length = a + (b >> 2) * 4
        message = (base + bytes(length))[:length]
    else:
        message = bytearray(GENUINE[kind])
        if b:
            message[a % len(message)] ^= b
        message = bytes(message)
    before = decided(device)
    device._handle(message, address, now)
    after = decided(device)
    if after != before + 1:
        raise AssertionError(f"{kind} message decided {after - before} times: {device.stats()}")


def check_sessions(device: WireGuardDevice) -> None:
    for peer in device._peers.values():
        info = device.table.info(peer.table_id)
        live = {i for i in info["sessions"].values() if i is not None}
        if set(peer.sessions) != live:
            raise AssertionError(f"device sessions {set(peer.sessions)} != table {live}")
        if info["sessions"]["current"] != peer.current_index:
            raise AssertionError("current session out of step")
    if set(device._pending) & set(device._sessions):
        raise AssertionError("a pending index is also a session's")


def TestOneInput(data: bytes) -> None:
    src = Input(data)
    flags = src.byte()
    device = make_device(flags)
    address = ADDRESSES[(flags >> 2) % len(ADDRESSES)]
    tick = (0.0, 0.01, 1.0, 0.0)[(flags >> 4) & 3]
    for i in range(8):
        if src.done:
            break
        step(device, src, address, 1000.0 + i * tick)
        check_sessions(device)


def write_seeds(directory: Path) -> None:
    """One seed per genuine path, written by hand."""
    k = {name: i for i, name in enumerate(KINDS)}
    seeds = {
        "initiation": bytes([0, k["init1"], 0, 0]),
        "initiation_then_replay": bytes([0, k["init1"], 0, 0, k["init1"], 0, 0]),
        "initiation_newer": bytes([0x20, k["init1"], 0, 0, k["init2"], 0, 0]),
        "initiation_too_soon": bytes([0x10, k["init1"], 0, 0, k["init2"], 0, 0]),
        "under_load": bytes([1, k["init1"], 0, 0]),
        "response": bytes([2, k["response"], 0, 0]),
        "response_then_cookie": bytes([2, k["response"], 0, 0, k["cookie"], 0, 0]),
        "cookie_under_load": bytes([3, k["cookie"], 0, 0, k["response"], 0, 0]),
        "stranger_v6": bytes([4, k["stranger"], 0, 0]),
        "flipped_mac1": bytes([0, k["init1"], 120, 1]),
        "cut_initiation": bytes([0, k["cut"], 147, 0]),
        "raw": bytes([0, k["raw"], 4, 0]) + b"\x01\0\0\0",
        "parsers_key": bytes([0, k["parsers"], 44, 0]) + noise.key_to_base64(PEER_KEY).encode(),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, seed in seeds.items():
        (directory / name).write_bytes(seed)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write-seeds":
        write_seeds(Path(sys.argv[2]))
        sys.exit(0)
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
