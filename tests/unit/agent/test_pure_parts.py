"""Pure parts of the agent: slot arithmetic, offsets, batch splitting, pacing (the spool: test_spool.py;
the backoff: tests/unit/edgeprobe/test_backoff.py)."""

from __future__ import annotations

import msgspec
import pytest

from edgeprobe.agent.publisher import TokenBucket, encode_batches
from edgeprobe.agent.scheduler import next_slot_ns, offset_ns
from edgeprobe.schema import Envelope, Observation, encode

S = 1_000_000_000


def obs(i: int) -> Observation:
    return Observation(
        id=f"{i:032x}", seq=i, kind="icmp", target="127.0.0.1", started_at_ns=i, duration_ms=1.0, outcome="ok"
    )


def test_next_slot_is_aligned_and_not_in_the_past() -> None:
    interval, off = 10 * S, 3 * S
    assert next_slot_ns(0, interval, off) == 3 * S
    assert next_slot_ns(3 * S, interval, off) == 3 * S
    assert next_slot_ns(3 * S + 1, interval, off) == 13 * S
    now = 1_700_000_000_123_456_789
    slot = next_slot_ns(now, interval, off)
    assert now <= slot < now + interval and (slot - off) % interval == 0


def test_offsets_are_deterministic_and_spread() -> None:
    interval = 60 * S
    a = offset_ns("fra1-a", "icmp", "127.0.0.1", interval)
    assert a == offset_ns("fra1-a", "icmp", "127.0.0.1", interval)
    offsets = {offset_ns(f"agent-{i}", "icmp", "127.0.0.1", interval) for i in range(200)}
    assert len(offsets) == 200
    # 200 agents spread over a minute: no 6-second bucket holds more than a third of them
    buckets = [0] * 10
    for o in offsets:
        buckets[o * 10 // interval] += 1
    assert max(buckets) < 67


def test_encode_batches_splits_under_limit_and_loses_nothing() -> None:
    base = Envelope(v=1, agent="a", site="s", sent_at_ns=1, observations=[])
    observations = [encode(obs(i)) for i in range(100)]
    one = encode_batches(base, observations, 10**9)
    assert len(one) == 1 and one[0][1] == 100
    # The raw envelope is the schema's Envelope, byte for byte.
    full = Envelope(v=1, agent="a", site="s", sent_at_ns=1, observations=[obs(i) for i in range(100)])
    assert one[0][0] == encode(full)
    limit = len(one[0][0]) // 5
    parts = encode_batches(base, observations, limit)
    assert len(parts) > 1 and all(len(p) <= limit for p, _ in parts)
    decoded = [msgspec.json.decode(p, type=Envelope).observations for p, _ in parts]
    assert [n for _, n in parts] == [len(d) for d in decoded]
    assert [o.seq for d in decoded for o in d] == list(range(100))


def test_token_bucket_paces_after_the_burst() -> None:
    bucket = TokenBucket(rate_per_s=100, burst=50)
    assert bucket.reserve(50, now=0.0) == 0.0  # the burst
    assert bucket.reserve(50, now=0.0) == pytest.approx(0.5)  # then 100/s
    assert bucket.reserve(10, now=0.5) == pytest.approx(0.1)
    assert bucket.reserve(10, now=10.0) == 0.0  # refilled, capped at the burst
    assert bucket.tokens == pytest.approx(40)
    # A replay of 2000 observations at 100/s after a 50 burst: about 19.5 s of waiting in total.
    b2, now, waited = TokenBucket(rate_per_s=100, burst=50), 0.0, 0.0
    for _ in range(40):
        delay = b2.reserve(50, now)
        waited += delay
        now += delay
    assert waited == pytest.approx(19.5)


def test_status_and_health_say_overloaded_and_status_does_not_steal_the_lag_window() -> None:
    from edgeprobe.agent.config import AgentConfig
    from edgeprobe.agent.publisher import ProbeCounters, Publisher
    from edgeprobe.agent.spool import MemorySpool
    from edgeprobe.configfile import convert

    cfg = convert({"agent": {"id": "a1", "site": "s1"}}, AgentConfig, "test")
    calls: list[bool] = []

    def counters(take_lag: bool) -> ProbeCounters:
        calls.append(take_lag)
        return ProbeCounters(overloaded=True, overloaded_runs=7, sched_lag_max_ms=120.0 if take_lag else None)

    pub = Publisher(cfg, MemorySpool(max_bytes=10**6, max_age_s=3600), ["icmp"], counters)
    status = pub.status("online")
    assert status.overloaded is True and status.overloaded_runs == 7
    health = pub.health()
    assert health.overloaded is True and health.overloaded_runs == 7 and health.sched_lag_max_ms == 120.0
    assert calls == [False, True]  # only the health message resets the max-lag window
