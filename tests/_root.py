"""Gate for tests that need root, network namespaces and /dev/net/tun.

Locally such tests are skipped with the reason.  Under CI (``CI=true``) the
environment is supposed to provide them, so a missing capability is a
failure: a silently skipped integration suite would look green.
"""

from __future__ import annotations

import os

import pytest

from tunrelay.netns import Testbed


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
