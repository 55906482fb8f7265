"""The switch between the test suite and the throughput benchmarks.

``pytest`` runs the tests and never imports or collects benchmarks/;
``pytest --benchmark`` runs benchmarks/ and nothing else.  The benchmarks'
own machinery is the plugin benchmarks/plugin.py, registered here only then.

``pytest-benchmark compare``, run from this directory, imports this file
too, for the hook below.
"""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
BENCHMARKS = ROOT / "benchmarks"


def pytest_addoption(parser):
    group = parser.getgroup("tunrelay benchmarks")
    group.addoption("--benchmark", action="store_true",
                    help="run the throughput suite in benchmarks/ (and only it)")
    group.addoption("--bench-seconds", type=float, metavar="S",
                    default=os.environ.get("TUNRELAY_BENCH_SECONDS", "5"),
                    help="length of each measurement (default 5, or $TUNRELAY_BENCH_SECONDS)")
    group.addoption("--bench-runs", type=int, metavar="N",
                    default=os.environ.get("TUNRELAY_BENCH_RUNS", "3"),
                    help="runs per measurement, the median is reported "
                         "(default 3, or $TUNRELAY_BENCH_RUNS)")


def pytest_configure(config):
    if config.getoption("benchmark"):
        if str(ROOT) not in sys.path:  # e.g. under --import-mode=importlib
            sys.path.insert(0, str(ROOT))
        config.pluginmanager.import_plugin("benchmarks.plugin")


def pytest_ignore_collect(collection_path, config):
    inside = collection_path == BENCHMARKS or BENCHMARKS in collection_path.parents
    if config.getoption("benchmark"):
        return None if inside or collection_path in BENCHMARKS.parents else True
    return True if inside else None


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_scale_unit(config, unit, benchmarks, best, worst, sort):
    """The benchmarks' JSON entries are figures (Gbit/s, kpps, µs, ...:
    benchmarks/figures.py), not times: shown as recorded, never rescaled
    as seconds would be (0.8 CPU s/GB is not 800 ms).  Others as
    pytest-benchmark scales them.  A plain function, as ``pytest-benchmark
    compare`` calls it directly."""
    if benchmarks and all("unit" in (b.get("extra_info") or {}) for b in benchmarks):
        return "", 1.0
    from pytest_benchmark.plugin import pytest_benchmark_scale_unit as default
    return default(config=config, unit=unit, benchmarks=benchmarks, best=best, worst=worst,
                   sort=sort)
