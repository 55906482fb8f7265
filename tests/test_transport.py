"""Sockets of tunrelay.daemon.transport, on loopback only; no root needed."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from ipaddress import ip_network
from pathlib import Path
from types import SimpleNamespace

import pytest

from tunrelay.aead import HELLO_RECORD_LEN
from tunrelay.daemon import transport
from tunrelay.daemon.config import Endpoint, TransportConfig
from tunrelay.daemon.lograte import RateLimitedLog
from tunrelay.daemon.transport import TcpClient, TcpServer, open_udp
from tunrelay.errors import TransportError

ROOT = Path(__file__).resolve().parent.parent

TCP_OPTIONS = {
    (socket.IPPROTO_TCP, socket.TCP_NODELAY): 1,
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE): 1,
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE): transport.TCP_KEEPIDLE_S,
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL): transport.TCP_KEEPINTVL_S,
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT): transport.TCP_KEEPCNT,
    (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT): transport.TCP_USER_TIMEOUT_MS,
}


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) here")


def udp(listen: str | None, peer: str | None = None, port: int = 9) -> TransportConfig:
    return TransportConfig(
        "udp",
        Endpoint(listen, 0) if listen else None,
        Endpoint(peer, port) if peer else None,
    )


def tcp_client(port: int) -> TransportConfig:
    return TransportConfig("tcp", None, Endpoint("127.0.0.1", port))


@pytest.fixture
def server():
    srv = TcpServer(TransportConfig("tcp", Endpoint("127.0.0.1", 0)))
    srv.open()
    yield srv
    srv.close()


@pytest.fixture
def stop():
    return threading.Event()


def _free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _in_thread(fn, *args):
    """Run fn(*args) in a thread; return (thread, result list)."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)), daemon=True)
    thread.start()
    return thread, result


# -- UDP -----------------------------------------------------------------------


def test_udp_socket_is_bound_and_not_connected():
    sock, peer = open_udp(udp("127.0.0.1", "127.0.0.1", 5555))
    with sock:
        assert sock.type == socket.SOCK_DGRAM
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port != 0
        with pytest.raises(OSError):
            sock.getpeername()  # not connected: datagrams from others arrive
        assert peer == ("127.0.0.1", 5555)
        assert sock.gettimeout() is None  # blocking; the pump decides


def test_udp_without_peer_learns_it():
    sock, peer = open_udp(udp("127.0.0.1"))
    with sock:
        assert peer is None


def _expected_buffer(sysctl: str) -> int:
    """What getsockopt reports (the kernel doubles the request)."""
    if os.geteuid() == 0:  # the FORCE options apply
        return 2 * transport.SOCKET_BUFFER_BYTES
    with open(f"/proc/sys/net/core/{sysctl}") as f:
        return 2 * min(transport.SOCKET_BUFFER_BYTES, int(f.read()))


def test_udp_buffers_are_enlarged():
    sock, _ = open_udp(udp("127.0.0.1"))
    with sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= _expected_buffer("wmem_max")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= _expected_buffer("rmem_max")


def test_buffers_fall_back_without_force(monkeypatch):
    """Unprivileged: SO_*BUFFORCE fail, the plain options cap at *mem_max."""
    monkeypatch.setattr(transport, "SO_SNDBUFFORCE", -1)  # an option that always fails
    monkeypatch.setattr(transport, "SO_RCVBUFFORCE", -1)
    sock, _ = open_udp(udp("127.0.0.1"))
    with sock, open("/proc/sys/net/core/rmem_max") as f:
        rmem_max = int(f.read())
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * min(
            transport.SOCKET_BUFFER_BYTES, rmem_max
        )


@needs_ipv6
def test_udp_ipv6_peer():
    sock, peer = open_udp(udp("::1", "::1"))
    with sock:
        assert sock.family == socket.AF_INET6
        assert peer == ("::1", 9, 0, 0)  # the AF_INET6 form recvfrom reports


def test_udp_hostname_peer_is_resolved():
    sock, peer = open_udp(udp("0.0.0.0", "localhost"))
    with sock:
        resolved = {info[4][0] for info in socket.getaddrinfo("localhost", 9, type=socket.SOCK_DGRAM)}
        assert peer[0] in resolved | {f"::ffff:{host}" for host in resolved}
        assert peer[1] == 9


