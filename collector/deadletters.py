"""Reading and replaying the collector's dead-letter file (``edgeprobe collector dead-letters``).

* :func:`summarize` counts the records by reason, measurement and field, with the oldest and newest
  of each group: one pass, one bounded line at a time (:data:`MAX_RECORD_BYTES`), at most
  ``max_groups`` groups (the rest are counted together).
* :func:`replay` writes the records' lines to InfluxDB again (after an operator fixed the schema:
  dropped the measurement, renamed a field), in batches, straight to InfluxDB with the collector's
  writer, so it works while the collector runs (the collector's spool is locked to it). Writes are
  idempotent (a point's key is its measurement, tags and timestamp): a line replayed twice, or
  also written by the collector, overwrites itself. Lines InfluxDB takes are then removed from the
  file atomically (:func:`edgeprobe.collector.spool.rewrite_dead_letters`, under the lock the
  collector's appends take); lines it refuses again stay as they are. A refusal that names a field
  type conflict is remembered for the rest of the replay, so a still-conflicting field costs one
  refused write, not one per line. When InfluxDB can't be reached the replay stops; what it had
  written is removed from the file, the rest stays for the next replay.

Only one replay runs at a time on a file (``<file>.replay.lock``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from edgeprobe.collector.conflicts import ConflictMemory, line_measurement
from edgeprobe.collector.influx import InfluxWriter, WriteError
from edgeprobe.collector.spool import (
    MAX_RECORD_BYTES,
    iter_dead_letters,
    record_reason,
    rewrite_dead_letters,
    rfc3339_ns,
)

MAX_GROUPS: Final = 1000
MAX_NAME_CHARS: Final = 200  # measurement and field names are clipped to this in a summary
OTHER: Final = "(other)"


class ReplayBusyError(Exception):
    """Another replay holds the file."""


@dataclass(slots=True)
class Group:
    reason: str
    measurement: str | None
    field: str | None
    count: int = 0
    oldest_at_ns: int | None = None
    newest_at_ns: int | None = None

    def add(self, at_ns: int | None) -> None:
        self.count += 1
        if at_ns is not None:
            self.oldest_at_ns = at_ns if self.oldest_at_ns is None else min(self.oldest_at_ns, at_ns)
            self.newest_at_ns = at_ns if self.newest_at_ns is None else max(self.newest_at_ns, at_ns)

    def as_dict(self) -> dict[str, object]:
        return {
            "reason": self.reason,
            "measurement": self.measurement,
            "field": self.field,
            "count": self.count,
            "oldest": rfc3339_ns(self.oldest_at_ns) if self.oldest_at_ns is not None else None,
            "newest": rfc3339_ns(self.newest_at_ns) if self.newest_at_ns is not None else None,
        }


@dataclass(slots=True)
class Summary:
    path: str
    exists: bool
    bytes: int = 0
    records: int = 0
    unreadable: int = 0  # lines too long, not JSON, or without a line
    total: Group = field(default_factory=lambda: Group("(all)", None, None))
    groups: dict[tuple[str, str | None, str | None], Group] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "exists": self.exists,
            "bytes": self.bytes,
            "records": self.records,
            "unreadable": self.unreadable,
            "oldest": self.total.as_dict()["oldest"],
            "newest": self.total.as_dict()["newest"],
            "groups": [g.as_dict() for g in self.sorted_groups()],
        }

    def sorted_groups(self) -> list[Group]:
        return sorted(self.groups.values(), key=lambda g: (-g.count, g.reason, g.measurement or "", g.field or ""))


def _str_or_none(value: object) -> str | None:
    return value[:MAX_NAME_CHARS] if isinstance(value, str) else None


def _at_ns(record: dict[str, object]) -> int | None:
    at = record.get("at_ns")
    return at if isinstance(at, int) and not isinstance(at, bool) else None


def summarize(path: str | os.PathLike[str], *, max_groups: int = MAX_GROUPS) -> Summary:
    """Count a dead-letter file's records by (reason, measurement, field). Raises OSError."""
    p = Path(path)
    summary = Summary(str(p), p.exists())
    if not summary.exists:
        return summary
    summary.bytes = p.stat().st_size
    for _, record in iter_dead_letters(p, MAX_RECORD_BYTES):
        if record is None or not isinstance(record.get("line"), str):
            summary.unreadable += 1
            continue
        summary.records += 1
        line = str(record["line"])
        measurement = _str_or_none(record.get("measurement")) or _str_or_none(line_measurement(line[:65536]))
        key = (record_reason(record), measurement, _str_or_none(record.get("field")))
        group = summary.groups.get(key)
        if group is None:
            if len(summary.groups) >= max_groups:
                key = (OTHER, None, None)
                group = summary.groups.get(key)
            if group is None:
                group = summary.groups[key] = Group(*key)
        at = _at_ns(record)
        group.add(at)
        summary.total.add(at)
    return summary


