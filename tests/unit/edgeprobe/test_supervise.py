"""edgeprobe.supervise: restart after a crash (logged, counted), give up after too many within the window."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from edgeprobe.supervise import SuperviseConfig, Supervisor, TaskFailedError, Wakeup

FAST = SuperviseConfig(max_restarts=2, window_s=10, restart_min_s=0.001, restart_max_s=0.002)


async def test_a_crashed_task_is_restarted_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    async def task() -> str:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise OSError(f"boom {calls}\x1b[2J")
        return "done"

    sup = Supervisor(FAST, logging.getLogger("t"), rng=random.Random(1))
    assert await sup.run("worker", task) == "done"
    assert calls == 3 and sup.restarts == 2 and sup.by_task == {"worker": 2}
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and all(r.exc_info is not None for r in errors)
    assert "task worker crashed (OSError: boom 1\\x1b[2J)" in errors[0].getMessage()  # escaped


async def test_too_many_crashes_within_the_window_give_up() -> None:
    async def task() -> None:
        raise ValueError("always")

    sup = Supervisor(FAST, logging.getLogger("t"))
    with pytest.raises(TaskFailedError, match=r"task worker crashed 3 times within 10 s, giving up") as info:
        await sup.run("worker", task)
    assert info.value.crashes == 3 and isinstance(info.value.cause, ValueError) and sup.restarts == 2


async def test_crashes_outside_the_window_do_not_add_up() -> None:
    now = [0.0]
    calls = 0

    async def task() -> None:
        nonlocal calls
        calls += 1
        now[0] += 6.0  # each run lasts 6 s: at most two crashes in any 10 s window
        if calls < 10:
            raise RuntimeError("now and then")

    sup = Supervisor(FAST, logging.getLogger("t"), clock=lambda: now[0])
    await sup.run("worker", task)
    assert sup.restarts == 9


async def test_stop_cuts_the_restart_delay_short_and_cancellation_passes() -> None:
    slow = SuperviseConfig(max_restarts=5, window_s=10, restart_min_s=3600, restart_max_s=3600)
    stop = asyncio.Event()
    calls = 0

    async def task() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            stop.set()
            raise RuntimeError("once")

    await asyncio.wait_for(Supervisor(slow, logging.getLogger("t")).run("w", task, stop=stop), 5)
    assert calls == 2

    async def forever() -> None:
        await asyncio.Event().wait()

    running = asyncio.create_task(Supervisor(slow, logging.getLogger("t")).run("w", forever))
    await asyncio.sleep(0)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running


# ---- Wakeup: one waiter, many setters, a timeout, no task per wait


async def test_wakeup_set_before_the_wait_returns_at_once() -> None:
    wake = Wakeup()
    wake.set()
    assert await wake.wait(10) is True


async def test_wakeup_times_out_false_and_a_later_set_wakes_the_next_wait() -> None:
    wake = Wakeup()
    assert await wake.wait(0.01) is False
    loop = asyncio.get_running_loop()
    loop.call_soon(wake.set)
    assert await asyncio.wait_for(wake.wait(10), 5) is True  # woken by the callback, not the 10 s timer
    wake.clear()
    assert not wake.is_set()


async def test_wakeup_has_one_waiter_and_cancelling_it_leaves_it_usable() -> None:
    wake = Wakeup()
    first = asyncio.create_task(wake.wait())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="another task is waiting"):
        await wake.wait(1)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    wake.set()
    assert await wake.wait(1) is True


async def test_wakeup_wait_creates_no_task() -> None:
    wake = Wakeup()
    before = len(asyncio.all_tasks())
    waiting = asyncio.ensure_future(wake.wait(10))
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == before + 1  # the test's own waiting task only
    wake.set()
    assert await waiting is True
