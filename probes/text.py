"""Plain-text helpers the kinds' renderers share (pure)."""

from __future__ import annotations

from typing import Any


def num(value: Any, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, or "-" when it was not measured (None), never 0."""
    return "-" if value is None else f"{value:.{digits}f}"
