"""Accuracy against known truth, through the lab (needs root; skipped elsewhere with the reason).

Small, fast versions of benchmarks 1 and 3 (``tests/benchmarks/truth.py`` has the full ones).
Tolerances are honest for a shared, noisy 2-core CI machine, not the benchmark targets: the
benchmark prints the real figures.
"""

from __future__ import annotations

import pytest

from tests.support.linkemu import Direction
from tests.support.measure import (
    PING_IDENT,
    edgeprobe_cmd,
    lost_requests,
    median,
    pct,
    ping_side_by_side,
    wilson_interval,
)
from tests.support.netlab import A4, B4, B6, ROOT, Lab, LabError, namespaces, sweep_stale

pytestmark = pytest.mark.lab


def test_the_link_delays_by_what_was_configured(lab: Lab) -> None:
    """The emulator's own error: how late it writes a frame out, from its own log."""
    lab.set_link(Direction(delay_ms=5))
    proc = lab.run(lab.ns_a, ["ping", "-n", "-q", "-c", "40", "-i", "0.01", B4])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = lab.take_log()
    if log is None:
        pytest.skip("the kernel's netem is the link here: no userspace log to check")
    sent = [r for r in log.records if not r.lost]
    assert len(sent) >= 80 and log.send_errors == 0
    late_us = [r.late_ns / 1000 for r in sent]
    assert all(r.late_ns >= 0 for r in sent)
    assert median(late_us) < 100, f"median lateness {median(late_us):.1f} µs"
    assert pct(late_us, 90) < 1000, f"p90 lateness {pct(late_us, 90):.1f} µs"


def test_icmp_median_agrees_with_ping_and_with_the_truth(lab: Lab) -> None:
    lab.set_link(Direction(delay_ms=5))
    run = ping_side_by_side(lab, B4, count=50, interval_s=0.01)
    ep = run.edgeprobe
    assert ep["outcome"] == "ok" and ep["received"] == 50, ep
    assert run.ping.received == 50
    # Means: ping prints its per-reply times at 0.1 ms resolution at this RTT, its summary in µs.
    assert abs(ep["rtt_avg_ms"] - run.ping.summary_ms["avg"]) < 0.3
    assert abs(ep["rtt_p50_ms"] - median([x for x in run.ping.rtts_ms if x is not None])) < 0.35
    assert 10.0 <= ep["rtt_p50_ms"] < 10.6  # 2 × 5 ms plus the kernel's path, never less
    if run.log is not None:
        # Per packet: what edgeprobe measured minus what the link held that very echo is the
        # kernel's own path through three namespaces: small and never negative.
        truth = run.ep_truth()
        assert len(truth) == 50
        residual = [m - t for m, t in zip(run.ep_rtts, truth, strict=True) if m is not None and t is not None]
        assert len(residual) == 50
        assert min(residual) > -0.02, residual
        assert median(residual) < 0.3, residual


def test_icmpv6_through_the_lab(lab: Lab) -> None:
    lab.set_link(Direction(delay_ms=1))
    proc = lab.run(lab.ns_a, edgeprobe_cmd("ping", B6, "-c", "5", "-i", "0.01", "--json"), cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr
    assert '"family": "ipv6"' in proc.stdout and '"received": 5' in proc.stdout


def test_loss_is_measured_exactly_and_within_the_binomial_interval(lab: Lab) -> None:
    lab.set_link(Direction(loss_ratio=0.2), Direction(), seed=11)
    n = 300
    run = ping_side_by_side(lab, B4, count=n, interval_s=0.002, timeout_s=1.0)
    ep = run.edgeprobe
    lost = ep["sent"] - ep["received"]
    assert ep["sent"] == n and ep["loss_ratio"] == pytest.approx(lost / n)
    lo, hi = wilson_interval(lost, n, z=3.29)  # 99.9 %: a seeded run, but still no flaky margin
    assert lo <= 0.2 <= hi, (lost, lo, hi)
    assert ep["rtts_ms"].count(None) == lost
    if run.log is not None:  # exactly the echoes the link dropped, no more, no fewer
        assert lost == lost_requests(run.log, exclude_ident=PING_IDENT)
        assert run.ping.transmitted - run.ping.received == lost_requests(run.log, PING_IDENT)


def test_a_failed_build_leaves_nothing_behind(lab_host: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Lab, ns: str, *devices: str) -> None:
        raise LabError("injected failure")

    before = set(namespaces())
    monkeypatch.setattr(Lab, "_offload_off", broken)
    with pytest.raises(LabError):
        Lab()
    assert set(namespaces()) == before


def test_stale_labs_are_swept(lab_host: None) -> None:
    import subprocess

    dead = "eplab-4194305-1-a"  # above the largest possible pid: its creator is surely gone
    subprocess.run(["ip", "netns", "add", dead], check=True)
    try:
        assert dead in sweep_stale()
        assert dead not in namespaces()
    finally:
        subprocess.run(["ip", "netns", "delete", dead], capture_output=True, check=False)


def test_lab_addresses_live_only_in_the_lab(lab: Lab) -> None:
    proc = lab.run(lab.ns_a, ["ip", "-4", "route", "show"])
    routes = proc.stdout.strip().splitlines()
    assert routes == [f"10.77.0.0/24 dev lab0 proto kernel scope link src {A4}"], routes
