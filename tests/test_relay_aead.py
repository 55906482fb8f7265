"""The relay's aead logic, without root (issue 7).

The aead TCP server's choice between proven connections (finding 2):
Relay._verify_record on hellos made by a client's Keyring.  A hello
authenticates and is refused once seen (the replay window), so a recording
can verify only at a server whose window is new (after its restart).  Even
then it must not take the slot from the live connection: a newcomer
replaces the live connection only with a newer hello.

And the log lines for drops that point at the other end: an older wire
version, the same role at both ends, stale sessions.
"""

from __future__ import annotations

import os

import pytest

from conftest import load_fastpath
from tunrelay import aead
from tunrelay.daemon.config import loads
from tunrelay.daemon.relay import Relay


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


def test_drops_that_point_at_the_other_end_are_logged_once_a_minute(parts, caplog, monkeypatch):
    """An older tunrelay at the other end (aead wire v1), both ends with
    one role, or stale sessions: a WARNING saying so, not silence; at most
    once a minute per kind, with the count since the last line."""
    server, _ = parts
    relay = server()
    drops = {"aead_version": 0, "reflected": 0, "stale_session": 0, "bad_tag": 0}
    monkeypatch.setattr(relay, "stats", lambda: {"ingress": {"drops": dict(drops)}})
    now = [1000.0]
    monkeypatch.setattr("tunrelay.daemon.relay.time.monotonic", lambda: now[0])
    caplog.set_level("WARNING", logger="tunrelay.daemon.relay")
    relay._notice_drops()
    assert caplog.records == []
    drops.update(aead_version=3, reflected=2, bad_tag=50)
    relay._notice_drops()
    text = [r.getMessage() for r in caplog.records]
    assert len(text) == 2
    assert any("3 datagram(s) of another aead wire version" in t and "older" in t for t in text)
    assert any("2 datagram(s) carrying this relay's own role 'b'" in t for t in text)
    drops["aead_version"] = 10
    now[0] += 30
    relay._notice_drops()
    assert len(caplog.records) == 2          # within the minute: not again
    now[0] += 31
    relay._notice_drops()
    assert len(caplog.records) == 3
    assert "7 datagram(s) of another aead wire version" in caplog.records[-1].getMessage()
