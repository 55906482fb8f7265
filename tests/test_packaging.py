"""`make test` (and `make demo`, `make bench`) call apt-get only for what is missing.

Each target runs scripts/install-system-deps first.  On a machine that has
every tool, it must not touch apt-get: a developer's machine off the network,
or one whose package lists are stale, would fail or wait on it.  The test
runs the script with the arguments the Makefile gives it, with an apt-get
(and apt-cache) on PATH that records its call and fails.  Where a tool is
genuinely missing, apt-get must be called, and the test skips, naming it.

What is missing is decided here, not by the script: its `check COMMAND
PACKAGE` and `[ -f HEADER ] || needed=...` lines are read from it, and each
Makefile argument is asked of dpkg.

(The sdist and the wheel are checked by `make dist-check`, which CI runs:
scripts/dist-check.)
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install-system-deps"
TARGETS = ["sysdeps", "testdeps", "demo", "bench"]


def makefile_arguments(target: str) -> list[str]:
    """The arguments `make TARGET` passes to scripts/install-system-deps."""
    makefile = (ROOT / "Makefile").read_text()
    rule = re.search(rf"^{re.escape(target)}:[^\n]*\n((?:\t[^\n]*\n?)*)", makefile, re.M)
    assert rule, f"Makefile: no target {target}"
    calls = re.findall(r"^\t@?scripts/install-system-deps\b([^\n]*)$", rule.group(1), re.M)
    if not calls:
        # `make demo: sysdeps venv`: through a prerequisite.
        prerequisites = rule.group(0).split(":", 1)[1].split("\n", 1)[0].split()
        assert "sysdeps" in prerequisites, f"Makefile: {target} never installs system tools"
        return makefile_arguments("sysdeps")
    assert len(calls) == 1, f"Makefile: {target} runs install-system-deps {len(calls)} times"
    return calls[0].split()


def installed(package: str) -> bool:
    status = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", package],
                            capture_output=True, text=True)
    return status.returncode == 0 and status.stdout.startswith("ii")


def version(package: str) -> str:
    return subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                          capture_output=True, text=True).stdout


def missing(arguments: list[str]) -> list[str]:
    """What the script should install: its own checks, then its arguments."""
    script = SCRIPT.read_text()
    absent = [package for command, package in
              re.findall(r"^check (\S+) (\S+)$", script, re.M)
              if shutil.which(command) is None]
    absent += [package for header, package in
               re.findall(r'^\[ -f (\S+) \] \|\| needed="\$needed (\S+)"$', script, re.M)
               if not os.path.isfile(header)]
    for argument in arguments:
        name, _, where = argument.partition("@")
        if where == "backports":
            ok = installed(name) and "~bpo" in version(name)
        elif where == "prefer-backports":
            ok = installed(name) or shutil.which(name) is not None
        else:
            ok = installed(name)
        if not ok:
            absent.append(argument)
    return absent


def test_the_oracle_reads_the_script_checks():
    # If the script's lines change shape, the test above must not quietly
    # stop checking them.
    script = SCRIPT.read_text()
    assert len(re.findall(r"^check (\S+) (\S+)$", script, re.M)) >= 4
    assert re.search(r'^\[ -f /usr/include/openssl/evp\.h \] \|\| needed="\$needed libssl-dev"$',
                     script, re.M)


@pytest.mark.parametrize("target", TARGETS)
def test_no_apt_get_when_the_tools_are_there(target, tmp_path):
    if shutil.which("dpkg-query") is None:
        pytest.skip("no dpkg here: the script only reports what is missing")
    arguments = makefile_arguments(target)
    absent = missing(arguments)
    if absent:
        pytest.skip(f"genuinely missing here, so apt-get must run: {' '.join(absent)}")

    shims = tmp_path / "bin"
    shims.mkdir()
    calls = tmp_path / "calls"
    for tool in ("apt-get", "apt-cache"):
        shim = shims / tool
        shim.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\nexit 1\n')
        shim.chmod(0o755)
    env = dict(os.environ, PATH=f"{shims}{os.pathsep}{os.environ.get('PATH', '')}")
    run = subprocess.run([str(SCRIPT), *arguments], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)

    called = calls.read_text() if calls.exists() else ""
    assert not called, (f"make {target}: install-system-deps {' '.join(arguments)} called "
                        f"{called!r} with everything installed; it said: {run.stderr}{run.stdout}")
    assert run.returncode == 0, run.stderr
    assert "missing" not in run.stderr and "installing" not in run.stdout + run.stderr, run.stderr
