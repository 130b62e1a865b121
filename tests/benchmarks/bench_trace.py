"""Trace benchmark: edgeprobe's trace probe against Debian's traceroute on the routed lab.

Run as root from the repository root (``./run.sh bench trace`` does exactly this)::

    .venv/bin/python -m tests.benchmarks.bench_trace [--out FILE] [--queries N] [--runs N]

Lab: ``tests/support/tracelab.py`` (client, r1, r2a|r2b, r3 silent, a 5 ms-each-way emulated link,
r4, server). Prints three tables and writes the figures to ``--out`` as JSON:

1. **hops**: the hop list of ``edgeprobe trace`` and ``traceroute -n`` side by side, per method
   (``-I``, ``-U``, ``-T``).
2. **rtt**: per-hop RTT medians over ``--queries`` (≥ 20) queries at the hops behind the delayed
   link, edgeprobe vs traceroute (traceroute allows 10 queries per run: several runs are pooled).
3. **ecmp**: with r1 splitting over r2a/r2b (L4 hash), how many runs of ``--runs`` saw more than
   one address at hop 2: Paris (edgeprobe), classic (edgeprobe ``paris: false``), traceroute.
4. **cpu**: CPU seconds per trace (process time of the run, scapy already imported) for a whole
   trace per method, next to traceroute's (user + sys of the process).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tests.support.netlab import lab_problem
from tests.support.tracelab import SERVER, TraceLab, parse_traceroute, sweep, traceroute_rtts

FLAG = {"icmp": "-I", "udp": "-U", "tcp": "-T"}
DELAY_MS = 5.0


def ours(lab: TraceLab, config: dict[str, Any], runs: int = 1) -> list[dict[str, Any]]:
    proc = lab.python("c", "-m", "tests.support.tracerun", SERVER, json.dumps(config), "--runs", str(runs))
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return [json.loads(line) for line in proc.stdout.splitlines()]


def traceroute(lab: TraceLab, *args: str) -> tuple[str, float]:
    """The output and the CPU seconds (user + sys) traceroute took."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = lab.run("c", ["traceroute", "-n", *args, SERVER])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc.stdout, cpu


def fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    print(f"\n{title}")
    widths = [max(len(h), *(len(fmt(r[i])) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(fmt(v).ljust(w) for v, w in zip(row, widths, strict=True)))


def bench_hops(lab: TraceLab) -> list[list[Any]]:
    lab.set_ecmp(False)
    rows = []
    for method, flag in FLAG.items():
        text, _ = traceroute(lab, flag, "-w", "1")
        theirs = parse_traceroute(text)
        (run,) = ours(lab, {"method": method, "timeout_s": 0.5})
        for hop, their in zip(run["hops"], theirs, strict=False):
            found = sorted({a for a in their if a}) or ["*"]
            rows.append(
                [method, hop["ttl"], hop["address"] or "*", " ".join(found), (hop["address"] or "*") == found[0]]
            )
    table("1. hop lists (edgeprobe trace vs traceroute -n)", ["method", "ttl", "edgeprobe", "traceroute", "same"], rows)
    return rows


def bench_rtt(lab: TraceLab, queries: int) -> list[list[Any]]:
    lab.set_ecmp(False)
    rows = []
    for method, flag in FLAG.items():
        pooled: list[list[float | None]] = []
        for _ in range(-(-queries // 10)):
            got = traceroute_rtts(traceroute(lab, flag, "-f", "4", "-q", "10", "-w", "1")[0])
            pooled = got if not pooled else [a + b for a, b in zip(pooled, got, strict=True)]
        (run,) = ours(lab, {"method": method, "first_ttl": 4, "queries": queries, "timeout_s": 1.0})
        for hop, their in zip(run["hops"], pooled, strict=True):
            mine = [r for r in hop["rtts_ms"] if r is not None]
            other = [r for r in their if r is not None]
            m, o = statistics.median(mine), statistics.median(other)
            rows.append([method, hop["ttl"], len(mine), len(other), m, o, m - o])
    table(
        f"2. RTT medians behind the {DELAY_MS:g} ms (one way) link, ms",
        ["method", "ttl", "n ours", "n tr", "edgeprobe", "traceroute", "delta"],
        rows,
    )
    return rows


def bench_ecmp(lab: TraceLab, runs: int) -> list[list[Any]]:
    lab.set_ecmp(True)
    rows = []
    try:
        for method in ("udp", "tcp"):
            for paris in (True, False):
                got = ours(lab, {"method": method, "queries": 6, "timeout_s": 0.5, "paris": paris}, runs=runs)
                seen = [tuple(sorted(r["hops"][1]["addresses"])) for r in got]
                mixed = sum(len(s) > 1 for s in seen)
                paths = sorted({r["path_id"] for r in got})
                name = "edgeprobe paris" if paris else "edgeprobe classic"
                rows.append([method, name, runs, mixed, len(paths), " ".join(sorted({a for s in seen for a in s}))])
            seen_tr = []
            for _ in range(runs):
                text, _ = traceroute(lab, FLAG[method], "-q", "6", "-w", "0.5")
                seen_tr.append(tuple(sorted({a for a in parse_traceroute(text)[1] if a})))
            mixed = sum(len(s) > 1 for s in seen_tr)
            addresses = " ".join(sorted({a for s in seen_tr for a in s}))
            rows.append([method, f"traceroute {FLAG[method]}", runs, mixed, "-", addresses])
    finally:
        lab.set_ecmp(False)
    table(
        "3. ECMP at hop 2 (r2a 10.91.2.2 | r2b 10.91.3.2), 6 queries per hop",
        ["method", "tool", "runs", "runs mixing paths", "path ids", "hop-2 addresses seen"],
        rows,
    )
    return rows


def bench_cpu(lab: TraceLab, runs: int) -> list[list[Any]]:
    lab.set_ecmp(False)
    rows = []
    for method, flag in FLAG.items():
        got = ours(lab, {"method": method, "timeout_s": 0.5}, runs=runs)
        cpu = statistics.median(r["cpu_s"] for r in got)
        sent = statistics.median(r["sent"] for r in got)
        theirs = statistics.median(traceroute(lab, flag, "-w", "0.5")[1] for _ in range(runs))
        rows.append([method, sent, 1000 * cpu, 1000 * cpu / sent, 1000 * theirs])
    table(
        "4. CPU per trace (median of runs; edgeprobe: the run's process time, scapy imported before)",
        ["method", "probes sent", "edgeprobe ms", "edgeprobe ms/probe", "traceroute ms (whole process)"],
        rows,
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="trace probe vs traceroute on the routed lab (needs root)")
    parser.add_argument("--out", default="bench-results/trace.json")
    parser.add_argument("--queries", type=int, default=20, help="queries per hop for the RTT comparison (>= 20)")
    parser.add_argument("--runs", type=int, default=10, help="runs for the ECMP and CPU figures")
    args = parser.parse_args(argv)
    problem = lab_problem()
    if problem is not None:
        print(f"bench_trace: {problem}", file=sys.stderr)
        return 2
    sweep()
    started = time.monotonic()
    with TraceLab() as lab:
        lab.set_delay(DELAY_MS)
        results = {
            "hops": bench_hops(lab),
            "rtt": bench_rtt(lab, args.queries),
            "ecmp": bench_ecmp(lab, args.runs),
            "cpu": bench_cpu(lab, args.runs),
            "kernel": os.uname().release,
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\n{time.monotonic() - started:.0f} s; figures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
