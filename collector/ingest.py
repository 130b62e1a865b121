"""One observation message → its lines and what to count about it (pure), inline or in worker processes.

:func:`process_obs` is the whole per-message work of the collector's consumer (decode, validate,
encode to line protocol) with no I/O and no shared state, so it can run in the consumer's process
or in a pool of worker processes (``workers`` in the collector config, default: one per core). The
consumer applies the results in arrival order: counters, rejects and omissions logged, batch ids to
confirm, lines committed to the spool before the messages are acknowledged, exactly as when it did
the work itself.

A worker runs :func:`process_chunk` on a list of ``(topic, payload)``; a bug that raises while one
message is processed costs that message alone (its result carries ``error``), as inline.
"""

from __future__ import annotations

import os
import signal
import traceback
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

from edgeprobe.collector.decode import EnvelopeMeta, Reject, decode_message
from edgeprobe.collector.lineproto import encode_batch
from edgeprobe.probes.kind import AnyKind

MAX_ERROR_CHARS = 4000


@dataclass(slots=True)
class ObsResult:
    """What one observation message made: lines (maybe none), rejects, omissions, its sender."""

    total_observations: int = 0  # good + rejected individually
    rejects: list[Reject] = field(default_factory=list)
    meta: EnvelopeMeta | None = None  # None: the whole message was rejected
    lines: list[str] = field(default_factory=list)
    omitted: dict[str, int] = field(default_factory=dict)
    error: str | None = None  # processing raised (a bug): the traceback, nothing else is set


def process_obs(topic: str, payload: bytes, *, prefix: str, max_bytes: int, kinds: Mapping[str, AnyKind]) -> ObsResult:
    """Decode one observation message and encode its good observations. Never raises for bad input."""
    decoded = decode_message(topic, payload, prefix=prefix, max_bytes=max_bytes, kinds=kinds)
    out = ObsResult(total_observations=decoded.total_observations, rejects=decoded.rejects, meta=decoded.meta)
    meta = decoded.meta
    if meta is None or not decoded.observations:
        return out
    batch = encode_batch(decoded.observations, agent=meta.agent, site=meta.site, kinds=kinds, agent_labels=meta.labels)
    out.lines = batch.lines
    out.omitted = dict(batch.omitted)
    return out


def process_chunk(messages: Sequence[tuple[str, bytes]], prefix: str, max_bytes: int) -> list[ObsResult]:
    """:func:`process_obs` for each message, with the registry's kinds (runs in a worker process)."""
    from edgeprobe.probes.registry import KINDS

    out: list[ObsResult] = []
    for topic, payload in messages:
        try:
            out.append(process_obs(topic, payload, prefix=prefix, max_bytes=max_bytes, kinds=KINDS))
        except Exception:  # the boundary between one message and the rest of the chunk
            out.append(ObsResult(error=traceback.format_exc()[-MAX_ERROR_CHARS:]))
    return out


def _die_with_parent() -> None:
    """Worker initializer: end with the collector, even when it is SIGKILLed (Linux PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the collector is gone already
        os._exit(0)


def _warm() -> int:
    """Import what a worker needs before the first message arrives."""
    from edgeprobe.probes.registry import KINDS

    return len(KINDS)


def worker_count(configured: int | None) -> int:
    """Worker processes to start: ``configured``, or one per core (0 and 1: none, the consumer's own)."""
    n = (os.cpu_count() or 1) if configured is None else configured
    return n if n > 1 else 0


def start_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes, started now. Spawned (no thread of the collector is forked)
    by the calling thread, which must outlive them: each ends when the collector does."""
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_die_with_parent)
    for f in [pool.submit(_warm) for _ in range(workers)]:
        f.result(timeout=60)
    return pool


def split(messages: Sequence[tuple[str, bytes]], parts: int) -> list[Sequence[tuple[str, bytes]]]:
    """``messages`` in up to ``parts`` contiguous runs of about equal size (order kept when joined)."""
    n = len(messages)
    parts = max(1, min(parts, n))
    size, extra = divmod(n, parts)
    out: list[Sequence[tuple[str, bytes]]] = []
    at = 0
    for i in range(parts):
        step = size + (1 if i < extra else 0)
        out.append(messages[at : at + step])
        at += step
    return out
