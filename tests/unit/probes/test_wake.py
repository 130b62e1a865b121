"""The agent's wake-up grid (probes/wake.py): pure rounding, and a loop timer that never fires
before its monotonic time (one that did would cost a wasted loop iteration each time)."""

from __future__ import annotations

import asyncio
import time

from hypothesis import given
from hypothesis import strategies as st

from edgeprobe.probes.wake import WAKE_GRID_NS, call_at_ns, grid_ceil_ns, grid_delay_s, next_grid_ns


def test_grid_rounding() -> None:
    g = WAKE_GRID_NS
    assert grid_ceil_ns(0, g) == 0
    assert grid_ceil_ns(1, g) == g
    assert grid_ceil_ns(g, g) == g
    assert next_grid_ns(g, g) == 2 * g  # strictly after: a wake-up on a tick waits for the next one
    assert next_grid_ns(g - 1, g) == g


@given(st.integers(0, 10**15), st.integers(1, 10**9))
def test_grid_ceil_is_the_first_tick_at_or_after(at_ns: int, grid_ns: int) -> None:
    tick = grid_ceil_ns(at_ns, grid_ns)
    assert tick % grid_ns == 0 and at_ns <= tick < at_ns + grid_ns
    after = next_grid_ns(at_ns, grid_ns)
    assert after % grid_ns == 0 and at_ns < after <= at_ns + grid_ns


async def test_call_at_ns_never_fires_early() -> None:
    loop = asyncio.get_running_loop()
    early: list[int] = []
    for i in range(60):
        at_ns = time.monotonic_ns() + (i % 7) * 100_000  # now … 0.6 ms ahead
        fired = loop.create_future()

        def check(at_ns: int = at_ns, fired: asyncio.Future[None] = fired) -> None:
            if time.monotonic_ns() < at_ns:
                early.append(at_ns - time.monotonic_ns())
            fired.set_result(None)

        call_at_ns(loop, at_ns, check)
        await fired
    assert early == []


@given(st.integers(0, 10**15), st.floats(0, 1000, allow_nan=False), st.integers(1, 10**9))
def test_grid_delay_is_at_least_the_delay_and_ends_on_a_tick(now_ns: int, delay_s: float, grid_ns: int) -> None:
    wait_s = grid_delay_s(delay_s, now_ns, grid_ns)
    end_ns = now_ns + round((wait_s - 1e-6) * 1e9)  # without the timer's margin
    assert abs(end_ns - grid_ceil_ns(end_ns, grid_ns)) <= 1  # on a tick (float rounding aside)
    assert end_ns >= now_ns + round(delay_s * 1e9) - 1
    assert end_ns < now_ns + round(delay_s * 1e9) + grid_ns + 1  # at most one step more


def test_grid_delay_of_the_publisher_and_spool_lands_where_the_engine_wakes() -> None:
    """The spool's 0.2 s group commit and the publisher's 0.2 s linger end on a grid tick: the
    wake-up the scheduler and the ICMP engine make anyway."""
    g = WAKE_GRID_NS
    assert grid_delay_s(0.2, 5 * g) == 0.2 + 1e-6  # from a tick: exactly the interval
    assert grid_delay_s(0.2, 5 * g + 1) == (8 * g - (5 * g + 1)) / 1e9 + 1e-6  # just after one: to the next tick
    assert grid_delay_s(0.0, 5 * g + 1) == (6 * g - (5 * g + 1)) / 1e9 + 1e-6  # "at once" waits for the tick


async def test_a_wait_of_grid_delay_ends_on_a_tick() -> None:
    loop = asyncio.get_running_loop()
    woke: list[int] = []
    for _ in range(3):
        fired = loop.create_future()
        loop.call_later(grid_delay_s(0.01), lambda f=fired: f.set_result(time.monotonic_ns()))
        woke.append(await fired)
    # Never before a tick; after it by the loop's latency only (generous on a shared VM).
    assert all(0 <= t % WAKE_GRID_NS < WAKE_GRID_NS // 2 for t in woke), [t % WAKE_GRID_NS for t in woke]
