#!/usr/bin/env python3
"""Summarize run.sh output: per (size, mode) medians/ranges and per-round zc/copy ratios."""
import statistics as st
import sys
from collections import defaultdict


def parse(path):
    rows = []  # (round, send dict, recv dict)
    rnd, send = None, None
    for line in open(path):
        line = line.strip()
        if line.startswith("round="):
            rnd = int(line.split("=")[1])
        elif line.startswith("role="):
            d = dict(kv.split("=", 1) for kv in line.split())
            if d["role"] == "send":
                send = d
            else:
                rows.append((rnd, send, d))
    return rows


def metrics(s, r):
    return {
        "send GB/s": float(s["gbps"]),
        "recv GB/s": float(r["gbps"]),
        "send task s/GB": float(s["cpu_s_per_gb"]),
        "send task+softirq s/GB": float(s["task_plus_softirq_s_per_gb"]),
        "recv task s/GB": float(r["cpu_s_per_gb"]),
        "recv drop %": 100.0 * int(r["sock_drops"]) / max(1, int(s["msgs"])),
    }


def fmt(xs):
    return f"{st.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


def main(path):
    rows = parse(path)
    by = defaultdict(dict)  # (len, round) -> mode -> metrics
    extra = defaultdict(lambda: defaultdict(int))
    for rnd, s, r in rows:
        by[(int(s["len"]), rnd)][s["mode"]] = metrics(s, r)
        if s["mode"] == "zerocopy":
            e = extra[int(s["len"])]
            for k in ("zc_seq", "zc_completions", "zc_ranges", "zc_copied_ranges",
                      "zc_notcopied_ranges", "zc_waits", "zc_enobufs"):
                e[k] += int(s[k])
    sizes = sorted({k[0] for k in by})
    names = list(next(iter(by.values()))["copy"].keys())
    for ln in sizes:
        rounds = sorted(rd for (size, rd) in by if size == ln and len(by[(size, rd)]) == 2)
        print(f"\n### msg {ln} B, {len(rounds)} rounds: median (min-max)\n")
        print("| metric | copy | zerocopy | zerocopy/copy per round |")
        print("|---|---|---|---|")
        for m in names:
            c = [by[(ln, rd)]["copy"][m] for rd in rounds]
            z = [by[(ln, rd)]["zerocopy"][m] for rd in rounds]
            ratio = [zz / cc for zz, cc in zip(z, c) if cc > 0]
            rs = fmt(ratio) if ratio else "-"
            print(f"| {m} | {fmt(c)} | {fmt(z)} | {rs} |")
        print("\nzerocopy completions (all rounds): " +
              " ".join(f"{k}={v}" for k, v in extra[ln].items()))


if __name__ == "__main__":
    main(sys.argv[1])
