"""The fleet against a real mosquitto with the shipped ACL (deploy/mosquitto/acl), passwords and TLS
(a CA and server certificate made here with the openssl CLI): presence, ad-hoc requests across
agents, central configuration, and the attacks (spoofing, unsigned/expired/replayed/tampered
commands, policy-violating targets, budget exhaustion). Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import pytest
import yaml

from edgeprobe.agent.config import AgentConfig, build_jobs
from edgeprobe.agent.control import AdhocCommand, ConfigDocument
from edgeprobe.agent.daemon import AgentHandles, run_agent
from edgeprobe.collector.config import CollectorConfig
from edgeprobe.collector.service import run_collector
from edgeprobe.configfile import convert
from edgeprobe.fleet import fleet_probe, publish_documents, read_statuses
from edgeprobe.localstack import MosquittoServer, find_binary, free_port
from edgeprobe.mqtt import BrokerConfig
from edgeprobe.schema import (
    CommandReply,
    Observation,
    Status,
    cmd_topic,
    group_config_topic,
    result_topic,
    status_topic,
)
from edgeprobe.signing import SignedMessage, generate_key, load_private_key, sign, stamp
from tests.support.paths import REPO
from tests.support.wait import wait_for_async

pytestmark = pytest.mark.integration

ACL = REPO / "deploy" / "mosquitto" / "acl"
MAKE_PASSWD = REPO / "deploy" / "mosquitto" / "make-passwd.sh"
AGENTS = {"a1": ("s1", {"tier": "pop"}), "a2": ("s2", {"tier": "pop"}), "a3": ("s3", {"tier": "pop"})}
LOOPBACK_ONLY = {"allow_cidrs": ["127.0.0.0/8", "::1/128"]}


def login_entry(user: str) -> str:
    """``user`` as an EDGEPROBE_MQTT_USERS entry: ``site/agent`` for an agent."""
    if user in ("controller", "collector"):
        return user
    return f"{AGENTS.get(user, ('s9', {}))[0]}/{user}"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all EC P-256."""
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key", cwd=d)
    openssl(
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-days",
        "2",
        "-subj",
        "/CN=edgeprobe test CA",
        "-out",
        "ca.pem",
        cwd=d,
    )
    # the client certificate's CN is an agent id: the broker takes it as the username (ACL %u)
    for name, cn, ext in (
        ("server", "server", "subjectAltName=IP:127.0.0.1"),
        ("client", "a4", "extendedKeyUsage=clientAuth"),
    ):
        openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=d)
        openssl("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={cn}", "-out", f"{name}.csr", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d,
        )  # fmt: skip


