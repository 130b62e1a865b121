"""A reload of the agent's file with central documents in force (the fixtures of test_fleet.py: a
real mosquitto with the shipped ACL and a signed group document): the file wins as at a restart.
A tightened policy stops the central job it now refuses and says why in the status; the file's
job goes on with the one sequence. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from edgeprobe.agent.config import AgentConfig, Job, build_jobs
from edgeprobe.agent.control import ConfigDocument
from edgeprobe.agent.daemon import AgentHandles, run_agent
from edgeprobe.configfile import convert
from edgeprobe.fleet import publish_documents
from edgeprobe.schema import Observation, group_config_topic
from edgeprobe.signing import load_private_key, stamp
from tests.integration.test_fleet import Fleet, fleet, listener, wait_until
from tests.integration.test_fleet_policy import accepted, clear, tcp_job

pytestmark = pytest.mark.integration
__all__ = ["fleet"]  # fixtures, used by name


async def test_a_reload_that_tightens_the_policy_stops_the_central_job_it_refuses(fleet: Fleet) -> None:
    central_sock, central_port = listener()
    file_sock, file_port = listener()
    topic = group_config_topic("edgeprobe", f"reload-{uuid.uuid4().hex[:6]}")
    raw: dict[str, Any] = fleet.agent_cfg("a2", jobs=[tcp_job("own", [f"127.0.0.1:{file_port}"], interval_s=0.6)])
    files = {"now": raw}  # what the "file" says when the agent reloads it

    def loader() -> tuple[AgentConfig, list[Job]]:
        cfg = convert(files["now"], AgentConfig, "agent.yaml")
        return cfg, build_jobs(cfg, "agent.yaml")

    cfg, jobs = loader()
    seen: list[Observation] = []
    stop, ready = asyncio.Event(), asyncio.Event()
    started: asyncio.Future[AgentHandles] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_agent(
            cfg, jobs, stop=stop, started=started, tap=seen.append, on_ready=ready.set, reload=("agent.yaml", loader)
        )
    )
    try:
        handles = await asyncio.wait_for(started, 10)
        c = handles.control
        assert c is not None and handles.request_reload is not None
        await wait_until(ready.is_set, what="the agent ready")
        doc = ConfigDocument(**stamp(600), topic=topic, where={"agent": "a2"},
                             jobs=[tcp_job("lo", [f"127.0.0.1:{central_port}"], interval_s=0.6)])  # fmt: skip
        await publish_documents(fleet.broker("controller"), load_private_key(fleet.key_file), [doc])
        await wait_until(lambda: sum(o.job and o.job.endswith("lo") for o in seen) >= 2, 10, "the central job running")

        # The owner removes loopback from the policy: the central job to 127.0.0.1 must stop.
        files["now"] = {**raw, "policy": {}}
        handles.request_reload()
        await wait_until(lambda: c.central_scheduler is None and not c.docs, 10, "the central job stopped")
        assert c.config_error is not None and "after the agent's file was reloaded" in c.config_error
        assert "policy_loopback" in c.config_error
        accepted(central_sock)  # what connected before the reload
        n = len(seen)
        await wait_until(lambda: sum(o.job == "own" for o in seen[n:]) >= 3, 10, "three more runs of the file job")
        assert not any(o.job and o.job.endswith("lo") for o in seen[n + 1 :]), "the refused central job ran on"
        assert accepted(central_sock) <= 1  # at most a run in flight at the reload
        assert accepted(file_sock) >= 3
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        central_sock.close()
        file_sock.close()
        await clear(fleet, topic)
    seqs = [o.seq for o in seen]
    assert sorted(seqs) == list(range(len(seqs))), "one sequence for file and central jobs, none repeated"


async def test_a_reload_whose_file_jobs_break_the_policy_is_refused(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    """With ``policy.apply_to_file_jobs``, a reloaded file whose jobs the (new) policy refuses is
    refused whole, as it would be at start: one ERROR line, and the jobs in force go on."""
    sock, port = listener()
    raw: dict[str, Any] = fleet.agent_cfg("a3", jobs=[tcp_job("own", [f"127.0.0.1:{port}"], interval_s=0.6)])
    raw["policy"] = {"allow_cidrs": ["127.0.0.0/8"], "apply_to_file_jobs": True}
    files = {"now": raw}

    def loader() -> tuple[AgentConfig, list[Job]]:
        cfg = convert(files["now"], AgentConfig, "agent.yaml")
        return cfg, build_jobs(cfg, "agent.yaml")

    cfg, jobs = loader()
    seen: list[Observation] = []
    stop = asyncio.Event()
    started: asyncio.Future[AgentHandles] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_agent(cfg, jobs, stop=stop, started=started, tap=seen.append, reload=("agent.yaml", loader))
    )
    try:
        handles = await asyncio.wait_for(started, 10)
        assert handles.request_reload is not None
        await wait_until(lambda: len(seen) >= 1, 10, "the file job running")
        files["now"] = {**raw, "policy": {"apply_to_file_jobs": True}}  # loopback no longer allowed
        with caplog.at_level("ERROR", logger="edgeprobe.agent"):
            handles.request_reload()
            await wait_until(lambda: "reload refused" in caplog.text, 10, "the refusal")
        refused = "agent.yaml: policy.apply_to_file_jobs: the file's jobs break this agent's policy: "
        assert refused + f"job 'own' (tcp) target '127.0.0.1:{port}': policy_loopback" in caplog.text
        n = len(seen)
        await wait_until(lambda: len(seen) >= n + 2, 10, "the file job still running")
        assert all(o.outcome == "ok" for o in seen[n:]), "its connections are still allowed"
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        sock.close()
