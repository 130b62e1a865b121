"""Pure parts of the fleet: agent selection, --where, mesh documents, label matching."""

from __future__ import annotations

import pytest

from edgeprobe.agent.control import label_match
from edgeprobe.configfile import ConfigError, convert
from edgeprobe.fleet import MeshFile, mesh_documents, parse_where, select_agents, validate_documents
from edgeprobe.schema import Status


def _st(agent: str, site: str, state: str = "online", **labels: str) -> Status:
    return Status(v=1, agent=agent, site=site, state=state, at_ns=0, labels=labels)


def test_select_spreads_across_sites_and_caps() -> None:
    sts = [_st("a1", "s1"), _st("a2", "s1"), _st("a3", "s1"), _st("b1", "s2"), _st("c1", "s3"), _st("c2", "s3")]
    assert [s.agent for s in select_agents(sts, {}, 3)] == ["a1", "b1", "c1"]
    assert [s.agent for s in select_agents(sts, {}, 5)] == ["a1", "b1", "c1", "a2", "c2"]
    assert len(select_agents(sts, {}, None)) == 6


def test_select_filters_offline_and_labels() -> None:
    sts = [_st("a1", "s1", tier="pop"), _st("a2", "s2", tier="core"), _st("a3", "s3", "offline", tier="pop")]
    assert [s.agent for s in select_agents(sts, {"tier": "pop"}, None)] == ["a1"]
    assert [s.agent for s in select_agents(sts, {"site": "s2"}, None)] == ["a2"]
    assert [s.agent for s in select_agents(sts, {"agent": "a1", "tier": "core"}, None)] == []


def test_parse_where() -> None:
    assert parse_where(["tier=pop", "site=fra1"]) == {"tier": "pop", "site": "fra1"}
    for bad in ("tier", "=pop", "tier="):
        with pytest.raises(ValueError, match="label=value"):
            parse_where([bad])


def test_label_match() -> None:
    assert label_match({"tier": "pop", "site": "s1"}, "s1", "a1", {"tier": "pop"})
    assert not label_match({"tier": "pop"}, "s1", "a1", {})
    assert label_match({}, "s1", "a1", {})


def test_mesh_documents() -> None:
    mesh = convert(
        {
            "groups": {"eps": ["127.0.0.1:443", "127.0.0.2:443"]},
            "rules": [{"name": "pop-tcp", "where": {"tier": "pop"}, "kind": "tcp", "targets": "eps", "interval_s": 60}],
            "agents": {"a1": {"site": "s1", "jobs": [{"kind": "icmp", "targets": ["127.0.0.1"], "interval_s": 30}]}},
        },
        MeshFile,
        "mesh.yaml",
    )
    docs = mesh_documents(mesh, "edgeprobe", "mesh.yaml")
    assert [d.topic for d in docs] == ["edgeprobe/v1/config/group/pop-tcp", "edgeprobe/v1/s1/a1/config"]
    assert docs[0].where == {"tier": "pop"} and docs[0].jobs[0]["targets"] == ["127.0.0.1:443", "127.0.0.2:443"]
    assert docs[0].nonce != docs[1].nonce and docs[0].expires_at_ns > docs[0].issued_at_ns
    validate_documents(docs, "mesh.yaml")


def test_mesh_errors() -> None:
    unknown_group = convert(
        {"rules": [{"name": "r", "kind": "tcp", "targets": "nope", "interval_s": 60}]}, MeshFile, "m"
    )
    with pytest.raises(ConfigError, match="no target group 'nope'"):
        mesh_documents(unknown_group, "edgeprobe", "m")
    bad_kind = convert({"rules": [{"name": "r", "kind": "nope", "targets": ["x:1"], "interval_s": 60}]}, MeshFile, "m")
    with pytest.raises(ConfigError, match="unknown probe kind"):
        validate_documents(mesh_documents(bad_kind, "edgeprobe", "m"), "m")