@dataclass
class Fleet:
    server: MosquittoServer
    url: str
    cert_url: str
    dir: Path
    passwords: dict[str, str]
    key_file: Path
    pub_file: Path

    def broker_dict(self, user: str) -> dict[str, Any]:
        return {
            "url": self.url,
            "username": user,
            "password": self.passwords[user],
            "tls_ca_file": str(self.dir / "ca.pem"),
        }

    def broker(self, user: str) -> BrokerConfig:
        return convert({**self.broker_dict(user), "client_id": f"{user}-{uuid.uuid4().hex[:8]}"}, BrokerConfig, "t")

    def agent_cfg(self, agent: str, *, jobs: list[dict[str, Any]] | None = None, **sections: Any) -> dict[str, Any]:
        site, labels = AGENTS.get(agent, ("s9", {}))
        b = self.broker_dict(agent)
        return {
            "agent": {"id": agent, "site": site, "labels": labels},
            "broker": b,
            "publish": {"flush_interval_s": 0.2, "status_interval_s": 1},
            "spool": {"path": None},
            "control": {"public_key_file": str(self.pub_file), "accept_commands": True, "accept_config": True},
            "policy": LOOPBACK_ONLY,
            "jobs": jobs or [],
            **sections,
        }

    def client(self, user: str) -> aiomqtt.Client:
        return aiomqtt.Client(**self.broker(user).client_kwargs(user))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Any:
    if shutil.which("openssl") is None or find_binary("mosquitto_passwd") is None:
        pytest.skip("needs openssl and mosquitto_passwd")
    d = tmp_path_factory.mktemp("fleet")
    make_certs(d)
    users = ["controller", "collector", *AGENTS, "a4", "a5"]
    passwords = {u: secrets.token_hex(8) for u in users}
    env = {
        **os.environ,
        # agents as site/agent: make-passwd.sh binds each agent's login to its site in the ACL
        "EDGEPROBE_MQTT_USERS": "\n".join(f"{login_entry(u)}:{p}" for u, p in passwords.items()),
        "PATH": f"{Path(find_binary('mosquitto_passwd') or '').parent}:{os.environ.get('PATH', '')}",
    }
    auth = d / "auth"
    subprocess.run(["sh", str(MAKE_PASSWD), str(auth), str(ACL)], env=env, check=True, capture_output=True, timeout=60)
    generate_key(d / "controller.key", d / "controller.pub")
    extra = [
        f"cafile {d / 'ca.pem'}",
        f"certfile {d / 'server.pem'}",
        f"keyfile {d / 'server.key'}",
        f"password_file {auth / 'passwd'}",
        f"acl_file {auth / 'acl'}",
    ]
    cert_port = free_port()
    extra += [  # a second listener where the client certificate is the identity (no password)
        f"listener {cert_port} 127.0.0.1",
        f"cafile {d / 'ca.pem'}",
        f"certfile {d / 'server.pem'}",
        f"keyfile {d / 'server.key'}",
        "require_certificate true",
        "use_identity_as_username true",
    ]
    server = MosquittoServer(allow_anonymous=False, extra_config=extra).start()
    try:
        yield Fleet(
            server=server,
            url=f"mqtts://127.0.0.1:{server.port}",
            cert_url=f"mqtts://127.0.0.1:{cert_port}",
            dir=d,
            passwords=passwords,
            key_file=d / "controller.key",
            pub_file=d / "controller.pub",
        )
    finally:
        server.stop()


@dataclass
class Running:
    handles: AgentHandles
    stop: asyncio.Event
    task: asyncio.Task[AgentHandles]
    seen: list[Observation]
    ready: asyncio.Event  # set by run_agent's on_ready: online, control channel subscribed


@pytest.fixture
async def agents() -> AsyncIterator[Callable[[dict[str, Any]], Any]]:
    """Start in-process agents; all stopped at the end."""
    running: list[Running] = []

    async def start(raw: dict[str, Any]) -> Running:
        cfg = convert(raw, AgentConfig, "test")
        seen: list[Observation] = []
        stop = asyncio.Event()
        started: asyncio.Future[AgentHandles] = asyncio.get_running_loop().create_future()
        ready = asyncio.Event()
        task = asyncio.create_task(
            run_agent(cfg, build_jobs(cfg, "test"), stop=stop, started=started, tap=seen.append, on_ready=ready.set)
        )
        r = Running(await asyncio.wait_for(started, 10), stop, task, seen, ready)
        running.append(r)
        return r

    yield start
    for r in running:
        r.stop.set()
    await asyncio.gather(*(asyncio.wait_for(r.task, 20) for r in running), return_exceptions=True)


async def wait_until(cond: Callable[[], Any], timeout_s: float = 15.0, what: str = "condition") -> Any:
    return await wait_for_async(cond, timeout_s, what, interval_s=0.1)


async def statuses(fleet: Fleet) -> dict[str, Status]:
    return {s.agent: s for s in await read_statuses(fleet.broker("controller"), quiet_s=0.3)}


async def control_up(r: Running) -> None:
    c = r.handles.control
    assert c is not None
    await wait_until(r.ready.is_set, what="the agent ready: online, control channel subscribed")
    assert c._client is not None


def listener() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s, s.getsockname()[1]


def cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeprobe.cli", *args], capture_output=True, text=True, timeout=timeout_s, cwd=REPO
    )


# ---------------------------------------------------------------------- TLS


async def test_tls_server_verification_is_on_by_default(fleet: Fleet) -> None:
    no_ca = convert({k: v for k, v in fleet.broker_dict("a1").items() if k != "tls_ca_file"}, BrokerConfig, "t")
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(**no_ca.client_kwargs("a1-no-ca")):
            pass
    lab = msgspec.structs.replace(no_ca, tls_insecure=True)  # labs only: no verification
    async with aiomqtt.Client(**lab.client_kwargs("a1-insecure")):
        pass


