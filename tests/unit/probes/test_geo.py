"""The physical floor: distances and fibre round trips against known figures."""

from __future__ import annotations

import pytest

from edgeprobe.probes.geo import first_byte_round_trips, floor_rtt_ms, great_circle_km, inflation_ratio


def test_known_distances() -> None:
    # Frankfurt (50.1109, 8.6821) – London (51.5074, -0.1278): about 637 km great circle
    assert great_circle_km(50.1109, 8.6821, 51.5074, -0.1278) == pytest.approx(637, abs=5)
    # New York (40.7128, -74.0060) – London: about 5,570 km
    assert great_circle_km(40.7128, -74.0060, 51.5074, -0.1278) == pytest.approx(5570, abs=15)
    assert great_circle_km(10, 20, 10, 20) == 0
    # antipodes: half the circumference
    assert great_circle_km(0, 0, 0, 180) == pytest.approx(20015.1, abs=1)


def test_floor_is_about_a_millisecond_per_100_km() -> None:
    assert floor_rtt_ms(100) == pytest.approx(0.979, abs=0.001)
    assert floor_rtt_ms(0) == 0
    with pytest.raises(ValueError):
        floor_rtt_ms(-1)


def test_inflation_ratio() -> None:
    floor = floor_rtt_ms(637)
    assert inflation_ratio(12.5, floor) == pytest.approx(12.5 / floor)
    assert inflation_ratio(None, floor) is None
    assert inflation_ratio(0.05, floor_rtt_ms(0.2)) is None  # co-located: no meaningful ratio


def test_round_trips_to_first_byte() -> None:
    assert first_byte_round_trips("http", None, reused=False) == 2
    assert first_byte_round_trips("https", "TLSv1.3", reused=False) == 3
    assert first_byte_round_trips("https", "TLSv1.2", reused=False) == 4
    assert first_byte_round_trips("https", "TLSv1.3", reused=True) == 1


def test_bad_latitude() -> None:
    with pytest.raises(ValueError, match="latitude"):
        great_circle_km(91, 0, 0, 0)


def test_physics_fields_per_kind() -> None:
    from edgeprobe.probes.geo import physics
    from edgeprobe.probes.registry import get_kind

    fra, lon = (50.1109, 8.6821), (51.5074, -0.1278)
    icmp = physics(get_kind("icmp"), "x", {"rtt_min_ms": 12.0}, fra, lon)
    assert icmp["distance_km"] == pytest.approx(637, abs=5)
    assert icmp["inflation_ratio"] == pytest.approx(12.0 / icmp["floor_rtt_ms"])  # type: ignore[operator]
    assert icmp["floor_ttft_ms"] is None
    lost = physics(get_kind("icmp"), "x", {"rtt_min_ms": None}, fra, lon)
    assert lost["inflation_ratio"] is None  # nothing measured: no ratio, never 0
    fresh = physics(get_kind("inference"), "https://x/", {"net_rtt_ms": 14.0, "tls_version": "TLSv1.3"}, fra, lon)
    assert fresh["floor_ttft_ms"] == pytest.approx(3 * fresh["floor_rtt_ms"])  # type: ignore[operator]
    reused = physics(get_kind("inference"), "https://x/", {"connection": "reused"}, fra, lon)
    assert reused["floor_ttft_ms"] == pytest.approx(reused["floor_rtt_ms"])
