"""The one place that wraps every probe run with timing, a hard deadline and a typed outcome.

Probes only measure. Whatever they raise is turned into an :class:`~edgeprobe.schema.Observation`
here: :class:`ProbeFailure` keeps its outcome and partial result, a deadline overrun becomes
``timeout``, anything else goes through :func:`~edgeprobe.probes.outcome.classify_exception` (OS
errors by errno, DNS, TLS; else ``error`` with the exception named).

The observation's ``target`` is the kind's ``display_target`` of the target run (credentials in a
URL's query replaced): it is what MQTT and InfluxDB get. Whatever that hides is also taken out of
the failure reason and the result's text fields, in case they quote it (a server may echo a URL).

A kind's ``prepare`` (work too heavy for the event loop, once per process: scapy's import) runs
here too, in a worker thread and before the run's clock starts: done on the loop, it stalled every
probe in flight for half a second, and their timings with it (a DNS answer read 0.5 s late).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, unquote_plus

import msgspec

from edgeprobe.probes.context import ProbeContext
from edgeprobe.probes.kind import REDACTED, AnyKind
from edgeprobe.probes.outcome import Outcome, ProbeFailure, classify_exception
from edgeprobe.schema import Observation

# Added to a kind's own longest run time to make the hard limit (see ProbeKind.max_run_s).
HANDLER_GRACE_S = 1.0


_prepared: set[str] = set()  # the kinds whose prepare has run in this process
_preparing = threading.Lock()  # one prepare at a time: concurrent first runs wait for the one


def _prepare_once(name: str, prepare: Callable[[], None]) -> None:
    """In a worker thread: ``prepare`` unless another caller has done it meanwhile."""
    with _preparing:
        if name not in _prepared:
            prepare()
            _prepared.add(name)


def _unprepared(kind: AnyKind) -> Callable[[], None] | None:
    """The kind's ``prepare`` when it has one that has not run in this process, else None."""
    return None if kind.name in _prepared else kind.prepare


async def prepare_kinds(kinds: Iterable[AnyKind]) -> None:
    """Run the ``prepare`` of each kind not yet prepared in this process, in a worker thread.

    Raises what a ``prepare`` raised (that kind stays unprepared: its next run tries again).
    """
    todo = {k.name: prepare for k in kinds if (prepare := _unprepared(k)) is not None}
    failed: Exception | None = None
    for name, prepare in todo.items():
        try:
            await asyncio.to_thread(_prepare_once, name, prepare)
        except Exception as exc:  # the others are still prepared; the first failure is raised
            failed = failed or exc
    if failed is not None:
        raise failed


def new_id() -> str:
    return uuid.uuid4().hex


_PIECES_RE = re.compile(r"[?&;#=/]")
MIN_HIDDEN_CHARS = 4  # shorter pieces are not credentials, and replacing them would garble a reason


def hide_in_text(text: str, target: str, shown: str) -> str:
    """``text`` without what ``shown`` hides of ``target`` (pure): the target itself, then each
    piece of it (between ``? & ; # = /``) that ``shown`` no longer has, as written and decoded."""
    if shown == target:
        return text
    text = text.replace(target, shown)
    kept = set(_PIECES_RE.split(shown))
    hidden = {p for p in _PIECES_RE.split(target) if p not in kept and len(p) >= MIN_HIDDEN_CHARS}
    for piece in sorted(hidden, key=len, reverse=True):
        for form in {piece, unquote_plus(piece), quote(unquote_plus(piece), safe="")}:
            if len(form) >= MIN_HIDDEN_CHARS:
                text = text.replace(form, REDACTED)
    return text


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
    unprepared: Exception | None = None
    if _unprepared(kind) is not None:  # a check, not an await, on every run
        try:
            await prepare_kinds((kind,))
        except Exception as exc:  # the run fails with this as its reason
            unprepared = exc
    started_at_ns = time.time_ns()
    t0 = time.perf_counter_ns()
    lag_ns = None if scheduled_mono_ns is None else time.monotonic_ns() - scheduled_mono_ns
    sched_lag_ms = None if lag_ns is None else max(0.0, lag_ns / 1e6)
    fields: dict[str, Any] = {}
    reason: str | None = None
    try:
        if unprepared is not None:
            raise ProbeFailure(
                Outcome.ERROR, f"{kind.name}: cannot prepare: {type(unprepared).__name__}: {unprepared}"
            ) from unprepared
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
    shown = kind.shown_target(target)
    if shown != target:
        if reason is not None:
            reason = hide_in_text(reason, target, shown)
        fields = {k: hide_in_text(v, target, shown) if isinstance(v, str) else v for k, v in fields.items()}
    return Observation(
        id=new_id(),
        seq=seq,
        kind=kind.name,
        target=shown,
        started_at_ns=started_at_ns,
        duration_ms=round(duration_ms, 6),
        outcome=outcome.value,
        reason=reason,
        sched_lag_ms=None if sched_lag_ms is None else round(sched_lag_ms, 6),
        job=job,
        labels=dict(labels or {}),
        fields=fields,
    )
