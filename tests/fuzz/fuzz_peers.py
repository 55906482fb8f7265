#!/usr/bin/env python3
"""atheris harness: the ingress of a pump with a PeerTable (issue 8),
differential against a Python model of the spec.

Each input is a fresh table and pump: framing "session" (WireGuard's
transport data message) or "raw", an AF_INET or AF_INET6 (dual-stack)
socket, an MTU, offloads on or off, control types (the default, WireGuard's
1-3, chosen bytes, none), a control queue of 256, 1 or 2 slots,
reject_after_messages (none, 1, 3, 20, 9000, 2^40); 2-3 peers with
endpoints (IPv4, IPv6, link-local with a scope, or none), allowed IPs from
a pool of nested prefixes, host and default routes, roaming or not; and
(session) up to 3 sessions each, installed as initiator (current) or not
(next), with known keys.  Then up to 32 steps: datagrams from a chosen
sender (a peer's endpoint as it is now, another's, nobody's), UDP_GRO
messages, take(), install_session(), clear_sessions(), update() (roaming,
endpoint, allowed IPs), remove().

Datagrams: sealed correctly (ChaCha20-Poly1305 from `cryptography`)
under a peer's current / previous / next session or a dead one, with a
fresh counter, one ahead or behind by about the 8192 window or at its
edge, any counter, one at the hard limit; an inner IPv4/IPv6 packet whose
source is in the peer's prefixes, another peer's (a longer prefix inside
its own), nobody's, or any bytes; length fields that lie; WireGuard's
zero padding or other bytes behind it; keepalives; then maybe a bit
flipped, cut short, a header byte set, sealed with another key, another
receiver index, bytes behind the tag; a made-up type-4 header; control
types (up to past a 2048-byte slot); junk; empty; replays of the last 64
byte for byte.  Raw: IP packets as above, the same junk and control.

Each datagram goes through ``Pump._feed(..., sender=...)`` (peer_receive,
exactly as received) and through ``fuzz_common.PeerTableModel``, the spec
(authentication, the replay window, the receiver index, the hard limit,
the inner source's longest-prefix owner, framing.validate after the
padding is trimmed to the IP length, next -> current promotion, roaming
only on authenticated datagrams (session) or valid packets a roaming
peer's prefixes hold (raw), the control queue).  Per message, raised as an
exception when violated: exactly the model's packets reach the TUN
stand-in, byte-exact (offloads: as fuzz_ingress.py checks coalesced
writes); every drop is counted under the model's reason, delivered +
dropped + keepalives + control = datagrams fed; table.info() of every peer
(endpoint, roams, ingress counters, sessions, last_seen) and counts() are
the model's; take() returns the model's events.

Known bugs (fuzz_common.PEER_BUGS, each with a minimal reproduction in
tests/test_fuzz.py) are steered around while present, so that fuzzing
goes on; TUNRELAY_FUZZ_STRICT=1 does not steer.

Run: python tests/fuzz/fuzz_peers.py [libFuzzer flags] [corpus dirs]
(see README.md in this directory).
"""

import sys
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

with atheris.instrument_imports(include=["tunrelay", "fuzz_common"]):
    import fuzz_common

    import tunrelay.framing  # noqa: F401  (instrumented: the reference)

RIG = None


def TestOneInput(data: bytes) -> None:
    global RIG
    if RIG is None:
        RIG = fuzz_common.PeerRig()
        if RIG.bugs:
            print(f"fuzz_peers: steering around known bugs {sorted(RIG.bugs)}", file=sys.stderr)
    fuzz_common.run_peers(RIG, fuzz_common.FDPSource(atheris.FuzzedDataProvider(data)))


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