@needs_ipv6
def test_udp_peer_family_picks_the_socket_family():
    """listen 0.0.0.0 with an IPv6 peer: the wildcard follows the peer."""
    sock, peer = open_udp(udp("0.0.0.0", "::1"))
    with sock:
        assert sock.family == socket.AF_INET6
        assert sock.getsockname()[0] == "::"
        assert peer == ("::1", 9, 0, 0)


@needs_ipv6
def test_udp_v4_peer_on_dual_stack_socket_is_v4_mapped():
    """The returned peer equals the address recvfrom reports for it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.bind(("127.0.0.1", 0))
        sock, peer = open_udp(udp("::", "127.0.0.1", sender.getsockname()[1]))
        with sock:
            assert sock.family == socket.AF_INET6
            assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
            assert peer == ("::ffff:127.0.0.1", sender.getsockname()[1], 0, 0)
            sender.sendto(b"hello", ("127.0.0.1", sock.getsockname()[1]))
            sock.settimeout(2)
            data, sender_addr = sock.recvfrom(100)
            assert data == b"hello"
            assert sender_addr == peer
            sock.sendto(b"back", peer)  # and it is usable as a destination
            sender.settimeout(2)
            assert sender.recv(100) == b"back"


@needs_ipv6
def test_udp_specific_addresses_of_different_families_are_refused():
    with pytest.raises(TransportError, match="different address families"):
        open_udp(udp("::1", "127.0.0.1"))


def test_udp_address_in_use():
    first, _ = open_udp(udp("127.0.0.1"))
    with first:
        port = first.getsockname()[1]
        with pytest.raises(TransportError, match=f"address 127.0.0.1:{port} is in use"):
            open_udp(TransportConfig("udp", Endpoint("127.0.0.1", port)))


def test_udp_address_not_on_this_host():
    # 192.0.2.0/24 is TEST-NET-1: no interface here has it (bind sends nothing).
    with pytest.raises(TransportError, match="192.0.2.1:0 is not an address of this host"):
        open_udp(udp("192.0.2.1"))


def test_udp_reuse_port_lets_queues_share_an_address():
    first, _ = open_udp(udp("127.0.0.1"), reuse_port=True)
    with first:
        cfg = TransportConfig("udp", Endpoint("127.0.0.1", first.getsockname()[1]))
        second, _ = open_udp(cfg, reuse_port=True)
        second.close()


# -- TCP -----------------------------------------------------------------------


def test_tcp_client_connects_with_options(server, stop):
    client = TcpClient(tcp_client(server.address[1])).connect(stop)
    accepted = server.accept(stop)
    assert client is not None and accepted is not None
    with client, accepted:
        for sock in (client, accepted):
            assert sock.gettimeout() is None  # blocking
            for (level, option), value in TCP_OPTIONS.items():
                assert sock.getsockopt(level, option) == value, (sock, option)
        client.sendall(b"ping")
        assert accepted.recv(4) == b"ping"


def test_tcp_client_binds_to_listen_address(server, stop):
    cfg = TransportConfig("tcp", Endpoint("127.0.0.1", 0), Endpoint("127.0.0.1", server.address[1]))
    client = TcpClient(cfg).connect(stop)
    accepted = server.accept(stop)
    with client, accepted:
        assert accepted.getpeername() == client.getsockname()


def test_tcp_client_retries_until_the_server_appears(stop, caplog):
    port = _free_tcp_port()
    caplog.set_level(logging.DEBUG, logger="tunrelay.daemon.transport")
    thread, result = _in_thread(TcpClient(tcp_client(port)).connect, stop)
    time.sleep(0.5)  # a few refused attempts: 0.1, 0.2 s backoff
    srv = TcpServer(TransportConfig("tcp", Endpoint("127.0.0.1", port)))
    srv.open()
    try:
        thread.join(5)
        assert not thread.is_alive() and result[0] is not None
        accepted = srv.accept(stop)  # already waiting in the backlog
        result[0].close()
        accepted.close()
    finally:
        stop.set()
        srv.close()
    messages = [r.getMessage() for r in caplog.records]
    assert any("connecting to 127.0.0.1" in m for m in messages)
    assert any("failed: Connection refused, retrying in 0.1 s" in m for m in messages)
    assert any(m.startswith("connected to 127.0.0.1") for m in messages)
    # The first failure is a WARNING, repeats of the same reason are DEBUG.
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert failures[0].levelno == logging.WARNING
    assert all(r.levelno == logging.DEBUG for r in failures[1:])


def _wait_for(predicate, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_tcp_backoff_doubles_and_caps(monkeypatch):
    """Delays 0.1, 0.2, 0.4 ... 5 s (plus at most 10 % jitter)."""
    waits: list[float] = []

    class CountingStop(threading.Event):
        def wait(self, timeout=None):
            waits.append(timeout)
            if len(waits) == 10:
                self.set()
            return self.is_set()

    port = _free_tcp_port()
    assert TcpClient(tcp_client(port)).connect(CountingStop()) is None
    expected = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0]
    for wait, base in zip(waits, expected, strict=True):
        assert base <= wait <= base * (1 + transport.BACKOFF_JITTER) + 1e-9


def test_stop_interrupts_the_backoff_wait(stop):
    port = _free_tcp_port()
    thread, result = _in_thread(TcpClient(tcp_client(port)).connect, stop)
    time.sleep(0.3)
    started = time.monotonic()
    stop.set()
    thread.join(2)
    assert not thread.is_alive() and result == [None]
    assert time.monotonic() - started < 0.5


def test_stop_interrupts_a_hanging_connect(stop):
    """A full accept queue drops SYNs, so the connect hangs in SYN_SENT;
    the poll loop still sees the stop event."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(3):  # listen(0) holds one; more make sure it is full
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
                fillers.append(filler)
            time.sleep(0.1)
            thread, result = _in_thread(TcpClient(tcp_client(port)).connect, stop)
            time.sleep(0.5)
            assert thread.is_alive()  # still trying
            started = time.monotonic()
            stop.set()
            thread.join(2)
            assert not thread.is_alive() and result == [None]
            assert time.monotonic() - started < 0.5
        finally:
            for filler in fillers:
                filler.close()


