"""Jitter and loss under one name per definition, for ICMP and TCP alike; no ambiguous ``jitter_ms``."""

from __future__ import annotations

import pytest

from edgeprobe.probes.registry import KINDS
from edgeprobe.probes.stats import RttSummary
from edgeprobe.probes.tcp import TcpResult, fill_stats
from edgeprobe.schema import BASE_FIELD_KEYS, Observation

JITTER_FAMILY = ("jitter_rfc3550_ms", "ipdv_mean_ms", "ipdv_p95_ms", "pdv_p95_ms")


def test_tcp_connect_series_has_the_jitter_family() -> None:
    r = TcpResult(port=443)
    fill_stats(r, [1.0, None, 3.0, 2.0, None])  # answered in order: 1, 3, 2; |D| = 2, 1
    assert r.connect_p50_ms == r.connect_ms == 2.0
    assert r.connect_jitter_rfc3550_ms == pytest.approx(2 / 16 + (1 - 2 / 16) / 16, abs=1e-6)
    assert r.connect_ipdv_mean_ms == pytest.approx(1.5)
    assert r.connect_ipdv_p95_ms == pytest.approx(1.95)
    assert r.connect_pdv_p95_ms == pytest.approx(1.9)  # p95 (2.9) - min (1.0)
    assert r.loss_ratio == pytest.approx(0.4)  # failed attempts stay in the denominator


def test_one_answered_attempt_is_too_few_for_jitter() -> None:
    r = TcpResult(port=443)
    fill_stats(r, [None, 5.0])
    assert r.connect_ms == 5.0 and r.loss_ratio == 0.5
    assert (r.connect_jitter_rfc3550_ms, r.connect_ipdv_mean_ms, r.connect_ipdv_p95_ms, r.connect_pdv_p95_ms) == (
        None,
        None,
        None,
        None,
    )


def test_icmp_and_tcp_name_the_same_measures_alike() -> None:
    icmp_fields = set(KINDS["icmp"].result_type.__struct_fields__)
    tcp_fields = set(KINDS["tcp"].result_type.__struct_fields__)
    assert set(JITTER_FAMILY) | {"rtt_p50_ms", "rtt_stddev_ms", "loss_ratio"} <= icmp_fields
    assert {f"connect_{name}" for name in JITTER_FAMILY} | {"connect_p50_ms", "connect_stddev_ms"} <= tcp_fields
    assert "loss_ratio" in tcp_fields


def test_no_ambiguous_jitter_name_anywhere_in_the_schema() -> None:
    names = set(Observation.__struct_fields__) | set(BASE_FIELD_KEYS) | set(RttSummary.__struct_fields__)
    for kind in KINDS.values():
        names |= set(kind.result_type.__struct_fields__)
    assert not [n for n in names if n in ("jitter_ms", "jitter") or n.endswith("_jitter_ms")], sorted(names)
