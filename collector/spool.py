"""The collector's durable queue between MQTT and InfluxDB, and its dead-letter file.

**Spool.** Every line of line protocol the collector makes from a message is committed here
(SQLite in WAL mode) *before* the message is acknowledged to the broker; lines leave the spool
only after InfluxDB accepted them (or refused them for good and they went to the dead-letter
file). So a message is never acknowledged while its observations exist only in memory: a crash
(SIGKILL, OOM, power loss with ``synchronous=full``) loses nothing the broker was told it may
forget, and the next start drains the spool first, oldest first.

One table, ``lines(seq INTEGER PRIMARY KEY AUTOINCREMENT, received_at_ns, line)``: ``seq`` is
the order of arrival and never reused, so "everything up to seq N is written" is one
``DELETE … WHERE seq <= N``. A row holds up to :data:`ROW_LINES` lines committed together: as
``\\x1e`` + a JSON array of them (a line may hold any character, a newline in a string field
included, so they are not joined by one); a row without that mark is one line (the layout of
files written before rows held several, read as they are). Rows of many lines make a commit and
a read cost per row, not per point. :attr:`Spool.depth` counts lines; a reader takes whole rows,
so the flusher clears a row only once all its lines are written (see ``flush_loop``).

A line written to InfluxDB whose deletion did not commit (a crash in
between) is written again on restart; points are keyed by measurement, tags and timestamp, so it
overwrites itself instead of duplicating.

A spool belongs to one collector at a time: it is locked (``flock`` on ``<path>.lock``) while
open, and a second collector on the same file fails at start with :class:`SpoolLockedError`.

Without a path (``spool.path: null``) the same queue lives in memory: for tests and throwaway
collectors; it dies with the process.

Opening, locking, WAL, the schema version and error translation are :mod:`edgeprobe.sqlqueue`'s
(shared with the agent's spool): a file of a schema version this collector does not know is
refused (:class:`edgeprobe.sqlqueue.SpoolVersionError`), never overwritten.

The class is synchronous and not thread-safe: the service calls it from one worker thread.

**Dead letters.** Points InfluxDB refuses for good (a 400/413/422 that bisection narrowed down to
one line, or a line carrying a field type conflict InfluxDB reported before) are appended to a
JSON-lines file, one object a line::

    {"time": "2025-01-31T12:00:00.123456789Z", "at_ns": 1738324800123456789,
     "reason": "field_type_conflict", "error": "partial write: field type conflict: …",
     "status": 400, "measurement": "edgeprobe_tcp", "field": "dns_ms", "line": "edgeprobe_tcp,…"}

``reason`` is one of :data:`DEAD_LETTER_REASONS`; ``measurement`` and ``field`` are there for a
field type conflict. The records of one call are written and fsynced together, under an exclusive
``flock`` on ``<file>.lock``, before the lines leave the spool; ``edgeprobe collector dead-letters
replay`` takes the same lock to rewrite the file (:func:`rewrite_dead_letters`), so a record the
collector appends meanwhile is never lost. Files of earlier versions (``reason`` holding InfluxDB's
message, no ``error``) are read too (:func:`record_reason`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from edgeprobe.sqlqueue import (
    QueueLayout,
    SpoolError,
    SpoolLockedError,
    SqliteQueue,
)

__all__ = [
    "DEAD_LETTER_REASONS",
    "DeadLetter",
    "DeadLetters",
    "Spool",
    "SpoolError",
    "SpoolLockedError",
    "SpoolState",
    "iter_dead_letters",
    "read_dead_letters",
    "record_reason",
    "rewrite_dead_letters",
    "rfc3339_ns",
]

SCHEMA_VERSION = 1
ROW_LINES = 100  # lines stored together in one spool row at most (default)


@dataclass(frozen=True, slots=True)
class SpoolState:
    depth: int  # lines waiting to be written
    bytes: int  # their size, UTF-8 bytes
    oldest_received_at_ns: int | None  # when the oldest waiting line was received; None when empty


class Spool(SqliteQueue[str]):
    """A FIFO of line-protocol lines in SQLite. Open with :meth:`open` (or as a context manager)."""

    LAYOUT = QueueLayout(table="lines", seq="seq", at_ns="received_at_ns", payload="line", payload_type="TEXT")
    SCHEMA_VERSION = SCHEMA_VERSION
    OWNER = "collector"
    OPEN_HINT = "set spool.path to a writable place, or to null for an in-memory spool"
    LOCKED_HINT = "each collector needs a spool.path of its own"

    _lines = 0
    row_lines = ROW_LINES  # lines one append puts in a row at most (the collector: <= influx.batch_max_lines)

    def open(self) -> Spool:
        """Create or open the file, take the lock, and load the depth of what a previous run left.

        Without a path the spool lives in memory (same behaviour, no durability, no lock).
        """
        self.open_queue()
        return self

    def _load(self) -> None:
        super()._load()
        self._lines = self._count_lines(0, None)

    @property
    def depth(self) -> int:
        """Lines waiting (as of the last commit)."""
        return self._lines

    def _payload(self, raw: Any) -> str:
        return str(raw)

    def state(self) -> SpoolState:
        return SpoolState(self.depth, self.bytes, self.oldest_at_ns)

    def append(self, lines: Sequence[str], received_at_ns: int | None = None) -> None:
        """Add lines at the end and commit (durable when this returns). Raises SpoolError."""
        if not lines:
            return
        at_ns = time.time_ns() if received_at_ns is None else received_at_ns
        step = max(1, self.row_lines)
        self.append_rows([(at_ns, _row(lines[i : i + step])) for i in range(0, len(lines), step)])
        self._lines += len(lines)

    def peek(self, limit: int) -> list[tuple[int, str]]:
        """Up to ``limit`` of the oldest lines as ``(seq of their row, line)``, oldest first, in whole
        rows (more than ``limit`` only when the first row alone holds more)."""
        out: list[tuple[int, str]] = []
        after = 0
        while len(out) < limit:
            rows = self.read_oldest(max(1, -(-(limit - len(out)) // self.row_lines)), after=after)
            if not rows:
                break
            for row in rows:
                lines = _row_lines(row.payload)
                if out and len(out) + len(lines) > limit:
                    return out
                out.extend((row.seq, line) for line in lines)
                after = row.seq
        return out

    def delete_through(self, seq: int) -> int:
        """Remove every row up to and including ``seq``; returns how many lines they held."""
        lines = self._count_lines(0, seq)
        super().delete_through(seq)
        self._lines -= lines
        return lines

    def _count_lines(self, after: int, through: int | None) -> int:
        lay = self.LAYOUT
        where = f"WHERE {lay.seq} > ?" + (f" AND {lay.seq} <= ?" if through is not None else "")
        args = (after,) if through is None else (after, through)
        try:
            (count,) = self.conn.execute(
                f"SELECT COALESCE(SUM(CASE WHEN substr({lay.payload}, 1, 1) = char(30)"
                f" THEN json_array_length(substr({lay.payload}, 2)) ELSE 1 END), 0) FROM {lay.table} {where}",
                args,
            ).fetchone()
        except sqlite3.Error as err:
            raise self._translate("read", err) from err
        return int(count)


_ROW_MARK = "\x1e"  # a row of several lines: the mark, then a JSON array of them
_encode_lines = msgspec.json.Encoder().encode
_decode_lines = msgspec.json.Decoder(list[str]).decode


def _row(lines: Sequence[str]) -> str:
    if len(lines) == 1 and not lines[0].startswith(_ROW_MARK):
        return lines[0]
    return _ROW_MARK + _encode_lines(lines).decode("utf-8")


def _row_lines(payload: str) -> list[str]:
    return _decode_lines(payload[1:]) if payload.startswith(_ROW_MARK) else [payload]


def rfc3339_ns(at_ns: int) -> str:
    """``2025-01-31T12:00:00.123456789Z`` for a Unix time in nanoseconds."""
    seconds, frac = divmod(at_ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:09d}Z"


REASON_FIELD_TYPE_CONFLICT = "field_type_conflict"  # a field's type differs from the one InfluxDB holds
REASON_TOO_LARGE = "too_large"  # HTTP 413
REASON_REFUSED = "refused"  # any other refusal of the line (400, 422): InfluxDB's error says why
DEAD_LETTER_REASONS = (REASON_FIELD_TYPE_CONFLICT, REASON_TOO_LARGE, REASON_REFUSED)
MAX_RECORD_BYTES = 8 * 1024 * 1024  # a longer line in the file is not read (counted as unreadable)


def reason_of(status: int | None, error: str) -> str:
    """The reason code for a refusal with HTTP ``status`` and InfluxDB's ``error``."""
    if "field type conflict" in error or "invalid column type" in error:
        return REASON_FIELD_TYPE_CONFLICT
    if status == 413:
        return REASON_TOO_LARGE
    return REASON_REFUSED


