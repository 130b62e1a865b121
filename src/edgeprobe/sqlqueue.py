"""One durable FIFO in SQLite, under both spools (the agent's observations, the collector's lines).

What every spool needs from its file is written here once:

- **opening** the file: its directory is created, an exclusive ``flock`` on ``<path>.lock`` (with
  the holder's pid in it) keeps a second process out, the database runs in WAL mode with
  ``synchronous=FULL`` (or ``NORMAL`` when asked) and a busy timeout of :data:`BUSY_TIMEOUT_S`;
- the **schema version** (``PRAGMA user_version``): a new file gets :attr:`SqliteQueue.SCHEMA_VERSION`,
  a file of that version opens, an older file for which :attr:`SqliteQueue.MIGRATIONS` has every
  step is migrated in the opening transaction (all steps or none), and any other version is
  *refused* with :class:`SpoolVersionError` naming the file and both versions; it is never
  overwritten;
- **corruption**: a file that is not a readable database raises :class:`SpoolCorruptError`, or
  (``ON_CORRUPT = "move_aside"``) is renamed to ``<path>.corrupt-<time>`` and a new one started;
- the **queue**: one table of ``(seq INTEGER PRIMARY KEY AUTOINCREMENT, <time>_ns, [size,]
  payload[, check])`` described by a :class:`QueueLayout`; ``seq`` is the order of arrival and never
  reused. With a ``check`` column every row is written with the CRC-32 of its payload
  (:func:`payload_check`), read back with it (:attr:`QueueRow.check`) and :meth:`QueueRow.intact`
  says whether it still matches (a row without one, written before the column existed, is trusted).
  :meth:`SqliteQueue.append_rows` commits rows in one transaction, :meth:`SqliteQueue.read_oldest`
  reads the oldest, :meth:`SqliteQueue.delete_through` removes everything up to a seq; depth, bytes
  and the oldest row's time are kept in memory and loaded at open;
- **errors**: every ``sqlite3`` and OS error comes out as a :class:`SpoolError` (or a subclass) with
  the original as its ``__cause__``.

Subclasses add what is theirs (the agent's counters and bounds, the collector's lines) with
:meth:`SqliteQueue.transaction` and the ``_insert``/``_delete_range``/``_totals`` helpers, which run
inside one.

Without a path the queue lives in memory (``:memory:``): no directory, no lock, no WAL.

A queue is synchronous and not thread-safe: each user calls it from one thread (its own worker
thread, so the event loop never waits for the disk).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, NamedTuple, Self, TypeVar

BUSY_TIMEOUT_S = 30.0  # how long a statement waits for another connection's lock (a reader, a checkpoint)
LOCK_SUFFIX = ".lock"

Synchronous = Literal["full", "normal"]
P = TypeVar("P", str, bytes)

# SQLite primary result codes for "this file is not a (sound) database".
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26


class SpoolError(Exception):
    """A spool could not be opened, written or read; the SQLite or OS error is the ``__cause__``."""


class SpoolLockedError(SpoolError):
    """Another process (or another open in this one) holds the spool's lock."""

    def __init__(self, message: str, *, holder_pid: int | None) -> None:
        super().__init__(message)
        self.holder_pid = holder_pid


class SpoolVersionError(SpoolError):
    """The file's schema version is not one this code knows: refused, never overwritten."""

    def __init__(self, message: str, *, found: int, known: int) -> None:
        super().__init__(message)
        self.found = found
        self.known = known


class SpoolCorruptError(SpoolError):
    """The file is not a readable SQLite database (or it is damaged)."""


class SpoolClosedError(SpoolError):
    """The spool is not open (never opened, or closed)."""


@dataclass(frozen=True, slots=True)
class QueueLayout:
    """The queue table: ``seq`` orders it, ``at_ns`` is when a row arrived (Unix ns)."""

    table: str
    seq: str
    at_ns: str
    payload: str
    payload_type: Literal["TEXT", "BLOB"]
    size: str | None = None  # a column holding the payload's size in bytes; None: computed from the payload
    check: str | None = None  # a column holding the payload's CRC-32 (NULL: written before it existed)

    @property
    def ddl(self) -> str:
        size = f" {self.size} INTEGER NOT NULL," if self.size else ""
        check = f", {self.check} INTEGER" if self.check else ""
        return (
            f"CREATE TABLE IF NOT EXISTS {self.table} ("
            f" {self.seq} INTEGER PRIMARY KEY AUTOINCREMENT,"
            f" {self.at_ns} INTEGER NOT NULL,{size}"
            f" {self.payload} {self.payload_type} NOT NULL{check})"
        )

    @property
    def size_sql(self) -> str:
        return self.size or f"LENGTH(CAST({self.payload} AS BLOB))"


