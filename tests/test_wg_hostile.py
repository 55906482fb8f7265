"""Hostile handshake input against a running WireGuardDevice, over
loopback: each refusal is counted under its reason, and the expensive
work (the DH) is not done for what mac1 or the load defence turns away.

* a forged mac1 is dropped before any DH;
* a replayed, a forged and a reflected data message on the wire between
  two devices never reach either, each counted;
* a replayed initiation (same TAI64N) is refused, and a second one within
  the per-peer interval;
* an initiation flood is answered with cookie replies while the real peer
  (with the cookie, mac2) still completes its handshake; sources that do
  hold a cookie are capped by their token bucket;
* a cookie reply that does not open, or for no index of ours, is ignored;
  a good one makes the next retry carry mac2;
* truncated and oversized messages of each type, unknown types, unknown
  receiver indexes and unknown peers are counted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import struct
import subprocess
import sys
import time

import pytest
from test_wg_device import A_NETS, B_NETS, FAST, WAIT, End, connect, packet, until

from conftest import load_fastpath
from tunrelay.wireguard import cookie, noise
from tunrelay.wireguard.device import CONTROL_SLOTS

Address = tuple[str, int]


class Attacker:
    """A UDP socket on loopback that speaks (or mis-speaks) WireGuard to a device."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.identity = noise.Identity.generate()

    @property
    def address(self) -> Address:
        return self.sock.getsockname()

    def send(self, end: End, data: bytes) -> None:
        self.sock.sendto(data, ("127.0.0.1", end.port))

    async def recv(self, timeout: float = WAIT) -> bytes:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.sock_recv(self.sock, 4096), timeout)
        except TimeoutError:
            pytest.fail(f"no datagram within {timeout:g} s", pytrace=False)

    def drain(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096))
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.sock.close()


def junk_initiation(end: End, sender: int, *, cookie_value: bytes | None = None) -> bytes:
    """148 bytes of initiation with a random body and a valid mac1 for
    ``end`` (an attacker who knows the public key); mac2 from
    ``cookie_value`` when given."""
    body = struct.pack("<B3xI", noise.MSG_INITIATION, sender) + os.urandom(108)
    mac1 = noise.keyed_mac(noise.blake2s(cookie.LABEL_MAC1, end.public), body)
    mac2 = noise.keyed_mac(cookie_value, body + mac1) if cookie_value else bytes(16)
    return body + mac1 + mac2


def start(*ends: End) -> asyncio.Future[None]:
    load_fastpath()
    return asyncio.ensure_future(asyncio.gather(*(e.device.start() for e in ends)))


def run(test: object) -> None:
    asyncio.run(test())  # type: ignore[operator]


# ---------------------------------------------------------------- mac1 first

