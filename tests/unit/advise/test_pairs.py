"""Per PoP × endpoint statistics on the synthetic points (tests/support/advise_data.py)."""

from __future__ import annotations

from typing import Any

import pytest

from edgeprobe.advise.model import INFERENCE_FIELDS, InferenceSample, PathSample, endpoint_host_port, path_host_port
from edgeprobe.advise.pairs import PairStats, pair_stats, stat
from tests.support import advise_data as data

NYC_FRA = ("nyc", "https://fra-ixp.example.net/v1")


def samples(points: list[dict[str, Any]] | None = None) -> list[InferenceSample]:
    return [
        InferenceSample(
            site=p["site"], target=p["target"], outcome=p["outcome"], tier=p["tier"],
            **{f: p.get(f) for f in INFERENCE_FIELDS},
        )
        for p in (points if points is not None else data.inference_samples())
    ]  # fmt: skip


def icmp() -> list[PathSample]:
    return [
        PathSample(kind="icmp", site=p["site"], target=p["target"], outcome="ok", rtt_ms=p["rtt_p50_ms"])
        for p in data.icmp_samples()
    ]


@pytest.fixture(scope="module")
def pairs() -> dict[tuple[str, str], PairStats]:
    return {(p.pop, p.endpoint): p for p in pair_stats(samples(), icmp(), 20)}


def test_every_pair_once(pairs: dict[tuple[str, str], PairStats]) -> None:
    assert set(pairs) == {(pop, e) for pop in data.POPS for e in data.ENDPOINTS}


def test_figures_and_their_sample_counts(pairs: dict[tuple[str, str], PairStats]) -> None:
    p = pairs[NYC_FRA]
    ok = sorted(
        s["ttft_ms"] for s in data.inference_samples() if (s["site"], s["target"]) == NYC_FRA and "ttft_ms" in s
    )
    assert p.samples == len(ok) == data.SAMPLES and p.attempts == data.SAMPLES + data.TIMEOUTS
    assert p.success_ratio == pytest.approx(data.SAMPLES / (data.SAMPLES + data.TIMEOUTS), abs=1e-4)
    assert p.ttft_p50_ms.value == pytest.approx((ok[29] + ok[30]) / 2, abs=1e-3)
    assert p.ttft_p50_ms.samples == 60 and p.ttft_p95_ms.value is not None and p.ttft_p95_ms.value > p.ttft_p50_ms.value
    assert p.dns_p50_ms.value is None and p.dns_p50_ms.samples == 0  # never measured: no 0
    assert p.round_trips.value == pytest.approx(3.0)
    assert p.distance_km.value == pytest.approx(data.distance_km(*NYC_FRA), abs=0.01)
    assert p.inflation_ratio.value == pytest.approx(data.route_factor(*NYC_FRA), rel=0.08)
    assert p.icmp_rtt_p50_ms.samples == 10
    assert p.icmp_rtt_p50_ms.value == pytest.approx(data.expected_rtt_ms(*NYC_FRA), rel=0.06)
    assert p.tcp_connect_p50_ms.samples == 0
    # network = setup + request transit; the rest is the server's 40 ms
    assert p.network_p50_ms.value is not None and p.server_p50_ms.value == pytest.approx(data.SERVER_MS, abs=1.5)
    assert p.network_share_ratio.value == pytest.approx(p.network_p50_ms.value / p.ttft_p50_ms.value, abs=0.01)


def test_best_per_pop_and_how_much_slower_the_others_are(pairs: dict[tuple[str, str], PairStats]) -> None:
    best = {p.pop: p.endpoint for p in pairs.values() if p.best}
    assert best == {
        "nyc": "https://nyc-ixp.example.net/v1",
        "fra": "https://fra-ixp.example.net/v1",
        "chi": "https://council-bluffs.example.net/v1",
    }
    b, other = pairs[("nyc", best["nyc"])], pairs[NYC_FRA]
    assert b.vs_best_ratio == 1.0 and b.vs_best_ms == 0.0
    assert other.ttft_p50_ms.value is not None and b.ttft_p50_ms.value is not None
    assert other.vs_best_ms == pytest.approx(other.ttft_p50_ms.value - b.ttft_p50_ms.value, abs=1e-3)
    assert other.vs_best_ratio == pytest.approx(other.ttft_p50_ms.value / b.ttft_p50_ms.value, abs=1e-3)


def test_too_few_samples_shown_not_ranked(pairs: dict[tuple[str, str], PairStats]) -> None:
    sparse = pairs[data.SPARSE]
    assert sparse.samples == data.SPARSE_SAMPLES and not sparse.ranked and not sparse.best
    assert sparse.vs_best_ratio is None and sparse.ttft_p50_ms.samples == data.SPARSE_SAMPLES


def test_min_samples_is_settable() -> None:
    ranked = {(p.pop, p.endpoint): p.ranked for p in pair_stats(samples(), [], 5)}
    assert ranked[data.SPARSE]
    assert not any(p.ranked for p in pair_stats(samples(), [], 61))


def test_a_sparse_pair_faster_than_the_best_is_not_best() -> None:
    points = data.inference_samples()
    for p in points:
        if (p["site"], p["target"]) == data.SPARSE and "ttft_ms" in p:
            p["ttft_ms"] = 1.0
    by = {(p.pop, p.endpoint): p for p in pair_stats(samples(points), [], 20)}
    assert not by[data.SPARSE].best and by[("fra", "https://fra-ixp.example.net/v1")].best


def test_stat_ignores_missing_and_nonfinite() -> None:
    assert stat([None, float("nan"), 3.0, 1.0]) == stat([1.0, 3.0])
    assert stat([]).value is None and stat([]).samples == 0


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://Nyc-IXP.example.net/v1", ("nyc-ixp.example.net", 443)),
        ("http://10.0.0.1:8000/v1", ("10.0.0.1", 8000)),
        ("https://[2001:db8::1]:8443/", ("2001:db8::1", 8443)),
    ],
)
def test_endpoint_host_port(url: str, expected: tuple[str, int]) -> None:
    assert endpoint_host_port(url) == expected


def test_path_host_port() -> None:
    assert path_host_port("tcp", "[2001:db8::1]:443") == ("2001:db8::1", 443)
    assert path_host_port("tcp", "Host.example:443") == ("host.example", 443)
    assert path_host_port("icmp", "Host.example") == ("host.example", None)
