"""The one place that wraps every probe run with timing, a hard deadline and a typed outcome.

Probes only measure. Whatever they raise is turned into an :class:`~edgeprobe.schema.Observation`
here: :class:`ProbeFailure` keeps its outcome and partial result, a deadline overrun becomes
``timeout``, OS errors are mapped by errno, anything else is ``error`` with the exception named.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import time
import uuid
from typing import Any

import msgspec

from edgeprobe.probes.context import ProbeContext
from edgeprobe.probes.kind import AnyKind
from edgeprobe.probes.outcome import Outcome, ProbeFailure
from edgeprobe.schema import Observation

_ERRNO_OUTCOME: dict[int, Outcome] = {
    errno.ECONNREFUSED: Outcome.REFUSED,
    errno.EHOSTUNREACH: Outcome.UNREACHABLE,
    errno.ENETUNREACH: Outcome.UNREACHABLE,
    errno.EADDRNOTAVAIL: Outcome.UNREACHABLE,
    errno.ETIMEDOUT: Outcome.TIMEOUT,
    errno.EACCES: Outcome.PERMISSION_DENIED,
    errno.EPERM: Outcome.PERMISSION_DENIED,
}


# Added to a kind's own longest run time to make the hard limit (see ProbeKind.max_run_s).
HANDLER_GRACE_S = 1.0


def classify_exception(exc: BaseException) -> tuple[Outcome, str]:
    """Map a foreign exception to an outcome and a one-line reason (pure)."""
    if isinstance(exc, ProbeFailure):
        return exc.outcome, exc.reason
    if isinstance(exc, TimeoutError):
        return Outcome.TIMEOUT, str(exc) or "timed out"
    if isinstance(exc, socket.gaierror):
        return Outcome.DNS_ERROR, f"name resolution failed: {exc.strerror or exc}"
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return Outcome.TLS_ERROR, f"TLS: {exc}"
    if isinstance(exc, OSError) and exc.errno is not None:
        return _ERRNO_OUTCOME.get(exc.errno, Outcome.ERROR), exc.strerror or str(exc)
    return Outcome.ERROR, f"{type(exc).__name__}: {exc}"


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
    scheduled_at_ns: int | None = None,
) -> Observation:
    """Run one probe of ``kind`` against ``target`` and always return an observation.

    Cancellation (shutdown) propagates: a run cut short by the caller is not a measurement.
    """
    deadline_s = kind.max_run_s(config) + HANDLER_GRACE_S
    started_at_ns = time.time_ns()
    t0 = time.perf_counter_ns()
    sched_lag_ms = None if scheduled_at_ns is None else max(0.0, (started_at_ns - scheduled_at_ns) / 1e6)
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
