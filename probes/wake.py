"""The agent's wake-up grid: when the agent wakes the event loop.

Waking up is what costs an agent most, more than the work done once awake: a wake-up from idle
runs the event loop's iteration, the selector and a context switch with cold caches (measured on
this project's 2-vCPU VM: ~0.6 ms of CPU per wake-up of an agent with 1,000 ICMP targets, against
~0.1 ms per probe run done with warm caches). So the scheduler starts runs, a busy ICMP socket
sends echoes, reads replies and ends deadlines, and the spool's group commit and the publisher's
autocork linger end their waits, only at points of one grid on the monotonic clock (multiples of
:data:`WAKE_GRID_NS`), and one wake-up serves all of them. At 1,000 ICMP targets every 10 s a
20 ms grid took the agent from ~250 to ~50 wake-ups a second; the 100 ms grid and the spool's and
publisher's timers on it take it to ~20 (measured: docs/performance.md).

What it costs in accuracy, nothing that is measured: a slot of a job whose interval is a whole
number of grid steps is placed on the grid (within one step of its hashed offset, which only
spreads targets); an echo leaves up to one step early (its run's interval caps the step at a
quarter of it) and a busy socket reads a reply and ends a deadline up to one step late, while
RTTs come from the kernel's timestamps and a reply later than its timeout is lost whenever it is
read. A socket that was idle reads a reply at once, so a lone ping is not held back. What a step
does cost: a run's ``duration_ms`` and the moment its result leaves can be up to a step later, and
a group commit or a batch up to a step after its interval.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

WAKE_GRID_NS: Final = 100_000_000  # 100 ms
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


def grid_delay_s(delay_s: float, now_ns: int | None = None, grid_ns: int = WAKE_GRID_NS) -> float:
    """How long to wait for at least ``delay_s`` and end on a tick of the grid (plus a timer's
    margin): a timeout that wakes the loop when the scheduler and the ICMP engine wake it anyway.
    ``now_ns``: the monotonic clock's reading to count from (default: read it)."""
    now = time.monotonic_ns() if now_ns is None else now_ns
    return (grid_ceil_ns(now + max(0, round(delay_s * 1e9)), grid_ns) - now) / 1e9 + _LATE_S
