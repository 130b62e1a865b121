"""The one place that wraps every probe run with timing, a hard deadline and a typed outcome.

Probes only measure. Whatever they raise is turned into an :class:`~edgeprobe.schema.Observation`
here: :class:`ProbeFailure` keeps its outcome and partial result, a deadline overrun becomes
``timeout``, anything else goes through :func:`~edgeprobe.probes.outcome.classify_exception` (OS
errors by errno, DNS, TLS; else ``error`` with the exception named).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import msgspec

from edgeprobe.probes.context import ProbeContext
from edgeprobe.probes.kind import AnyKind
from edgeprobe.probes.outcome import Outcome, ProbeFailure, classify_exception
from edgeprobe.schema import Observation

# Added to a kind's own longest run time to make the hard limit (see ProbeKind.max_run_s).
HANDLER_GRACE_S = 1.0


def new_id() -> str:
    return uuid.uuid4().hex


async def run_probe(
    kind: AnyKind,
    target: str,
    config: Any,
    ctx: ProbeContext,
    *,
    seq: int,
    job: str | None = None,
    labels: dict[str, str] | None = None,
    scheduled_mono_ns: int | None = None,
) -> Observation:
    """Run one probe of ``kind`` against ``target`` and always return an observation.

    Cancellation (shutdown) propagates: a run cut short by the caller is not a measurement.
    ``scheduled_mono_ns`` is when the run was due on ``time.monotonic_ns()``; how late it started
    is ``sched_lag_ms`` (a wall-clock step cannot make a run look late or early).
    """
    deadline_s = kind.max_run_s(config) + HANDLER_GRACE_S
    started_at_ns = time.time_ns()
    t0 = time.perf_counter_ns()
    lag_ns = None if scheduled_mono_ns is None else time.monotonic_ns() - scheduled_mono_ns
    sched_lag_ms = None if lag_ns is None else max(0.0, lag_ns / 1e6)
    fields: dict[str, Any] = {}
    reason: str | None = None
    try:
        async with asyncio.timeout(deadline_s):
            result = await kind.run(target, config, ctx)
        outcome = Outcome.OK
        fields = msgspec.to_builtins(result)
    except ProbeFailure as failure:
        outcome, reason = failure.outcome, failure.reason
        if failure.partial is not None:
            fields = msgspec.to_builtins(failure.partial)
    except TimeoutError:
        outcome, reason = Outcome.TIMEOUT, f"no result within the {deadline_s:g} s deadline"
    except Exception as exc:  # translated here, at the one boundary, with the cause named
        outcome, reason = classify_exception(exc)
    duration_ms = (time.perf_counter_ns() - t0) / 1e6
    return Observation(
        id=new_id(),
        seq=seq,
        kind=kind.name,
        target=target,
        started_at_ns=started_at_ns,
        duration_ms=round(duration_ms, 6),
        outcome=outcome.value,
        reason=reason,
        sched_lag_ms=None if sched_lag_ms is None else round(sched_lag_ms, 6),
        job=job,
        labels=dict(labels or {}),
        fields=fields,
    )
