"""The agent's spool: one suite run against the in-memory and the SQLite implementation, then
what only the SQLite one promises (restarts, kill -9, locking, corruption, counters on disk) and
``edgeprobe agent spool``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner

from edgeprobe.agent.spool import (
    MemorySpool,
    Spool,
    SpoolEntry,
    SpoolError,
    SqliteSpool,
    _Store,
    inspect_spool,
    spool_lines,
)
from edgeprobe.cli import main as cli_main
from edgeprobe.schema import Observation, encode
from tests.support.paths import REPO
from tests.support.wait import wait_for_async

MakeSpool = Callable[..., Awaitable[Spool]]


def obs(i: int, pad: int = 0) -> Observation:
    return Observation(
        id=f"{i:032x}",
        seq=i,
        kind="icmp",
        target="127.0.0.1",
        started_at_ns=1_700_000_000_000_000_000 + i,
        duration_ms=1.0,
        outcome="ok",
        reason="x" * pad if pad else None,
    )


def seqs(entries: list[SpoolEntry]) -> list[int]:
    return [msgspec.json.decode(e.payload, type=Observation).seq for e in entries]


SIZE = len(encode(obs(0)))  # every obs(i) with 0 <= i <= 9 and pad 0 encodes to this many bytes


@pytest.fixture(params=["memory", "sqlite"])
async def make_spool(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeSpool]:
    opened: list[Spool] = []

    async def make(max_bytes: int = 10**9, max_age_s: float = 3600.0, **kwargs: Any) -> Spool:
        spool: Spool
        if request.param == "memory":
            spool = MemorySpool(max_bytes=max_bytes, max_age_s=max_age_s)
        else:
            spool = await SqliteSpool.open(
                tmp_path / "spool.db", max_bytes=max_bytes, max_age_s=max_age_s, commit_interval_s=0.01, **kwargs
            )
        opened.append(spool)
        return spool

    yield make
    for spool in opened:
        await spool.aclose()


async def put_all(spool: Spool, observations: list[Observation]) -> None:
    for o in observations:
        spool.put(o)
    await spool.flush()


# ----- the shared suite ----------------------------------------------------------------------------


async def test_take_in_order_ack_deletes(make_spool: MakeSpool) -> None:
    spool = await make_spool()
    await put_all(spool, [obs(i) for i in range(5)])
    assert len(spool) == 5 and spool.available() == 5
    batch = await spool.take(3)
    assert seqs(batch) == [0, 1, 2]
    assert spool.available() == 2 and len(spool) == 5  # in flight still counts
    spool.ack(batch)
    await spool.flush()
    assert len(spool) == 2
    assert seqs(await spool.take(10)) == [3, 4]
    assert spool.stats().in_flight == 2


async def test_in_flight_is_not_taken_twice_and_release_goes_first(make_spool: MakeSpool) -> None:
    spool = await make_spool()
    await put_all(spool, [obs(i) for i in range(4)])
    first = await spool.take(2)
    second = await spool.take(10)
    assert seqs(first) == [0, 1] and seqs(second) == [2, 3]
    assert await spool.take(10) == []
    await put_all(spool, [obs(4)])
    spool.release(second)  # not acknowledged: available again, before the newer one
    spool.ack(first)
    await spool.flush()
    assert seqs(await spool.take(10)) == [2, 3, 4]
    assert spool.dropped == 0


async def test_release_after_newer_puts_keeps_order(make_spool: MakeSpool) -> None:
    spool = await make_spool()
    await put_all(spool, [obs(i) for i in range(3)])
    batch = await spool.take(3)
    await put_all(spool, [obs(i) for i in range(3, 6)])
    spool.release(batch)
    got = await spool.take(100)
    assert seqs(got) == list(range(6))


async def test_bytes_bound_drops_the_oldest_and_counts(make_spool: MakeSpool) -> None:
    spool = await make_spool(max_bytes=SIZE * 3)
    await put_all(spool, [obs(i) for i in range(5)])
    stats = spool.stats()
    assert len(spool) == 3 and stats.bytes == 3 * SIZE
    assert stats.dropped_bytes_limit == 2 and stats.dropped_age_limit == 0 and spool.dropped == 2
    assert seqs(await spool.take(10)) == [2, 3, 4]


async def test_bytes_bound_spares_what_is_in_flight(make_spool: MakeSpool) -> None:
    spool = await make_spool(max_bytes=SIZE * 3)
    await put_all(spool, [obs(i) for i in range(3)])
    in_flight = await spool.take(2)
    await put_all(spool, [obs(3), obs(4)])  # 5 held, 3 allowed: 2 go, but not 0 and 1 (in flight)
    spool.ack(in_flight)
    await spool.flush()
    assert spool.stats().dropped_bytes_limit == 2
    assert seqs(await spool.take(10)) == [4]


async def test_age_bound_drops_the_old_and_counts(make_spool: MakeSpool) -> None:
    spool = await make_spool(max_age_s=0.3)
    await put_all(spool, [obs(0), obs(1)])
    await asyncio.sleep(0.5)  # the scenario: they grow older than max_age_s
    await put_all(spool, [obs(2)])
    stats = spool.stats()
    assert stats.dropped_age_limit == 2 and stats.dropped_bytes_limit == 0
    assert seqs(await spool.take(10)) == [2]


async def test_stats_depth_bytes_and_oldest(make_spool: MakeSpool) -> None:
    spool = await make_spool()
    empty = spool.stats()
    assert empty.depth == 0 and empty.bytes == 0 and empty.oldest_enqueued_at_ns is None
    assert empty.oldest_age_s() is None
    before = time.time_ns()
    await put_all(spool, [obs(0), obs(1, pad=100)])
    stats = spool.stats()
    assert stats.depth == 2 and stats.bytes == SIZE + len(encode(obs(1, pad=100)))
    assert stats.oldest_enqueued_at_ns is not None and stats.oldest_enqueued_at_ns >= before
    assert spool.oldest_available_at_ns() is not None
    age = stats.oldest_age_s(stats.oldest_enqueued_at_ns + 2_500_000_000)
    assert age == pytest.approx(2.5)


async def test_wait_changed_wakes_when_something_is_available(make_spool: MakeSpool) -> None:
    spool = await make_spool()
    waiter = asyncio.create_task(spool.wait_changed(10))
    await asyncio.sleep(0)  # one loop turn (not a timed wait): the waiter is waiting before the put
    spool.put(obs(1))  # no flush: the SQLite writer's own group commit makes it available
    await asyncio.wait_for(waiter, 5)
    assert spool.available() == 1


async def test_many_in_order_across_batches(make_spool: MakeSpool) -> None:
    spool = await make_spool()
    await put_all(spool, [obs(i) for i in range(2500)])
    got: list[int] = []
    while batch := await spool.take(1000):
        got += seqs(batch)
        spool.ack(batch)
    await spool.flush()
    assert got == list(range(2500)) and len(spool) == 0


# ----- SQLite only ----------------------------------------------------------------------------------


async def open_sqlite(path: Path, **kwargs: Any) -> SqliteSpool:
    args: dict[str, Any] = {"max_bytes": 10**9, "max_age_s": 3600.0, "commit_interval_s": 0.01}
    return await SqliteSpool.open(path, **{**args, **kwargs})


async def test_sqlite_survives_a_restart_old_entries_first(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "spool.db"  # directories are created
    spool = await open_sqlite(path, max_bytes=SIZE * 4)
    await put_all(spool, [obs(i) for i in range(6)])  # 2 dropped over max_bytes
    batch = await spool.take(2)  # in flight at close: not acknowledged, so kept
    assert seqs(batch) == [2, 3]
    await spool.aclose()
    info = inspect_spool(path)
    assert info.depth == 4 and info.dropped_bytes_limit == 2 and info.in_use_by_pid is None

    again = await open_sqlite(path, max_bytes=SIZE * 4)
    assert len(again) == 4 and again.stats().dropped_bytes_limit == 2  # the counter survived
    assert again.dropped == 0  # none during this run yet
    again.put(obs(6))  # one over the bound: the oldest not in flight (2) goes
    await again.flush()
    assert again.stats().dropped_bytes_limit == 3 and again.dropped == 1
    got = await again.take(10)
    assert seqs(got) == [3, 4, 5, 6]
    again.ack(got)
    await again.aclose()
    assert inspect_spool(path).depth == 0 and inspect_spool(path).acknowledged_total == 4


async def test_sqlite_ack_not_yet_committed_is_committed_at_close(tmp_path: Path) -> None:
    spool = await open_sqlite(tmp_path / "spool.db", commit_interval_s=5.0)
    spool.put(obs(1))
    await spool.flush()
    spool.ack(await spool.take(1))
    await spool.aclose()
    assert inspect_spool(tmp_path / "spool.db").depth == 0


async def test_sqlite_one_agent_per_spool(tmp_path: Path) -> None:
    spool = await open_sqlite(tmp_path / "spool.db")
    try:
        with pytest.raises(SpoolError, match=rf"in use by another agent \(pid {os.getpid()}\)"):
            await open_sqlite(tmp_path / "spool.db")
        assert inspect_spool(tmp_path / "spool.db").in_use_by_pid == os.getpid()
    finally:
        await spool.aclose()
    await (await open_sqlite(tmp_path / "spool.db")).aclose()  # free again


async def test_sqlite_unusable_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(SpoolError, match=r"cannot create the spool directory .*set spool\.path"):
        await open_sqlite(tmp_path / "file" / "spool.db")


async def test_sqlite_corrupt_file_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "spool.db"
    path.write_bytes(b"this is not a database" * 100)
    spool = await open_sqlite(path)
    await put_all(spool, [obs(1)])
    assert len(spool) == 1
    await spool.aclose()
    assert [p.name for p in tmp_path.glob("spool.db.corrupt-*")]
    assert any("moved to" in r.message for r in caplog.records)


async def test_sqlite_failed_commit_keeps_the_data_and_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = _Store.commit
    failures = {"left": 2}

    def flaky(self: _Store, *args: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return real(self, *args)

    monkeypatch.setattr(_Store, "commit", flaky)
    spool = await open_sqlite(tmp_path / "spool.db")
    spool.put(obs(1))
    spool.put(obs(2))
    # Committed after the retries (while the commits fail, they are available from memory: see
    # test_spool_disk.py); nothing lost, in order.
    await wait_for_async(lambda: len(spool) == 2, 10, "both committed after two failed commits")
    assert spool.stats().errors == 2 and spool.stats().memory_backlog == 0
    assert seqs(await spool.take(10)) == [1, 2]
    await spool.aclose()


async def test_sqlite_inspect_while_open_and_render(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await open_sqlite(path, max_bytes=SIZE * 2)
    await put_all(spool, [obs(i) for i in range(3)])
    info = inspect_spool(path)
    await spool.aclose()
    assert info.exists and info.depth == 2 and info.bytes == 2 * SIZE and info.dropped_bytes_limit == 1
    assert info.in_use_by_pid == os.getpid() and info.oldest_enqueued_at_ns is not None
    lines = spool_lines(info, SIZE * 2, 604800, now_ns=info.oldest_enqueued_at_ns + 90 * 10**9)
    text = "\n".join(lines)
    assert f"in use by the agent with pid {os.getpid()}" in text
    assert f"depth:   2 observation(s), {2 * SIZE} bytes" in text
    assert "oldest:  90.0 s old" in text and "max_age_s 7.0 d" in text
    assert "dropped: 1 over max_bytes, 0 over max_age_s" in text
    missing = spool_lines(inspect_spool(tmp_path / "nope.db"), 1, 1)
    assert missing == [f"spool {tmp_path / 'nope.db'}: does not exist yet (the agent creates it when it starts)"]


def corrupt_one_byte(path: Path, rowid: int) -> None:
    """Change one byte of one row's payload in the file of a closed spool (its checksum stays)."""
    db = sqlite3.connect(path)
    with db:
        (payload,) = db.execute("SELECT payload FROM spool WHERE rowid = ?", (rowid,)).fetchone()
        bad = bytearray(payload)
        bad[0] = ord("[")  # '{' -> '[': no longer JSON, and inside a batch the whole message would not be
        db.execute("UPDATE spool SET payload = ? WHERE rowid = ?", (bytes(bad), rowid))
    db.close()


