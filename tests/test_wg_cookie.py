"""Known answers for XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha-03) and
the mac1/mac2/cookie exchange of tunrelay.wireguard.cookie, including a
cookie reply recorded from wireguard-go v0.0.20230223 under a flood."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunrelay.wireguard import cookie, noise
from tunrelay.wireguard.noise import Identity

VECTORS = Path(__file__).resolve().parent / "data" / "wg"


def test_hchacha20_draft_vector() -> None:
    # draft-irtf-cfrg-xchacha-03, section 2.2.1
    key = bytes(range(32))
    nonce = bytes.fromhex("000000090000004a0000000031415927")
    assert cookie.hchacha20(key, nonce).hex() == (
        "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc")


SUNSCREEN = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip "
             b"for the future, sunscreen would be it.")
XCT = bytes.fromhex(
    "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
    "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452"
    "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
    "21f9664c97637da9768812f615c68b13b52e")
XTAG = bytes.fromhex("c0875924c1c7987947deafd8780acf49")


def test_xchacha20poly1305_draft_vector() -> None:
    # draft-irtf-cfrg-xchacha-03, appendix A.3.1
    key = bytes(range(0x80, 0xA0))
    nonce = bytes(range(0x40, 0x58))
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    assert cookie.xseal(key, nonce, SUNSCREEN, aad) == XCT + XTAG
    assert cookie.xopen(key, nonce, XCT + XTAG, aad) == SUNSCREEN
    assert cookie.xopen(key, nonce, XCT + XTAG, aad[:-1]) is None
    bad = bytearray(XCT + XTAG)
    bad[0] ^= 1
    assert cookie.xopen(key, nonce, bytes(bad), aad) is None


def test_hchacha20_refuses_wrong_sizes() -> None:
    with pytest.raises(ValueError):
        cookie.hchacha20(bytes(31), bytes(16))
    with pytest.raises(ValueError):
        cookie.xseal(bytes(32), bytes(23), b"", b"")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_mac1_checked() -> None:
    a, b = Identity.generate(), Identity.generate()
    signer = cookie.MacSigner(b.public)
    verifier = cookie.MacVerifier(b.public)
    init, _ = noise.create_initiation(a, b.public, 5)
    signed = signer.sign(init)
    assert len(signed) == 148 and signed[-16:] == bytes(16)       # no cookie: mac2 zero
    assert verifier.mac1_ok(signed)
    forged = bytearray(signed)
    forged[20] ^= 1
    assert not verifier.mac1_ok(bytes(forged))
    assert not verifier.mac1_ok(signed[:20])
    # mac1 for someone else's key
    assert not cookie.MacVerifier(a.public).mac1_ok(signed)


def test_cookie_round_trip_and_expiry() -> None:
    clock = Clock()
    a, b = Identity.generate(), Identity.generate()
    signer = cookie.MacSigner(b.public, clock=clock)
    verifier = cookie.MacVerifier(b.public, clock=clock)
    src = ("192.0.2.7", 51820)
    first = signer.sign(noise.create_initiation(a, b.public, 5)[0])
    assert not verifier.mac2_ok(first, src)                     # under load: refused...
    reply = verifier.reply(first, src)                          # ...and answered with a cookie
    assert len(reply) == 64 and reply[:8] == b"\x03\0\0\0" + (5).to_bytes(4, "little")
    assert cookie.parse_cookie_reply(reply) == 5
    assert signer.take_reply(reply)
    second = signer.sign(noise.create_initiation(a, b.public, 6)[0])
    assert second[-16:] != bytes(16)
    assert verifier.mac1_ok(second) and verifier.mac2_ok(second, src)
    assert not verifier.mac2_ok(second, ("192.0.2.8", 51820))    # bound to the source
    assert not verifier.mac2_ok(second, ("192.0.2.7", 51821))
    # a v4 source seen through a dual-stack socket is the same source
    assert verifier.mac2_ok(second, ("::ffff:192.0.2.7", 51820, 0, 0))
    # a reply only opens for the message it answers (aad = that mac1)
    assert not signer.take_reply(reply)
    # after 120 s the secret rotates and the sender stops using its cookie
    clock.t += cookie.COOKIE_REFRESH_TIME
    assert not verifier.mac2_ok(second, src)
    assert signer.sign(noise.create_initiation(a, b.public, 7)[0])[-16:] == bytes(16)


def test_cookie_reply_from_impostor_ignored() -> None:
    a, b, c = Identity.generate(), Identity.generate(), Identity.generate()
    signer = cookie.MacSigner(b.public)
    msg = signer.sign(noise.create_initiation(a, b.public, 5)[0])
    fake = cookie.MacVerifier(c.public).reply(msg, ("198.51.100.1", 1))
    assert not signer.take_reply(fake)
    assert signer.cookie is None


@pytest.mark.parametrize("reply", [b"", b"\x03" + bytes(62), b"\x03" + bytes(64),
                                   b"\x03\x01" + bytes(62), b"\x02" + bytes(63)])
def test_malformed_cookie_replies(reply: bytes) -> None:
    a, b = Identity.generate(), Identity.generate()
    signer = cookie.MacSigner(b.public)
    signer.sign(noise.create_initiation(a, b.public, 5)[0])
    assert cookie.parse_cookie_reply(reply) is None
    assert not signer.take_reply(reply)


def test_response_signed_too() -> None:
    a, b = Identity.generate(), Identity.generate()
    init, st = noise.create_initiation(a, b.public, 1)
    resp, _ = noise.create_response(noise.consume_initiation(b, init), 2)
    signed = cookie.MacSigner(a.public).sign(resp)
    assert len(signed) == 92 and cookie.MacVerifier(a.public).mac1_ok(signed)
    noise.consume_response(st, a, signed)


def test_wireguard_go_cookie_reply() -> None:
    v = {k: bytes.fromhex(x) for k, x in
         json.loads((VECTORS / "vector-cookie.json").read_text()).items() if k != "role"}
    signer = cookie.MacSigner(v["peer_public"])
    signer.last_mac1 = v["flood_initiation"][-32:-16]
    assert signer.take_reply(v["cookie_reply"])
    assert signer.cookie == v["cookie"]
    # our mac2 on the follow-up initiation is what wireguard-go accepted
    assert signer.sign(v["initiation"][:-32] + bytes(32)) == v["initiation"]
    me = Identity.from_bytes(v["my_private"]).public
    assert cookie.MacVerifier(me).mac1_ok(v["response"])


def test_the_secret_is_shared_with_the_loops_gate_on_every_rotation() -> None:
    """The loops check mac2 under load with the verifier's own secret
    (PeerTable.set_handshake_gate): every new secret is handed over, with
    how long it lasts, and a cookie made from it is what the gate checks."""
    now = [1000.0]
    seen: list[tuple[bytes, float]] = []
    verifier = cookie.MacVerifier(bytes(32), clock=lambda: now[0], refresh=120.0,
                                  on_rotate=lambda s, t: seen.append((s, t)))
    secret, left = verifier.current_secret()
    assert seen == [(secret, 120.0)] and left == 120.0
    now[0] += 100
    assert verifier.current_secret() == (secret, 20.0) and len(seen) == 1
    address = ("198.51.100.7", 51820)
    reply = verifier.reply(bytes(116) + bytes(32), address)
    assert len(reply) == 64 and len(seen) == 1          # the same secret made it
    now[0] += 20
    newer, left = verifier.current_secret()
    assert newer != secret and seen[-1] == (newer, 120.0) and left == 120.0
    assert verifier._cookie_for(address) == noise.keyed_mac(newer, cookie.address_bytes(address))
