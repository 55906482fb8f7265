"""The embeddable core imports without pyroute2 (issue 8): a VPN tool that
hands the pump its own TUN fd and socket needs neither netlink nor the
daemon.  Checked in a fresh interpreter where importing pyroute2 fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CORE = ("tunrelay", "tunrelay._fastpath", "tunrelay.pypump", "tunrelay.pumps",
        "tunrelay._runner", "tunrelay.counters", "tunrelay.framing", "tunrelay.aead",
        "tunrelay.errors")

SCRIPT = f"""
import sys
sys.modules["pyroute2"] = None          # any import of it now raises ImportError
import importlib
for name in {CORE!r}:
    importlib.import_module(name)
import tunrelay
tunrelay.Pump, tunrelay.PyPump, tunrelay.PumpLike, tunrelay.Reason
loaded = sorted(m for m in sys.modules if m.startswith("tunrelay"))
print(" ".join(loaded))
"""


def test_the_core_imports_without_pyroute2():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.split()
    assert "tunrelay.daemon.device" not in loaded and "tunrelay.daemon.relay" not in loaded, loaded


def test_the_daemon_still_finds_open_tun():
    done = subprocess.run([sys.executable, "-c", "import tunrelay; print(tunrelay.open_tun.__module__)"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "tunrelay.daemon.device", done.stderr
