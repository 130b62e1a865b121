"""The agent's wake-up grid: when the scheduler and the ICMP engine wake the event loop.

Waking up is what costs an agent most, more than the work done once awake: a wake-up from idle
runs the event loop's iteration, the selector and a context switch with cold caches. So the
scheduler starts runs, and a busy ICMP socket sends echoes, reads replies and ends deadlines,
only at points of one grid on the monotonic clock (multiples of :data:`WAKE_GRID_NS`), and one
wake-up serves all of them. At 1,000 ICMP targets every 10 s this took the agent from ~250 to
~50 wake-ups a second (measured: docs/performance.md).

What it costs in accuracy, nothing that is measured: a slot of a job whose interval is a whole
number of grid steps is placed on the grid (within one step of its hashed offset, which only
spreads targets); an echo leaves up to one step early and a reply is read up to one step late,
while RTTs come from the kernel's timestamps. A socket that was idle reads a reply at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

WAKE_GRID_NS: Final = 20_000_000  # 20 ms
# A loop timer is set this much after its time: asyncio converts to its own clock (a float) and
# could fire a few hundred ns early, which would cost an extra iteration (nothing due yet).
_LATE_S: Final = 1e-6


def grid_ceil_ns(at_ns: int, grid_ns: int) -> int:
    """The first multiple of ``grid_ns`` at or after ``at_ns`` (pure)."""
    return -(-at_ns // grid_ns) * grid_ns


def next_grid_ns(after_ns: int, grid_ns: int) -> int:
    """The first multiple of ``grid_ns`` strictly after ``after_ns`` (pure)."""
    return (after_ns // grid_ns + 1) * grid_ns


def call_at_ns(loop: asyncio.AbstractEventLoop, at_ns: int, callback: Callable[[], object]) -> asyncio.TimerHandle:
    """A loop timer for ``at_ns`` on ``time.monotonic_ns()``: never before it (at once if past)."""
    return loop.call_at(loop.time() + max(0.0, (at_ns - time.monotonic_ns()) / 1e9) + _LATE_S, callback)