def record_reason(record: dict[str, object]) -> str:
    """A record's reason code, also for records of earlier versions (``reason`` = InfluxDB's error)."""
    reason = record.get("reason")
    if isinstance(reason, str) and reason in DEAD_LETTER_REASONS:
        return reason
    status = record.get("status")
    return reason_of(status if isinstance(status, int) else None, str(reason or ""))


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One refused line and why."""

    line: str
    error: str  # InfluxDB's error (or what the collector knew of it)
    status: int | None = None
    reason: str | None = None  # None: derived from status and error (reason_of)
    measurement: str | None = None
    field: str | None = None

    def record(self, at_ns: int) -> dict[str, object]:
        out: dict[str, object] = {
            "time": rfc3339_ns(at_ns),
            "at_ns": at_ns,
            "reason": self.reason or reason_of(self.status, self.error),
            "error": self.error,
            "status": self.status,
        }
        if self.measurement is not None:
            out["measurement"] = self.measurement
        if self.field is not None:
            out["field"] = self.field
        out["line"] = self.line
        return out


@contextlib.contextmanager
def dead_letter_lock(path: Path) -> Iterator[None]:
    """Hold the exclusive lock of a dead-letter file (``<file>.lock``) while appending or rewriting."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


class DeadLetters:
    """Append-only JSON-lines file of points InfluxDB refused; every append is fsynced.

    Without a path nothing is recorded (the service still logs and counts refused points).
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None

    def append(self, line: str, error: str, status: int | None = None, at_ns: int | None = None) -> None:
        """Record one refused line. Raises OSError when the file can't be written."""
        self.append_many([DeadLetter(line, error, status)], at_ns)

    def append_many(self, letters: Sequence[DeadLetter], at_ns: int | None = None) -> None:
        """Record refused lines with one write and one fsync. Raises OSError when the file can't be
        written (then maybe some of them were: a replay writes a line twice harmlessly)."""
        if self.path is None or not letters:
            return
        now_ns = time.time_ns() if at_ns is None else at_ns
        # ASCII: \u escapes for anything else, so no record holds a raw control character.
        text = "".join(json.dumps(letter.record(now_ns)) + "\n" for letter in letters)
        with dead_letter_lock(self.path), self.path.open("a", encoding="ascii") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


