"""A test bed of two hosts on one machine: two network namespaces and a veth
(and what every namespace test bed shares: ``Namespaces``, ``add_veth``).

Integration tests, benchmarks and ``tunrelay demo`` need two hosts with an
underlay network between them, without touching the machine's own network.
Two namespaces joined by a veth pair are exactly that; the veth is created
directly inside them, so nothing ever appears in the root namespace, and all
traffic stays between addresses inside namespaces we created.

Namespaces are made with the ``ip`` command (iproute2): it also sets up
/var/run/netns and the per-namespace /etc and /sys that ``ip netns exec``
gives a process, which is simpler and more robust than doing it by hand.

Everything is removed by ``close()``: from ``__exit__`` even when the body
raised, and from an atexit hook as a safety net.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any, Self

from ..errors import TunrelayError

__all__ = ["Namespaces", "Testbed", "TestbedError", "add_veth", "link_set", "set_sysctl"]

UNDERLAY_A = "198.18.0.1"  # 198.18.0.0/15: reserved for benchmarking (RFC 2544)
UNDERLAY_B = "198.18.0.2"
UNDERLAY_PREFIX = 24
UNDERLAY6_A = "fd00:198:18::1"  # unique local (RFC 4193), never routed
UNDERLAY6_B = "fd00:198:18::2"
UNDERLAY6_PREFIX = 64

_READY_TIMEOUT = 5.0  # seconds to wait for IPv6 to start on a new link
_TERMINATE_TIMEOUT = 3.0  # seconds a process gets to exit on SIGTERM before SIGKILL


class TestbedError(TunrelayError):
    """The test bed could not be built (not root, no ``ip``, a command failed)."""

    __test__ = False  # not a pytest test class, despite the name


def _ip(*args: str) -> None:
    """Run ``ip ARGS``; raise TestbedError with ip's own message on failure."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise TestbedError(f"'ip {' '.join(args)}' failed: {done.stderr.strip() or done.returncode}")


def set_sysctl(ns: str, key: str, value: str) -> None:
    """Write /proc/sys/KEY as seen inside ``ns`` (net.* is per namespace)."""
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "sh", "-c", f'echo {value} > "/proc/sys/{key}"'],
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        raise TestbedError(f"cannot set {key}={value} in namespace {ns}: {done.stderr.strip()}")


def _has_carrier(ns: str, ifname: str) -> bool:
    done = subprocess.run(
        ["ip", "-n", ns, "-o", "link", "show", "dev", ifname], capture_output=True, text=True
    )
    return "LOWER_UP" in done.stdout


def _wait_ipv6_ready(ns: str, ifname: str, timeout: float = _READY_TIMEOUT) -> None:
    """Wait until IPv6 runs on a veth end that just came up.

    The kernel starts IPv6 on a link only when it sees the carrier, which it
    may report up to a second late; before that, neighbour solicitations
    are lost and the first IPv6 packet waits 1-2 s.  The link-local address
    appears at that moment (and goes away on link down), so poll for it.
    """
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run(
            ["ip", "-n", ns, "-6", "-o", "addr", "show", "dev", ifname, "scope", "link"],
            capture_output=True, text=True,
        )
        if "fe80::" in done.stdout:
            return
        if time.monotonic() > deadline:
            raise TestbedError(f"IPv6 did not start on {ifname} in namespace {ns} within {timeout} s")
        time.sleep(0.02)


def link_set(ns: str, ifname: str, up: bool) -> None:
    """Set a link up or down inside a namespace (for fault injection)."""
    _ip("-n", ns, "link", "set", "dev", ifname, "up" if up else "down")


def add_veth(ns_a: str, dev_a: str, ns_b: str, dev_b: str,
             addresses: Sequence[tuple[str, str, str]]) -> None:
    """A veth pair made inside ``ns_a`` with its peer inside ``ns_b`` (never
    in the root namespace), ``addresses`` [(ns, dev, "addr/prefix")] put on
    its ends (IPv6 without DAD, usable at once), both ends up, and once the
    carrier is seen, IPv6 running on both.  Fault tests take links down:
    the ends keep their IPv6 addresses then."""
    _ip("-n", ns_a, "link", "add", dev_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b)
    for ns, dev in ((ns_a, dev_a), (ns_b, dev_b)):
        set_sysctl(ns, f"net/ipv6/conf/{dev}/keep_addr_on_down", "1")
    for ns, dev, address in addresses:
        _ip("-n", ns, "addr", "add", address, "dev", dev, *(["nodad"] if ":" in address else []))
    for ns, dev in ((ns_a, dev_a), (ns_b, dev_b)):
        _ip("-n", ns, "link", "set", "dev", dev, "up")
    for ns, dev in ((ns_a, dev_a), (ns_b, dev_b)):
        _wait_ipv6_ready(ns, dev)