def test_forged_mac1_is_dropped_before_any_dh(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_dh = noise.dh

    def counting_dh(private: object, public: bytes) -> bytes:
        calls.append(public)
        return real_dh(private, public)  # type: ignore[arg-type]

    async def main() -> None:
        b, mallory = End("b", B_NETS), Attacker()
        try:
            await start(b)
            b.device.add_peer(mallory.identity.public, "mallory")
            b.device.set_peer(mallory.identity.public, allowed_ips=A_NETS)
            good, _ = noise.create_initiation(mallory.identity, b.public, 1)
            signed = cookie.MacSigner(b.public).sign(good)
            monkeypatch.setattr(noise, "dh", counting_dh)
            for offset in (8, 60, 116, 120, 131):        # body and mac1 bytes
                forged = bytearray(signed)
                forged[offset] ^= 0x40
                mallory.send(b, bytes(forged))
            # mac1 for another key entirely
            mallory.send(b, cookie.MacSigner(mallory.identity.public).sign(good))
            await until(lambda: b.refused("bad_mac1") == 6, "six bad mac1 refusals")
            assert calls == [], "a DH ran for a message whose mac1 was wrong"
            assert b.handshakes("initiations_received") == 0
            # the genuine one passes mac1 and costs DHs (and is answered)
            mallory.send(b, signed)
            response = await mallory.recv()
            assert response[0] == noise.MSG_RESPONSE and len(response) == noise.RESPONSE_SIZE
            assert calls, "the genuine initiation did not reach the DH"
        finally:
            await b.close()
            mallory.close()
    run(main)


# ---------------------------------------------------------------- replays and floods per peer

def test_replayed_initiation_is_refused() -> None:
    async def main() -> None:
        b, alice = End("b", B_NETS), Attacker()
        try:
            await start(b)
            b.device.add_peer(alice.identity.public, "alice")
            b.device.set_peer(alice.identity.public, allowed_ips=A_NETS)
            signer = cookie.MacSigner(b.public)
            init, state = noise.create_initiation(alice.identity, b.public, 77)
            signed = signer.sign(init)
            alice.send(b, signed)
            response = await alice.recv()
            keys = noise.consume_response(state, alice.identity, response)
            assert keys.remote_index != 0
            # The same bytes again (a recording): refused, not answered.
            alice.send(b, signed)
            await until(lambda: b.refused("replayed_timestamp") == 1, "the replay refusal")
            # An older timestamp in a fresh message is a replay too.
            old, _ = noise.create_initiation(alice.identity, b.public, 78,
                                             timestamp=noise.tai64n(time.time() - 60))
            alice.send(b, signer.sign(old))
            await until(lambda: b.refused("replayed_timestamp") == 2, "the old timestamp refusal")
            assert b.handshakes("responses_sent") == 1 and alice.drain() == []
        finally:
            await b.close()
            alice.close()
    run(main)


def test_second_initiation_within_the_interval_is_refused() -> None:
    # A long interval makes "too soon" independent of the machine's speed.
    timers = dataclasses.replace(FAST, initiation_interval=60.0)

    async def main() -> None:
        b, alice = End("b", B_NETS, timers=timers), Attacker()
        try:
            await start(b)
            b.device.add_peer(alice.identity.public, "alice")
            signer = cookie.MacSigner(b.public)
            first, _ = noise.create_initiation(alice.identity, b.public, 1)
            stamp = noise.tai64n_after(noise.tai64n())
            second, _ = noise.create_initiation(alice.identity, b.public, 2, timestamp=stamp)
            alice.send(b, signer.sign(first))
            await alice.recv()
            alice.send(b, signer.sign(second))
            await until(lambda: b.refused("too_soon") == 1, "the too-soon refusal")
            assert b.handshakes("responses_sent") == 1
        finally:
            await b.close()
            alice.close()
    run(main)


def test_flood_gets_cookies_and_the_real_peer_still_gets_through() -> None:
    async def main() -> None:
        a, b = End("a", A_NETS), End("b", B_NETS)
        flood = Attacker("127.0.0.2")
        stop = asyncio.Event()

        async def flooder() -> None:
            sender = 0
            while not stop.is_set():
                # One burst without yielding to the loop: a take() batch of
                # far more than CONTROL_SLOTS/8 handshake messages.
                for _ in range(CONTROL_SLOTS // 2):
                    sender += 1
                    try:
                        flood.send(b, junk_initiation(b, sender))
                    except BlockingIOError:
                        break
                flood.drain()
                await asyncio.sleep(0.05)

        try:
            await start(a, b)
            flooding = asyncio.ensure_future(flooder())
            await until(lambda: b.device.under_load, "b to notice the flood")
            connect(a, b)
            data = packet(a.v4, b.v4, 200, 1)
            a.send(data)                 # a's handshake runs while the flood goes on
            assert await b.recv() == data
            under_load_at_the_end = b.device.under_load
            stop.set()
            await flooding
            stats = b.device.stats()
            assert stats["handshakes"]["cookies_sent"] >= CONTROL_SLOTS // 8
            assert b.refused("cookie_needed") >= CONTROL_SLOTS // 8
            # Only a batch below the load threshold is worked on (DH) before
            # the defence is on: the flood's junk never did more.
            assert b.refused("decrypt_failure") < CONTROL_SLOTS // 8
            # a got in: with the cookie (mac2) when its initiation met the load
            assert b.handshakes("responses_sent") >= 1
            if under_load_at_the_end:
                assert a.handshakes("cookies_received") >= 1
            reply = packet(b.v4, a.v4, 200, 2)
            b.send(reply)
            assert await a.recv() == reply
        finally:
            stop.set()
            await a.close()
            await b.close()
            flood.close()
    run(main)


#: A flood at the machine's full speed, from another process (not paced by
#: the event loop under test): valid-mac1 initiations from 127.0.0.3.
FLOOD = r"""
import os, socket, sys, time
port, mac1_key, seconds = int(sys.argv[1]), bytes.fromhex(sys.argv[2]), float(sys.argv[3])
import hashlib
messages = []
for n in range(512):
    body = bytes([1, 0, 0, 0]) + n.to_bytes(4, "little") + os.urandom(108)
    messages.append(body + hashlib.blake2s(body, key=mac1_key, digest_size=16).digest()
                    + bytes(16))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.3", 0))
sent, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    for m in messages:
        try:
            s.sendto(m, ("127.0.0.1", port))
            sent += 1
        except OSError:
            pass
print(sent)
"""


def test_a_continuous_flood_does_not_keep_the_real_peer_out() -> None:
    """A flood that never pauses keeps the control queue full: what gets a
    slot is a lottery the flood wins.  The loops' handshake gate gives one
    address a small share of the quarter of the queue kept for unproven
    messages, and the rest to those whose mac2 carries the cookie of their
    sender's address, so the real peer gets a cookie reply, then gets in,
    while the flood goes on."""
    async def main() -> None:
        a, b = End("a", A_NETS), End("b", B_NETS)
        flood = None
        try:
            await start(a, b)
            mac1_key = noise.blake2s(cookie.LABEL_MAC1, b.public)
            flood = subprocess.Popen([sys.executable, "-c", FLOOD, str(b.port), mac1_key.hex(),
                                      str(WAIT * 2)], stdout=subprocess.PIPE, text=True)
            await until(lambda: b.device.stats()["table"]["control_dropped"] > CONTROL_SLOTS,
                        "the flood to overflow b's control queue")
            connect(a, b)
            data = packet(a.v4, b.v4, 200, 1)
            a.send(data)
            assert await b.recv() == data
            assert flood.poll() is None, "the flood ended before a got through: this proves nothing"
            table = b.device.stats()["table"]
            assert table["gate_mac2_ok"] >= 1, table      # a came in with b's cookie
            # Shed by the gate: beyond its share of one address, or of the queue.
            assert table["gate_source_capped"] + table["gate_shed"] > CONTROL_SLOTS, table
            assert a.handshakes("cookies_received") >= 1
            reply = packet(b.v4, a.v4, 200, 2)
            b.send(reply)
            assert await a.recv() == reply
        finally:
            if flood is not None:
                flood.kill()
                flood.wait()
            await a.close()
            await b.close()
    run(main)


def test_sources_with_a_cookie_are_capped_by_their_bucket() -> None:
    async def main() -> None:
        b, mallory = End("b", B_NETS), Attacker("127.0.0.3")
        try:
            await start(b)
            # A burst makes b busy; mallory reads a cookie reply to one of them.
            sent = {}
            for sender in range(1, CONTROL_SLOTS // 2):
                msg = junk_initiation(b, sender)
                sent[sender] = msg[-32:-16]
                mallory.send(b, msg)
            reply = await mallory.recv()
            receiver = cookie.parse_cookie_reply(reply)
            assert receiver in sent
            cookie_key = noise.blake2s(cookie.LABEL_COOKIE, b.public)
            value = cookie.xopen(cookie_key, reply[8:32], reply[32:64], sent[receiver])
            assert value is not None and len(value) == 16
            mallory.drain()
            before = b.refused("decrypt_failure")
            began = time.monotonic()
            count = CONTROL_SLOTS // 2
            for sender in range(count):
                mallory.send(b, junk_initiation(b, 10_000 + sender, cookie_value=value))
            await until(lambda: b.refused("rate_limited") + b.refused("decrypt_failure")
                        - before >= count, "every mac2-valid message to be decided")
            elapsed = time.monotonic() - began
            worked = b.refused("decrypt_failure") - before
            timers = b.device.timers
            # With the cookie, only the bucket's tokens reach the DH.
            assert worked <= timers.handshake_burst + timers.handshakes_per_second * (elapsed + 1)
            assert b.refused("rate_limited") >= count - worked
            assert b.refused("rate_limited") > 0
        finally:
            await b.close()
            mallory.close()
    run(main)


# ---------------------------------------------------------------- cookie replies

def test_cookie_replies_bad_unknown_and_good() -> None:
    # The retry comes after 3 s: the replies below reach the first
    # initiation's index well before it is replaced.
    timers = dataclasses.replace(FAST, rekey_timeout=3.0, rekey_timeout_jitter=0.0)

    async def main() -> None:
        a, silent = End("a", A_NETS, timers=timers), Attacker()
        try:
            await start(a)
            peer = silent.identity
            a.device.add_peer(peer.public, "silent")
            a.device.set_peer(peer.public, endpoint=silent.address, allowed_ips=B_NETS)
            a.send(packet(a.v4, "10.9.0.2", 100, 1))
            first = await silent.recv()
            assert first[0] == noise.MSG_INITIATION and first[-16:] == bytes(16)
            (index,) = struct.unpack_from("<I", first, 4)
            verifier = cookie.MacVerifier(peer.public)
            # sealed under another responder's key: does not open
            wrong = cookie.MacVerifier(noise.Identity.generate().public).reply(first, a_addr(a))
            silent.send(a, wrong)
            await until(lambda: a.refused("bad_cookie") == 1, "the bad cookie refusal")
            # for an index a never used
            stray = bytearray(verifier.reply(first, a_addr(a)))
            stray[4:8] = struct.pack("<I", index ^ 0xFFFFFFFF)
            silent.send(a, bytes(stray))
            await until(lambda: a.refused("unknown_index") == 1, "the unknown index refusal")
            # truncated
            silent.send(a, verifier.reply(first, a_addr(a))[:63])
            await until(lambda: a.refused("malformed_size") == 1, "the short cookie reply")
            assert a.handshakes("cookies_received") == 0
            # A genuine reply: the retry carries mac2 under that cookie.
            silent.send(a, verifier.reply(first, a_addr(a)))
            await until(lambda: a.handshakes("cookies_received") == 1, "the cookie to be taken")
            retry = await silent.recv()
            assert retry[0] == noise.MSG_INITIATION and retry[-16:] != bytes(16)
            assert verifier.mac1_ok(retry) and verifier.mac2_ok(retry, a_addr(a))
        finally:
            await a.close()
            silent.close()
    run(main)


def a_addr(end: End) -> Address:
    return ("127.0.0.1", end.port)


# ---------------------------------------------------------------- malformed and unknown

def test_malformed_unknown_and_stray_messages_are_counted() -> None:
    async def main() -> None:
        b, mallory = End("b", B_NETS), Attacker()
        try:
            await start(b)
            stranger = noise.Identity.generate()
            signer = cookie.MacSigner(b.public)
            malformed = [
                b"\x01" + bytes(146), b"\x01" + bytes(148),          # initiation 147, 149
                b"\x02" + bytes(90), b"\x02" + bytes(92),            # response 91, 93
                b"\x03" + bytes(62), b"\x03" + bytes(64),            # cookie reply 63, 65
                b"\x01\x01\0\0" + bytes(144),                        # reserved bytes set
                b"\x01",                                             # one byte
            ]
            for data in malformed:
                mallory.send(b, data)
            for kind in (0, 5, 255):
                mallory.send(b, bytes([kind]) + bytes(147))
            await until(lambda: b.refused("malformed_size") == len(malformed)
                        and b.refused("unknown_type") == 3, "malformed and unknown types")
            # Below and above what a control slot holds: the pump counts them.
            mallory.send(b, b"\x04" + bytes(20))                       # transport too short
            mallory.send(b, b"\x01" + bytes(4000))                     # oversized handshake
            await until(lambda: b.drops().get("too_short", 0) >= 1
                        and b.drops().get("oversize", 0) >= 1, "the pump's own drops")
            # A response (mac1 valid) for an index b never gave out.
            resp = struct.pack("<B3xII", noise.MSG_RESPONSE, 5, 0x12345678) + os.urandom(48)
            mallory.send(b, signer.sign(resp + bytes(32)))
            await until(lambda: b.refused("unknown_index") == 1, "the unknown index refusal")
            # A transport message for an unknown index: the data path's drop.
            mallory.send(b, noise.seal_transport(os.urandom(32), 0xDEADBEEF, 0, b"x" * 32))
            await until(lambda: b.drops().get("no_session", 0) >= 1, "the transport drop")
            # An initiation that opens, from a key that is no peer of b's.
            init, _ = noise.create_initiation(stranger, b.public, 9)
            mallory.send(b, signer.sign(init))
            await until(lambda: b.refused("unknown_peer") == 1, "the unknown peer refusal")
            # Random body, valid mac1: it does not authenticate.
            mallory.send(b, junk_initiation(b, 3))
            await until(lambda: b.refused("decrypt_failure") == 1, "the decrypt failure")
            assert b.handshakes("responses_sent") == 0 and mallory.drain() == []
        finally:
            await b.close()
            mallory.close()
    run(main)


def test_response_that_does_not_open_is_refused_and_the_handshake_retried() -> None:
    async def main() -> None:
        a, liar = End("a", A_NETS), Attacker()
        try:
            await start(a)
            a.device.add_peer(liar.identity.public, "liar")
            a.device.set_peer(liar.identity.public, endpoint=liar.address, allowed_ips=B_NETS)
            a.send(packet(a.v4, "10.9.0.2", 100, 1))
            init = await liar.recv()
            (index,) = struct.unpack_from("<I", init, 4)
            body = struct.pack("<B3xII", noise.MSG_RESPONSE, 99, index) + os.urandom(48)
            liar.send(a, cookie.MacSigner(a.public).sign(body + bytes(32)))
            await until(lambda: a.refused("decrypt_failure") == 1, "the forged response refusal")
            # still pending: the retry comes, and a real response then works
            retry = await liar.recv()
            assert retry[0] == noise.MSG_INITIATION
            got = noise.consume_initiation(liar.identity, retry)
            (sender,) = struct.unpack_from("<I", retry, 4)
            response, keys = noise.create_response(got, 4242)
            liar.send(a, cookie.MacSigner(a.public).sign(response))
            data = await liar.recv()            # the staged packet, sealed
            receiver, counter, plain = noise.open_transport(keys.recv_key, data)
            assert receiver == 4242 and counter == 0 and plain[:100] == packet(a.v4, "10.9.0.2",
                                                                               100, 1)
            assert len(plain) % 16 == 0 and sender != index
        finally:
            await a.close()
            liar.close()
    run(main)


# ---------------------------------------------------------------- the data path on the wire

def test_replayed_forged_and_reflected_data_never_reach_the_device() -> None:
    """An attacker on the path (a wire between a and b that records every
    datagram, so its address is the one both devices know) sends a
    recorded data message again, one with its counter changed, and each side's
    own messages back to it.  None reaches a device; each is counted:
    replay, bad_tag, and for a reflection no_session (the receiver index
    in a's datagram is b's, which a does not hold)."""
    async def main() -> None:
        load_fastpath()
        a, b = End("a", A_NETS), End("b", B_NETS)
        wire = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        wire.bind(("127.0.0.1", 0))
        wire.setblocking(False)
        seen: dict[int, list[bytes]] = {}
        loop = asyncio.get_running_loop()

        async def forward() -> None:
            while True:
                data, (_, port) = await loop.sock_recvfrom(wire, 65536)
                to = b.port if port == a.port else a.port
                if data[0] == 4 and len(data) > 32:
                    seen.setdefault(port, []).append(data)
                await loop.sock_sendto(wire, data, ("127.0.0.1", to))

        forwarding = asyncio.ensure_future(forward())
        try:
            await start(a, b)
            for me, other in ((a, b), (b, a)):
                me.device.add_peer(other.public, other.name)
                me.device.set_peer(other.public, allowed_ips=other.nets,
                                   endpoint=wire.getsockname())
            for seq in range(3):
                data = packet(a.v4, b.v4, 200, seq)
                a.send(data)
                assert await b.recv() == data
                back = packet(b.v4, a.v4, 200, seq)
                b.send(back)
                assert await a.recv() == back
            from_a, from_b = seen[a.port][-1], seen[b.port][-1]
            before_a, before_b = a.drops(), b.drops()

            def grew(end: End, before: dict[str, int], reason: str) -> bool:
                return end.drops().get(reason, 0) == before.get(reason, 0) + 1

            wire.sendto(from_a, ("127.0.0.1", b.port))               # replayed to b
            await until(lambda: grew(b, before_b, "replay"), "b to count the replay")
            # Forged: a counter a has not seen (else it is a replay, refused
            # before any decryption), and the tag no longer fits.
            forged = bytearray(from_b)
            counter = int.from_bytes(forged[8:16], "little") + 1000
            forged[8:16] = counter.to_bytes(8, "little")
            wire.sendto(bytes(forged), ("127.0.0.1", a.port))        # forged to a
            await until(lambda: grew(a, before_a, "bad_tag"), "a to count the forgery")
            wire.sendto(from_a, ("127.0.0.1", a.port))               # a's own, back to a
            await until(lambda: grew(a, before_a, "no_session"), "a to count its reflection")
            wire.sendto(from_b, ("127.0.0.1", b.port))               # b's own, back to b
            await until(lambda: grew(b, before_b, "no_session"), "b to count its reflection")
            assert a.pending_packets() == [] and b.pending_packets() == []
            data = packet(a.v4, b.v4, 200, 9)                        # the tunnel goes on
            a.send(data)
            assert await b.recv() == data
        finally:
            forwarding.cancel()
            await a.close()
            await b.close()
            wire.close()
    run(main)
