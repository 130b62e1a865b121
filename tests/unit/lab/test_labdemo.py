"""The WAN lab demo's pure parts: its topology, agent configs, expectations and summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgeprobe import labdemo
from edgeprobe.agent.config import AgentConfig, build_jobs
from edgeprobe.configfile import convert
from edgeprobe.lab.topology import Topology

# Per (pop, endpoint): ttft_p50_ms, server_ms, rtt_p50_ms, from a 40 s run of the demo on this
# machine (userspace emulator, `edgeprobe demo --duration 40 --interval 4`).
MEASURED = {
    ("pop-nyc", "edge-nyc"): (42.7, 42.2, 0.1),
    ("pop-nyc", "edge-fra"): (190.5, 42.4, 73.0),
    ("pop-nyc", "region-ash"): (51.4, 41.7, 4.2),
    ("pop-nyc", "core-cbf"): (86.6, 41.3, 21.7),
    ("pop-chi", "edge-nyc"): (70.2, 41.2, 13.6),
    ("pop-chi", "edge-fra"): (216.3, 42.2, 86.5),
    ("pop-chi", "region-ash"): (64.3, 41.6, 10.9),
    ("pop-chi", "core-cbf"): (59.0, 41.8, 8.2),
    ("pop-fra", "edge-nyc"): (189.1, 41.8, 73.0),
    ("pop-fra", "edge-fra"): (42.0, 41.3, 0.1),
    ("pop-fra", "region-ash"): (197.5, 41.6, 77.2),
    ("pop-fra", "core-cbf"): (233.2, 42.2, 94.7),
}


@pytest.fixture(scope="module")
def topo() -> Topology:
    return labdemo.load_demo_topology("demo")


def stats() -> dict[tuple[str, str], dict[str, Any]]:
    return {k: {"ttft_p50_ms": t, "server_ms": s, "rtt_p50_ms": r} for k, (t, s, r) in MEASURED.items()}


def test_the_demo_topology_tells_the_story(topo: Topology) -> None:
    assert labdemo.pops(topo) == ["pop-nyc", "pop-chi", "pop-fra"]
    assert labdemo.endpoints(topo) == ["edge-nyc", "edge-fra", "region-ash", "core-cbf"]
    x = labdemo.expectations(topo)
    assert x[("pop-nyc", "edge-nyc")].ttft_ms == labdemo.SERVER["ttft_ms"]  # same site: server time only
    iowa = x[("pop-nyc", "core-cbf")]
    assert 1800 < iowa.distance_km < 1860
    assert iowa.path_rtt_ms == pytest.approx(topo.expected_rtt_ms("pop-nyc", "core-cbf"))
    assert iowa.path_rtt_ms > iowa.floor_rtt_ms  # routed through Chicago at 1.2 × the great circle
    assert iowa.ttft_ms == pytest.approx(labdemo.SERVER["ttft_ms"] + 2 * iowa.path_rtt_ms)


@pytest.mark.parametrize("pop", ["pop-nyc", "pop-chi", "pop-fra"])
def test_every_agent_config_is_valid_and_probes_every_endpoint(topo: Topology, pop: str, tmp_path: Path) -> None:
    raw = labdemo.agent_config(topo, pop, tmp_path / "spool.db", 4.0)
    cfg = convert(raw, AgentConfig, "demo")
    jobs = build_jobs(cfg, "demo")  # also checks that every run fits its interval
    assert sorted({j.kind.name for j in jobs}) == ["http", "icmp", "inference", "tcp", "trace"]
    for job in raw["jobs"]:
        assert [t["labels"]["endpoint"] for t in job["targets"]] == labdemo.endpoints(topo)
    assert raw["broker"]["url"] == "mqtt://127.0.0.1:1883"  # the PoP's own loopback, relayed


def test_the_summary_has_the_issues_keys_and_ratios(topo: Topology) -> None:
    s = labdemo.summarize(topo, stats(), "userspace")
    nyc = s["pops"]["pop-nyc"]
    for e in nyc["endpoints"].values():
        for key in ("distance_km", "floor_rtt_ms", "rtt_p50_ms", "ttft_p50_ms", "setup_ms", "server_ms"):
            assert key in e
    assert nyc["fastest"] == "edge-nyc" and nyc["slowest"] == "edge-fra"
    assert nyc["slowest_to_fastest_ttft_ratio"] == pytest.approx(190.5 / 42.7, abs=1e-3)
    evc = nyc["edge_vs_core"]
    assert evc["edge"] == "edge-nyc" and evc["core"] == "core-cbf"
    assert evc["ttft_ratio"] == pytest.approx(86.6 / 42.7, abs=1e-3)
    assert evc["network_share_of_difference"] == pytest.approx(1 - (41.3 - 42.2) / (86.6 - 42.7), abs=1e-3)
    assert s["pops"]["pop-chi"]["fastest"] == "core-cbf"  # Chicago is nearer Iowa than any edge site


def test_summary_lines_read_like_the_issue(topo: Topology) -> None:
    lines = labdemo.summary_lines(labdemo.summarize(topo, stats(), "userspace"))
    assert lines[0].startswith(
        "from New York: edge NYC IXP TTFT 43 ms, central Iowa 87 ms: 2.0× slower (expected 2.1×); "
        "102 % of the difference is network;  edge NYC IXP TTFT 43 ms, edge Frankfurt 190 ms: 4.5× slower"
    )
    assert "edge NYC IXP TTFT 70 ms, central Iowa 59 ms: 1.2× faster" in lines[1]
    empty = labdemo.summary_lines(labdemo.summarize(topo, {}, "userspace"))
    assert empty[0] == "from New York: not enough inference results for a comparison"


def test_without_privilege_it_runs_the_loopback_demo_and_says_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    called: list[tuple[Any, ...]] = []
    monkeypatch.setattr(labdemo, "lab_problem", lambda: "needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) to …")
    monkeypatch.setattr(labdemo, "loopback_main", lambda *a: called.append(a) or 0)
    assert labdemo.main(3.0, 4.0) == 0
    assert called == [(3.0, 4.0, None)]
    out = capsys.readouterr().out
    assert out.startswith("not running the WAN lab demo: needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN)")
    assert "running the loopback demo instead" in out
