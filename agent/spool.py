"""The agent's spool: observations waiting for the broker's acknowledgement.

The scheduler ``put`` s every observation; the publisher ``take`` s the oldest in order, sends
them at QoS 1 and ``ack`` s them when the broker acknowledged (PUBACK), which deletes them, or
``release`` s them when it did not, so they are taken again (first) after a reconnect. A taken
batch is "in flight" until acked or released: it cannot be taken twice.

Two implementations behind one :class:`Spool` protocol (and one test suite):

- :class:`SqliteSpool` (the daemon's default): one SQLite file in WAL mode, one table of
  encoded observations (msgspec JSON) keyed by an autoincrement rowid (the order), with their
  enqueue time, size and CRC-32, plus a ``meta`` table of counters that survive restarts and a
  ``quarantine`` table. Puts are grouped: a writer task commits what arrived every
  ``commit_interval_s`` (or at ``commit_max_observations``), in one transaction per group on a
  thread of its own, so the event loop (and the probes' timing) never waits for the disk. **An
  observation is durable once its group commit ran**: with ``synchronous=FULL`` (default) that
  means on disk (the WAL is fsynced at every commit), surviving a power loss; with ``normal`` it
  survives a crash of the process but not of the machine. The publisher sees committed
  observations — and, only while commits fail (disk full, I/O errors), the uncommitted ones
  waiting in memory (see *When the disk refuses*). Acks are deleted in the next group commit.
  The file itself (directory, lock, WAL, schema version and its migrations, errors) is handled
  by :mod:`edgeprobe.sqlqueue`, shared with the collector's spool: a file of a schema version
  this agent does not know is refused, never overwritten; an older one is migrated (version 1
  files gain the checksum column: their rows, without one, are trusted); one that is not a
  database is moved aside.
- :class:`MemorySpool` (``spool.path: null``): the same in a deque; lost with the process.

**Checksums.** Every row is written with the CRC-32 of its payload and checked whenever rows are
read for publishing. A row that fails (a changed byte on the disk) is never sent — inside a batch
it would make the whole message unreadable JSON for the collector — but set aside: moved to the
``quarantine`` table (the newest :data:`QUARANTINE_MAX_ROWS` are kept there), counted in the
file (``quarantined``, also in ``edgeprobe agent spool``, status and health) and logged once per
batch with the row ids; the rest of the batch goes out.

**Bounds.** Both are bounded by bytes (of encoded observations) and by age: when a bound is hit
the oldest observations that are not in flight are dropped and counted by reason (``bytes``,
``age``, and ``memory`` for the in-memory backlog); the SQLite spool keeps those counts in the
file. The WAL counts toward ``max_bytes`` too: when the payloads plus the WAL would exceed it,
the WAL is checkpointed and truncated (``PRAGMA wal_checkpoint(TRUNCATE)``), never a row dropped
for it; it is also truncated after every commit while the spool's filesystem has less than
:data:`LOW_FREE_BYTES` free (``os.statvfs``), since SQLite would otherwise grow it to ~4 MiB
before its first checkpoint. Ageing uses the monotonic clock wherever it can: see
:class:`SpoolAgeing`.

**When the disk refuses** (a commit fails: disk full, I/O error), nothing is dropped for it: the
observations stay in an in-memory backlog, bounded by ``memory_max_observations`` and
``memory_max_bytes`` (over either, the oldest there are dropped and counted as ``memory``), the
commit is retried with :class:`edgeprobe.backoff.Backoff` (0.1 s doubling to 5 s) and one log
line says so, then at most one every :data:`FAIL_LOG_EVERY_S` while it lasts, and one when
commits work again. Meanwhile the publisher sends from that backlog (after the committed rows,
in order): what the broker acknowledges there never touches the disk; what is in flight when
the disk comes back is committed with the rest and acknowledged from the file. The backlog's
size is in the stats (``memory_backlog``) and so in status and health.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import sqlite3
import time
from array import array
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar, NamedTuple, Protocol, TypeVar

from edgeprobe.agent.config import AUTOCORK_LINGER_S, SpoolConfig
from edgeprobe.backoff import Backoff
from edgeprobe.probes.wake import grid_delay_s
from edgeprobe.schema import Observation, encode
from edgeprobe.sqlqueue import QueueLayout, SpoolCorruptError, SpoolError, SqliteQueue, Synchronous, lock_holder
from edgeprobe.supervise import Wakeup

__all__ = [
    "MemorySpool",
    "Spool",
    "SpoolAgeing",
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

SCHEMA_VERSION = 2  # 2: the crc column and the quarantine table (version 1 files are migrated)
DROP_REASONS = ("bytes", "age", "memory")
_AGE_CHUNK = 5000
_VACUUM_MIN_FREE_PAGES = 1024
_NO_TRIM = 2**62  # "protect every row": a commit while a take is selecting trims nothing
QUARANTINE_MAX_ROWS = 1000  # rows kept in the quarantine table (the newest); the counter counts all
LOW_FREE_BYTES = 64 * 1024 * 1024  # below this much free space, the WAL is truncated after every commit
FAIL_LOG_EVERY_S = 30.0  # while commits keep failing: one log line at most this often
RETRY_MIN_S = 0.1  # commit retries: Backoff(RETRY_MIN_S, RETRY_MAX_S)
RETRY_MAX_S = 5.0
_LOGGED_IDS = 20  # row ids named in one quarantine log line at most


class SpoolEntry(NamedTuple):
    rowid: int  # order: older entries have smaller rowids (< 0: from the in-memory backlog)
    enqueued_at_ns: int  # wall clock when put
    payload: bytes  # one Observation, msgspec JSON
    mono_ns: int | None = None  # monotonic clock when put, when put by this process (MemorySpool)

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
    dropped_memory_limit: int = 0  # the in-memory backlog was over its bounds (persisted when it can be)
    quarantined: int = 0  # rows that failed their checksum, over the spool's lifetime (persisted)
    memory_backlog: int = 0  # == pending: observations held in memory only (the disk refuses, or not yet committed)
    memory_backlog_bytes: int = 0
    disk_failing: bool = False  # the last commit failed: the memory backlog is being sent from memory

    def oldest_age_s(self, now_ns: int | None = None) -> float | None:
        if self.oldest_enqueued_at_ns is None:
            return None
        return max(0.0, ((time.time_ns() if now_ns is None else now_ns) - self.oldest_enqueued_at_ns) / 1e9)


class Spool(Protocol):
    """What the daemon and the publisher need from a spool (see the module docstring)."""

    durable: bool
    # Set when something may have become available; the publisher's one wake-up (its other
    # sources, confirmations, a status request, the stop, set it too).
    changed: Wakeup

    def put(self, obs: Observation) -> None:
        """Queue one observation (never blocks; SQLite: durable after the next group commit)."""

    def __len__(self) -> int:
        """Observations held (committed, in flight included)."""

    @property
    def dropped(self) -> int:
        """Observations dropped over a bound during this run (every reason)."""

    def available(self) -> int:
        """Observations that ``take`` would return (committed and not in flight; plus, while the
        disk refuses commits, the in-memory backlog)."""

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
        """Commit what was put so far (SQLite); returns when it is durable (or the disk refuses)."""

    async def aclose(self) -> None:
        """Flush and close; what is still held stays for the next start (SQLite)."""


def _drop_counts_zero() -> dict[str, int]:
    return dict.fromkeys(DROP_REASONS, 0)


class _DropLog:
    """Logs drops as they happen, at most once per ``every_s`` per reason (counts add up between)."""

    def __init__(
        self, where: str, max_bytes: int, max_age_s: float, every_s: float = 10.0, memory_bounds: str = ""
    ) -> None:
        self.where = where
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.every_s = every_s
        self.memory_bounds = memory_bounds
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
            elif reason == "memory":
                log.warning(
                    "%s: dropped the %d oldest observation(s) waiting in memory for the disk: over %s",
                    self.where,
                    n,
                    self.memory_bounds,
                )
            else:
                log.warning("%s: dropped %d observation(s) older than max_age_s (%g s)", self.where, n, self.max_age_s)


class SpoolAgeing:
    """When a spooled row is older than ``max_age_s``: the rule, pure (one per open SQLite spool).

    The wall clock is no timer: it steps (NTP correcting a machine that booted 30 days behind, an
    operator, a resumed VM). Measured before this rule: such an agent dropped 990 of 990
    observations as older than ``max_age_s`` although they were 10 s old. So:

    - **Rows put during this run** (rowid above ``inherited_through``) age by the monotonic clock
      only. Their monotonic enqueue times are kept in memory (8 bytes a row, in rowid order); a
      row is expired when ``enqueued_mono < now_mono - max_age``. No wall-clock step, backward or
      forward, can expire one early or keep one longer.
    - **Rows found in the file at open** (a previous run's: no monotonic time survives a reboot)
      are judged by the wall clock *as read at open*, carried forward by the monotonic clock:
      expired when ``enqueued_wall < wall_at_open + (now_mono - mono_at_open) - max_age``. A later
      step changes nothing, except that a *lower* reading (a backward step, e.g. a clock that was
      ahead at open being corrected) is adopted from then on — ``wall - mono`` only ever takes its
      minimum — so a step can only make inherited rows younger, never older. A row enqueued
      "in the future" of that reading (the clock went back since it was written, or was ahead
      then) is therefore not expired by it.
    - Whatever the wall clock says, **every inherited row is expired once this process has been
      up ``max_age``** by the monotonic clock: it was spooled before the process started. So a
      step keeps an inherited row at most ``max_age`` longer than its true age.

    What no rule can fix without a reference: a clock that is *ahead* when the agent starts (and
    was right when the rows were written) makes their downtime look longer, and rows that look
    older than ``max_age`` then are dropped at the first commit.
    """

    def __init__(self, max_age_ns: int, *, opened_wall_ns: int, opened_mono_ns: int, inherited_through: int) -> None:
        self.max_age_ns = max_age_ns
        self.opened_mono_ns = opened_mono_ns
        self.inherited_through = inherited_through  # rowids up to this one were in the file at open
        self._offset_ns = opened_wall_ns - opened_mono_ns  # the lowest wall - mono seen
        # Runs of consecutive rowids: [first rowid, monotonic ns of each row, index of the first still held].
        self._groups: deque[list[Any]] = deque()

    def note_inserted(self, first_rowid: int, monos: Sequence[int]) -> None:
        """Rows ``first_rowid``, ``first_rowid + 1`` … were committed, put at these monotonic times."""
        if not monos:
            return
        if self._groups:
            first, arr, _ = self._groups[-1]
            if first + len(arr) == first_rowid:
                arr.extend(monos)
                return
        self._groups.append([first_rowid, array("q", monos), 0])

    def expired_through(self, now_mono_ns: int) -> int:
        """The highest rowid of this run that is expired (every row of this run up to it is); 0: none."""
        cutoff = now_mono_ns - self.max_age_ns
        through = 0
        for first, arr, start in self._groups:
            n = bisect.bisect_left(arr, cutoff, lo=start)  # rows put before the cutoff
            if n > start:
                through = first + n - 1
            if n < len(arr):
                break
        return through

    def inherited_cutoff_ns(self, now_wall_ns: int, now_mono_ns: int) -> int | None:
        """Inherited rows enqueued (wall clock) before this are expired; None: all of them are."""
        self._offset_ns = min(self._offset_ns, now_wall_ns - now_mono_ns)
        if now_mono_ns - self.opened_mono_ns >= self.max_age_ns:
            return None
        return now_mono_ns + self._offset_ns - self.max_age_ns

    def forget_below(self, rowid: int) -> None:
        """Rows below ``rowid`` are gone: drop their times (memory stays proportional to the rows held)."""
        while self._groups:
            group = self._groups[0]
            first, arr, start = group
            if first + len(arr) <= rowid:
                self._groups.popleft()
                continue
            if rowid - first > start:
                group[2] = start = rowid - first
                if start >= 4096 and 2 * start >= len(arr):  # compact now and then
                    group[0], group[1], group[2] = first + start, arr[start:], 0
            break

    @property
    def tracked(self) -> int:
        """Rows whose monotonic time is held (memory: 8 bytes each)."""
        return sum(len(arr) - start for _, arr, start in self._groups)


# --------------------------------------------------------------------------------------------------
# In memory


class MemorySpool:
    """The spool in a deque (``spool.path: null``): same semantics, nothing survives the process.
    Ageing is by the monotonic clock only (everything in it was put by this process)."""

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
        self.changed = Wakeup()  # set when something may have become available (the publisher wakes on it)
        self._dropped = _drop_counts_zero()
        self._drop_log = _DropLog("spool (memory)", max_bytes, max_age_s)
        self._closed = False

    def __len__(self) -> int:
        return len(self._items) + len(self._in_flight)

    @property
    def dropped(self) -> int:
        return sum(self._dropped.values())

    def put(self, obs: Observation) -> None:
        if self._closed:
            raise RuntimeError("spool is closed")
        payload = encode(obs)
        mono = time.monotonic_ns()
        entry = SpoolEntry(self._next_rowid, time.time_ns(), payload, mono)
        self._next_rowid += 1
        self._items.append(entry)
        self._bytes += len(payload)
        self._trim(mono)
        self.changed.set()

    def _trim(self, now_mono_ns: int) -> None:
        dropped = _drop_counts_zero()
        cutoff = now_mono_ns - round(self.max_age_s * 1e9)
        while self._items and (self._items[0].mono_ns or 0) < cutoff:
            self._bytes -= len(self._items.popleft().payload)
            dropped["age"] += 1
        while self._items and self._bytes > self.max_bytes:
            self._bytes -= len(self._items.popleft().payload)
            dropped["bytes"] += 1
        for reason, n in dropped.items():
            self._dropped[reason] += n
        if any(dropped.values()):
            self._drop_log.add(dropped)

    def expire(self, now_mono_ns: int | None = None) -> None:
        """Apply the age bound now (monotonic clock)."""
        self._trim(time.monotonic_ns() if now_mono_ns is None else now_mono_ns)

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
            self.changed.set()

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
        self.changed.clear()
        await self.changed.wait(timeout_s)

    async def flush(self) -> None:
        return None

    async def aclose(self) -> None:
        self._closed = True


# --------------------------------------------------------------------------------------------------
# SQLite


_META_DDL = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID"
_QUARANTINE_DDL = (
    "CREATE TABLE IF NOT EXISTS quarantine ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, spool_rowid INTEGER NOT NULL, enqueued_at_ns INTEGER NOT NULL,"
    " size INTEGER NOT NULL, crc INTEGER, payload BLOB NOT NULL, quarantined_at_ns INTEGER NOT NULL)"
)
_COUNTERS = (
    "dropped_bytes_limit",
    "dropped_age_limit",
    "dropped_memory_limit",
    "acknowledged_total",
    "quarantined_total",
    "created_at_ns",
)
_DROP_KEYS = {"bytes": "dropped_bytes_limit", "age": "dropped_age_limit", "memory": "dropped_memory_limit"}
_IN_CHUNK = 500  # rowids per "IN (…)" list


class _CommitRequest(NamedTuple):
    items: list[tuple[int, int, bytes, str]]  # (enqueued_at_ns, enqueued_mono_ns, payload, id), in order
    acks: list[tuple[int, int]]  # (rowid, size) acknowledged
    quarantine: list[int]  # rowids that failed their checksum
    acked_from_memory: int  # acknowledged without ever being committed: counted in acknowledged_total
    now_ns: int
    now_mono_ns: int
    protect_upto: int
    max_bytes: int
    dropped_before: dict[str, int]  # dropped from memory before they got here


class _CommitResult(NamedTuple):
    depth: int
    bytes: int
    dropped: dict[str, int]
    oldest: tuple[int, int] | None  # (rowid, enqueued_at_ns) of the oldest row, in flight or not
    first_rowid: int  # rowid of the first inserted item (the others follow); 0 when none


class _Opened(NamedTuple):
    depth: int
    bytes: int
    counters: dict[str, int]
    oldest: tuple[int, int] | None
    migrated_from: int | None


class _Store(SqliteQueue[bytes]):
    """The SQLite side: the queue table ``spool`` (with a CRC-32 per row), a ``meta`` table of
    counters and a ``quarantine`` table. Every method runs on the spool's one thread, never on the
    event loop."""

    LAYOUT = QueueLayout(
        table="spool",
        seq="rowid",
        at_ns="enqueued_at_ns",
        payload="payload",
        payload_type="BLOB",
        size="size",
        check="crc",
    )
    SCHEMA_VERSION = SCHEMA_VERSION
    MIGRATIONS: ClassVar[Mapping[int, tuple[str, ...]]] = {
        1: ("ALTER TABLE spool ADD COLUMN crc INTEGER",),  # old rows: NULL, trusted
    }
    EXTRA_DDL = (_META_DDL, _QUARANTINE_DDL)
    NEW_FILE_PRAGMAS = ("PRAGMA auto_vacuum=INCREMENTAL",)  # takes effect only when the file is new
    OWNER = "agent"
    OPEN_HINT = "set spool.path to a writable place, or to null for an in-memory spool"
    LOCKED_HINT = "each agent needs a spool.path of its own"
    ON_CORRUPT = "move_aside"

    def __init__(self, path: Path, synchronous: Synchronous, max_age_ns: int) -> None:
        super().__init__(path, synchronous=synchronous)
        self.counters: dict[str, int] = {}
        self.max_age_ns = max_age_ns
        self.ageing = SpoolAgeing(max_age_ns, opened_wall_ns=0, opened_mono_ns=0, inherited_through=0)
        self.checkpoints = 0  # WAL truncations this run (bounds and low free space)
        self._commit_log: IO[str] | None = None

    def open(self, commit_log: str | None, max_bytes: int) -> _Opened:
        """Directory, lock, file (a corrupt one is moved aside, an old one migrated), counters,
        WAL limits. Raises SpoolError."""
        self.open_queue()
        try:
            try:
                page = int(self.conn.execute("PRAGMA page_size").fetchone()[0])
                # The WAL counts toward max_bytes: let SQLite checkpoint it well before, and cut it
                # back to that size after a checkpoint.
                pages = max(16, min(1000, max_bytes // 4 // page))
                self.conn.execute(f"PRAGMA wal_autocheckpoint={pages}")
                self.conn.execute(f"PRAGMA journal_size_limit={pages * page}")
                (inherited,) = self.conn.execute("SELECT COALESCE(MAX(rowid), 0) FROM spool").fetchone()
            except sqlite3.Error as err:
                raise self._translate("open", err) from err
            self.ageing = SpoolAgeing(
                self.max_age_ns,
                opened_wall_ns=time.time_ns(),
                opened_mono_ns=time.monotonic_ns(),
                inherited_through=int(inherited),
            )
            if commit_log is not None:
                self._commit_log = open(commit_log, "a", encoding="ascii")  # noqa: SIM115
            return _Opened(self.depth, self.bytes, dict(self.counters), self.first_after(0), self.migrated_from)
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

    # ---- space ------------------------------------------------------------------------------

    def wal_bytes(self) -> int:
        assert self.path is not None
        try:
            return self.path.with_name(self.path.name + "-wal").stat().st_size
        except OSError:
            return 0

    def free_bytes(self) -> int | None:
        """Free space on the spool's filesystem (for an unprivileged process); None: unknown."""
        assert self.path is not None
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def checkpoint(self) -> None:
        """Copy the WAL into the file and truncate it (never raises: a reader may hold it)."""
        with contextlib.suppress(sqlite3.Error, SpoolError):
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.checkpoints += 1

    def _keep_wal_small(self, payload_bytes: int, max_bytes: int) -> None:
        wal = self.wal_bytes()
        if not wal:
            return
        free = self.free_bytes()
        if wal + payload_bytes > max_bytes or (free is not None and free < LOW_FREE_BYTES):
            self.checkpoint()

    # ---- the group commit ---------------------------------------------------------------------

    def commit(self, req: _CommitRequest) -> _CommitResult:
        """Insert the items, delete the acks, quarantine, apply the bounds, add ``dropped_before``
        to the counters: one transaction. Then keep the WAL within bounds."""
        try:
            result = self._commit(req)
        except SpoolError:
            self.checkpoint()  # disk full: a truncated WAL gives the retry room
            raise
        self._keep_wal_small(result.bytes, req.max_bytes)
        return result

    def _commit(self, req: _CommitRequest) -> _CommitResult:
        dropped = _drop_counts_zero()
        depth, size = self.depth, self.bytes
        first_rowid = 0
        ageing = self.ageing
        with self.transaction("commit") as db:
            if req.items:
                n, added = self._insert(db, [(at, payload) for at, _, payload, _ in req.items])
                first_rowid = int(db.execute("SELECT last_insert_rowid()").fetchone()[0]) - n + 1
                depth += n
                size += added
            if req.acks:
                cur = db.executemany("DELETE FROM spool WHERE rowid = ?", [(rowid,) for rowid, _ in req.acks])
                if cur.rowcount == len(req.acks):
                    depth -= len(req.acks)
                    size -= sum(s for _, s in req.acks)
                else:  # some were gone already (dropped over a bound meanwhile): recount
                    depth, size = self._totals(db)
            if req.acks or req.acked_from_memory:
                db.execute(
                    "UPDATE meta SET value = value + ? WHERE key = 'acknowledged_total'",
                    (len(req.acks) + req.acked_from_memory,),
                )
            if req.quarantine:
                n, freed = self._move_to_quarantine(db, req.quarantine, req.now_ns)
                depth -= n
                size -= freed
            protect = req.protect_upto
            # Age, rows from before this run: the wall clock at open, carried by the monotonic one.
            cutoff = ageing.inherited_cutoff_ns(req.now_ns, req.now_mono_ns)
            inherited = ageing.inherited_through
            if inherited > protect:
                if cutoff is None:  # this process has been up max_age_s: all of them are older
                    n, freed = self._delete_range(db, protect, inherited)
                    dropped["age"] += n
                    depth -= n
                    size -= freed
                else:
                    n, freed = self._drop_inherited(db, protect, inherited, cutoff)
                    dropped["age"] += n
                    depth -= n
                    size -= freed
            # Age, rows of this run: the monotonic clock only.
            through = ageing.expired_through(req.now_mono_ns)
            low = max(protect, inherited)
            if through > low:
                n, freed = self._delete_range(db, low, through)
                dropped["age"] += n
                depth -= n
                size -= freed
            # Bytes: drop the oldest (not in flight) until under the bound.
            if size > req.max_bytes:
                excess, freed, cut = size - req.max_bytes, 0, protect
                rows = db.execute("SELECT rowid, size FROM spool WHERE rowid > ? ORDER BY rowid", (protect,))
                for rowid, row_size in rows:
                    if freed >= excess:
                        break
                    freed += row_size
                    cut = rowid
                rows.close()
                n, freed = self._delete_range(db, protect, cut)
                dropped["bytes"] += n
                depth -= n
                size -= freed
            for reason, key in _DROP_KEYS.items():
                n = dropped[reason] + req.dropped_before.get(reason, 0)
                if n:
                    db.execute("UPDATE meta SET value = value + ? WHERE key = ?", (n, key))
            oldest = self._first_after(db, 0)
        self._depth, self._bytes, self._oldest_at_ns = depth, size, oldest[1] if oldest else None
        if first_rowid:
            ageing.note_inserted(first_rowid, [mono for _, mono, _, _ in req.items])
        ageing.forget_below(oldest[0] if oldest else _NO_TRIM)
        if self._commit_log is not None and req.items:
            # Debug record for fault tests: ids become durable here (after the COMMIT returned).
            self._commit_log.write("".join(f"{obs_id}\n" for _, _, _, obs_id in req.items))
            self._commit_log.flush()
        if depth == 0 and req.acks:
            # Emptied: give back the space a backlog took (if the file has auto_vacuum).
            with contextlib.suppress(sqlite3.Error):
                if self.conn.execute("PRAGMA freelist_count").fetchone()[0] > _VACUUM_MIN_FREE_PAGES:
                    self.conn.execute("PRAGMA incremental_vacuum")
        return _CommitResult(depth, size, dropped, oldest, first_rowid)

    def _drop_inherited(self, db: sqlite3.Connection, protect: int, inherited: int, cutoff: int) -> tuple[int, int]:
        """Rows in (protect, inherited] enqueued before ``cutoff``: the oldest first, in chunks,
        stopping at the first chunk with nothing expired."""
        count = freed_total = 0
        first = self._first_after(db, protect)
        while first is not None and first[0] <= inherited and first[1] < cutoff:
            where = (
                "WHERE rowid IN (SELECT rowid FROM spool WHERE rowid > ? AND rowid <= ? ORDER BY rowid LIMIT ?)"
                " AND enqueued_at_ns < ?"
            )
            args = (protect, inherited, _AGE_CHUNK, cutoff)
            n, freed = db.execute(f"SELECT count(*), coalesce(sum(size), 0) FROM spool {where}", args).fetchone()
            if not n:
                break
            db.execute(f"DELETE FROM spool {where}", args)
            count += int(n)
            freed_total += int(freed)
            first = self._first_after(db, protect)
        return count, freed_total

    def _move_to_quarantine(self, db: sqlite3.Connection, rowids: list[int], now_ns: int) -> tuple[int, int]:
        """Move these rows to the quarantine table (keeping its newest QUARANTINE_MAX_ROWS) and count
        them; returns (rows, bytes) that left the queue."""
        moved = freed = 0
        for i in range(0, len(rowids), _IN_CHUNK):
            chunk = rowids[i : i + _IN_CHUNK]
            marks = ", ".join("?" for _ in chunk)
            db.execute(
                "INSERT INTO quarantine (spool_rowid, enqueued_at_ns, size, crc, payload, quarantined_at_ns)"
                f" SELECT rowid, enqueued_at_ns, size, crc, payload, ? FROM spool WHERE rowid IN ({marks})",
                (now_ns, *chunk),
            )
            n, size = db.execute(
                f"SELECT count(*), coalesce(sum(size), 0) FROM spool WHERE rowid IN ({marks})", chunk
            ).fetchone()
            db.execute(f"DELETE FROM spool WHERE rowid IN ({marks})", chunk)
            moved += int(n)
            freed += int(size)
        db.execute("UPDATE meta SET value = value + ? WHERE key = 'quarantined_total'", (len(rowids),))
        db.execute("DELETE FROM quarantine WHERE id <= (SELECT max(id) FROM quarantine) - ?", (QUARANTINE_MAX_ROWS,))
        return moved, freed

    def select(self, after: int, limit: int) -> list[tuple[SpoolEntry, bool]]:
        """The oldest rows after ``after``, each with whether it passed its checksum."""
        return [
            (SpoolEntry(row.seq, row.at_ns, row.payload), row.intact()) for row in self.read_oldest(limit, after=after)
        ]

    def close(self) -> None:
        if self._commit_log is not None:
            self._commit_log.close()
            self._commit_log = None
        super().close()


class _Pending:
    """An observation put but not committed: in the in-memory backlog."""

    __slots__ = ("at_ns", "committing", "done", "key", "mono_ns", "obs_id", "payload", "taken")

    def __init__(self, key: int, at_ns: int, mono_ns: int, payload: bytes, obs_id: str) -> None:
        self.key = key  # < 0: its SpoolEntry.rowid while it is not committed
        self.at_ns = at_ns
        self.mono_ns = mono_ns
        self.payload = payload
        self.obs_id = obs_id
        self.taken = False  # in flight from memory (the disk refused it)
        self.done = False  # acknowledged from memory: never to be written
        self.committing = False  # in the commit now running

    def entry(self, rowid: int | None = None) -> SpoolEntry:
        return SpoolEntry(self.key if rowid is None else rowid, self.at_ns, self.payload)


class SqliteSpool:
    """The durable spool (see the module docstring). Create with :meth:`open`."""

    durable = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int,
        max_age_s: float,
        commit_interval_s: float = AUTOCORK_LINGER_S,
        commit_max_observations: int = 1000,
        synchronous: str = "full",
        commit_log: str | None = None,
        memory_max_observations: int = 20_000,
        memory_max_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError("synchronous: expected 'full' or 'normal'")
        if memory_max_observations < 1 or memory_max_bytes < 1:
            raise ValueError("memory_max_observations and memory_max_bytes must be >= 1")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.commit_interval_s = commit_interval_s
        self.commit_max_observations = commit_max_observations
        self.synchronous = synchronous
        self.memory_max_observations = memory_max_observations
        self.memory_max_bytes = min(memory_max_bytes, max_bytes)
        self._commit_log_path = commit_log
        self._store = _Store(self.path, "full" if synchronous == "full" else "normal", round(max_age_s * 1e9))
        self._executor: ThreadPoolExecutor | None = None
        # Loop-side state (only the event loop thread touches it).
        self._pending: deque[_Pending] = deque()  # the in-memory backlog, in order (done ones purged lazily)
        self._pending_count = 0  # in _pending, not done
        self._pending_bytes = 0
        self._pending_taken = 0  # in _pending, not done, in flight from memory
        self._snapshot: list[_Pending] = []  # being committed now
        self._next_key = 1
        self._mem_in_flight: dict[int, _Pending] = {}  # key -> taken from memory
        self._renamed: dict[int, int] = {}  # key -> rowid: taken from memory, committed while in flight
        self._acked_from_memory = 0  # acknowledged from memory, not yet counted in the file
        self._acks: list[tuple[int, int]] = []  # (rowid, size) acknowledged, delete not committed
        self._quarantine: list[int] = []  # rowids that failed their checksum, move not committed
        self._held: set[int] = set()  # those rowids: never taken
        self._quarantined_total = 0
        self._in_flight: dict[int, SpoolEntry] = {}  # committed rows taken (and acked ones until deleted)
        self._floor: int | None = None  # lowest released row below others still in flight
        self._taking = False
        self._depth = 0  # committed rows (as of the last commit)
        self._bytes = 0
        self._oldest: tuple[int, int] | None = None  # oldest committed row (rowid, enqueued_at_ns)
        self._available_since_ns: int | None = None  # ≈ enqueue time of the oldest available row
        self._dropped_total = _drop_counts_zero()
        self._dropped_unsaved = _drop_counts_zero()  # counted in memory, not yet in the file
        self._drop_log = _DropLog(
            f"spool {self.path}",
            max_bytes,
            max_age_s,
            memory_bounds=f"{memory_max_observations} observations or {self.memory_max_bytes} bytes",
        )
        self._dropped_run = 0
        self.errors = 0
        self._failing = False  # the last commit failed: the backlog is sent from memory
        self._fail_since = 0.0
        self._fail_attempts = 0
        self._fail_logged_at = 0.0
        self._backoff = Backoff(RETRY_MIN_S, RETRY_MAX_S)
        self.changed = Wakeup()  # set when something may have become available (the publisher wakes on it)
        self._dirty = asyncio.Event()
        self._full = asyncio.Event()
        self._committed = asyncio.Event()
        self._closing_now = asyncio.Event()
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
            opened = await self._run(self._store.open, self._commit_log_path, self.max_bytes)
        except BaseException:
            await self._release_resources()
            raise
        depth, size, counters, oldest = opened.depth, opened.bytes, opened.counters, opened.oldest
        self._depth, self._bytes, self._oldest = depth, size, oldest
        self._available_since_ns = oldest[1] if oldest else None
        self._dropped_total = {reason: counters.get(key, 0) for reason, key in _DROP_KEYS.items()}
        self._quarantined_total = counters.get("quarantined_total", 0)
        if opened.migrated_from is not None:
            log.info(
                "spool %s: migrated from schema version %d to %d (rows from before carry no checksum: trusted)",
                self.path,
                opened.migrated_from,
                SCHEMA_VERSION,
            )
        if depth and oldest:
            log.info(
                "spool %s: %d observation(s) (%d bytes) from before, oldest spooled %.0f s ago by the wall clock:"
                " they go out first",
                self.path,
                depth,
                size,
                (time.time_ns() - oldest[1]) / 1e9,
            )
        else:
            log.info("spool %s: empty", self.path)
        self._writer = asyncio.create_task(self._write_loop(), name="spool-writer")
        self._writer.add_done_callback(self._writer_ended)

    def _writer_ended(self, task: asyncio.Task[None]) -> None:
        """The writer only ends at close; anything else is a bug that must not pass unseen."""
        if task.cancelled() or task.exception() is None:
            return
        self.errors += 1
        err = task.exception()
        log.critical(
            "spool %s: the writer died (%s: %s): nothing more is committed; %d observation(s) wait in memory",
            self.path,
            type(err).__name__,
            err,
            self._pending_count,
            exc_info=err,
        )

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
        item = _Pending(-self._next_key, time.time_ns(), time.monotonic_ns(), payload, obs.id)
        self._next_key += 1
        self._pending.append(item)
        self._pending_count += 1
        self._pending_bytes += len(payload)
        if self._pending_count > self.memory_max_observations or self._pending_bytes > self.memory_max_bytes:
            self._bound_pending()  # the disk stalls or refuses: memory is bounded too
        self._dirty.set()
        if self._failing:
            self.changed.set()  # available from memory
        elif self._pending_count >= self.commit_max_observations:
            self._full.set()

    def _committed_available(self) -> int:
        return max(0, self._depth - len(self._in_flight) - len(self._held))

    def _memory_available(self) -> int:
        """What take() may send from memory: only while the disk refuses, not while a commit runs."""
        if not self._failing or self._committing:
            return 0
        return self._pending_count - self._pending_taken

    def available(self) -> int:
        return self._committed_available() + self._memory_available()

    def oldest_available_at_ns(self) -> int | None:
        if self._committed_available() > 0:
            return self._available_since_ns
        if self._memory_available() > 0:
            for item in self._pending:
                if not (item.taken or item.done):
                    return item.at_ns
        return None

    async def take(self, n: int) -> list[SpoolEntry]:
        if n < 1 or self._taking:
            return []
        batch: list[SpoolEntry] = []
        if self._committed_available() > 0:
            batch = await self._take_committed(n)
        if len(batch) < n and self._memory_available() > 0 and self._committed_available() <= 0:
            for item in self._pending:
                if len(batch) >= n:
                    break
                if item.taken or item.done:
                    continue
                item.taken = True
                self._pending_taken += 1
                self._mem_in_flight[item.key] = item
                batch.append(item.entry())
        return batch

    async def _take_committed(self, n: int) -> list[SpoolEntry]:
        # Normally what is in flight is the oldest rows (taken in order), so reading starts after
        # them; rows released below others still in flight make it start lower (_floor).
        top = max(self._in_flight, default=0)
        after = top if self._floor is None else min(top, self._floor - 1)
        skip = sum(1 for r in self._in_flight if r > after) + sum(1 for r in self._held if r > after)
        self._taking = True  # a commit submitted meanwhile trims nothing (it cannot see our rows yet)
        try:
            rows = await self._run(self._store.select, after, n + 1 + skip)
        finally:
            self._taking = False
        batch: list[SpoolEntry] = []
        bad: list[SpoolEntry] = []
        rest: SpoolEntry | None = None
        for entry, intact in rows:
            if entry.rowid in self._in_flight or entry.rowid in self._held:
                continue
            if len(batch) >= n:
                rest = entry
                break
            (batch if intact else bad).append(entry)
        for entry in batch:
            self._in_flight[entry.rowid] = entry
        if bad:
            self._set_aside(bad)
        self._floor = rest.rowid if rest is not None and rest.rowid < top else None
        if rest is not None:
            self._available_since_ns = rest.enqueued_at_ns
        else:
            self._available_since_ns = time.time_ns() if self._committed_available() > 0 else None
        return batch

    def _set_aside(self, bad: list[SpoolEntry]) -> None:
        """Rows that failed their checksum: never sent; moved to the quarantine table by the next commit."""
        rowids = [e.rowid for e in bad]
        self._held.update(rowids)
        self._quarantine.extend(rowids)
        self._quarantined_total += len(rowids)
        shown = ", ".join(str(r) for r in rowids[:_LOGGED_IDS]) + (" …" if len(rowids) > _LOGGED_IDS else "")
        log.error(
            "spool %s: %d spooled observation(s) failed their checksum (rowid %s): set aside in the quarantine"
            " table, not sent; the rest go out (%d quarantined since the spool was created)",
            self.path,
            len(rowids),
            shown,
            self._quarantined_total,
        )
        self._dirty.set()

    def ack(self, entries: Sequence[SpoolEntry]) -> None:
        # Committed rows stay "in flight" (never taken again) until the delete is committed.
        touched = False
        for entry in entries:
            rowid = self._renamed.pop(entry.rowid, entry.rowid)
            if rowid > 0:
                if rowid in self._in_flight:
                    self._acks.append((rowid, entry.size_bytes))
                    touched = True
                continue
            item = self._mem_in_flight.pop(rowid, None)
            if item is None:
                continue
            item.taken = False
            item.done = True  # delivered: never written (if the commit now running has it, it deletes it)
            if not item.committing:
                self._pending_taken -= 1
                self._pending_count -= 1
                self._pending_bytes -= len(item.payload)
                self._acked_from_memory += 1
                touched = True
        while self._pending and self._pending[0].done:
            self._pending.popleft()
        if touched:
            self._dirty.set()

    def release(self, entries: Sequence[SpoolEntry]) -> None:
        back = False
        for entry in entries:
            rowid = self._renamed.pop(entry.rowid, entry.rowid)
            if rowid > 0:
                if self._in_flight.pop(rowid, None) is not None:
                    back = True
                    if rowid < max(self._in_flight, default=0) and (self._floor is None or rowid < self._floor):
                        self._floor = rowid
                    if self._available_since_ns is None or entry.enqueued_at_ns < self._available_since_ns:
                        self._available_since_ns = entry.enqueued_at_ns
                continue
            item = self._mem_in_flight.pop(rowid, None)
            if item is None:
                continue
            item.taken = False
            if not item.committing:
                self._pending_taken -= 1
            back = True
        if back:
            self.changed.set()

    def stats(self) -> SpoolStats:
        backlog = self._pending_count + sum(1 for item in self._snapshot if not item.done)
        backlog_bytes = self._pending_bytes + sum(len(item.payload) for item in self._snapshot if not item.done)
        return SpoolStats(
            durable=True,
            path=str(self.path),
            depth=self._depth,
            bytes=self._bytes,
            pending=backlog,
            in_flight=len(self._in_flight) + len(self._mem_in_flight),
            oldest_enqueued_at_ns=self._oldest[1] if self._oldest else None,
            dropped_bytes_limit=self._dropped_total["bytes"],
            dropped_age_limit=self._dropped_total["age"],
            dropped_this_run=self._dropped_run,
            errors=self.errors,
            max_bytes=self.max_bytes,
            max_age_s=self.max_age_s,
            dropped_memory_limit=self._dropped_total["memory"],
            quarantined=self._quarantined_total,
            memory_backlog=backlog,
            memory_backlog_bytes=backlog_bytes,
            disk_failing=self._failing,
        )

    async def wait_changed(self, timeout_s: float | None) -> None:
        self.changed.clear()
        await self.changed.wait(timeout_s)

    def _work_left(self) -> bool:
        return bool(self._pending_count or self._acks or self._quarantine or self._acked_from_memory)

    async def flush(self) -> None:
        """Commit what was put and acked until now; return when it is committed, or at once while
        (or as soon as) the disk refuses commits: the backlog is then sent from memory."""
        errors = self.errors
        while (self._work_left() or self._committing) and self.errors == errors and not self._failing:
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
        self._closing_now.set()
        self._dirty.set()
        self._full.set()
        if self._writer is not None:
            await self._writer
        if self._pending_count:
            log.error(
                "spool %s: %d observation(s) could not be committed at close (%s): lost with the process",
                self.path,
                self._pending_count,
                "the disk refuses commits" if self._failing else "the writer stopped",
            )
        await self._release_resources()
        self._closed = True

    # ----- the writer -------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        """Group commits: wait for a put or ack (or the age-check timer), gather for
        ``commit_interval_s`` (less when ``commit_max_observations`` are waiting), commit. After a
        failed commit, wait the backoff's delay (only closing cuts it short) and try again."""
        retry_s: float | None = None
        age_check_s = min(60.0, max(1.0, self.max_age_s / 100))
        while True:
            if not self._closing:
                if retry_s is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._closing_now.wait(), retry_s)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._dirty.wait(), age_check_s)
                    if not self._full.is_set():
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._full.wait(), grid_delay_s(self.commit_interval_s))
            self._dirty.clear()
            self._full.clear()
            ok = await self._commit_once()
            self._committed.set()
            if self._closing and (not ok or not self._work_left()):
                return
            if ok:
                self._backoff.reset()
                retry_s = None
            else:
                retry_s = self._backoff.next_delay_s()

    async def _commit_once(self) -> bool:
        items = [item for item in self._pending if not item.done]
        self._pending = deque()
        self._pending_count = self._pending_bytes = self._pending_taken = 0
        for item in items:
            item.committing = True
        self._snapshot = items
        acks, self._acks = self._acks, []
        quarantine, self._quarantine = self._quarantine, []
        acked_from_memory, self._acked_from_memory = self._acked_from_memory, 0
        acked = {rowid for rowid, _ in acks}
        # While a take is selecting, its rows are not in _in_flight yet: trim nothing this time.
        protect = _NO_TRIM if self._taking else max((r for r in self._in_flight if r not in acked), default=0)
        unsaved = dict(self._dropped_unsaved)
        request = _CommitRequest(
            items=[(item.at_ns, item.mono_ns, item.payload, item.obs_id) for item in items],
            acks=acks,
            quarantine=quarantine,
            acked_from_memory=acked_from_memory,
            now_ns=time.time_ns(),
            now_mono_ns=time.monotonic_ns(),
            protect_upto=protect,
            max_bytes=self.max_bytes,
            dropped_before=unsaved,
        )
        self._committing = True
        try:
            # Shielded: the thread finishes the transaction whatever happens to this task.
            result = await asyncio.shield(self._run(self._store.commit, request))
        except Exception as err:  # every failure keeps the data: typed in the log, counted
            self._committing = False
            self._snapshot = []
            self._restore(items, acks, quarantine, acked_from_memory)
            self._commit_failed(err)
            return False
        finally:
            self._committing = False
            self._snapshot = []
        for reason, n in unsaved.items():  # saved now (put() may have added more meanwhile)
            self._dropped_unsaved[reason] -= n
        for rowid in acked:
            self._in_flight.pop(rowid, None)
        self._held.difference_update(quarantine)
        for i, item in enumerate(items):
            item.committing = False
            if item.done:  # acknowledged from memory while being committed: delete the row it became
                rowid = result.first_rowid + i
                self._in_flight[rowid] = item.entry(rowid)
                self._acks.append((rowid, len(item.payload)))
                self._dirty.set()
            elif item.taken:  # in flight from memory: from now on it is that row
                rowid = result.first_rowid + i
                self._mem_in_flight.pop(item.key, None)
                item.taken = False
                self._renamed[item.key] = rowid
                self._in_flight[rowid] = item.entry(rowid)
        was_available = self._committed_available()
        self._depth, self._bytes, self._oldest = result.depth, result.bytes, result.oldest
        if items and (self._available_since_ns is None or not was_available):
            self._available_since_ns = items[0].at_ns
        dropped = result.dropped
        n_dropped = sum(dropped.values())
        if n_dropped:
            for reason, n in dropped.items():
                self._dropped_total[reason] += n
            self._dropped_run += n_dropped
            self._drop_log.add(dropped)
        if self._failing:
            self._commit_recovered(len(items))
        if items or n_dropped:
            self.changed.set()
        return True

    def _restore(
        self, items: list[_Pending], acks: list[tuple[int, int]], quarantine: list[int], acked_from_memory: int
    ) -> None:
        """A commit failed: what it held waits in memory again, in front of what came since."""
        keep: list[_Pending] = []
        for item in items:
            item.committing = False
            if item.done:
                acked_from_memory += 1  # delivered while the commit ran: counted, never written
            else:
                keep.append(item)
        self._pending.extendleft(reversed(keep))
        self._pending_count = sum(1 for item in self._pending if not item.done)
        self._pending_bytes = sum(len(item.payload) for item in self._pending if not item.done)
        self._pending_taken = sum(1 for item in self._pending if item.taken and not item.done)
        self._acks[:0] = acks
        self._quarantine[:0] = quarantine
        self._acked_from_memory += acked_from_memory
        self._bound_pending()
        self.changed.set()  # the backlog is available from memory now

    def _commit_failed(self, err: Exception) -> None:
        self.errors += 1
        now = time.monotonic()
        what = f"{type(err).__name__}: {err}"
        if not self._failing:
            self._failing = True
            self._fail_since = self._fail_logged_at = now
            self._fail_attempts = 1
            log.error(
                "spool %s: commit failed (%s); %d observation(s) wait in memory (at most %d observations or"
                " %d bytes there, the oldest dropped beyond) and are sent from there; retrying every %g s up to"
                " %g s; one line every %g s while it lasts",
                self.path,
                what,
                self._pending_count,
                self.memory_max_observations,
                self.memory_max_bytes,
                RETRY_MIN_S,
                RETRY_MAX_S,
                FAIL_LOG_EVERY_S,
            )
            return
        self._fail_attempts += 1
        if now - self._fail_logged_at >= FAIL_LOG_EVERY_S:
            self._fail_logged_at = now
            log.error(
                "spool %s: commits still failing: %d attempt(s) over %.0f s (last: %s); %d observation(s) wait"
                " in memory, %d dropped from memory so far",
                self.path,
                self._fail_attempts,
                now - self._fail_since,
                what,
                self._pending_count,
                self._dropped_total["memory"],
            )

    def _commit_recovered(self, committed: int) -> None:
        self._failing = False
        log.warning(
            "spool %s: commits work again after %d failed attempt(s) over %.1f s; %d observation(s) from memory"
            " committed",
            self.path,
            self._fail_attempts,
            time.monotonic() - self._fail_since,
            committed,
        )

    def _bound_pending(self) -> None:
        """What waits in memory obeys memory_max_observations and memory_max_bytes, and max_bytes:
        the oldest that are not in flight go, counted (``memory``; ``bytes`` when over max_bytes)."""
        dropped = {"bytes": 0, "memory": 0}
        while self._pending_count > self.memory_max_observations or self._pending_bytes > self.memory_max_bytes:
            index = next((i for i, item in enumerate(self._pending) if not (item.taken or item.done)), None)
            if index is None:
                break
            reason = "bytes" if self._pending_bytes > self.max_bytes else "memory"
            item = self._pending[index]
            del self._pending[index]
            self._pending_count -= 1
            self._pending_bytes -= len(item.payload)
            dropped[reason] += 1
        if any(dropped.values()):
            for reason, n in dropped.items():
                self._dropped_total[reason] += n
                self._dropped_unsaved[reason] += n
                self._dropped_run += n
            self._drop_log.add(dropped)


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
    quarantined_total: int = 0  # rows that failed their checksum (since the spool was created)
    quarantine_rows: int = 0  # of those, kept in the quarantine table (the newest QUARANTINE_MAX_ROWS)
    dropped_memory_limit: int = 0  # dropped from the in-memory backlog while the disk refused commits
    schema_version: int = 0


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
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            has_quarantine = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'quarantine'"
            ).fetchone()
            quarantine_rows = db.execute("SELECT count(*) FROM quarantine").fetchone()[0] if has_quarantine else 0
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
        quarantined_total=int(meta.get("quarantined_total", 0)),
        quarantine_rows=int(quarantine_rows),
        dropped_memory_limit=int(meta.get("dropped_memory_limit", 0)),
        schema_version=version,
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
        memory_max_observations=cfg.memory_max_observations,
        memory_max_bytes=cfg.memory_max_bytes,
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
    memory = f", {info.dropped_memory_limit} over the memory backlog's bounds" if info.dropped_memory_limit else ""
    lines.append(
        f"  dropped: {info.dropped_bytes_limit} over max_bytes, {info.dropped_age_limit} over max_age_s{memory}"
        " (since the spool was created)"
    )
    lines.append(
        f"  quarantined: {info.quarantined_total} failed their checksum (since the spool was created;"
        f" {info.quarantine_rows} kept in its quarantine table)"
    )
    lines.append(f"  acknowledged by the broker: {info.acknowledged_total} (since the spool was created)")
    lines.append(f"  file:    {_human_bytes(info.file_bytes)} + WAL {_human_bytes(info.wal_bytes)}")
    return lines
