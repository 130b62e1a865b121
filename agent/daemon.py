"""The agent daemon: scheduler → spool → publisher, with a clean shutdown, and a reload of its
config file on SIGHUP (:func:`run_agent`'s ``reload``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from edgeprobe.agent.config import RELOADABLE_KEYS, AgentConfig, Job, job_changes
from edgeprobe.agent.control import Control
from edgeprobe.agent.policy import TargetPolicy
from edgeprobe.agent.publisher import ProbeCounters, Publisher
from edgeprobe.agent.scheduler import Scheduler
from edgeprobe.agent.spool import Spool, open_spool
from edgeprobe.configfile import ConfigError, changed_keys, describe_changes, needs_restart
from edgeprobe.probes.context import ProbeContext
from edgeprobe.probes.handler import prepare_kinds
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
    # Re-read the config file as on SIGHUP (None: the agent was started without a loader).
    request_reload: Callable[[], None] | None = None

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


ConfigLoader = Callable[[], tuple[AgentConfig, list[Job]]]


@dataclass
class _FileJobs:
    """The scheduler of the file's jobs. A reload puts the new jobs in ``pending`` and sets
    ``stop``: the scheduler task lets the runs in flight finish (``agent.shutdown_grace_s``), then
    starts the successor (:meth:`Scheduler.successor`: one sequence, counters carried on)."""

    scheduler: Scheduler
    stop: asyncio.Event
    pending: tuple[list[Job], ProbeContext, AgentConfig] | None = None


async def _prepare(jobs: list[Job]) -> None:
    """Prepare the jobs' kinds before their scheduler starts, so that no run in flight is timed
    while a heavy import holds the interpreter. A failure is logged; the kind's runs report it."""
    try:
        await prepare_kinds(j.kind for j in jobs)
    except Exception as exc:
        log.warning(
            "cannot prepare a probe kind: %s: %s (its runs will fail with this reason)", type(exc).__name__, exc
        )


