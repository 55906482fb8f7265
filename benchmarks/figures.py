"""The figures of a benchmark run as pytest-benchmark entries, so that
``pytest-benchmark compare`` compares two runs' figures, not their timings.

pytest-benchmark times a callable; what it would time here (one tunnel's
whole measurement, 7 s or so) says nothing.  Its compare command can only
show the statistics of an entry's samples (min, max, mean, median, ...), so
each figure becomes an entry of its own whose samples are the figure's
runs: ``test_tunnel[kernel-vxlan]`` in group "TCP 1 stream, Gbit/s (higher
is better)" has one sample per ``--bench-runs``, its median is the table's
figure.  A ratio of the report (same run) is an entry with one sample.

The tests put their figures in ``benchmark.extra_info["figures"]``
(:func:`tunnel_figures`, :func:`micro_figures`); the plugin's
``pytest_benchmark_update_json`` hook replaces the timing entries of the
JSON with :func:`json_entries`.  The numbers are the figures' own, in the
unit the group names: never rescaled (see ``pytest_benchmark_scale_unit``
in the root conftest.py).
"""

from __future__ import annotations

from pytest_benchmark.stats import Stats

from benchmarks.report import COLUMNS, Results, ratios

#: metric key -> (title, unit, which way is better), for the tunnel table's columns.
TUNNEL_FIGURES = {
    "tcp1_gbps": ("TCP 1 stream", "Gbit/s", "higher"),
    "tcp4_gbps": ("TCP 4 streams", "Gbit/s", "higher"),
    "udp64_kpps": ("UDP 64 B delivered", "kpps", "higher"),
    "udp64_loss_pct": ("UDP 64 B lost", "%", "lower"),
    "ping_rtt_us": ("ping rtt", "µs", "lower"),
    "ping_burst_us": ("slowest reply of a 4-ping burst", "µs", "lower"),
    "cpu_s_per_gb": ("relay CPU per GB received", "CPU s/GB", "lower"),
}
assert set(TUNNEL_FIGURES) == {key for key, _, _ in COLUMNS}, "a table column without a figure"

#: Rate field -> (title, unit, which way is better, scale), for the pump micro benchmark.
MICRO_FIGURES = {
    "pps": ("pump rate", "kpps", "higher", 1e-3),
    "user_us_per_packet": ("pump user CPU per packet", "µs", "lower", 1.0),
    "sys_us_per_packet": ("pump system CPU per packet", "µs", "lower", 1.0),
    "syscalls_per_packet": ("pump system calls per packet", "calls", "lower", 1.0),
}
PUMPS = {"c": "C", "python": "Python"}


def figure(key: str, title: str, unit: str, better: str, values: list, who: str = "") -> dict:
    """One figure of one test: its samples (one per run) and what they are."""
    assert better in ("higher", "lower"), better
    return {"key": key, "title": title, "unit": unit, "better": better,
            "values": [float(v) for v in values], "who": who}


def tunnel_figures(runs: list[dict]) -> list[dict]:
    """A tunnel's figures from ``TunnelFigures.runs`` (one dict per run); a
    measure a tunnel does not take (or that failed every run) is left out."""
    out = []
    for key, (title, unit, better) in TUNNEL_FIGURES.items():
        values = [run[key] for run in runs if run.get(key) is not None]
        if values:
            out.append(figure(key, title, unit, better, values))
    return out


def micro_figures(rates: dict) -> list[dict]:
    """The pump micro benchmark's figures from ``{"c" | "python": [Rate, ...]}``;
    the pumps alternate run after run, so run i of each makes one C / Python sample."""
    out = []
    for name, runs in rates.items():
        for field, (title, unit, better, scale) in MICRO_FIGURES.items():
            out.append(figure(field, title, unit, better,
                              [getattr(r, field) * scale for r in runs], who=PUMPS[name]))
    c, py = rates.get("c"), rates.get("python")
    if c and py:
        out.append(figure("c_over_python", "pump rate, C / Python", "×", "higher",
                          [a.pps / b.pps for a, b in zip(c, py) if b.pps]))
    return out


def group(fig: dict) -> str:
    return f"{fig['title']}, {fig['unit']} ({fig['better']} is better)"


def stats(values: list[float]) -> dict:
    """pytest-benchmark's statistics of ``values``, computed by its own
    ``Stats`` class, as its JSON holds them (``data``: the samples)."""
    s = Stats()
    for value in values:
        s.update(value)
    out = s.as_dict()
    out.update(data=list(values), iterations=1)
    return out


def _entry(group_name: str, name: str, fullname: str, params, param, extra: dict,
           values: list[float]) -> dict:
    return {"group": group_name, "name": name, "fullname": fullname, "params": params,
            "param": param, "extra_info": extra, "options": {}, "stats": stats(values)}


def json_entries(benchmarks: list[dict], results: Results | None = None) -> list[dict]:
    """The JSON's entries: one per figure of each benchmark (``as_dict()`` of
    pytest-benchmark's entries, with ``extra_info["figures"]``), then one per
    ratio of ``results`` that has a value."""
    out = []
    for bench in benchmarks:
        info = dict(bench.get("extra_info") or {})
        figures = info.pop("figures", [])
        # The samples are the entry's stats; the other figures have entries of their own.
        for key in ("medians", "runs"):
            info.pop(key, None)
        for fig in figures:
            if not fig["values"]:
                continue
            suffix = f" {fig['who']}" if fig["who"] else ""
            extra = dict(info, figure=fig["key"], title=fig["title"], unit=fig["unit"],
                         better=fig["better"], who=fig["who"])
            out.append(_entry(group(fig), bench["name"] + suffix,
                              f"{bench['fullname']}::{fig['key']}{suffix.replace(' ', '::')}",
                              bench.get("params"), bench.get("param"), extra, fig["values"]))
    for ratio in ratios(results) if results is not None else []:
        if ratio.value is None:
            continue
        extra = {"figure": "ratio", "title": ratio.name, "unit": ratio.unit, "target": ratio.target,
                 "met": ratio.met, "rows": ratio.detail}
        out.append(_entry("ratios within the run (extra_info: target)", ratio.name,
                          f"ratio::{ratio.name}", None, None, extra, [ratio.value]))
    return out
