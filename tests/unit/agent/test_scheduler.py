"""The scheduler: one timer for all targets, slot arithmetic, skipped slots and the overload flag."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter

import msgspec
import pytest

from edgeprobe.agent import scheduler as sched
from edgeprobe.agent.config import Job
from edgeprobe.agent.scheduler import (
    RateLimitedCount,
    Scheduler,
    following_slot_ns,
    grid_offset_ns,
    next_slot_ns,
    overload_threshold_ms,
)
from edgeprobe.probes.context import ProbeContext
from edgeprobe.probes.kind import ProbeKind
from edgeprobe.probes.wake import WAKE_GRID_NS
from edgeprobe.schema import Observation
from tests.support.wait import wait_for_async

S = 1_000_000_000


class FakeConfig(msgspec.Struct, frozen=True, kw_only=True):
    sleep_s: float = 0.0


class FakeResult(msgspec.Struct, kw_only=True):
    ok: bool = True


def fake_kind(
    active: Counter[str] | None = None, overlaps: list[str] | None = None
) -> ProbeKind[FakeConfig, FakeResult]:
    async def run(target: str, config: FakeConfig, ctx: ProbeContext) -> FakeResult:
        if active is not None and overlaps is not None:
            if active[target]:
                overlaps.append(target)
            active[target] += 1
        try:
            await asyncio.sleep(config.sleep_s)  # the fake probe's run time
        finally:
            if active is not None:
                active[target] -= 1
        return FakeResult()

    return ProbeKind(
        name="fake",
        description="no network",
        config_type=FakeConfig,
        result_type=FakeResult,
        run=run,
        check_target=lambda t: None,
        max_run_s=lambda c: c.sleep_s,
    )


def job(kind: ProbeKind[FakeConfig, FakeResult], targets: list[str], interval_s: float, sleep_s: float = 0.0) -> Job:
    return Job(
        name="j",
        kind=kind,
        targets=tuple(targets),
        interval_s=interval_s,
        config=FakeConfig(sleep_s=sleep_s),
        labels={},
    )


async def run_for(s: Scheduler, seconds: float, grace_s: float = 1.0) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(s.run(stop, grace_s))
    await asyncio.sleep(seconds)  # the window the tests count runs in: the measurement itself
    stop.set()
    await asyncio.wait_for(task, grace_s + 5)


def test_following_slot() -> None:
    assert following_slot_ns(10 * S, 10 * S + 1, S, 0) == (11 * S, 0)
    assert following_slot_ns(10 * S, 11 * S, S, 0) == (11 * S, 0)  # ended just as the next was due: runs it
    assert following_slot_ns(10 * S, 11 * S + 1, S, 0) == (12 * S, 1)
    assert following_slot_ns(10 * S, 13 * S + 5, S, 0) == (14 * S, 3)
    slot, missed = following_slot_ns(3 * S + 7, 9 * S, 2 * S, 7)
    assert slot == next_slot_ns(9 * S, 2 * S, 7) and missed == 2


def test_slots_of_a_whole_number_of_grid_steps_are_on_the_grid() -> None:
    g = WAKE_GRID_NS
    assert grid_offset_ns(0, 10 * S) == 0
    assert grid_offset_ns(1, 10 * S) == g  # up to the next tick
    assert grid_offset_ns(10 * S - 1, 10 * S) == 0  # the tick at the interval's end is the next slot's start
    assert grid_offset_ns(7 * g, 10 * S) == 7 * g
    assert grid_offset_ns(12_345, 333_333_333) == 12_345  # not a whole number of steps: exact
    for offset in range(0, 10 * S, 999_999_937):
        moved = grid_offset_ns(offset, 10 * S)
        assert moved % g == 0 and (moved - offset) % (10 * S) < g
        assert all((k * 10 * S + moved) % g == 0 for k in range(5))


async def test_runs_start_on_the_wake_up_grid() -> None:
    """Every run of a job whose interval is a whole number of grid steps is due on a tick, the
    ticks where the ICMP engine wakes too: one wake-up serves both."""
    due: list[int] = []
    real = Scheduler.run_once

    async def recording(self: Scheduler, j: Job, target: str, scheduled_mono_ns: int | None) -> Observation:
        assert scheduled_mono_ns is not None
        due.append(scheduled_mono_ns)
        return await real(self, j, target, scheduled_mono_ns)

    seen: list[Observation] = []
    async with ProbeContext() as ctx:
        s = Scheduler("a", [job(fake_kind(), [f"t{i}" for i in range(100)], 0.5)], ctx, seen.append, 512)
        s.run_once = recording.__get__(s)  # type: ignore[method-assign]
        await run_for(s, 1.2)
    assert len(due) >= 100
    assert all(d % WAKE_GRID_NS == 0 for d in due), sorted(d % WAKE_GRID_NS for d in due)[-3:]
    assert len({d // WAKE_GRID_NS for d in due}) > 10  # still spread over the interval's ticks
    # on a tick, so not late by the rounding: lag is the loop's and the machine's only
    assert all(o.sched_lag_ms is not None and o.sched_lag_ms < 50 for o in seen)


def test_overload_threshold_is_50_ms_or_a_tenth_of_the_interval() -> None:
    assert overload_threshold_ms(60) == 50.0
    assert overload_threshold_ms(0.2) == pytest.approx(20.0)


def test_rate_limited_count_reports_first_then_every_period() -> None:
    r = RateLimitedCount(10.0)
    assert r.note(100.0, 5.0) == (1, 5.0)
    assert r.note(101.0, 7.0) is None
    assert r.note(105.0, 3.0, n=2) is None
    assert r.note(110.0, 1.0) == (4, 7.0)
    assert r.note(111.0) is None


async def test_every_target_runs_at_its_slots_without_overlap() -> None:
    active: Counter[str] = Counter()
    overlaps: list[str] = []
    kind = fake_kind(active, overlaps)
    seen: list[Observation] = []
    async with ProbeContext() as ctx:
        s = Scheduler("a", [job(kind, [f"t{i}" for i in range(200)], 0.25, sleep_s=0.05)], ctx, seen.append, 512)
        await run_for(s, 1.1)
    per_target = Counter(o.target for o in seen)
    assert set(per_target) == {f"t{i}" for i in range(200)}
    assert all(3 <= n <= 5 for n in per_target.values()), per_target
    assert not overlaps
    assert all(o.sched_lag_ms is not None and o.overloaded is not None for o in seen)
    assert s.produced == len(seen) and s.in_flight == 0


async def test_a_thousand_targets_one_timer() -> None:
    """1,000 targets: every one runs, and between runs no task waits per target (a task per target
    with its own sleep would keep 1,000 tasks alive all the time)."""
    kind = fake_kind()
    seen: list[Observation] = []
    async with ProbeContext() as ctx:
        s = Scheduler("a", [job(kind, [f"t{i}" for i in range(1000)], 0.5)], ctx, seen.append, 512)
        stop = asyncio.Event()
        task = asyncio.create_task(s.run(stop, 1.0))
        live = []
        for _ in range(5):
            await asyncio.sleep(0.1)  # samples of the task count while it runs: the measurement
            live.append(len(asyncio.all_tasks()))
        # Every target's slot falls within one 0.5 s interval; a loaded machine may need longer.
        await wait_for_async(lambda: len({o.target for o in seen}) == 1000, 10, "a run of each of 1,000 targets")
        stop.set()
        await asyncio.wait_for(task, 5)
    assert min(live) < 300, live  # the test, the scheduler, its stop watch and the runs in flight
    assert len({o.target for o in seen}) == 1000


async def test_late_runs_are_flagged_overloaded_and_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    """One run at a time for 20 targets that each take 30 ms: most start far too late."""
    kind = fake_kind()
    seen: list[Observation] = []
    caplog.set_level(logging.WARNING, logger="edgeprobe.agent.scheduler")
    async with ProbeContext() as ctx:
        s = Scheduler("a", [job(kind, [f"t{i}" for i in range(20)], 0.3, sleep_s=0.03)], ctx, seen.append, 1)
        await run_for(s, 0.7)
    late = [o for o in seen if o.overloaded]
    assert late and all((o.sched_lag_ms or 0) > 30.0 for o in late)
    assert all((o.sched_lag_ms or 0) <= 30.0 for o in seen if o.overloaded is False)
    assert s.overloaded_runs == len(late) and s.overloaded
    warnings = [r for r in caplog.records if "overloaded" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


async def test_a_run_longer_than_its_interval_skips_slots(caplog: pytest.LogCaptureFixture) -> None:
    kind = fake_kind()
    seen: list[Observation] = []
    async with ProbeContext() as ctx:
        s = Scheduler("a", [job(kind, ["slow"], 0.1, sleep_s=0.25)], ctx, seen.append, 8)
        await run_for(s, 0.9)
    assert s.skipped_slots >= 2
    starts = sorted(o.started_at_ns for o in seen)
    assert all(b - a >= 0.25 * S for a, b in itertools.pairwise(starts))


async def test_shutdown_cancels_runs_that_outlast_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    kind = fake_kind()
    seen: list[Observation] = []
    async with ProbeContext() as ctx:
        s = Scheduler("a", [job(kind, ["t"], 100.0, sleep_s=30)], ctx, seen.append, 8)
        s_entries_offset = sched.offset_ns("a", "j", "t", 100 * S)
        assert 0 <= s_entries_offset < 100 * S
        # The first slot 10 ms from now instead of somewhere in the next 100 s, so a run is in flight.
        monkeypatch.setattr(sched, "offset_ns", lambda *_: (time.time_ns() + 10_000_000) % (100 * S))
        stop = asyncio.Event()
        task = asyncio.create_task(s.run(stop, 0.1))
        await wait_for_async(lambda: s.in_flight == 1, 5, "the 30 s run in flight")
        stop.set()
        t0 = time.monotonic()
        await asyncio.wait_for(task, 5)
        assert time.monotonic() - t0 < 3
    assert s.in_flight == 0


async def test_no_targets_waits_for_stop() -> None:
    async with ProbeContext() as ctx:
        s = Scheduler("a", [], ctx, lambda o: None, 8)
        await run_for(s, 0.05)
    assert s.produced == 0
