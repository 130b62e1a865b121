"""The dead-letter file: bounded reading, the summary, replay (idempotent, atomic) and the CLI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest
from click.testing import CliRunner

from edgeprobe.cli import main
from edgeprobe.collector.conflicts import conflicts_in
from edgeprobe.collector.deadletters import ReplayBusyError, _replay_lock, replay, summarize
from edgeprobe.collector.influx import WriteError
from edgeprobe.collector.spool import DeadLetter, DeadLetters, iter_dead_letters, read_dead_letters
from edgeprobe.termtext import is_term_safe, term_safe
from tests.support.wait import wait_for_async

CONFLICT = (
    '{"error":"partial write: field type conflict: input field \\"v\\" on measurement \\"m\\" '
    'is type float, already exists as type integer dropped=1"}'
)


class Writer:
    """Refuses lines with a float v (a conflict) or 'bad'; ``during`` runs at the first write."""

    def __init__(self, during: object = None, down: bool = False) -> None:
        self.written: list[str] = []
        self.calls = 0
        self.during = during
        self.down = down

    async def prepare(self) -> None:
        return None

    async def write(self, lines: Sequence[str]) -> None:
        self.calls += 1
        if callable(self.during):
            self.during()
            self.during = None
        if self.down:
            raise WriteError("POST http://127.0.0.1:9/write: ClientConnectorError", retryable=True)
        if any(".5 " in line for line in lines):
            self.written.extend(line for line in lines if ".5 " not in line and "bad" not in line)
            raise WriteError(f"HTTP 400: {CONFLICT}", retryable=False, status=400, conflicts=conflicts_in(CONFLICT))
        if any("bad" in line for line in lines):
            self.written.extend(line for line in lines if "bad" not in line)
            raise WriteError("HTTP 400: unable to parse", retryable=False, status=400)
        self.written.extend(lines)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


def fill(path: Path) -> DeadLetters:
    dl = DeadLetters(path)
    letters = [DeadLetter(f"m v={i}.5 {i}", CONFLICT, 400, "field_type_conflict", "m", "v") for i in range(50)]
    dl.append_many(letters, at_ns=1_700_000_000_000_000_000)
    dl.append("m bad 1", "HTTP 400: unable to parse", 400, at_ns=1_700_000_001_000_000_000)
    dl.append("m v=1i 2", "HTTP 400: something that went away", 400, at_ns=1_700_000_002_000_000_000)
    return dl


def test_summary_counts_by_reason_measurement_field(tmp_path: Path) -> None:
    path = tmp_path / "dl.jsonl"
    fill(path)
    with path.open("a") as fh:  # hostile and broken lines: counted, never fatal
        fh.write("not json\n[1]\n\n")
        fh.write(json.dumps({"reason": "refused", "line": "\x1b]0;pwned\x07m\u202e x=1 1"}) + "\n")
        # an earlier version's record: reason is InfluxDB's message
        old = {"at_ns": 5, "reason": "HTTP 400: field type conflict: …", "status": 400, "line": "n x=1 1"}
        fh.write(json.dumps(old))
        fh.write("\n" + "x" * 100 + "\n")
    summary = summarize(path)
    assert summary.records == 54 and summary.unreadable == 3
    groups = {(g.reason, g.measurement, g.field): g.count for g in summary.sorted_groups()}
    assert groups == {
        ("field_type_conflict", "m", "v"): 50,
        ("refused", "m", None): 2,
        ("refused", "\x1b]0;pwned\x07m\u202e", None): 1,
        ("field_type_conflict", "n", None): 1,
    }
    assert summary.as_dict()["oldest"] == "1970-01-01T00:00:00.000000005Z"


def test_reading_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "dl.jsonl"
    path.write_bytes(b'{"line": "a"}\n' + b"y" * 5000 + b'\n{"line": "b"}\n' + b"z" * 3000)
    got = list(iter_dead_letters(path, max_record_bytes=1000))
    assert [r for _, r in got] == [{"line": "a"}, None, {"line": "b"}, None]
    assert [o for o, _ in got] == [0, 14, 5015, 5029]


def test_names_are_shown_as_every_cli_output_shows_them() -> None:
    # The dead-letter commands escape with edgeprobe.termtext like the rest of the CLI (they had
    # an ASCII-only JSON escaping of their own: "\\u001b", "..." for a clipped name).
    text = term_safe("\x1b]0;pwned\x07 \x9b2J \u202e \x7f ok", 100)
    assert text == "\\x1b]0;pwned\\x07 \\x9b2J \\u202e \\x7f ok" and is_term_safe(text)
    assert term_safe("x" * 500, 10) == "x" * 10 + "…"


async def test_replay_writes_what_is_fixed_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "dl.jsonl"
    dl = fill(path)
    late = DeadLetter("m late=1i 7", "HTTP 400: x", 400)
    writer = Writer(during=lambda: dl.append_many([late]))  # the collector appends meanwhile
    result = await replay(path, writer, batch_lines=20)
    # 50 still conflicting (the conflict learned once, not one write per line), 1 bad, 1 written.
    assert result.selected == 52 and result.written == 1 and result.refused == 51 and result.removed == 1
    assert result.writes <= 8 and result.error is None
    kept = read_dead_letters(path)
    assert [r["line"] for r in kept] == [*(f"m v={i}.5 {i}" for i in range(50)), "m bad 1", "m late=1i 7"]

    # The schema fixed: only the conflicts, by reason.
    class Fixed(Writer):
        async def write(self, lines: Sequence[str]) -> None:
            self.calls += 1
            self.written.extend(lines)

    fixed = Fixed()
    assert (await replay(path, fixed, reason="field_type_conflict", dry_run=True)).selected == 50
    assert fixed.calls == 0 and len(read_dead_letters(path)) == 52
    result = await replay(path, fixed, reason="field_type_conflict")
    assert result.written == result.removed == 50 and fixed.calls == 1
    assert [r["line"] for r in read_dead_letters(path)] == ["m bad 1", "m late=1i 7"]
    again = await replay(path, fixed, reason="field_type_conflict")
    assert again.selected == 0 and again.writes == 0  # idempotent


async def test_replay_stops_when_influxdb_is_down(tmp_path: Path) -> None:
    path = tmp_path / "dl.jsonl"
    fill(path)
    before = path.read_bytes()
    result = await replay(path, Writer(down=True))
    assert result.error is not None and "ClientConnectorError" in result.error and result.removed == 0
    assert path.read_bytes() == before


async def test_one_replay_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "dl.jsonl"
    fill(path)
    with _replay_lock(path), pytest.raises(ReplayBusyError):
        await replay(path, Writer())


def write_config(tmp_path: Path, dead: Path) -> Path:
    cfg = tmp_path / "collector.yaml"
    cfg.write_text(
        json.dumps(
            {
                "influx": {"url": "http://127.0.0.1:9", "timeout_s": 2, "create_database": False},
                "spool": {"path": str(tmp_path / "spool.sqlite"), "dead_letter_path": str(dead)},
            }
        )
    )
    return cfg


def test_cli_ls_is_terminal_safe(tmp_path: Path) -> None:
    dead = tmp_path / "dl.jsonl"
    fill(dead)
    with dead.open("a") as fh:
        fh.write(json.dumps({"reason": "refused", "line": "\x1b]0;pwned\x07m\u202e x=1 1", "at_ns": 3}) + "\n")
    cfg = write_config(tmp_path, dead)
    human = CliRunner().invoke(main, ["collector", "dead-letters", "ls", "-c", str(cfg)])
    assert human.exit_code == 0, human.output
    assert all(is_term_safe(line) for line in human.output.splitlines()), human.output
    assert "\\x1b]0;pwned\\x07m\\u202e" in human.output
    assert "53 dead letter(s)" in human.output and "field_type_conflict" in human.output
    as_json = CliRunner().invoke(main, ["collector", "dead-letters", "ls", "-c", str(cfg), "--json"])
    assert all(is_term_safe(line) for line in as_json.output.splitlines()), as_json.output
    doc = json.loads(as_json.output)
    assert doc["records"] == 53 and doc["groups"][0] == {
        "reason": "field_type_conflict",
        "measurement": "m",
        "field": "v",
        "count": 50,
        "oldest": "2023-11-14T22:13:20.000000000Z",
        "newest": "2023-11-14T22:13:20.000000000Z",
    }
    no_file = write_config(tmp_path, tmp_path / "no.jsonl")
    missing = CliRunner().invoke(main, ["collector", "dead-letters", "ls", "-c", str(no_file)])
    assert missing.exit_code == 0 and "no dead letters" in missing.output


def test_cli_replay_dry_run_and_influxdb_down(tmp_path: Path) -> None:
    dead = tmp_path / "dl.jsonl"
    fill(dead)
    cfg = write_config(tmp_path, dead)
    dry = CliRunner().invoke(main, ["collector", "dead-letters", "replay", "-c", str(cfg), "--dry-run"])
    assert dry.exit_code == 0 and "would replay 52" in dry.output, dry.output
    down = CliRunner().invoke(main, ["collector", "dead-letters", "replay", "-c", str(cfg)])
    assert down.exit_code == 1 and "replay stopped early" in down.output, down.output
    assert len(read_dead_letters(dead)) == 52


async def test_concurrent_appends_survive_a_rewrite(tmp_path: Path) -> None:
    """The collector's appends and the replay's rewrite share a lock: nothing appended is lost,
    nothing written stays."""
    path = tmp_path / "dl.jsonl"
    dl = fill(path)
    writer = Writer()
    appended: list[str] = []
    stop = asyncio.Event()

    async def appender() -> None:
        while not stop.is_set() or len(appended) < 20:
            line = f"m extra={len(appended)}i {len(appended)}"
            await asyncio.to_thread(dl.append, line, "HTTP 400: x", 400)
            appended.append(line)

    task = asyncio.create_task(appender())
    for round_ in range(10):
        seen = len(appended)
        await wait_for_async(lambda: len(appended) > seen, 10, f"record {round_} appended by the collector")  # noqa: B023
        await replay(path, writer, reason="refused")
    stop.set()
    await task
    written = {line for line in writer.written if "extra" in line}
    kept = {str(r["line"]) for r in read_dead_letters(path) if "extra" in str(r["line"])}
    assert written | kept == set(appended) and not written & kept and written


def test_cli_reason_choices_are_the_reasons() -> None:
    from edgeprobe.collector.spool import DEAD_LETTER_REASONS

    group = main.commands["collector"].commands["dead-letters"]  # type: ignore[attr-defined]
    (reason,) = [p for p in group.commands["replay"].params if p.name == "reason"]
    assert sorted(reason.type.choices) == sorted(DEAD_LETTER_REASONS)