def test_connect_with_stop_already_set_returns_at_once(stop):
    stop.set()
    assert TcpClient(tcp_client(_free_tcp_port())).connect(stop) is None


def test_stop_interrupts_accept(server, stop):
    thread, result = _in_thread(server.accept, stop)
    time.sleep(0.3)
    started = time.monotonic()
    stop.set()
    thread.join(2)
    assert not thread.is_alive() and result == [None]
    assert time.monotonic() - started < 0.5


def test_reject_pending_refuses_a_second_client(server, stop):
    first = TcpClient(tcp_client(server.address[1])).connect(stop)
    accepted = server.accept(stop)
    assert server.reject_pending() == 0
    second = TcpClient(tcp_client(server.address[1])).connect(stop)  # the kernel completes it
    try:
        assert _wait_for(lambda: server.reject_pending() == 1)
        second.settimeout(2)
        with pytest.raises(ConnectionResetError):
            second.recv(1)
        # The first connection is untouched.
        first.sendall(b"x")
        assert accepted.recv(1) == b"x"
    finally:
        for sock in (first, accepted, second):
            sock.close()


def test_server_address_in_use(server):
    other = TcpServer(TransportConfig("tcp", Endpoint("127.0.0.1", server.address[1])))
    with pytest.raises(TransportError, match="is in use"):
        other.open()


def test_server_close_is_idempotent_and_use_after_close_is_clear(server):
    server.close()
    server.close()
    with pytest.raises(TransportError, match="not open"):
        server.fileno()


def test_client_needs_a_peer_and_server_a_listen_address():
    with pytest.raises(TransportError, match="needs a peer"):
        TcpClient(TransportConfig("tcp", Endpoint("127.0.0.1", 0), None))
    with pytest.raises(TransportError, match="needs a listen address"):
        TcpServer(SimpleNamespace(protocol="tcp", listen=None, peer=None))


# -- rate-limited logging ------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limited_log_says_how_many_were_left_out(caplog):
    clock = FakeClock()
    limited = RateLimitedLog(logging.getLogger("tunrelay.test"), interval=10.0, clock=clock)
    caplog.set_level(logging.INFO, logger="tunrelay.test")
    assert limited.warning("busy", "refused %s", "one")
    for second in range(1, 4):
        clock.now += 3
        assert not limited.warning("busy", "refused %s", second)
    assert limited.warning("other", "another kind is on its own")
    clock.now += 1  # 10 s after the first
    assert limited.warning("busy", "refused %s", "five")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "refused one"),
        (logging.WARNING, "another kind is on its own"),
        (logging.WARNING, "refused five (3 more like this in the last 10 s, not logged)"),
    ]


# -- link-local (scoped) IPv6 --------------------------------------------------


