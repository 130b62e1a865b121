"""One supervisor for every long-lived task of the agent and the collector.

A task that raises is never left dead while the rest of the process carries on (a half-alive
daemon: probing and spooling with nothing sent). :meth:`Supervisor.run` awaits the task's
coroutine; when it raises, the crash is logged with its traceback, counted
(:attr:`Supervisor.restarts`, reported as ``task_restarts`` in health and status), and the task is
started again after a delay of the shared backoff (:mod:`edgeprobe.backoff`). When a task crashes
more than ``max_restarts`` times within ``window_s`` seconds (monotonic clock) the supervisor gives
up: it logs one last CRITICAL line naming the task, the count and the last cause, and raises
:class:`TaskFailedError`, which the daemon lets propagate so the process exits non-zero and its
service manager restarts it.

A task that returns ends normally (it was asked to stop); cancellation passes through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import msgspec

from edgeprobe.backoff import Backoff

T = TypeVar("T")

__all__ = ["SuperviseConfig", "Supervisor", "TaskFailedError", "Wakeup"]


class SuperviseConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """``supervise:`` in the agent's and the collector's config."""

    max_restarts: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 5  # crashes tolerated per window
    window_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 300.0
    restart_min_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 0.5  # the backoff between restarts
    restart_max_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0

    def __post_init__(self) -> None:
        if self.restart_max_s < self.restart_min_s:
            raise ValueError("restart_max_s: must be >= restart_min_s")


class TaskFailedError(RuntimeError):
    """A supervised task crashed too often: the process should exit non-zero."""

    def __init__(self, task: str, crashes: int, window_s: float, cause: BaseException) -> None:
        self.task = task
        self.crashes = crashes
        self.window_s = window_s
        self.cause = cause
        super().__init__(
            f"task {task} crashed {crashes} times within {window_s:g} s, giving up "
            f"(last error: {type(cause).__name__}: {_text(cause)})"
        )


def _text(err: BaseException) -> str:
    """The error in one bounded line, control characters escaped (it may quote what a peer sent)."""
    text = (str(err) or type(err).__name__)[:500]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class Supervisor:
    """Runs tasks, restarting them after a crash; see the module docstring."""

    def __init__(
        self,
        config: SuperviseConfig,
        log: logging.Logger,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.log = log
        self.restarts = 0  # restarts of all tasks since the process started
        self.by_task: dict[str, int] = {}
        self._rng = rng
        self._clock = clock

    async def run(self, name: str, start: Callable[[], Awaitable[T]], *, stop: asyncio.Event | None = None) -> T:
        """Await ``start()`` until it returns; restart it after each crash (see the module docstring).
        ``stop`` set cuts the delay before a restart short (the task is restarted at once, to see
        it and end). Raises :class:`TaskFailedError` when it crashed more than ``max_restarts``
        times within ``window_s``."""
        cfg = self.config
        backoff = Backoff(cfg.restart_min_s, cfg.restart_max_s, self._rng)
        crashes: deque[float] = deque()
        while True:
            started = self._clock()
            try:
                return await start()
            except Exception as err:
                now = self._clock()
                if now - started > cfg.window_s:
                    backoff.reset()  # it had run well for a while: this is a new problem
                crashes.append(now)
                while crashes and now - crashes[0] > cfg.window_s:
                    crashes.popleft()
                if len(crashes) > cfg.max_restarts:
                    failed = TaskFailedError(name, len(crashes), cfg.window_s, err)
                    self.log.critical(
                        "%s; exiting so that the service manager restarts the process", failed, exc_info=err
                    )
                    raise failed from err
                delay = backoff.next_delay_s()
                self.restarts += 1
                self.by_task[name] = self.by_task.get(name, 0) + 1
                self.log.error(
                    "task %s crashed (%s: %s); restarting it in %.1f s (crash %d of at most %d within %g s)",
                    name,
                    type(err).__name__,
                    _text(err),
                    delay,
                    len(crashes),
                    cfg.max_restarts,
                    cfg.window_s,
                    exc_info=err,
                )
            if stop is None:
                await asyncio.sleep(delay)
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stop.wait()


class Wakeup:
    """A flag that any number of sources set and one task awaits, with a timeout.

    ``asyncio.wait_for(event.wait(), t)`` wraps every wait in a task of its own (Python 3.11), and
    waiting on several events means a task per event plus ``asyncio.wait``: a handful of loop
    callbacks per wait. A daemon loop that wakes a hundred times a second (the agent's publisher)
    spent a good part of its CPU there. Here a wait is one future and one timer handle; ``set``
    from a callback (or another task) resolves it.
    """

    __slots__ = ("_future", "_set")

    def __init__(self) -> None:
        self._set = False
        self._future: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._set = True
        future = self._future
        if future is not None and not future.done():
            future.set_result(None)

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    async def wait(self, timeout_s: float | None = None) -> bool:
        """Until set (True at once if it is) or ``timeout_s`` passed (False). One waiter at a time."""
        if self._set:
            return True
        if self._future is not None:
            raise RuntimeError("Wakeup.wait: another task is waiting already")
        loop = asyncio.get_running_loop()
        future = self._future = loop.create_future()
        handle = None if timeout_s is None else loop.call_later(max(0.0, timeout_s), _expire, future)
        try:
            await future
        finally:
            self._future = None
            if handle is not None:
                handle.cancel()
        return self._set


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
