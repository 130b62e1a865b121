"""Spool ageing does not drop observations because the wall clock stepped (issue 12, item 3).

Measured before: an agent that booted 30 days behind and was then corrected by NTP dropped 990 of
990 spooled observations as "older than max_age_s" although they were 10 s old: ageing compared
the wall-clock enqueue time with the (corrected) wall clock.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from edgeprobe.agent.spool import MemorySpool, Spool, SpoolAgeing, SqliteSpool, inspect_spool
from edgeprobe.schema import Observation

S = 1_000_000_000
DAY_NS = 86_400 * S
MAX_AGE_S = 7 * 86_400.0


def obs(i: int) -> Observation:
    return Observation(
        id=f"{i:032x}", seq=i, kind="icmp", target="127.0.0.1", started_at_ns=i, duration_ms=1.0, outcome="ok"
    )


class WallClock:
    """time.time_ns with a settable step (the monotonic clock is left alone)."""

    def __init__(self) -> None:
        self.real = time.time_ns
        self.shift_ns = 0

    def __call__(self) -> int:
        return self.real() + self.shift_ns


@pytest.fixture
def wall(monkeypatch: pytest.MonkeyPatch) -> Iterator[WallClock]:
    clock = WallClock()
    monkeypatch.setattr(time, "time_ns", clock)  # the module: the spool (and every caller) sees it
    yield clock


@pytest.fixture(params=["memory", "sqlite"])
async def spool(request: pytest.FixtureRequest, tmp_path: Path, wall: WallClock) -> AsyncIterator[Spool]:
    s: Spool
    if request.param == "memory":
        s = MemorySpool(max_bytes=10**9, max_age_s=MAX_AGE_S)
    else:
        s = await SqliteSpool.open(tmp_path / "spool.db", max_bytes=10**9, max_age_s=MAX_AGE_S, commit_interval_s=0.01)
    yield s
    await s.aclose()


async def test_booted_30_days_behind_then_corrected_drops_nothing(spool: Spool, wall: WallClock) -> None:
    wall.shift_ns = -30 * DAY_NS  # booted with the clock 30 days behind
    for i in range(990):
        spool.put(obs(i))
    await spool.flush()
    wall.shift_ns = 0  # NTP steps the clock to the truth: the 990 are seconds old, not 30 days
    spool.put(obs(990))  # a put and a commit apply the bounds
    await spool.flush()
    if isinstance(spool, MemorySpool):
        spool.expire()
    stats = spool.stats()
    assert stats.dropped_age_limit == 0 and spool.dropped == 0
    assert len(spool) == 991


async def test_forward_step_during_the_run_drops_nothing(spool: Spool, wall: WallClock) -> None:
    for i in range(10):
        spool.put(obs(i))
    await spool.flush()
    wall.shift_ns = 365 * DAY_NS  # a bad step forward: the rows are still seconds old
    spool.put(obs(10))
    await spool.flush()
    assert spool.stats().dropped_age_limit == 0 and len(spool) == 11


async def test_monotonic_age_still_drops_this_runs_rows(tmp_path: Path, wall: WallClock) -> None:
    spool = await SqliteSpool.open(tmp_path / "spool.db", max_bytes=10**9, max_age_s=0.3, commit_interval_s=0.01)
    try:
        wall.shift_ns = -30 * DAY_NS  # whatever the wall clock says
        spool.put(obs(0))
        await spool.flush()
        await asyncio.sleep(0.5)  # the scenario: older than max_age_s by the monotonic clock
        spool.put(obs(1))
        await spool.flush()
        assert spool.stats().dropped_age_limit == 1 and len(spool) == 1
    finally:
        await spool.aclose()


def _stamp_rows(path: Path, enqueued_at_ns: int) -> None:
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE spool SET enqueued_at_ns = ?", (enqueued_at_ns,))
    db.close()


async def test_rows_from_a_previous_run(tmp_path: Path, wall: WallClock) -> None:
    """Rows found in the file at open: the wall clock at open judges them, within limits."""
    path = tmp_path / "spool.db"
    first = await SqliteSpool.open(path, max_bytes=10**9, max_age_s=MAX_AGE_S, commit_interval_s=0.01)
    for i in range(5):
        first.put(obs(i))
    await first.aclose()

    # Enqueued "in the future" (the clock went back since, or was ahead then): not expired.
    _stamp_rows(path, wall() + 40 * DAY_NS)
    again = await SqliteSpool.open(path, max_bytes=10**9, max_age_s=MAX_AGE_S, commit_interval_s=0.01)
    again.put(obs(5))
    await again.flush()
    assert again.stats().dropped_age_limit == 0 and len(again) == 6
    # A step during this run does not expire them either (they age by the monotonic clock now).
    wall.shift_ns = 60 * DAY_NS
    again.put(obs(6))
    await again.flush()
    assert again.stats().dropped_age_limit == 0 and len(again) == 7
    await again.aclose()
    wall.shift_ns = 0

    # Genuinely older than max_age_s by the wall clock at open: dropped and counted.
    _stamp_rows(path, wall() - 8 * DAY_NS)
    old = await SqliteSpool.open(path, max_bytes=10**9, max_age_s=MAX_AGE_S, commit_interval_s=0.01)
    old.put(obs(7))
    await old.flush()
    assert old.stats().dropped_age_limit == 7 and len(old) == 1
    await old.aclose()
    assert inspect_spool(path).dropped_age_limit == 7


def test_ageing_rule() -> None:
    """The rule itself, pure (see SpoolAgeing's docstring)."""
    max_age = 100 * S
    a = SpoolAgeing(max_age, opened_wall_ns=1_000 * S, opened_mono_ns=50 * S, inherited_through=10)
    # This run's rows: monotonic only.
    a.note_inserted(11, [60 * S, 70 * S, 80 * S])
    assert a.expired_through(now_mono_ns=159 * S) == 0  # nothing 100 s old yet
    assert a.expired_through(now_mono_ns=171 * S) == 12  # rows 11, 12 by monotonic age
    # Inherited rows: wall clock at open, advanced by the monotonic clock, never by a later step.
    assert a.inherited_cutoff_ns(now_wall_ns=10**6 * S, now_mono_ns=60 * S) == 1_000 * S + 10 * S - max_age
    # A backward step adopts the lower reading: inherited rows only ever get younger.
    assert a.inherited_cutoff_ns(now_wall_ns=500 * S, now_mono_ns=60 * S) == 500 * S - max_age
    assert a.inherited_cutoff_ns(now_wall_ns=10**6 * S, now_mono_ns=70 * S) == 510 * S - max_age
    # Once the process has been up max_age, everything inherited is older than that: all expired.
    assert a.inherited_cutoff_ns(now_wall_ns=0, now_mono_ns=150 * S) is None
    # Times are held for the rows still there only.
    a.note_inserted(14, [90 * S, 95 * S])  # consecutive: the same run of rows
    assert a.tracked == 5
    a.forget_below(13)
    assert a.tracked == 3 and a.expired_through(now_mono_ns=171 * S) == 0  # 11, 12 are gone: none left expired
    assert a.expired_through(now_mono_ns=191 * S) == 14
    a.forget_below(10**9)
    assert a.tracked == 0 and a.expired_through(now_mono_ns=10**6 * S) == 0


async def test_monotonic_times_are_held_for_the_rows_still_spooled_only(tmp_path: Path) -> None:
    spool = await SqliteSpool.open(tmp_path / "spool.db", max_bytes=10**9, max_age_s=MAX_AGE_S, commit_interval_s=0.01)
    try:
        for r in range(50):  # 100 in, 90 out each round: the spool never empties
            for i in range(r * 100, r * 100 + 100):
                spool.put(obs(i))
            await spool.flush()
            spool.ack(await spool.take(90))
            await spool.flush()
        tracked = spool._store.ageing.tracked
        assert len(spool) == 500 and tracked <= 500 + 100, tracked  # not the 5000 put this run
    finally:
        await spool.aclose()