@dataclass(slots=True)
class ReplayResult:
    path: str
    reason: str | None
    dry_run: bool
    selected: int = 0  # records of the reason asked for (all: None)
    written: int = 0  # lines InfluxDB took
    refused: int = 0  # lines refused again (they stay in the file)
    removed: int = 0  # records removed from the file
    unreadable: int = 0
    writes: int = 0  # write requests sent
    error: str | None = None  # why the replay stopped early (InfluxDB unreachable …)

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "reason": self.reason,
            "dry_run": self.dry_run,
            "selected": self.selected,
            "written": self.written,
            "refused_again": self.refused,
            "removed": self.removed,
            "unreadable": self.unreadable,
            "writes": self.writes,
            "error": self.error,
        }


@contextlib.contextmanager
def _replay_lock(path: Path) -> Iterator[None]:
    fd = os.open(path.with_name(path.name + ".replay.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ReplayBusyError(f"another replay of {path} is running") from err
            raise
        yield
    finally:
        os.close(fd)


async def _write_rows(
    writer: InfluxWriter, rows: list[tuple[int, str]], memory: ConflictMemory, result: ReplayResult, taken: set[int]
) -> None:
    """Write rows (offset, line) in order, bisecting refusals; the offsets InfluxDB took go to
    ``taken``. Raises WriteError when InfluxDB can't take anything now (retryable, auth …)."""
    stack = [rows]
    while stack:
        chunk = stack.pop()
        keep = [row for row in chunk if memory.match(row[1]) is None]
        result.refused += len(chunk) - len(keep)
        if not keep:
            continue
        result.writes += 1
        try:
            await writer.write([line for _, line in keep])
        except WriteError as err:
            if not err.data_error:
                raise
            if memory.learn(err.conflicts, err.status) and any(memory.match(line) for _, line in keep):
                stack.append(keep)
            elif len(keep) == 1:
                result.refused += 1
            else:
                mid = len(keep) // 2
                stack.append(keep[mid:])
                stack.append(keep[:mid])
            continue
        result.written += len(keep)
        taken.update(offset for offset, _ in keep)


def _size(path: Path) -> int | None:
    """The file's size, None when there is no file (a CLI tool's blocking call: the loop does nothing else)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


async def replay(
    path: str | os.PathLike[str],
    writer: InfluxWriter,
    *,
    reason: str | None = None,
    dry_run: bool = False,
    batch_lines: int = 5000,
) -> ReplayResult:
    """Write a dead-letter file's lines (of ``reason``, or all) to InfluxDB again and remove the ones
    it took from the file. Raises ReplayBusyError, OSError; an InfluxDB failure ends the replay
    early with ``error`` set (what was written by then is removed from the file)."""
    p = Path(path)
    result = ReplayResult(str(p), reason, dry_run)
    if _size(p) is None:
        return result
    with _replay_lock(p):
        snapshot_size = _size(p) or 0
        taken: set[int] = set()
        memory = ConflictMemory(max_entries=10_000, recheck_s=float("inf"))
        batch: list[tuple[int, str]] = []
        try:
            for offset, record in iter_dead_letters(p, MAX_RECORD_BYTES, end=snapshot_size):
                line = record.get("line") if record is not None else None
                if record is None or not isinstance(line, str):
                    result.unreadable += 1
                    continue
                if reason is not None and record_reason(record) != reason:
                    continue
                result.selected += 1
                if dry_run:
                    continue
                batch.append((offset, line))
                if len(batch) >= batch_lines:
                    await _write_rows(writer, batch, memory, result, taken)
                    batch = []
            if batch:
                await _write_rows(writer, batch, memory, result, taken)
        except WriteError as err:
            result.error = err.message
        finally:
            if taken:
                result.removed = rewrite_dead_letters(p, taken.__contains__, snapshot_size=snapshot_size)
    return result
