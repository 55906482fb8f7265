"""The benchmark session: settings, the results gathered across tests and
the outputs at the end (terminal table, RESULTS.md, chart).

The root ``conftest.py`` registers this plugin for ``pytest --benchmark``
only, so a plain ``pytest`` never imports anything under benchmarks/.
"""

from __future__ import annotations

import shlex

import pytest

from benchmarks.report import CHART_PNG, RESULTS_MD, Results, summary_text, write_chart, write_results_md

_RESULTS = pytest.StashKey[Results]()
_OUTPUTS = pytest.StashKey[list]()


def pytest_configure(config: pytest.Config) -> None:
    seconds, runs = config.getoption("bench_seconds"), config.getoption("bench_runs")
    if not seconds > 0:
        raise pytest.UsageError(f"--bench-seconds: expected a duration above 0, got {seconds}")
    if runs < 1:
        raise pytest.UsageError(f"--bench-runs: expected at least 1 run, got {runs}")
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


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    results = config.stash[_RESULTS]
    if not (results.tunnels or results.micro):
        return  # nothing ran (--collect-only, -k on the self-tests)
    terminalreporter.write_sep("=", "tunrelay throughput, side by side")
    terminalreporter.write_line(summary_text(results))
    for line in config.stash[_OUTPUTS]:
        terminalreporter.write_line(line)
