"""The agent daemon: scheduler → outbox → publisher, with a clean shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

from agent.config import AgentConfig, Job
from agent.outbox import Outbox
from agent.publisher import Publisher
from agent.scheduler import Scheduler
from probes.context import ProbeContext
from probes.registry import KINDS
from probes.schema import Observation

log = logging.getLogger("edgeprobe.agent")


@dataclass
class AgentHandles:
    """What a running agent exposes to its caller (tests, the demo, the CLI)."""

    outbox: Outbox
    scheduler: Scheduler
    publisher: Publisher


async def run_agent(
    cfg: AgentConfig,
    jobs: list[Job],
    *,
    stop: asyncio.Event | None = None,
    started: asyncio.Future[AgentHandles] | None = None,
    tap: Callable[[Observation], None] | None = None,
) -> AgentHandles:
    """Run until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None).

    ``tap``, when given, sees every observation as it is produced (live views, tests).
    """
    own_signals = stop is None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if own_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    outbox = Outbox(cfg.publish.queue_max_observations)
    publisher = Publisher(cfg, outbox, sorted(KINDS))
    n_targets = sum(len(j.targets) for j in jobs)
    log.info(
        "agent %s at site %s: %d job(s), %d target(s), broker %s",
        cfg.agent.id,
        cfg.agent.site,
        len(jobs),
        n_targets,
        cfg.broker.url,
    )
    async with ProbeContext() as ctx:

        def emit(obs: Observation) -> None:
            outbox.put(obs)
            if tap is not None:
                tap(obs)

        scheduler = Scheduler(cfg.agent.id, jobs, ctx, emit, cfg.agent.max_concurrent_probes)
        handles = AgentHandles(outbox=outbox, scheduler=scheduler, publisher=publisher)
        if started is not None:
            started.set_result(handles)
        publish_stop = asyncio.Event()
        pub_task = asyncio.create_task(publisher.run(publish_stop), name="publisher")
        try:
            await scheduler.run(stop, cfg.agent.shutdown_grace_s)
        finally:
            publish_stop.set()  # flush what the scheduler produced, then disconnect
            await pub_task
    if own_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info(
        "agent stopped: %d produced, %d published, %d dropped, %d left undelivered",
        scheduler.produced,
        publisher.stats.published_observations,
        outbox.dropped,
        len(outbox),
    )
    return handles
