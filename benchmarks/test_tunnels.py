"""Tunnel benchmarks (root): every tunnel of ``tunnels.all_tunnels()``, one
fresh test bed each (``tunnel.testbed()``: two namespaces, or a star for
the hub), measured in this one session so the ratios between
them hold.  A tunnel first passes a sanity ping; one that cannot run here is
skipped with the reason, one that breaks is reported as failed with the
reason, and the session goes on with the others.
"""

from __future__ import annotations

import re

import pytest

from benchmarks.figures import tunnel_figures
from benchmarks.measure import measure_tunnel, wait_for_ping
from benchmarks.report import TunnelRow
from benchmarks.tunnels import Unsupported, all_tunnels
from tunrelay.testrig.netns import Testbed

TUNNELS = all_tunnels()


def _id(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def _one_line(text: str, limit: int = 300) -> str:
    text = " / ".join(line.strip() for line in str(text).splitlines() if line.strip())
    return text if len(text) <= limit else text[:limit - 3] + "..."


@pytest.mark.parametrize("tunnel", TUNNELS, ids=[_id(t.label) for t in TUNNELS])
def test_tunnel(tunnel, benchmark, bench_results) -> None:
    row = TunnelRow(tunnel.label, tunnel.kind)
    bench_results.tunnels.append(row)
    benchmark.group = "tunnels"
    benchmark.extra_info.update({"tunnel": tunnel.label, "kind": tunnel.kind})

    def skip(reason: str) -> None:
        row.status, row.reason = "skipped", reason
        benchmark.extra_info["skipped"] = reason
        pytest.skip(reason)

    def fail(reason: str) -> None:
        row.status, row.reason = "failed", _one_line(reason)
        benchmark.extra_info["failed"] = row.reason
        pytest.fail(f"{tunnel.label}: {reason}", pytrace=False)

    reason = Testbed.available() or tunnel.missing()
    if reason:
        skip(reason)
    figures = unsupported = error = None
    try:
        with tunnel.testbed() as bed:
            try:
                tunnel.start(bed)
                wait_for_ping(bed, tunnel.server_ip)
                figures = benchmark.pedantic(
                    measure_tunnel, args=(bed, tunnel.server_ip, tunnel.pids(),
                                          bench_results.seconds, bench_results.runs,
                                          tunnel.measures),
                    rounds=1, iterations=1)
            finally:
                tunnel.stop()
    except Unsupported as exc:
        unsupported = str(exc)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    # Outside the except blocks: the report is the reason, not a traceback.
    if unsupported:
        skip(unsupported)
    if error:
        fail(error)

    row.medians, row.runs = figures.medians, figures.runs
    benchmark.extra_info.update({"medians": figures.medians, "runs": figures.runs,
                                 "seconds": bench_results.seconds, "errors": figures.errors,
                                 "figures": tunnel_figures(figures.runs)})
    if figures.errors:
        measured = any(v is not None for v in figures.medians.values())
        row.status = "partial" if measured else "failed"
        row.reason = _one_line("; ".join(figures.errors))
        pytest.fail(f"{tunnel.label}: " + "\n".join(figures.errors), pytrace=False)
