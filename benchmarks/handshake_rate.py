"""How many WireGuard handshakes one Python thread answers a second: the
responder's steps as WireGuardDevice runs them (mac1 checked, the
initiation opened, the response made and signed), over initiations made
beforehand.  No sockets, no table: the ceiling the handshake's Python
half puts on a device.

    python -m benchmarks.handshake_rate [--count 2000]
"""

from __future__ import annotations

import argparse
import time

from tunrelay.wireguard import cookie, noise


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args()
    me, peer = noise.Identity.generate(), noise.Identity.generate()
    signer = cookie.MacSigner(me.public)
    initiations = [signer.sign(noise.create_initiation(peer, me.public, n)[0])
                   for n in range(args.count)]
    verifier = cookie.MacVerifier(me.public)
    answer = cookie.MacSigner(peer.public)
    began = time.process_time()
    for n, message in enumerate(initiations):
        assert verifier.mac1_ok(message)
        init = noise.consume_initiation(me, message)
        response, _ = noise.create_response(init, n)
        answer.sign(response)
    took = time.process_time() - began
    print(f"{args.count} handshakes answered in {took:.2f} CPU-s: "
          f"{args.count / took:,.0f} a second on one thread")


if __name__ == "__main__":
    main()
