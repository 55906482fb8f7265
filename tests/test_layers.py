"""The three layers (issue 8): the embeddable core in ``tunrelay``, the
daemon in ``tunrelay.daemon``, the test rig in ``tunrelay.testrig``.

A VPN tool that hands the pump its own TUN fd and socket needs neither
netlink nor the daemon: the core imports without pyroute2 (checked in a
fresh interpreter where importing pyroute2 fails) and without loading the
daemon or the test rig, and no source file of the core imports from them.
The one way up is ``tunrelay/__init__.py``'s lazy names (``Relay``,
``Config``...), loaded on first use; and ``tunrelay/__main__.py``, which is
the daemon's command line.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import tunrelay

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tunrelay"
UPPER = ("daemon", "testrig")

#: Not part of the core although they sit in its directory: `python -m
#: tunrelay` runs the daemon's command line.
ENTRY_POINTS = {"__main__.py"}

# The core's modules: every .py directly in tunrelay/, and the extension.
CORE = ("tunrelay", "tunrelay._fastpath",
        *sorted(f"tunrelay.{path.stem}" for path in PACKAGE.glob("*.py")
                if path.stem != "__init__" and path.name not in ENTRY_POINTS))

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


def test_the_core_is_what_the_issue_names():
    assert {"tunrelay._runner", "tunrelay.counters", "tunrelay.framing", "tunrelay.aead",
            "tunrelay.errors", "tunrelay.pumps", "tunrelay.pypump"} <= set(CORE), CORE
    for daemon_module in ("config", "device", "transport", "relay", "stats", "cli",
                          "privileges", "lograte"):
        assert (PACKAGE / "daemon" / f"{daemon_module}.py").is_file(), daemon_module
        assert not (PACKAGE / f"{daemon_module}.py").exists(), daemon_module
    for rig_module in ("netns", "pair", "demo"):
        assert (PACKAGE / "testrig" / f"{rig_module}.py").is_file(), rig_module
        assert not (PACKAGE / f"{rig_module}.py").exists(), rig_module


def test_the_core_imports_without_pyroute2_the_daemon_or_the_test_rig():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.split()
    assert set(CORE) <= set(loaded), loaded
    upper = [m for m in loaded if m.split(".")[1:2] in (["daemon"], ["testrig"])]
    assert not upper, f"importing the core loaded {upper}"


# ---------------------------------------------------------------- the core's sources

def _outside_type_checking(tree: ast.Module):
    """The module's nodes, leaving out the bodies of ``if TYPE_CHECKING:``
    (imports a type checker sees, never run)."""
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and ast.unparse(node.test) in (
                "TYPE_CHECKING", "typing.TYPE_CHECKING"):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _upward(node: ast.Import | ast.ImportFrom) -> bool:
    """Does an import in tunrelay/ name tunrelay.daemon or tunrelay.testrig?"""
    if isinstance(node, ast.Import):
        return any(alias.name.split(".")[:2] in (["tunrelay", up] for up in UPPER)
                   for alias in node.names)
    if node.level:  # relative to tunrelay/ itself
        parts = node.module.split(".") if node.module else []
        named = [parts[0]] if parts else [alias.name for alias in node.names]
    else:
        parts = (node.module or "").split(".")
        if parts[0] != "tunrelay":
            return False
        named = [parts[1]] if len(parts) > 1 else [alias.name for alias in node.names]
    return any(name in UPPER for name in named)


def _python_imports_upward(path: Path) -> list[str]:
    return [f"line {node.lineno}: {ast.unparse(node)}"
            for node in _outside_type_checking(ast.parse(path.read_text(), str(path)))
            if isinstance(node, (ast.Import, ast.ImportFrom)) and _upward(node)]


# Cython: (c)import/from lines naming tunrelay.daemon/testrig or .daemon/.testrig.
CYTHON_UPWARD = re.compile(
    r"^\s*(?:from|c?import)\s+(?:tunrelay\.|\.+)(?:daemon|testrig)\b"
    r"|^\s*from\s+(?:tunrelay|\.+)\s+c?import\b.*\b(?:daemon|testrig)\b", re.M)


def test_no_source_of_the_core_imports_the_daemon_or_the_test_rig():
    offenders = {}
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name in ENTRY_POINTS:
            continue
        found = _python_imports_upward(path)
        if found:
            offenders[path.name] = found
    cython = [*PACKAGE.glob("*.pyx"), *PACKAGE.glob("*.pxi"), *PACKAGE.glob("*.pxd"),
              *PACKAGE.glob("*.pyi"), *(PACKAGE / "includes").glob("*.pxd")]
    assert any(path.name == "_fastpath.pyx" for path in cython)
    for path in sorted(cython):
        found = [match.group(0).strip() for match in CYTHON_UPWARD.finditer(path.read_text())]
        if found:
            offenders[str(path.relative_to(PACKAGE))] = found
    assert not offenders, offenders


def test_the_scan_sees_an_upward_import(tmp_path):
    # The check above would pass vacuously if it could not see one.
    module = tmp_path / "m.py"
    for line in ("from .daemon import relay", "from .daemon.config import Config",
                 "from . import testrig", "import tunrelay.daemon.device",
                 "from tunrelay.testrig.netns import Testbed",
                 "def f():\n    from .daemon.relay import Relay"):
        module.write_text(line + "\n")
        assert _python_imports_upward(module), line
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                      "    from .daemon.relay import Relay\nfrom . import framing\n")
    assert not _python_imports_upward(module)
    assert CYTHON_UPWARD.search("from tunrelay.daemon.config import load\n")
    assert CYTHON_UPWARD.search("from tunrelay import daemon\n")
    assert not CYTHON_UPWARD.search("from tunrelay.framing import MODES\n")


# ---------------------------------------------------------------- the public names

def test_the_public_names_load_from_their_layers():
    done = subprocess.run(
        [sys.executable, "-c",
         "import tunrelay\n"
         "for name in ('open_tun', 'Relay', 'Config', 'load_config', 'loads_config', 'Pump'):\n"
         "    print(name, getattr(tunrelay, name).__module__)"],
        capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert dict(line.split() for line in done.stdout.splitlines()) == {
        "open_tun": "tunrelay.daemon.device", "Relay": "tunrelay.daemon.relay",
        "Config": "tunrelay.daemon.config", "load_config": "tunrelay.daemon.config",
        "loads_config": "tunrelay.daemon.config", "Pump": "tunrelay._fastpath"}


def test_every_exported_name_resolves():
    for name in tunrelay.__all__:
        assert getattr(tunrelay, name) is not None, name
    namespace: dict = {}
    exec("from tunrelay import *", namespace)
    assert set(tunrelay.__all__) <= set(namespace)


# ---------------------------------------------------------------- WireGuard

WG_SCRIPT = """
import sys
sys.modules["pyroute2"] = None          # any import of it now raises ImportError
from tunrelay.wireguard import WireGuardDevice
from tunrelay.wireguard import device
loaded = sorted(m for m in sys.modules if m.startswith("tunrelay"))
print(" ".join(loaded))
"""


def test_the_wireguard_device_embeds_without_pyroute2_or_the_daemons_machinery():
    """An embedder's WireGuard needs the core, the protocol and cryptography:
    not netlink, the daemon's config, relay, device or CLI, nor the test rig
    (the device borrows only the daemon's rate-limited log)."""
    done = subprocess.run([sys.executable, "-c", WG_SCRIPT], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert "tunrelay.wireguard.device" in loaded, loaded
    heavy = sorted(m for m in loaded if m.split(".")[1:2] == ["testrig"]
                   or (m.split(".")[1:2] == ["daemon"]
                       and m not in ("tunrelay.daemon", "tunrelay.daemon.lograte"))
                   or m in ("tunrelay.wireguard.config", "tunrelay.wireguard.run",
                            "tunrelay.wireguard.cli", "tunrelay.wireguard.uapi"))
    assert not heavy, f"importing WireGuardDevice loaded {heavy}"
