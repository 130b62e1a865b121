"""The SQLite queue under both spools: lock, schema version, corruption, errors, the queue itself."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest

from edgeprobe.sqlqueue import (
    QueueLayout,
    SpoolClosedError,
    SpoolCorruptError,
    SpoolError,
    SpoolLockedError,
    SpoolVersionError,
    SqliteQueue,
    lock_holder,
    payload_check,
)
from tests.support.paths import REPO


class TextQueue(SqliteQueue[str]):
    LAYOUT = QueueLayout(table="q", seq="seq", at_ns="at_ns", payload="body", payload_type="TEXT")
    OWNER = "tester"

    def _payload(self, raw: Any) -> str:
        return str(raw)


class BlobQueue(SqliteQueue[bytes]):
    LAYOUT = QueueLayout(table="q", seq="rowid", at_ns="at_ns", payload="body", payload_type="BLOB", size="size")
    ON_CORRUPT = "move_aside"

    def _payload(self, raw: Any) -> bytes:
        return bytes(raw)


def state(q: SqliteQueue[Any]) -> tuple[int, int, int | None]:
    """(depth, bytes, oldest_at_ns), read afresh (a function, so no narrowing carries over)."""
    return q.depth, q.bytes, q.oldest_at_ns


def user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


# ----- the queue ----------------------------------------------------------------------------------


def test_round_trip_survives_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "q.sqlite"  # directories are created
    with TextQueue(path) as q:
        assert q.durable and state(q) == (0, 0, None)
        q.append_rows([(10, "a"), (11, "bé")])
        q.append_rows([])  # nothing, no transaction
        assert state(q) == (2, 1 + 3, 10)
    assert user_version(path) == TextQueue.SCHEMA_VERSION
    with TextQueue(path) as q:
        assert state(q) == (2, 4, 10)  # loaded from the file
        rows = q.read_oldest(10)
        assert [(r.at_ns, r.payload) for r in rows] == [(10, "a"), (11, "bé")]
        assert q.read_oldest(10, after=rows[0].seq) == rows[1:]
        assert q.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert q.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_blob_queue_with_a_size_column(tmp_path: Path) -> None:
    with BlobQueue(tmp_path / "q.sqlite", synchronous="normal") as q:
        q.append_rows([(1, b"xyz"), (2, b"\x00\xff")])
        assert q.depth == 2 and q.bytes == 5
        assert [r.payload for r in q.read_oldest(5)] == [b"xyz", b"\x00\xff"]
        assert q.conn.execute("SELECT size FROM q ORDER BY rowid").fetchall() == [(3,), (2,)]
        assert q.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL


def test_delete_through(tmp_path: Path) -> None:
    with TextQueue(tmp_path / "q.sqlite") as q:
        q.append_rows([(10, "a"), (20, "bb"), (30, "ccc")])
        seqs = [r.seq for r in q.read_oldest(10)]
        assert q.delete_through(seqs[1]) == 2
        assert state(q) == (1, 3, 30)
        assert q.delete_through(seqs[1]) == 0  # already gone
        assert q.delete_through(seqs[2]) == 1
        assert state(q) == (0, 0, None)
        q.append_rows([(40, "d")])
        assert q.read_oldest(1)[0].seq > seqs[2]  # a seq is never reused
        assert state(q) == (1, 1, 40)


def test_in_memory_without_a_path() -> None:
    with TextQueue(None) as q:
        assert not q.durable and str(q) == "(in memory)"
        q.append_rows([(1, "x")])
        assert [r.payload for r in q.read_oldest(5)] == ["x"]


# ----- the lock -----------------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys
    from typing import Any
    from edgeprobe.sqlqueue import QueueLayout, SqliteQueue

    class TextQueue(SqliteQueue[str]):
        LAYOUT = QueueLayout(table="q", seq="seq", at_ns="at_ns", payload="body", payload_type="TEXT")

        def _payload(self, raw: Any) -> str:
            return str(raw)

    with TextQueue(sys.argv[1]):
        print("open", flush=True)
        sys.stdin.read()  # until the parent closes our stdin
    """
)


def test_lock_held_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == b"open"
        assert lock_holder(path) == proc.pid
        with pytest.raises(SpoolLockedError) as info:
            TextQueue(path).open_queue()
        assert info.value.holder_pid == proc.pid
        assert str(info.value) == f"spool {path} is in use by another tester (pid {proc.pid})"
        assert isinstance(info.value.__cause__, OSError)
        proc.stdin.close()
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()
    assert lock_holder(path) is None  # released with the process
    with TextQueue(path) as q:
        assert lock_holder(path) == os.getpid() and q.depth == 0


