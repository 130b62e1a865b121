"""The SQLite spool when the disk refuses commits, and the WAL's share of max_bytes (issue 12, item 4).

Commits are made to fail here by replacing the store's commit (the real full disk, a 2 MiB tmpfs,
is tests/integration/test_spool_disk_full.py). Measured before: every put after
``commit_max_observations`` waiting cut the retry wait short, so a failing disk meant a commit
attempt and an ERROR line per put; nothing uncommitted could be published.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from edgeprobe.agent.spool import SpoolEntry, SqliteSpool, _Store, inspect_spool
from edgeprobe.schema import Observation
from tests.support.wait import wait_for_async


def obs(i: int) -> Observation:
    return Observation(
        id=f"{i:032x}", seq=i, kind="icmp", target="127.0.0.1", started_at_ns=i, duration_ms=1.0, outcome="ok"
    )


def seqs(entries: list[SpoolEntry]) -> list[int]:
    return [msgspec.json.decode(e.payload, type=Observation).seq for e in entries]


class Disk:
    """Makes the store's commits fail (as a full disk does) while ``full`` is set; counts attempts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = False
        self.attempts = 0
        real = _Store.commit

        def commit(store: _Store, *args: Any) -> Any:
            self.attempts += 1
            if self.full:
                raise sqlite3.OperationalError("database or disk is full")
            return real(store, *args)

        monkeypatch.setattr(_Store, "commit", commit)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    yield Disk(monkeypatch)


@pytest.fixture
async def spool(tmp_path: Path, disk: Disk) -> AsyncIterator[SqliteSpool]:
    s = await SqliteSpool.open(tmp_path / "spool.db", max_bytes=10**9, max_age_s=3600.0, commit_interval_s=0.01)
    yield s
    disk.full = False
    await s.aclose()


async def failing(spool: SqliteSpool) -> None:
    await wait_for_async(lambda: spool.stats().disk_failing, 10, "a failed commit")


async def recovered(spool: SqliteSpool) -> None:
    await wait_for_async(lambda: not spool.stats().disk_failing, 10, "commits working again")


async def test_backlog_is_sent_from_memory_in_order_and_never_written(
    tmp_path: Path, spool: SqliteSpool, disk: Disk
) -> None:
    for i in range(3):
        spool.put(obs(i))
    await spool.flush()
    disk.full = True
    for i in range(3, 8):
        spool.put(obs(i))
    await failing(spool)
    await asyncio.wait_for(spool.flush(), 1)  # returns at once while the disk refuses
    stats = spool.stats()
    assert stats.depth == 3 and stats.memory_backlog == 5 and spool.available() == 8
    first = await spool.take(4)
    assert seqs(first) == [0, 1, 2, 3]  # the committed ones first, then memory
    rest = await spool.take(10)
    assert seqs(rest) == [4, 5, 6, 7] and spool.available() == 0
    spool.ack(first + rest)
    assert spool.stats().memory_backlog == 0  # acknowledged from memory: nothing left to write
    disk.full = False
    await recovered(spool)
    await wait_for_async(lambda: len(spool) == 0, 10, "the acknowledged rows deleted")
    info = inspect_spool(tmp_path / "spool.db")
    assert info.depth == 0 and info.acknowledged_total == 8 and spool.dropped == 0


@pytest.mark.parametrize("then", ["ack", "release"])
async def test_in_flight_from_memory_when_the_disk_comes_back(spool: SqliteSpool, disk: Disk, then: str) -> None:
    disk.full = True
    for i in range(5):
        spool.put(obs(i))
    await failing(spool)
    batch = await spool.take(3)
    assert seqs(batch) == [0, 1, 2] and all(e.rowid < 0 for e in batch)
    disk.full = False
    await recovered(spool)
    assert len(spool) == 5 and spool.stats().memory_backlog == 0  # all five committed, three still in flight
    assert seqs(await spool.take(10)) == [3, 4]
    if then == "ack":  # the broker has them: the rows they became are deleted
        spool.ack(batch)
        await spool.flush()
        assert len(spool) == 2
    else:  # not acknowledged: available again, first
        spool.release(batch)
        assert spool.available() == 3
        got = await spool.take(10)
        assert seqs(got) == [0, 1, 2]


async def test_memory_backlog_is_bounded_oldest_dropped_and_counted(tmp_path: Path, disk: Disk) -> None:
    path = tmp_path / "spool.db"
    spool = await SqliteSpool.open(
        path, max_bytes=10**9, max_age_s=3600.0, commit_interval_s=0.01, memory_max_observations=100
    )
    try:
        disk.full = True
        for i in range(150):
            spool.put(obs(i))
        await failing(spool)
        stats = spool.stats()
        assert stats.memory_backlog == 100 and stats.dropped_memory_limit == 50 and spool.dropped == 50
        got = await spool.take(1000)
        assert seqs(got) == list(range(50, 150))
        spool.release(got)
        disk.full = False
        await recovered(spool)
        await spool.flush()
    finally:
        disk.full = False
        await spool.aclose()
    info = inspect_spool(path)
    assert info.dropped_memory_limit == 50 and info.depth == 100  # the count reached the file with the rows


async def test_failing_commits_back_off_and_log_once(
    spool: SqliteSpool, disk: Disk, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgeprobe.agent.spool")
    disk.full = True
    attempts = disk.attempts
    t0 = time.monotonic()
    for i in range(3000):  # ~2000/s for 1.5 s, more than commit_max_observations waiting
        spool.put(obs(i))
        if i % 100 == 99:
            await asyncio.sleep(0.05)
    elapsed = time.monotonic() - t0
    tried = disk.attempts - attempts
    disk.full = False
    await recovered(spool)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    print(f"\n{elapsed:.1f} s of failing commits: {tried} attempt(s), {len(lines)} line(s)")
    assert tried <= 10, tried  # 0.1 s doubling: ~5 in 1.5 s (before: one per put)
    assert len(lines) == 2, lines  # the failure, then the recovery
    assert "commit failed" in lines[0] and "commits work again" in lines[1]
    await spool.flush()
    assert len(spool) == 3000 and spool.dropped == 0


async def test_the_wal_counts_toward_max_bytes(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    max_bytes = 256 * 1024
    spool = await SqliteSpool.open(path, max_bytes=max_bytes, max_age_s=3600.0, commit_interval_s=0.01)
    try:
        worst = 0
        for group in range(40):
            for i in range(group * 25, group * 25 + 25):
                spool.put(obs(i))
            await spool.flush()
            info = inspect_spool(path)
            worst = max(worst, info.bytes + info.wal_bytes)
        print(f"\npayload + WAL at most {worst} bytes (max_bytes {max_bytes})")
        assert worst <= max_bytes  # before: the WAL alone grew to ~4 MiB before its first checkpoint
    finally:
        await spool.aclose()


async def test_low_free_space_truncates_the_wal_after_every_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_Store, "free_bytes", lambda self: 1024 * 1024)  # 1 MiB free on the spool's filesystem
    path = tmp_path / "spool.db"
    spool = await SqliteSpool.open(path, max_bytes=10**9, max_age_s=3600.0, commit_interval_s=0.01)
    try:
        for group in range(5):
            for i in range(group * 100, group * 100 + 100):
                spool.put(obs(i))
            await spool.flush()
            assert inspect_spool(path).wal_bytes == 0
    finally:
        await spool.aclose()
