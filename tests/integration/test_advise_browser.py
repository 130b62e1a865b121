"""``edgeprobe advise --html``'s page in a real browser (headless Chromium from Debian's
``chromium``; skipped where it is not installed): it renders without console errors, its three
charts are in the DOM and drawn, and a screenshot lands in bench-results/advise-report.png.

The same harness sees a console error when there is one (the control page), so the test can fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeprobe.advise.html import render_html
from edgeprobe.advise.pairs import pair_stats
from edgeprobe.advise.report import Source, build_report
from edgeprobe.advise.whatif import load_candidates
from tests.support import advise_data, chromium
from tests.support.paths import REPO
from tests.unit.advise.test_pairs import icmp, samples

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(chromium.BINARY is None, reason="needs Debian's chromium (apt-get install chromium)"),
]

CHARTS = """JSON.stringify({
  charts: Array.from(document.querySelectorAll('svg.chart')).map(s => ({
    id: s.id,
    bars: s.querySelectorAll('rect.bar').length,
    width: s.getBoundingClientRect().width,
    height: s.getBoundingClientRect().height,
    drawn: Array.from(s.querySelectorAll('rect.bar')).filter(r => r.getBoundingClientRect().width > 0).length,
  })),
  tables: document.querySelectorAll('table').length,
  title: document.title,
})"""


def report_page(tmp_path: Path) -> Path:
    cands = tmp_path / "candidates.yaml"
    cands.write_text(advise_data.candidates_yaml())
    source = Source(url="http://127.0.0.1:8086", database="edgeprobe", since="24h", where=[], min_samples=20,
                    max_points_per_series=20000, points_read=len(advise_data.inference_samples()))  # fmt: skip
    pairs = pair_stats(samples(), icmp(), 20)
    report = build_report(
        source, pairs, "2026-12-04T19:00:00Z", load_candidates(cands), {"nyc": 3, "chi": 1, "fra": 2}, 2
    )
    page = tmp_path / "report.html"
    page.write_text(render_html(report), encoding="utf-8")
    return page


async def test_report_renders_without_errors_with_its_charts(tmp_path: Path) -> None:
    import json

    result = await chromium.open_page(report_page(tmp_path), CHARTS)
    assert result.errors == []
    found = json.loads(result.value)
    charts = {c["id"]: c for c in found["charts"]}
    assert set(charts) == {"chart-ttft", "chart-split", "chart-whatif"}
    assert charts["chart-ttft"]["bars"] == charts["chart-ttft"]["drawn"] == 12  # 3 PoPs × 4 endpoints
    assert charts["chart-whatif"]["drawn"] == 3
    assert charts["chart-split"]["drawn"] >= 24  # network and server for each pair (plus floors)
    assert all(c["width"] > 500 and c["height"] > 50 for c in charts.values())
    assert found["tables"] >= 5 and found["title"] == "edgeprobe advise"
    out = REPO / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "advise-report.png").write_bytes(result.screenshot_png)
    assert result.screenshot_png.startswith(b"\x89PNG") and len(result.screenshot_png) > 10_000


async def test_the_harness_sees_console_errors(tmp_path: Path) -> None:
    """Control: the report's own policy (no script, nothing fetched) refuses this page's script,
    and a script error is reported too."""
    page = tmp_path / "bad.html"
    csp = "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
    page.write_text(f"<!DOCTYPE html><html><head>{csp}</head><body><script>nope()</script></body></html>")
    result = await chromium.open_page(page, "1")
    assert any("Content Security Policy" in e for e in result.errors), result.errors
    page.write_text("<!DOCTYPE html><html><body><script>nope()</script></body></html>")
    result = await chromium.open_page(page, "1")
    assert any("nope is not defined" in e for e in result.errors), result.errors
