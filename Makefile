# The README's commands.  Each works from nothing on a fresh machine:
# system tools (apt-get, as root), a virtual environment in .venv, the
# package built and installed into it with its test extras.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCES := pyproject.toml setup.py $(wildcard tunrelay/*.py tunrelay/*.pyx tunrelay/*.pxi tunrelay/*.pxd tunrelay/includes/*)

.PHONY: demo test bench sysdeps venv clean

## make demo: two network namespaces joined by a tunnel; ping and measure (root)
demo: sysdeps venv
	$(VENV)/bin/tunrelay demo

## make test: unit tests, and the integration tests when run as root
test: sysdeps venv
	$(PY) -m pytest

sysdeps:
	@scripts/install-system-deps

venv: $(STAMP)

# Editable install: the compiled module is built in place, so the tests
# import exactly the tree they run from.
$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -c 'import tunrelay._fastpath'
	touch $@

clean:
	rm -rf build *.egg-info tunrelay/_fastpath.c tunrelay/*.so .pytest_cache
