# The README's commands.  Each works from nothing on a fresh machine:
# system tools (apt-get, as root), a virtual environment in .venv, the
# package built and installed into it with its test extras.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCES := pyproject.toml setup.py $(wildcard tunrelay/*.py tunrelay/daemon/*.py tunrelay/wireguard/*.py tunrelay/testrig/*.py tunrelay/*.pyx tunrelay/*.pxi tunrelay/*.pxd tunrelay/includes/*)

.PHONY: demo test lint soak bench dist dist-check sysdeps testdeps venv clean

## make demo: two network namespaces joined by a tunnel; ping and measure (root)
demo: sysdeps venv
	$(VENV)/bin/tunrelay demo

## make test: unit tests, and the integration tests when run as root.  The
## slow tests run too, on a short budget (the soak loads the tunnel for 20 s).
test: testdeps venv
	TUNRELAY_SOAK_SECONDS=$${TUNRELAY_SOAK_SECONDS:-20} $(PY) -m pytest

## make lint: ruff over the Python, cython-lint over the Cython sources (.pyx,
## .pxi, .pxd), as configured in pyproject.toml; any finding fails it.  The
## tools are the [lint] extra's pins, put into .venv (the package need not be
## built for this).  cython-lint runs pycodestyle from PATH: the venv's.
CYTHON_SOURCES := $(wildcard tunrelay/*.pyx tunrelay/*.pxi tunrelay/*.pxd tunrelay/includes/*.pxd)
lint:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["lint"], sep="\n")' | \
		$(PY) -m pip install --quiet -r /dev/stdin
	$(VENV)/bin/ruff check .
	PATH="$(abspath $(VENV))/bin:$$PATH" cython-lint $(CYTHON_SOURCES)

## make soak: the slow tests at full length (the soak: 60 s under load), and
## the WireGuard tests that wait for wireguard-go's own timers (a real 120 s
## rekey each way, a 15 s re-handshake after a restart: 5 min in all)
soak: testdeps venv
	TUNRELAY_WG_SOAK=1 $(PY) -m pytest -m slow

## make bench: the throughput suite, tunrelay beside veth, kernel vxlan, OpenVPN
## and wireguard-go (tunnels need root); writes benchmarks/RESULTS.md and
## throughput.png, and keeps the run's figures in .benchmarks/ (numbered JSON:
## compare two runs with `.venv/bin/pytest-benchmark compare --between median 0001 0002`).
## Quick: make bench BENCH_ARGS="--bench-seconds 2 --bench-runs 1"
bench: venv
	@scripts/install-system-deps iperf3 openvpn wireguard-go@backports wireguard-tools
	$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) -m pytest --benchmark --benchmark-autosave $(BENCH_ARGS)

## make dist: an sdist and a wheel built from it, in dist/ (checked: every
## .pyx/.pxi/.pxd/.h in the sdist, the LICENSE, no setuptools warnings)
## make dist-check: that, and the wheel installed into a fresh virtual
## environment and tried there (`tunrelay check`, `import tunrelay._fastpath`)
DIST ?= dist
dist dist-check: venv
	scripts/dist-check $(PY) $(DIST) $(if $(filter dist,$@),--no-install)

sysdeps:
	@scripts/install-system-deps

# The tests' WireGuard peer and its configuration tool (tests/test_wg_interop.py),
# OpenVPN, a Nagle peer over TCP (tests/test_nagle.py), and systemd for
# systemd-analyze verify and systemd-sysusers on contrib/ (tests/test_systemd.py).
# wireguard-go from backports when it answers: the build `make bench` measures,
# so one machine tests and measures one binary; else bookworm's own, which
# interoperates as well (a mirror outage must not fail the tests).
testdeps:
	@scripts/install-system-deps wireguard-go@prefer-backports wireguard-tools openvpn systemd

venv: $(STAMP)

# Editable install: the compiled module is built in place, so the tests
# import exactly the tree they run from.  The build requirements go in too:
# after an edit of the .pyx, `setup.py build_ext --inplace` builds with the
# venv's own setuptools and Cython.
$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' | \
		$(PY) -m pip install --quiet -r /dev/stdin
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -c 'import tunrelay._fastpath'
	touch $@

clean:
	rm -rf build dist *.egg-info tunrelay/_fastpath.c tunrelay/*.so .pytest_cache
