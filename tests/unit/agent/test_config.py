"""Broken configs give a message naming the file, the key and what was expected (one test per mistake)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from edgeprobe.agent.config import load_agent_config
from edgeprobe.configfile import ConfigError

GOOD = """
agent:
  id: fra1-a
  site: fra1
  labels: {tier: pop}
broker:
  url: mqtt://127.0.0.1:1883
jobs:
  - kind: icmp
    targets: [127.0.0.1]
    interval_s: 10
    options: {count: 3, interval_s: 0.2}
  - kind: tcp
    targets: ["127.0.0.1:22"]
    interval_s: 30
  - kind: http
    targets: ["http://127.0.0.1:8080/health"]
    interval_s: 30
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def error_of(tmp_path: Path, text: str) -> str:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_agent_config(p, environ={})
    msg = str(info.value)
    assert msg.startswith(f"{p}: "), msg  # always names the file first
    return msg


def test_good_config_loads(tmp_path: Path) -> None:
    cfg, jobs = load_agent_config(write(tmp_path, GOOD), environ={})
    assert cfg.agent.id == "fra1-a"
    assert [j.name for j in jobs] == ["icmp", "tcp", "http"]
    assert jobs[0].config.count == 3
    assert jobs[1].config.count == 3  # tcp default, from the kind's config struct


def test_unknown_top_level_key(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD + "brokr: {}\n")
    assert "brokr: unknown key; expected one of: agent, broker, control, jobs, log, policy, publish, spool" in msg


def test_unknown_option_key_names_the_path(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("count: 3,", "cnt: 3,"))
    assert "jobs[0].options.cnt: unknown key" in msg
    assert "count" in msg and "size_bytes" in msg  # lists what is allowed


def test_wrong_type(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("interval_s: 10", "interval_s: ten"))
    assert "jobs[0].interval_s" in msg and "expected `float`" in msg


def test_negative_interval(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("interval_s: 30\n  - kind: http", "interval_s: -5\n  - kind: http"))
    assert "jobs[1].interval_s" in msg and "> 0" in msg


def test_interval_shorter_than_a_run(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("interval_s: 10", "interval_s: 1"))
    assert "jobs[0].interval_s: 1 s is shorter than one run may take" in msg


def test_bad_broker_url(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("mqtt://127.0.0.1:1883", "http://127.0.0.1:1883"))
    assert "broker.url: expected an mqtt:// or mqtts:// URL" in msg


def test_bad_http_target_url(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("http://127.0.0.1:8080/health", "ftp://127.0.0.1/x"))
    assert "jobs[2].targets[0]:" in msg and "ftp://127.0.0.1/x" in msg


def test_bad_tcp_target(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace('"127.0.0.1:22"', '"127.0.0.1"'))
    assert "jobs[1].targets[0]:" in msg and "HOST:PORT" in msg


def test_unknown_kind(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("kind: icmp", "kind: icmpp"))
    assert "jobs[0].kind: unknown probe kind 'icmpp'; expected one of: dns, http, icmp" in msg


def test_missing_required_key(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("  site: fra1\n", ""))
    assert "agent.site: required key is missing" in msg


def test_option_out_of_range(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("count: 3,", "count: 0,"))
    assert "jobs[0].options.count" in msg and ">= 1" in msg


def test_agent_id_not_topic_safe(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("id: fra1-a", "id: fra1/a"))
    assert "agent.id: expected letters, digits" in msg


@pytest.mark.parametrize(("key", "name"), [("id", "group"), ("site", "config"), ("site", "results")])
def test_names_of_edgeprobe_topic_levels_are_reserved(tmp_path: Path, key: str, name: str) -> None:
    # site "config" + agent "group" would publish under <prefix>/v1/config/group/..., the group configs
    old = "id: fra1-a" if key == "id" else "site: fra1"
    msg = error_of(tmp_path, GOOD.replace(old, f"{key}: {name}"))
    assert f"agent.{key}: '{name}' is reserved" in msg


def test_reserved_label(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("labels: {tier: pop}", "labels: {target: x}"))
    assert "agent.labels: label 'target' is reserved" in msg


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "agent: {id: a\n  site: [\n")
    assert "not valid YAML (line" in msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        load_agent_config(tmp_path / "nope.yaml", environ={})


def test_duplicate_job_names(tmp_path: Path) -> None:
    text = GOOD.replace("  - kind: tcp\n", "  - kind: tcp\n    name: icmp\n")
    msg = error_of(tmp_path, text)
    assert "jobs[1].name: job name 'icmp' is used twice" in msg


def test_env_overrides_broker_and_hides_password(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD)
    env = {
        "EDGEPROBE_BROKER_URL": "mqtts://broker.example:8883",
        "EDGEPROBE_BROKER_PASSWORD": "hunter2-secret",
    }
    cfg, _ = load_agent_config(p, environ=env)
    assert cfg.broker.url == "mqtts://broker.example:8883"
    assert cfg.broker.password is not None and cfg.broker.password.reveal() == "hunter2-secret"
    assert "hunter2-secret" not in repr(cfg)
    assert "hunter2-secret" not in f"{cfg.broker.password}"


def test_env_override_is_validated_too(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match=r"broker\.url: expected an mqtt:// or mqtts:// URL"):
        load_agent_config(p, environ={"EDGEPROBE_BROKER_URL": "localhost:1883"})


def test_target_with_half_coordinates(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("targets: [127.0.0.1]", "targets: [{target: 127.0.0.1, latitude: 50}]"))
    assert "jobs[0].targets[0].longitude: latitude and longitude go together" in msg


def test_target_with_coordinates_and_labels(tmp_path: Path) -> None:
    text = GOOD.replace(
        "targets: [127.0.0.1]", "targets: [{target: 127.0.0.1, latitude: 50, longitude: 8, labels: {tier: edge}}]"
    )
    _, jobs = load_agent_config(write(tmp_path, text), environ={})
    assert jobs[0].targets == ("127.0.0.1",)
    assert jobs[0].target_at == {"127.0.0.1": (50, 8)}
    assert jobs[0].labels_for("127.0.0.1") == {"tier": "edge"}
