"""A len16 peer that leaves Nagle on, the way simpletun does (issue 10).

    python -m tunrelay.testrig.nagle_peer --device NAME --address 10.99.0.2/24
        --mtu 1400 (--connect HOST:PORT | --listen HOST:PORT)

It opens its own TUN device (TUNSETIFF, no packet information), sets it up
with ``ip``, makes one TCP connection to (or accepts one from) a relay that
speaks len16 (a 2-byte big-endian length, then the IP packet), and carries
packets both ways until either side ends.  Like simpletun it never sets
TCP_NODELAY and writes every packet in two ``send()`` calls: the length,
then the packet.  The second call finds the first segment not yet
acknowledged, so Nagle holds it until the relay's ACK arrives: at once if
the relay acknowledges quickly, after the 40 ms delayed ACK if not.

Standard library only, and nothing of tunrelay: a foreign peer.  It prints
one line, "connected <peer> TCP_NODELAY=0", once the connection is up, and
exits 0 when the relay closes it.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import socket
import struct
import subprocess
import sys
import threading
import time

TUNSETIFF = 0x400454CA          # _IOW('T', 202, int)
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
CONNECT_TIMEOUT_S = 15.0


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def configure(name: str, address: str, mtu: int) -> None:
    for argv in (["addr", "add", address, "dev", name],
                 ["link", "set", "dev", name, "mtu", str(mtu), "up"]):
        subprocess.run(["ip", *argv], check=True)


def endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def connect(host: str, port: int) -> socket.socket:
    """The relay may still be starting: retry until CONNECT_TIMEOUT_S."""
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        try:
            return socket.create_connection((host, port), timeout=1)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def accept(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_server((host, port), family=family) as server:
        conn, _ = server.accept()
        return conn


def tun_to_socket(tun: int, sock: socket.socket, mtu: int) -> None:
    """Each packet as two send() calls, as simpletun writes it; returns at
    end of file (never on a TUN device; on the tests' stand-in)."""
    while True:
        packet = os.read(tun, mtu + 64)
        if not packet:
            return
        sock.sendall(struct.pack("!H", len(packet)))
        sock.sendall(packet)


def recv_exact(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def socket_to_tun(sock: socket.socket, tun: int) -> None:
    while True:
        header = recv_exact(sock, 2)
        if header is None:
            return
        packet = recv_exact(sock, struct.unpack("!H", header)[0])
        if packet is None:
            return
        os.write(tun, packet)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nagle_peer", description=__doc__.splitlines()[0])
    parser.add_argument("--device", required=True)
    parser.add_argument("--address", required=True, help="e.g. 10.99.0.2/24")
    parser.add_argument("--mtu", type=int, default=1400)
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--connect", metavar="HOST:PORT")
    how.add_argument("--listen", metavar="HOST:PORT")
    args = parser.parse_args(argv)

    tun = open_tun(args.device)
    configure(args.device, args.address, args.mtu)
    sock = connect(*endpoint(args.connect)) if args.connect else accept(*endpoint(args.listen))
    sock.settimeout(None)
    nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    print(f"connected {sock.getpeername()[0]} TCP_NODELAY={nodelay}", flush=True)
    # Outbound in a daemon thread: the process ends with the inbound side,
    # when the relay closes the connection.
    threading.Thread(target=tun_to_socket, args=(tun, sock, args.mtu), daemon=True).start()
    socket_to_tun(sock, tun)
    print("closed by the relay", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
