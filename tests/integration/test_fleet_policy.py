"""The agent's local policy holds whatever the controller sends (issue 12, items 8, 9, 12, 17), on a
real mosquitto with the shipped ACL (the fixtures of test_fleet.py): signed central documents whose
targets or rate the policy refuses are refused whole, also after a restart; remote requests read
only the environment variables the owner listed, never the agent's own broker password; a redirect
to a refused address is not followed; a key in a URL's query reaches neither MQTT nor InfluxDB.
Traffic goes to 127.0.0.1 and 127.0.0.2 only.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from edgeprobe.agent.control import ConfigDocument, Control
from edgeprobe.collector.config import CollectorConfig
from edgeprobe.collector.lineproto import encode_observation
from edgeprobe.collector.service import run_collector
from edgeprobe.configfile import convert
from edgeprobe.fleet import publish_documents
from edgeprobe.probes.registry import KINDS
from edgeprobe.schema import group_config_topic, result_topic
from edgeprobe.signing import load_private_key, sign, stamp
from tests.integration.test_fleet import (
    Fleet,
    Running,
    agents,
    ask,
    command,
    control_up,
    fleet,
    listener,
    refused,
    statuses,
    wait_until,
)
from tests.integration.test_probe_address_check import Seen, http_server
from tests.support.paths import REPO

pytestmark = pytest.mark.integration
__all__ = ["agents", "fleet"]  # fixtures, used by name

ONLY_127_0_0_1 = {"allow_cidrs": ["127.0.0.1/32"]}


def accepted(sock: socket.socket) -> int:
    """Connections waiting in ``sock``'s accept queue (a probe's closed ones stay there), taken."""
    sock.setblocking(False)
    n = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


def tcp_job(name: str, targets: list[str], interval_s: float = 1.0, **options: Any) -> dict[str, Any]:
    return {"name": name, "kind": "tcp", "targets": targets, "interval_s": interval_s,
            "options": {"count": 1, "timeout_s": 0.3} | options}  # fmt: skip


def ctl_of(r: Running) -> Control:
    c = r.handles.control
    assert c is not None
    return c


async def clear(fleet: Fleet, topic: str) -> None:
    async with fleet.client("controller") as client:
        await client.publish(topic, b"", qos=1, retain=True)


# ---------------------------------------------------------------------- item 8: central configuration


async def test_a_central_document_the_policy_refuses_never_runs_not_even_after_a_restart(
    fleet: Fleet, agents: Any
) -> None:
    """The report: one signed retained group document drove TCP connects to 127.0.0.1 on an agent
    whose policy refuses 127.0.0.1 ad hoc, and survived restarts. Now the document is refused whole,
    with its reasons in the status; the owner's file job to the same address still runs (file jobs
    are exempt by default) and is the clock: by its second run after the refusal, a central job
    with the same interval would have run."""
    central_sock, central_port = listener()
    file_sock, file_port = listener()
    topic = group_config_topic("edgeprobe", f"flood-{uuid.uuid4().hex[:6]}")
    raw = fleet.agent_cfg(
        "a2", policy={}, jobs=[tcp_job("own", [f"127.0.0.1:{file_port}"])]
    )  # default policy: loopback refused
    key = load_private_key(fleet.key_file)
    try:
        r = await agents(raw)
        await control_up(r)
        doc = ConfigDocument(**stamp(600), topic=topic, where={"agent": "a2"},
                             jobs=[tcp_job("flood", [f"127.0.0.1:{central_port}"], interval_s=1.0)])  # fmt: skip
        await publish_documents(fleet.broker("controller"), key, [doc])
        c = ctl_of(r)
        await wait_until(lambda: c.refusals["config_policy"] == 1, 10, "the document refused")
        assert c.central_scheduler is None and c.central_jobs == [] and not c.docs
        assert c.config_error is not None
        assert f"job 'flood' (tcp) target '127.0.0.1:{central_port}': policy_loopback" in c.config_error

        async def refusal_in_status() -> Any:
            s = (await statuses(fleet)).get("a2")
            return s if s is not None and s.refusals.get("config_policy") == 1 and s.config_error else None

        st = await wait_until(refusal_in_status, 10, "config_policy in a2's retained status")
        assert "policy_loopback" in (st.config_error or "") and (st.last_refusal or "").startswith("config_policy")
        n = len(r.seen)
        await wait_until(lambda: sum(o.job == "own" for o in r.seen[n:]) >= 2, 10, "two more runs of the file job")
        assert all(o.job == "own" for o in r.seen), "only the file's own job ran"
        assert accepted(central_sock) == 0, "the refused document's target was connected to"
        assert accepted(file_sock) >= 2

        # a restart: the retained document arrives again and is refused again
        r.stop.set()
        await asyncio.wait_for(r.task, 20)
        r2 = await agents(raw)
        await control_up(r2)
        c2 = ctl_of(r2)
        await wait_until(lambda: c2.refusals["config_policy"] == 1, 10, "the retained document refused again")
        await wait_until(lambda: sum(o.job == "own" for o in r2.seen) >= 2, 10, "two runs of the file job")
        assert c2.central_scheduler is None and not c2.docs
        assert all(o.job == "own" for o in r2.seen)
        assert accepted(central_sock) == 0
    finally:
        central_sock.close()
        file_sock.close()
        await clear(fleet, topic)


async def test_a_document_with_one_refused_target_or_too_high_a_rate_is_refused_whole(
    fleet: Fleet, agents: Any
) -> None:
    s1, port1 = listener()
    s2, port2 = listener()
    topic = group_config_topic("edgeprobe", f"mesh-{uuid.uuid4().hex[:6]}")
    key = load_private_key(fleet.key_file)

    def doc(jobs: list[dict[str, Any]]) -> ConfigDocument:
        return ConfigDocument(**stamp(600), topic=topic, where={"agent": "a1"}, jobs=jobs)

    try:
        r = await agents(fleet.agent_cfg("a1", policy=ONLY_127_0_0_1))  # max_central_runs_per_s: 2 (default)
        await control_up(r)
        c = ctl_of(r)
        await publish_documents(fleet.broker("controller"), key, [doc([tcp_job("mesh", [f"127.0.0.1:{port1}"])])])
        await wait_until(lambda: any(o.job == "mesh" for o in r.seen), 15, "the good document running")

        # one target in 127.0.0.2 (loopback, not allowed): the whole document is refused, the old one runs on
        mixed = [tcp_job("mesh", [f"127.0.0.1:{port2}", f"127.0.0.2:{port2}"])]
        await publish_documents(fleet.broker("controller"), key, [doc(mixed)])
        await wait_until(lambda: c.refusals["config_policy"] == 1, 10, "the mixed document refused")
        assert f"target '127.0.0.2:{port2}': policy_loopback" in (c.config_error or "")
        assert f"127.0.0.1:{port2}'" not in (c.config_error or "")  # only what is refused is named

        # 2 targets every 0.05 s: 40 runs/s, above the cap of 2
        fast = [tcp_job("mesh", [f"127.0.0.1:{port2}", f"127.0.0.1:{port2 + 1}"], interval_s=0.05, timeout_s=0.02)]
        await publish_documents(fleet.broker("controller"), key, [doc(fast)])
        await wait_until(lambda: c.refusals["config_policy"] == 2, 10, "the fast document refused")
        assert "too_many_runs: central jobs would make 40 runs/s" in (c.config_error or "")
        assert "max_central_runs_per_s (2)" in (c.config_error or "")

        n = len(r.seen)
        await wait_until(lambda: sum(o.job == "mesh" for o in r.seen[n:]) >= 2, 10, "the old document still running")
        assert {o.target for o in r.seen if o.job == "mesh"} == {f"127.0.0.1:{port1}"}
        assert accepted(s2) == 0, "a refused document's target was connected to"
        assert [j.targets for j in c.central_jobs] == [(f"127.0.0.1:{port1}",)]
    finally:
        s1.close()
        s2.close()
        await clear(fleet, topic)


def test_file_jobs_are_checked_only_when_the_owner_opts_in(fleet: Fleet, tmp_path: Path) -> None:
    """``policy.apply_to_file_jobs: true``: the agent refuses to start with a file job the policy
    refuses, naming it (the default, exempt, is the file job of the test above)."""
    raw = fleet.agent_cfg("a3", policy={"apply_to_file_jobs": True},
                          jobs=[tcp_job("own", ["127.0.0.1:9"], interval_s=30)])  # fmt: skip
    raw["control"] = {}
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(raw))
    done = subprocess.run(
        [sys.executable, "-m", "edgeprobe.cli", "agent", "run", "--config", str(path)],
        capture_output=True, text=True, timeout=30, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "policy.apply_to_file_jobs" in done.stderr
    assert "job 'own' (tcp) target '127.0.0.1:9': policy_loopback" in done.stderr


# ---------------------------------------------------------------------- item 9: api_key_env


async def test_remote_requests_read_only_the_variables_the_owner_listed(
    fleet: Fleet, agents: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report: an ad-hoc command named EDGEPROBE_BROKER_PASSWORD as its api_key_env and the agent
    sent its own MQTT password as a Bearer token to the attacker's endpoint."""
    password = fleet.passwords["a1"]
    monkeypatch.setenv("EDGEPROBE_BROKER_PASSWORD", password)  # how a deployment hands it to the agent
    monkeypatch.setenv("EP_TEST_LLM_KEY", "sk-allowed-8e1b7c")
    monkeypatch.setenv("EP_TEST_OTHER_KEY", "sk-other-55d0aa")
    key = load_private_key(fleet.key_file)
    seen = Seen()
    topic = group_config_topic("edgeprobe", f"llm-{uuid.uuid4().hex[:6]}")
    opts: dict[str, Any] = {"model": "m", "max_tokens": 8, "timeout_s": 3.0}
    async with http_server("127.0.0.1", seen) as url:
        # the default policy: no variable at all
        r = await agents(fleet.agent_cfg("a1", policy=ONLY_127_0_0_1 | {"inference_tokens_per_hour": 1000}))
        await control_up(r)
        cmd = command("a1", f"{url}/v1", kind="inference", api_key_env="EDGEPROBE_BROKER_PASSWORD", **opts)
        reply = await refused(fleet, r, sign(cmd, "cmd", key), cmd.request_id, "env_reserved")
        assert "EDGEPROBE_BROKER_PASSWORD holds this agent's own credentials" in (reply.reason or "")
        cmd = command("a1", f"{url}/v1", kind="inference", api_key_env="EP_TEST_LLM_KEY", **opts)
        reply = await refused(fleet, r, sign(cmd, "cmd", key), cmd.request_id, "env_not_allowed")
        assert "EP_TEST_LLM_KEY is not in policy.api_key_envs" in (reply.reason or "")
        assert seen.requests == []
        r.stop.set()
        await asyncio.wait_for(r.task, 20)

        # the owner lists one variable: that one works, no other
        policy = ONLY_127_0_0_1 | {"api_key_envs": ["EP_TEST_LLM_KEY"], "inference_tokens_per_hour": 1000}
        r = await agents(fleet.agent_cfg("a1", policy=policy))
        await control_up(r)
        try:
            cmd = command("a1", f"{url}/v1", kind="inference", api_key_env="EDGEPROBE_BROKER_PASSWORD", **opts)
            await refused(fleet, r, sign(cmd, "cmd", key), cmd.request_id, "env_reserved")
            cmd = command("a1", f"{url}/v1", kind="inference", api_key_env="EP_TEST_OTHER_KEY", **opts)
            await refused(fleet, r, sign(cmd, "cmd", key), cmd.request_id, "env_not_allowed")

            cmd = command("a1", f"{url}/v1", kind="inference", api_key_env="EP_TEST_LLM_KEY", **opts)
            answer = await ask(fleet, "a1", sign(cmd, "cmd", key), cmd.request_id)
            assert answer is not None and answer.status == "ok", answer
            assert answer.observation is not None and answer.observation.outcome == "ok", answer.observation
            assert [h.get("Authorization") for _, h, _ in seen.requests] == ["Bearer sk-allowed-8e1b7c"]

            # central documents likewise: the agent's own secrets are refused by the file's rules,
            # an unlisted variable by the policy
            c = ctl_of(r)
            for env, code in (("EDGEPROBE_BROKER_PASSWORD", "config_invalid"), ("EP_TEST_OTHER_KEY", "config_policy")):
                job = {"name": "llm", "kind": "inference", "targets": [f"{url}/v1"], "interval_s": 30,
                       "options": opts | {"api_key_env": env}}  # fmt: skip
                doc = ConfigDocument(**stamp(600), topic=topic, where={"agent": "a1"}, jobs=[job])
                await publish_documents(fleet.broker("controller"), key, [doc])
                await wait_until(lambda: c.refusals[code] == 1, 10, f"the document refused ({code})")  # noqa: B023
                assert env in (c.config_error or "")
            assert c.central_jobs == []
        finally:
            await clear(fleet, topic)
    requests = repr(seen.requests)
    assert len(seen.requests) == 1 and password not in requests and "sk-other" not in requests