def test_format_sockaddr_shows_the_scope():
    lo = socket.if_nametoindex("lo")
    assert transport.format_sockaddr(("fe80::1", 5, 0, lo)) == "[fe80::1%lo]:5"
    assert transport.format_sockaddr(("fe80::1", 5, 0, 2**31 - 1)) == f"[fe80::1%{2**31 - 1}]:5"
    assert transport.format_sockaddr(("::1", 5, 0, 0)) == "[::1]:5"
    assert transport.format_sockaddr(("10.0.0.1", 5)) == "10.0.0.1:5"


def test_a_link_local_peer_keeps_its_scope_id():
    lo = socket.if_nametoindex("lo")
    cfg = TransportConfig("udp", None, Endpoint("fe80::1%lo", 9))
    assert transport.resolve_peer(cfg) == ("fe80::1", 9, 0, lo)
    cfg = TransportConfig("tcp", Endpoint("fe80::2%lo", 0), Endpoint("fe80::1%lo", 9))
    plan = transport._plan(cfg, socket.SOCK_STREAM)
    assert plan.bind == ("fe80::2", 0, 0, lo) and plan.peer == ("fe80::1", 9, 0, lo)


def test_an_unknown_interface_is_named():
    with pytest.raises(TransportError, match=r"cannot resolve peer address \[fe80::1%nosuch9\]:9: "
                                             r".*\(this host has no interface 'nosuch9'\)"):
        open_udp(TransportConfig("udp", None, Endpoint("fe80::1%nosuch9", 9)))


def _local_link_local() -> tuple[str, str] | None:
    """(address, interface) of a usable link-local address of this host."""
    try:
        with open("/proc/net/if_inet6") as f:
            lines = f.read().split()
    except OSError:
        return None
    for i in range(0, len(lines), 6):
        hexaddr, _, _, scope, flags, name = lines[i:i + 6]
        if int(scope, 16) == 0x20 and not int(flags, 16) & 0x48:  # link; not tentative/dadfailed
            return socket.inet_ntop(socket.AF_INET6, bytes.fromhex(hexaddr)), name
    return None


LINK_LOCAL = _local_link_local()


@pytest.mark.skipif(LINK_LOCAL is None, reason="no link-local IPv6 address on this host")
def test_link_local_endpoints_work_end_to_end(stop, caplog):
    """Both ends on this host's own link-local address (delivered locally)."""
    address, name = LINK_LOCAL
    caplog.set_level(logging.INFO, logger="tunrelay.daemon.transport")
    a, _ = open_udp(TransportConfig("udp", Endpoint(f"{address}%{name}", 0)))
    with a:
        port_a = a.getsockname()[1]
        b, peer = open_udp(TransportConfig("udp", Endpoint(f"{address}%{name}", 0),
                                           Endpoint(f"{address}%{name}", port_a)))
        with b:
            b.sendto(b"hello", peer)
            a.settimeout(2)
            data, sender = a.recvfrom(10)
            assert data == b"hello" and sender == b.getsockname()
    srv = TcpServer(TransportConfig("tcp", Endpoint(f"{address}%{name}", 0)))
    with srv:
        client_cfg = TransportConfig("tcp", None, Endpoint(f"{address}%{name}", srv.address[1]))
        client = TcpClient(client_cfg).connect(stop)
        accepted = srv.accept(stop)
        with client, accepted:
            assert accepted.getpeername() == client.getsockname()
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"connected to [{address}%{name}]:") for m in messages), messages
    assert any(m.startswith(f"accepted peer [{address}%{name}]:") for m in messages), messages


# -- accept errors -------------------------------------------------------------


class FailingListener:
    """The server's listener, whose accept() first fails with ``errors``."""

    def __init__(self, real: socket.socket, errors: list[int]) -> None:
        self.real, self.errors = real, list(errors)

    def accept(self):
        if self.errors:
            code = self.errors.pop(0)
            raise OSError(code, os.strerror(code))
        return self.real.accept()

    def fileno(self) -> int:
        return self.real.fileno()

    def getsockname(self):
        return self.real.getsockname()

    def close(self) -> None:
        self.real.close()


