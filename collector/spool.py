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

The class is synchronous and not thread-safe: the service calls it from one worker thread.

**Dead letters.** Points InfluxDB refuses for good (a 400 that bisection narrowed down to one
line) are appended to a JSON-lines file, one object a line::

    {"time": "2025-01-31T12:00:00.123456789Z", "at_ns": 1738324800123456789,
     "reason": "partial write: field type conflict: …", "status": 400, "line": "edgeprobe_tcp,…"}

flushed and fsynced before the line leaves the spool.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Literal

SCHEMA_VERSION = 1


class SpoolError(Exception):
    """The spool could not be opened, written or read (disk full, I/O error, corrupt file)."""


class SpoolLockedError(SpoolError):
    """Another process has this spool open."""


@dataclass(frozen=True, slots=True)
class SpoolState:
    depth: int  # lines waiting to be written
    bytes: int  # their size, UTF-8 bytes
    oldest_received_at_ns: int | None  # when the oldest waiting line was received; None when empty


def _line_bytes(line: str) -> int:
    return len(line.encode("utf-8", "surrogatepass"))


class Spool:
    """A FIFO of line-protocol lines in SQLite. Open with :meth:`open` (or as a context manager)."""

    def __init__(
        self, path: str | os.PathLike[str] | None, *, synchronous: Literal["full", "normal"] = "full"
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.synchronous = synchronous
        self._db: sqlite3.Connection | None = None
        self._lock_file: IO[bytes] | None = None
        self._depth = 0
        self._bytes = 0
        self._oldest_ns: int | None = None

    # ---- lifecycle -----------------------------------------------------------------------

    @property
    def durable(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else "(in memory)"

    def open(self) -> Spool:
        """Create or open the file, take the lock, and load the depth of what a previous run left.

        Without a path the spool lives in memory (same behaviour, no durability, no lock).
        """
        if self.path is None:
            self._connect(":memory:")
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock_path = self.path.with_name(self.path.name + ".lock")
            lock_file = lock_path.open("ab")
        except OSError as err:
            raise SpoolError(f"spool {self}: {err.strerror or err}") from err
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            lock_file.close()
            raise SpoolLockedError(f"spool {self} is in use by another process (locked: {lock_path})") from err
        self._lock_file = lock_file
        self._connect(self.path)
        return self

    def _connect(self, target: str | Path) -> None:
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves. check_same_thread=False: the
            # service opens it in one thread and uses it from its single worker thread.
            db = sqlite3.connect(target, isolation_level=None, check_same_thread=False, timeout=30.0)
            self._db = db
            if self.path is not None:
                mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise SpoolError(f"spool {self}: SQLite refused WAL mode (got {mode!r})")
            db.execute(f"PRAGMA synchronous={'FULL' if self.synchronous == 'full' else 'NORMAL'}")
            db.execute(
                "CREATE TABLE IF NOT EXISTS lines ("
                " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
                " received_at_ns INTEGER NOT NULL,"
                " line TEXT NOT NULL)"
            )
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            row = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(CAST(line AS BLOB))), 0), MIN(received_at_ns) FROM lines"
            ).fetchone()
            self._depth, self._bytes, self._oldest_ns = int(row[0]), int(row[1]), row[2]
        except sqlite3.Error as err:
            self.close()
            raise SpoolError(f"spool {self}: {err}") from err

    def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()
        lock, self._lock_file = self._lock_file, None
        if lock is not None:
            lock.close()  # releases the flock

    def __enter__(self) -> Spool:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise SpoolError(f"spool {self} is not open")
        return self._db

    # ---- state ---------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def bytes(self) -> int:
        return self._bytes

    def state(self) -> SpoolState:
        return SpoolState(self._depth, self._bytes, self._oldest_ns)

    # ---- queue ---------------------------------------------------------------------------

    def append(self, lines: Sequence[str], received_at_ns: int | None = None) -> None:
        """Add lines at the end and commit (durable when this returns). Raises SpoolError."""
        if not lines:
            return
        at_ns = time.time_ns() if received_at_ns is None else received_at_ns
        db = self._conn()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT INTO lines(received_at_ns, line) VALUES (?, ?)", ((at_ns, ln) for ln in lines))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as err:
            raise SpoolError(f"spool {self}: append failed: {err}") from err
        self._depth += len(lines)
        self._bytes += sum(_line_bytes(ln) for ln in lines)
        if self._oldest_ns is None:
            self._oldest_ns = at_ns

    def peek(self, limit: int) -> list[tuple[int, str]]:
        """Up to ``limit`` of the oldest lines as ``(seq, line)``, oldest first."""
        try:
            rows = self._conn().execute("SELECT seq, line FROM lines ORDER BY seq LIMIT ?", (limit,)).fetchall()
        except sqlite3.Error as err:
            raise SpoolError(f"spool {self}: read failed: {err}") from err
        return [(int(seq), str(line)) for seq, line in rows]

    def delete_through(self, seq: int) -> int:
        """Remove every line up to and including ``seq`` (they are written); returns how many."""
        db = self._conn()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                count, size = db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(LENGTH(CAST(line AS BLOB))), 0) FROM lines WHERE seq <= ?", (seq,)
                ).fetchone()
                db.execute("DELETE FROM lines WHERE seq <= ?", (seq,))
                oldest = db.execute("SELECT received_at_ns FROM lines ORDER BY seq LIMIT 1").fetchone()
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as err:
            raise SpoolError(f"spool {self}: delete failed: {err}") from err
        self._depth -= int(count)
        self._bytes -= int(size)
        self._oldest_ns = None if oldest is None else int(oldest[0])
        return int(count)


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
