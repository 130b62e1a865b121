"""The agent's spool on a full disk (issue 12, item 4): a real 2 MiB tmpfs, real mosquitto, the
real publisher, a subscriber counting every id.

Measured before: with 2 MiB free the spool failed after ~650 observations (SQLite grows its WAL
to ~4 MiB before the first checkpoint), then logged ~31 ERROR lines a second, published nothing
even with the broker up (only committed rows were sent), and health showed a depth of 11 while
thousands waited in memory.

Needs root (to mount the tmpfs); skipped, saying so, otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import pytest

from edgeprobe.agent.config import AgentConfig
from edgeprobe.agent.publisher import Publisher
from edgeprobe.agent.spool import SqliteSpool, inspect_spool
from edgeprobe.configfile import convert
from edgeprobe.localstack import MosquittoServer
from edgeprobe.schema import AgentHealth, RawEnvelope
from tests.support.wait import wait_for_async

pytestmark = pytest.mark.integration

AGENT = "df-a1"
FS_SIZE = "2m"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs of the test's own, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts a 2 MiB tmpfs (mount -t tmpfs -o size=2m) to fill it for real")
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE}", "tmpfs", str(mnt)],
            check=True,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"cannot mount a tmpfs here: {err}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem refuses another byte; returns it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (65536, 4096, 512, 1):
            block = b"\0" * chunk
            while True:
                try:
                    os.write(fd, block)
                except OSError as err:
                    if err.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    st = os.statvfs(directory)
    assert st.f_bavail == 0, f"{st.f_bavail} blocks still free"
    return filler


def obs_bytes(i: int) -> Any:
    from edgeprobe.schema import Observation

    return Observation(
        id=f"{i:032x}",
        seq=i,
        kind="icmp",
        target="127.0.0.1",
        started_at_ns=time.time_ns(),
        duration_ms=1.0,
        outcome="ok",
        reason="x" * 200,  # ~350 bytes each: 2 MiB is a few thousand
    )


class Counting:
    """Subscribes to the agent's topics; counts observation ids and keeps health messages."""

    def __init__(self, broker: MosquittoServer) -> None:
        self.broker = broker
        self.ids: list[str] = []
        self.health: list[AgentHealth] = []
        self.subscribed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with aiomqtt.Client(self.broker.host, self.broker.port, identifier=f"count-{AGENT}") as client:
            await client.subscribe(f"edgeprobe/v1/lab/{AGENT}/#", qos=1)
            self.subscribed.set()
            async for msg in client.messages:
                payload = bytes(msg.payload)
                if str(msg.topic).endswith("/obs"):
                    env = msgspec.json.decode(payload, type=RawEnvelope)
                    self.ids.extend(msgspec.json.decode(o)["id"] for o in env.observations)
                elif str(msg.topic).endswith("/health"):
                    self.health.append(msgspec.json.decode(payload, type=AgentHealth))

    async def start(self) -> None:
        self.task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.subscribed.wait(), 10)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


async def put_paced(spool: SqliteSpool, first: int, n: int, ids: list[str]) -> None:
    """Put n observations at about 1000/s (the scenario's production)."""
    for i in range(first, first + n):
        o = obs_bytes(i)
        spool.put(o)
        ids.append(o.id)
        if i % 50 == 49:
            await asyncio.sleep(0.05)


async def test_full_disk_no_error_storm_sent_from_memory_nothing_lost(
    small_fs: Path, mosquitto: MosquittoServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="edgeprobe.agent.spool")
    path = small_fs / "spool.db"
    cfg = convert(
        {
            "agent": {"id": AGENT, "site": "lab"},
            "broker": {"url": mosquitto.url, "reconnect_min_s": 0.1, "reconnect_max_s": 1.0},
            # No collector here: observations leave the spool on the broker's PUBACK.
            "publish": {"flush_interval_s": 0.2, "health_interval_s": 0.5, "ack_timeout_s": 5, "delivery": "broker"},
            "spool": {"path": str(path)},
        },
        AgentConfig,
        "t",
    )
    spool = await SqliteSpool.open(path, max_bytes=cfg.spool.max_bytes, max_age_s=3600.0, commit_interval_s=0.02)
    sub = Counting(mosquitto)
    stop = asyncio.Event()
    pub_task: asyncio.Task[None] | None = None
    put: list[str] = []
    try:
        await put_paced(spool, 0, 50, put)
        await spool.flush()
        assert len(spool) == 50 and not spool.stats().disk_failing

        filler = fill(small_fs)
        t_full = time.monotonic()
        records_before = len(caplog.records)
        await put_paced(spool, 50, 1500, put)
        await wait_for_async(lambda: spool.stats().disk_failing, 10, "the spool to notice the full disk")
        stats = spool.stats()
        assert stats.memory_backlog == 1500 and stats.depth == 50, stats
        assert stats.dropped_this_run == 0

        # The publisher connects while the disk is still full: its first health message shows the
        # backlog in memory, and everything goes out from there.
        await sub.start()
        publisher = Publisher(cfg, spool, ["icmp"])
        pub_task = asyncio.create_task(publisher.run(stop))
        await wait_for_async(lambda: set(put) <= set(sub.ids), 30, lambda: f"all {len(put)} ids while the disk is full")
        assert filler.exists() and os.statvfs(small_fs).f_bavail == 0  # still full
        assert spool.stats().disk_failing and spool.stats().memory_backlog == 0  # acknowledged from memory
        first_health = await wait_for_async(lambda: sub.health, 10, "a health message")
        assert first_health[0].memory_backlog >= 1500 and first_health[0].spool_depth == 50, first_health[0]
        await put_paced(spool, 1550, 300, put)  # and what comes while it stays full goes out too
        await wait_for_async(lambda: set(put) <= set(sub.ids), 30, "the ids put while still full")
        full_s = time.monotonic() - t_full
        lines = [r for r in caplog.records[records_before:] if r.levelno >= logging.WARNING]
        errors = spool.stats().errors
        print(
            f"\ndisk full {full_s:.1f} s: {errors} failed commits, {len(lines)} warning/error line(s) "
            f"({len(lines) / full_s:.2f}/s), {len(put)} put, all received"
        )
        assert errors >= 2  # it kept retrying
        assert len(lines) <= 1 + full_s / 30 + 1, [r.getMessage() for r in lines]

        # Space comes back: the spool resumes by itself (the retry), and nothing is lost.
        filler.unlink()
        await put_paced(spool, 1850, 200, put)
        await wait_for_async(lambda: not spool.stats().disk_failing, 15, "commits working again")
        await wait_for_async(lambda: set(put) <= set(sub.ids), 30, "every id after the disk recovered")
        await wait_for_async(lambda: len(spool) == 0 and spool.stats().memory_backlog == 0, 15, "an empty spool")
        assert spool.stats().dropped_this_run == 0
        assert any("commits work again" in r.getMessage() for r in caplog.records)
    finally:
        stop.set()
        if pub_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pub_task, 20)
        await sub.close()
        await spool.aclose()
    info = inspect_spool(path)
    assert info.depth == 0 and info.dropped_bytes_limit == 0 and info.dropped_memory_limit == 0
    assert len(set(put)) == 2050 and set(put) <= set(sub.ids)
