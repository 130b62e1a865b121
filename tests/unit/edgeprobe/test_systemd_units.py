"""`edgeprobe init systemd`: the shipped units for the agent, collector and responder.

Checked by a small INI parse (required keys, privileges, sandboxing) and, where systemd's
``systemd-analyze`` is installed, by ``systemd-analyze verify`` (no running systemd needed).
"""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from edgeprobe.agent.config import AgentConfig
from edgeprobe.cli import SYSTEMD_UNITS, main, systemd_units
from edgeprobe.configfile import convert

EXE = "/opt/edgeprobe/bin/edgeprobe"
ROLES = {"edgeprobe-agent.service": "agent", "edgeprobe-collector.service": "collector"}

# Every unit: a service of its own with these settings exactly.
SANDBOX = {
    "Type": "simple",
    "Restart": "on-failure",
    "DynamicUser": "yes",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "SystemCallFilter": "@system-service",
    "SystemCallArchitectures": "native",
    "UMask": "0077",
}


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's unit syntax, the part the units use: [Section], Key=value (repeatable), comments."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"line {number}: no continuation lines"
        if line.startswith("["):
            assert line.endswith("]"), f"line {number}: {raw!r}"
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"line {number}: a setting before any section"
        key, sep, value = line.partition("=")
        assert sep, f"line {number}: expected Key=value, got {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(service: dict[str, list[str]], key: str) -> str:
    values = service.get(key, [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


@pytest.fixture(scope="module")
def units() -> dict[str, dict[str, dict[str, list[str]]]]:
    return {name: parse_unit(text) for name, text in systemd_units(EXE).items()}


def test_three_units_each_a_service(units: dict[str, dict[str, dict[str, list[str]]]]) -> None:
    assert (
        set(units)
        == set(SYSTEMD_UNITS)
        == {
            "edgeprobe-agent.service",
            "edgeprobe-collector.service",
            "edgeprobe-responder.service",
        }
    )
    for name, unit in units.items():
        assert set(unit) == {"Unit", "Service", "Install"}, name
        assert one(unit["Unit"], "Description"), name
        assert one(unit["Install"], "WantedBy") == "multi-user.target", name


@pytest.mark.parametrize("name", SYSTEMD_UNITS)
def test_sandboxing_and_user(units: dict[str, dict[str, dict[str, list[str]]]], name: str) -> None:
    service = units[name]["Service"]
    for key, want in SANDBOX.items():
        assert one(service, key) == want, (name, key)
    assert "User" not in service and "Group" not in service, "a dynamic user, never root or a shared account"
    families = set(one(service, "RestrictAddressFamilies").split())
    assert families <= {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}, families
    assert "ReadWritePaths" not in service, "StateDirectory= is the only writable place"
    # The config is a credential copied at start: a SIGHUP would re-read the old copy (see the
    # drop-in in docs/deployment.md, checked below).
    assert "ExecReload" not in service
    assert "WatchdogSec" not in service and "NotifyAccess" not in service, "no sd_notify"
    exec_start = one(service, "ExecStart").split()
    assert exec_start[0] == EXE


def capabilities(service: dict[str, list[str]], key: str) -> set[str]:
    return {cap for value in service.get(key, []) for cap in value.split()}


def test_only_the_agent_gets_cap_net_raw(units: dict[str, dict[str, dict[str, list[str]]]]) -> None:
    agent = units["edgeprobe-agent.service"]["Service"]
    assert capabilities(agent, "AmbientCapabilities") == {"CAP_NET_RAW"}
    assert capabilities(agent, "CapabilityBoundingSet") == {"CAP_NET_RAW"}
    for name in ("edgeprobe-collector.service", "edgeprobe-responder.service"):
        service = units[name]["Service"]
        # Present and empty: an empty bounding set drops every capability.
        assert service["CapabilityBoundingSet"] == [""], name
        assert capabilities(service, "AmbientCapabilities") == set(), name


@pytest.mark.parametrize("name", ROLES)
def test_config_as_a_credential_and_state_directory(
    units: dict[str, dict[str, dict[str, list[str]]]], name: str
) -> None:
    role = ROLES[name]
    service = units[name]["Service"]
    assert one(service, "ExecStart") == f"{EXE} {role} run -c %d/{role}.yaml"
    assert one(service, "LoadCredential") == f"{role}.yaml:/etc/edgeprobe/{role}.yaml"
    assert one(service, "StateDirectory") == f"edgeprobe/{role}"
    assert one(service, "StateDirectoryMode") == "0700"


def test_the_agent_spool_path_the_unit_asks_for_is_valid_and_in_its_state_directory() -> None:
    text = systemd_units(EXE)["edgeprobe-agent.service"]
    assert "path: /var/lib/edgeprobe/agent/{agent}/spool.db" in text
    raw = {
        "agent": {"id": "fra1-a", "site": "fra1"},
        "broker": {"url": "mqtt://127.0.0.1:1883"},
        "spool": {"path": "/var/lib/edgeprobe/agent/{agent}/spool.db"},
        "jobs": [{"kind": "tcp", "targets": ["127.0.0.1:80"], "interval_s": 10}],
    }
    cfg = convert(yaml.safe_load(yaml.safe_dump(raw)), AgentConfig, "test")
    assert cfg.spool.path == "/var/lib/edgeprobe/agent/{agent}/spool.db"


def test_init_systemd_writes_the_units(tmp_path: Path) -> None:
    result: Result = CliRunner().invoke(main, ["init", "systemd", "--out", str(tmp_path), "--exec", EXE])
    assert result.exit_code == 0, result.output
    for name, text in systemd_units(EXE).items():
        path = tmp_path / name
        assert path.read_text(encoding="utf-8") == text
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        assert "@EDGEPROBE@" not in text
    again = CliRunner().invoke(main, ["init", "systemd", "--out", str(tmp_path), "--exec", EXE])
    assert again.exit_code == 2 and "pass --force" in again.stderr
    forced = CliRunner().invoke(main, ["init", "systemd", "--out", str(tmp_path), "--exec", EXE, "--force"])
    assert forced.exit_code == 0, forced.output
    relative = CliRunner().invoke(main, ["init", "systemd", "--out", str(tmp_path), "--exec", "edgeprobe"])
    assert relative.exit_code == 2 and "absolute path" in relative.stderr


def test_init_systemd_defaults_to_this_installation(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["init", "systemd", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    exec_start = parse_unit((tmp_path / "edgeprobe-agent.service").read_text())["Service"]["ExecStart"][0]
    exe = Path(exec_start.split()[0])
    assert exe.is_absolute() and exe.name == "edgeprobe"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd); the INI checks above still ran")
    exe = tmp_path / "bin" / "edgeprobe"  # verify wants ExecStart's binary to exist and be executable
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    for name, text in systemd_units(str(exe)).items():
        (units / name).write_text(text, encoding="utf-8")
    proc = subprocess.run(
        [analyze, "verify", "--man=no", *(str(units / name) for name in SYSTEMD_UNITS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0 and "Failed to " in proc.stderr and "edgeprobe-" not in proc.stderr:
        pytest.skip(f"systemd-analyze verify cannot run here: {proc.stderr.strip()[:300]}")
    # Unknown keys, bad values and unsupported settings are warnings on stderr, not a failed exit.
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


def test_the_reload_drop_in_of_the_deployment_guide_verifies(tmp_path: Path) -> None:
    """docs/deployment.md's drop-in for `systemctl reload` (a fixed user reading the file itself,
    ExecReload sending SIGHUP), applied to the shipped agent unit, passes `systemd-analyze verify`."""
    guide = (Path(__file__).parents[3] / "docs" / "deployment.md").read_text(encoding="utf-8")
    section = guide.split("### Reloading a changed config", 1)[1]
    drop_in = section.split("```ini\n", 1)[1].split("```", 1)[0]
    assert "ExecReload=/bin/kill -HUP $MAINPID" in drop_in and "LoadCredential=\n" in drop_in
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    exe = tmp_path / "bin" / "edgeprobe"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    units = tmp_path / "units"
    (units / "edgeprobe-agent.service.d").mkdir(parents=True)
    (units / "edgeprobe-agent.service").write_text(systemd_units(str(exe))["edgeprobe-agent.service"])
    (units / "edgeprobe-agent.service.d" / "reload.conf").write_text(drop_in.replace(EXE, str(exe)))
    proc = subprocess.run(
        [analyze, "verify", "--man=no", "edgeprobe-agent.service"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=units,
        env={"SYSTEMD_UNIT_PATH": f"{units}:", "PATH": "/usr/bin:/bin"},
    )
    if proc.returncode != 0 and "Failed to " in proc.stderr and "edgeprobe-" not in proc.stderr:
        pytest.skip(f"systemd-analyze verify cannot run here: {proc.stderr.strip()[:300]}")
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    # and it is the drop-in that was read: a bad key in it is reported
    (units / "edgeprobe-agent.service.d" / "reload.conf").write_text(drop_in.replace(EXE, str(exe)) + "Bogus=1\n")
    bad = subprocess.run(
        [analyze, "verify", "--man=no", "edgeprobe-agent.service"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=units,
        env={"SYSTEMD_UNIT_PATH": f"{units}:", "PATH": "/usr/bin:/bin"},
    )
    assert "reload.conf" in bad.stderr and "Bogus" in bad.stderr, bad.stderr
