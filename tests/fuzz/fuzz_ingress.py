#!/usr/bin/env python3
"""atheris harness: the UDP ingress path of the compiled pump.

Each input picks a pump configuration (TUN or TAP, MTU, framing raw, len16
over UDP or aead with a fixed test key and either cipher, offloads on or
off for TUN) and the messages to feed it: the rest of the input as one
received message (cut into datagrams of a fuzzed UDP_GRO segment size with
offloads), or built datagrams (TCP runs with valid checksums, IP packets
with lying length fields, len16 headers, aead datagrams sealed under many
sessions and start times, replayed, tampered with, reflected, forged,
cut).  The aead pump is role "b"; the harness seals as its peer, role "a".
Each message goes through ``Pump._feed``: ``ingress_message`` and, with
offloads, the coalescer, exactly as a message received from the peer.  Per
message, raised as an exception when violated:

* what reaches the TUN stand-in is exactly what the Python reference
  (``framing.validate`` after the framing's own checks, and for aead a
  model of the Keyring: header checks, session table, stale starts,
  evictions, replay windows, tags) accepts, in order;
  with offloads each write is a virtio_net_hdr and a valid IP packet, a
  coalesced one made only of consecutive segments with valid checksums
  of one flow whose payload bytes are the segments' in order;
* every drop is counted under the reference's reason; delivered + dropped
  = datagrams fed; no counter ever decreases; nothing else moves; aead:
  the Keyring's counts (sessions, evicted, roams, live) are the model's.

Run: python tests/fuzz/fuzz_ingress.py [libFuzzer flags] [corpus dirs]
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
        RIG = fuzz_common.Rig()
    fuzz_common.run_ingress(RIG, fuzz_common.FDPSource(atheris.FuzzedDataProvider(data)))


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