async def test_sqlite_corrupted_row_is_quarantined_the_rest_go_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    spool = await open_sqlite(path)
    await put_all(spool, [obs(i) for i in range(10)])
    rowids = [e.rowid for e in await spool.take(10)]
    await spool.aclose()  # taken, never acknowledged: all ten stay
    corrupt_one_byte(path, rowids[5])

    again = await open_sqlite(path)
    got = await again.take(100)
    assert seqs(got) == [0, 1, 2, 3, 4, 6, 7, 8, 9]  # the rest of the batch goes out
    assert again.stats().quarantined == 1 and again.available() == 0
    logged = [r.getMessage() for r in caplog.records if "failed their checksum" in r.getMessage()]
    assert len(logged) == 1 and f"rowid {rowids[5]})" in logged[0]
    again.ack(got)
    await again.flush()
    assert len(again) == 0 and again.stats().quarantined == 1
    await again.aclose()

    info = inspect_spool(path)
    assert info.depth == 0 and info.quarantined_total == 1 and info.quarantine_rows == 1
    assert "quarantined: 1 failed their checksum" in "\n".join(spool_lines(info, 10**9, 3600))
    db = sqlite3.connect(path)
    ((spool_rowid, payload),) = db.execute("SELECT spool_rowid, payload FROM quarantine").fetchall()
    db.close()
    assert spool_rowid == rowids[5] and bytes(payload).startswith(b"[")  # kept as found
    third = await open_sqlite(path)
    assert third.stats().quarantined == 1  # the counter is in the file
    await third.aclose()


