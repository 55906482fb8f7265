"""Sockets of tunrelay.transport, on loopback only; no root needed."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from tunrelay import transport
from tunrelay.config import Endpoint, TransportConfig
from tunrelay.errors import TransportError
from tunrelay.transport import TcpClient, TcpServer, open_udp

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
    caplog.set_level(logging.DEBUG, logger="tunrelay.transport")
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
