"""When each (job, target) runs, and whether the agent keeps up.

Slots are aligned to the wall clock at ``k * interval + offset``, with an offset derived from the
agent id, job and target (a hash), so a fleet with the same config does not fire in lock step,
and one agent's targets spread over the interval. A slot that could not start before the next
one was due is skipped and counted, never run late in a burst.

Time: the timer, the slots in the heap and the lag all run on the monotonic clock; the wall
clock only places the slots (the alignment above) and stamps what is written. The alignment is
an anchor, wall minus monotonic, taken at start. A wall-clock step (NTP correcting a host that
booted with the wrong time, an operator's ``date -s``) changes that difference: the scheduler
logs the step once, re-anchors, and re-places the slots waiting in the heap on the new wall
clock. Probing never pauses for the length of a backward step nor bursts after a forward one,
and no slot is counted as skipped because of one.

One timer for all targets: a single task keeps every (job, target)'s next slot in a heap, sleeps
until the earliest, and starts each due run as its own task; a finished run puts its target's
next slot back. A thousand targets cost one wake-up per distinct due time, not a thousand
sleeping tasks with a timer each.

Overload: every observation carries ``sched_lag_ms`` (how late its run started: timer, event
loop and the ``max_concurrent_probes`` limit together). A run later than
:func:`overload_threshold_ms` is flagged ``overloaded: true``, counted, and a warning is logged at
most every :data:`OVERLOAD_WARN_EVERY_S`; the agent reports itself overloaded (:attr:`Scheduler.overloaded`)
until :data:`OVERLOAD_HOLD_S` have passed without such a run.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from edgeprobe.agent.config import Job
from edgeprobe.probes.context import ProbeContext
from edgeprobe.probes.geo import physics
from edgeprobe.probes.handler import run_probe
from edgeprobe.probes.wake import WAKE_GRID_NS, call_at_ns, grid_ceil_ns
from edgeprobe.schema import Observation

log = logging.getLogger("edgeprobe.agent.scheduler")

OVERLOAD_LAG_MS: Final = 50.0  # a run starting later than this is "overloaded" …
OVERLOAD_INTERVAL_SHARE: Final = 0.1  # … or later than this share of its job's interval, if less
OVERLOAD_WARN_EVERY_S: Final = 10.0  # at most one overload (and one skipped-slot) warning per this
OVERLOAD_HOLD_S: Final = 60.0  # the agent stays "overloaded" this long after the last late run
CLOCK_STEP_NS: Final = 1_000_000_000  # a change of wall minus monotonic larger than this is a step


def offset_ns(agent_id: str, job: str, target: str, interval_ns: int) -> int:
    """Deterministic offset within the interval for this agent, job and target (pure)."""
    digest = hashlib.sha256(f"{agent_id}\0{job}\0{target}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % interval_ns


def next_slot_ns(now_ns: int, interval_ns: int, offset: int) -> int:
    """The first slot ``k * interval + offset`` at or after ``now_ns`` (pure)."""
    k = -((offset - now_ns) // interval_ns)  # ceil((now - offset) / interval)
    return k * interval_ns + offset


def grid_offset_ns(offset: int, interval_ns: int, grid_ns: int = WAKE_GRID_NS) -> int:
    """``offset`` (on the monotonic clock, within the interval) moved up to the wake-up grid when
    ``interval_ns`` is a whole number of grid steps, so every slot ``k * interval + offset`` is a
    grid tick, when the ICMP engine wakes too (probes/wake.py); else unchanged (pure)."""
    if interval_ns % grid_ns:
        return offset
    return grid_ceil_ns(offset, grid_ns) % interval_ns


def clock_step_ns(anchor_ns: int, wall_ns: int, mono_ns: int) -> int | None:
    """How far the wall clock stepped since ``anchor_ns`` (wall minus monotonic then), or None
    when it moved with the monotonic clock up to :data:`CLOCK_STEP_NS` (pure)."""
    step = (wall_ns - mono_ns) - anchor_ns
    return step if abs(step) > CLOCK_STEP_NS else None


def overload_threshold_ms(interval_s: float) -> float:
    """How late a run of a job with this interval may start before it counts as overloaded (pure)."""
    return min(OVERLOAD_LAG_MS, OVERLOAD_INTERVAL_SHARE * interval_s * 1000.0)


def following_slot_ns(slot_ns: int, ended_ns: int, interval_ns: int, offset: int) -> tuple[int, int]:
    """(the next slot to run after the run of ``slot_ns`` ended at ``ended_ns``, slots skipped) (pure).

    Normally the slot after ``slot_ns``; when the run ended after that one was due, the first slot
    at or after the end, and the ones in between are skipped.
    """
    following = slot_ns + interval_ns
    if ended_ns <= following:
        return following, 0
    resumed = next_slot_ns(ended_ns, interval_ns, offset)
    return resumed, (resumed - following) // interval_ns


class RateLimitedCount:
    """Counts events and says when to report them: at the first, then at most every ``every_s``
    (pure given the clock readings passed in)."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.pending = 0  # events since the last report
        self.worst = 0.0  # the largest value since the last report
        self._last_report_s: float | None = None

    def note(self, now_s: float, value: float = 0.0, n: int = 1) -> tuple[int, float] | None:
        """Record ``n`` events; returns (events, worst value) to report now, or None to stay quiet."""
        self.pending += n
        self.worst = max(self.worst, value)
        if self._last_report_s is not None and now_s - self._last_report_s < self.every_s:
            return None
        report = (self.pending, self.worst)
        self.pending, self.worst, self._last_report_s = 0, 0.0, now_s
        return report


