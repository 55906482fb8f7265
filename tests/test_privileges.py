"""Running with less than root (issue: privileges).

Two ways: start as root and drop to [security] user/group once the device
and sockets are open; or never be privileged at all, attaching to a
persistent device that root set up beforehand for that user.
"""

from __future__ import annotations

import pytest

from tests._root import require_root
from tunrelay.testrig.netns import Testbed
from tunrelay.testrig.pair import DEVICE, TUNNEL_A, TUNNEL_B, RelayPair

pytestmark = pytest.mark.root


@pytest.fixture
def bed():
    require_root()
    with Testbed() as tb:
        yield tb


def status_field(bed: Testbed, pid: int, field: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].split()[0]
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def ping_ok(bed: Testbed) -> bool:
    result = bed.run(bed.ns_a, ["ping", "-c", "3", "-i", "0.2", "-W", "2", TUNNEL_B],
                     capture_output=True, text=True)
    return result.returncode == 0


def test_drops_to_the_configured_user_after_set_up(bed):
    with RelayPair(bed, overrides_a={"security": ['user = "nobody"', 'group = "nogroup"']}) as pair:
        pair.start()
        pid = pair.sides["a"].proc.pid
        assert status_field(bed, pid, "Uid") == "65534"
        assert status_field(bed, pid, "Gid") == "65534"
        assert status_field(bed, pid, "CapEff") == "0000000000000000"
        assert ping_ok(bed)
        assert "running as uid 65534 gid 65534" in pair.log("a")
        assert pair.stop("a") == 0, pair.log("a")
        # Non-persistent: the device went with the last fd, privileges or not.
        assert bed.run(bed.ns_a, ["ip", "link", "show", DEVICE], capture_output=True).returncode != 0


def test_runs_without_capabilities_on_a_persistent_device_set_up_beforehand(bed):
    # Root prepares the device once, owned by the relay's uid, as
    # `ip tuntap add ... user U` would; the relay then needs no capability.
    # (uid 0 with an empty capability set stands in for an ordinary user:
    # the test machine's Python lives in a root-only directory.)
    for command in (["ip", "tuntap", "add", "dev", DEVICE, "mode", "tun", "user", "0"],
                    ["ip", "link", "set", DEVICE, "mtu", "1400"],
                    ["ip", "addr", "add", f"{TUNNEL_A}/24", "dev", DEVICE],
                    ["ip", "addr", "add", "fd00:99::1/64", "dev", DEVICE, "nodad"],
                    ["ip", "link", "set", DEVICE, "up"]):
        bed.run(bed.ns_a, command, check=True)
    no_caps = ("setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--")
    with RelayPair(bed, overrides_a={"device": ["persist = true"]}) as pair:
        pair.start_side("b", wait=False)
        pair.start_side("a", prefix=no_caps)
        pair.wait_ready("b")
        pid = pair.sides["a"].proc.pid
        assert status_field(bed, pid, "CapEff") == "0000000000000000"
        assert ping_ok(bed), pair.log("a")
        assert pair.stop("a") == 0, pair.log("a")
    # Persistent: still there for the next start.
    assert bed.run(bed.ns_a, ["ip", "link", "show", DEVICE], capture_output=True).returncode == 0


def test_a_device_that_needs_changes_explains_what_to_do_without_capabilities(bed):
    bed.run(bed.ns_a, ["ip", "tuntap", "add", "dev", DEVICE, "mode", "tun", "user", "0"], check=True)
    no_caps = ("setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--")
    with RelayPair(bed) as pair:
        proc = bed.run(bed.ns_a, [*no_caps, *pair_command(pair, "a")],
                       capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "not permitted" in proc.stderr and "ip tuntap add" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def pair_command(pair: RelayPair, name: str) -> list[str]:
    import sys
    return [sys.executable, "-m", "tunrelay", "run", "--config", pair.sides[name].config_path]