# ---------------------------------------------------------------------- item 12: redirects


async def test_an_adhoc_redirect_to_a_refused_address_is_not_followed(fleet: Fleet, agents: Any) -> None:
    allowed, refused_seen = Seen(), Seen()
    async with (
        http_server("127.0.0.2", refused_seen) as inside,
        http_server("127.0.0.1", allowed, redirect_to=f"{inside}/admin") as outside,
    ):
        r = await agents(fleet.agent_cfg("a1", policy=ONLY_127_0_0_1))
        await control_up(r)
        cmd = command("a1", f"{outside}/go", kind="http", follow_redirects=True, timeout_s=3)
        reply = await ask(fleet, "a1", sign(cmd, "cmd", load_private_key(fleet.key_file)), cmd.request_id)
    assert reply is not None and reply.status == "ok" and reply.observation is not None, reply
    obs = reply.observation
    assert obs.outcome == "policy_refused", obs
    assert "127.0.0.2" in (obs.reason or "") and "policy_loopback" in (obs.reason or ""), obs.reason
    assert [p for p, _, _ in allowed.requests] == ["/go"]
    assert refused_seen.requests == [], "the refused server was asked"


# ---------------------------------------------------------------------- item 17: keys in the query


async def test_a_key_in_the_query_reaches_neither_mqtt_nor_influxdb(
    fleet: Fleet, agents: Any, influxdb: Any, influx_db: str, tmp_path: Path
) -> None:
    secret = f"k-{uuid.uuid4().hex}"
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
    seen = Seen()
    payloads: list[bytes] = []
    try:
        async with http_server("127.0.0.1", seen) as url, fleet.client("collector") as tap:
            await tap.subscribe("edgeprobe/v1/s1/a1/obs", qos=1)
            r = await agents(fleet.agent_cfg("a1", policy=ONLY_127_0_0_1))
            await control_up(r)
            target = f"{url}/text?region=eu&api_key={secret}"
            cmd = command("a1", target, kind="http", timeout_s=3)
            async with fleet.client("controller") as watcher:
                await watcher.subscribe(result_topic("edgeprobe", cmd.request_id, "a1"), qos=1)
                reply = await ask(fleet, "a1", sign(cmd, "cmd", load_private_key(fleet.key_file)), cmd.request_id)

                async def take(client: Any, n: int) -> None:
                    async for msg in client.messages:
                        payloads.append(bytes(msg.payload))
                        if cmd.request_id.encode() in payloads[-1] or len(payloads) >= n:
                            return

                await asyncio.wait_for(take(watcher, 1), 10)  # the answer, as published
                await asyncio.wait_for(take(tap, 1000), 10)  # the observation, as published
        assert reply is not None and reply.observation is not None and reply.observation.outcome == "ok", reply
        assert seen.requests[0][0] == f"/text?region=eu&api_key={secret}"  # the request still sends it
        assert reply.observation.target == f"{url}/text?region=eu&api_key=REDACTED"
        assert payloads and all(secret.encode() not in p for p in payloads)
        assert any(cmd.request_id.encode() in p for p in payloads[1:]), "the observation was published"
        line = encode_observation(reply.observation, agent="a1", site="s1", measurement=KINDS["http"].measurement)
        assert secret not in line.line

        q = f"SELECT * FROM edgeprobe_http WHERE request_id = '{cmd.request_id}'"
        rows = await wait_until(lambda: asyncio.to_thread(influxdb.rows, q, influx_db), 20, "the row in InfluxDB")
        assert rows[0]["target"] == f"{url}/text?region=eu&api_key=REDACTED"
        assert secret not in msgspec.json.encode(rows).decode()
    finally:
        collector_stop.set()
        await asyncio.wait_for(collector, 20)


