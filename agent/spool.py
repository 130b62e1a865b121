"""The agent's spool: observations waiting for the broker's acknowledgement.

The scheduler ``put`` s every observation; the publisher ``take`` s the oldest in order, sends
them at QoS 1 and ``ack`` s them when the broker acknowledged (PUBACK), which deletes them, or
``release`` s them when it did not, so they are taken again (first) after a reconnect. A taken
batch is "in flight" until acked or released: it cannot be taken twice.

Two implementations behind one :class:`Spool` protocol (and one test suite):

- :class:`SqliteSpool` (the daemon's default): one SQLite file in WAL mode, one table of
  encoded observations (msgspec JSON) keyed by an autoincrement rowid (the order), with their
  enqueue time and size, plus a ``meta`` table of counters that survive restarts. Puts are
  grouped: a writer task commits what arrived every ``commit_interval_s`` (or at
  ``commit_max_observations``), in one transaction per group on a thread of its own, so the
  event loop (and the probes' timing) never waits for the disk. **An observation is durable
  once its group commit ran**: with ``synchronous=FULL`` (default) that means on disk (the WAL
  is fsynced at every commit), surviving a power loss; with ``normal`` it survives a crash of
  the process but not of the machine. The publisher only sees committed observations, so
  nothing is ever sent that was not spooled first. Acks are deleted in the next group commit.
  The file itself (directory, lock, WAL, schema version, errors) is handled by
  :mod:`edgeprobe.sqlqueue`, shared with the collector's spool: a file of a schema version this
  agent does not know is refused, never overwritten; one that is not a database is moved aside.
- :class:`MemorySpool` (``spool.path: null``): the same in a deque; lost with the process.

Both are bounded by bytes (of encoded observations) and by age: when a bound is hit the oldest
observations that are not in flight are dropped and counted by reason (``bytes``, ``age``);
the SQLite spool keeps those counts in the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol, TypeVar

from edgeprobe.agent.config import SpoolConfig
from edgeprobe.schema import Observation, encode
from edgeprobe.sqlqueue import QueueLayout, SpoolCorruptError, SpoolError, SqliteQueue, Synchronous, lock_holder

__all__ = [
    "MemorySpool",
    "Spool",
    "SpoolEntry",
    "SpoolError",
    "SpoolFileInfo",
    "SpoolStats",
    "SqliteSpool",
    "inspect_spool",
    "open_spool",
    "spool_lines",
]

log = logging.getLogger("edgeprobe.agent.spool")

T = TypeVar("T")

SCHEMA_VERSION = 1
DROP_REASONS = ("bytes", "age")
_AGE_CHUNK = 5000
_VACUUM_MIN_FREE_PAGES = 1024
_NO_TRIM = 2**62  # "protect every row": a commit while a take is selecting trims nothing


class SpoolEntry(NamedTuple):
    rowid: int  # order: older entries have smaller rowids
    enqueued_at_ns: int  # wall clock when put
    payload: bytes  # one Observation, msgspec JSON

    @property
    def size_bytes(self) -> int:
        return len(self.payload)


@dataclass(frozen=True, kw_only=True)
class SpoolStats:
    durable: bool
    path: str | None
    depth: int  # observations in the spool (in flight included, uncommitted excluded)
    bytes: int  # their encoded size
    pending: int  # put but not yet committed (SQLite only; lost if the process dies now)
    in_flight: int
    oldest_enqueued_at_ns: int | None
    dropped_bytes_limit: int  # over the spool's lifetime (persisted for SQLite)
    dropped_age_limit: int
    dropped_this_run: int
    errors: int  # failed commits in this process
    max_bytes: int
    max_age_s: float

    def oldest_age_s(self, now_ns: int | None = None) -> float | None:
        if self.oldest_enqueued_at_ns is None:
            return None
        return max(0.0, ((time.time_ns() if now_ns is None else now_ns) - self.oldest_enqueued_at_ns) / 1e9)


class Spool(Protocol):
    """What the daemon and the publisher need from a spool (see the module docstring)."""

    durable: bool

    def put(self, obs: Observation) -> None:
        """Queue one observation (never blocks; SQLite: durable after the next group commit)."""

    def __len__(self) -> int:
        """Observations held (committed, in flight included)."""

    @property
    def dropped(self) -> int:
        """Observations dropped over a bound during this run (both reasons)."""

    def available(self) -> int:
        """Observations that ``take`` would return (committed, not in flight)."""

    def oldest_available_at_ns(self) -> int | None:
        """Enqueue time of the oldest available observation (flush timing)."""

    async def take(self, n: int) -> list[SpoolEntry]:
        """Up to ``n`` of the oldest available observations, in order; they are now in flight."""

    def ack(self, entries: Sequence[SpoolEntry]) -> None:
        """The broker has them: delete them."""

    def release(self, entries: Sequence[SpoolEntry]) -> None:
        """Not acknowledged: available again, before anything newer."""

    def stats(self) -> SpoolStats: ...

    async def wait_changed(self, timeout_s: float | None) -> None:
        """Return when something became available (or after ``timeout_s``)."""

    async def flush(self) -> None:
        """Commit what was put so far (SQLite); returns when it is durable."""

    async def aclose(self) -> None:
        """Flush and close; what is still held stays for the next start (SQLite)."""


def _drop_counts_zero() -> dict[str, int]:
    return dict.fromkeys(DROP_REASONS, 0)


class _DropLog:
    """Logs drops as they happen, at most once per ``every_s`` per reason (counts add up between)."""

    def __init__(self, where: str, max_bytes: int, max_age_s: float, every_s: float = 10.0) -> None:
        self.where = where
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.every_s = every_s
        self._unlogged = _drop_counts_zero()
        self._last: dict[str, float] = {}

    def add(self, dropped: dict[str, int]) -> None:
        now = time.monotonic()
        for reason, n in dropped.items():
            self._unlogged[reason] += n
            last = self._last.get(reason)
            if not self._unlogged[reason] or (last is not None and now - last < self.every_s):
                continue
            self._last[reason] = now
            n, self._unlogged[reason] = self._unlogged[reason], 0
            if reason == "bytes":
                log.warning(
                    "%s: dropped the %d oldest observation(s): over max_bytes (%d bytes)", self.where, n, self.max_bytes
                )
            else:
                log.warning("%s: dropped %d observation(s) older than max_age_s (%g s)", self.where, n, self.max_age_s)


# --------------------------------------------------------------------------------------------------
# In memory


class MemorySpool:
    """The spool in a deque (``spool.path: null``): same semantics, nothing survives the process."""

    durable = False

    def __init__(self, *, max_bytes: int, max_age_s: float) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._items: deque[SpoolEntry] = deque()  # available, in order
        self._in_flight: dict[int, SpoolEntry] = {}
        self._bytes = 0
        self._next_rowid = 1
        self._changed = asyncio.Event()
        self._dropped = _drop_counts_zero()
        self._drop_log = _DropLog("spool (memory)", max_bytes, max_age_s)
        self._closed = False

    def __len__(self) -> int:
        return len(self._items) + len(self._in_flight)

    @property
    def dropped(self) -> int:
        return sum(self._dropped.values())

    def put(self, obs: Observation, now_ns: int | None = None) -> None:
        if self._closed:
            raise RuntimeError("spool is closed")
        payload = encode(obs)
        entry = SpoolEntry(self._next_rowid, time.time_ns() if now_ns is None else now_ns, payload)
        self._next_rowid += 1
        self._items.append(entry)
        self._bytes += len(payload)
        self._trim(entry.enqueued_at_ns)
        self._changed.set()

    def _trim(self, now_ns: int) -> None:
        dropped = _drop_counts_zero()
        cutoff = now_ns - round(self.max_age_s * 1e9)
        while self._items and self._items[0].enqueued_at_ns < cutoff:
            self._bytes -= len(self._items.popleft().payload)
            dropped["age"] += 1
        while self._items and self._bytes > self.max_bytes:
            self._bytes -= len(self._items.popleft().payload)
            dropped["bytes"] += 1
        for reason, n in dropped.items():
            self._dropped[reason] += n
        if any(dropped.values()):
            self._drop_log.add(dropped)

    def expire(self, now_ns: int | None = None) -> None:
        """Apply the age bound now (the publisher calls this now and then)."""
        self._trim(time.time_ns() if now_ns is None else now_ns)

    def available(self) -> int:
        return len(self._items)

    def oldest_available_at_ns(self) -> int | None:
        return self._items[0].enqueued_at_ns if self._items else None

    async def take(self, n: int) -> list[SpoolEntry]:
        out: list[SpoolEntry] = []
        while self._items and len(out) < n:
            entry = self._items.popleft()
            self._in_flight[entry.rowid] = entry
            out.append(entry)
        return out

    def ack(self, entries: Sequence[SpoolEntry]) -> None:
        for entry in entries:
            if self._in_flight.pop(entry.rowid, None) is not None:
                self._bytes -= len(entry.payload)

    def release(self, entries: Sequence[SpoolEntry]) -> None:
        back = [e for e in entries if self._in_flight.pop(e.rowid, None) is not None]
        self._items.extendleft(reversed(sorted(back)))
        if back:
            self._changed.set()

    def stats(self) -> SpoolStats:
        oldest = [e.enqueued_at_ns for e in self._in_flight.values()]
        if self._items:
            oldest.append(self._items[0].enqueued_at_ns)
        return SpoolStats(
            durable=False,
            path=None,
            depth=len(self),
            bytes=self._bytes,
            pending=0,
            in_flight=len(self._in_flight),
            oldest_enqueued_at_ns=min(oldest) if oldest else None,
            dropped_bytes_limit=self._dropped["bytes"],
            dropped_age_limit=self._dropped["age"],
            dropped_this_run=self.dropped,
            errors=0,
            max_bytes=self.max_bytes,
            max_age_s=self.max_age_s,
        )

    async def wait_changed(self, timeout_s: float | None) -> None:
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except TimeoutError:
            pass

    async def flush(self) -> None:
        return None

    async def aclose(self) -> None:
        self._closed = True


# --------------------------------------------------------------------------------------------------
# SQLite


_META_DDL = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID"
_COUNTERS = ("dropped_bytes_limit", "dropped_age_limit", "acknowledged_total", "created_at_ns")


class _CommitResult(NamedTuple):
    depth: int
    bytes: int
    dropped: dict[str, int]
    oldest: tuple[int, int] | None  # (rowid, enqueued_at_ns) of the oldest row, in flight or not


class _Store(SqliteQueue[bytes]):
    """The SQLite side: the queue table ``spool`` plus a ``meta`` table of counters. Every method
    runs on the spool's one thread, never on the event loop."""

    LAYOUT = QueueLayout(
        table="spool", seq="rowid", at_ns="enqueued_at_ns", payload="payload", payload_type="BLOB", size="size"
    )
    SCHEMA_VERSION = SCHEMA_VERSION
    EXTRA_DDL = (_META_DDL,)
    NEW_FILE_PRAGMAS = ("PRAGMA auto_vacuum=INCREMENTAL",)  # takes effect only when the file is new
    OWNER = "agent"
    OPEN_HINT = "set spool.path to a writable place, or to null for an in-memory spool"
    LOCKED_HINT = "each agent needs a spool.path of its own"
    ON_CORRUPT = "move_aside"

    def __init__(self, path: Path, synchronous: Synchronous) -> None:
        super().__init__(path, synchronous=synchronous)
        self.counters: dict[str, int] = {}
        self._commit_log: IO[str] | None = None

    def open(self, commit_log: str | None) -> tuple[int, int, dict[str, int], tuple[int, int] | None]:
        """Directory, lock, file (a corrupt one is moved aside), counters. Raises SpoolError."""
        self.open_queue()
        try:
            if commit_log is not None:
                self._commit_log = open(commit_log, "a", encoding="ascii")  # noqa: SIM115
            return self.depth, self.bytes, dict(self.counters), self.first_after(0)
        except OSError as err:
            self.close()
            raise SpoolError(f"cannot open the commit log {commit_log}: {err.strerror or err}") from err
        except BaseException:
            self.close()
            raise

    def _payload(self, raw: Any) -> bytes:
        return bytes(raw)

    def _create(self, db: sqlite3.Connection) -> None:
        for key in _COUNTERS:
            db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                (key, time.time_ns() if key == "created_at_ns" else 0),
            )

    def _load(self) -> None:
        super()._load()
        try:
            self.counters = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.Error as err:
            raise self._translate("open", err) from err

    def _moved_aside(self, aside: Path, err: SpoolCorruptError) -> None:
        log.error("%s: moved to %s, starting empty", err, aside)

    def first_after(self, rowid: int) -> tuple[int, int] | None:
        try:
            return self._first_after(self.conn, rowid)
        except sqlite3.Error as err:
            raise self._translate("read", err) from err

    def commit(
        self,
        items: list[tuple[int, bytes, str]],
        acks: list[tuple[int, int]],
        now_ns: int,
        protect_upto: int,
        max_bytes: int,
        max_age_ns: int,
        dropped_before: dict[str, int],
    ) -> _CommitResult:
        """Insert ``items``, delete ``acks``, apply the bounds, add ``dropped_before`` (dropped
        from memory before they got here) to the counters: one transaction."""
        dropped = _drop_counts_zero()
        depth, size = self.depth, self.bytes
        with self.transaction("commit") as db:
            if items:
                n, added = self._insert(db, [(at, payload) for at, payload, _ in items])
                depth += n
                size += added
            if acks:
                cur = db.executemany("DELETE FROM spool WHERE rowid = ?", [(rowid,) for rowid, _ in acks])
                if cur.rowcount == len(acks):
                    depth -= len(acks)
                    size -= sum(s for _, s in acks)
                else:  # some were gone already (cannot happen with one publisher): recount
                    depth, size = self._totals(db)
                db.execute("UPDATE meta SET value = value + ? WHERE key = 'acknowledged_total'", (len(acks),))
            # Age: the oldest first, in chunks, stopping at the first chunk with nothing expired.
            first = self._first_after(db, protect_upto)
            cutoff = now_ns - max_age_ns
            while first is not None and first[1] < cutoff:
                where = (
                    "WHERE rowid IN (SELECT rowid FROM spool WHERE rowid > ? ORDER BY rowid LIMIT ?)"
                    " AND enqueued_at_ns < ?"
                )
                args = (protect_upto, _AGE_CHUNK, cutoff)
                n, freed = db.execute(f"SELECT count(*), coalesce(sum(size), 0) FROM spool {where}", args).fetchone()
                if not n:
                    break
                db.execute(f"DELETE FROM spool {where}", args)
                dropped["age"] += n
                depth -= n
                size -= freed
                first = self._first_after(db, protect_upto)
            # Bytes: drop the oldest (not in flight) until under the bound.
            if size > max_bytes:
                excess, freed, cut = size - max_bytes, 0, protect_upto
                rows = db.execute("SELECT rowid, size FROM spool WHERE rowid > ? ORDER BY rowid", (protect_upto,))
                for rowid, row_size in rows:
                    if freed >= excess:
                        break
                    freed += row_size
                    cut = rowid
                rows.close()
                n, freed = self._delete_range(db, protect_upto, cut)
                dropped["bytes"] += n
                depth -= n
                size -= freed
            for reason, key in (("bytes", "dropped_bytes_limit"), ("age", "dropped_age_limit")):
                n = dropped[reason] + dropped_before.get(reason, 0)
                if n:
                    db.execute("UPDATE meta SET value = value + ? WHERE key = ?", (n, key))
            oldest = self._first_after(db, 0)
        self._depth, self._bytes, self._oldest_at_ns = depth, size, oldest[1] if oldest else None
        if self._commit_log is not None and items:
            # Debug record for fault tests: ids become durable here (after the COMMIT returned).
            self._commit_log.write("".join(f"{obs_id}\n" for _, _, obs_id in items))
            self._commit_log.flush()
        if depth == 0 and acks:
            # Emptied: give back the space a backlog took (if the file has auto_vacuum).
            with contextlib.suppress(sqlite3.Error):
                if self.conn.execute("PRAGMA freelist_count").fetchone()[0] > _VACUUM_MIN_FREE_PAGES:
                    self.conn.execute("PRAGMA incremental_vacuum")
        return _CommitResult(depth, size, dropped, oldest)

    def select(self, after: int, limit: int) -> list[SpoolEntry]:
        return [SpoolEntry(row.seq, row.at_ns, row.payload) for row in self.read_oldest(limit, after=after)]

    def close(self) -> None:
        if self._commit_log is not None:
            self._commit_log.close()
            self._commit_log = None
        super().close()


