"""python -m examples.toyvpn: the toy VPN (README.md).

    demo                      both ends in this process, no root
    run --role initiator ...  one end on a real TUN device (root)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from tunrelay import open_tun
from tunrelay.pumps import Address

from .demo import exchange, loopback_pair
from .node import Node


def endpoint(text: str) -> Address:
    """host:port or [v6 host]:port."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected host:port, got {text!r}")
    return host.strip("[]"), int(port)


async def demo(args: argparse.Namespace) -> int:
    async with loopback_pair(rekey_after_messages=args.rekey_after_messages) as (a, ta, b, tb):
        await asyncio.wait_for(asyncio.gather(a.ready(), b.ready()), 10)
        print(f"handshake done: initiator {a.sessions()}, responder {b.sessions()}")
        began = time.monotonic()
        await asyncio.to_thread(exchange, ta, tb, args.packets)
        took = time.monotonic() - began
        print(f"{args.packets} packets each way in {took:.2f} s, byte-exact, none lost; "
              f"{a.handshakes} sessions at the initiator, {b.handshakes} at the responder "
              f"(rekey after {args.rekey_after_messages} messages)")
        print(f"now: initiator {a.sessions()}, responder {b.sessions()}")
    return 0


async def run(args: argparse.Namespace) -> int:
    psk = None
    if args.psk_file:
        with open(args.psk_file, "rb") as f:
            psk = f.read()
    fd, name = open_tun(args.tun)
    sock = socket.socket(socket.AF_INET6 if ":" in args.listen[0] else socket.AF_INET,
                         socket.SOCK_DGRAM)
    try:
        sock.bind(args.listen)
        if args.address:
            subprocess.run(["ip", "address", "add", args.address, "dev", name], check=True)
        subprocess.run(["ip", "link", "set", name, "mtu", str(args.mtu), "up"], check=True)
        node = Node(fd, sock, initiator=args.role == "initiator", endpoint=args.peer,
                    peer_ips=args.peer_ips, psk=psk, mtu=args.mtu,
                    rekey_after_messages=args.rekey_after_messages,
                    rekey_after_time=args.rekey_after_time, rekey_interval=args.rekey_interval)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        async with node:
            print(f"toyvpn {args.role} on {name}, UDP {sock.getsockname()}; Ctrl-C stops")
            ended = asyncio.ensure_future(node.wait())
            stop = asyncio.ensure_future(stopping.wait())
            await asyncio.wait([ended, stop], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if ended.done():
                print(f"the pump ended: {ended.result()}", file=sys.stderr)
                return 1
            ended.cancel()
    finally:
        sock.close()
        os.close(fd)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.toyvpn",
                                     description="A toy VPN on tunrelay. NOT SECURE.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="both ends here over loopback, no root")
    d.add_argument("--packets", type=int, default=5000)
    d.add_argument("--rekey-after-messages", type=int, default=500)
    r = sub.add_parser("run", help="one end on a TUN device (needs root)")
    r.add_argument("--role", choices=["initiator", "responder"], required=True)
    r.add_argument("--listen", type=endpoint, default=("0.0.0.0", 51820))
    r.add_argument("--peer", type=endpoint, help="the responder's host:port (initiator)")
    r.add_argument("--tun", default="toy0")
    r.add_argument("--address", help="this end's address on the TUN, e.g. 10.77.0.1/24")
    r.add_argument("--peer-ips", nargs="+", required=True, help="e.g. 10.77.0.2/32")
    r.add_argument("--psk-file", help="a pre-shared secret mixed into the keys")
    r.add_argument("--mtu", type=int, default=1400)
    r.add_argument("--rekey-after-messages", type=int)
    r.add_argument("--rekey-after-time", type=float, default=120.0)
    r.add_argument("--rekey-interval", type=float, help="initiator: also rekey every S s")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    if args.command == "run" and args.role == "initiator" and args.peer is None:
        parser.error("--role initiator needs --peer")
    return asyncio.run(demo(args) if args.command == "demo" else run(args))


if __name__ == "__main__":
    sys.exit(main())
