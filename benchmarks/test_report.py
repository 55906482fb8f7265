"""Checks of the suite's own parsing and reporting (fast, no root), so a
changed iperf3 or ping output fails here rather than as a blank table."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from benchmarks import figures, measure, report
from benchmarks.report import MicroRow, Results, TunnelRow

IPERF_TCP = {"end": {"sum_sent": {"bytes": 2_067_267_584, "bits_per_second": 8.24e9},
                     "sum_received": {"seconds": 2.01, "bytes": 2_066_481_152,
                                      "bits_per_second": 8.22e9}}}
IPERF_UDP = {"end": {"sum_received": {"seconds": 2.0, "bytes": 8_130_176, "packets": 231_250,
                                      "lost_packets": 104_216, "lost_percent": 45.07}}}
PING = """--- 10.99.0.1 ping statistics ---
20 packets transmitted, 20 received, 0% packet loss, time 329ms
rtt min/avg/max/mdev = 0.034/0.048/0.087/0.010 ms
"""


def test_iperf3_parsing() -> None:
    assert measure.tcp_result(measure.parse_iperf3(json.dumps(IPERF_TCP))) == (8.22, 2_066_481_152)
    pps, loss = measure.udp_result(measure.parse_iperf3(json.dumps(IPERF_UDP)))
    assert pps == pytest.approx((231_250 - 104_216) / 2.0) and loss == 45.07


def test_iperf3_error_is_reported() -> None:
    # iperf3 -J exits 0 on failure, with the reason in "error".
    with pytest.raises(measure.MeasureError, match="unable to connect"):
        measure.parse_iperf3(json.dumps({"end": {}, "error": "unable to connect to server"}))
    with pytest.raises(measure.MeasureError, match="no JSON"):
        measure.parse_iperf3("iperf3: error")


def test_ping_parsing() -> None:
    assert measure.parse_ping_us(PING) == pytest.approx(48.0)
    assert measure.parse_ping_us(PING, "max") == pytest.approx(87.0)
    assert measure.parse_ping_us(PING, "min") == pytest.approx(34.0)
    with pytest.raises(measure.MeasureError):
        measure.parse_ping_us("20 packets transmitted, 0 received, 100% packet loss")


def _results() -> Results:
    results = Results(seconds=1, runs=1)
    figures = {"vxlan": (10.0, 40.0, 100.0, 60.0, None), "tunrelay": (6.0, 5.0, 200.0, 90.0, 2.0),
               "python": (0.9, 0.8, 50.0, 280.0, 13.0), "openvpn": (0.8, 0.9, 58.0, 180.0, 13.5)}
    for kind, (tcp1, tcp4, kpps, rtt, cpu) in figures.items():
        results.tunnels.append(TunnelRow(kind, kind, medians={
            "tcp1_gbps": tcp1, "tcp4_gbps": tcp4, "udp64_kpps": kpps, "udp64_loss_pct": 1.0,
            "ping_rtt_us": rtt, "cpu_s_per_gb": cpu}))
    results.tunnels.append(TunnelRow("tunrelay q=2", "tunrelay", "skipped", "not supported"))
    pump = {"syscalls_per_packet": 1.0, "backlog": 1.0, "user_us_per_packet": 0.1,
            "sys_us_per_packet": 1.0}
    results.micro.append(MicroRow("egress", 64, {"c": dict(pump, pps=1e6),
                                                 "python": dict(pump, pps=2e5)}))
    return results


def test_ratios() -> None:
    found: dict = {}
    for r in report.ratios(_results()):  # the first of each kind: tunrelay (raw) against others
        found.setdefault(r.name.split(":")[0], r)
    by_name = {r.name: r for r in report.ratios(_results())}
    assert found["TCP 1 stream"].value == pytest.approx(0.6) and found["TCP 1 stream"].met is False
    assert found["UDP 64 B pps"].value == pytest.approx(2.0) and found["UDP 64 B pps"].met
    assert by_name["UDP 64 B pps: tunrelay best / naive Python relay"].value == pytest.approx(4.0)
    assert found["ping rtt"].value == pytest.approx(1.5) and found["ping rtt"].met
    assert by_name["ping rtt: tunrelay best / OpenVPN"].value == pytest.approx(0.5)
    assert by_name["ping rtt: tunrelay best / OpenVPN"].met
    assert found["CPU per GB"].value == pytest.approx(2.0 / 13.5)
    assert found["pump over socketpairs, 64 B egress"].value == pytest.approx(5.0)
    assert found["pump over socketpairs, 64 B egress"].met is False


def test_loop_levers_are_held_to_the_row_without_them() -> None:
    results = _results()
    row = lambda label, rtt, kpps: TunnelRow(label, "tunrelay-loop", medians={  # noqa: E731
        "ping_rtt_us": rtt, "udp64_kpps": kpps})
    results.tunnels += [TunnelRow(report.POINT_TO_POINT, "tunrelay", medians={
        "ping_rtt_us": 150.0, "udp64_kpps": 100.0}),
        row(report.SPLIT_LOOPS, 300.0, 80.0), row(report.BUSY_POLL, 120.0, 90.0)]
    by_name = {r.name: r for r in report.ratios(results)}
    split = by_name["ping rtt: one thread per queue / a thread per direction"]
    assert split.value == pytest.approx(0.5) and split.met is None
    assert by_name["UDP 64 B pps: one thread per queue / a thread per direction"].value == \
        pytest.approx(1.25)
    assert by_name[f"ping rtt: busy polling {report.BUSY_POLL_US} µs / none"].value == \
        pytest.approx(0.8)
    assert by_name["TCP 1 stream: one thread per queue / a thread per direction"].value is None


def test_issue_8_ratios_hold_rows_to_the_point_to_point_row() -> None:
    results = _results()
    row = lambda label, kind, tcp1, cpu: TunnelRow(label, kind, medians={  # noqa: E731
        "tcp1_gbps": tcp1, "cpu_s_per_gb": cpu})
    # A faster tunrelay row of another label must not be the reference.
    results.tunnels += [row(report.POINT_TO_POINT, "tunrelay", 8.0, 1.0),
                        row("tunrelay udp offload=on q=2", "tunrelay", 9.0, 1.2),
                        row("one table", "tunrelay-peers", 7.8, 1.1),
                        row("hub", "tunrelay-hub", 3.6, 2.4)]
    found = {r.name: r for r in report.ratios(results)}
    table = found["TCP 1 stream: one [[peer]] table / [transport] peer"]
    assert table.value == pytest.approx(7.8 / 8.0) and table.met
    assert table.detail == f"one table vs {report.POINT_TO_POINT}"
    hub = found["TCP 1 stream: hub spoke to spoke / point-to-point"]
    assert hub.value == pytest.approx(0.45) and hub.met is False
    cpu = found["CPU per GB: hub's 3 relays / point-to-point's 2"]
    assert cpu.value == pytest.approx(2.4) and cpu.met is None
    # Without the rows (an older build, a filtered run): no figure, no verdict.
    for r in report.ratios(_results()):
        if "[[peer]]" in r.name or "hub" in r.name:
            assert r.value is None and r.met is None and "no " in r.detail


def test_results_md_keeps_the_hand_written_part(tmp_path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text(f"# title\nmine above\n{report.BEGIN}\nold table\n{report.END}\nmine below\n")
    report.write_results_md(_results(), chart=False, path=path)
    report.write_results_md(_results(), chart=False, path=path)
    text = path.read_text()
    assert text.startswith("# title\nmine above\n") and text.endswith(f"{report.END}\nmine below\n")
    assert "old table" not in text and text.count(report.BEGIN) == 1
    assert "| tunrelay q=2 | skipped |" in text
    # Each markdown table has the same number of cells on every line.
    tables, table = [], set()
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            table.add(line.count("|"))
        elif table:
            tables.append(table)
            table = set()
    assert len(tables) == 3 and all(len(widths) == 1 for widths in tables), tables


def test_summary_text_lists_every_row() -> None:
    text = report.summary_text(_results())
    for label in ("vxlan", "openvpn", "tunrelay q=2", "egress"):
        assert label in text


def test_issue_10_nagle_rows_are_held_to_1_ms() -> None:
    results = _results()
    results.tunnels += [
        TunnelRow(report.NAGLE_LEN16, "tunrelay-nagle",
                  medians={"ping_rtt_us": 310.0, "ping_burst_us": 450.0}),
        TunnelRow(report.NAGLE_OPENVPN, "tunrelay-nagle",
                  medians={"ping_rtt_us": 240.0, "ping_burst_us": 42_600.0})]
    found = {r.name: r for r in report.ratios(results)}
    lone = found[f"ping rtt, ms: {report.NAGLE_LEN16}"]
    assert lone.value == pytest.approx(0.31) and lone.met and lone.target.startswith("≤ 1 ms")
    stalled = found[f"slowest reply of a 4-ping burst, ms: {report.NAGLE_OPENVPN}"]
    assert stalled.value == pytest.approx(42.6) and stalled.met is False
    # The Nagle rows are no tunrelay row of the other targets.
    assert found["ping rtt: tunrelay best / kernel vxlan"].value == pytest.approx(1.5)
    # Without the rows (a filtered run, no openvpn): no figure, no verdict.
    nagle = [r for r in report.ratios(_results()) if r.target == report.NAGLE_TARGET]
    assert len(nagle) == 4 and all(r.value is None and r.met is None for r in nagle)


def test_a_tunnel_is_measured_only_for_its_measures(monkeypatch) -> None:
    taken = []
    monkeypatch.setattr(measure, "ping_rtt_us", lambda bed, ip: taken.append("ping") or 300.0)
    monkeypatch.setattr(measure, "ping_burst_us", lambda bed, ip: taken.append("burst") or 400.0)
    monkeypatch.setattr(measure, "iperf3", lambda *a: pytest.fail("iperf3 was run"))
    # Asked in another order: taken in MEASURES order, idle tunnel first.
    figures = measure.measure_tunnel(None, "10.99.0.1", [], 1.0, 2, ("ping burst", "ping"))
    assert taken == ["ping", "burst"] * 2 and not figures.errors
    assert figures.medians["ping_burst_us"] == 400.0 and figures.medians["tcp1_gbps"] is None
    with pytest.raises(ValueError, match="unknown measures"):
        measure.measure_once(None, "10.99.0.1", [], 1.0, ("ping", "pnig"))


def test_targets_state_the_target_not_an_issue() -> None:
    results = _results()
    results.tunnels += [TunnelRow(report.NAGLE_LEN16, "tunrelay-nagle",
                                  medians={"ping_rtt_us": 310.0, "ping_burst_us": 450.0})]
    targets = {r.target for r in report.ratios(results)}
    assert len(targets) > 10
    for target in targets:
        assert "issue" not in target.lower(), target
        if target[0] in "≥≤<>":   # a number, then what it means
            assert ": " in target and len(target.split(": ", 1)[1]) > 5, target
    text = report.generated_markdown(results, chart=False)
    assert "(issue" not in text and "issues " not in text


def _bench(name: str, runs: list[dict]) -> dict:
    """An entry as pytest-benchmark's JSON holds it (``as_dict()``), timing stats and all."""
    return {"group": "tunnels", "name": f"test_tunnel[{name}]",
            "fullname": f"benchmarks/test_tunnels.py::test_tunnel[{name}]",
            "params": {"tunnel": name}, "param": name, "options": {},
            "extra_info": {"tunnel": name, "kind": name, "runs": runs,
                           "figures": figures.tunnel_figures(runs)},
            "stats": {"min": 7.1, "max": 7.1, "mean": 7.1, "median": 7.1, "rounds": 1}}


