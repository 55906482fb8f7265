"""What one aead trial costs: a datagram of a session the receiver does not
know is tried (HMAC-SHA256 key derivation, then a tag check) instead of
being rate-limited.  Times Keyring.verify_hello on hellos of made-up
sessions against replays of a known hello (a table lookup, no crypto); the
difference is the trial.  ``python -m benchmarks.aead_trial_cost``."""

from __future__ import annotations

import os
import time

from tunrelay._fastpath import Keyring

CALLS = 200_000


def per_call_us(keyring: Keyring, datagrams: list[bytes]) -> float:
    start = time.perf_counter()
    for i in range(CALLS):
        keyring.verify_hello(datagrams[i % len(datagrams)])
    return (time.perf_counter() - start) / CALLS * 1e6


def main() -> None:
    key = os.urandom(32)
    sender, receiver = Keyring(key, role="a"), Keyring(key, role="b")
    hello = sender.hello()
    assert receiver.verify_hello(hello)
    # Type hello, role "a", a start time later than any real one (so it is
    # tried, not refused as stale), random id, counter and tag.
    made_up = [b"\x03\x00\0\0" + b"\xff" * 4 + os.urandom(32) for _ in range(1000)]
    lookup = per_call_us(receiver, [hello])
    trial = per_call_us(receiver, made_up)
    print(f"replayed hello (lookup only): {lookup:.2f} µs/call; "
          f"unknown session (derivation + tag check): {trial:.2f} µs/call; "
          f"one trial: {trial - lookup:.2f} µs")


if __name__ == "__main__":
    main()