def _payload_bytes(payload: str | bytes) -> bytes:
    return payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload


def payload_check(payload: str | bytes) -> int:
    """The CRC-32 stored with a payload (of its UTF-8 bytes for TEXT): catches any one changed byte
    and any burst of up to 32 bits."""
    return zlib.crc32(_payload_bytes(payload))


class QueueRow(NamedTuple, Generic[P]):
    seq: int
    at_ns: int
    payload: P
    check: int | None = None  # the stored CRC-32; None: the layout has none, or the row predates it

    def intact(self: QueueRow[Any]) -> bool:
        """The payload still matches its stored checksum (True when it has none)."""
        return self.check is None or self.check == payload_check(self.payload)


def lock_path_of(path: Path) -> Path:
    return path.with_name(path.name + LOCK_SUFFIX)


def lock_holder(path: str | os.PathLike[str]) -> int | None:
    """The pid holding ``path``'s spool lock (-1: held, pid unknown), or None when nobody holds it."""
    p = Path(path)
    try:
        fd = os.open(lock_path_of(p), os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def is_corruption(err: sqlite3.Error) -> bool:
    """Whether SQLite said the file is not a database or is damaged."""
    code = getattr(err, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return True
    text = str(err)
    return "not a database" in text or "malformed" in text


class SqliteQueue(Generic[P]):
    """A FIFO table in one SQLite file. Subclasses set :attr:`LAYOUT` (and the other class
    attributes), then ``open()`` it (or use it as a context manager)."""

    LAYOUT: ClassVar[QueueLayout]
    SCHEMA_VERSION: ClassVar[int] = 1
    # Version v -> the statements that turn a file of version v into one of version v + 1 (e.g.
    # ``ALTER TABLE ... ADD COLUMN``). They run in the opening transaction, before the tables of
    # this version are created; a file older than the first step is refused like a newer one.
    MIGRATIONS: ClassVar[Mapping[int, tuple[str, ...]]] = {}
    EXTRA_DDL: ClassVar[tuple[str, ...]] = ()  # more tables, created with the queue's
    NEW_FILE_PRAGMAS: ClassVar[tuple[str, ...]] = ()  # run before the tables are created (e.g. auto_vacuum)
    OWNER: ClassVar[str] = "process"  # who holds a spool, in messages: "agent", "collector"
    OPEN_HINT: ClassVar[str] = ""  # appended to "cannot create/open" messages: what the user can do
    LOCKED_HINT: ClassVar[str] = ""  # appended to "in use" messages
    ON_CORRUPT: ClassVar[Literal["refuse", "move_aside"]] = "refuse"

    def __init__(self, path: str | os.PathLike[str] | None, *, synchronous: Synchronous = "full") -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError("synchronous: expected 'full' or 'normal'")
        self.path = Path(path) if path is not None else None
        self.synchronous = synchronous
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._depth = 0
        self._bytes = 0
        self._oldest_at_ns: int | None = None
        self.migrated_from: int | None = None  # the file's version when open() migrated it

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def durable(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else "(in memory)"

    def _hint(self, hint: str) -> str:
        return f"; {hint}" if hint else ""

    def open_queue(self) -> None:
        """Create or open the file, take the lock, check the schema, load depth and bytes.
        Raises SpoolError (SpoolLockedError, SpoolVersionError, SpoolCorruptError)."""
        if self._db is not None:
            raise SpoolError(f"spool {self} is open already")
        try:
            if self.path is not None:
                self._make_directory(self.path)
                self._lock(self.path)
                try:
                    self._connect(self.path)
                except SpoolCorruptError as err:
                    if self.ON_CORRUPT != "move_aside":
                        raise
                    self._move_aside(self.path, err)
                    self._connect(self.path)
            else:
                self._connect(None)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the database and release the lock; never raises. What is queued stays in the file."""
        db, self._db = self._db, None
        try:
            if db is not None:
                if self.path is not None:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                with contextlib.suppress(sqlite3.Error):
                    db.close()
        finally:
            fd, self._lock_fd = self._lock_fd, None
            if fd is not None:
                os.close(fd)  # releases the flock

    @property
    def conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise SpoolClosedError(f"spool {self} is not open")
        return self._db

    def _make_directory(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as err:
            raise SpoolError(
                f"cannot create the spool directory {path.parent}: {err.strerror or err}{self._hint(self.OPEN_HINT)}"
            ) from err

    def _lock(self, path: Path) -> None:
        lock_path = lock_path_of(path)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o640)
        except OSError as err:
            raise SpoolError(f"cannot open {lock_path}: {err.strerror or err}{self._hint(self.OPEN_HINT)}") from err
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise SpoolError(f"cannot lock {lock_path}: {err.strerror or err}") from err
                text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                holder = int(text) if text.isdigit() else None
                raise SpoolLockedError(
                    f"spool {path} is in use by another {self.OWNER} (pid {holder or '?'})"
                    f"{self._hint(self.LOCKED_HINT)}",
                    holder_pid=holder,
                ) from err
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError as err:
                raise SpoolError(f"cannot write {lock_path}: {err.strerror or err}") from err
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _move_aside(self, path: Path, err: SpoolCorruptError) -> None:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            path.rename(aside)
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    path.with_name(path.name + suffix).rename(aside.with_name(aside.name + suffix))
        except OSError as os_err:
            raise SpoolError(f"spool {path} is corrupt ({err}) and could not be moved aside: {os_err}") from os_err
        self._moved_aside(aside, err)

    def _moved_aside(self, aside: Path, err: SpoolCorruptError) -> None:
        """Called after a corrupt file was renamed to ``aside`` (subclasses log it)."""

    def _connect(self, path: Path | None) -> None:
        try:
            db = sqlite3.connect(
                ":memory:" if path is None else path,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # opened in one thread, used from the owner's worker thread
                timeout=BUSY_TIMEOUT_S,
            )
        except sqlite3.Error as err:
            raise self._translate("open", err) from err
        self._db = db
        try:
            if path is not None:
                mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise SpoolError(f"spool {self}: SQLite refused WAL mode (journal_mode={mode})")
            db.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            for pragma in self.NEW_FILE_PRAGMAS:
                db.execute(pragma)
            with self.transaction("open") as tx:
                found = self._check_version(tx)
                if 0 < found < self.SCHEMA_VERSION:
                    for version in range(found, self.SCHEMA_VERSION):
                        for statement in self.MIGRATIONS[version]:
                            tx.execute(statement)
                    self.migrated_from = found
                tx.execute(self.LAYOUT.ddl)
                for ddl in self.EXTRA_DDL:
                    tx.execute(ddl)
                self._create(tx)
                tx.execute(f"PRAGMA user_version={self.SCHEMA_VERSION}")
            self._load()
        except BaseException as exc:
            self._db = None
            with contextlib.suppress(sqlite3.Error):
                db.close()
            if isinstance(exc, sqlite3.Error):
                raise self._translate("open", exc) from exc
            raise

    def can_migrate(self, found: int) -> bool:
        """Whether a file of version ``found`` (older than this one) can be migrated step by step."""
        return 0 < found < self.SCHEMA_VERSION and all(v in self.MIGRATIONS for v in range(found, self.SCHEMA_VERSION))

    def _check_version(self, db: sqlite3.Connection) -> int:
        """The file's version (0: new); raises SpoolVersionError for one this code can neither open nor migrate."""
        found = int(db.execute("PRAGMA user_version").fetchone()[0])
        if found not in (0, self.SCHEMA_VERSION) and not self.can_migrate(found):  # 0: a new file
            raise SpoolVersionError(
                f"spool {self} has schema version {found}, this {self.OWNER} knows version {self.SCHEMA_VERSION}: "
                f"refusing to open it (was it written by a newer edgeprobe?); run that version to drain it, "
                f"or move the file away",
                found=found,
                known=self.SCHEMA_VERSION,
            )
        return found

    def _create(self, db: sqlite3.Connection) -> None:
        """Inside the opening transaction, after the tables exist: fill what a subclass needs."""

    def _load(self) -> None:
        """Load depth, bytes and the oldest row's time (subclasses load their own state too)."""
        try:
            count, size = self._totals(self.conn)
            self._depth, self._bytes = count, size
            self._oldest_at_ns = self._first_at_ns(self.conn)
        except sqlite3.Error as err:
            raise self._translate("open", err) from err

    def __enter__(self) -> Self:
        self.open_queue()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- errors and transactions -----------------------------------------------------------

    def _translate(self, what: str, err: sqlite3.Error) -> SpoolError:
        """The SpoolError for ``err`` (raise it ``from err``)."""
        if is_corruption(err):
            return SpoolCorruptError(f"spool {self} is not a readable SQLite database ({what}: {err})")
        return SpoolError(f"spool {self}: {what} failed: {err}")

    @contextlib.contextmanager
    def transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on any exception); sqlite3 errors come out
        as SpoolError naming ``what``."""
        db = self.conn
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as err:
            raise self._translate(what, err) from err
        try:
            yield db
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise self._translate(what, exc) from exc
            raise

    def _payload_size(self, payload: P) -> int:
        """Bytes a payload counts for: what the ``size`` column holds, or what LENGTH(CAST(… AS BLOB)) gives."""
        return len(_payload_bytes(payload))

    def _payload(self, raw: Any) -> P:
        """A payload as read from the table (TEXT → str, BLOB → bytes)."""
        raise NotImplementedError

    # ---- primitives inside a transaction (sqlite3 errors: the transaction translates them) --

    def _insert(self, db: sqlite3.Connection, rows: Sequence[tuple[int, P]]) -> tuple[int, int]:
        """Insert ``(at_ns, payload)`` rows at the end (with their size and checksum when the layout
        has those columns); returns (rows, bytes) added. Their seqs are consecutive, the last one
        is ``last_insert_rowid()``."""
        lay = self.LAYOUT
        sizes = [self._payload_size(payload) for _, payload in rows]
        columns = [lay.at_ns, lay.payload]
        values: list[list[Any]] = [[at, payload] for at, payload in rows]
        if lay.size:
            columns.append(lay.size)
            for value, size in zip(values, sizes, strict=True):
                value.append(size)
        if lay.check:
            columns.append(lay.check)
            for value, (_, payload) in zip(values, rows, strict=True):
                value.append(payload_check(payload))
        marks = ", ".join("?" for _ in columns)
        db.executemany(f"INSERT INTO {lay.table} ({', '.join(columns)}) VALUES ({marks})", values)
        return len(rows), sum(sizes)

    def _delete_range(self, db: sqlite3.Connection, after: int, through: int) -> tuple[int, int]:
        """Delete the rows with ``after < seq <= through``; returns (rows, bytes) removed."""
        lay = self.LAYOUT
        where = f"WHERE {lay.seq} > ? AND {lay.seq} <= ?"
        count, size = db.execute(
            f"SELECT COUNT(*), COALESCE(SUM({lay.size_sql}), 0) FROM {lay.table} {where}", (after, through)
        ).fetchone()
        if count:
            db.execute(f"DELETE FROM {lay.table} {where}", (after, through))
        return int(count), int(size)

    def _totals(self, db: sqlite3.Connection) -> tuple[int, int]:
        """(rows, bytes) in the table, counted."""
        lay = self.LAYOUT
        count, size = db.execute(f"SELECT COUNT(*), COALESCE(SUM({lay.size_sql}), 0) FROM {lay.table}").fetchone()
        return int(count), int(size)

    def _first_after(self, db: sqlite3.Connection, seq: int) -> tuple[int, int] | None:
        """(seq, at_ns) of the first row after ``seq``, or None."""
        lay = self.LAYOUT
        row = db.execute(
            f"SELECT {lay.seq}, {lay.at_ns} FROM {lay.table} WHERE {lay.seq} > ? ORDER BY {lay.seq} LIMIT 1", (seq,)
        ).fetchone()
        return (int(row[0]), int(row[1])) if row else None

    def _first_at_ns(self, db: sqlite3.Connection) -> int | None:
        first = self._first_after(db, 0)
        return first[1] if first else None

    # ---- the queue -------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Rows in the queue (as of the last commit)."""
        return self._depth

    @property
    def bytes(self) -> int:
        """Their payloads' size in bytes."""
        return self._bytes

    @property
    def oldest_at_ns(self) -> int | None:
        """When the oldest row arrived; None when the queue is empty."""
        return self._oldest_at_ns

    def append_rows(self, rows: Sequence[tuple[int, P]]) -> None:
        """Add ``(at_ns, payload)`` rows at the end in one transaction: durable when this returns."""
        if not rows:
            return
        with self.transaction("append") as db:
            count, size = self._insert(db, rows)
        self._depth += count
        self._bytes += size
        if self._oldest_at_ns is None:
            self._oldest_at_ns = rows[0][0]

    def read_oldest(self, limit: int, *, after: int = 0) -> list[QueueRow[P]]:
        """Up to ``limit`` of the oldest rows with a seq above ``after``, oldest first (with their
        stored checksum when the layout has one: see :meth:`QueueRow.intact`)."""
        lay = self.LAYOUT
        check = lay.check or "NULL"
        try:
            rows = self.conn.execute(
                f"SELECT {lay.seq}, {lay.at_ns}, {lay.payload}, {check} FROM {lay.table}"
                f" WHERE {lay.seq} > ? ORDER BY {lay.seq} LIMIT ?",
                (after, limit),
            ).fetchall()
        except sqlite3.Error as err:
            raise self._translate("read", err) from err
        return [
            QueueRow(int(seq), int(at), self._payload(payload), None if crc is None else int(crc))
            for seq, at, payload, crc in rows
        ]

    def delete_through(self, seq: int) -> int:
        """Remove every row up to and including ``seq`` in one transaction; returns how many."""
        with self.transaction("delete") as db:
            count, size = self._delete_range(db, 0, seq)
            oldest = self._first_at_ns(db)
        self._depth -= count
        self._bytes -= size
        self._oldest_at_ns = oldest
        return count