async def test_client_certificate_identity(fleet: Fleet, agents: Any) -> None:
    """An agent logs in with a client certificate (CN=a4) instead of a password; the ACL applies to it."""
    d = fleet.dir
    broker = {"url": fleet.cert_url, "tls_ca_file": str(d / "ca.pem"),
              "tls_cert_file": str(d / "client.pem"), "tls_key_file": str(d / "client.key")}  # fmt: skip
    raw = fleet.agent_cfg("a4")
    raw["broker"] = broker
    await agents(raw)

    async def online() -> bool:
        s = (await statuses(fleet)).get("a4")
        return s is not None and s.state == "online"

    await wait_until(online, 15, "a4 online via its certificate")
    got: list[bytes] = []
    async with fleet.client("collector") as col:
        await col.subscribe("edgeprobe/v1/+/+/obs", qos=1)
        cert = convert({**broker, "client_id": "a4-spoof"}, BrokerConfig, "t")
        async with aiomqtt.Client(**cert.client_kwargs("a4-spoof")) as evil:
            await evil.publish("edgeprobe/v1/s1/a1/obs", b"spoofed", qos=1)
            await evil.publish("edgeprobe/v1/s9/a4/obs", b"own", qos=1)

        async def take() -> None:
            async for msg in col.messages:
                got.append(bytes(msg.payload))  # type: ignore[arg-type]
                if msg.payload == b"own":
                    return

        await asyncio.wait_for(take(), 10)
    assert b"spoofed" not in got
    # without a certificate that listener refuses the connection
    no_cert = convert({"url": fleet.cert_url, "tls_ca_file": str(d / "ca.pem")}, BrokerConfig, "t")
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(**no_cert.client_kwargs("nocert")):
            pass


# ---------------------------------------------------------------------- presence


async def test_fleet_ls_shows_agents_and_a_killed_one_offline(fleet: Fleet, agents: Any, tmp_path: Path) -> None:
    for a in ("a1", "a2"):
        await agents(fleet.agent_cfg(a))
    # a3 as a real process, to be killed with SIGKILL (no clean disconnect: the broker sends its will)
    cfg3 = tmp_path / "a3.yaml"
    cfg3.write_text(yaml.safe_dump(fleet.agent_cfg("a3")))
    proc = subprocess.Popen([sys.executable, "-m", "edgeprobe.cli", "agent", "run", "--config", str(cfg3)], cwd=REPO)
    fleet_yaml = tmp_path / "fleet.yaml"
    fleet_yaml.write_text(yaml.safe_dump({"broker": fleet.broker_dict("controller")}))
    try:

        async def all_online() -> bool:
            st = await statuses(fleet)
            return all(a in st and st[a].state == "online" for a in AGENTS)

        await wait_until(all_online, 30, "three agents online")
        done = await asyncio.to_thread(cli, "fleet", "ls", "--config", str(fleet_yaml), "--json")
        assert done.returncode == 0, done.stderr
        rows = {r["agent"]: r for r in json.loads(done.stdout)}
        assert {a: rows[a]["state"] for a in AGENTS} == {a: "online" for a in AGENTS}
        assert rows["a2"]["site"] == "s2" and rows["a2"]["labels"] == {"tier": "pop"}
        assert rows["a1"]["accepts_commands"] is True and "icmp" in rows["a1"]["kinds"]
        assert isinstance(rows["a1"]["icmp_permitted"], bool)
        assert rows["a1"]["age_s"] < 30
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

        async def a3_offline() -> bool:
            return (await statuses(fleet))["a3"].state == "offline"

        await wait_until(a3_offline, 30, "a3 offline (last will)")
        done = await asyncio.to_thread(cli, "fleet", "ls", "--config", str(fleet_yaml), "--where", "site=s3", "--json")
        assert [(r["agent"], r["state"]) for r in json.loads(done.stdout)] == [("a3", "offline")]
        table = await asyncio.to_thread(cli, "fleet", "ls", "--config", str(fleet_yaml))
        assert "offline" in table.stdout and "online" in table.stdout, table.stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# ---------------------------------------------------------------------- ad-hoc requests


