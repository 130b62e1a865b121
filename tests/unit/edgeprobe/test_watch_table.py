"""The live table and what `edgeprobe watch` takes from a message (pure parts)."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console

from edgeprobe.livetable import MAX_ROWS, View
from edgeprobe.schema import Observation
from edgeprobe.termtext import is_term_safe
from edgeprobe.watch import WatchStats, take
from tests.support.paths import GOLDEN


def envelope(observations: list[dict[str, Any]], agent: str = "pop1-a1", site: str = "pop1") -> bytes:
    env = {"v": 1, "agent": agent, "site": site, "sent_at_ns": time.time_ns(), "labels": {"tier": "pop"}}
    return json.dumps({**env, "observations": observations}).encode()


def golden(kind: str) -> dict[str, Any]:
    for path in sorted(GOLDEN.glob("obs_v1_*.json")):
        for obs in json.loads(path.read_text())["observations"]:
            if obs["kind"] == kind:
                return {**obs, "started_at_ns": time.time_ns()}
    raise AssertionError(kind)


def shown(view: View, footer: str = "") -> str:
    console = Console(width=200, record=True, force_terminal=False)
    console.print(view.render("header", footer))
    return console.export_text()


def test_take_validates_like_the_collector_and_counts_what_it_skips() -> None:
    view, stats = View(show_agent=True), WatchStats()
    topic = "edgeprobe/v1/pop1/pop1-a1/obs"
    take(view, stats, "edgeprobe", topic, envelope([golden("icmp"), {**golden("tcp"), "kind": "nope"}]))
    take(view, stats, "edgeprobe", topic, b"{not json")
    take(view, stats, "edgeprobe", "edgeprobe/v1/pop1/other/obs", envelope([golden("icmp")]))
    take(view, stats, "edgeprobe", topic, b"x" * 2000, max_bytes=1000)
    assert stats.observations == 1 and stats.messages == 4 and stats.agents == {"pop1/pop1-a1"}
    assert dict(stats.skipped) == {"unknown_kind": 1, "bad_json": 1, "topic_mismatch": 1, "too_large": 1}
    assert stats.footer(0) == (
        "1 observation(s) from 1 agent(s) in 4 message(s); skipped 4 invalid "
        "(bad_json 1, too_large 1, topic_mismatch 1, unknown_kind 1)."
    )
    take(view, stats, "edgeprobe", topic, envelope([golden("icmp")]), where={"site": "pop2"})
    assert stats.filtered == 1 and stats.observations == 1
    stats.dropped = 2
    assert stats.footer(3).endswith(
        "; 1 of other agents (--where); skipped 4 invalid (bad_json 1, too_large 1, topic_mismatch 1, unknown_kind 1); "
        "3 beyond the row limit not shown; 2 message(s) dropped (they came faster than they could be read)."
    )


def test_every_cell_is_terminal_safe_and_rows_are_bounded() -> None:
    view = View(show_agent=True)
    obs = Observation(
        id="x", seq=0, kind="tcp", target="\x1b]0;pwned\x07", started_at_ns=1, duration_ms=1.0,
        outcome="refused", labels={"tier": "\u202eedge"},
    )  # fmt: skip
    view.add(obs, "s/\x1b[2Ja")
    text = shown(view)
    assert all(is_term_safe(line) for line in text.splitlines()), text
    assert "\\x1b]0;pwned\\x07" in text and "\\u202eedge" in text and "s/\\x1b[2Ja" in text
    for i in range(MAX_ROWS + 5):
        view.add(Observation(id=str(i), seq=i, kind="tcp", target=f"t{i}", started_at_ns=1, duration_ms=1.0,
                             outcome="ok"))  # fmt: skip
    assert len(view.rows) == MAX_ROWS and view.dropped == 6 and view.seen == MAX_ROWS