@dataclass(frozen=True, slots=True)
class _Entry:
    job: Job
    target: str
    interval_ns: int
    offset: int


class Scheduler:
    def __init__(
        self,
        agent_id: str,
        jobs: list[Job],
        ctx: ProbeContext,
        emit: Callable[[Observation], None],
        max_concurrent: int,
        agent_at: tuple[float, float] | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.agent_at = agent_at  # (latitude, longitude): with a target's, gives the physical floor
        self.jobs = jobs
        self.ctx = ctx
        self.emit = emit
        self._sem = asyncio.Semaphore(max_concurrent)
        self._seq = itertools.count()
        self.produced = 0
        self.skipped_slots = 0
        self.in_flight = 0
        self.overloaded_runs = 0  # runs flagged overloaded since start
        self._last_overload_s: float | None = None  # monotonic
        self._overload_warn = RateLimitedCount(OVERLOAD_WARN_EVERY_S)
        self._skip_warn = RateLimitedCount(OVERLOAD_WARN_EVERY_S)
        self._heap: list[tuple[int, int]] = []  # (slot on the monotonic clock, entry index)
        self._anchor_ns = time.time_ns() - time.monotonic_ns()  # wall minus monotonic: the alignment
        self.clock_steps = 0  # wall-clock steps seen since start
        self._entries: list[_Entry] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at_ns: int | None = None  # the slot the timer is set for
        self._runs: set[asyncio.Task[None]] = set()
        self._stopping = False

    def successor(
        self, jobs: list[Job], ctx: ProbeContext, max_concurrent: int, agent_at: tuple[float, float] | None
    ) -> Scheduler:
        """A scheduler for ``jobs`` that carries on from this one once it has stopped (a reload):
        the same sequence (an agent never reuses a number) and its counters (produced, skipped
        slots, overloaded runs, clock steps, the overload hold and warning pace) continue."""
        nxt = Scheduler(self.agent_id, jobs, ctx, self.emit, max_concurrent, agent_at)
        nxt._seq = self._seq
        nxt.produced = self.produced
        nxt.skipped_slots = self.skipped_slots
        nxt.overloaded_runs = self.overloaded_runs
        nxt.clock_steps = self.clock_steps
        nxt._last_overload_s = self._last_overload_s
        nxt._overload_warn = self._overload_warn
        nxt._skip_warn = self._skip_warn
        return nxt

    # ------------------------------------------------------------ health

    @property
    def overloaded(self) -> bool:
        """Whether a run started later than its overload threshold within the last OVERLOAD_HOLD_S."""
        last = self._last_overload_s
        return last is not None and time.monotonic() - last < OVERLOAD_HOLD_S

    def _note_lag(self, obs: Observation, job: Job, target: str) -> None:
        lag = obs.sched_lag_ms
        if lag is None:
            return
        threshold = overload_threshold_ms(job.interval_s)
        obs.overloaded = lag > threshold
        if not obs.overloaded:
            return
        self.overloaded_runs += 1
        now = time.monotonic()
        self._last_overload_s = now
        report = self._overload_warn.note(now, lag)
        if report is not None:
            runs, worst = report
            log.warning(
                "agent overloaded: %d run(s) started later than their threshold (%.0f ms for %s) since the "
                "last warning, worst %.0f ms late (%s %s); they are published with overloaded=true. "
                "Lower the probe rate (fewer targets, longer interval_s, smaller count) or raise "
                "agent.max_concurrent_probes",
                runs,
                threshold,
                job.name,
                worst,
                job.name,
                job.kind.shown_target(target),  # no credentials in logs
            )

    # ------------------------------------------------------------ the timer

    async def run(self, stop: asyncio.Event, grace_s: float) -> None:
        """Run every (job, target) until ``stop`` is set; then let runs in flight finish for up to
        ``grace_s`` before cancelling them.

        The loop timer's callback starts the runs that are due and re-arms the timer for the next
        slot: no task wakes up in between (one event-loop iteration per due time, not two)."""
        self._entries = []
        for job in self.jobs:
            interval_ns = round(job.interval_s * 1e9)
            for target in job.targets:
                self._entries.append(
                    _Entry(job, target, interval_ns, offset_ns(self.agent_id, job.name, target, interval_ns))
                )
        if not self._entries:
            await stop.wait()
            return
        now = time.monotonic_ns()
        self._anchor_ns = time.time_ns() - now
        self._heap = [(next_slot_ns(now, e.interval_ns, self._grid(e)), i) for i, e in enumerate(self._entries)]
        heapq.heapify(self._heap)
        self._stopping = False
        runs = self._runs = set()
        try:
            self._on_due()
            await stop.wait()
            self._stopping = True
            self._disarm()
            if runs:
                _, pending = await asyncio.wait(set(runs), timeout=grace_s)
                if pending:
                    log.info("cancelling %d probe run(s) still in flight at shutdown", len(pending))
        finally:
            self._stopping = True
            self._disarm()
            for task in list(runs):
                task.cancel()
            await asyncio.gather(*runs, return_exceptions=True)

    def _on_due(self) -> None:
        """The timer: start every run that is due, then arm the timer for the next slot."""
        self._timer = None
        self._timer_at_ns = None
        if self._stopping:
            return
        now = time.monotonic_ns()
        self._follow_wall_clock(now)
        heap = self._heap
        while heap and heap[0][0] <= now:
            slot, index = heapq.heappop(heap)
            entry = self._entries[index]
            task = asyncio.create_task(
                self._run_slot(index, slot), name=f"probe:{entry.job.name}:{entry.job.kind.shown_target(entry.target)}"
            )
            self._runs.add(task)
            task.add_done_callback(self._runs.discard)
        self._arm()

    def _arm(self) -> None:
        """Set the timer for the earliest slot unless it is set for that one or sooner."""
        heap = self._heap
        if self._stopping or not heap:
            return
        at_ns = heap[0][0]
        if self._timer is not None:
            if self._timer_at_ns is not None and self._timer_at_ns <= at_ns:
                return
            self._timer.cancel()
        self._timer_at_ns = at_ns
        self._timer = call_at_ns(asyncio.get_running_loop(), at_ns, self._on_due)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at_ns = None

    def _grid(self, entry: _Entry) -> int:
        """The entry's wall-clock offset as an offset on the monotonic clock (current anchor); on
        the agent's wake-up grid when the interval is a whole number of its steps."""
        return grid_offset_ns((entry.offset - self._anchor_ns) % entry.interval_ns, entry.interval_ns)

    def _follow_wall_clock(self, mono_ns: int) -> None:
        """Notice a wall-clock step; re-anchor and re-place the waiting slots on the new grid."""
        step = clock_step_ns(self._anchor_ns, time.time_ns(), mono_ns)
        if step is None:
            return
        self.clock_steps += 1
        self._anchor_ns += step
        log.warning(
            "the wall clock stepped by %+.3f s; probing goes on at its intervals (timers use the "
            "monotonic clock) and the slots are re-aligned to the new wall clock",
            step / 1e9,
        )
        self._heap = [
            (next_slot_ns(mono_ns, self._entries[i].interval_ns, self._grid(self._entries[i])), i)
            for _, i in self._heap
        ]
        heapq.heapify(self._heap)

    async def _run_slot(self, index: int, slot: int) -> None:
        entry = self._entries[index]
        try:
            await self.run_once(entry.job, entry.target, slot)
        except Exception:  # a bug in emit or the like: log it, keep the target scheduled
            log.exception("%s %s: run failed", entry.job.name, entry.job.kind.shown_target(entry.target))
        if self._stopping:
            return
        now = time.monotonic_ns()
        grid = self._grid(entry)
        following, missed = following_slot_ns(slot, now, entry.interval_ns, grid)
        # A clock step re-aligned the grid while this run was in flight: snap forward onto it.
        following = next_slot_ns(following, entry.interval_ns, grid)
        if missed:
            self.skipped_slots += missed
            report = self._skip_warn.note(time.monotonic(), (now - slot - entry.interval_ns) / 1e6, missed)
            if report is not None:
                log.warning(
                    "%d slot(s) skipped since the last warning because a run outlasted its interval "
                    "(worst %.0f ms over; last: %s %s)",
                    report[0],
                    report[1],
                    entry.job.name,
                    entry.target,
                )
        heapq.heappush(self._heap, (following, index))
        self._arm()

    async def run_once(self, job: Job, target: str, scheduled_mono_ns: int | None) -> Observation:
        async with self._sem:
            self.in_flight += 1
            try:
                obs = await run_probe(
                    job.kind,
                    target,
                    job.config,
                    self.ctx,
                    seq=next(self._seq),
                    job=job.name,
                    labels=job.labels_for(target),
                    scheduled_mono_ns=scheduled_mono_ns,
                )
            finally:
                self.in_flight -= 1
        target_at = job.target_at.get(target)
        if self.agent_at is not None and target_at is not None:
            for key, value in physics(job.kind, target, obs.fields, self.agent_at, target_at).items():
                setattr(obs, key, value)
        self._note_lag(obs, job, target)
        self.produced += 1
        self.emit(obs)
        return obs
