"""The two-namespace test bed itself: underlay reachability and cleanup."""

from __future__ import annotations

import subprocess

import _root
import pytest
from _root import require_root, testbed  # noqa: F401  (testbed is a fixture)

from tunrelay.testrig.netns import Testbed

pytestmark = pytest.mark.root


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def ping(tb: Testbed, ns: str, address: str) -> subprocess.CompletedProcess:
    return tb.run(ns, ["ping", "-c", "1", "-W", "2", address], capture_output=True, text=True)


def test_names_fit_the_interface_limit(testbed):
    for name in (testbed.ns_a, testbed.ns_b, testbed.veth_a, testbed.veth_b):
        assert 0 < len(name.encode()) <= 15
    assert {testbed.ns_a, testbed.ns_b} <= namespaces()


@pytest.mark.parametrize("family", [4, 6])
def test_underlay_ping_both_ways(testbed, family):
    a, b = (testbed.addr_a, testbed.addr_b) if family == 4 else (testbed.addr6_a, testbed.addr6_b)
    for ns, target in ((testbed.ns_a, b), (testbed.ns_b, a)):
        done = ping(testbed, ns, target)
        assert done.returncode == 0, done.stdout + done.stderr


def test_loopback_is_up_in_both(testbed):
    for ns in (testbed.ns_a, testbed.ns_b):
        assert ping(testbed, ns, "127.0.0.1").returncode == 0


def test_veth_is_not_in_the_root_namespace(testbed):
    for name in (testbed.veth_a, testbed.veth_b):
        assert subprocess.run(["ip", "link", "show", "dev", name], capture_output=True).returncode != 0


@pytest.mark.parametrize("side", ["a", "b"])
def test_link_set_down_and_up_keeps_both_families(testbed, side):
    ns, veth = (testbed.ns_a, testbed.veth_a) if side == "a" else (testbed.ns_b, testbed.veth_b)
    testbed.link_set(ns, veth, False)
    assert ping(testbed, testbed.ns_a, testbed.addr_b).returncode != 0
    testbed.link_set(ns, veth, True)
    for target in (testbed.addr_b, testbed.addr6_b):  # the IPv6 address survived
        done = ping(testbed, testbed.ns_a, target)
        assert done.returncode == 0, done.stdout + done.stderr


def test_close_removes_namespaces_and_stops_processes():
    require_root()
    tb = Testbed()
    proc = tb.popen(tb.ns_b, ["sleep", "60"])
    tb.close()
    assert proc.poll() is not None  # terminated
    assert not {tb.ns_a, tb.ns_b} & namespaces()
    tb.close()  # idempotent


def test_a_process_ignoring_sigterm_is_killed():
    require_root()
    tb = Testbed()
    proc = tb.popen(tb.ns_a, ["sh", "-c", "trap '' TERM; echo ready; sleep 60"],
                    stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    tb.close()
    assert proc.returncode is not None
    assert not {tb.ns_a, tb.ns_b} & namespaces()


def test_namespaces_are_removed_when_the_body_raises():
    require_root()
    with pytest.raises(RuntimeError, match="boom"):
        with Testbed() as tb:
            names = {tb.ns_a, tb.ns_b}
            assert names <= namespaces()
            raise RuntimeError("boom")
    assert not names & namespaces()


def test_run_refuses_a_foreign_namespace(testbed):
    with pytest.raises(ValueError, match="not one of this test bed's"):
        testbed.run("some-other-ns", ["true"])


def test_available_says_why_not(monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert Testbed.available() == "needs root (network namespaces and /dev/net/tun)"


def test_require_root_skips_locally_and_fails_under_ci(monkeypatch):
    monkeypatch.setattr(Testbed, "available", staticmethod(lambda: "needs root"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        _root.require_root()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="cannot run under CI=true: needs root"):
        _root.require_root()
