"""The agent's wake-up grid (probes/wake.py): pure rounding, and a loop timer that never fires
before its monotonic time (one that did would cost a wasted loop iteration each time)."""

from __future__ import annotations

import asyncio
import time

from hypothesis import given
from hypothesis import strategies as st

from edgeprobe.probes.wake import WAKE_GRID_NS, call_at_ns, grid_ceil_ns, next_grid_ns


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
