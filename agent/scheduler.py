"""When each (job, target) runs.

Slots are aligned to the wall clock at ``k * interval + offset``, with an offset derived from the
agent id, job and target (a hash), so a fleet with the same config does not fire in lock step,
and one agent's targets spread over the interval. A slot that could not start before the next
one was due is skipped and counted, never run late in a burst.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
from collections.abc import Callable

from agent.config import Job
from probes.context import ProbeContext
from probes.handler import run_probe
from probes.schema import Observation

log = logging.getLogger("edgeprobe.agent.scheduler")


def offset_ns(agent_id: str, job: str, target: str, interval_ns: int) -> int:
    """Deterministic offset within the interval for this agent, job and target (pure)."""
    digest = hashlib.sha256(f"{agent_id}\0{job}\0{target}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % interval_ns


def next_slot_ns(now_ns: int, interval_ns: int, offset: int) -> int:
    """The first slot ``k * interval + offset`` at or after ``now_ns`` (pure)."""
    k = -((offset - now_ns) // interval_ns)  # ceil((now - offset) / interval)
    return k * interval_ns + offset


class Scheduler:
    def __init__(
        self,
        agent_id: str,
        jobs: list[Job],
        ctx: ProbeContext,
        emit: Callable[[Observation], None],
        max_concurrent: int,
    ) -> None:
        self.agent_id = agent_id
        self.jobs = jobs
        self.ctx = ctx
        self.emit = emit
        self._sem = asyncio.Semaphore(max_concurrent)
        self._seq = itertools.count()
        self.produced = 0
        self.skipped_slots = 0
        self.in_flight = 0

    async def run(self, stop: asyncio.Event, grace_s: float) -> None:
        """Run every (job, target) until ``stop`` is set; then let runs in flight finish for up to
        ``grace_s`` before cancelling them."""
        tasks = [
            asyncio.create_task(self._loop(job, target, stop), name=f"probe:{job.name}:{target}")
            for job in self.jobs
            for target in job.targets
        ]
        if not tasks:
            await stop.wait()
            return
        try:
            await stop.wait()
            _, pending = await asyncio.wait(tasks, timeout=grace_s)
            if pending:
                log.info("cancelling %d probe run(s) still in flight at shutdown", len(pending))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self, job: Job, target: str, stop: asyncio.Event) -> None:
        interval_ns = round(job.interval_s * 1e9)
        offset = offset_ns(self.agent_id, job.name, target, interval_ns)
        slot = next_slot_ns(time.time_ns(), interval_ns, offset)
        while not stop.is_set():
            delay_s = (slot - time.time_ns()) / 1e9
            if delay_s > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay_s)
                    return
                except TimeoutError:
                    pass
            await self.run_once(job, target, slot)
            now = time.time_ns()
            following = slot + interval_ns
            if now >= following:
                missed = (now - following) // interval_ns + 1
                self.skipped_slots += missed
                log.warning(
                    "%s %s: run ended %.0f ms after its next slot; skipped %d slot(s)",
                    job.name,
                    target,
                    (now - following) / 1e6,
                    missed,
                )
                following = next_slot_ns(now, interval_ns, offset)
            slot = following

    async def run_once(self, job: Job, target: str, scheduled_at_ns: int | None) -> Observation:
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
                    labels=job.labels,
                    scheduled_at_ns=scheduled_at_ns,
                )
            finally:
                self.in_flight -= 1
        self.produced += 1
        self.emit(obs)
        return obs
