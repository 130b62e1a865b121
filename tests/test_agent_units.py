"""Pure parts of the agent: slot arithmetic, offsets, the outbox, batch splitting, backoff."""

from __future__ import annotations

import asyncio
import random

import msgspec

from agent.outbox import Outbox
from agent.publisher import backoff_s, encode_batches
from agent.scheduler import next_slot_ns, offset_ns
from probes.schema import Envelope, Observation

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


async def test_outbox_drops_oldest_and_counts() -> None:
    box = Outbox(3)
    for i in range(5):
        box.put(obs(i))
    assert len(box) == 3 and box.dropped == 2
    batch = box.take(2)
    assert [o.seq for _, o in batch] == [2, 3]
    box.put(obs(5))
    box.put_back(batch)  # back to the front, in order
    assert [o.seq for _, o in box.take(10)] == [3, 4, 5]  # 4 items for 3 places: the oldest (2) went
    assert box.dropped == 3


async def test_outbox_put_back_keeps_order() -> None:
    box = Outbox(10)
    for i in range(4):
        box.put(obs(i))
    batch = box.take(2)
    box.put(obs(4))
    box.put_back(batch)
    assert [o.seq for _, o in box.take(10)] == [0, 1, 2, 3, 4]
    assert box.dropped == 0


async def test_outbox_wait_changed_wakes_on_put() -> None:
    box = Outbox(10)
    waiter = asyncio.create_task(box.wait_changed(5))
    await asyncio.sleep(0)
    box.put(obs(1))
    await asyncio.wait_for(waiter, 1)


def test_encode_batches_splits_under_limit_and_loses_nothing() -> None:
    base = Envelope(v=1, agent="a", site="s", sent_at_ns=1, observations=[])
    observations = [obs(i) for i in range(100)]
    one = encode_batches(base, observations, 10**9)
    assert len(one) == 1
    limit = len(one[0]) // 5
    parts = encode_batches(base, observations, limit)
    assert len(parts) > 1 and all(len(p) <= limit for p in parts)
    seqs = [o.seq for p in parts for o in msgspec.json.decode(p, type=Envelope).observations]
    assert seqs == list(range(100))


def test_backoff_grows_and_is_capped() -> None:
    rng = random.Random(1)
    values = [backoff_s(a, 0.5, 30, rng) for a in range(12)]
    assert 0.25 <= values[0] <= 0.5
    assert all(15 <= v <= 30 for v in values[8:])
