"""Replay across agent restarts, on a real mosquitto with the shipped ACL (the fixtures of
test_fleet.py): a recorded signed command sent again after the agent restarted is refused
(``replayed``), and an old configuration document re-published while the agent was down can't undo
a newer one (a ``fleet clear`` included). The replay state lives beside the agent's spool.
Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from edgeprobe.agent.control import AdhocCommand, ConfigDocument
from edgeprobe.agent.replay import STATE_FILE_NAME
from edgeprobe.schema import CommandReply, cmd_topic, config_topic, result_topic
from edgeprobe.signing import load_private_key, sign, stamp
from tests.integration.test_fleet import Fleet, agents, control_up, fleet, listener, wait_until
from tests.support.paths import REPO

pytestmark = pytest.mark.integration
__all__ = ["agents", "fleet"]  # fixtures, used by name


def start_agent(cfg_path: Path, ready: Path) -> subprocess.Popen[bytes]:
    ready.unlink(missing_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "edgeprobe.cli", "agent", "run", "--config", str(cfg_path), "--ready-file", str(ready)],
        cwd=REPO,
    )


def stop_agent(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def test_a_recorded_command_is_refused_after_a_restart(fleet: Fleet, tmp_path: Path) -> None:
    """The agent as a real process: SIGTERM, start again, the same bytes again → refused."""
    sock, port = listener()
    raw = fleet.agent_cfg("a2")
    raw["spool"] = {"path": str(tmp_path / "a2" / "spool.db")}
    cfg_path, ready = tmp_path / "a2.yaml", tmp_path / "a2.ready"
    cfg_path.write_text(yaml.safe_dump(raw))
    key = load_private_key(fleet.key_file)
    rid = uuid.uuid4().hex
    cmd = AdhocCommand(
        **stamp(120), request_id=rid, agent="a2", kind="tcp", target=f"127.0.0.1:{port}", options={"count": 1}
    )
    recorded = sign(cmd, "cmd", key)
    proc = start_agent(cfg_path, ready)
    try:
        async with fleet.client("controller") as ctl:
            await ctl.subscribe(result_topic("edgeprobe", rid, "a2"), qos=1)
            replies = ctl.messages.__aiter__()

            async def reply() -> CommandReply:
                msg = await asyncio.wait_for(replies.__anext__(), 20)
                return msgspec.json.decode(bytes(msg.payload), type=CommandReply)

            await wait_until(ready.exists, 30, "a2 ready")
            await ctl.publish(cmd_topic("edgeprobe", "s2", "a2"), recorded, qos=1)
            first = await reply()
            assert first.status == "ok", first
            assert (tmp_path / "a2" / STATE_FILE_NAME).stat().st_mode & 0o777 == 0o600

            stop_agent(proc)
            proc = start_agent(cfg_path, ready)
            await wait_until(ready.exists, 30, "a2 ready again")
            await ctl.publish(cmd_topic("edgeprobe", "s2", "a2"), recorded, qos=1)
            again = await reply()
            assert (again.status, again.code) == ("refused", "replayed"), again
    finally:
        stop_agent(proc)
        sock.close()


async def test_an_old_config_document_cannot_undo_a_newer_one_after_a_restart(
    fleet: Fleet, agents: Any, tmp_path: Path
) -> None:
    """apply v1, v2, clear; the agent stops; v1's bytes are re-published (retained) → refused at start."""
    sock, port = listener()
    raw = fleet.agent_cfg("a3")
    raw["spool"] = {"path": str(tmp_path / "a3" / "spool.db")}
    key = load_private_key(fleet.key_file)
    topic = config_topic("edgeprobe", "s3", "a3")

    def doc(jobs: list[dict[str, Any]]) -> bytes:
        return sign(ConfigDocument(**stamp(600), topic=topic, jobs=jobs), "config", key)

    job = {"name": "old", "kind": "tcp", "targets": [f"127.0.0.1:{port}"], "interval_s": 1.0,
           "options": {"count": 1, "timeout_s": 0.3}}  # fmt: skip
    v1, v2, clear = doc([job]), doc([job | {"name": "new"}]), doc([])
    try:
        async with fleet.client("controller") as ctl:
            r = await agents(raw)
            await control_up(r)
            c = r.handles.control
            assert c is not None
            for n, payload in enumerate((v1, v2, clear), start=1):
                await ctl.publish(topic, payload, qos=1, retain=True)
                await wait_until(lambda n=n: c.config_changes == n, 15, f"document {n} applied")  # type: ignore[misc]
            assert c.central_scheduler is None  # cleared
            r.stop.set()
            await asyncio.wait_for(r.task, 20)

            await ctl.publish(topic, v1, qos=1, retain=True)  # while the agent is down
            r2 = await agents(raw)
            await control_up(r2)
            c2 = r2.handles.control
            assert c2 is not None
            await wait_until(lambda: c2.refusals["config_replayed"] == 1, 15, "v1 refused")
            assert c2.central_scheduler is None and not c2.docs
            assert "older than a document already seen" in (c2.config_error or "")
            # live, too
            await ctl.publish(topic, v2, qos=1, retain=True)
            await wait_until(lambda: c2.refusals["config_replayed"] == 2, 15, "v2 refused")
            await ctl.publish(topic, b"", qos=1, retain=True)
    finally:
        sock.close()
