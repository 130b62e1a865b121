"""What a reload (SIGHUP) sees as changed, and which of it needs a restart (pure parts)."""

from __future__ import annotations

from typing import Any

from edgeprobe.agent.config import RELOADABLE_KEYS as AGENT_LIVE
from edgeprobe.agent.config import AgentConfig, build_jobs, job_changes
from edgeprobe.collector.config import RELOADABLE_KEYS as COLLECTOR_LIVE
from edgeprobe.collector.config import CollectorConfig
from edgeprobe.configfile import changed_keys, convert, describe_changes, needs_restart


def agent(**over: Any) -> AgentConfig:
    raw: dict[str, Any] = {
        "agent": {"id": "a1", "site": "s1"},
        "jobs": [
            {"name": "p", "kind": "icmp", "targets": ["127.0.0.1"], "interval_s": 60},
            {"name": "t", "kind": "tcp", "targets": ["127.0.0.1:80"], "interval_s": 60},
        ],
    }
    for key, value in over.items():
        raw[key] = value if key == "jobs" else {**raw.get(key, {}), **value}
    return convert(raw, AgentConfig, "agent.yaml")


def test_changed_keys_names_leaves_and_compares_lists_whole() -> None:
    old = agent()
    assert changed_keys(old, agent()) == []
    new = agent(agent={"max_concurrent_probes": 8, "labels": {"tier": "pop"}}, broker={"url": "mqtts://b:8883"})
    assert changed_keys(old, new) == ["agent.labels", "agent.max_concurrent_probes", "broker.url"]
    assert changed_keys(old, agent(jobs=[])) == ["jobs"]


def test_secrets_compare_by_value_and_are_never_shown() -> None:
    old = agent(broker={"password": "one"})
    assert changed_keys(old, agent(broker={"password": "one"})) == []
    new = agent(broker={"password": "two"})
    assert changed_keys(old, new) == ["broker.password"]
    assert "two" not in describe_changes(old, new, ["broker.password"])


def test_agent_restart_keys() -> None:
    old = agent()
    new = agent(
        agent={"id": "a2", "latitude": 1.0, "longitude": 2.0, "shutdown_grace_s": 1},
        policy={"deny_cidrs": ["10.0.0.0/8"]},
        log={"summary_interval_s": 5},
        jobs=[],
        spool={"path": None},
    )
    changed = changed_keys(old, new)
    assert needs_restart(changed, AGENT_LIVE) == ["agent.id", "spool.path"]


def test_collector_restart_keys_and_description() -> None:
    old = convert({}, CollectorConfig, "c.yaml")
    new = convert(
        {"limits": {"max_message_bytes": 4096}, "health_interval_s": None, "influx": {"database": "x"}},
        CollectorConfig,
        "c.yaml",
    )
    changed = changed_keys(old, new)
    assert needs_restart(changed, COLLECTOR_LIVE) == ["influx.database"]
    live = [k for k in changed if k not in needs_restart(changed, COLLECTOR_LIVE)]
    assert describe_changes(old, new, live) == "limits.max_message_bytes 1048576 → 4096, health_interval_s 10 → null"


def test_job_changes_by_name() -> None:
    old = agent()
    new = agent(
        jobs=[
            {"name": "p", "kind": "icmp", "targets": ["127.0.0.1"], "interval_s": 120},
            {"name": "d", "kind": "tcp", "targets": ["127.0.0.1:1", "127.0.0.1:2"], "interval_s": 60},
        ]
    )
    assert job_changes(build_jobs(old, "x"), build_jobs(new, "x")) == ["+d (tcp, 2 target(s))", "-t", "~p"]
    assert job_changes(build_jobs(old, "x"), build_jobs(agent(), "x")) == []
