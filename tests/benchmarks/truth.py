"""Measurement-truth benchmarks: edgeprobe against known truth and against ping, curl and fping.

Run as root from the repository root (``./run.sh bench`` does exactly this)::

    .venv/bin/python -m tests.benchmarks.truth [--out FILE] [--only icmp,jitter,loss,http,load] [--quick]

Everything runs in a lab of network namespaces (``tests/support/netlab.py``) joined by an emulated link
(netem, or the userspace emulator ``tests/support/linkemu.py`` that logs each frame's true holding
time). Prints a table per benchmark and writes every figure to ``--out`` as JSON.

1. ``icmp``: one-way delay 0 (calibration), 0.5, 5, 20, 50 ms. edgeprobe and iputils ping at the
   same time on the same path. Truth per echo = what the link held that echo (its request and its
   reply, from the emulator's log) + the kernel's own path, K0, measured with ping at 0 ms.
2. ``jitter``: 20 ± 5 ms one way (uniform) each direction: median and p95 of both tools and truth.
3. ``loss``: 1 %, 10 %, 30 % on the request direction: measured loss, the Wilson 95 % interval,
   and the link's own count of dropped echoes.
4. ``http``: curl -w phases vs edgeprobe's, http:// and https:// (self-signed, curl -k), like for like
   (curl's time_connect/time_appconnect are cumulative; edgeprobe's connect_ms/tls_ms are durations).
5. ``load``: one agent process probing 1,000 loopback targets at 1,000 and 5,000 echoes/s while it
   probes the lab path; per-echo error against the link's truth; the agent's CPU and RSS; then
   fping on the same targets at its fastest allowed rate.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.benchmarks import perf_common
from tests.support.linkemu import Direction
from tests.support.measure import (
    PING_IDENT,
    echo_truth_ms,
    lost_requests,
    median,
    pct,
    ping_side_by_side,
    tcp_wire_phases,
    wilson_interval,
)
from tests.support.netlab import B4, ROOT, Lab, lab_problem, sweep_stale

Row = dict[str, Any]


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(title: str, columns: Sequence[tuple[str, str]], rows: Sequence[Row], digits: int = 3) -> str:
    """A plain-text table of ``rows`` (dicts) with ``columns`` (key, heading)."""
    return perf_common.table(title, columns, rows, digits, fmt)


def answered(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def residuals(measured: Sequence[float | None], truth: Sequence[float | None]) -> list[float]:
    """measured − truth per echo, for echoes both have (aligned by send order)."""
    return [m - t for m, t in zip(measured, truth, strict=False) if m is not None and t is not None]


# ------------------------------------------------------------------ 1. ICMP at fixed delays


def bench_icmp(lab: Lab, quick: bool) -> dict[str, Any]:
    count, interval = (50, 0.02) if quick else (200, 0.02)
    rows: list[Row] = []
    k0: float | None = None
    for delay in (0.0, 0.5, 5.0, 20.0, 50.0):
        lab.set_link(Direction(delay_ms=delay))
        run = ping_side_by_side(lab, B4, count=count, interval_s=interval)
        ep_rtts, ping_rtts = run.ep_rtts, run.ping.rtts_ms
        ep_truth, ping_truth = run.ep_truth(), run.ping_truth()
        row: Row = {
            "one_way_ms": delay,
            "configured_rtt_ms": 2 * delay,
            "n_ep": len(answered(ep_rtts)),
            "n_ping": len(answered(ping_rtts)),
            "ep_median_ms": median(answered(ep_rtts)),
            "ep_mean_ms": run.edgeprobe.get("rtt_avg_ms"),
            "ping_median_ms": median(answered(ping_rtts)),
            "ping_mean_ms": run.ping.summary_ms.get("avg"),
        }
        if run.log is not None:
            held = answered(ep_truth) + answered(ping_truth)
            late_us = sorted(r.late_ns / 1000 for r in run.log.records if not r.lost and r.tx_ns >= 0)
            row["link_held_median_ms"] = median(held)
            row["emulator_late_p50_us"] = pct(late_us, 50)
            row["emulator_late_p99_us"] = pct(late_us, 99)
            row["ep_minus_held_median_ms"] = median(residuals(ep_rtts, ep_truth))
            row["ping_minus_held_median_ms"] = median(residuals(ping_rtts, ping_truth))
            if delay == 0.0:
                k0 = row["ping_minus_held_median_ms"]
            if k0 is not None:
                row["kernel_path_k0_ms"] = k0
                row["truth_median_ms"] = median(answered(ep_truth)) + k0
                row["emulator_overhead_ms"] = row["truth_median_ms"] - 2 * delay
                row["ep_minus_truth_ms"] = row["ep_median_ms"] - row["truth_median_ms"]
                per_echo = [abs(r - k0) for r in residuals(ep_rtts, ep_truth)]
                row["ep_abs_err_p99_ms"] = pct(per_echo, 99)
        row["ep_minus_ping_median_ms"] = row["ep_median_ms"] - row["ping_median_ms"]
        if row["ep_mean_ms"] is not None and row["ping_mean_ms"] is not None:
            row["ep_minus_ping_mean_ms"] = row["ep_mean_ms"] - row["ping_mean_ms"]
        rows.append(row)
    print(
        table(
            f"1. ICMP RTT through the lab ({count} echoes every {interval * 1000:g} ms, both tools at once; ms)",
            [
                ("one_way_ms", "one-way"),
                ("truth_median_ms", "truth"),
                ("emulator_overhead_ms", "emu+kernel"),
                ("ping_median_ms", "ping p50"),
                ("ep_median_ms", "ep p50"),
                ("ep_minus_ping_median_ms", "ep-ping p50"),
                ("ping_mean_ms", "ping mean"),
                ("ep_mean_ms", "ep mean"),
                ("ep_minus_ping_mean_ms", "ep-ping mean"),
                ("ep_minus_truth_ms", "ep-truth p50"),
                ("ep_abs_err_p99_ms", "|ep-truth| p99"),
                ("emulator_late_p50_us", "emu late p50 µs"),
                ("emulator_late_p99_us", "emu late p99 µs"),
            ],
            rows,
        )
    )
    print(
        "   truth = what the link held each echo (request + reply, from its log) + K0, the kernel path "
        "measured by ping at 0 ms;\n   ping prints per-reply times at 0.1 ms resolution from 10 ms and 1 ms "
        "from 100 ms: compare means (µs) there.\n"
    )
    return {"count": count, "interval_s": interval, "rows": rows}


# ------------------------------------------------------------------ 2. jitter


def bench_jitter(lab: Lab, quick: bool) -> dict[str, Any]:
    count, interval = (200, 0.01) if quick else (2000, 0.01)
    lab.set_link(Direction(delay_ms=20, jitter_ms=5), seed=3)
    run = ping_side_by_side(lab, B4, count=count, interval_s=interval)
    rows: list[Row] = []
    series = {"edgeprobe": answered(run.ep_rtts), "ping": answered(run.ping.rtts_ms)}
    if run.log is not None:
        series["truth: link held edgeprobe's echoes"] = answered(run.ep_truth())
        series["truth: link held ping's echoes"] = answered(run.ping_truth())
    for name, values in series.items():
        rows.append(
            {
                "series": name,
                "n": len(values),
                "min": min(values),
                "p50": pct(values, 50),
                "p95": pct(values, 95),
                "max": max(values),
            }
        )
    ep = run.edgeprobe
    print(
        table(
            f"2. Jitter: 20 ± 5 ms one way each direction ({count} echoes every {interval * 1000:g} ms; ms)",
            [("series", "series"), ("n", "n"), ("min", "min"), ("p50", "p50"), ("p95", "p95"), ("max", "max")],
            rows,
        )
    )
    extra = {k: ep.get(k) for k in ("rtt_stddev_ms", "jitter_rfc3550_ms", "ipdv_mean_ms", "ipdv_p95_ms", "pdv_p95_ms")}
    print(f"   edgeprobe's jitter fields: {json.dumps(extra)}; ping mdev {run.ping.summary_ms.get('mdev')}\n")
    return {"count": count, "interval_s": interval, "rows": rows, "edgeprobe_jitter": extra}


# ------------------------------------------------------------------ 3. loss


def bench_loss(lab: Lab, quick: bool) -> dict[str, Any]:
    count, interval = (300, 0.002) if quick else (2000, 0.002)
    rows: list[Row] = []
    for p in (0.01, 0.10, 0.30):
        lab.set_link(Direction(loss_ratio=p), Direction(), seed=int(p * 1000) + 7)
        run = ping_side_by_side(lab, B4, count=count, interval_s=interval, timeout_s=1.0)
        ep = run.edgeprobe
        for tool, sent, received, dropped in (
            (
                "edgeprobe",
                ep["sent"],
                ep["received"],
                None if run.log is None else lost_requests(run.log, exclude_ident=PING_IDENT),
            ),
            (
                "ping",
                run.ping.transmitted,
                run.ping.received,
                None if run.log is None else lost_requests(run.log, PING_IDENT),
            ),
        ):
            lost = sent - received
            lo, hi = wilson_interval(lost, sent)
            rows.append(
                {
                    "configured": p,
                    "tool": tool,
                    "sent": sent,
                    "lost": lost,
                    "link_dropped": dropped,
                    "measured": lost / sent,
                    "wilson_lo": lo,
                    "wilson_hi": hi,
                    "configured_in_ci": lo <= p <= hi,
                    "exact": None if dropped is None else dropped == lost,
                }
            )
    print(
        table(
            f"3. Loss on the request direction ({count} echoes every {interval * 1000:g} ms)",
            [
                ("configured", "configured"),
                ("tool", "tool"),
                ("sent", "sent"),
                ("lost", "lost"),
                ("link_dropped", "link dropped"),
                ("measured", "measured"),
                ("wilson_lo", "Wilson95 lo"),
                ("wilson_hi", "Wilson95 hi"),
                ("configured_in_ci", "in CI"),
                ("exact", "= link"),
            ],
            rows,
            digits=4,
        )
    )
    print()
    return {"count": count, "interval_s": interval, "rows": rows}


# ------------------------------------------------------------------ 4. HTTP phases vs curl

CURL_FORMAT = "%{time_namelookup} %{time_connect} %{time_appconnect} %{time_starttransfer} %{time_total}\\n"


def _self_signed(tmp: Path) -> tuple[str, str]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
            *("-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=lab.invalid"),
            *("-addext", f"subjectAltName=IP:{B4}"),
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


def _curl_once(lab: Lab, url: str) -> dict[str, float | None]:
    proc = lab.run(lab.ns_a, ["curl", "-k", "-s", "-o", "/dev/null", "-w", CURL_FORMAT.replace("\\n", ""), url])
    dns, connect, app, start, total = (float(x) * 1000 for x in proc.stdout.split())
    return {
        "dns_ms": dns,
        "connect_ms": connect - dns,  # cumulative → duration of the TCP handshake
        "tls_ms": (app - connect) if app > 0 else None,  # 0 for http://
        "ttfb_ms": start,  # cumulative, like edgeprobe's
        "total_ms": total,
    }


class _EdgeprobeHttp:
    """An edgeprobe process in the client namespace that probes each URL it is sent."""

    def __init__(self, lab: Lab) -> None:
        self.proc = lab.popen(
            lab.ns_a,
            [sys.executable, "-m", "tests.benchmarks.nsworker", "http-loop", "--insecure"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=str(ROOT),
        )

    def probe(self, url: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(url + "\n")
        self.proc.stdin.flush()
        fields: dict[str, Any] = json.loads(self.proc.stdout.readline())
        if fields.get("outcome") != "ok":
            raise RuntimeError(f"edgeprobe http {url}: {fields.get('outcome')}: {fields.get('reason')}")
        return fields

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def bench_http(lab: Lab, quick: bool) -> dict[str, Any]:
    n = 20 if quick else 60
    tmp = Path(tempfile.mkdtemp(prefix="eplab-tls-"))
    cert, key = _self_signed(tmp)
    server = lab.popen(
        lab.ns_b,
        [
            *(sys.executable, "-m", "tests.benchmarks.nsworker", "serve", "--host", B4, "--port", "8080"),
            *("--tls-port", "8443", "--cert", cert, "--key", key),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=str(ROOT),
    )
    rows: list[Row] = []
    wire: list[Row] = []
    try:
        assert server.stdout is not None
        if not server.stdout.readline().startswith("ready"):
            raise RuntimeError("lab HTTP server did not start")
        ep_client = _EdgeprobeHttp(lab)
        for delay, url in itertools.product((0.0, 5.0), (f"http://{B4}:8080/", f"https://{B4}:8443/")):
            lab.set_link(Direction(delay_ms=delay), log=delay > 0)
            curl: list[dict[str, Any]] = []
            ep: list[dict[str, Any]] = []
            ep_client.probe(url)  # warm-up: first-use costs (imports, the TLS context) are not the network's
            for _ in range(n):  # one each, in turn: drift and noise hit both tools alike
                curl.append(_curl_once(lab, url))
                time.sleep(0.01)
                ep.append(ep_client.probe(url))
                time.sleep(0.01)
            for phase, what in (
                ("dns_ms", "name lookup (IP literal)"),
                ("connect_ms", "TCP handshake (duration)"),
                ("tls_ms", "TLS handshake (duration)"),
                ("ttfb_ms", "first byte (cumulative)"),
                ("total_ms", "total (cumulative)"),
            ):
                c = answered([r.get(phase) for r in curl])
                e = answered([r.get(phase) for r in ep])
                if not c and not e:
                    continue
                row: Row = {"one_way_ms": delay, "url": url.split(":")[0], "phase": what, "n": min(len(c), len(e))}
                row["curl_p50"] = median(c) if c else None
                row["ep_p50"] = median(e) if e else None
                if c and e:
                    row["diff"] = row["ep_p50"] - row["curl_p50"]
                rows.append(row)
            log = lab.take_log()
            if log is not None and delay > 0:
                port = int(url.rsplit(":", 1)[1].split("/")[0])
                conns = tcp_wire_phases(log, port)[1:]  # the first is edgeprobe's warm-up
                if len(conns) == 2 * n:
                    for tool, mine, reported in (("curl", conns[0::2], curl), ("edgeprobe", conns[1::2], ep)):
                        gap = median([c["client_gap_ms"] for c in mine])
                        flight = answered([c.get("second_flight_ms") for c in mine]) if "https" in url else []
                        wire.append(
                            {
                                "one_way_ms": delay,
                                "url": url.split(":")[0],
                                "tool": tool,
                                "client_gap_ms": gap,
                                "second_flight_ms": median(flight) if flight else None,
                                "reported_tls_ms": median(answered([r.get("tls_ms") for r in reported]))
                                if "https" in url
                                else None,
                            }
                        )
        ep_client.close()
    finally:
        if server.stdin:
            server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        table(
            f"4. HTTP phases, curl -w vs edgeprobe, 0 and 5 ms one way ({n} requests each, in turn; medians in ms)",
            [
                ("one_way_ms", "one-way"),
                ("url", "scheme"),
                ("phase", "phase"),
                ("n", "n"),
                ("curl_p50", "curl"),
                ("ep_p50", "edgeprobe"),
                ("diff", "ep-curl"),
            ],
            rows,
        )
    )
    print(
        "   curl's time_connect/time_appconnect are cumulative: its durations here are time_connect − "
        "time_namelookup and\n   time_appconnect − time_connect. curl builds its OpenSSL context (CA store) "
        "inside that TLS phase in every\n   process; edgeprobe builds one per process, before: the 0 ms rows "
        "show that CPU share alone.\n"
    )
    if wire:
        print(
            table(
                "   On the wire (the link's log, per connection, medians in ms): the client's own gap from its "
                "connect\n   to its first send, and connect → its TLS Finished (curl's appconnect − connect)",
                [
                    ("one_way_ms", "one-way"),
                    ("url", "scheme"),
                    ("tool", "tool"),
                    ("client_gap_ms", "client gap"),
                    ("second_flight_ms", "wire connect→Finished"),
                    ("reported_tls_ms", "reported tls_ms"),
                ],
                wire,
            )
        )
        print()
    return {"n": n, "rows": rows, "wire": wire}


# ------------------------------------------------------------------ 5. load


def _loopback_targets(n: int) -> list[str]:
    return [f"127.1.{i // 250}.{i % 250 + 1}" for i in range(n)]


def bench_load(lab: Lab, quick: bool) -> dict[str, Any]:
    duration = 10.0 if quick else 30.0
    targets = _loopback_targets(1000)
    rows: list[Row] = []
    lab_cfg = {"kind": "icmp", "name": "lab", "targets": [B4], "interval_s": 1.0}
    lab_cfg["options"] = {"count": 20, "interval_s": 0.02, "timeout_s": 0.5}
    # Calibrate the kernel path at this link setting, idle.
    link = Direction(delay_ms=5, jitter_ms=2)
    lab.set_link(link, seed=5)
    calib = ping_side_by_side(lab, B4, count=100, interval_s=0.02, ping=False)
    k = median(residuals(calib.ep_rtts, calib.ep_truth())) if calib.log is not None else 0.0
    for rate, job_interval in ((1000, 5.0), (5000, 1.0)):
        load_cfg = {"kind": "icmp", "name": "load", "targets": targets, "interval_s": job_interval}
        load_cfg["options"] = {"count": 5, "interval_s": 0.05, "timeout_s": 0.5}
        spec = {"jobs": [load_cfg, lab_cfg], "lab_job": "lab", "duration_s": duration, "warmup_s": 3.0}
        lab.set_link(link, seed=5)
        proc = lab.python(lab.ns_a, "-m", "tests.benchmarks.nsworker", "load", json.dumps(spec), timeout=duration + 120)
        log = lab.take_log()
        if proc.returncode != 0 or not proc.stdout.strip():
            raise RuntimeError(f"load worker failed: {proc.stderr[-2000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        lab_obs = sorted(result["lab"], key=lambda o: o["started_at_ns"])
        measured: list[float | None] = [x for o in lab_obs for x in (o["rtts_ms"] or [])]
        in_window = [x for o in lab_obs if o["in_window"] for x in (o["rtts_ms"] or [])]
        row: Row = {
            "target_rate": rate,
            "achieved_rate": result["load"]["sent"] / result["window_s"],
            "load_loss": 1 - result["load"]["received"] / max(1, result["load"]["sent"]),
            "cpu_pct": 100 * result["cpu_share"],
            "rss_mib": (result["rss_kib"] or 0) / 1024,
            "rss_peak_mib": (result["rss_peak_kib"] or 0) / 1024,
            "lag_p50_ms": result["load_lag_p50_ms"],
            "lag_p99_ms": result["load_lag_p99_ms"],
            "overloaded_runs": result["overloaded_runs"],
            "lab_echoes": len(answered(in_window)),
        }
        if log is not None:
            truth = echo_truth_ms(log, None)
            errors = [r - k for r in residuals(measured, truth)]
            first_window = next((i for i, o in enumerate(lab_obs) if o["in_window"]), 0)
            start = sum(len(o["rtts_ms"] or []) for o in lab_obs[:first_window])
            win_errors = [r - k for r in residuals(measured[start : start + len(in_window)], truth[start:])]
            abs_err = [abs(e) for e in win_errors] or [abs(e) for e in errors]
            row.update(
                {
                    "err_p50_ms": pct(win_errors, 50),
                    "abs_err_p99_ms": pct(abs_err, 99),
                    "abs_err_max_ms": max(abs_err),
                    "kernel_k_ms": k,
                }
            )
        rows.append(row)
    fping = _fping(lab, targets)
    print(
        table(
            f"5. Load: one agent, 1,000 loopback targets + the lab path (5 ± 2 ms one way), {duration:g} s window",
            [
                ("target_rate", "echoes/s"),
                ("achieved_rate", "achieved"),
                ("load_loss", "loss"),
                ("cpu_pct", "agent CPU %"),
                ("rss_mib", "RSS MiB"),
                ("lag_p50_ms", "lag p50"),
                ("lag_p99_ms", "lag p99"),
                ("overloaded_runs", "overloaded"),
                ("lab_echoes", "lab echoes"),
                ("err_p50_ms", "err p50 ms"),
                ("abs_err_p99_ms", "|err| p99 ms"),
                ("abs_err_max_ms", "|err| max ms"),
            ],
            rows,
        )
    )
    print(
        "   err = edgeprobe's RTT − (what the link held that echo + the idle kernel path K); CPU is the agent "
        "process's own\n   (user + system) over the window, % of one core."
    )
    if fping:
        best = max(rows, key=lambda r: r["achieved_rate"])
        ratio = fping["rate"] / best["achieved_rate"] if best["achieved_rate"] else None
        fping["edgeprobe_rate"] = best["achieved_rate"]
        fping["ratio_fping_to_edgeprobe"] = ratio
        print(
            f"   fping {fping['version']} ({' '.join(fping['args'])}) on the same 1,000 targets: "
            f"{fping['sent']} echoes in {fping['elapsed_s']:.2f} s = {fping['rate']:.0f} echoes/s, "
            f"loss {fping['loss']:.4f}; edgeprobe agent at {best['achieved_rate']:.0f}/s: ratio {fmt(ratio, 2)}\n"
        )
    return {"duration_s": duration, "rows": rows, "fping": fping}


def _fping(lab: Lab, targets: list[str]) -> dict[str, Any] | None:
    if shutil.which("fping") is None:
        return None
    version = subprocess.run(["fping", "-v"], capture_output=True, text=True).stdout.split()[-1]
    count = 5
    for interval in ("0", "0.1", "1"):
        args = ["fping", "-q", "-c", str(count), "-i", interval, "-p", "10", "-t", "500"]
        t0 = time.monotonic()
        proc = lab.run(lab.ns_a, args + targets)
        elapsed = time.monotonic() - t0
        if "xmt/rcv" not in proc.stderr:
            continue  # this interval was refused
        sent = received = 0
        for line in proc.stderr.splitlines():
            if "xmt/rcv/%loss" in line:
                x, r = line.split("=", 1)[1].split(",")[0].strip().split("/")[:2]
                sent, received = sent + int(x), received + int(r)
        return {
            "version": version,
            "args": args[1:],
            "sent": sent,
            "elapsed_s": elapsed,
            "rate": sent / elapsed,
            "loss": 1 - received / max(1, sent),
        }
    return None


# ------------------------------------------------------------------ main

BENCHES: dict[str, Callable[[Lab, bool], dict[str, Any]]] = {
    "icmp": bench_icmp,
    "jitter": bench_jitter,
    "loss": bench_loss,
    "http": bench_http,
    "load": bench_load,
}


def machine() -> dict[str, Any]:
    try:
        distro = Path("/etc/debian_version").read_text().strip()
    except OSError:
        distro = None
    return {
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "debian": distro,
        "python": platform.python_version(),
        "load_avg": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="edgeprobe measurement-truth benchmarks (needs root)")
    parser.add_argument("--out", default="bench-results/truth.json", help="where to write the figures (JSON)")
    parser.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {','.join(BENCHES)}")
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run, ~1 min)")
    args = parser.parse_args(argv)
    problem = lab_problem()
    if problem:
        print(f"truth benchmarks: {problem}", file=sys.stderr)
        return 2
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {','.join(BENCHES)}")
    sweep_stale()
    results: dict[str, Any] = {"machine": machine(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with Lab() as lab:
        results["link"] = {"mode": lab.mode, "realtime": lab.realtime}
        realtime = " (SCHED_FIFO)" if lab.realtime else ""
        print(f"lab link: {lab.mode}{realtime}; machine: {json.dumps(results['machine'])}\n")
        for name in chosen:
            t0 = time.monotonic()
            results[name] = BENCHES[name](lab, args.quick)
            results[name]["elapsed_s"] = time.monotonic() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
