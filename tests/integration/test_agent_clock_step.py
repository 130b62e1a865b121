"""A backward wall-clock step does not hold back the agent's publishing (real mosquitto).

Before: observations spooled before the step looked enqueued in the future, so the flush timer
waited for the step's length (or a full batch) before sending them.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from edgeprobe.agent.config import build_jobs
from edgeprobe.agent.daemon import run_agent
from edgeprobe.localstack import MosquittoServer, free_port
from edgeprobe.schema import Observation
from tests.integration.test_agent_daemon import Collect, agent_cfg
from tests.support.wait import wait_for_async

pytestmark = pytest.mark.integration

DAY_NS = 86_400 * 1_000_000_000


async def test_spooled_observations_leave_at_once_after_a_backward_step(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_time_ns = time.time_ns
    shift_ns = 0
    monkeypatch.setattr(time, "time_ns", lambda: real_time_ns() + shift_ns)
    async with MosquittoServer(port=free_port()) as server:
        cfg = agent_cfg(server.url, None)
        produced: list[Observation] = []
        collect = Collect(server, persistent=True)
        ctask = asyncio.create_task(collect.run())
        await asyncio.wait_for(collect.ready.wait(), 10)
        stop = asyncio.Event()
        started: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        agent = run_agent(cfg, build_jobs(cfg, "t"), stop=stop, started=started, tap=produced.append)
        task = asyncio.create_task(agent)
        running = await asyncio.wait_for(started, 10)
        await wait_for_async(lambda: running.publisher.stats.acknowledged_observations > 0, 10, "publishing")
        await server.astop(keep_state=True)
        await wait_for_async(lambda: running.spool.available() >= 3, 10, "observations waiting in the spool")
        shift_ns = -30 * DAY_NS  # NTP corrects a clock that ran 30 days ahead
        await server.astart()
        await wait_for_async(lambda: running.publisher.stats.connects >= 2, 15, "the agent reconnected")
        waiting = {o.id for o in produced}
        # A full batch (500 observations at 5 a second) would take 100 s: they must go at once.
        await wait_for_async(lambda: waiting <= set(collect.ids), 5, "the observations spooled before the step")
        stop.set()
        await asyncio.wait_for(task, 15)
        ctask.cancel()