V1_SCHEMA = [
    "CREATE TABLE spool ( rowid INTEGER PRIMARY KEY AUTOINCREMENT, enqueued_at_ns INTEGER NOT NULL,"
    " size INTEGER NOT NULL, payload BLOB NOT NULL)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
]


async def test_sqlite_version_1_file_is_migrated_not_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A spool written by the agent before checksums: opened, migrated, its rows trusted and sent."""
    caplog.set_level("INFO", logger="edgeprobe.agent.spool")
    path = tmp_path / "spool.db"
    db = sqlite3.connect(path)
    with db:
        for ddl in V1_SCHEMA:
            db.execute(ddl)
        db.executemany("INSERT INTO meta VALUES (?, ?)", [("dropped_bytes_limit", 3), ("acknowledged_total", 7)])
        db.executemany(
            "INSERT INTO spool (enqueued_at_ns, size, payload) VALUES (?, ?, ?)",
            [(time.time_ns(), SIZE, encode(obs(i))) for i in range(3)],
        )
    db.execute("PRAGMA user_version=1")
    db.close()
    spool = await open_sqlite(path)
    assert len(spool) == 3 and spool.stats().dropped_bytes_limit == 3
    assert any("migrated from schema version 1 to 2" in r.getMessage() for r in caplog.records)
    spool.put(obs(3))
    await spool.flush()
    got = await spool.take(10)
    assert seqs(got) == [0, 1, 2, 3] and spool.stats().quarantined == 0
    spool.ack(got)
    await spool.aclose()
    info = inspect_spool(path)
    assert info.schema_version == 2 and info.acknowledged_total == 11 and info.depth == 0


# A child process puts observations, waits for its group commits, reports, then waits to be killed.
CHILD = textwrap.dedent(
    """
    import asyncio, sys, time
    from edgeprobe.agent.spool import SqliteSpool
    from edgeprobe.schema import Observation

    async def main() -> None:
        spool = await SqliteSpool.open(
            sys.argv[1], max_bytes=10**9, max_age_s=3600, commit_interval_s=0.02, commit_log=sys.argv[1] + ".ids"
        )
        for i in range(int(sys.argv[2])):
            spool.put(Observation(id=f"{i:032x}", seq=i, kind="icmp", target="t", started_at_ns=i,
                                  duration_ms=1.0, outcome="ok"))
            if i % 100 == 0:
                await asyncio.sleep(0)
        await spool.flush()
        print("committed", flush=True)
        # and more that are never waited for: some of these may be lost by the kill
        for i in range(int(sys.argv[2]), int(sys.argv[2]) + 1000):
            spool.put(Observation(id=f"{i:032x}", seq=i, kind="icmp", target="t", started_at_ns=i,
                                  duration_ms=1.0, outcome="ok"))
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


