"""The live table of observations: one row per (agent,) kind and target, the latest outcome and
figures, and a sparkline of the headline figure. ``edgeprobe demo`` feeds it the local agent's
observations; ``edgeprobe watch`` feeds it what any fleet publishes on the broker.

What a kind's columns mean comes from the kind (its ``headline`` and ``jitter`` figures,
:mod:`edgeprobe.probes.kind`). Every cell is terminal-safe (:func:`edgeprobe.termtext.term_safe`,
and :class:`rich.text.Text`, never read as markup): the names and targets may come from elsewhere.
The table is bounded: at most :data:`MAX_ROWS` rows; observations of further series are counted
(:attr:`View.dropped`) and not shown.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

from rich.console import Group
from rich.table import Table
from rich.text import Text

from edgeprobe.probes.kind import Figure
from edgeprobe.probes.registry import KINDS
from edgeprobe.schema import Observation
from edgeprobe.termtext import term_safe

SPARK: Final = "▁▂▃▄▅▆▇█"
HISTORY: Final = 30  # values in a row's sparkline
MAX_ROWS: Final = 1000  # rows kept; observations of more series are counted, not shown
MAX_CELL_CHARS: Final = 120  # a name or target longer than this is clipped (…)


def figure_value(figure: Figure | None, fields: dict[str, Any]) -> Any:
    """The value of a kind's ``headline`` or ``jitter`` figure in ``fields`` (None: the kind has none)."""
    return fields.get(figure.field) if figure is not None else None


def legend() -> str:
    """What the latency and jitter columns show for each kind, from the kinds' own figures."""
    latency = ", ".join(f"{k.name} {k.headline.label}" for k in KINDS.values() if k.headline is not None)
    jitter: dict[str, list[str]] = {}  # label -> kinds, in registry order
    for k in KINDS.values():
        if k.jitter is not None:
            jitter.setdefault(k.jitter.label, []).append(k.name)
    return f"latency: {latency}; jitter: " + ", ".join(f"{label} ({'/'.join(ks)})" for label, ks in jitter.items())


def sparkline(values: list[float | None]) -> str:
    """One character per value, scaled between the series' min and max; '·' for a missing value."""
    present = [v for v in values if v is not None]
    if not present:
        return "·" * len(values)
    lo, hi = min(present), max(present)
    span = hi - lo or 1.0
    return "".join("·" if v is None else SPARK[min(7, int((v - lo) / span * 7.999))] for v in values)


def _number(value: Any, fmt: str) -> str:
    return "-" if not isinstance(value, int | float) or isinstance(value, bool) else format(value, fmt)


@dataclass
class Row:
    agent: str
    kind: str
    target: str
    count: int = 0
    failures: int = 0
    last: Observation | None = None
    history: deque[float | None] = field(default_factory=lambda: deque(maxlen=HISTORY))


@dataclass
class View:
    """Rows of observations. ``show_agent``: a column with the (site/)agent of each row."""

    show_agent: bool = False
    rows: dict[tuple[str, str, str], Row] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)
    dropped: int = 0  # observations of series beyond MAX_ROWS

    def add(self, obs: Observation, agent: str = "") -> None:
        shown = f"{obs.labels['tier']}: {obs.target}" if "tier" in obs.labels else obs.target
        key = (agent, obs.kind, shown)
        row = self.rows.get(key)
        if row is None:
            if len(self.rows) >= MAX_ROWS:
                self.dropped += 1
                return
            row = self.rows[key] = Row(agent, obs.kind, shown)
        row.count += 1
        row.failures += obs.outcome != "ok"
        row.last = obs
        kind = KINDS.get(obs.kind)
        value = figure_value(kind.headline if kind is not None else None, obs.fields)
        row.history.append(float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None)

    @property
    def seen(self) -> int:
        """Observations shown in the rows."""
        return sum(r.count for r in self.rows.values())

    def table(self) -> Table:
        table = Table(expand=False)
        columns = ("agent",) * self.show_agent + (
            "kind",
            "target",
            "n",
            "fail",
            "outcome",
            "latency ms",
            "loss",
            "jitter ms",
            f"last {HISTORY}",
        )
        for col in columns:
            right = col in ("n", "fail", "latency ms", "loss", "jitter ms")
            table.add_column(col, justify="right" if right else "left", overflow="fold")
        for (agent, kind, target), row in sorted(self.rows.items()):
            f = row.last.fields if row.last else {}
            k = KINDS.get(kind)
            lat = figure_value(k.headline if k is not None else None, f)
            loss = f.get("loss_ratio")
            jit = figure_value(k.jitter if k is not None else None, f)
            outcome = row.last.outcome if row.last else "-"
            cells: list[Text | str] = [Text(term_safe(agent, MAX_CELL_CHARS))] if self.show_agent else []
            cells += [
                Text(term_safe(kind, MAX_CELL_CHARS)),
                Text(term_safe(target, MAX_CELL_CHARS)),
                str(row.count),
                str(row.failures),
                Text(term_safe(outcome, MAX_CELL_CHARS), style="green" if outcome == "ok" else "red"),
                _number(lat, ".3f"),
                "-" if not isinstance(loss, int | float) or isinstance(loss, bool) else f"{100 * loss:.0f}%",
                _number(jit, ".3f"),
                sparkline(list(row.history)),
            ]
            table.add_row(*cells)
        return table

    def render(self, header: str, footer: str) -> Group:
        """The header (this program's own text), the table and a dim footer with the legend."""
        return Group(Text(header), self.table(), Text(f"{footer}  {legend()}", style="dim"))
