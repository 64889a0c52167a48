#!/usr/bin/env python3
"""Where a migration's workload penalty goes, from the demo's own reports.

Reads `strait demo --json` reports (one per line, as bench/downtime-ab.sh and
bench/migration.sh record them) and splits the heartbeats each run lost, against its own
rate before `migrate`, into:

- copy: the disk phase and the memory phase while no throttle was applied (the guest
  shares the host core's time with the copy: on this machine the engines, the emulator and
  both QEMUs' main loops are on the core the guest's I/O completes on);
- throttle: the memory phase while a throttle was applied;
- stop: from the VM's stop to the migration's end (the downtime, and the source's wait).

    bench/penalty-split.py bench/results/downtime-ab-A-B.jsonl [more.jsonl ...]

Prints one markdown table: a row per run, then the medians per variant. The heartbeat
bins are 0.25 s wide, so a window's rate is good to about a bin at each end.
"""

import json
import statistics
import sys


def phase_windows(report):
    """(name, start_s, end_s) of each phase, seconds from `migrate`."""
    return [
        (p["phase"], p["start_s"], p["start_s"] + p["duration_s"])
        for p in report["migration"]["phases"]
    ]


def throttled_spans(report, start_s, end_s):
    """The spans within [start_s, end_s) in which the applied throttle was above 0 (each
    timeline sample holds until the next)."""
    cols = report["timeline"]["columns"]
    rows = report["timeline"]["rows"]
    t_i, a_i = cols.index("t_s"), cols.index("applied_throttle_pct")
    spans = []
    for row, nxt in zip(rows, rows[1:] + [None]):
        until = nxt[t_i] if nxt else end_s
        lo, hi = max(row[t_i], start_s), min(until, end_s)
        if row[a_i] and row[a_i] > 0 and hi > lo:
            spans.append((lo, hi))
    return spans


def beats(bins, t0, t1):
    """Source heartbeats in [t0, t1), prorating the bins at the edges."""
    width, start = bins["bin_s"], bins["start_s"]
    total = 0.0
    for i, n in enumerate(bins["source"]):
        lo, hi = start + i * width, start + (i + 1) * width
        overlap = max(0.0, min(hi, t1) - max(lo, t0))
        total += n * overlap / width
    return total


def split(report):
    bins = report["heartbeat_bins"]
    windows = phase_windows(report)
    before_s = -bins["start_s"]
    rate = beats(bins, bins["start_s"], 0.0) / before_s
    by = {name: (a, b) for name, a, b in windows}
    mem = by.get("memory")
    stop_at = by.get("switchover", (None,))[0]
    end = windows[-1][2]
    if mem is None or stop_at is None:
        return None
    spans = throttled_spans(report, mem[0], mem[1])
    throttled_s = sum(b - a for a, b in spans)
    throttled_beats = sum(beats(bins, a, b) for a, b in spans)
    copy_s = stop_at - throttled_s
    copy_beats = beats(bins, 0.0, stop_at) - throttled_beats
    stop_beats = beats(bins, stop_at, end)
    lost = {
        "copy": rate * copy_s - copy_beats,
        "throttle": rate * throttled_s - throttled_beats,
        "stop": rate * (end - stop_at) - stop_beats,
    }
    expected = rate * end
    return {
        "variant": report.get("variant", report.get("system", "?")),
        "before_per_s": rate,
        "copy_per_s": copy_beats / copy_s if copy_s > 0 else None,
        "throttled_s": throttled_s,
        "total_s": end,
        "penalty_pct": 100 * sum(lost.values()) / expected,
        **{f"{k}_pct": 100 * v / expected for k, v in lost.items()},
        "cpu_taken_s": report["throttle"].get("integral_pct_s", 0) / 100,
    }


def main(paths):
    runs = []
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                report = json.loads(line)
                if report.get("passed") and report.get("system") == "strait":
                    s = split(report)
                    if s:
                        runs.append(s)
    if not runs:
        sys.exit("no passed strait runs with phases and heartbeat bins in " + " ".join(paths))
    cols = ["before_per_s", "copy_per_s", "total_s", "throttled_s", "cpu_taken_s",
            "penalty_pct", "copy_pct", "throttle_pct", "stop_pct"]
    print("| variant | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    fmt = lambda v: "-" if v is None else f"{v:.1f}"
    for r in runs:
        print(f"| {r['variant']} | " + " | ".join(fmt(r[c]) for c in cols) + " |")
    for variant in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == variant]
        med = {c: statistics.median([r[c] for r in mine if r[c] is not None] or [0]) for c in cols}
        print(f"| **{variant}, median of {len(mine)}** | "
              + " | ".join(fmt(med[c]) for c in cols) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
