"""Wall-clock steps do not stop, burst or mis-time the scheduler (timers run on the monotonic clock).

Measured before: a backward step of N seconds stopped all probing for N seconds without a log
line; a forward step fired every waiting slot at once, each flagged as seconds late.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import pytest

from edgeprobe.agent import scheduler as sched
from edgeprobe.agent.scheduler import Scheduler, clock_step_ns
from edgeprobe.probes.context import ProbeContext
from edgeprobe.schema import Observation
from tests.support.wait import wait_for_async
from tests.unit.agent.test_scheduler import fake_kind, job

S = 1_000_000_000


def test_clock_step_is_the_change_of_wall_minus_monotonic() -> None:
    anchor = 1_000 * S - 5 * S  # wall 1000 s when monotonic was 5 s
    assert clock_step_ns(anchor, 1_010 * S, 15 * S) is None  # both advanced 10 s
    assert clock_step_ns(anchor, 1_010 * S + S // 2, 15 * S) is None  # NTP slew, not a step
    assert clock_step_ns(anchor, 980 * S, 15 * S) == -30 * S
    assert clock_step_ns(anchor, 86_400 * S, 15 * S) == 86_400 * S - 1_010 * S


@pytest.mark.parametrize("step_s", [-30.0, 30.0, -86_400.0 * 30])
async def test_probing_goes_on_through_a_wall_clock_step(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, step_s: float
) -> None:
    real_time_ns = time.time_ns
    shift_ns = 0

    def wall_ns() -> int:
        return real_time_ns() + shift_ns

    monkeypatch.setattr(sched.time, "time_ns", wall_ns)
    caplog.set_level(logging.WARNING, logger="edgeprobe.agent.scheduler")
    seen: list[tuple[int, Observation]] = []  # (monotonic ns at emit, observation)
    async with ProbeContext() as ctx:
        s = Scheduler("a", [job(fake_kind(), ["t"], 0.1)], ctx, lambda o: seen.append((time.monotonic_ns(), o)), 8)
        stop = asyncio.Event()
        task = asyncio.create_task(s.run(stop, 1.0))
        await wait_for_async(lambda: len(seen) >= 3, 5, "three runs on the old clock")
        stepped_at = time.monotonic_ns()
        shift_ns = int(step_s * S)
        await wait_for_async(  # times out if probing stopped
            lambda: len([1 for at, _ in seen if at > stepped_at]) >= 6, 5, "six runs after the wall-clock step"
        )
        stop.set()
        await asyncio.wait_for(task, 5)
    after = [o for at, o in seen if at > stepped_at]
    assert s.clock_steps == 1 and s.skipped_slots == 0
    assert all((o.sched_lag_ms or 0.0) < 50.0 and not o.overloaded for o in after), [o.sched_lag_ms for o in after]
    starts = sorted(at for at, _ in seen)
    gaps_s = [(b - a) / S for a, b in itertools.pairwise(starts)]
    assert max(gaps_s) < 0.5 and min(gaps_s) > 0.02, gaps_s  # neither a pause nor a burst
    steps = [r.getMessage() for r in caplog.records if "wall clock stepped" in r.getMessage()]
    assert len(steps) == 1 and f"{step_s:+.3f} s" in steps[0], steps
    assert all(o.started_at_ns > real_time_ns() + shift_ns - 5 * S for o in after)  # stamps: the new wall clock
