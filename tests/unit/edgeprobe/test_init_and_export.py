"""`edgeprobe init agent|collector` and `edgeprobe dashboards export`: what users take home."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from importlib.metadata import version
from importlib.resources import files
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from edgeprobe.cli import main
from tests.support.paths import REPO

GRAFANA = REPO / "grafana"


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def assert_one_line_error(result: Result, *words: str) -> None:
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # not an exception escaping
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0]


def shipped_grafana_files() -> dict[str, bytes]:
    """The repository's grafana/ files that the package ships: dashboards and provisioning."""
    paths = [*GRAFANA.glob("dashboards/*.json"), *GRAFANA.glob("import/*.json"), *GRAFANA.glob("provisioning/*/*.yaml")]
    return {p.relative_to(GRAFANA).as_posix(): p.read_bytes() for p in paths}


def exported(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ---- edgeprobe -V ----


def test_version_is_the_installed_metadata_version() -> None:
    result = run("-V")
    assert result.exit_code == 0
    assert result.output.strip() == f"edgeprobe, version {version('edgeprobe')}"


# ---- edgeprobe init ----


@pytest.mark.parametrize("role", ["agent", "collector"])
def test_init_prints_the_sample_as_yaml(role: str) -> None:
    result = run("init", role)
    assert result.exit_code == 0, result.output
    assert result.stdout == (files("edgeprobe") / "examples" / f"{role}.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(result.stdout)
    assert isinstance(data, dict) and data


@pytest.mark.parametrize("role", ["agent", "collector"])
def test_init_out_writes_a_private_file(role: str, tmp_path: Path) -> None:
    out = tmp_path / f"{role}.yaml"
    old = os.umask(0o022)
    try:
        result = run("init", role, "--out", str(out))
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_text(encoding="utf-8") == run("init", role).stdout
    assert str(out) in result.stdout


def test_init_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "agent.yaml"
    out.write_text("mine: keep me\n")
    out.chmod(0o644)
    result = run("init", "agent", "--out", str(out))
    assert_one_line_error(result, str(out), "exists", "--force")
    assert result.exit_code == 2
    assert out.read_text() == "mine: keep me\n"

    result = run("init", "agent", "--out", str(out), "--force")
    assert result.exit_code == 0, result.output
    assert out.read_text(encoding="utf-8") == run("init", "agent").stdout
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # it may hold secrets from now on
    assert [p.name for p in tmp_path.iterdir()] == ["agent.yaml"]  # no temporary file left


def test_init_out_into_a_missing_directory_or_onto_a_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "agent.yaml"
    assert_one_line_error(run("init", "agent", "--out", str(missing)), "cannot write", str(missing))
    assert_one_line_error(run("init", "collector", "--out", str(tmp_path)), str(tmp_path), "directory")


# ---- edgeprobe dashboards export ----


def test_export_writes_the_shipped_files_byte_for_byte(tmp_path: Path) -> None:
    shipped = shipped_grafana_files()
    assert len([p for p in shipped if p.startswith("dashboards/")]) == 5
    assert len([p for p in shipped if p.startswith("import/")]) == 5
    assert {"provisioning/datasources/edgeprobe.yaml", "provisioning/dashboards/edgeprobe.yaml"} <= set(shipped)
    root = tmp_path / "grafana-files"  # need not exist yet
    result = run("dashboards", "export", str(root))
    assert result.exit_code == 0, result.output
    assert exported(root) == shipped
    for rel in shipped:
        assert rel in result.stdout
    # How to use them: provisioning pointed at DIR/provisioning, and the dashboards path setting.
    assert str(root.resolve() / "provisioning") in result.stdout
    assert "options.path" in result.stdout
    assert str(root.resolve() / "dashboards") in result.stdout


def test_export_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    assert run("dashboards", "export", str(tmp_path)).exit_code == 0
    changed = tmp_path / "dashboards" / "edgeprobe-latency.json"
    changed.write_bytes(b"{}")
    result = run("dashboards", "export", str(tmp_path))
    assert_one_line_error(result, "exist", "--force")
    assert result.exit_code == 2
    assert changed.read_bytes() == b"{}"

    result = run("dashboards", "export", str(tmp_path), "--force")
    assert result.exit_code == 0, result.output
    assert exported(tmp_path) == shipped_grafana_files()


def test_export_into_a_regular_file_is_a_one_line_error(tmp_path: Path) -> None:
    target = tmp_path / "not-a-dir"
    target.write_text("x")
    assert_one_line_error(run("dashboards", "export", str(target)), str(target), "not a directory")
    assert target.read_text() == "x"
    # A folder of the layout taken by a file: also one line, no traceback.
    root = tmp_path / "out"
    root.mkdir()
    (root / "provisioning").write_text("x")
    assert_one_line_error(run("dashboards", "export", str(root)), "cannot write")


def test_export_error_from_the_real_command_has_no_traceback(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "edgeprobe", "dashboards", "export", str(target)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == f"edgeprobe dashboards export: {target}: not a directory\n"
