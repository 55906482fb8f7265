"""The TUN I/O engines (``io=``, ``[relay] io``): which one runs, the
fallback where io_uring cannot be set up, and the counters of the io_uring
one.  The data path of both engines is covered by the pump, offload and
integration tests, which run each engine in turn.

io_uring is made unavailable two ways: the test hook
``_fastpath._simulate_uring_failure`` (in this process), and a seccomp
filter that refuses io_uring_setup (tests/no_uring.py, in a child
process), as container runtimes do.  No sysctl is touched.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys

import pytest
from _root import bed, make_pair  # noqa: F401 (fixtures)
from pumprig import Rig, recv_n, wait_for

from conftest import ip_packet, load_fastpath
from tunrelay.errors import EngineUnavailable, PumpArgumentError
from tunrelay.pypump import PyPump
from tunrelay.testrig.pair import TUNNEL_A

HERE = os.path.dirname(os.path.abspath(__file__))
NO_URING = os.path.join(HERE, "no_uring.py")


@pytest.fixture
def rig():
    rig = Rig(load_fastpath().Pump, mtu=1400)
    yield rig
    rig.close()


@pytest.fixture
def uring_refused():
    """io_uring set-up fails with EPERM in this process until the test ends."""
    fastpath = load_fastpath()
    fastpath._simulate_uring_failure(errno.EPERM)
    try:
        yield
    finally:
        fastpath._simulate_uring_failure(0)


def udp_pump(rig, **options):
    tun, tun_end = rig.tun()
    peer = rig.udp()
    sock = rig.udp(timeout=None)
    return tun, peer, sock, rig.pump(tun_end, sock, peer=peer.getsockname(), **options)


def test_each_engine_says_it_runs(rig):
    if load_fastpath().uring_unavailable() is not None:
        pytest.skip(f"io_uring unavailable here: {load_fastpath().uring_unavailable()}")
    assert udp_pump(rig, io="uring")[3].io == "uring"
    assert udp_pump(rig, io="syscalls")[3].io == "syscalls"
    auto = udp_pump(rig)[3]
    assert auto.io == load_fastpath().AUTO_IO and auto.io_fallback is None


def test_auto_falls_back_to_syscalls_and_says_why(rig, uring_refused):
    tun, peer, sock, pump = udp_pump(rig, io="auto")
    assert pump.io == "syscalls"
    assert pump.io_fallback == os.strerror(errno.EPERM)
    pump.start()
    packets = [ip_packet(100, i) for i in range(5)]
    for packet in packets:
        tun.send(packet)
    assert recv_n(peer, len(packets)) == packets
    for packet in packets:
        peer.sendto(packet, sock.getsockname())
    assert recv_n(tun, len(packets)) == packets


def test_uring_insisted_on_fails_with_the_reason(rig, uring_refused):
    tun, tun_end = rig.tun()
    with pytest.raises(EngineUnavailable, match=r'io "uring".*io_uring_queue_init: '
                                                r'Operation not permitted.*"auto" or "syscalls"'):
        rig.pump(tun_end, rig.udp(timeout=None), io="uring")


def test_bad_io_values_are_refused_by_both_pumps(rig):
    tun, tun_end = rig.tun()
    sock = rig.udp(timeout=None)
    for pump_class in (load_fastpath().Pump, PyPump):
        with pytest.raises(PumpArgumentError, match="io must be one of"):
            pump_class(tun_end, sock, io="io_uring")
    with pytest.raises(PumpArgumentError, match="no io_uring engine"):
        PyPump(tun_end, sock, io="uring")
    assert PyPump(tun_end, sock, io="auto").io == "syscalls"


def test_a_seccomp_filter_refusing_io_uring_means_syscalls():
    """A real refusal (not the hook): in a child under a seccomp filter that
    fails io_uring_setup with ENOSYS, "auto" runs syscalls and "uring" fails."""
    code = (
        "import socket\n"
        "from tunrelay import _fastpath\n"
        "from tunrelay.errors import EngineUnavailable\n"
        "a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "print(_fastpath.uring_unavailable())\n"
        "p = _fastpath.Pump(b, u, peer=('127.0.0.1', 9))\n"
        "print(p.io, p.io_fallback)\n"
        "try:\n"
        "    _fastpath.Pump(b, u, peer=('127.0.0.1', 9), io='uring')\n"
        "except EngineUnavailable as e:\n"
        "    print('refused', e)\n")
    done = subprocess.run([sys.executable, NO_URING, "ENOSYS", "--", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "Function not implemented"
    assert lines[1] == "syscalls Function not implemented"
    assert lines[2].startswith('refused io "uring": io_uring cannot be set up here')


def test_uring_counts_one_enter_for_a_batch_of_writes(rig):
    """Ingress: ten datagrams received in one batch are ten TUN writes in one
    io_uring_enter: every packet counted, tun_io per write, and the whole
    wake-up (poll, recvmmsg, io_uring_enter) in a handful of syscalls."""
    if load_fastpath().uring_unavailable() is not None:
        pytest.skip("io_uring unavailable here")
    tun, peer, sock, pump = udp_pump(rig, io="uring")
    packets = [ip_packet(60 + i, i) for i in range(10)]
    for packet in packets:
        peer.sendto(packet, sock.getsockname())   # queued before the first wake-up
    pump.start()
    assert recv_n(tun, len(packets)) == packets
    wait_for(lambda: pump.stats()["ingress"]["packets"] == len(packets), "ingress counted")
    ingress = pump.stats()["ingress"]
    assert ingress["tun_io"] == len(packets)
    assert ingress["bytes"] == sum(map(len, packets))
    assert ingress["syscalls"] <= 4, ingress   # (poll, recvmmsg, io_uring_enter; a poll that sleeps)


def test_uring_write_errors_are_counted_as_drops(rig):
    """A TUN write refused (here: a stand-in whose reader is gone, EPIPE)
    is counted like the syscall engine's: an error, and its packet dropped
    (tun_write), for each write of the batch."""
    if load_fastpath().uring_unavailable() is not None:
        pytest.skip("io_uring unavailable here")
    results = {}
    for io in ("syscalls", "uring"):
        tun, peer, sock, pump = udp_pump(rig, io=io)
        tun.shutdown(socket.SHUT_RD)
        packets = [ip_packet(80, i) for i in range(4)]
        for packet in packets:
            peer.sendto(packet, sock.getsockname())
        pump.start()
        wait_for(lambda: pump.stats()["ingress"]["drops"]["tun_write"] == len(packets),  # noqa: B023 (called within the iteration)
                 f"{io}: drops counted", lambda: pump.stats()["ingress"])  # noqa: B023 (called within the iteration)
        ingress = pump.stats()["ingress"]
        results[io] = (ingress["packets"], ingress["errors"]["write"],
                       ingress["drops"]["tun_write"], ingress["last_errno"])
        pump.stop()
    assert results["uring"] == results["syscalls"], results


# ---------------------------------------------------------------- the relay (root)

def _relay_argv_prefix(err: str) -> tuple:
    return (sys.executable, NO_URING, err, "--")


def test_relay_auto_falls_back_under_seccomp_and_logs_it(bed, make_pair):
    pair = make_pair(overrides={"relay": ['io = "auto"']})
    pair.start_side("a", wait=False, prefix=_relay_argv_prefix("EPERM"))
    pair.start_side("b", wait=False)
    pair.wait_ready("a", "b")
    assert pair.stats("a")["io"] == "syscalls"
    assert pair.stats("b")["io"] == load_fastpath().AUTO_IO
    assert 'io: syscalls (io "auto": io_uring cannot be set up here: Operation not permitted)' \
        in pair.log("a")
    done = bed.run(bed.ns_b, ["ping", "-c", "2", "-i", "0.2", "-W", "2", TUNNEL_A],
                   capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("a", "b"):
        assert pair.stop(name) == 0, pair.log(name)


def test_relay_insisting_on_uring_exits_with_the_reason(bed, make_pair):
    pair = make_pair(overrides={"relay": ['io = "uring"']})
    pair.start_side("a", wait=False, prefix=_relay_argv_prefix("EPERM"))
    side = pair.sides["a"]
    assert side.proc.wait(20) == 1, pair.log("a")
    assert 'io "uring": io_uring cannot be set up here (io_uring_queue_init: ' \
        "Operation not permitted" in pair.log("a")
    assert "Traceback" not in pair.log("a")
