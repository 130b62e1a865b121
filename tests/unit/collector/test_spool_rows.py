"""Spool rows of several lines: framing, whole-row reads, line counts, files of the earlier layout."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from edgeprobe.collector.spool import ROW_LINES, Spool


def test_many_lines_share_rows_and_come_back_exactly(tmp_path: Path) -> None:
    odd = ['m f="a\nb" 1', 'm f="\x1e" 2', "\x1estarts with the mark", 'm f="q\\"uote é" 3']
    lines = odd + [f"m i={i}i {i}" for i in range(2 * ROW_LINES + 7)]
    path = tmp_path / "s.sqlite"
    with Spool(path) as spool:
        spool.append(lines, received_at_ns=5)
        spool.append(["\x1elone"], received_at_ns=6)
        assert spool.depth == len(lines) + 1
        rows = sqlite3.connect(path).execute("SELECT COUNT(*) FROM lines").fetchone()[0]
        assert rows == 3 + 1
        got = spool.peek(10_000)
        assert [line for _, line in got] == [*lines, "\x1elone"]
    with Spool(path) as spool:  # counted again from the file
        assert spool.depth == len(lines) + 1


def test_peek_takes_whole_rows_and_delete_counts_lines() -> None:
    with Spool(None) as spool:
        spool.append([f"a{i}" for i in range(3)])
        spool.append([f"b{i}" for i in range(3)])
        first = spool.peek(2)  # a row is never split between batches
        assert [line for _, line in first] == ["a0", "a1", "a2"]
        assert len({seq for seq, _ in first}) == 1
        assert spool.delete_through(first[-1][0]) == 3 and spool.depth == 3
        assert spool.delete_through(first[-1][0]) == 0 and spool.depth == 3


def test_a_file_of_the_one_line_per_row_layout_is_read_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    with Spool(path) as spool:
        spool.append(["x"], received_at_ns=1)
    db = sqlite3.connect(path)
    db.executemany("INSERT INTO lines (received_at_ns, line) VALUES (?, ?)", [(2, "old 1"), (3, 'old f="[" 2')])
    db.commit()
    db.close()
    with Spool(path) as spool:
        assert spool.depth == 3
        assert [line for _, line in spool.peek(10)] == ["x", "old 1", 'old f="[" 2']