def test_the_json_carries_the_figures() -> None:
    runs = [{"tcp1_gbps": 6.0, "ping_rtt_us": 90.0, "cpu_s_per_gb": 2.0},
            {"tcp1_gbps": 5.0, "ping_rtt_us": 80.0, "cpu_s_per_gb": 2.5},
            {"tcp1_gbps": 7.0, "ping_rtt_us": 95.0, "cpu_s_per_gb": 1.5}]
    entries = figures.json_entries([_bench("tunrelay", runs)], _results())
    by_figure = {e["extra_info"]["figure"]: e for e in entries if e["extra_info"]["figure"] != "ratio"}
    # Only the measures taken, one entry each; no timing entry is left.
    assert set(by_figure) == {"tcp1_gbps", "ping_rtt_us", "cpu_s_per_gb"}
    tcp = by_figure["tcp1_gbps"]
    assert tcp["group"] == "TCP 1 stream, Gbit/s (higher is better)"
    assert tcp["name"] == "test_tunnel[tunrelay]"
    assert tcp["fullname"] == "benchmarks/test_tunnels.py::test_tunnel[tunrelay]::tcp1_gbps"
    assert tcp["stats"]["data"] == [6.0, 5.0, 7.0] and tcp["stats"]["rounds"] == 3
    assert (tcp["stats"]["median"], tcp["stats"]["min"], tcp["stats"]["max"]) == (6.0, 5.0, 7.0)
    assert tcp["extra_info"]["unit"] == "Gbit/s" and tcp["extra_info"]["tunnel"] == "tunrelay"
    assert "runs" not in tcp["extra_info"] and "figures" not in tcp["extra_info"]
    assert by_figure["ping_rtt_us"]["extra_info"]["better"] == "lower"
    # The ratios of the run, with their targets; a ratio without a value has no entry.
    ratios = {e["name"]: e for e in entries if e["extra_info"]["figure"] == "ratio"}
    vxlan = ratios["TCP 1 stream: tunrelay best / kernel vxlan"]
    assert vxlan["stats"]["median"] == pytest.approx(0.6)
    assert vxlan["extra_info"]["target"].startswith("≥ 0.8") and vxlan["extra_info"]["met"] is False
    assert all(r.value is not None for r in report.ratios(_results()) if r.name in ratios)
    assert len({e["fullname"] for e in entries}) == len(entries)
    json.dumps(entries)