async def test_fleet_probe_across_three_agents_live_and_in_influxdb(
    fleet: Fleet, agents: Any, influxdb: Any, influx_db: str, tmp_path: Path
) -> None:
    ccfg = convert(
        {
            "broker": {**fleet.broker_dict("collector"), "client_id": f"collector-{influx_db}"},
            "influx": {"api": "v1", "url": influxdb.url, "database": influx_db, "flush_interval_s": 0.2},
            "spool": {"path": str(tmp_path / "collector.sqlite")},
        },
        CollectorConfig,
        "test",
    )
    collector_stop = asyncio.Event()
    collector = asyncio.create_task(run_collector(ccfg, stop=collector_stop))
    sock, port = listener()
    try:
        runs = [await agents(fleet.agent_cfg(a)) for a in AGENTS]
        for r in runs:
            await control_up(r)
        await wait_until(lambda: statuses(fleet), what="statuses")
        live: list[tuple[float, str]] = []
        t0 = time.monotonic()
        run = await fleet_probe(
            fleet.broker("controller"),
            load_private_key(fleet.key_file),
            "tcp",
            f"127.0.0.1:{port}",
            {"count": 2, "interval_s": 0.05, "timeout_s": 1.0},
            where={"tier": "pop"},
            timeout_s=20,
            on_reply=lambda _run, rep: live.append((time.monotonic() - t0, rep.agent)),
        )
        assert sorted(s.agent for s in run.asked) == sorted(AGENTS)
        assert sorted(a for _, a in live) == sorted(AGENTS), "each reply streamed as it arrived"
        assert all(r.status == "ok" and r.observation and r.observation.outcome == "ok" for r in run.replies.values())
        summary = run.summary()
        assert summary["answered"] == 3 and summary["measured"] == 3 and summary["missing"] == []
        assert summary["min"] <= summary["median"] <= summary["max"]
        print(f"\nfleet probe: replies at {[round(t, 2) for t, _ in live]} s; summary {summary}")

        # …and through the normal path into InfluxDB, tagged job=adhoc and request_id
        q = f"SELECT * FROM edgeprobe_tcp WHERE request_id = '{run.request_id}'"

        def in_influx() -> list[dict[str, Any]] | None:
            got = influxdb.rows(q, influx_db)
            return got if len(got) >= 3 else None

        got = await wait_until(lambda: asyncio.to_thread(in_influx), 20, "ad-hoc rows in InfluxDB")
        assert sorted(r["agent"] for r in got) == sorted(AGENTS)
        assert {r["job"] for r in got} == {"adhoc"}

        # --agents caps and spreads; an agent that never answers is listed
        runs[2].stop.set()
        await asyncio.wait_for(runs[2].task, 20)
        # a3 stopped: pretend it is still online, to see it listed as never answering
        st = [msgspec.structs.replace(s, state="online") for s in (await statuses(fleet)).values() if s.agent in AGENTS]
        run2 = await fleet_probe(
            fleet.broker("controller"),
            load_private_key(fleet.key_file),
            "tcp",
            f"127.0.0.1:{port}",
            {"count": 1, "timeout_s": 1.0},
            timeout_s=8,
            statuses=st,
        )
        assert sorted(run2.replies) == ["a1", "a2"] and run2.missing == ["a3"]
    finally:
        sock.close()
        collector_stop.set()
        await asyncio.wait_for(collector, 20)


async def test_fleet_probe_inference(fleet: Fleet, agents: Any) -> None:
    """An ad-hoc inference request across two agents, against the local responder."""
    from edgeprobe.responder import ResponderSettings, serve_responder

    settings = ResponderSettings(ttft_ms=20, token_interval_ms=5, tokens=6, seed=3, keepalive_interval_ms=100)
    async with serve_responder("127.0.0.1", 0, settings, shutdown_timeout_s=0.3) as responder:
        for a in ("a1", "a2"):
            await control_up(await agents(fleet.agent_cfg(a)))
        run = await fleet_probe(
            fleet.broker("controller"),
            load_private_key(fleet.key_file),
            "inference",
            responder.url,
            {"model": "m", "max_tokens": 6, "timeout_s": 5.0},
            where={"tier": "pop"},
            limit=2,
            timeout_s=20,
        )
    assert sorted(run.replies) == ["a1", "a2"]
    for reply in run.replies.values():
        assert reply.observation is not None and reply.observation.outcome == "ok", reply
    assert run.summary()["field"] == "ttft_ms" and run.summary()["measured"] == 2


