#!/usr/bin/env python3
"""atheris harness: the len16 stream parser of the compiled pump.

Each input picks a stream pump (TUN or TAP, MTU, offloads on or off for
TUN, framing len16 or aead with either cipher; its socket is one end of a
TCP connection on 127.0.0.1) and a byte stream, cut into chunks at fuzzed
points: the rest of the input as it is, or built len16 records (TCP runs,
IP packets, plain bytes; with aead each sealed, or not quite, as
fuzz_ingress.py seals datagrams) some of whose length headers are zero,
over the limit or off by a little.  Each chunk is one recv(): it goes
through ``Pump._feed_stream`` (``len16_consume`` and delivery, aead_open()
per record, the coalescer with offloads) and through
``framing.Len16Parser`` and the aead model, the Python references.  Per
chunk, raised as an exception when violated:

* both report a bad length at the same chunk (then the stream ends: the
  connection would be closed), and only then;
* what reaches the TUN stand-in is exactly the records the reference cuts
  that the aead model opens (aead) and ``framing.validate`` accepts, in
  order (with offloads: as fuzz_ingress.py checks coalesced writes);
* every invalid record is counted under the reference's reason (a bad
  aead record is dropped alone); delivered + dropped = records cut; no
  counter ever decreases; aead: the Keyring's counts are the model's.

Run: python tests/fuzz/fuzz_len16.py [libFuzzer flags] [corpus dirs]
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
    fuzz_common.run_stream(RIG, fuzz_common.FDPSource(atheris.FuzzedDataProvider(data)))


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
