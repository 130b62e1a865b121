"""One vocabulary: the CLI's names (ping, ttft) are aliases of the kinds, declared in each kind's
ProbeKind and resolved by the registry wherever a kind is named (agent config, fleet, commands)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from edgeprobe.agent.config import load_agent_config
from edgeprobe.configfile import convert
from edgeprobe.fleet import MeshFile, check_request, mesh_documents
from edgeprobe.probes.registry import KINDS, NAMES, find_kind, get_kind, kind_names


def test_the_cli_names_are_aliases() -> None:
    assert get_kind("ping") is KINDS["icmp"] and get_kind("ttft") is KINDS["inference"]
    assert find_kind("icmp") is KINDS["icmp"] and find_kind("pong") is None
    assert "icmp (ping)" in kind_names() and "inference (ttft)" in kind_names()


def test_aliases_are_unique_and_never_a_kind_s_name() -> None:
    aliases = [a for k in KINDS.values() for a in k.aliases]
    assert len(aliases) == len(set(aliases))
    assert not set(aliases) & set(KINDS)
    assert len(NAMES) == len(KINDS) + len(aliases)


def test_agent_config_accepts_an_alias(tmp_path: Path) -> None:
    p = tmp_path / "agent.yaml"
    p.write_text(
        textwrap.dedent(
            """\
            agent: {id: a1, site: s1}
            broker:
              url: mqtt://127.0.0.1:1883
            jobs:
              - kind: ping
                targets: [127.0.0.1]
                interval_s: 10
                options: {count: 3, interval_s: 0.2}
              - kind: ttft
                targets: ["http://127.0.0.1:8000"]
                interval_s: 60
                options: {model: m}
            """
        )
    )
    _, jobs = load_agent_config(p, environ={})
    assert [(j.name, j.kind.name) for j in jobs] == [("ping", "icmp"), ("ttft", "inference")]


def test_fleet_sends_the_kind_s_own_name() -> None:
    check_request("ping", "127.0.0.1", {"count": 2})
    rule = {"name": "r", "kind": "ping", "targets": ["127.0.0.1"], "interval_s": 60}
    mesh = convert({"rules": [rule]}, MeshFile, "m")
    (doc,) = mesh_documents(mesh, "edgeprobe", "m")
    assert doc.jobs[0]["kind"] == "icmp"
