"""The aead TCP server's choice between proven connections (issue 7,
finding 2), without root: Relay._verify_record on hellos made by a
client's Keyring.

A hello authenticates and is refused once seen (the replay window), so a
recording can verify only at a server whose window is new (after its
restart).  Even then it must not take the slot from the live connection:
a newcomer replaces the live connection only with a newer hello.
"""

from __future__ import annotations

import os

import pytest
from conftest import load_fastpath

from tunrelay import aead
from tunrelay.config import loads
from tunrelay.relay import Relay


def record(hello: bytes) -> bytes:
    return len(hello).to_bytes(2, "big") + hello


@pytest.fixture
def parts(tmp_path):
    Keyring = load_fastpath().Keyring
    key = os.urandom(32)
    cfg = loads('[transport]\nprotocol = "tcp"\nlisten = "127.0.0.1:0"\n')
    relay = Relay(cfg)

    def server():
        relay.keyring = Keyring(key, "chacha20-poly1305", "b")
        return relay
    return server, Keyring(key, "chacha20-poly1305", "a")


def test_a_recorded_hello_cannot_replace_the_live_connection(parts):
    server, client = parts
    old, live = record(client.hello()), record(client.hello())
    relay = server()
    assert relay._verify_record(live)
    relay._conn, relay._live_order = object(), relay._proven_order   # the live connection
    # The server restarts (a fresh window): the older recording authenticates
    # and is no replay there, yet it is older than the live connection's.
    relay = server()
    relay._conn, relay._live_order = object(), aead_order(live)
    assert relay.keyring.verify_hello(old[2:]) is True    # it would verify...
    relay = server()
    relay._conn, relay._live_order = object(), aead_order(live)
    assert not relay._verify_record(old)                   # ...but cannot take the slot
    newer = record(client.hello())
    assert relay._verify_record(newer)                     # the real client reconnecting
    assert relay._proven_order > relay._live_order


def test_without_a_live_connection_any_fresh_hello_is_taken_once(parts):
    server, client = parts
    relay = server()
    hello = record(client.hello())
    assert relay._verify_record(hello)
    assert not relay._verify_record(hello)                 # a replay
    assert not relay._verify_record(hello[:-1] + bytes([hello[-1] ^ 1]))
    assert not relay._verify_record(b"\0\x28" + bytes(40))


def aead_order(rec: bytes) -> tuple[int, int]:
    hello = rec[2:]
    return int.from_bytes(hello[4:8], "big"), int.from_bytes(hello[16:24], "big")


def test_hello_records_are_the_size_transport_expects():
    assert aead.HELLO_RECORD_LEN == 2 + aead.OVERHEAD