def test_sqlite_kill_9_loses_nothing_committed(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    n = 5000
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(n)], stdout=subprocess.PIPE, cwd=REPO
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"committed"
        time.sleep(0.2)  # the scenario: the kill lands while the child's writer commits the unawaited puts
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
        proc.wait()
    committed_ids = (tmp_path / "spool.db.ids").read_text().split()
    info = inspect_spool(path)
    assert info.in_use_by_pid is None  # the lock died with the process
    with sqlite3.connect(path) as db:
        payloads = [bytes(p) for (p,) in db.execute("SELECT payload FROM spool ORDER BY rowid")]
    got = [msgspec.json.decode(p, type=Observation).seq for p in payloads]
    assert got == list(range(len(got))) and len(got) >= n  # in order, nothing missing
    assert len(committed_ids) <= len(got)
    assert {f"{i:032x}" for i in got} >= set(committed_ids)


# ----- edgeprobe agent spool ------------------------------------------------------------------------


def test_cli_agent_spool(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    conf = tmp_path / "agent.yaml"
    conf.write_text(f"agent: {{id: cli-a1, site: lab}}\nspool: {{path: '{tmp_path}/{{agent}}.db'}}\n")
    runner = CliRunner()
    res = runner.invoke(cli_main, ["agent", "spool", "-c", str(conf)])
    assert res.exit_code == 0 and "does not exist yet" in res.output

    async def fill() -> None:
        spool = await open_sqlite(tmp_path / "cli-a1.db")
        await put_all(spool, [obs(i) for i in range(7)])
        await spool.aclose()

    asyncio.run(fill())
    res = runner.invoke(cli_main, ["agent", "spool", "-c", str(conf)])
    assert res.exit_code == 0, res.output
    assert f"spool {tmp_path}/cli-a1.db (not in use)" in res.output
    assert "depth:   7 observation(s)" in res.output and "max_bytes 256.0 MiB" in res.output
    res = runner.invoke(cli_main, ["agent", "spool", "-c", str(conf), "--json"])
    data = json.loads(res.output)
    assert data["depth"] == 7 and data["dropped_bytes_limit"] == 0 and data["max_age_s"] == 604800
    assert not path.exists()

    conf.write_text("agent: {id: cli-a1, site: lab}\nspool: {path: null}\n")
    res = runner.invoke(cli_main, ["agent", "spool", "-c", str(conf)])
    assert res.exit_code == 0 and "in memory" in res.output


# ----- config ---------------------------------------------------------------------------------------


def test_spool_config_defaults_and_agent_placeholder(tmp_path: Path) -> None:
    from edgeprobe.agent.config import load_agent_config

    conf = tmp_path / "agent.yaml"
    conf.write_text("agent: {id: fra1-a, site: fra1}\n")
    cfg, _ = load_agent_config(conf, environ={})
    assert cfg.spool.resolved_path("fra1-a") == "/var/lib/edgeprobe/fra1-a/spool.db"
    assert cfg.spool.max_bytes == 256 * 1024 * 1024 and cfg.spool.max_age_s == 7 * 86400
    assert cfg.spool.synchronous == "full" and cfg.publish.replay_max_per_s == 2000
    assert cfg.publish.health_interval_s == 30
    conf.write_text("agent: {id: fra1-a, site: fra1}\nspool: {path: null}\n")
    assert load_agent_config(conf, environ={})[0].spool.resolved_path("x") is None


def test_replay_rate_must_exceed_production(tmp_path: Path) -> None:
    from edgeprobe.agent.config import load_agent_config
    from edgeprobe.configfile import ConfigError

    conf = tmp_path / "agent.yaml"
    conf.write_text(
        "agent: {id: a, site: s}\npublish: {replay_max_per_s: 15}\n"
        "jobs: [{kind: tcp, targets: ['127.0.0.1:1', '127.0.0.1:2'], interval_s: 0.1,"
        " options: {count: 1, timeout_s: 0.05}}]\n"
    )
    with pytest.raises(ConfigError, match=r"publish\.replay_max_per_s: 15/s is not above what the jobs produce \(20"):
        load_agent_config(conf, environ={})