def test_accept_errors_back_off_doubling_to_a_cap_and_carry_on(server, monkeypatch, caplog):
    """ENOBUFS, EMFILE, ENFILE, ENOMEM: paused 0.1 s doubling to 1 s (on a
    fake clock that the waits move), counted, logged once, then the waiting
    connection is accepted; ECONNABORTED just moves on to the next."""
    clock = FakeClock()
    waits: list[float] = []

    class ClockStop(threading.Event):
        def wait(self, timeout=None):
            waits.append(round(timeout, 6))
            clock.now += timeout
            return self.is_set()

    monkeypatch.setattr(transport.time, "monotonic", clock)
    caplog.set_level(logging.INFO, logger="tunrelay.daemon.transport")
    errors = [errno.ENOBUFS, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EMFILE, errno.EMFILE,
              errno.ECONNABORTED]
    server._sock = FailingListener(server._sock, errors)
    client = socket.create_connection(server.address)
    with client:
        accepted = server.accept(ClockStop())
        assert accepted is not None
        with accepted:
            assert accepted.getpeername() == client.getsockname()
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert server.counts["accept_errors"] == 6
    failures = [r for r in caplog.records if "accept on" in r.getMessage()]
    assert len(failures) == 1 and failures[0].levelno == logging.WARNING
    assert "failed: No buffer space available; pausing accepts for 0.1 s" in failures[0].getMessage()


def test_accept_pause_is_cut_short_by_stop(server, stop):
    server._sock = FailingListener(server._sock, [errno.EMFILE] * 100)
    client = socket.create_connection(server.address)
    with client:
        thread, result = _in_thread(server.accept, stop)
        assert _wait_for(lambda: server.counts["accept_errors"] >= 3, 10)
        stop.set()
        thread.join(5)
        assert not thread.is_alive() and result == [None]


@pytest.mark.parametrize("code", [errno.EBADF, errno.EINVAL])
def test_an_unusable_listener_is_still_an_error(server, stop, code):
    server._sock = FailingListener(server._sock, [code])
    client = socket.create_connection(server.address)
    with client, pytest.raises(TransportError, match=f"accept on 127.0.0.1:{server.address[1]} failed"):
        server.accept(stop)


EMFILE_CHILD = r"""
import json, logging, os, resource, socket, sys, threading, time
from tunrelay.daemon.config import Endpoint, TransportConfig
from tunrelay.daemon.transport import TcpServer

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
server = TcpServer(TransportConfig("tcp", Endpoint("127.0.0.1", 0)))
server.open()
stop = threading.Event()
result = []
thread = threading.Thread(target=lambda: result.append(server.accept(stop)), daemon=True)
thread.start()
client = socket.socket()  # made now: no descriptor is left once the limit is lowered
client.setblocking(False)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
lowest_free = os.dup(0)
os.close(lowest_free)
resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # every new fd: EMFILE
client.connect_ex(server.address)  # the kernel completes it into the backlog
deadline = time.monotonic() + 30
while server.counts["accept_errors"] < 3 and time.monotonic() < deadline:
    time.sleep(0.05)
errors_while_short = server.counts["accept_errors"]
alive_while_short = thread.is_alive()
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
thread.join(30)
accepted = result[0] if result else None
print(json.dumps({
    "errors_while_short": errors_while_short,
    "alive_while_short": alive_while_short,
    "accepted_the_client": accepted is not None and accepted.getpeername() == client.getsockname(),
    "counts": server.counts,
}))
"""


