"""The trace kind's observation makes one edgeprobe_trace point and one edgeprobe_trace_hop point per hop."""

from __future__ import annotations

import msgspec

from edgeprobe.collector.lineproto import encode_batch
from edgeprobe.probes.registry import KINDS
from edgeprobe.schema import Observation
from tests.unit.probes.test_trace import filled


def test_one_trace_point_and_one_point_per_hop() -> None:
    obs = Observation(
        id="abc", seq=3, kind="trace", target="s.example", started_at_ns=1_700_000_000_000_000_000,
        duration_ms=12.5, outcome="ok", job="paths", labels={"pop": "fra"}, fields=msgspec.to_builtins(filled()),
    )  # fmt: skip
    batch = encode_batch([obs], agent="a1", site="s1", kinds=KINDS, agent_labels={"region": "eu"})
    *hops, trace_line = batch.lines
    assert trace_line.startswith("edgeprobe_trace,agent=a1,job=paths,method=udp,outcome=ok,pop=fra,region=eu,site=s1")
    assert 'path_id="' in trace_line and "hop_count=4i" in trace_line and 'as_path="64500 64501 64502"' in trace_line
    assert "reached=true" in trace_line and "silent_hops=1i" in trace_line and "path_changed" not in trace_line
    assert [line.split(" ")[0] for line in hops] == [
        f"edgeprobe_trace_hop,agent=a1,job=paths,method=udp,outcome=ok,pop=fra,region=eu,site=s1,target=s.example,ttl={t}"
        for t in (1, 2, 3, 4)
    ]
    assert all(line.endswith(" 1700000000000000000") for line in hops)
    assert 'address="10.91.1.1"' in hops[0] and "rtt_min_ms=0.1," in hops[0] and "asn=64500i" in hops[0]
    assert "silent=true" in hops[1] and "address=" not in hops[1] and "loss_ratio=1.0" in hops[1]
    assert 'ixp="Lab-IX"' in hops[2] and 'mpls="16005/0/1/1"' in hops[2]
    assert not batch.omitted


def test_other_kinds_make_one_point() -> None:
    obs = Observation(id="x", seq=0, kind="icmp", target="t", started_at_ns=1, duration_ms=1.0, outcome="ok")
    assert len(encode_batch([obs], agent="a", site="s", kinds=KINDS).lines) == 1
