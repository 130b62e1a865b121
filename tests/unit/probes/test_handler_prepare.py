"""A kind's ``prepare`` (heavy once-per-process work: scapy's import) runs off the event loop, once,
before the run's clock starts; a failure is the run's typed outcome, and the next run tries again.

Why it matters: the trace kind imported scapy (~0.5 s of CPU) on the loop at its first run, and
every probe in flight then was timed half a second late (a DNS answer read 0.5 s late).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

from edgeprobe.probes.context import ProbeContext
from edgeprobe.probes.handler import prepare_kinds, run_probe
from edgeprobe.probes.outcome import Outcome
from tests.support.kinds import EmptyConfig, hold_interpreter, stand_in_kind

HEAVY_S = 0.4  # the CPU a fake prepare spends, holding the interpreter the way an import does


class Prep:
    """A prepare that burns CPU in Python (as an import does), notes its thread, can fail once."""

    def __init__(self, fail_first: bool = False) -> None:
        self.calls: list[str] = []
        self.fail_first = fail_first

    def __call__(self) -> None:
        self.calls.append(threading.current_thread().name)
        hold_interpreter(HEAVY_S)
        if self.fail_first and len(self.calls) == 1:
            raise ImportError("no module named 'heavy'")


async def max_loop_gap_s(work: asyncio.Task[object]) -> float:
    """The longest the loop went without running a 5 ms ticker while ``work`` ran."""
    gap, last = 0.0, time.perf_counter()
    while not work.done():
        await asyncio.sleep(0.005)
        now = time.perf_counter()
        gap, last = max(gap, now - last), now
    return gap


async def test_prepare_runs_once_off_the_loop_and_outside_the_run_s_clock() -> None:
    prep = Prep()
    kind = stand_in_kind(prepare=prep)
    async with ProbeContext() as ctx:
        first = asyncio.create_task(run_probe(kind, "t", EmptyConfig(), ctx, seq=1))
        gap_s = await max_loop_gap_s(first)  # type: ignore[arg-type]
        obs = first.result()
        again = await run_probe(kind, "t", EmptyConfig(), ctx, seq=2)
    assert prep.calls and threading.main_thread().name not in prep.calls, prep.calls
    assert len(prep.calls) == 1, prep.calls  # once per process
    assert obs.outcome == again.outcome == Outcome.OK.value
    assert obs.duration_ms < HEAVY_S * 1000 / 4, obs.duration_ms  # the run's clock starts after it
    # On the loop it would stop the ticker for the whole HEAVY_S; in a thread the loop gets the
    # interpreter back every switch interval (5 ms), with generous room for a slow CI machine.
    assert gap_s < HEAVY_S / 2, gap_s


async def test_a_failed_prepare_is_the_run_s_typed_outcome_and_the_next_run_tries_again() -> None:
    prep = Prep(fail_first=True)
    kind = stand_in_kind(prepare=prep)
    async with ProbeContext() as ctx:
        failed = await run_probe(kind, "t", EmptyConfig(), ctx, seq=1)
        ok = await run_probe(kind, "t", EmptyConfig(), ctx, seq=2)
    assert failed.outcome == Outcome.ERROR.value
    assert failed.reason is not None and "cannot prepare" in failed.reason and "heavy" in failed.reason
    assert ok.outcome == Outcome.OK.value
    assert len(prep.calls) == 2


async def test_prepare_kinds_prepares_each_kind_once_and_skips_kinds_without_one() -> None:
    a, b = Prep(), Prep()
    ka, kb = stand_in_kind(prepare=a), stand_in_kind(prepare=b)
    kc = stand_in_kind()  # no prepare
    t0 = time.perf_counter()
    await prepare_kinds([ka, kb, ka, kc])
    await prepare_kinds([ka, kb])
    assert (len(a.calls), len(b.calls)) == (1, 1)
    assert time.perf_counter() - t0 < 10 * HEAVY_S


def test_the_trace_kind_imports_scapy_only_when_prepared() -> None:
    """Importing the registry does not load scapy; the trace kind's prepare does (a fresh process)."""
    code = (
        "import sys\n"
        "from edgeprobe.probes.registry import KINDS\n"
        "print('scapy.all' in sys.modules)\n"
        "KINDS['trace'].prepare()\n"
        "print('scapy.all' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "True"], out