def test_micro_figures_pair_the_runs() -> None:
    rate = lambda pps: types.SimpleNamespace(  # noqa: E731
        pps=pps, user_us_per_packet=0.5, sys_us_per_packet=1.5, syscalls_per_packet=1.0)
    found = figures.micro_figures({"c": [rate(1e6), rate(9e5)], "python": [rate(2e5), rate(1e5)]})
    by = {(f["key"], f["who"]): f for f in found}
    assert by[("pps", "C")]["values"] == [1000.0, 900.0] and by[("pps", "C")]["unit"] == "kpps"
    assert by[("c_over_python", "")]["values"] == [5.0, 9.0]
    bench = {"name": "test_pump_pps[egress-64B]", "fullname": "m.py::test_pump_pps[egress-64B]",
             "extra_info": {"figures": found}}
    names = {e["name"] for e in figures.json_entries([bench])}
    assert "test_pump_pps[egress-64B] Python" in names and "test_pump_pps[egress-64B]" in names


def test_pytest_benchmark_compare_shows_two_runs_figures(tmp_path) -> None:
    """What the README says to run: ``pytest-benchmark compare --between``
    on two runs' JSON, from the repository (for conftest.py's unit hook)."""
    for name, tcp, cpu in (("0001_before", 5.0, 0.8), ("0002_after", 6.0, 0.4)):
        entries = figures.json_entries([_bench("tunrelay", [{"tcp1_gbps": tcp, "cpu_s_per_gb": cpu}])])
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"machine_info": {}, "commit_info": {}, "benchmarks": entries, "version": "5"}))
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "pytest_benchmark", "compare", "--between", "median",
                           "--group-by", "group", str(tmp_path / "0001_before.json"),
                           str(tmp_path / "0002_after.json")],
                          check=False, cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "TCP 1 stream, Gbit/s (higher is better)" in out
    assert "5.0000" in out and "6.0000" in out and "+20.0%" in out
    # CPU s/GB as recorded (0.8), not rescaled as if it were seconds (800 ms).
    assert "0.8000" in out and "0.4000" in out and "-50.0%" in out and "800.0000" not in out


@pytest.mark.parametrize("option", ["--benchmark-compare", "--benchmark-compare-fail=min:5%",
                                    "--benchmark-histogram"])
def test_in_run_timing_comparisons_are_refused(option) -> None:
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--benchmark",
                           option, "--collect-only", "-q", "benchmarks/test_report.py"],
                          check=False, cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 4, done.stdout + done.stderr
    assert "pytest-benchmark compare" in done.stderr and option.split("=")[0] in done.stderr
