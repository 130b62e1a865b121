"""``edgeprobe collector check``: validate a collector config, summarize it, one-line errors (as ``agent check``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.edgeprobe.test_configfile import ALIAS_BOMB

EXAMPLE = Path(__file__).resolve().parents[3] / "src" / "edgeprobe" / "examples" / "collector.yaml"


def _check(path: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeprobe", "collector", "check", "-c", str(path)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_summary_of_a_good_file(tmp_path: Path) -> None:
    p = tmp_path / "collector.yaml"
    p.write_text(
        "name: c1\n"
        "broker: {url: 'mqtt://127.0.0.1:1884', topic_prefix: lab}\n"
        "subscription: {qos: 0, shared_group: g}\n"
        f"influx: {{url: 'http://127.0.0.1:8087', database: ep, retention_policy: week}}\n"
        f"spool: {{path: '{tmp_path}/s.sqlite', dead_letter_path: null}}\n"
    )
    proc = _check(p)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.splitlines() == [
        f"{p}: ok: collector c1, broker mqtt://127.0.0.1:1884",
        "  influx: api v1 at http://127.0.0.1:8087, database ep, retention policy week",
        f"  spool: {tmp_path}/s.sqlite",
        "  dead letters: logged and counted only",
        "  subscription: $share/g/lab/v1/+/+/obs, $share/g/lab/v1/+/+/health (QoS 0)",
    ]


def test_v2_and_in_memory_spool(tmp_path: Path) -> None:
    p = tmp_path / "collector.yaml"
    p.write_text(
        "influx: {api: v2, url: 'http://127.0.0.1:8086', org: o, bucket: b, token: t0ken}\n"
        "spool: {path: null}\nsubscription: {health: false}\n"
    )
    proc = _check(p)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "  influx: api v2 at http://127.0.0.1:8086, org o, bucket b\n" in out
    assert "  spool: in memory (spool.path: null)\n" in out
    assert "  subscription: edgeprobe/v1/+/+/obs (QoS 1)\n" in out
    assert "t0ken" not in out  # secrets are never shown


def test_the_shipped_sample_passes() -> None:
    proc = _check(EXAMPLE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{EXAMPLE}: ok: collector ")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("influx: {api: v2}\n", "influx.org: required with api v2"),
        ("nme: c1\n", "nme"),
        ("name: 'bad name'\n", "name"),
    ],
)
def test_a_bad_file_is_one_line_and_exit_2(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "collector.yaml"
    p.write_text(text)
    proc = _check(p)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(p) in lines[0] and message in lines[0], proc.stderr


@pytest.mark.parametrize("path", ["/dev/zero", "bomb", "missing"])
def test_hostile_or_missing_files_answer_in_one_line(tmp_path: Path, path: str) -> None:
    if path == "bomb":
        (tmp_path / "bomb.yaml").write_text(ALIAS_BOMB)
        path = str(tmp_path / "bomb.yaml")
    elif path == "missing":
        path = str(tmp_path / "missing.yaml")
    proc = _check(path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and path in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_control_characters_in_values_are_escaped(tmp_path: Path) -> None:
    p = tmp_path / "collector.yaml"
    p.write_text('influx: {database: "ep\\u001b[31m"}\nspool: {path: null}\n')
    proc = _check(p)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "database ep" in proc.stdout