def test_emfile_on_accept_does_not_end_the_server():
    """For real: a child lowers RLIMIT_NOFILE so accept() fails with EMFILE
    while a client waits; the server counts, pauses and, once the limit is
    back, accepts that client."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", EMFILE_CHILD], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["errors_while_short"] >= 3 and report["alive_while_short"], report
    assert report["accepted_the_client"], (report, done.stderr)
    assert report["counts"]["accept_errors"] >= 3
    # One WARNING for all of them (rate-limited), naming the error.
    warnings = [line for line in done.stderr.splitlines() if "accept on" in line]
    assert len(warnings) == 1 and "Too many open files; pausing accepts for 0.1 s" in warnings[0], \
        done.stderr


# -- allow ---------------------------------------------------------------------


@pytest.mark.parametrize("host, networks, expected", [
    ("127.0.0.1", (), True),
    ("127.0.0.1", (ip_network("127.0.0.1/32"),), True),
    ("127.0.0.2", (ip_network("127.0.0.1/32"),), False),
    ("::ffff:127.0.0.1", (ip_network("127.0.0.0/8"),), True),  # v4-mapped on a dual-stack socket
    ("::ffff:10.0.0.1", (ip_network("127.0.0.0/8"),), False),
    ("::ffff:127.0.0.1", (ip_network("::/0"),), False),  # it is an IPv4 client
    ("2001:db8::5", (ip_network("10.0.0.0/8"), ip_network("2001:db8::/32")), True),
    ("fe80::1%eth0", (ip_network("fe80::/10"),), True),
])
def test_allowed(host, networks, expected):
    assert transport._allowed(host, networks) is expected


def allowing(listen: str, *networks: str) -> TransportConfig:
    return TransportConfig("tcp", Endpoint(listen, 0), allow=tuple(ip_network(n) for n in networks))


def connect_from(source: str, address: tuple) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in source else socket.AF_INET)
    sock.bind((source, 0))
    sock.connect(address)
    return sock


def test_allow_refuses_an_address_outside_the_networks(stop, caplog):
    caplog.set_level(logging.INFO, logger="tunrelay.daemon.transport")
    with TcpServer(allowing("127.0.0.1", "127.0.0.1/32")) as srv:
        stranger = connect_from("127.0.0.2", srv.address)
        stranger_port = stranger.getsockname()[1]
        friend = connect_from("127.0.0.1", srv.address)
        with stranger, friend:
            accepted = srv.accept(stop)  # the stranger is refused on the way
            with accepted:
                assert accepted.getpeername() == friend.getsockname()
            stranger.settimeout(5)
            with pytest.raises(ConnectionResetError):
                stranger.recv(1)
        assert srv.counts["refused_not_allowed"] == 1
        # While a peer is connected, refusals by allow are still told apart.
        def refused() -> int:
            assert srv.poll() is None
            return srv.counts["refused_busy"] + srv.counts["refused_not_allowed"]

        with connect_from("127.0.0.2", srv.address), connect_from("127.0.0.1", srv.address):
            assert _wait_for(lambda: refused() == 3)
        assert srv.counts == {"refused_busy": 1, "refused_not_allowed": 2, "unproven": 0,
                              "accept_errors": 0}
    refusals = [r.getMessage() for r in caplog.records if "not in [transport] allow" in r.getMessage()]
    assert refusals == [f"refused connection from 127.0.0.2:{stranger_port}: "
                        f"not in [transport] allow"]  # the second one: rate-limited


@needs_ipv6
def test_allow_matches_ipv4_clients_of_a_dual_stack_server(stop):
    with TcpServer(allowing("::", "127.0.0.1/32")) as srv:
        port = srv.address[1]
        stranger = connect_from("127.0.0.2", ("127.0.0.1", port))
        friend = connect_from("127.0.0.1", ("127.0.0.1", port))
        with stranger, friend:
            accepted = srv.accept(stop)
            with accepted:
                assert accepted.getpeername()[:2] == ("::ffff:127.0.0.1", friend.getsockname()[1])
        assert srv.counts["refused_not_allowed"] == 1


# -- proving (aead over TCP), with fake hellos ---------------------------------

def record(datagram: bytes) -> bytes:
    """A len16 record: a 2-byte big-endian length, then the datagram."""
    return len(datagram).to_bytes(2, "big") + datagram


# Stand-ins for the first records (a len16 header, a sealed hello): the
# transport only sends them and hands what it receives to verify; the keys
# are the caller's business.
CLIENT_HELLO = record(b"C" * (HELLO_RECORD_LEN - 2))
SERVER_HELLO = record(b"S" * (HELLO_RECORD_LEN - 2))


def server_verify(rec: bytes) -> bool:
    return rec == CLIENT_HELLO


def client_verify(rec: bytes) -> bool:
    return rec == SERVER_HELLO


def real_client(port: int, stop: threading.Event, client: TcpClient | None = None):
    """A client that proves itself, connecting in a thread: (thread, [sock])."""
    client = client or TcpClient(tcp_client(port))
    return _in_thread(lambda: client.connect(stop, hello=lambda: CLIENT_HELLO, verify=client_verify))


def accept_proven(server: TcpServer, stop: threading.Event):
    return server.accept(stop, verify=server_verify, reply=lambda: SERVER_HELLO)


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed ``sock`` (RST or FIN); waits up to 5 s."""
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(1)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def test_an_idle_stranger_does_not_block_a_proving_client(server, stop):
    stranger = socket.create_connection(server.address)  # first in, sends nothing
    with stranger:
        thread, result = real_client(server.address[1], stop)
        accepted = accept_proven(server, stop)
        thread.join(10)
        client = result[0]
        with client, accepted:
            assert accepted.getpeername() == client.getsockname()
            assert client.gettimeout() is None and accepted.gettimeout() is None  # blocking
            # Only the hello was read: the tunnel's first record is the pump's.
            client.sendall(b"\x00\x04data")
            accepted.settimeout(5)
            assert accepted.recv(6) == b"\x00\x04data"
            for (level, option), value in TCP_OPTIONS.items():
                assert accepted.getsockopt(level, option) == value
        assert still_open(stranger)  # still has its deadline to prove itself
    assert server.counts["unproven"] == 0