async def run_agent(
    cfg: AgentConfig,
    jobs: list[Job],
    *,
    stop: asyncio.Event | None = None,
    started: asyncio.Future[AgentHandles] | None = None,
    tap: Callable[[Observation], None] | None = None,
    on_ready: Callable[[], None] | None = None,
    policy: TargetPolicy | None = None,
    reload: tuple[str, ConfigLoader] | None = None,
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

    ``reload``: (the file's name, a loader returning its config and jobs validated): SIGHUP (when
    the agent owns the signals) or :attr:`AgentHandles.request_reload` re-reads it. A file that
    does not load, whose jobs break the policy (``apply_to_file_jobs``), or that changes a key
    outside :data:`~edgeprobe.agent.config.RELOADABLE_KEYS` is refused with one ERROR line naming
    the file, the key and why; what runs stays as it is. Otherwise one INFO line says what
    changed, and new jobs replace the old ones (:class:`_FileJobs`).
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
    reload_requested = asyncio.Event()
    if own_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if reload is not None:
            loop.add_signal_handler(signal.SIGHUP, reload_requested.set)
    lag = _LagMax()
    scheduler: Scheduler | None = None
    file_jobs: _FileJobs | None = None
    control: Control | None = None

    def probe_counters(take_lag: bool = True) -> ProbeCounters:
        """Scheduler counters; ``take_lag`` also resets the max-lag window (health messages only)."""
        if file_jobs is None:
            return ProbeCounters(sched_lag_max_ms=lag.take() if take_lag else None)
        scheduler = file_jobs.scheduler
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
            handles = AgentHandles(
                spool=spool,
                scheduler=scheduler,
                publisher=publisher,
                control=control,
                request_reload=reload_requested.set if reload is not None else None,
            )
            file_jobs = _FileJobs(scheduler, asyncio.Event())
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

            fj = file_jobs  # bound for the closures (mypy: not None here)
            pub_task = asyncio.create_task(
                supervised("publisher", lambda: publisher.run(publish_stop), publish_stop), name="publisher"
            )
            ctl = control
            control_task = (
                asyncio.create_task(supervised("control", lambda: ctl.run(halt), halt), name="control")
                if ctl is not None
                else None
            )

            def totals() -> tuple[int, int, int]:
                produced = fj.scheduler.produced + (ctl.produced if ctl is not None else 0)
                return produced, pub_stats.published_observations, pub_stats.acknowledged_observations

            pub_stats = publisher.stats
            summary_stop = asyncio.Event()

            def start_summary(interval_s: float, until: asyncio.Event) -> asyncio.Task[None] | None:
                if interval_s <= 0:
                    return None
                if halt.is_set():  # a reload that finished while the agent was stopping
                    until.set()
                return asyncio.create_task(
                    supervised(
                        "summary",
                        lambda: summary_loop(
                            interval_s, totals, lambda: len(spool), lambda: fj.scheduler.overloaded, until
                        ),
                        until,
                    ),
                    name="summary",
                )

            summary_task = start_summary(cfg.log.summary_interval_s, summary_stop)
            halt_watch = asyncio.create_task(halt.wait(), name="halt-watch")

            def halted(_: object) -> None:
                fj.stop.set()
                summary_stop.set()

            halt_watch.add_done_callback(halted)

            async def run_file_jobs() -> None:
                """The file's scheduler, replaced by its successor on each applied reload."""
                while True:
                    await _prepare(fj.scheduler.jobs)
                    await fj.scheduler.run(fj.stop, cfg.agent.shutdown_grace_s)
                    if halt.is_set() or fj.pending is None:
                        return
                    new_jobs, ctx_, new_cfg = fj.pending
                    fj.pending = None
                    a = new_cfg.agent
                    at = (a.latitude, a.longitude) if a.latitude is not None and a.longitude is not None else None
                    fj.scheduler = fj.scheduler.successor(new_jobs, ctx_, a.max_concurrent_probes, at)
                    fj.stop = asyncio.Event()
                    handles.scheduler = fj.scheduler
                    if ctl is not None:
                        ctl.main = fj.scheduler
                    if halt.is_set():
                        fj.stop.set()

            async def apply_reload(source: str, loader: ConfigLoader) -> None:
                nonlocal cfg, jobs, police_file_jobs, summary_task, summary_stop
                try:
                    new_cfg, new_jobs = await asyncio.to_thread(loader)
                except ConfigError as err:
                    log.error("reload refused: %s; the configuration in force stays", err)
                    return
                changed = changed_keys(cfg, new_cfg)
                restart = needs_restart(changed, RELOADABLE_KEYS)
                if restart:
                    log.error(
                        "reload refused: %s: %s cannot change while the agent runs (restart it for that); "
                        "the configuration in force stays",
                        source,
                        ", ".join(restart),
                    )
                    return
                if not changed:
                    log.info("reload: %s: nothing changed", source)
                    return
                if new_cfg.policy.apply_to_file_jobs:
                    refusal = await TargetPolicy(new_cfg.policy, policy.resolve).file_refusal(new_jobs)
                    if refusal is not None:
                        log.error("reload refused: %s: %s; the configuration in force stays", source, refusal)
                        return
                policy_changed = new_cfg.policy != cfg.policy
                if policy_changed:
                    policy.update(new_cfg.policy)
                what = describe_changes(cfg, new_cfg, [k for k in changed if not k.startswith("jobs")])
                moves = job_changes(jobs, new_jobs)
                cfg, jobs, police_file_jobs = new_cfg, new_jobs, new_cfg.policy.apply_to_file_jobs
                if ctl is not None:
                    await ctl.reload(new_cfg, new_jobs, policy_changed=policy_changed)
                if moves or any(k.startswith("agent.") or k == "policy.apply_to_file_jobs" for k in changed):
                    file_ctx = ctx.restricted(policy.address_check()) if police_file_jobs else ctx
                    fj.pending = (new_jobs, file_ctx, new_cfg)
                    fj.stop.set()
                if any(k.startswith("log.") for k in changed):
                    old_task, summary_stop = summary_task, asyncio.Event()
                    if old_task is not None:
                        old_task.cancel()
                        await asyncio.gather(old_task, return_exceptions=True)
                    summary_task = start_summary(new_cfg.log.summary_interval_s, summary_stop)
                publisher.request_status()
                log.info(
                    "reload: %s: applied: %s; now %d job(s), %d target(s)",
                    source,
                    "; ".join(([f"jobs {', '.join(moves)}"] if moves else []) + ([what] if what else []))
                    or "jobs reordered",
                    len(new_jobs),
                    sum(len(j.targets) for j in new_jobs),
                )

            async def reload_loop() -> None:
                if reload is None:
                    return
                while True:
                    waits = {asyncio.ensure_future(reload_requested.wait()), asyncio.ensure_future(halt.wait())}
                    try:
                        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for w in waits:
                            w.cancel()
                    if halt.is_set():
                        return
                    reload_requested.clear()
                    try:
                        await apply_reload(*reload)
                    except Exception:  # a bug here must not end the agent: say so, keep running
                        log.exception("reload of %s failed part-way; restart the agent to be sure what runs", reload[0])

            reload_task = asyncio.create_task(supervised("reload", reload_loop, halt), name="reload")
            try:
                await supervised("scheduler", run_file_jobs, halt)
            finally:
                halt.set()
                await reload_task
                if control_task is not None:
                    await control_task  # stops on ``halt``; ends the central jobs too
                if summary_task is not None:
                    await summary_task
                halt_watch.cancel()
                publish_stop.set()  # flush what the scheduler produced, then disconnect
                await pub_task
                stop_watch.cancel()
    finally:
        await spool.aclose()
        if own_signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
    left = len(spool)
    log.info(
        "agent stopped: %d produced, %d published, %d dropped, %d left undelivered%s",
        file_jobs.scheduler.produced if file_jobs is not None else 0,
        publisher.stats.acknowledged_observations,
        spool.dropped,
        left,
        " (kept in the spool for the next start)" if left and spool.durable else "",
    )
    if failed:
        log.critical("agent exiting with an error: %s", failed[0])
        raise failed[0]
    return handles
