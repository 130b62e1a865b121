"""The report's renderings: JSON (documented schema), the terminal table, the offline HTML page."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import msgspec
import pytest
from rich.console import Console

from edgeprobe.advise.html import render_html
from edgeprobe.advise.model import InferenceSample
from edgeprobe.advise.pairs import pair_stats
from edgeprobe.advise.report import Report, Source, build_report, to_json
from edgeprobe.advise.table import render
from edgeprobe.advise.whatif import load_candidates
from tests.support import advise_data as data
from tests.unit.advise.test_pairs import icmp, samples

HOSTILE = "https://x.example/<script>alert(1)</script>\x1b]0;pwn\x07\u202e"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    hostile = [
        InferenceSample(
            site="evil\x1b[2J",
            target=HOSTILE,
            outcome="ok",
            ttft_ms=50.0 + i,
            setup_ms=5.0,
            net_rtt_ms=2.0 if i < 10 else None,  # measured on 10 of the 25
        )
        for i in range(25)
    ]
    pairs = pair_stats(samples() + hostile, icmp(), 20)
    p = tmp_path_factory.mktemp("c") / "candidates.yaml"
    p.write_text(data.candidates_yaml())
    source = Source(url="http://127.0.0.1:8086", database="edgeprobe", since="24h", where=[], min_samples=20,
                    max_points_per_series=20000, points_read=717)  # fmt: skip
    return build_report(source, pairs, "2026-12-04T19:00:00Z", load_candidates(p), {"nyc": 3, "chi": 1, "fra": 2}, 2)


def test_json_schema(report: Report) -> None:
    doc = json.loads(to_json(report))
    assert doc["schema"] == "edgeprobe.advise/1"
    assert set(doc) >= {
        "schema",
        "generated_at",
        "source",
        "pops",
        "pairs",
        "backtest",
        "candidates",
        "best_k",
        "notes",
    }
    pair = doc["pairs"][0]
    for key, value in pair.items():
        if (
            key.endswith(("_ms", "_km", "_ratio")) and not key.startswith(("vs_best", "success"))
        ) or key == "round_trips":
            assert set(value) == {"value", "samples"}, key  # every figure carries its sample count
    assert msgspec.json.decode(to_json(report), type=Report) == report  # the schema is the Report struct
    pred = doc["candidates"][0]["predictions"][0]
    assert {
        "predicted_ttft_p50_ms",
        "inflation_ratio",
        "inflation_from",
        "round_trips",
        "server_ms",
        "server_from",
    } <= set(pred)


def test_documented_keys_are_the_schema() -> None:
    """docs/advise.md lists the JSON keys: every key of the structs is documented."""
    doc = (Path(__file__).resolve().parents[3] / "docs" / "advise.md").read_text()
    from edgeprobe.advise.pairs import PairStats
    from edgeprobe.advise.report import PopSummary
    from edgeprobe.advise.whatif import Assignment, BacktestRow, BestK, BestKStep, CandidateResult, Prediction

    structs = (
        Report,
        Source,
        PopSummary,
        PairStats,
        Prediction,
        CandidateResult,
        BestK,
        BestKStep,
        Assignment,
        BacktestRow,
    )
    for struct in structs:
        for name in struct.__struct_fields__:
            assert f"`{name}`" in doc, f"{struct.__name__}.{name} is not in docs/advise.md"


def test_table_is_terminal_safe_and_marks_unranked(report: Report) -> None:
    out = io.StringIO()
    render(report, Console(file=out, width=400, color_system=None))
    text = out.getvalue()
    assert "\x1b" not in text and "\u202e" not in text and "\x07" not in text
    assert "\\x1b]0;pwn" in text
    assert "too few samples (8)" in text
    assert "PREDICTED" in text and "best" in text
    assert "2.00 (n=10)" in text  # a figure resting on fewer samples than its pair shows its own count


def test_html_is_self_contained_and_escaped(report: Report) -> None:
    page = render_html(report)
    assert page.count('<svg class="chart"') == 3
    assert {m for m in re.findall(r'id="(chart-[a-z]+)"', page)} == {"chart-ttft", "chart-split", "chart-whatif"}
    assert "<script" not in page  # no script at all; the hostile one is text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert not re.search(r"\b(src|href)\s*=|@import|url\(", page)  # nothing to fetch
    assert "default-src 'none'" in page
    assert "too few samples (8)" in page and "(predictions)" in page
    assert page.count('class="bar ttft"') == len(report.pairs)