async def test_fleet_probe_cli_json(fleet: Fleet, agents: Any, tmp_path: Path) -> None:
    sock, port = listener()
    try:
        r = await agents(fleet.agent_cfg("a1"))
        await control_up(r)
        fleet_yaml = tmp_path / "fleet.yaml"
        fleet_yaml.write_text(
            yaml.safe_dump({"broker": fleet.broker_dict("controller"), "key_file": str(fleet.key_file)})
        )
        args = ["fleet", "probe", "tcp", f"127.0.0.1:{port}", "-o", "count=1", "--where", "agent=a1", "--timeout", "15"]
        done = await asyncio.to_thread(cli, *args, "--config", str(fleet_yaml), "--json")
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        assert out["summary"]["answered"] == 1 and out["replies"][0]["agent"] == "a1"
        table = await asyncio.to_thread(cli, *args, "--config", str(fleet_yaml))
        assert table.returncode == 0, table.stderr
        assert "a1" in table.stdout and "connect_ms: min" in table.stdout, table.stdout
    finally:
        sock.close()


# ---------------------------------------------------------------------- central configuration


async def test_central_config_applies_live_and_a_broken_one_is_refused(fleet: Fleet, agents: Any) -> None:
    s1, port1 = listener()
    s2, port2 = listener()
    key = load_private_key(fleet.key_file)
    topic = group_config_topic("edgeprobe", f"mesh-{uuid.uuid4().hex[:6]}")
    ctl = fleet.broker("controller")

    def doc(jobs: list[dict[str, Any]], where: dict[str, str] | None = None) -> ConfigDocument:
        return ConfigDocument(**stamp(600), topic=topic, where=where or {"tier": "pop"}, jobs=jobs)

    def tcp_job(port: int) -> dict[str, Any]:
        return {"name": "mesh", "kind": "tcp", "targets": [f"127.0.0.1:{port}"], "interval_s": 1.0,
                "options": {"count": 1, "timeout_s": 0.3}}  # fmt: skip

    try:
        r = await agents(
            fleet.agent_cfg("a1", jobs=[{"kind": "tcp", "targets": [f"127.0.0.1:{port2}"], "interval_s": 30}])
        )
        await control_up(r)
        t0 = time.monotonic()
        await publish_documents(ctl, key, [doc([tcp_job(port1)])])
        await wait_until(lambda: any(o.job == "mesh" and o.target.endswith(f":{port1}") for o in r.seen), 15, "mesh")
        print(f"\ncentral config: first mesh observation {time.monotonic() - t0:.2f} s after publishing")

        async def st() -> Status:
            return (await statuses(fleet))["a1"]

        await wait_until(lambda: _docs(st), 10, "config_docs in the status")

        # broken: interval shorter than one run may take (the file's own rule) → refused, old kept
        bad = tcp_job(port2) | {"interval_s": 0.1, "options": {"count": 5, "timeout_s": 2}}
        await publish_documents(ctl, key, [doc([bad])])
        c = r.handles.control
        assert c is not None
        await wait_until(lambda: c.config_error, 10, "config error")
        assert "interval_s" in (c.config_error or "")
        n = len(r.seen)
        await wait_until(lambda: any(o.job == "mesh" for o in r.seen[n:]), 10, "old mesh still running")
        assert all(o.target.endswith(f":{port1}") for o in r.seen[n:] if o.job == "mesh")
        status = await wait_until(lambda: _error(st), 10, "config_error in the status")
        assert "interval_s" in (status.config_error or "") and status.refusals.get("config_invalid") == 1

        # unknown kind, also refused
        await publish_documents(ctl, key, [doc([tcp_job(port2) | {"kind": "nope"}])])
        await wait_until(lambda: c.refusals["config_invalid"] == 2, 10, "second refusal")

        # a good change replaces the old one
        await publish_documents(ctl, key, [doc([tcp_job(port2)])])
        await wait_until(lambda: any(o.job == "mesh" and o.target.endswith(f":{port2}") for o in r.seen), 15, "new")
        assert c.config_error is None
        # no longer matching the agent's labels: the document is dropped
        await publish_documents(ctl, key, [doc([tcp_job(port2)], where={"tier": "core"})])
        await wait_until(lambda: c.central_scheduler is None and not c.docs, 10, "dropped")
    finally:
        s1.close()
        s2.close()
        async with fleet.client("controller") as client:
            await client.publish(topic, b"", qos=1, retain=True)


