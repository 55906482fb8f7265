"""The throughput suite: ``pytest --benchmark`` (the root conftest.py turns
it on; a plain ``pytest`` never collects it).

    tunnels.py      one class per tunnel kind (start/stop), the tunrelay variants table
    measure.py      iperf3, ping and /proc CPU measurements, medians over runs
    report.py       the side-by-side table, ratios, RESULTS.md and the chart
    figures.py      the figures as pytest-benchmark JSON entries (pytest-benchmark compare)
    plugin.py       session wiring: settings, results, end-of-run outputs
    loadgen.py      the C-speed packet generator for the pump micro benchmark
    test_micro.py   pump packets/s over socketpairs, compiled vs Python (no root)
    test_tunnels.py every tunnel measured in one session (root)
    test_report.py  checks of the suite's own parsing and reporting
"""
