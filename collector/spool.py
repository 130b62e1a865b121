"""The collector's durable queue between MQTT and InfluxDB, and its dead-letter file.

**Spool.** Every line of line protocol the collector makes from a message is committed here
(SQLite in WAL mode) *before* the message is acknowledged to the broker; lines leave the spool
only after InfluxDB accepted them (or refused them for good and they went to the dead-letter
file). So a message is never acknowledged while its observations exist only in memory: a crash
(SIGKILL, OOM, power loss with ``synchronous=full``) loses nothing the broker was told it may
forget, and the next start drains the spool first, oldest first.

One table, ``lines(seq INTEGER PRIMARY KEY AUTOINCREMENT, received_at_ns, line)``: ``seq`` is
the order of arrival and never reused, so "everything up to seq N is written" is one
``DELETE … WHERE seq <= N``. A line written to InfluxDB whose deletion did not commit (a crash in
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

**Dead letters.** Points InfluxDB refuses for good (a 400 that bisection narrowed down to one
line) are appended to a JSON-lines file, one object a line::

    {"time": "2025-01-31T12:00:00.123456789Z", "at_ns": 1738324800123456789,
     "reason": "partial write: field type conflict: …", "status": 400, "line": "edgeprobe_tcp,…"}

flushed and fsynced before the line leaves the spool.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgeprobe.sqlqueue import (
    QueueLayout,
    SpoolError,
    SpoolLockedError,
    SqliteQueue,
)

__all__ = ["DeadLetters", "Spool", "SpoolError", "SpoolLockedError", "SpoolState", "read_dead_letters", "rfc3339_ns"]

SCHEMA_VERSION = 1


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

    def open(self) -> Spool:
        """Create or open the file, take the lock, and load the depth of what a previous run left.

        Without a path the spool lives in memory (same behaviour, no durability, no lock).
        """
        self.open_queue()
        return self

    def _payload(self, raw: Any) -> str:
        return str(raw)

    def state(self) -> SpoolState:
        return SpoolState(self.depth, self.bytes, self.oldest_at_ns)

    def append(self, lines: Sequence[str], received_at_ns: int | None = None) -> None:
        """Add lines at the end and commit (durable when this returns). Raises SpoolError."""
        if not lines:
            return
        at_ns = time.time_ns() if received_at_ns is None else received_at_ns
        self.append_rows([(at_ns, line) for line in lines])

    def peek(self, limit: int) -> list[tuple[int, str]]:
        """Up to ``limit`` of the oldest lines as ``(seq, line)``, oldest first."""
        return [(row.seq, row.payload) for row in self.read_oldest(limit)]


def rfc3339_ns(at_ns: int) -> str:
    """``2025-01-31T12:00:00.123456789Z`` for a Unix time in nanoseconds."""
    seconds, frac = divmod(at_ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:09d}Z"


class DeadLetters:
    """Append-only JSON-lines file of points InfluxDB refused; every record is fsynced.

    Without a path nothing is recorded (the service still logs and counts refused points).
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None

    def append(self, line: str, reason: str, status: int | None = None, at_ns: int | None = None) -> None:
        """Record one refused line. Raises OSError when the file can't be written."""
        if self.path is None:
            return
        now_ns = time.time_ns() if at_ns is None else at_ns
        record = {"time": rfc3339_ns(now_ns), "at_ns": now_ns, "reason": reason, "status": status, "line": line}
        text = json.dumps(record) + "\n"  # ASCII: \u escapes for anything else
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="ascii") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


def read_dead_letters(path: str | os.PathLike[str]) -> list[dict[str, object]]:
    """The records of a dead-letter file (for tests and tools)."""
    p = Path(path)
    if not p.exists():
        return []
    with p.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