async def _docs(st: Callable[[], Any]) -> bool:
    return bool((await st()).config_docs)


async def _error(st: Callable[[], Any]) -> Any:
    s = await st()
    return s if s.config_error else None


async def test_fleet_apply_cli(fleet: Fleet, agents: Any, tmp_path: Path) -> None:
    sock, port = listener()
    try:
        r = await agents(fleet.agent_cfg("a2"))
        await control_up(r)
        name = f"pop-mesh-{uuid.uuid4().hex[:6]}"
        mesh = {
            "groups": {"endpoints": [f"127.0.0.1:{port}"]},
            "rules": [{"name": name, "where": {"tier": "pop", "site": "s2"}, "kind": "tcp", "targets": "endpoints",
                       "interval_s": 1.0, "options": {"count": 1, "timeout_s": 0.3}}],
        }  # fmt: skip
        (tmp_path / "mesh.yaml").write_text(yaml.safe_dump(mesh))
        (tmp_path / "fleet.yaml").write_text(yaml.safe_dump({"broker": fleet.broker_dict("controller")}))
        env = {"EDGEPROBE_CONTROLLER_KEY_FILE": str(fleet.key_file)}
        done = await asyncio.to_thread(
            lambda: subprocess.run(
                [sys.executable, "-m", "edgeprobe.cli", "fleet", "apply", str(tmp_path / "mesh.yaml"),
                 "--config", str(tmp_path / "fleet.yaml")],
                capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, **env},
            )
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        await wait_until(lambda: any(o.job == name for o in r.seen), 15, "mesh rule running")
        # a bad mesh is refused by the CLI before anything is published
        mesh["rules"][0]["interval_s"] = 0.01
        (tmp_path / "mesh.yaml").write_text(yaml.safe_dump(mesh))
        bad = await asyncio.to_thread(cli, "fleet", "apply", str(tmp_path / "mesh.yaml"), "--dry-run")
        assert bad.returncode == 2 and "interval_s" in bad.stderr
        # fleet clear: a signed empty document stops the rule's jobs
        cleared = await asyncio.to_thread(
            lambda: subprocess.run(
                [sys.executable, "-m", "edgeprobe.cli", "fleet", "clear", "--group", name,
                 "--config", str(tmp_path / "fleet.yaml")],
                capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, **env},
            )
        )  # fmt: skip
        assert cleared.returncode == 0, cleared.stderr
        c = r.handles.control
        assert c is not None
        await wait_until(lambda: c.central_scheduler is None and not c.central_jobs, 10, "rule cleared")
    finally:
        sock.close()
        async with fleet.client("controller") as client:
            await client.publish(group_config_topic("edgeprobe", name), b"", qos=1, retain=True)


# ---------------------------------------------------------------------- attacks


async def ask(fleet: Fleet, agent: str, payload: bytes, rid: str, user: str = "controller") -> CommandReply | None:
    """Publish ``payload`` to the agent's command topic as ``user``; the reply, or None."""
    site = AGENTS.get(agent, ("s9", {}))[0]
    async with fleet.client("controller") as watcher:
        await watcher.subscribe(result_topic("edgeprobe", rid, agent), qos=1)
        async with fleet.client(user) as client:
            await client.publish(cmd_topic("edgeprobe", site, agent), payload, qos=1)
        try:
            async with asyncio.timeout(5):
                async for msg in watcher.messages:
                    return msgspec.json.decode(bytes(msg.payload), type=CommandReply)  # type: ignore[arg-type]
        except TimeoutError:
            return None
    return None


def command(
    agent: str, target: str, kind: str = "tcp", ttl_s: float = 60, now_ns: int | None = None, **opts: Any
) -> AdhocCommand:
    return AdhocCommand(
        **stamp(ttl_s, now_ns), request_id=uuid.uuid4().hex, agent=agent, kind=kind, target=target, options=opts
    )