class Namespaces:
    """Network namespaces made by this process, the processes started in
    them, and their removal: ``close()`` stops the processes and deletes the
    namespaces (and every interface in them), from ``__exit__`` even when
    the body raised, and from an atexit hook as a safety net.  The test
    beds (``Testbed`` here, ``Star`` in ``hub``) build on it.

    ``base`` is a prefix unique to this object: "tr" + pid (at most 7
    digits) + 4 hex digits, 13 bytes, so names made of it and two more
    characters fit the interface name limit (15 bytes).
    """

    __test__ = False  # not a pytest test class

    #: What the namespaces are called in error messages.
    what = "test bed"

    def __init__(self) -> None:
        reason = self.available()
        if reason is not None:
            raise TestbedError(f"cannot build a {self.what}: {reason}")
        self.base = f"tr{os.getpid()}{secrets.token_hex(2)}"
        self._namespaces: list[str] = []
        self._processes: list[subprocess.Popen] = []
        self._closed = False
        atexit.register(self.close)

    @staticmethod
    def available() -> str | None:
        """None if a test bed can be built here, else the reason (for skips)."""
        if os.geteuid() != 0:
            return "needs root (network namespaces and /dev/net/tun)"
        if shutil.which("ip") is None:
            return "the 'ip' command (iproute2) is not installed"
        if not os.path.exists("/dev/net/tun"):
            return "/dev/net/tun is missing (modprobe tun)"
        return None

    def add_namespace(self, ns: str) -> None:
        """A new namespace, removed by close(), with ``lo`` up."""
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        _ip("-n", ns, "link", "set", "dev", "lo", "up")

    def _argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        if ns not in self._namespaces:
            raise ValueError(f"namespace {ns!r} is not one of this {self.what}'s "
                             f"({', '.join(self._namespaces)})")
        return ["ip", "netns", "exec", ns, *argv]

    def run(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
        """``subprocess.run(argv, **kw)`` inside namespace ``ns``."""
        return subprocess.run(self._argv(ns, argv), **kw)

    def popen(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """``subprocess.Popen(argv, **kw)`` inside ``ns``; stopped by close().

        ``ip netns exec`` execs the command, so the Popen's pid is the
        command itself and signals reach it directly.
        """
        proc = subprocess.Popen(self._argv(ns, argv), **kw)
        self._processes.append(proc)
        return proc

    def close(self) -> None:
        """Stop tracked processes, then delete the namespaces (and the veths
        with them).  Idempotent; never raises for what is already gone."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for proc in self._processes:
            _stop(proc)
        self._processes.clear()
        for ns in self._namespaces:
            # A namespace lives on while a process is inside it; ours only.
            _kill_pids_in(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._namespaces.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Testbed(Namespaces):
    """Two namespaces ``ns_a`` / ``ns_b`` joined by ``veth_a`` <-> ``veth_b``.

    Underlay addresses: ``addr_a`` 198.18.0.1/24 and ``addr_b`` 198.18.0.2/24,
    ``addr6_a`` fd00:198:18::1/64 and ``addr6_b`` fd00:198:18::2/64 (nodad,
    usable at once).  ``lo`` is up in both.  Addresses are plain strings.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self) -> None:
        super().__init__()
        base = self.base
        self.ns_a, self.ns_b = f"{base}a", f"{base}b"
        self.veth_a, self.veth_b = f"{base}a", f"{base}b"
        self.addr_a, self.addr_b = UNDERLAY_A, UNDERLAY_B
        self.addr6_a, self.addr6_b = UNDERLAY6_A, UNDERLAY6_B
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        for ns in (self.ns_a, self.ns_b):
            self.add_namespace(ns)
        add_veth(self.ns_a, self.veth_a, self.ns_b, self.veth_b, [
            (self.ns_a, self.veth_a, f"{self.addr_a}/{UNDERLAY_PREFIX}"),
            (self.ns_a, self.veth_a, f"{self.addr6_a}/{UNDERLAY6_PREFIX}"),
            (self.ns_b, self.veth_b, f"{self.addr_b}/{UNDERLAY_PREFIX}"),
            (self.ns_b, self.veth_b, f"{self.addr6_b}/{UNDERLAY6_PREFIX}"),
        ])

    def link_set(self, ns: str, ifname: str, up: bool) -> None:
        """``link_set``, and when a veth comes back up with its carrier,
        wait until IPv6 runs again on both ends, so the next packet passes."""
        link_set(ns, ifname, up)
        if up and ifname in (self.veth_a, self.veth_b) and _has_carrier(ns, ifname):
            _wait_ipv6_ready(self.ns_a, self.veth_a)
            _wait_ipv6_ready(self.ns_b, self.veth_b)

    def __repr__(self) -> str:
        return f"<Testbed {self.ns_a} <-> {self.ns_b}{' closed' if self._closed else ''}>"


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM,
                 timeout: float = _TERMINATE_TIMEOUT) -> bool:
    """Send ``sig`` to a process that still runs and wait ``timeout`` s for
    it; kill it if it does not exit.  False when it had to be killed."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return False
    return True


def _stop(proc: subprocess.Popen) -> None:
    stop_process(proc)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _kill_pids_in(ns: str) -> None:
    """SIGKILL what is left inside one of our namespaces (children of tracked
    processes, or processes started with ``run`` in the background)."""
    done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    for pid in done.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