def test_strangers_that_send_junk_are_closed_and_counted(server, stop, caplog):
    caplog.set_level(logging.INFO, logger="tunrelay.daemon.transport")
    junk = [
        record(b"X" * (HELLO_RECORD_LEN - 2)),  # the right size, does not verify
        b"\xff\xff" + CLIENT_HELLO[2:],  # the hello behind a wrong length
        b"GET / HTTP/1.0\r\n\r\n" + b"x" * HELLO_RECORD_LEN,
    ]
    strangers = [socket.create_connection(server.address) for _ in junk]
    short = socket.create_connection(server.address)  # half a record, then gone
    try:
        thread, result = _in_thread(accept_proven, server, stop)
        for sock, data in zip(strangers, junk):
            sock.sendall(data)
        short.sendall(CLIENT_HELLO[:10])
        short.shutdown(socket.SHUT_WR)
        assert all(closed_by_server(sock) for sock in strangers + [short])
        assert _wait_for(lambda: server.counts["unproven"] == 4)
        assert thread.is_alive()  # nobody has proven anything yet
        client_thread, client = real_client(server.address[1], stop)
        thread.join(10)
        client_thread.join(10)
        assert result[0].getpeername() == client[0].getsockname()
        result[0].close()
        client[0].close()
    finally:
        for sock in strangers + [short]:
            sock.close()
    closed = [r for r in caplog.records if r.getMessage().startswith("closed connection from")]
    assert len(closed) == 1 and closed[0].levelno == logging.WARNING  # rate-limited
    assert "its first record did not verify" in closed[0].getMessage()


def test_a_hello_behind_a_wrong_length_header_is_not_taken(server, stop):
    """The record must say HELLO_RECORD_LEN - 2, whatever verify looks at:
    a pump would otherwise read the stream out of step."""
    def lenient(rec: bytes) -> bool:  # looks past the header
        return rec[2:] == CLIENT_HELLO[2:]

    with socket.create_connection(server.address) as stranger:
        stranger.sendall(b"\xff\xff" + CLIENT_HELLO[2:])
        thread, result = _in_thread(lambda: server.accept(stop, verify=lenient))
        assert closed_by_server(stranger)
        assert _wait_for(lambda: server.counts["unproven"] == 1)
        with socket.create_connection(server.address) as friend:
            friend.sendall(CLIENT_HELLO)
            thread.join(10)
            assert result[0].getpeername() == friend.getsockname()
            result[0].close()


def test_a_stranger_that_never_sends_is_closed_at_the_deadline(server, stop, monkeypatch, caplog):
    monkeypatch.setattr(transport, "PROOF_DEADLINE_S", 0.3)
    caplog.set_level(logging.INFO, logger="tunrelay.daemon.transport")
    stranger = socket.create_connection(server.address)
    with stranger:
        thread, result = _in_thread(accept_proven, server, stop)
        assert closed_by_server(stranger)
        assert server.counts["unproven"] == 1
        stop.set()
        thread.join(5)
        assert result == [None]
    assert any(r.getMessage().endswith("no valid first record within 0.3 s") for r in caplog.records)


def test_when_every_place_is_taken_the_oldest_stranger_goes(server):
    strangers = [socket.create_connection(server.address) for _ in range(transport.MAX_PROVING + 1)]
    try:
        assert _wait_for(lambda: server.poll(server_verify) is None
                         and server.counts["unproven"] == 1, 10)
        assert closed_by_server(strangers[0])
        assert all(still_open(sock) for sock in strangers[1:])
    finally:
        for sock in strangers:
            sock.close()


def _flood(address: tuple, until: threading.Event, attempts: list) -> None:
    """Connect over and over, leaving each connection idle a while."""
    held: list[socket.socket] = []
    while not until.is_set():
        try:
            held.append(socket.create_connection(address, timeout=2))
            attempts.append(1)
        except OSError:
            continue
        if len(held) > 16:
            held.pop(0).close()
    for sock in held:
        sock.close()


