"""Where things are in the repository, for tests wherever they sit in ``tests/``."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
GOLDEN = TESTS / "golden"
STREAMS = GOLDEN / "streams"