def iter_dead_letters(
    path: str | os.PathLike[str], max_record_bytes: int = MAX_RECORD_BYTES, *, end: int | None = None
) -> Iterator[tuple[int, dict[str, object] | None]]:
    """``(offset, record)`` for each line of a dead-letter file up to byte ``end`` (None: to its end);
    ``record`` is None for a line that is too long, not JSON or not an object. Reads one bounded line
    at a time."""
    with Path(path).open("rb") as fh:
        offset = 0
        while end is None or offset < end:
            raw = fh.readline(max_record_bytes + 1)
            if not raw:
                return
            start = offset
            offset += len(raw)
            if len(raw) > max_record_bytes and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # skip the rest of the over-long line
                    raw = fh.readline(max_record_bytes + 1)
                    offset += len(raw)
                yield start, None
                continue
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (ValueError, RecursionError):
                record = None
            yield start, record if isinstance(record, dict) else None


def read_dead_letters(path: str | os.PathLike[str]) -> list[dict[str, object]]:
    """The records of a dead-letter file (for tests and tools)."""
    p = Path(path)
    if not p.exists():
        return []
    return [record for _, record in iter_dead_letters(p) if record is not None]


def rewrite_dead_letters(path: str | os.PathLike[str], drop: Callable[[int], bool], *, snapshot_size: int) -> int:
    """Remove the records at the offsets ``drop`` accepts (offsets below ``snapshot_size``, as read
    before) from the file, atomically: under the file's lock, the kept lines (and everything appended
    after ``snapshot_size``) go to a new file beside it, fsynced, renamed over it. Returns how many
    lines were removed. Raises OSError; the file is unchanged then."""
    p = Path(path)
    removed = 0
    with dead_letter_lock(p):
        if p.stat().st_size < snapshot_size:
            raise OSError(f"{p} shrank since it was read (another replay?): nothing removed")
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out, p.open("rb") as src:
                os.fchmod(out.fileno(), p.stat().st_mode & 0o777)
                offset, dropping, at_line_start = 0, False, True
                while raw := src.readline(1 << 20):  # bounded pieces; lines of any length are copied
                    if at_line_start:
                        dropping = offset < snapshot_size and drop(offset)
                        removed += dropping
                    if not dropping:
                        out.write(raw)
                    offset += len(raw)
                    at_line_start = raw.endswith(b"\n")
                out.flush()
                os.fsync(out.fileno())
            Path(tmp).replace(p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(p.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return removed