async def test_a_refusal_quoting_a_url_does_not_carry_its_key(fleet: Fleet, agents: Any) -> None:
    """A malformed URL's error quotes it: the reason in the answer, the status and the log must not
    carry the key in its query (ad hoc and central)."""
    secret = f"k-{uuid.uuid4().hex}"
    bad_url = f"http://127.0.0.1:9/a b?api_key={secret}"  # a space: not a URL the http kind accepts
    key = load_private_key(fleet.key_file)
    topic = group_config_topic("edgeprobe", f"bad-{uuid.uuid4().hex[:6]}")
    r = await agents(fleet.agent_cfg("a1", policy=ONLY_127_0_0_1))
    await control_up(r)
    try:
        cmd = command("a1", bad_url, kind="http")
        reply = await refused(fleet, r, sign(cmd, "cmd", key), cmd.request_id, "bad_request")
        assert "api_key=REDACTED" in (reply.reason or "") and secret not in (reply.reason or ""), reply.reason

        job = {"name": "web", "kind": "http", "targets": [bad_url], "interval_s": 30}
        doc = ConfigDocument(**stamp(600), topic=topic, where={"agent": "a1"}, jobs=[job])
        await publish_documents(fleet.broker("controller"), key, [doc])
        c = ctl_of(r)
        await wait_until(lambda: c.refusals["config_invalid"] == 1, 10, "the document refused")
        assert "api_key=REDACTED" in (c.config_error or ""), c.config_error

        async def status_with_the_error() -> Any:
            s = (await statuses(fleet)).get("a1")
            return s if s is not None and s.config_error else None

        st = await wait_until(status_with_the_error, 10, "config_error in a1's status")
        assert "api_key=REDACTED" in (st.config_error or "")
        assert secret not in msgspec.json.encode(st).decode()
    finally:
        await clear(fleet, topic)
