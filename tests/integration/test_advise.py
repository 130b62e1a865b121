"""``edgeprobe advise`` against a real influxd 1.6: 3 PoPs × 4 endpoints of synthetic but realistic
points (tests/support/advise_data.py) written with the collector's line-protocol encoding, read
back through the v1 ``/query`` API (and through the path a v2 configuration takes: the bucket as
the database, a token), and every error the issue names: one line, non-zero exit, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeprobe.localstack import InfluxServer, free_port
from tests.support import advise_data

pytestmark = pytest.mark.integration

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPROBE_")}


def advise(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeprobe", "advise", *args],
        capture_output=True, text=True, timeout=60, env={**CLEAN_ENV, **(env or {}), "COLUMNS": "220"},
    )  # fmt: skip


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def filled_db(influxdb: InfluxServer, influx_db: str) -> str:
    influxdb.write("\n".join(advise_data.lines(time.time_ns())), influx_db)
    return influx_db


def test_report_names_the_best_endpoint_per_pop(influxdb: InfluxServer, filled_db: str, tmp_path: Path) -> None:
    cands = tmp_path / "candidates.yaml"
    cands.write_text(advise_data.candidates_yaml())
    weights = tmp_path / "weights.yaml"
    weights.write_text("nyc: 3000\nchi: 1000\nfra: 2000\n")
    html = tmp_path / "report.html"
    result = advise(
        "--influx-url", influxdb.url, "--database", filled_db, "--since", "2h", "--json",
        "--candidates", str(cands), "--weights", str(weights), "--k", "2", "--html", str(html),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["schema"] == "edgeprobe.advise/1"
    assert report["source"]["points_read"] == len(advise_data.inference_samples())
    best = {p["pop"]: p["best_endpoint"] for p in report["pops"]}
    assert best == {
        "nyc": "https://nyc-ixp.example.net/v1",
        "fra": "https://fra-ixp.example.net/v1",
        "chi": "https://council-bluffs.example.net/v1",
    }
    pairs = {(p["pop"], p["endpoint"]): p for p in report["pairs"]}
    assert len(pairs) == 12
    sparse = pairs[advise_data.SPARSE]
    assert sparse["samples"] == advise_data.SPARSE_SAMPLES and not sparse["ranked"] and sparse["vs_best_ratio"] is None
    nyc_fra = pairs[("nyc", "https://fra-ixp.example.net/v1")]
    assert nyc_fra["samples"] == advise_data.SAMPLES
    assert nyc_fra["success_ratio"] == pytest.approx(60 / 62, abs=1e-3)
    assert nyc_fra["ttft_p50_ms"]["samples"] == 60
    assert nyc_fra["vs_best_ratio"] > 5  # 6,205 km against 14 km
    assert nyc_fra["icmp_rtt_p50_ms"]["samples"] == 10  # the same host by ICMP
    assert nyc_fra["floor_ttft_ms"]["value"] == pytest.approx(3 * nyc_fra["floor_rtt_ms"]["value"], rel=1e-6)
    assert 0.85 < nyc_fra["network_share_ratio"]["value"] < 0.95
    # what-if: a candidate where a real endpoint is measured (Ashburn) is predicted within 10 %
    ashburn2 = next(c for c in report["candidates"] if c["name"] == "ashburn-2")
    for pred in ashburn2["predictions"]:
        measured = pairs[(pred["pop"], "https://ashburn.example.net/v1")]["ttft_p50_ms"]["value"]
        if pred["pop"] != "fra":  # Frankfurt's transatlantic routes differ by 1.3-1.9 in the data
            assert abs(pred["predicted_ttft_p50_ms"] - measured) / measured < 0.10, (pred, measured)
        assert pred["inflation_from"] and pred["server_from"].startswith("median of")
    assert report["best_k"]["k"] == 2 and len(report["best_k"]["steps"]) == 2
    assert report["best_k"]["weights_from"] == "file"
    assert "<svg" in html.read_text()


def test_table_and_where(influxdb: InfluxServer, filled_db: str) -> None:
    result = advise("--influx-url", influxdb.url, "--database", filled_db, "--where", "site=nyc")
    assert result.returncode == 0, result.stderr
    assert "https://nyc-ixp.example.net/v1" in result.stdout and "best" in result.stdout
    assert "fra │" not in result.stdout and "chi │" not in result.stdout
    assert "n = successful samples" in result.stdout


def test_v2_settings_query_the_bucket_with_a_token(influxdb: InfluxServer, filled_db: str) -> None:
    """api v2 reads through the v1-compatible /query with the bucket as database and a token
    (influxd 1.6 without auth ignores the token: this checks where the settings go)."""
    env = {
        "EDGEPROBE_INFLUX_API": "v2",
        "EDGEPROBE_INFLUX_URL": influxdb.url,
        "EDGEPROBE_INFLUX_ORG": "o",
        "EDGEPROBE_INFLUX_BUCKET": filled_db,
        "EDGEPROBE_INFLUX_TOKEN": "secret-token-value",
    }
    result = advise("--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["source"]["database"] == filled_db
    assert "secret-token-value" not in result.stdout + result.stderr


def test_empty_database(influxdb: InfluxServer, influx_db: str) -> None:
    one_line_error(advise("--influx-url", influxdb.url, "--database", influx_db), 1, "no inference measurements", "24h")


def test_sparse_data(influxdb: InfluxServer, influx_db: str) -> None:
    now = time.time_ns()
    points = [p for p in advise_data.inference_samples(now_ns=now) if p["seq"] < 5]
    influxdb.write("\n".join(advise_data.to_line("edgeprobe_inference", p) for p in points), influx_db)
    line = one_line_error(advise("--influx-url", influxdb.url, "--database", influx_db), 1, "too little data", "20")
    assert "5 successful" in line


def test_missing_database(influxdb: InfluxServer) -> None:
    one_line_error(advise("--influx-url", influxdb.url, "--database", "no_such_db"), 1, "'no_such_db' not found")


def test_unreachable_influxdb() -> None:
    port = free_port("127.0.0.1")  # nothing listens there
    one_line_error(advise("--influx-url", f"http://127.0.0.1:{port}"), 1, "cannot reach InfluxDB", str(port))


X = "{name: x, latitude: 1, longitude: 0"


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("pops: {}\ncandidates: [{name: x, latitude: 95, longitude: 0}]\n", ("candidates[0].latitude", "<= 90")),
        (f"pops: {{}}\ncandidates: [{X}, colour: red}}]\n", ("candidates[0].colour", "unknown key")),
        (f"candidates: [{X}}}]\n", ("pops", "required")),
        (f"pops: {{}}\ncandidates: [{X}}}, {X}}}]\n", ("appears twice",)),
        ("pops: [\n", ("not valid YAML",)),
    ],
)  # fmt: skip
def test_bad_candidates_file(tmp_path: Path, text: str, needles: tuple[str, ...]) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    # the file is refused before InfluxDB is asked (nothing listens at this URL)
    url = f"http://127.0.0.1:{free_port('127.0.0.1')}"
    one_line_error(advise("--influx-url", url, "--candidates", str(p)), 2, str(p), *needles)


def test_bad_usage_is_one_line(influxdb: InfluxServer) -> None:
    one_line_error(advise("--influx-url", influxdb.url, "--since", "yesterday"), 2, "--since")
    one_line_error(advise("--influx-url", influxdb.url, "--where", "si te=x"), 2, "--where")
    one_line_error(advise("--influx-url", "ftp://x"), 2, "influx.url")
