"""The compose stack (``docker-compose.yml``, ``Dockerfile``, ``deploy/``, ``grafana/provisioning``).

There is no Docker engine here, so the stack is checked without running it: the file parses, every
mounted file exists, every image is pinned, each service's command is accepted by the real CLI,
and credentials, hosts, ports, database and topics agree between compose, mosquitto's config and
ACL, the collector's and the agents' configs (loaded with the real config loaders) and Grafana's
datasource. The ACL is evaluated by a small pure function, and then proven on a real mosquitto
with a password file made by the stack's own script: agent A's publish under A's topic arrives,
its publish under B's topic never reaches a subscriber, and a real agent and collector with the
stack's usernames deliver through it. ``docker compose config`` is compared when the plugin is
installed (skipped otherwise).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import tomllib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import click
import pytest
import yaml

from edgeprobe.localstack import MAX_PACKET_SIZE, InfluxServer, MosquittoServer, find_binary
from edgeprobe.mqtt import parse_broker_url
from edgeprobe.schema import health_topic, obs_topic, status_topic
from tests.support.paths import REPO
from tests.support.wait import wait_for_async

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
ACL = REPO / "deploy" / "mosquitto" / "acl"
MOSQUITTO_CONF = REPO / "deploy" / "mosquitto" / "mosquitto.conf"
MAKE_PASSWD = REPO / "deploy" / "mosquitto" / "make-passwd.sh"
DATASOURCE = REPO / "grafana" / "provisioning" / "datasources" / "edgeprobe.yaml"
PROVIDER = REPO / "grafana" / "provisioning" / "dashboards" / "edgeprobe.yaml"
AGENT_SERVICES = ("agent-fra1", "agent-mad1")
RESPONDERS = ("responder-edge", "responder-core")
EDGEPROBE_SERVICES = ("collector", *AGENT_SERVICES, *RESPONDERS)
INFLUX_PORT = 8086  # influxd's default HTTP bind (:8086); the compose file doesn't change it


# ----- compose variable interpolation (${VAR}, ${VAR:-default}, ${VAR-default}, $VAR, $$) ---------

_INTERP = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """``value`` with compose's variable syntax resolved from ``env`` (defaults when unset)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, default = m.group(3), m.group(4) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        if name not in env:
            raise KeyError(f"${name} has no default and is not set")
        return env[name]

    return _INTERP.sub(one, value)


def raw_compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))  # safe_load resolves the << merge keys
    assert isinstance(doc, dict)
    return doc


def compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose file as ``docker compose`` sees it with ``env`` (default: nothing set)."""
    resolved = interpolate(raw_compose(), env or {})
    assert isinstance(resolved, dict)
    return resolved


def service_env(svc: Mapping[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool

    @property
    def bind(self) -> bool:
        return self.source.startswith((".", "/"))


def mounts(svc: Mapping[str, Any]) -> list[Mount]:
    out = []
    for vol in svc.get("volumes", []):
        parts = vol.split(":")
        out.append(Mount(parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def host_path_for(svc: Mapping[str, Any], container_path: str) -> Path:
    """The repo file a service sees at ``container_path`` through a bind mount."""
    want = PurePosixPath(container_path)
    for m in mounts(svc):
        if m.bind and (want == PurePosixPath(m.target) or PurePosixPath(m.target) in want.parents):
            return REPO / m.source / want.relative_to(m.target)
    raise AssertionError(f"{container_path} is not bind-mounted into the service")


def volume_for(svc: Mapping[str, Any], container_path: str) -> str:
    want = PurePosixPath(container_path)
    for m in mounts(svc):
        if not m.bind and (want == PurePosixPath(m.target) or PurePosixPath(m.target) in want.parents):
            return m.source
    raise AssertionError(f"{container_path} is not on a named volume")


def mqtt_entries(c: Mapping[str, Any]) -> dict[str, str]:
    """EDGEPROBE_MQTT_USERS as given: ``user`` or ``site/agent`` -> password."""
    pairs = service_env(c["services"]["mosquitto-init"])["EDGEPROBE_MQTT_USERS"].split()
    entries = dict(p.split(":", 1) for p in pairs)
    assert len(entries) == len(pairs), "a user is listed twice"
    return entries


def mqtt_users(c: Mapping[str, Any]) -> dict[str, str]:
    """login (an agent's is its id) -> password."""
    return {e.rsplit("/", 1)[-1]: p for e, p in mqtt_entries(c).items()}


def mqtt_sites(c: Mapping[str, Any]) -> dict[str, str]:
    """agent login -> the site make-passwd.sh binds it to."""
    return {e.split("/", 1)[1]: e.split("/", 1)[0] for e in mqtt_entries(c) if "/" in e}


def generated_acl(entries: Mapping[str, str]) -> str:
    """The ACL make-passwd.sh writes for these entries (run for real, with a stand-in for
    mosquitto_passwd: only the ACL is read here)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        stub = Path(d) / "bin" / "mosquitto_passwd"
        stub.parent.mkdir()
        stub.write_text('#!/bin/sh\necho "$3:stub" >> "$2"\n')
        stub.chmod(0o755)
        env = {
            **os.environ,
            "EDGEPROBE_MQTT_USERS": "\n".join(f"{u}:{p}" for u, p in entries.items()),
            "PATH": f"{stub.parent}:{os.environ.get('PATH', '')}",
        }
        out = Path(d) / "auth"
        subprocess.run(
            ["sh", str(MAKE_PASSWD), str(out), str(ACL)], env=env, check=True, capture_output=True, timeout=60
        )
        return (out / "acl").read_text()


def conf_lines(path: Path) -> list[list[str]]:
    return [
        line.split() for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]


def conf_value(path: Path, key: str) -> str:
    (value,) = [" ".join(words[1:]) for words in conf_lines(path) if words[0] == key]
    return value


# ----- mosquitto's acl_file, evaluated (pure) -------------------------------------------------------


@dataclass
class Acl:
    users: dict[str | None, list[tuple[str, str]]] = field(default_factory=dict)  # None: anonymous clients
    patterns: list[tuple[str, str]] = field(default_factory=list)


def parse_acl(text: str) -> Acl:
    """mosquitto's acl_file: ``user``, ``topic [read|write|readwrite|deny] T``, ``pattern [...] T``."""
    acl = Acl()
    user: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        rest = rest.strip()
        if word == "user":
            user = rest
            continue
        if word not in ("topic", "pattern"):
            raise ValueError(f"unknown ACL line {line!r}")
        access, _, topic = rest.partition(" ")
        if access not in ("read", "write", "readwrite", "deny"):
            access, topic = "readwrite", rest
        entry = (access, topic.strip())
        if word == "pattern":
            acl.patterns.append(entry)
        else:
            acl.users.setdefault(user, []).append(entry)
    return acl


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT filter matching (``+`` one level, ``#`` the rest, also the parent level)."""
    p, t = pattern.split("/"), topic.split("/")
    for i, level in enumerate(p):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(p) == len(t)


def acl_allows(acl: Acl, username: str | None, client_id: str, topic: str, access: str) -> bool:
    """Whether mosquitto lets ``username`` read or write ``topic``: a matching deny wins, else any grant."""
    rules = list(acl.users.get(username, []))
    for kind, pattern in acl.patterns:
        if username is not None and any(c in username for c in "+#/"):
            continue  # mosquitto refuses to substitute such a username
        rules.append((kind, pattern.replace("%u", username or "").replace("%c", client_id)))
    matching = [kind for kind, pattern in rules if topic_matches(pattern, topic)]
    if "deny" in matching:
        return False
    return any(kind in (access, "readwrite") for kind in matching)


def test_acl_evaluator() -> None:
    acl = parse_acl("pattern write a/+/%u/#\nuser c\ntopic read a/+/+/obs\ntopic deny a/x/+/obs\n")
    assert acl_allows(acl, "u1", "id", "a/s/u1/obs", "write")
    assert not acl_allows(acl, "u1", "id", "a/s/u2/obs", "write")
    assert not acl_allows(acl, "u1", "id", "a/s/u1/obs", "read")
    assert acl_allows(acl, "c", "id", "a/s/u1/obs", "read")
    assert not acl_allows(acl, "c", "id", "a/x/u1/obs", "read")  # deny wins
    assert not acl_allows(acl, "c", "id", "a/s/u1/obs", "write")
    assert not acl_allows(acl, None, "id", "a/s/u1/obs", "write")
    assert not acl_allows(acl, "a/b", "id", "a/s/a/b/obs", "write")
    assert topic_matches("a/#", "a") and topic_matches("a/#", "a/b/c") and not topic_matches("a/+", "a/b/c")


# ----- static checks ------------------------------------------------------------------------------


def test_compose_parses_and_has_the_stack() -> None:
    c = compose()
    assert {"mosquitto", "influxdb", "grafana", *EDGEPROBE_SERVICES} <= set(c["services"])
    for name, svc in c["services"].items():
        for dep in svc.get("depends_on", {}):
            assert dep in c["services"], (name, dep)
        for m in mounts(svc):
            if not m.bind:
                assert m.source in c["volumes"], (name, m.source)


def test_every_variable_has_a_default() -> None:
    compose({})  # raises KeyError for a ${VAR} without default
    text = COMPOSE.read_text(encoding="utf-8")
    for name, op in re.findall(r"\$\{(\w+)(:?-)?", text):
        assert op == ":-", f"${{{name}}}: give it a default with :- so a plain 'docker compose up' works"


def test_mounted_files_exist() -> None:
    c = compose()
    seen = 0
    for name, svc in c["services"].items():
        for m in mounts(svc):
            if m.bind:
                path = (REPO / m.source).resolve()
                assert path.exists(), f"{name}: {m.source} is mounted but does not exist"
                assert REPO in path.parents, f"{name}: {m.source} is outside the repository"
                assert m.read_only or m.target.startswith("/mosquitto/auth"), f"{name}: mount {m.source} read-only"
                seen += 1
        build = svc.get("build")
        if build:
            assert (REPO / build["context"] / build.get("dockerfile", "Dockerfile")).is_file()
    assert seen >= 9


def test_images_are_pinned() -> None:
    c = compose()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for name, svc in c["services"].items():
        image = svc["image"]
        repo_name, _, tag = image.rpartition(":")
        assert repo_name and tag and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest" and re.match(r"^\d+\.\d+(\.\d+)?", tag), f"{name}: pin {image!r} to a version"
        if name in EDGEPROBE_SERVICES:
            assert image == f"edgeprobe:{version}", f"{name}: the image is edgeprobe at the project's version"
    assert c["services"]["influxdb"]["image"].startswith("influxdb:1.8.")  # the v1 API the tests exercise
    (base,) = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base


def test_dockerfile_runs_unprivileged_with_at_most_net_raw() -> None:
    text = DOCKERFILE.read_text()
    (user,) = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    assert "setcap cap_net_raw=ep /usr/local/bin/python3-netraw" in text
    assert re.findall(r"setcap\s", text) == ["setcap "]  # the only file capability in the image
    assert 'ENTRYPOINT ["edgeprobe"]' in text
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["edgeprobe"] == "edgeprobe.cli:main"
    c = compose()
    for name in EDGEPROBE_SERVICES:
        svc = c["services"][name]
        assert not svc.get("privileged") and svc.get("user") in (None, user), name
        assert svc["cap_drop"] == ["ALL"], name
        assert svc.get("read_only") is True, name
        if name in AGENT_SERVICES:
            assert svc["cap_add"] == ["NET_RAW"], name
            assert svc["entrypoint"][0] == "python3-netraw", name
            assert "no-new-privileges:true" not in svc.get("security_opt", []), f"{name}: NNP drops file capabilities"
            low, high = map(int, svc["sysctls"]["net.ipv4.ping_group_range"].split())
            assert low <= int(gid) <= high, f"{name}: ping_group_range must cover the image's gid {gid}"
        else:
            assert not svc.get("cap_add"), name
            assert "no-new-privileges:true" in svc["security_opt"], name
    ignored = [w for w in (REPO / ".dockerignore").read_text().splitlines() if w and not w.startswith("#")]
    assert ignored[0] == "*" and {"!pyproject.toml", "!README.md", "!probes/", "!agent/", "!collector/"} <= set(ignored)


def cli_params(args: list[str]) -> dict[str, Any]:
    """Parse ``edgeprobe ARGS`` with the real click CLI without running it; UsageError if wrong."""
    from edgeprobe.cli import main

    cmd: click.Command = main
    name, parent = "edgeprobe", None
    while True:
        ctx = cmd.make_context(name, list(args), parent=parent)
        if not isinstance(cmd, click.Group):
            return dict(ctx.params)
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        resolved_name, sub, args = cmd.resolve_command(ctx, rest)
        assert resolved_name is not None and sub is not None
        name, cmd, parent = resolved_name, sub, ctx


def service_cli_args(svc: Mapping[str, Any]) -> list[str]:
    entry = svc.get("entrypoint", ["edgeprobe"])
    assert entry in (["edgeprobe"], ["python3-netraw", "-m", "edgeprobe.cli"]), entry
    return list(svc["command"])


def test_every_command_is_accepted_by_the_cli() -> None:
    c = compose()
    for name in EDGEPROBE_SERVICES:
        params = cli_params(service_cli_args(c["services"][name]))
        if name in RESPONDERS:
            assert params["host"] == "0.0.0.0", f"{name}: listen on the container's network"


def test_credentials_hosts_and_ports_agree() -> None:
    env = {"EDGEPROBE_MQTT_FRA1_A_PASSWORD": "from-dotenv-fra1", "EDGEPROBE_INFLUX_GRAFANA_PASSWORD": "from-dotenv-g"}
    for c in (compose(), compose(env)):  # with the defaults, and with some set in .env
        check_agreement(c)


def check_agreement(c: dict[str, Any]) -> None:
    from edgeprobe.agent.config import load_agent_config
    from edgeprobe.collector.config import load_collector_config

    services = c["services"]
    users = mqtt_users(c)
    agent_sites = mqtt_sites(c)
    acl = parse_acl(generated_acl(mqtt_entries(c)))

    # mosquitto: listener port, where the auth files are, and that mosquitto-init writes them there
    listener_port = int(conf_value(MOSQUITTO_CONF, "listener").split()[0])
    assert conf_value(MOSQUITTO_CONF, "allow_anonymous") == "false"
    assert int(conf_value(MOSQUITTO_CONF, "max_packet_size")) == MAX_PACKET_SIZE  # the tests' brokers use it
    mosq, init = services["mosquitto"], services["mosquitto-init"]
    assert host_path_for(mosq, "/mosquitto/config/mosquitto.conf") == MOSQUITTO_CONF
    auth_dir = str(PurePosixPath(conf_value(MOSQUITTO_CONF, "password_file")).parent)
    assert str(PurePosixPath(conf_value(MOSQUITTO_CONF, "acl_file")).parent) == auth_dir
    assert volume_for(mosq, auth_dir) == volume_for(init, auth_dir)
    script, out_dir, acl_in = init["entrypoint"][1:]
    assert host_path_for(init, script) == MAKE_PASSWD and host_path_for(init, acl_in) == ACL
    assert out_dir == auth_dir
    assert conf_value(MOSQUITTO_CONF, "password_file") == f"{auth_dir}/passwd"
    assert conf_value(MOSQUITTO_CONF, "acl_file") == f"{auth_dir}/acl"
    assert any(p.endswith(f":{listener_port}") for p in mosq.get("ports", []))
    assert volume_for(mosq, conf_value(MOSQUITTO_CONF, "persistence_location"))

    # InfluxDB: database and users
    influx = service_env(services["influxdb"])
    database = influx["INFLUXDB_DB"]
    assert influx["INFLUXDB_HTTP_AUTH_ENABLED"] == "true"

    def broker_ok(url: str) -> None:
        tls, host, port = parse_broker_url(url)
        assert not tls and host == "mosquitto" and port == listener_port, url

    def influx_ok(url: str) -> None:
        parts = urlsplit(url)
        assert parts.hostname == "influxdb" and (parts.port or 80) == INFLUX_PORT, url

    # the collector
    col = services["collector"]
    ccfg = load_collector_config(host_path_for(col, col["command"][-1]), environ=service_env(col))
    broker_ok(ccfg.broker.url)
    assert ccfg.broker.username in users and ccfg.broker.password is not None
    assert ccfg.broker.password.reveal() == users[ccfg.broker.username], "collector: MQTT password"
    influx_ok(ccfg.influx.url)
    assert ccfg.influx.api == "v1" and ccfg.influx.database == database
    assert ccfg.influx.username == influx["INFLUXDB_WRITE_USER"]
    assert ccfg.influx.password is not None
    assert ccfg.influx.password.reveal() == influx["INFLUXDB_WRITE_USER_PASSWORD"], "collector: InfluxDB password"
    assert not ccfg.influx.create_database  # a write-only user may not; INFLUXDB_DB creates it
    health_filter: str | None = getattr(ccfg, "health_topic_filter", None)
    filters = [ccfg.topic_filter, *([health_filter] if health_filter else [])]
    for topic_filter in filters:
        concrete = re.sub(r"^\$share/[^/]+/", "", topic_filter).replace("+", "x").replace("#", "x")
        assert acl_allows(acl, ccfg.broker.username, "c", concrete, "read"), f"collector may not read {concrete}"
    assert not acl_allows(acl, ccfg.broker.username, "c", obs_topic(ccfg.broker.topic_prefix, "s", "a"), "write")
    spool = getattr(ccfg, "spool", None)
    if spool is not None and spool.path is not None:
        assert volume_for(col, spool.path), "collector: the spool must be on a volume (the root fs is read-only)"

    # the agents
    responder_ports = {name: cli_params(service_cli_args(services[name]))["port"] for name in RESPONDERS}
    agent_ids = []
    for name in AGENT_SERVICES:
        svc = services[name]
        cfg, jobs = load_agent_config(host_path_for(svc, svc["command"][-1]), environ=service_env(svc))
        aid = cfg.agent.id
        agent_ids.append(aid)
        assert cfg.agent.latitude is not None and cfg.agent.longitude is not None, f"{name}: coordinates"
        broker_ok(cfg.broker.url)
        assert cfg.broker.username == aid, f"{name}: the MQTT username must be the agent id (the ACL relies on it)"
        assert cfg.broker.password is not None and cfg.broker.password.reveal() == users[aid], f"{name}: password"
        assert agent_sites.get(aid) == cfg.agent.site, f"{name}: EDGEPROBE_MQTT_USERS must bind {aid} to its site"
        assert svc["hostname"] == aid
        prefix = cfg.broker.topic_prefix
        for topic in (
            obs_topic(prefix, cfg.agent.site, aid),
            status_topic(prefix, cfg.agent.site, aid),
            health_topic(prefix, cfg.agent.site, aid),
        ):
            assert acl_allows(acl, aid, aid, topic, "write"), topic
            assert not acl_allows(acl, aid, aid, topic.replace(f"/{aid}/", "/someone-else/"), "write"), topic
            other_site = topic.replace(f"/{cfg.agent.site}/{aid}/", f"/another-site/{aid}/")
            assert not acl_allows(acl, aid, aid, other_site, "write"), other_site
            assert acl_allows(acl, ccfg.broker.username, "c", topic, "read") or topic.endswith("/status"), topic
        tiers = set()
        for job in jobs:
            for target in job.targets:
                host = urlsplit(target).hostname if "://" in target else target.rsplit(":", 1)[0]
                assert host in RESPONDERS, f"{name}: {target} is not a service of the stack"
                port = (
                    urlsplit(target).port
                    if "://" in target
                    else (int(target.rsplit(":", 1)[1]) if ":" in target else None)
                )
                assert port in (None, responder_ports[host]), f"{name}: {target} (responder port)"
            if "tier" in job.labels:
                tiers.add(job.labels["tier"])
        assert {"edge", "core"} <= tiers
        assert {"icmp", "inference"} <= {j.kind.name for j in jobs}
        spool = getattr(cfg, "spool", None)
        if spool is not None and spool.path is not None:
            assert volume_for(svc, spool.path.format(agent=aid)), f"{name}: spool on a volume"
        assert svc["depends_on"] == {"mosquitto": {"condition": "service_started"}}
    assert sorted(users) == sorted([ccfg.broker.username, *agent_ids]), "one MQTT user per agent, and the collector"
    sites = {
        load_agent_config(host_path_for(services[n], services[n]["command"][-1]), environ=service_env(services[n]))[
            0
        ].agent.site
        for n in AGENT_SERVICES
    }
    assert len(sites) == len(AGENT_SERVICES), "two PoPs"

    # Grafana: the datasource, the provider and the dashboards
    graf = services["grafana"]
    genv = service_env(graf)
    assert host_path_for(graf, "/etc/grafana/provisioning/datasources/edgeprobe.yaml") == DATASOURCE
    (ds,) = yaml.safe_load(DATASOURCE.read_text())["datasources"]
    ds = interpolate(ds, genv)  # Grafana expands ${VAR} in provisioning files from its environment
    influx_ok(ds["url"])
    assert ds["type"] == "influxdb" and ds["jsonData"]["version"] == "InfluxQL"
    assert ds["jsonData"]["dbName"] == ds["database"] == database
    assert ds["user"] == influx["INFLUXDB_READ_USER"]
    assert ds["secureJsonData"]["password"] == influx["INFLUXDB_READ_USER_PASSWORD"], "Grafana: InfluxDB password"
    assert host_path_for(graf, "/etc/grafana/provisioning/dashboards/edgeprobe.yaml") == PROVIDER
    (provider,) = yaml.safe_load(PROVIDER.read_text())["providers"]
    dash_dir = host_path_for(graf, provider["options"]["path"])
    assert dash_dir == REPO / "grafana" / "dashboards"
    assert len(list(dash_dir.glob("*.json"))) == 5
    for path in dash_dir.glob("*.json"):
        # Provisioning substitutes no ${DS_...} input: every panel, query and variable names the
        # provisioned datasource by its uid (grafana/import/ is the variant for Grafana's Import).
        text = path.read_text(encoding="utf-8")
        assert "${DS_" not in text and "__inputs" not in json.loads(text), path.name
        refs = re.findall(r'"datasource":\s*(\{[^{}]*\})', text)
        assert refs, path.name
        for ref in refs:
            assert json.loads(ref) == {"type": "influxdb", "uid": ds["uid"]}, (path.name, ref)
        panels = [p for p in json.loads(text)["panels"] if p["type"] != "row"]
        assert all(p["datasource"]["uid"] == ds["uid"] for p in panels), path.name
        assert all(t["datasource"]["uid"] == ds["uid"] for p in panels for t in p["targets"]), path.name
    assert host_path_for(graf, genv["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]).is_file()
    for name in ("collector", "grafana"):
        deps = services[name]["depends_on"]
        assert deps["influxdb"] == {"condition": "service_healthy"}, name
    assert services["influxdb"]["healthcheck"]["test"][-1] == f"http://127.0.0.1:{INFLUX_PORT}/ping"


def test_published_ports_are_local_only() -> None:
    for name, svc in compose()["services"].items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)


def compose_config_by_docker(tmp_path: Path) -> dict[str, Any] | None:
    """``docker compose config`` (the plugin), else the legacy ``docker-compose`` 1.x; None if neither."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPROBE_")}
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            out = subprocess.run(
                [docker, "compose", "-f", str(COMPOSE), "config", "--format", "json"],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
                cwd=REPO,
                check=True,
            )
            loaded: dict[str, Any] = json.loads(out.stdout)
            return loaded
    legacy = shutil.which("docker-compose")
    if legacy is not None:
        # 1.x predates the top-level "name" of the Compose Specification; check the rest of the file.
        copy = tmp_path / "docker-compose.yml"
        copy.write_text(re.sub(r"(?m)^name: .*\n", "", COMPOSE.read_text(encoding="utf-8")), encoding="utf-8")
        out = subprocess.run(
            [legacy, "-f", str(copy), "--project-directory", str(REPO), "config"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=REPO,
        )
        assert out.returncode == 0, out.stderr
        legacy_config: dict[str, Any] = yaml.safe_load(out.stdout)
        return legacy_config
    return None


def test_docker_compose_config_agrees(tmp_path: Path) -> None:
    theirs = compose_config_by_docker(tmp_path)
    if theirs is None:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed")
    ours = compose()
    assert set(theirs["services"]) == set(ours["services"])
    for name, svc in ours["services"].items():
        t = theirs["services"][name]
        assert t["image"] == svc["image"], name
        assert {k: str(v) for k, v in (t.get("environment") or {}).items()} == service_env(svc), name
        assert t.get("cap_add", []) == svc.get("cap_add", []) and t.get("cap_drop", []) == svc.get("cap_drop", [])
        assert t.get("entrypoint") == svc.get("entrypoint") and t.get("command") == svc.get("command"), name
    assert set(theirs["volumes"]) == set(ours["volumes"])


# ----- on a real mosquitto ------------------------------------------------------------------------------


def make_passwd(entries: Mapping[str, str], out_dir: Path) -> None:
    """Run the stack's own script, as mosquitto-init does."""
    sh = shutil.which("sh")
    assert sh is not None and find_binary("mosquitto_passwd") is not None, "needs /bin/sh and mosquitto_passwd"
    env = {**os.environ, "EDGEPROBE_MQTT_USERS": "\n".join(f"{u}:{p}" for u, p in entries.items())}
    mosquitto_passwd = find_binary("mosquitto_passwd")
    assert mosquitto_passwd is not None
    env["PATH"] = f"{Path(mosquitto_passwd).parent}:{env.get('PATH', '')}"
    subprocess.run([sh, str(MAKE_PASSWD), str(out_dir), str(ACL)], env=env, check=True, capture_output=True, timeout=60)


@pytest.fixture
def acl_broker(tmp_path: Path) -> Any:
    entries, users = mqtt_entries(compose()), mqtt_users(compose())
    auth = tmp_path / "auth"
    make_passwd(entries, auth)
    assert (auth / "passwd").stat().st_mode & 0o777 == 0o600
    acl = (auth / "acl").read_text()
    assert acl.startswith(ACL.read_text()) and "\nuser fra1-a\ntopic write edgeprobe/v1/fra1/fra1-a/obs\n" in acl
    passwd_lines = (auth / "passwd").read_text().splitlines()
    assert sorted(line.split(":", 1)[0] for line in passwd_lines) == sorted(users)
    assert not any(p in (auth / "passwd").read_text() for p in users.values()), "passwords must be hashed"
    extra = [f"password_file {auth / 'passwd'}", f"acl_file {auth / 'acl'}"]
    extra += [" ".join(w) for w in conf_lines(MOSQUITTO_CONF) if w[0] == "max_queued_messages"]
    server = MosquittoServer(allow_anonymous=False, extra_config=extra).start()
    try:
        yield server, users
    finally:
        server.stop()


def test_make_passwd_refuses_a_bad_entry(tmp_path: Path) -> None:
    env = {**os.environ, "EDGEPROBE_MQTT_USERS": "collector:ok agent-without-password"}
    done = subprocess.run(["sh", str(MAKE_PASSWD), str(tmp_path)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "expected user:password" in done.stderr
    assert not (tmp_path / "passwd").exists()


@pytest.mark.integration
async def test_agent_can_publish_only_under_its_own_id(acl_broker: Any) -> None:
    server, users = acl_broker
    a, b = "fra1-a", "mad1-a"
    own, foreign = obs_topic("edgeprobe", "fra1", a), obs_topic("edgeprobe", "mad1", b)
    received: list[tuple[str, bytes]] = []
    async with aiomqtt.Client(
        server.host,
        server.port,
        username="collector",
        password=users["collector"],
        identifier=f"collector-{uuid.uuid4().hex[:6]}",
    ) as sub:
        await sub.subscribe("edgeprobe/v1/+/+/obs", qos=1)
        async with aiomqtt.Client(server.host, server.port, username=a, password=users[a], identifier=a) as agent:
            # Sent first: had the broker taken it, it would reach the subscriber before the next one.
            await agent.publish(foreign, b"spoofed: A pretending to be B", qos=1)
            # its own id under another site: the generated ACL binds the login to its site
            await agent.publish(obs_topic("edgeprobe", "mad1", a), b"A under site B", qos=1)
            await agent.publish(own, b"from A", qos=1)
            # The collector may read but not write.
            await sub.publish(own, b"collector pretending to be A", qos=1)
            await agent.publish(own, b"from A again", qos=1)

        async def take() -> None:
            async for msg in sub.messages:
                assert isinstance(msg.payload, bytes)
                received.append((str(msg.topic), msg.payload))
                if msg.payload == b"from A again":
                    return

        await asyncio.wait_for(take(), 10)
    assert received == [(own, b"from A"), (own, b"from A again")]

    for username, password in ((a, "wrong"), (None, None), ("nobody", "x")):
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(server.host, server.port, username=username, password=password):
                pass


@pytest.mark.integration
async def test_an_oversized_publish_is_refused(acl_broker: Any) -> None:
    """max_packet_size (deploy/mosquitto/mosquitto.conf, and the tests' brokers): a 2 MiB message
    disconnects its sender and reaches nobody; the next connection's small message does."""
    server, users = acl_broker
    a = "fra1-a"
    own = obs_topic("edgeprobe", "fra1", a)
    received: list[bytes] = []
    async with aiomqtt.Client(
        server.host, server.port, username="collector", password=users["collector"], identifier="collector-size"
    ) as sub:
        await sub.subscribe("edgeprobe/v1/+/+/obs", qos=1)
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(server.host, server.port, username=a, password=users[a], identifier=a) as agent:
                await agent.publish(own, b"x" * (2 * 1024 * 1024), qos=1, timeout=10)
                await agent.publish(own, b"still connected?", qos=1, timeout=10)
        async with aiomqtt.Client(server.host, server.port, username=a, password=users[a], identifier=a) as agent:
            await agent.publish(own, b"after", qos=1)

        async def take() -> None:
            async for msg in sub.messages:
                assert isinstance(msg.payload, bytes)
                received.append(msg.payload)
                if msg.payload == b"after":
                    return

        await asyncio.wait_for(take(), 10)
    assert received == [b"after"], [len(r) for r in received]


@pytest.mark.integration
async def test_real_agent_and_collector_deliver_through_the_acl(
    acl_broker: Any, influxdb: InfluxServer, influx_db: str, tmp_path: Path
) -> None:
    """The stack's usernames on a real agent and collector: status (retained, last will), health and obs pass."""
    from edgeprobe.agent.config import AgentConfig, PublishConfig, build_jobs
    from edgeprobe.agent.daemon import run_agent
    from edgeprobe.collector.config import CollectorConfig
    from edgeprobe.collector.service import run_collector
    from edgeprobe.configfile import convert

    server, users = acl_broker
    publish: dict[str, Any] = {"flush_interval_s": 0.2}
    if "health_interval_s" in PublishConfig.__struct_fields__:
        publish["health_interval_s"] = 0.5
    raw_agent: dict[str, Any] = {
        "agent": {"id": "fra1-a", "site": "fra1"},
        "broker": {"url": server.url, "username": "fra1-a", "password": users["fra1-a"]},
        "publish": publish,
        "jobs": [
            {
                "kind": "tcp",
                "targets": [f"127.0.0.1:{server.port}"],
                "interval_s": 0.5,
                "options": {"count": 1, "timeout_s": 0.2},
            }
        ],
    }
    if "spool" in AgentConfig.__struct_fields__:
        raw_agent["spool"] = {"path": str(tmp_path / "agent.spool.db")}
    acfg = convert(raw_agent, AgentConfig, "acl test")
    raw_col: dict[str, Any] = {
        "broker": {"url": server.url, "username": "collector", "password": users["collector"]},
        "influx": {"api": "v1", "url": influxdb.url, "database": influx_db, "flush_interval_s": 0.2},
    }
    if "spool" in CollectorConfig.__struct_fields__:
        raw_col["spool"] = {"path": str(tmp_path / "collector.spool.sqlite")}
    ccfg = convert(raw_col, CollectorConfig, "acl test")
    produced: list[Any] = []
    cstop, astop = asyncio.Event(), asyncio.Event()
    collector_ready, agent_ready = asyncio.Event(), asyncio.Event()
    ctask = asyncio.create_task(run_collector(ccfg, stop=cstop, on_ready=collector_ready.set))
    await asyncio.wait_for(collector_ready.wait(), 20)  # subscribed through the ACL
    atask = asyncio.create_task(
        run_agent(acfg, build_jobs(acfg, "acl test"), stop=astop, tap=produced.append, on_ready=agent_ready.set)
    )
    await asyncio.wait_for(agent_ready.wait(), 20)  # connected, its retained online status published
    await wait_for_async(lambda: len(produced) >= 3, 20, "three observations produced")
    astop.set()
    await asyncio.wait_for(atask, 20)

    def count() -> int:
        rows = influxdb.rows('SELECT count("seq") FROM "edgeprobe_tcp"', influx_db)
        return int(rows[0]["count"]) if rows else 0

    got = await wait_for_async(
        lambda: asyncio.to_thread(count),
        20,
        f"all {len(produced)} observations in InfluxDB",
        until=lambda n: n >= len(produced),
        interval_s=0.2,
    )
    cstop.set()
    await asyncio.wait_for(ctask, 20)
    assert produced and got == len(produced)
    agents = await asyncio.to_thread(
        influxdb.rows, 'SHOW TAG VALUES FROM "edgeprobe_tcp" WITH KEY = "agent"', influx_db
    )
    assert [r["value"] for r in agents] == ["fra1-a"]
    # its retained status message went through the ACL too (the broker kept it)
    async with aiomqtt.Client(server.host, server.port, username="collector", password=users["collector"]) as sub:
        await sub.subscribe(status_topic("edgeprobe", "fra1", "fra1-a"), qos=1)
        msg = await asyncio.wait_for(anext(aiter(sub.messages)), 10)
        assert isinstance(msg.payload, bytes) and json.loads(msg.payload)["agent"] == "fra1-a"
