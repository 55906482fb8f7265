"""The benchmark session: settings, the results gathered across tests and
the outputs at the end (terminal table, RESULTS.md, chart).

The root ``conftest.py`` registers this plugin for ``pytest --benchmark``
only, so a plain ``pytest`` never imports anything under benchmarks/.

pytest-benchmark's own outputs carry the figures, not timings: its
terminal table (the time each test's measurement took) is left out, and its
JSON (``--benchmark-json``, ``--benchmark-autosave``, ``--benchmark-save``)
holds one entry per figure (benchmarks/figures.py), which
``pytest-benchmark compare`` compares between runs.
"""

from __future__ import annotations

import shlex

import pytest

from benchmarks.figures import json_entries
from benchmarks.report import (
    CHART_PNG,
    RESULTS_MD,
    Results,
    summary_text,
    write_chart,
    write_results_md,
)

_RESULTS = pytest.StashKey[Results]()
_OUTPUTS = pytest.StashKey[list]()


def pytest_configure(config: pytest.Config) -> None:
    seconds, runs = config.getoption("bench_seconds"), config.getoption("bench_runs")
    if not seconds > 0:
        raise pytest.UsageError(f"--bench-seconds: expected a duration above 0, got {seconds}")
    if runs < 1:
        raise pytest.UsageError(f"--bench-runs: expected at least 1 run, got {runs}")
    for option in ("benchmark_compare", "benchmark_compare_fail", "benchmark_histogram"):
        if config.getoption(option, None):
            flag = "--" + option.replace("_", "-")
            raise pytest.UsageError(
                f"{flag}: not with this suite: it works on the timings pytest-benchmark takes "
                "during the run, which here are how long each measurement lasted.  Keep the "
                "figures with --benchmark-autosave and compare two runs with `pytest-benchmark "
                "compare --between median 0001 0002` (README, Benchmarks)")
    command = shlex.join(["pytest", *config.invocation_params.args])
    config.stash[_RESULTS] = Results(command=command, seconds=seconds, runs=runs)
    config.stash[_OUTPUTS] = []


@pytest.fixture(scope="session")
def bench_results(request: pytest.FixtureRequest) -> Results:
    """Where every benchmark records its figures; the session reports them."""
    return request.config.stash[_RESULTS]


def pytest_sessionfinish(session: pytest.Session) -> None:
    results, outputs = session.config.stash[_RESULTS], session.config.stash[_OUTPUTS]
    if not results.measured():
        # A run without root (or filtered to the micro benchmarks) must not
        # wipe the tunnel table of the last full run.
        outputs.append(f"{RESULTS_MD.name} and {CHART_PNG.name} not updated: no tunnel was measured")
        return
    why_not = write_chart(results)
    write_results_md(results, chart=why_not is None)
    outputs.append(f"wrote {RESULTS_MD}")
    outputs.append(f"wrote {CHART_PNG}" if why_not is None else f"no chart: {why_not}")


@pytest.hookimpl(tryfirst=True)
def pytest_benchmark_group_stats(config, benchmarks, group_by) -> list:
    """No groups to display: pytest-benchmark's table would show how long
    each measurement took, which tells a reader nothing; the figures are in
    the summary below and in the JSON."""
    return []


def pytest_benchmark_update_json(config: pytest.Config, benchmarks, output_json: dict) -> None:
    """The JSON's entries become the figures and the ratios, in place of
    the timings; the run's settings go beside them."""
    results = config.stash[_RESULTS]
    output_json["benchmarks"] = json_entries(output_json["benchmarks"], results)
    output_json["tunrelay"] = {"command": results.command, "seconds": results.seconds,
                               "runs": results.runs, "load_start": results.load_start[0]}


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    results = config.stash[_RESULTS]
    if not (results.tunnels or results.micro):
        return  # nothing ran (--collect-only, -k on the self-tests)
    terminalreporter.write_sep("=", "tunrelay throughput, side by side")
    terminalreporter.write_line(summary_text(results))
    for line in config.stash[_OUTPUTS]:
        terminalreporter.write_line(line)
    if not (config.getoption("benchmark_json") or config.getoption("benchmark_save")
            or config.getoption("benchmark_autosave")):
        terminalreporter.write_line("no JSON of the figures written: add --benchmark-autosave to "
                                    "compare this run with another (pytest-benchmark compare)")
