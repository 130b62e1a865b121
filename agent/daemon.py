"""The agent daemon: scheduler → spool → publisher, with a clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from edgeprobe.agent.config import AgentConfig, Job
from edgeprobe.agent.control import Control
from edgeprobe.agent.policy import TargetPolicy
from edgeprobe.agent.publisher import ProbeCounters, Publisher
from edgeprobe.agent.scheduler import Scheduler
from edgeprobe.agent.spool import Spool, open_spool
from edgeprobe.configfile import ConfigError
from edgeprobe.probes.context import ProbeContext
from edgeprobe.probes.registry import KINDS
from edgeprobe.schema import Observation
from edgeprobe.supervise import Supervisor, TaskFailedError

log = logging.getLogger("edgeprobe.agent")


@dataclass
class AgentHandles:
    """What a running agent exposes to its caller (tests, the demo, the CLI)."""

    spool: Spool
    scheduler: Scheduler
    publisher: Publisher
    control: Control | None = None  # commands and central configuration (agent/control.py)

    @property
    def outbox(self) -> Spool:  # the name before the spool existed
        return self.spool


class _LagMax:
    """The largest sched_lag_ms since the last health sample."""

    def __init__(self) -> None:
        self.value: float | None = None

    def see(self, obs: Observation) -> None:
        if obs.sched_lag_ms is not None and (self.value is None or obs.sched_lag_ms > self.value):
            self.value = obs.sched_lag_ms

    def take(self) -> float | None:
        value, self.value = self.value, None
        return value


async def summary_loop(
    interval_s: float,
    counters: Callable[[], tuple[int, int, int]],
    backlog: Callable[[], int],
    overloaded: Callable[[], bool],
    stop: asyncio.Event,
) -> None:
    """Log one INFO line every ``interval_s`` (monotonic) until ``stop``: the observations produced,
    published and confirmed in the interval (``counters``: running totals), the spool backlog and
    the overloaded flag."""
    last = counters()
    t0 = time.monotonic()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
            return
        now, t1 = counters(), time.monotonic()
        produced, published, confirmed = (n - p for n, p in zip(now, last, strict=True))
        log.info(
            "last %g s: %d observations produced, %d published, %d confirmed; spool backlog %d; overloaded: %s",
            round(t1 - t0, 1),
            produced,
            published,
            confirmed,
            backlog(),
            "yes" if overloaded() else "no",
        )
        last, t0 = now, t1


async def run_agent(
    cfg: AgentConfig,
    jobs: list[Job],
    *,
    stop: asyncio.Event | None = None,
    started: asyncio.Future[AgentHandles] | None = None,
    tap: Callable[[Observation], None] | None = None,
    on_ready: Callable[[], None] | None = None,
    policy: TargetPolicy | None = None,
) -> AgentHandles:
    """Run until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None).

    ``tap``, when given, sees every observation as it is produced (live views, tests).
    ``on_ready``, when given, is called once, when the agent is first connected: the spool is
    open, the "online" status is on the broker and the control channel (if on) is subscribed.
    Every long-lived task (scheduler, publisher with its status and health, control) runs under
    an :class:`edgeprobe.supervise.Supervisor` (``cfg.supervise``): a crash is logged with its
    traceback and the task restarted; one that keeps crashing stops the agent, which then raises
    :class:`edgeprobe.supervise.TaskFailedError` (``edgeprobe agent run`` exits non-zero).
    Raises :class:`edgeprobe.agent.spool.SpoolError` when the spool cannot be opened, and
    :class:`~edgeprobe.configfile.ConfigError` when ``policy.apply_to_file_jobs`` is on and the
    file's jobs break the policy. ``policy`` replaces the one built from ``cfg.policy`` (tests: a
    resolver of their own).
    """
    policy = policy or TargetPolicy(cfg.policy)
    police_file_jobs = cfg.policy.apply_to_file_jobs
    if police_file_jobs:
        refusal = await policy.file_refusal(jobs)
        if refusal is not None:
            raise ConfigError(refusal)
    own_signals = stop is None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    spool = await open_spool(cfg.spool, cfg.agent.id)
    if own_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    lag = _LagMax()
    scheduler: Scheduler | None = None
    control: Control | None = None

    def probe_counters(take_lag: bool = True) -> ProbeCounters:
        """Scheduler counters; ``take_lag`` also resets the max-lag window (health messages only)."""
        if scheduler is None:
            return ProbeCounters(sched_lag_max_ms=lag.take() if take_lag else None)
        return ProbeCounters(
            produced=scheduler.produced + (control.produced if control is not None else 0),
            skipped_slots=scheduler.skipped_slots,
            in_flight=scheduler.in_flight,
            sched_lag_max_ms=lag.take() if take_lag else None,
            overloaded=scheduler.overloaded,
            overloaded_runs=scheduler.overloaded_runs,
        )

    publisher = Publisher(cfg, spool, sorted(KINDS), probe_counters)
    supervisor = Supervisor(cfg.supervise, log)
    failed: list[TaskFailedError] = []
    publisher.task_restarts = lambda: supervisor.restarts
    n_targets = sum(len(j.targets) for j in jobs)
    log.info(
        "agent %s at site %s: %d job(s), %d target(s), broker %s",
        cfg.agent.id,
        cfg.agent.site,
        len(jobs),
        n_targets,
        cfg.broker.url,
    )
    try:
        async with ProbeContext() as ctx:

            def emit(obs: Observation) -> None:
                spool.put(obs)
                lag.see(obs)
                if tap is not None:
                    tap(obs)

            agent_at = (
                (cfg.agent.latitude, cfg.agent.longitude)
                if cfg.agent.latitude is not None and cfg.agent.longitude is not None
                else None
            )
            file_ctx = ctx.restricted(policy.address_check()) if police_file_jobs else ctx
            scheduler = Scheduler(cfg.agent.id, jobs, file_ctx, emit, cfg.agent.max_concurrent_probes, agent_at)
            if cfg.control.accept_commands or cfg.control.accept_config:
                control = Control(cfg, jobs, scheduler, ctx, emit, policy=policy)
                control.on_status_change = publisher.request_status
                publisher.status_extra = control.status_fields
            if on_ready is not None:
                waiting = {"publisher"} if control is None else {"publisher", "control"}

                def part_ready(part: str) -> None:
                    if part in waiting:
                        waiting.discard(part)
                        if not waiting:
                            on_ready()

                publisher.on_online = lambda: part_ready("publisher")
                if control is not None:
                    control.on_subscribed = lambda: part_ready("control")
            handles = AgentHandles(spool=spool, scheduler=scheduler, publisher=publisher, control=control)
            if started is not None:
                started.set_result(handles)
            # Every long-lived task runs under the supervisor: a crash is logged and the task
            # restarted; one that keeps crashing stops the agent, which then raises TaskFailedError.
            publish_stop = asyncio.Event()
            halt = asyncio.Event()  # ``stop``, or a task that the supervisor gave up on
            stop_watch = asyncio.create_task(stop.wait(), name="stop-watch")
            stop_watch.add_done_callback(lambda _: halt.set())

            async def supervised(name: str, start: Callable[[], Awaitable[None]], until: asyncio.Event) -> None:
                try:
                    await supervisor.run(name, start, stop=until)
                except TaskFailedError as err:
                    failed.append(err)
                    halt.set()
                    publish_stop.set()

            sched = scheduler  # bound for the closure (mypy: not None here)
            pub_task = asyncio.create_task(
                supervised("publisher", lambda: publisher.run(publish_stop), publish_stop), name="publisher"
            )
            ctl = control
            control_task = (
                asyncio.create_task(supervised("control", lambda: ctl.run(halt), halt), name="control")
                if ctl is not None
                else None
            )
            summary_task: asyncio.Task[None] | None = None
            if cfg.log.summary_interval_s > 0:
                pub_stats = publisher.stats

                def totals() -> tuple[int, int, int]:
                    produced = sched.produced + (ctl.produced if ctl is not None else 0)
                    return produced, pub_stats.published_observations, pub_stats.acknowledged_observations

                summary_task = asyncio.create_task(
                    supervised(
                        "summary",
                        lambda: summary_loop(
                            cfg.log.summary_interval_s, totals, lambda: len(spool), lambda: sched.overloaded, halt
                        ),
                        halt,
                    ),
                    name="summary",
                )
            try:
                await supervised("scheduler", lambda: sched.run(halt, cfg.agent.shutdown_grace_s), halt)
            finally:
                halt.set()
                if control_task is not None:
                    await control_task  # stops on ``halt``; ends the central jobs too
                if summary_task is not None:
                    await summary_task
                publish_stop.set()  # flush what the scheduler produced, then disconnect
                await pub_task
                stop_watch.cancel()
    finally:
        await spool.aclose()
        if own_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    left = len(spool)
    log.info(
        "agent stopped: %d produced, %d published, %d dropped, %d left undelivered%s",
        scheduler.produced,
        publisher.stats.acknowledged_observations,
        spool.dropped,
        left,
        " (kept in the spool for the next start)" if left and spool.durable else "",
    )
    if failed:
        log.critical("agent exiting with an error: %s", failed[0])
        raise failed[0]
    return handles