async def refused(fleet: Fleet, r: Running, payload: bytes, rid: str, code: str) -> CommandReply:
    reply = await ask(fleet, "a1", payload, rid)
    assert reply is not None and reply.status == "refused" and reply.code == code, reply
    c = r.handles.control
    assert c is not None and c.refusals[code] >= 1
    st = await wait_until(lambda: _refusal(fleet, code), 10, f"refusal {code} in the status")
    assert st.last_refusal and st.last_refusal.startswith(code)
    return reply


async def _refusal(fleet: Fleet, code: str) -> Status | None:
    s = (await statuses(fleet)).get("a1")
    return s if s is not None and s.refusals.get(code) else None


@pytest.fixture
async def a1(fleet: Fleet, agents: Any) -> Running:
    r: Running = await agents(fleet.agent_cfg("a1", policy={**LOOPBACK_ONLY, "inference_tokens_per_hour": 40}))
    await control_up(r)
    return r


async def test_attack_agent_cannot_publish_as_another_agent(fleet: Fleet, a1: Running) -> None:
    """a2 (valid login) tries a1's status, observations and an answer in a1's name: the broker drops them."""
    got: list[str] = []
    rid = uuid.uuid4().hex
    async with fleet.client("controller") as ctl, fleet.client("collector") as col:
        await ctl.subscribe(f"edgeprobe/v1/results/{rid}/+", qos=1)
        await col.subscribe("edgeprobe/v1/+/+/obs", qos=1)
        async with fleet.client("a2") as evil:
            await evil.publish(status_topic("edgeprobe", "s1", "a1"), b'{"v":1,"agent":"a1"}', qos=1, retain=True)
            await evil.publish("edgeprobe/v1/s1/a1/obs", b"spoofed", qos=1)
            await evil.publish(result_topic("edgeprobe", rid, "a1"), b"spoofed", qos=1)
            await evil.publish(result_topic("edgeprobe", rid, "a2"), b"own answer", qos=1)  # allowed: as itself
            await evil.publish("edgeprobe/v1/s2/a2/obs", b"own obs", qos=1)

        async def take(client: aiomqtt.Client, last: bytes) -> None:
            async for msg in client.messages:
                got.append(f"{msg.topic}={bytes(msg.payload).decode()}")  # type: ignore[arg-type]
                if msg.payload == last:
                    return

        await asyncio.wait_for(take(ctl, b"own answer"), 10)
        await asyncio.wait_for(take(col, b"own obs"), 10)
    assert not any("spoofed" in g for g in got), got
    assert (await statuses(fleet))["a1"].state == "online"  # the retained status is still a1's own


async def test_attack_agent_cannot_issue_commands_or_config(fleet: Fleet, a1: Running) -> None:
    """a2 holds a valid login but not the controller's: even a validly signed command is dropped by the
    broker (the ACL), and a2 can neither write nor read another agent's command/config topics."""
    key = load_private_key(fleet.key_file)
    cmd = command("a1", "127.0.0.1:9")
    assert await ask(fleet, "a1", sign(cmd, "cmd", key), cmd.request_id, user="a2") is None
    c = a1.handles.control
    assert c is not None and sum(c.refusals.values()) == 0  # never reached the agent
    # …while the same signed bytes from the controller do arrive (the test's own control)
    cmd2 = command("a1", "127.0.0.1:9", count=1, timeout_s=0.3)
    reply = await ask(fleet, "a1", sign(cmd2, "cmd", key), cmd2.request_id)
    assert reply is not None and reply.status == "ok"


async def test_attack_unsigned_command(fleet: Fleet, a1: Running) -> None:
    cmd = command("a1", "127.0.0.1:9")
    reply = await refused(fleet, a1, msgspec.json.encode(cmd), cmd.request_id, "unsigned")
    assert "not a signed message" in (reply.reason or "")


async def test_attack_expired_command(fleet: Fleet, a1: Running) -> None:
    cmd = command("a1", "127.0.0.1:9", ttl_s=5, now_ns=time.time_ns() - 60 * 10**9)
    reply = await refused(fleet, a1, sign(cmd, "cmd", load_private_key(fleet.key_file)), cmd.request_id, "expired")
    assert "expired" in (reply.reason or "")


