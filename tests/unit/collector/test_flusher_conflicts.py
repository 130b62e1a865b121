"""The flusher and a sustained field type conflict: remembered, set aside unwritten, re-probed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

from edgeprobe.collector.config import CollectorConfig
from edgeprobe.collector.conflicts import ConflictMemory, conflicts_in, line_fields
from edgeprobe.collector.influx import WriteError
from edgeprobe.collector.service import CollectorStats, _Collector
from edgeprobe.collector.spool import DeadLetters, Spool, read_dead_letters
from edgeprobe.configfile import convert


class SchemaWriter:
    """InfluxDB 1.x as far as field types go: the first type of a field wins; a batch with lines of
    another type is written without them and refused with 1.x's answer naming the first."""

    def __init__(self) -> None:
        self.schema: dict[tuple[str, str], str] = {}
        self.written: list[str] = []
        self.calls: list[int] = []

    async def prepare(self) -> None:
        return None

    async def write(self, lines: Sequence[str]) -> None:
        self.calls.append(len(lines))
        refused: list[tuple[str, str, str, str]] = []
        for line in lines:
            parsed = line_fields(line)
            assert parsed is not None, line
            m, fields = parsed
            clash = [(f, t) for f, t in fields.items() if self.schema.get((m, f), t) != t]
            if clash:
                f, t = clash[0]
                refused.append((m, f, t, self.schema[(m, f)]))
                continue
            for f, t in fields.items():
                self.schema.setdefault((m, f), t)
            self.written.append(line)
        if refused:
            m, f, t, existing = refused[0]
            body = (
                f'{{"error":"partial write: field type conflict: input field \\"{f}\\" on measurement \\"{m}\\" '
                f'is type {t}, already exists as type {existing} dropped={len(refused)}"}}'
            )
            raise WriteError(f"HTTP 400: {body}", retryable=False, status=400, conflicts=conflicts_in(body))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


@pytest.fixture
def make_collector(tmp_path: Path) -> Iterator[Any]:
    executor = ThreadPoolExecutor(max_workers=1)
    spools: list[Spool] = []

    def make(**influx: Any) -> tuple[_Collector, CollectorStats]:
        cfg = convert(
            {
                "influx": {"flush_interval_s": 0.01, "retry_min_s": 0.01, "retry_max_s": 0.02, **influx},
                "spool": {"path": str(tmp_path / f"spool{len(spools)}.sqlite")},
                "name": f"c{len(spools)}",
            },
            CollectorConfig,
            "test",
        )
        spool = Spool(cfg.spool_path()).open()
        spools.append(spool)
        stats = CollectorStats()
        return _Collector(cfg, stats, {}, spool, DeadLetters(cfg.dead_letter_path()), executor), stats

    yield make
    for spool in spools:
        spool.close()
    executor.shutdown(wait=True)


async def flush(col: _Collector, writer: SchemaWriter) -> None:
    col.stopping.set()
    col.wake.set()
    await asyncio.wait_for(col.flush_loop(writer), 30)


def stream(count: int, start: int = 0) -> tuple[list[str], list[str]]:
    """Lines where every fifth carries v as a float (the others, and the stored type: integer)."""
    lines, bad = [], []
    for i in range(start, start + count):
        line = f"m,a=x v={i}.5 {i}" if i % 5 == 4 else f"m,a=x v={i}i {i}"
        lines.append(line)
        if i % 5 == 4:
            bad.append(line)
    return lines, bad


async def test_a_sustained_conflict_costs_one_refused_write_not_one_per_line(make_collector: Any) -> None:
    col, stats = make_collector(batch_max_lines=500)
    writer = SchemaWriter()
    writer.schema[("m", "v")] = "integer"
    lines, bad = stream(2000)
    await col.spool_append(lines)
    await flush(col, writer)
    good = [line for line in lines if line not in bad]
    # 1.x wrote the good lines of the refused batch already: they are written again, idempotently.
    assert set(writer.written) == set(good) and stats.written_points == len(good)
    assert stats.dead_lettered == len(bad) == 400 and stats.conflict_dead_lettered == len(bad)
    assert stats.refused_writes == 1 and len(writer.calls) == 5  # one refusal, then 4 batches of 400
    assert col.spool.depth == 0 and stats.field_conflicts == 1
    records = read_dead_letters(col.dead_letters.path)
    assert [r["line"] for r in records] == bad
    assert {(r["reason"], r["measurement"], r["field"]) for r in records} == {("field_type_conflict", "m", "v")}
    assert "already exists as type integer" in str(records[0]["error"])
    assert {r["status"] for r in records} == {400}  # the status InfluxDB refused the first with


async def test_without_the_memory_every_line_is_bisected(make_collector: Any) -> None:
    """The behaviour before (and with influx.conflict_memory_max: 0): writes grow with the bad lines."""
    col, stats = make_collector(batch_max_lines=500, conflict_memory_max=0)
    writer = SchemaWriter()
    writer.schema[("m", "v")] = "integer"
    lines, bad = stream(500)
    await col.spool_append(lines)
    await flush(col, writer)
    assert stats.dead_lettered == len(bad) and stats.conflict_dead_lettered == 0
    assert stats.refused_writes >= len(bad)  # at least one refused write per conflicting line
    records = read_dead_letters(col.dead_letters.path)
    assert {(r["reason"], r["measurement"], r["field"]) for r in records} == {("field_type_conflict", "m", "v")}


async def test_trailing_conflicting_lines_clear_the_spool_once(make_collector: Any) -> None:
    col, stats = make_collector(batch_max_lines=10)
    writer = SchemaWriter()
    writer.schema[("m", "v")] = "integer"
    lines = [f"m v={i}i {i}" for i in range(5)] + [f"m v={i}.5 {i}" for i in range(5, 20)] + ["m v=1i 99"]
    await col.spool_append(lines)
    await flush(col, writer)
    assert stats.dead_lettered == 15 and stats.written_points == 6 and col.spool.depth == 0
    assert len(read_dead_letters(col.dead_letters.path)) == 15  # each once


async def test_a_forgotten_conflict_is_probed_again(make_collector: Any) -> None:
    col, stats = make_collector(batch_max_lines=100)
    now = [0.0]
    col.conflicts = ConflictMemory(10, 300.0, clock=lambda: now[0])
    writer = SchemaWriter()
    writer.schema[("m", "v")] = "integer"
    lines, bad = stream(100)
    await col.spool_append(lines)
    await flush(col, writer)
    assert stats.refused_writes == 1 and stats.dead_lettered == len(bad)
    # The operator drops the measurement; within conflict_recheck_s lines are still set aside ...
    writer.schema.clear()
    col.stopping.clear()
    more, more_bad = stream(100, start=100)
    await col.spool_append(more)
    now[0] = 100.0
    await flush(col, writer)
    assert stats.dead_lettered == len(bad) + len(more_bad) and stats.refused_writes == 1
    # ... and once it expired, the next batch is written whole: the schema is fixed, nothing refused.
    writer.schema.clear()
    writer.schema[("m", "v")] = "float"
    col.stopping.clear()
    last = [f"m,a=x v={i}.5 {i}" for i in range(200, 300)]
    await col.spool_append(last)
    now[0] = 400.0
    await flush(col, writer)
    assert writer.written[-100:] == last and stats.dead_lettered == len(bad) + len(more_bad)
    assert stats.refused_writes == 1 and len(col.conflicts) == 0 and col.conflicts.expired == 1
