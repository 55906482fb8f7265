"""Gate for tests that need root, network namespaces and /dev/net/tun.

Locally such tests are skipped with the reason.  Under CI (``CI=true``) the
environment is supposed to provide them, so a missing capability is a
failure: a silently skipped integration suite would look green.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from tunrelay.testrig.netns import Testbed
from tunrelay.testrig.pair import RelayPair

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def require_root() -> None:
    """Return if root tests can run here; else skip, or fail under CI."""
    reason = Testbed.available()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"root test cannot run under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def testbed():
    """A fresh two-namespace test bed, removed after the test (also on failure)."""
    require_root()
    with Testbed() as tb:
        yield tb


@pytest.fixture
def bed(monkeypatch):
    """A fresh test bed per test, removed afterwards even when the test fails."""
    require_root()
    # The relays run as `python -m tunrelay` in the namespaces: make sure they
    # import this checkout, however pytest itself was started.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    with Testbed() as tb:
        yield tb


def with_relay_io(kw: dict, io: str | None) -> dict:
    """RelayPair kwargs with ``[relay] io = "<io>"`` on each side whose own
    lines name neither an io nor the Python engine (which has no io_uring)."""
    if io is None:
        return kw
    kw = dict(kw)
    common = (kw.get("overrides") or {}).get("relay", [])
    for side in ("overrides_a", "overrides_b"):
        own = dict(kw.get(side) or {})
        lines = [*common, *own.get("relay", [])]
        if any(line.replace(" ", "").startswith(("io=", 'engine="python"')) for line in lines):
            continue
        own["relay"] = [*own.get("relay", []), f'io = "{io}"']
        kw[side] = own
    return kw


@pytest.fixture
def make_pair(bed, relay_io):
    """``make_pair(**RelayPair kwargs)``; every pair is stopped at teardown
    (before the test bed goes) and its logs printed (shown on failure).
    The relays run the ``relay_io`` fixture's [relay] io (conftest.py: none
    given; a module covering both engines parametrizes it)."""
    # A short directory: the control sockets' paths must fit sun_path.
    workdir = tempfile.mkdtemp(prefix="trt-")
    pairs: list[RelayPair] = []

    def make(**kw) -> RelayPair:
        sub = os.path.join(workdir, str(len(pairs)))
        os.mkdir(sub)
        pair = RelayPair(bed, workdir=sub, **with_relay_io(kw, relay_io))
        pairs.append(pair)
        return pair

    yield make
    for pair in pairs:
        pair.close()
        for name in pair.sides:
            print(f"----- relay {name} log -----\n{pair.log(name)}")
    shutil.rmtree(workdir, ignore_errors=True)


def wait_for(predicate, timeout: float, what: str):
    """Poll ``predicate()`` until it returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def python(bed: Testbed, ns: str, script: str, *args: str,
           timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a helper script inside ``ns``; it must succeed."""
    done = bed.run(ns, [sys.executable, "-c", script, *args], capture_output=True, text=True,
                   timeout=timeout)
    assert done.returncode == 0, f"helper failed in {ns}:\n{done.stdout}\n{done.stderr}"
    return done