def test_lock_within_one_process_and_released_on_close(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    with TextQueue(path), pytest.raises(SpoolLockedError, match=rf"in use by another tester \(pid {os.getpid()}\)"):
        TextQueue(path).open_queue()
    with TextQueue(path):
        pass


def test_unwritable_directory_is_a_spool_error_with_its_cause(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(SpoolError, match="cannot create the spool directory") as info:
        TextQueue(tmp_path / "file" / "q.sqlite").open_queue()
    assert isinstance(info.value.__cause__, OSError)


# ----- the schema version -------------------------------------------------------------------------


def test_unknown_schema_version_is_refused_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    with TextQueue(path) as q:
        q.append_rows([(1, "keep me")])
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=7")
    db.close()
    with pytest.raises(SpoolVersionError) as info:
        TextQueue(path).open_queue()
    assert str(path) in str(info.value)
    assert "schema version 7" in str(info.value) and "knows version 1" in str(info.value)
    assert info.value.found == 7 and info.value.known == 1
    assert user_version(path) == 7  # untouched
    db = sqlite3.connect(path)
    assert db.execute("SELECT body FROM q").fetchall() == [("keep me",)]
    db.close()
    assert lock_holder(path) is None  # the failed open let go of the lock


@pytest.mark.parametrize("which", ["collector", "agent"])
async def test_both_spools_refuse_a_newer_file(tmp_path: Path, which: str) -> None:
    from edgeprobe.agent.spool import SqliteSpool
    from edgeprobe.collector.spool import Spool

    path = tmp_path / "spool.sqlite"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    known = 1 if which == "collector" else 2  # the agent's spool is at version 2 (checksums)
    message = rf"spool {path} has schema version 99, this {which} knows version {known}"
    with pytest.raises(SpoolVersionError, match=message):
        if which == "collector":
            Spool(path).open()
        else:
            await SqliteSpool.open(path, max_bytes=10**6, max_age_s=60.0)
    assert user_version(path) == 99
    assert not list(tmp_path.glob("*.corrupt-*"))  # not mistaken for corruption


# ----- corruption and errors ----------------------------------------------------------------------


def test_corrupt_file_is_a_spool_error_with_its_cause(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(SpoolCorruptError, match=r"is not a readable SQLite database") as info:
        TextQueue(path).open_queue()
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    assert path.read_bytes().startswith(b"this is not a database")  # refused, left as it was
    assert lock_holder(path) is None


def test_corrupt_file_moved_aside_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with BlobQueue(path) as q:
        q.append_rows([(1, b"x")])
        assert q.depth == 1
    (aside,) = tmp_path.glob("q.sqlite.corrupt-*")
    assert aside.read_bytes().startswith(b"this is not a database")


def test_sqlite_errors_do_not_leak(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    with TextQueue(path) as q:
        q.append_rows([(1, "a")])
        other = sqlite3.connect(path)
        other.execute("DROP TABLE q")  # the file changes under the queue
        other.close()
        with pytest.raises(SpoolError, match="append failed") as info:
            q.append_rows([(2, "b")])
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        assert not q.conn.in_transaction  # rolled back
        with pytest.raises(SpoolError, match="read failed") as info:
            q.read_oldest(1)
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        with pytest.raises(SpoolError, match="delete failed"):
            q.delete_through(1)
        assert q.depth == 1  # unchanged by the failures


def test_closed_queue_is_a_spool_error(tmp_path: Path) -> None:
    q = TextQueue(tmp_path / "q.sqlite")
    with pytest.raises(SpoolClosedError, match="is not open"):
        q.append_rows([(1, "a")])
    q.open_queue()
    with pytest.raises(SpoolError, match="open already"):
        q.open_queue()
    q.close()
    q.close()  # twice is fine
    with pytest.raises(SpoolClosedError):
        q.read_oldest(1)


# ----- migrations and checksums -------------------------------------------------------------------


class CheckedQueue(SqliteQueue[bytes]):
    """BlobQueue's file at version 2: a checksum column, added to version-1 files by a migration."""

    LAYOUT = QueueLayout(
        table="q", seq="rowid", at_ns="at_ns", payload="body", payload_type="BLOB", size="size", check="crc"
    )
    SCHEMA_VERSION = 2
    MIGRATIONS: ClassVar[Mapping[int, tuple[str, ...]]] = {1: ("ALTER TABLE q ADD COLUMN crc INTEGER",)}

    def _payload(self, raw: Any) -> bytes:
        return bytes(raw)


def test_an_older_file_is_migrated_its_rows_trusted(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    with BlobQueue(path) as q:
        q.append_rows([(1, b"old")])
    assert user_version(path) == 1
    with CheckedQueue(path) as q:
        assert q.migrated_from == 1 and q.depth == 1
        q.append_rows([(2, b"new")])
        rows = q.read_oldest(10)
        assert [(r.payload, r.check) for r in rows] == [(b"old", None), (b"new", payload_check(b"new"))]
        assert all(r.intact() for r in rows)  # no checksum: trusted as before
    assert user_version(path) == 2
    with CheckedQueue(path) as q:
        assert q.migrated_from is None and q.depth == 2


def test_a_failed_migration_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    class Broken(CheckedQueue):
        MIGRATIONS: ClassVar[Mapping[int, tuple[str, ...]]] = {
            1: ("ALTER TABLE q ADD COLUMN crc INTEGER", "ALTER TABLE nope ADD COLUMN x")
        }

    path = tmp_path / "q.sqlite"
    with BlobQueue(path) as q:
        q.append_rows([(1, b"keep")])
    with pytest.raises(SpoolError, match="open failed"):
        Broken(path).open_queue()
    assert user_version(path) == 1  # all steps or none
    with BlobQueue(path) as q:
        assert [r.payload for r in q.read_oldest(5)] == [b"keep"]


def test_a_file_older_than_the_first_migration_is_refused(tmp_path: Path) -> None:
    class V3(CheckedQueue):
        SCHEMA_VERSION = 3
        MIGRATIONS: ClassVar[Mapping[int, tuple[str, ...]]] = {2: ()}  # knows 2 -> 3 only

    path = tmp_path / "q.sqlite"
    with BlobQueue(path):
        pass
    with pytest.raises(SpoolVersionError, match="schema version 1, this process knows version 3"):
        V3(path).open_queue()
    assert user_version(path) == 1


def test_a_changed_byte_fails_the_checksum(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    with CheckedQueue(path) as q:
        q.append_rows([(1, b'{"id":"a"}'), (2, b'{"id":"b"}')])
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE q SET body = ? WHERE at_ns = 2", (b'{"id":"c"}',))
    db.close()
    with CheckedQueue(path) as q:
        assert [r.intact() for r in q.read_oldest(5)] == [True, False]