async def test_attack_replayed_command(fleet: Fleet, a1: Running) -> None:
    cmd = command("a1", "127.0.0.1:9", count=1, timeout_s=0.3)
    raw = sign(cmd, "cmd", load_private_key(fleet.key_file))
    first = await ask(fleet, "a1", raw, cmd.request_id)
    assert first is not None and first.status == "ok"
    await refused(fleet, a1, raw, cmd.request_id, "replayed")


async def test_attack_tampered_command(fleet: Fleet, a1: Running) -> None:
    cmd = command("a1", "127.0.0.1:9", count=1)
    msg = msgspec.json.decode(sign(cmd, "cmd", load_private_key(fleet.key_file)), type=SignedMessage)
    evil = msgspec.structs.replace(msg, payload=msg.payload.replace('"count":1', '"count":10000'))
    assert evil.payload != msg.payload
    await refused(fleet, a1, msgspec.json.encode(evil), cmd.request_id, "bad_signature")


async def test_attack_command_for_another_agent(fleet: Fleet, a1: Running) -> None:
    cmd = command("a2", "127.0.0.1:9")  # signed for a2, delivered to a1's topic
    await refused(fleet, a1, sign(cmd, "cmd", load_private_key(fleet.key_file)), cmd.request_id, "wrong_agent")


async def test_attack_policy_violating_target(fleet: Fleet, agents: Any) -> None:
    """An agent with the default policy refuses loopback (tests may not aim anywhere else)."""
    r = await agents(fleet.agent_cfg("a1", policy={}))
    await control_up(r)
    cmd = command("a1", "127.0.0.1:9")
    reply = await refused(
        fleet, r, sign(cmd, "cmd", load_private_key(fleet.key_file)), cmd.request_id, "policy_loopback"
    )
    assert "loopback" in (reply.reason or "")
    assert not any(o.job == "adhoc" for o in r.seen)  # nothing was probed


async def test_attack_too_many_packets(fleet: Fleet, a1: Running) -> None:
    cmd = command("a1", "127.0.0.1", kind="icmp", count=1000)
    await refused(fleet, a1, sign(cmd, "cmd", load_private_key(fleet.key_file)), cmd.request_id, "too_many_packets")


async def test_an_adhoc_trace_is_charged_every_probe_it_may_send(fleet: Fleet, a1: Running) -> None:
    """The trace kind under the target policy: max_hops × queries packets against
    policy.max_packets_per_request (10 here): 3 × 3 runs (loopback is one hop), 30 × 3 is refused."""
    key = load_private_key(fleet.key_file)
    cmd = command("a1", "127.0.0.1", kind="trace", max_hops=3, queries=3, timeout_s=0.5)
    reply = await ask(fleet, "a1", sign(cmd, "cmd", key), cmd.request_id)
    assert reply is not None and reply.status == "ok" and reply.observation is not None, reply
    obs = reply.observation
    assert obs.kind == "trace" and obs.outcome == "ok", obs
    assert obs.fields["reached"] is True and obs.fields["hop_count"] == 1 and obs.fields["hop_addresses"] == "127.0.0.1"
    cmd = command("a1", "127.0.0.1", kind="trace", max_hops=30)
    await refused(fleet, a1, sign(cmd, "cmd", key), cmd.request_id, "too_many_packets")
    status = (await statuses(fleet))["a1"]
    assert status.raw_permitted is (os.geteuid() == 0) and "trace" in status.kinds  # fleet ls: trace(no raw socket)


async def test_attack_inference_budget_exhaustion(fleet: Fleet, a1: Running) -> None:
    """Budget 40 tokens/hour, 16 per request: two run (against a closed port), the third is refused."""
    key = load_private_key(fleet.key_file)
    opts = {"model": "m", "max_tokens": 16, "timeout_s": 1.0}
    for i in range(2):
        cmd = command("a1", f"http://127.0.0.{i + 2}:9/v1/chat/completions", kind="inference", **opts)
        reply = await ask(fleet, "a1", sign(cmd, "cmd", key), cmd.request_id)
        assert reply is not None and reply.status == "ok", reply
    cmd = command("a1", "http://127.0.0.4:9/v1/chat/completions", kind="inference", **opts)
    reply = await refused(fleet, a1, sign(cmd, "cmd", key), cmd.request_id, "token_budget")
    assert "32 of 40" in (reply.reason or "")
