"""Exploration: tunrelay variants (config overrides) beside vxlan, interleaved rounds.
python explore.py ROUNDS SECONDS METRICS NAME=PROTO:table.key=value;table.key=value ..."""
import json
import statistics
import sys

from benchmarks import measure
from benchmarks.tunnels import KernelVxlan, OpenVPN, Tunrelay
from tunrelay.testrig.netns import Testbed

rounds, seconds, metrics = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3].split(",")
rows = []
for spec in sys.argv[4:]:
    name, rest = spec.split("=", 1)
    if name == "vxlan":
        rows.append((name, lambda: KernelVxlan("kernel vxlan")))
        continue
    if name == "openvpn":
        rows.append((name, lambda: OpenVPN("openvpn")))
        continue
    proto, _, sets = rest.partition(":")
    overrides = {"relay": ["offload = true"], "device": ["queues = 1"]}
    for item in filter(None, sets.split(";")):
        key, value = item.split("=", 1)
        table, key = key.split(".")
        overrides.setdefault(table, [])
        overrides[table] = [line for line in overrides[table] if not line.startswith(key + " ")] + [f"{key} = {value}"]
    rows.append((name, lambda proto=proto, o=overrides, name=name: Tunrelay(name, proto, o)))
res = {name: {m: [] for m in metrics} for name, _ in rows}
for r in range(rounds):
    order = rows[r % len(rows):] + rows[:r % len(rows)]
    for name, make in order:
        t = make()
        with Testbed() as bed:
            try:
                t.start(bed)
                measure.wait_for_ping(bed, t.server_ip)
                pids = t.pids()
                for m in metrics:
                    try:
                        if m == "ping":
                            res[name][m].append(measure.ping_rtt_us(bed, t.server_ip))
                        elif m == "udp64":
                            pps, loss = measure.udp_result(
                                measure.iperf3(bed, t.server_ip, seconds, "-u", "-l", "64", "-b", "0"))
                            res[name][m].append(pps / 1e3)
                        elif m == "tcp1":
                            before = measure.cpu_seconds(pids) if pids else 0
                            gbps, moved = measure.tcp_result(measure.iperf3(bed, t.server_ip, seconds))
                            res[name][m].append(gbps)
                            if pids:
                                res[name].setdefault("cpu", []).append(
                                    (measure.cpu_seconds(pids) - before) / (moved / 1e9))
                    except Exception as e:
                        print(name, m, "error", e, file=sys.stderr)
            finally:
                t.stop()
    print(f"round {r+1} done", file=sys.stderr)
print("| row | " + " | ".join(metrics + ["cpu"]) + " |")
for name, _ in rows:
    cells = []
    for m in metrics + ["cpu"]:
        v = res[name].get(m) or []
        cells.append(f"{statistics.median(v):.2f} ({min(v):.1f}-{max(v):.1f})" if v else "-")
    print(f"| {name} | " + " | ".join(cells) + " |")
print(json.dumps(res), file=sys.stderr)
