"""A tunnel node for the namespace tests of the many-peers core: a TUN
device, a UDP socket and one compiled pump with a PeerTable (framing
"session" or "raw"), driven over stdin/stdout by the test.

It is written against the embedding API only (what a VPN tool would do),
with fixed test keys instead of a handshake: the tests are about the data
plane (routing, roaming, live changes under load), not key exchange.

    python tests/sessionnode.py '<json config>'

Config: {"device": name, "addresses": ["10.78.0.1/24", ...], "mtu": 1400,
"listen": [host, port], "framing": "session", "offload": false,
"peers": [{"name", "endpoint": [host, port] | null, "allowed_ips": [...],
"roaming": bool, "session": {"local_index", "remote_index", "send_key"
(hex), "recv_key" (hex), "initiator": bool} | null}], "routes": [cidr...]}

Once the pump runs it prints {"ready": true}; then each line on stdin is
a command and gets one JSON line back:
  {"cmd": "stats"}                      pump counters, per-peer stats, table counts
  {"cmd": "add", "peer": {...}}         a peer as in the config -> {"id"}
  {"cmd": "remove", "name": n}          -> {}
  {"cmd": "install", "name": n, "session": {...}}   a session as in the config -> {}
  {"cmd": "churn", "seconds": s}        add/update/remove made-up peers for s seconds
                                        while the pump runs -> {"changes"}
  {"cmd": "take"}                       drain the table's events -> {"events": [...]}
  {"cmd": "quit"}                       stop the pump, exit 0
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

from tunrelay import PeerTable, Pump
from tunrelay.daemon.device import enable_offloads, open_tun


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def add_peer(table: PeerTable, spec: dict) -> int:
    endpoint = tuple(spec["endpoint"]) if spec.get("endpoint") else None
    pid = table.add(spec["name"], endpoint=endpoint, allowed_ips=spec["allowed_ips"],
                    roaming=spec.get("roaming", True))
    if spec.get("session"):
        install(table, pid, spec["session"])
    return pid


def install(table: PeerTable, pid: int, session: dict) -> None:
    table.install_session(pid, local_index=session["local_index"],
                          remote_index=session["remote_index"],
                          send_key=bytes.fromhex(session["send_key"]),
                          recv_key=bytes.fromhex(session["recv_key"]),
                          initiator=session["initiator"])


def churn(table: PeerTable, seconds: float) -> int:
    """Changes of made-up peers (none of them carries traffic) as fast as
    Python makes them: add, change the prefixes, move the endpoint, remove."""
    deadline = time.monotonic() + seconds
    changes = n = 0
    while time.monotonic() < deadline:
        pid = table.add(f"churn{n}", endpoint=("192.0.2.1", 1 + n % 60000),
                        allowed_ips=[f"10.{200 + n % 50}.{n % 250}.0/24"])
        table.update(pid, allowed_ips=[f"10.{200 + n % 50}.{n % 250}.0/25"])
        table.update(pid, endpoint=("192.0.2.2", 1 + n % 60000))
        table.remove(pid)
        changes += 4
        n += 1
    return changes


def main() -> int:
    config = json.loads(sys.argv[1])
    offload = config.get("offload", False)
    fd, name = open_tun(config["device"], vnet_hdr=offload)
    if offload:
        enable_offloads(fd)
    ip("link", "set", name, "mtu", str(config.get("mtu", 1400)), "up")
    for address in config.get("addresses", ()):
        ip("addr", "add", address, "dev", name, *(["nodad"] if ":" in address else []))
    for route in config.get("routes", ()):
        ip("route", "add", route, "dev", name)
    host, port = config["listen"]
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
    sock.bind((host, port))
    table = PeerTable()
    for spec in config.get("peers", ()):
        add_peer(table, spec)
    pump = Pump(fd, sock, framing=config.get("framing", "session"), mtu=config.get("mtu", 1400),
                offload=offload, peers=table)
    pump.start()
    print(json.dumps({"ready": True}), flush=True)
    # One control plane: this thread makes every change, the loops run on.
    for line in sys.stdin:
        command = json.loads(line)
        kind = command["cmd"]
        if kind == "stats":
            reply = {"pump": pump.stats(), "peers": table.stats(), "counts": table.counts()}
        elif kind == "add":
            reply = {"id": add_peer(table, command["peer"])}
        elif kind == "remove":
            table.remove(table.find(command["name"]))
            reply = {}
        elif kind == "install":
            install(table, table.find(command["name"]), command["session"])
            reply = {}
        elif kind == "churn":
            reply = {"changes": churn(table, command["seconds"])}
        elif kind == "take":
            reply = {"events": [[e.kind, e.peer, e.address, e.data and e.data.hex()]
                                for e in table.take()]}
        elif kind == "quit":
            break
        else:
            reply = {"error": f"unknown command {kind!r}"}
        print(json.dumps(reply), flush=True)
    outcome = pump.stop(10)
    print(json.dumps({"outcome": str(outcome)}), flush=True)
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