class SqliteSpool:
    """The durable spool (see the module docstring). Create with :meth:`open`."""

    durable = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int,
        max_age_s: float,
        commit_interval_s: float = 0.05,
        commit_max_observations: int = 1000,
        synchronous: str = "full",
        commit_log: str | None = None,
    ) -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError("synchronous: expected 'full' or 'normal'")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.commit_interval_s = commit_interval_s
        self.commit_max_observations = commit_max_observations
        self.synchronous = synchronous
        self._commit_log_path = commit_log
        self._store = _Store(self.path, "full" if synchronous == "full" else "normal")
        self._executor: ThreadPoolExecutor | None = None
        # Loop-side state (only the event loop thread touches it).
        self._pending: list[tuple[int, bytes, str]] = []  # (enqueued_at_ns, payload, id), not committed
        self._pending_bytes = 0
        self._acks: list[tuple[int, int]] = []  # (rowid, size) acknowledged, delete not committed
        self._in_flight: dict[int, SpoolEntry] = {}
        self._taking = False
        self._depth = 0  # committed rows (as of the last commit)
        self._bytes = 0
        self._oldest: tuple[int, int] | None = None  # oldest committed row (rowid, enqueued_at_ns)
        self._available_since_ns: int | None = None  # ≈ enqueue time of the oldest available row
        self._dropped_total = _drop_counts_zero()
        self._dropped_unsaved = _drop_counts_zero()  # counted in memory, not yet in the file
        self._drop_log = _DropLog(f"spool {self.path}", max_bytes, max_age_s)
        self._dropped_run = 0
        self.errors = 0
        self._changed = asyncio.Event()
        self._dirty = asyncio.Event()
        self._full = asyncio.Event()
        self._committed = asyncio.Event()
        self._committing = False
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False

    @classmethod
    async def open(cls, path: str | os.PathLike[str], **kwargs: Any) -> SqliteSpool:
        """Open (or create) the spool file, lock it for this process, start the writer."""
        spool = cls(path, **kwargs)
        await spool._open()
        return spool

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise SpoolError("spool is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _open(self) -> None:
        # The store takes the lock, creates the directory and opens the file on the spool's thread.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeprobe-spool")
        try:
            depth, size, counters, oldest = await self._run(self._store.open, self._commit_log_path)
        except BaseException:
            await self._release_resources()
            raise
        self._depth, self._bytes, self._oldest = depth, size, oldest
        self._available_since_ns = oldest[1] if oldest else None
        self._dropped_total = {
            "bytes": counters.get("dropped_bytes_limit", 0),
            "age": counters.get("dropped_age_limit", 0),
        }
        if depth and oldest:
            log.info(
                "spool %s: %d observation(s) (%d bytes) from before, oldest %.0f s old: they go out first",
                self.path,
                depth,
                size,
                (time.time_ns() - oldest[1]) / 1e9,
            )
        else:
            log.info("spool %s: empty", self.path)
        self._writer = asyncio.create_task(self._write_loop(), name="spool-writer")

    async def _release_resources(self) -> None:
        if self._executor is not None:
            with contextlib.suppress(Exception):
                await self._run(self._store.close)  # closes the file and releases the lock
            self._executor.shutdown(wait=True)
            self._executor = None

    # ----- the Spool protocol -----------------------------------------------------------------

    def __len__(self) -> int:
        return self._depth

    @property
    def dropped(self) -> int:
        return self._dropped_run

    def put(self, obs: Observation) -> None:
        if self._closing:
            raise RuntimeError("spool is closed")
        payload = encode(obs)
        self._pending.append((time.time_ns(), payload, obs.id))
        self._pending_bytes += len(payload)
        if self._pending_bytes > self.max_bytes:  # the disk stalls or fails: memory is bounded too
            self._bound_pending()
        self._dirty.set()
        if len(self._pending) >= self.commit_max_observations:
            self._full.set()

    def available(self) -> int:
        return max(0, self._depth - len(self._in_flight))

    def oldest_available_at_ns(self) -> int | None:
        return self._available_since_ns if self.available() > 0 else None

    async def take(self, n: int) -> list[SpoolEntry]:
        if self.available() <= 0 or n < 1 or self._taking:
            return []
        after = max(self._in_flight, default=0)
        self._taking = True  # a commit submitted meanwhile trims nothing (it cannot see our rows yet)
        try:
            rows = await self._run(self._store.select, after, n + 1)
        finally:
            self._taking = False
        rows = [r for r in rows if r.rowid not in self._in_flight]
        batch, rest = rows[:n], rows[n:]
        for entry in batch:
            self._in_flight[entry.rowid] = entry
        if rest:
            self._available_since_ns = rest[0].enqueued_at_ns
        else:
            self._available_since_ns = time.time_ns() if self.available() > 0 else None
        return batch

    def ack(self, entries: Sequence[SpoolEntry]) -> None:
        # They stay "in flight" (never taken again) until the delete is committed.
        self._acks.extend((e.rowid, e.size_bytes) for e in entries if e.rowid in self._in_flight)
        if entries:
            self._dirty.set()

    def release(self, entries: Sequence[SpoolEntry]) -> None:
        back = [e for e in entries if self._in_flight.pop(e.rowid, None) is not None]
        if back:
            first = min(e.enqueued_at_ns for e in back)
            if self._available_since_ns is None or first < self._available_since_ns:
                self._available_since_ns = first
            self._changed.set()

    def stats(self) -> SpoolStats:
        return SpoolStats(
            durable=True,
            path=str(self.path),
            depth=self._depth,
            bytes=self._bytes,
            pending=len(self._pending),
            in_flight=len(self._in_flight),
            oldest_enqueued_at_ns=self._oldest[1] if self._oldest else None,
            dropped_bytes_limit=self._dropped_total["bytes"],
            dropped_age_limit=self._dropped_total["age"],
            dropped_this_run=self._dropped_run,
            errors=self.errors,
            max_bytes=self.max_bytes,
            max_age_s=self.max_age_s,
        )

    async def wait_changed(self, timeout_s: float | None) -> None:
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except TimeoutError:
            pass

    async def flush(self) -> None:
        """Commit what was put and acked until now; return when it is committed (or a commit failed)."""
        errors = self.errors
        while (self._pending or self._acks or self._committing) and self.errors == errors:
            if self._writer is None or self._writer.done():
                return
            self._committed.clear()
            self._full.set()
            self._dirty.set()
            await self._committed.wait()

    async def aclose(self) -> None:
        """Commit what is pending, stop the writer, close the file and release the lock."""
        if self._closed:
            return
        self._closing = True
        self._dirty.set()
        self._full.set()
        if self._writer is not None:
            await self._writer
        if self._pending:
            log.error("spool %s: %d observation(s) could not be committed at close", self.path, len(self._pending))
        await self._release_resources()
        self._closed = True

    # ----- the writer -------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        """Group commits: wait for a put or ack (or the age-check timer), gather for
        ``commit_interval_s`` (less when ``commit_max_observations`` are waiting), commit."""
        retry_s = 0.0
        age_check_s = min(60.0, max(1.0, self.max_age_s / 100))
        while True:
            if not self._closing:
                if retry_s:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._full.wait(), retry_s)  # flush/close cut it short
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._dirty.wait(), age_check_s)
                    if not self._full.is_set():
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._full.wait(), self.commit_interval_s)
            self._dirty.clear()
            self._full.clear()
            ok = await self._commit_once()
            self._committed.set()
            if self._closing and (not ok or not (self._pending or self._acks)):
                return
            retry_s = 0.0 if ok else min(5.0, max(0.1, retry_s * 2))

    async def _commit_once(self) -> bool:
        items, self._pending = self._pending, []
        pending_bytes, self._pending_bytes = self._pending_bytes, 0
        acks, self._acks = self._acks, []
        acked = {rowid for rowid, _ in acks}
        # While a take is selecting, its rows are not in _in_flight yet: trim nothing this time.
        protect = _NO_TRIM if self._taking else max((r for r in self._in_flight if r not in acked), default=0)
        unsaved = dict(self._dropped_unsaved)
        self._committing = True
        try:
            # Shielded: the thread finishes the transaction whatever happens to this task.
            result = await asyncio.shield(
                self._run(
                    self._store.commit,
                    items,
                    acks,
                    time.time_ns(),
                    protect,
                    self.max_bytes,
                    round(self.max_age_s * 1e9),
                    unsaved,
                )
            )
        except (sqlite3.Error, OSError, SpoolError) as err:
            self.errors += 1
            self._pending[:0] = items
            self._pending_bytes += pending_bytes
            self._acks[:0] = acks
            log.error(
                "spool %s: commit failed (%s); %d observation(s) wait in memory",
                self.path,
                err,
                len(self._pending),
            )
            self._bound_pending()
            return False
        finally:
            self._committing = False
        for reason, n in unsaved.items():  # saved now (put() may have added more meanwhile)
            self._dropped_unsaved[reason] -= n
        for rowid in acked:
            self._in_flight.pop(rowid, None)
        was_available = self.available()
        self._depth, self._bytes, self._oldest = result.depth, result.bytes, result.oldest
        if items and (self._available_since_ns is None or not was_available):
            self._available_since_ns = items[0][0]
        dropped = result.dropped
        n_dropped = sum(dropped.values())
        if n_dropped:
            for reason, n in dropped.items():
                self._dropped_total[reason] += n
            self._dropped_run += n_dropped
            self._drop_log.add(dropped)
        if items or n_dropped:
            self._changed.set()
        return True

    def _bound_pending(self) -> None:
        """While commits fail or stall, what waits in memory obeys max_bytes too (the oldest go, counted)."""
        n = 0
        while self._pending and self._pending_bytes > self.max_bytes:
            _, payload, _ = self._pending.pop(0)
            self._pending_bytes -= len(payload)
            n += 1
        if n:
            self._dropped_total["bytes"] += n
            self._dropped_unsaved["bytes"] += n
            self._dropped_run += n
            self._drop_log.add({"bytes": n})


# --------------------------------------------------------------------------------------------------
# Reading a spool file from outside the agent (``edgeprobe agent spool``)


@dataclass(frozen=True, kw_only=True)
class SpoolFileInfo:
    path: str
    exists: bool
    in_use_by_pid: int | None
    depth: int
    bytes: int
    oldest_enqueued_at_ns: int | None
    newest_enqueued_at_ns: int | None
    dropped_bytes_limit: int
    dropped_age_limit: int
    acknowledged_total: int
    created_at_ns: int | None
    file_bytes: int
    wal_bytes: int


def inspect_spool(path: str | os.PathLike[str]) -> SpoolFileInfo:
    """Depth, age and counters of a spool file, read-only (safe while the agent runs)."""
    p = Path(path)

    def size_of(q: Path) -> int:
        try:
            return q.stat().st_size
        except OSError:
            return 0

    if not p.exists():
        return SpoolFileInfo(
            path=str(p),
            exists=False,
            in_use_by_pid=None,
            depth=0,
            bytes=0,
            oldest_enqueued_at_ns=None,
            newest_enqueued_at_ns=None,
            dropped_bytes_limit=0,
            dropped_age_limit=0,
            acknowledged_total=0,
            created_at_ns=None,
            file_bytes=0,
            wal_bytes=0,
        )
    try:
        db = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True)
        try:
            depth, size = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM spool").fetchone()
            oldest = db.execute("SELECT enqueued_at_ns FROM spool ORDER BY rowid LIMIT 1").fetchone()
            newest = db.execute("SELECT enqueued_at_ns FROM spool ORDER BY rowid DESC LIMIT 1").fetchone()
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        finally:
            db.close()
    except sqlite3.Error as err:
        raise SpoolError(f"cannot read spool {p}: {err}") from err
    return SpoolFileInfo(
        path=str(p),
        exists=True,
        in_use_by_pid=lock_holder(p),
        depth=int(depth),
        bytes=int(size),
        oldest_enqueued_at_ns=int(oldest[0]) if oldest else None,
        newest_enqueued_at_ns=int(newest[0]) if newest else None,
        dropped_bytes_limit=int(meta.get("dropped_bytes_limit", 0)),
        dropped_age_limit=int(meta.get("dropped_age_limit", 0)),
        acknowledged_total=int(meta.get("acknowledged_total", 0)),
        created_at_ns=int(meta["created_at_ns"]) if "created_at_ns" in meta else None,
        file_bytes=size_of(p),
        wal_bytes=size_of(p.with_name(p.name + "-wal")),
    )


async def open_spool(cfg: SpoolConfig, agent_id: str) -> Spool:
    """The spool the config asks for: SQLite at ``spool.path`` (``{agent}`` → the id), or memory."""
    path = cfg.resolved_path(agent_id)
    if path is None:
        log.info("spool: in memory (spool.path is null): observations not yet delivered die with the process")
        return MemorySpool(max_bytes=cfg.max_bytes, max_age_s=cfg.max_age_s)
    return await SqliteSpool.open(
        path,
        max_bytes=cfg.max_bytes,
        max_age_s=cfg.max_age_s,
        commit_interval_s=cfg.commit_interval_s,
        commit_max_observations=cfg.commit_max_observations,
        synchronous=cfg.synchronous,
        commit_log=cfg.commit_log,
    )


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} bytes"  # pragma: no cover


def _human_s(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 172_800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86_400:.1f} d"


def spool_lines(info: SpoolFileInfo, max_bytes: int, max_age_s: float, now_ns: int | None = None) -> list[str]:
    """``edgeprobe agent spool`` output (pure given ``now_ns``)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    if not info.exists:
        return [f"spool {info.path}: does not exist yet (the agent creates it when it starts)"]
    user = f"in use by the agent with pid {info.in_use_by_pid}" if info.in_use_by_pid else "not in use"
    lines = [
        f"spool {info.path} ({user})",
        f"  depth:   {info.depth} observation(s), {_human_bytes(info.bytes)} (max_bytes {_human_bytes(max_bytes)})",
    ]
    if info.oldest_enqueued_at_ns is None:
        lines.append(f"  oldest:  - (empty; max_age_s {_human_s(max_age_s)})")
    else:
        age_s = max(0.0, (now_ns - info.oldest_enqueued_at_ns) / 1e9)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.oldest_enqueued_at_ns / 1e9))
        lines.append(f"  oldest:  {_human_s(age_s)} old, spooled {stamp} (max_age_s {_human_s(max_age_s)})")
    lines.append(
        f"  dropped: {info.dropped_bytes_limit} over max_bytes, {info.dropped_age_limit} over max_age_s"
        " (since the spool was created)"
    )
    lines.append(f"  acknowledged by the broker: {info.acknowledged_total} (since the spool was created)")
    lines.append(f"  file:    {_human_bytes(info.file_bytes)} + WAL {_human_bytes(info.wal_bytes)}")
    return lines