def _serve(server: TcpServer, stop: threading.Event, mode: str, accepted: list) -> None:
    """Wait for a proven peer as the relay does: accept() while it has none,
    poll() once per supervision slice while it has one."""
    if mode == "accept":
        accepted.append(accept_proven(server, stop))
        return
    while not stop.is_set():
        peer = server.poll(server_verify, lambda: SERVER_HELLO)
        if peer is not None:
            accepted.append(peer)
            return
        stop.wait(0.2)  # the relay's supervision slice


@pytest.mark.parametrize("mode", ["accept", "poll"])
def test_a_connect_loop_of_strangers_does_not_starve_the_real_client(server, stop, mode):
    until = threading.Event()
    attempts: list = []
    accepted: list = []
    serving = threading.Thread(target=_serve, args=(server, stop, mode, accepted), daemon=True)
    serving.start()
    flooders = [threading.Thread(target=_flood, args=(server.address, until, attempts), daemon=True)
                for _ in range(4)]
    for flooder in flooders:
        flooder.start()
    try:
        assert _wait_for(lambda: len(attempts) > 200, 30), len(attempts)
        thread, result = real_client(server.address[1], stop)
        serving.join(60)
        thread.join(30)
        assert accepted and accepted[0] is not None and result and result[0] is not None
        with accepted[0], result[0]:
            assert accepted[0].getpeername() == result[0].getsockname()
    finally:
        until.set()
        stop.set()
        for flooder in flooders:
            flooder.join(10)
        serving.join(10)
    assert server.counts["unproven"] > 0  # the flood did reach the server


def test_poll_hands_out_the_newest_proven_connection(server, stop):
    thread, first = real_client(server.address[1], stop)
    current = accept_proven(server, stop)
    thread.join(10)
    assert server.poll(server_verify, lambda: SERVER_HELLO) is None  # nobody new
    thread, second = real_client(server.address[1], stop)
    newer: list = []

    def proven() -> bool:
        sock = server.poll(server_verify, lambda: SERVER_HELLO)
        if sock is not None:
            newer.append(sock)
        return bool(newer)

    assert _wait_for(proven, 10)
    thread.join(10)
    try:
        assert newer[0].getpeername() == second[0].getsockname()
        assert current.getpeername() == first[0].getsockname()  # the caller decides to swap
    finally:
        for sock in (current, first[0], second[0], *newer):
            sock.close()


def test_the_client_gives_up_on_a_server_whose_reply_does_not_verify(server, stop, caplog):
    """A server without the key cannot answer with a hello that verifies:
    the client closes, counts it, backs off and tries again."""
    caplog.set_level(logging.DEBUG, logger="tunrelay.daemon.transport")
    replies = iter([record(b"?" * (HELLO_RECORD_LEN - 2)), SERVER_HELLO])
    accepted: list = []

    def serve_twice() -> None:
        for _ in range(2):
            accepted.append(server.accept(stop, verify=server_verify, reply=lambda: next(replies)))

    server_thread = threading.Thread(target=serve_twice, daemon=True)
    server_thread.start()
    client = TcpClient(tcp_client(server.address[1]))
    thread, result = real_client(server.address[1], stop, client)
    thread.join(10)
    server_thread.join(10)
    try:
        assert result[0] is not None and len(accepted) == 2
        assert result[0].getsockname() == accepted[1].getpeername()
        assert closed_by_server(accepted[0])  # the first: given up by the client
        assert client.counts["unproven"] == 1
    finally:
        for sock in [*result, *accepted]:
            if sock is not None:
                sock.close()
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].levelno == logging.WARNING
    assert "the server's first record did not verify: it does not hold the key" in failures[0].getMessage()


def test_the_client_gives_up_on_a_server_that_never_answers(stop, monkeypatch, caplog):
    monkeypatch.setattr(transport, "PROOF_DEADLINE_S", 0.2)
    caplog.set_level(logging.DEBUG, logger="tunrelay.daemon.transport")
    with socket.socket() as silent:  # the kernel completes connections; nobody answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        client = TcpClient(tcp_client(silent.getsockname()[1]))
        thread, result = real_client(silent.getsockname()[1], stop, client)
        assert _wait_for(lambda: client.counts["unproven"] >= 2, 10)
        stop.set()
        thread.join(5)
        assert result == [None]
    assert any("no hello from the server within 0.2 s, retrying" in r.getMessage()
               for r in caplog.records)
