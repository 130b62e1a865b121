"""``edgeprobe watch`` against a real mosquitto: the live table of what a fleet publishes, read-only.

Observations are the golden samples (tests/golden) published as agents publish them; hostile and
malformed messages among them are counted and skipped, or shown escaped, never crash the watch nor
reach the terminal as control characters.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import uuid
from pathlib import Path

import aiomqtt
import pytest

from edgeprobe.localstack import MosquittoServer
from tests.integration.test_collector import Fleet
from tests.support.wait import wait_for_async

pytestmark = pytest.mark.integration

EXE = str(Path(sys.executable).with_name("edgeprobe"))
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\u202eevil"  # window title, screen clear, right-to-left override


async def _start_watch(conf: Path, *args: str) -> tuple[asyncio.subprocess.Process, list[str]]:
    proc = await asyncio.create_subprocess_exec(
        EXE, "watch", "--config", str(conf), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    err_lines: list[str] = []

    async def subscribed() -> bool:
        line = (await proc.stderr.readline()).decode()  # type: ignore[union-attr]
        err_lines.append(line)
        return "subscribed to" in line or not line

    await wait_for_async(subscribed, 30, lambda: f"the watch's subscription; stderr: {err_lines}", interval_s=0)
    assert "subscribed to" in err_lines[-1], err_lines
    return proc, err_lines


async def test_watch_shows_the_fleet_and_skips_or_escapes_hostile_messages(
    mosquitto: MosquittoServer, tmp_path: Path
) -> None:
    prefix = f"w-{uuid.uuid4().hex[:8]}"
    conf = tmp_path / "fleet.yaml"
    conf.write_text(json.dumps({"broker": {"url": mosquitto.url, "topic_prefix": prefix}}))
    fleet = Fleet(prefix)
    good = [fleet.obs(kind) for kind in ("icmp", "tcp", "http", "inference")]
    hostile = fleet.obs("tcp")
    hostile["target"] = HOSTILE
    hostile["labels"] = {"tier": "edge\x1b[31m"}
    other = fleet.obs("icmp")
    valid = len(good) + 2  # good, hostile, other

    proc, err_lines = await _start_watch(conf, "--count", str(valid), "--duration", "60")
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier=f"pub-{prefix}") as pub:
        # Not JSON (with a clipboard-writing escape); a payload naming another agent than its topic;
        # an observation of a kind nobody knows, beside a good one.
        await pub.publish(fleet.topic(), b"\x1b]52;c;cHduZWQ=\x07 not json", qos=1)
        await pub.publish(fleet.topic(agent="a2"), fleet.envelope([fleet.obs()]), qos=1)
        unknown = {**fleet.obs("icmp"), "kind": "\x1b[2Jnuke"}
        await pub.publish(fleet.topic(), fleet.envelope([unknown, good[0]]), qos=1)
        await pub.publish(fleet.topic(), fleet.envelope(good[1:]), qos=1)
        await pub.publish(fleet.topic(), fleet.envelope([hostile]), qos=1)
        await pub.publish(fleet.topic(agent="a9", site="pop2"), fleet.envelope([other], agent="a9", site="pop2"), qos=1)
    out_b, err_b = await asyncio.wait_for(proc.communicate(), 30)
    out, err = out_b.decode(), "".join(err_lines) + err_b.decode()
    assert proc.returncode == 0, err

    # Nothing a terminal acts on, from anyone: no C0/C1 control character but the newlines.
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]", out + err), repr(out + err)
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\u202eevil" in out.replace("\n", "")  # shown, inert
    # The table: every kind of the golden samples, by agent; the footer counts what was skipped.
    rows = [line for line in out.splitlines() if "pop1/a1" in line or "pop2/a9" in line]
    for obs in good:
        kind = obs["kind"]
        assert any(f"│ {kind}" in line for line in rows if "pop1/a1" in line), out
    assert any("pop2/a9" in line and "│ icmp" in line for line in rows), out
    assert "6 observation(s) from 2 agent(s)" in out, out
    assert "skipped 3 invalid (bad_json 1, topic_mismatch 1, unknown_kind 1)" in out, out
    assert "agent" in out and "latency ms" in out and "last 30" in out


async def test_watch_where_and_a_broker_that_is_not_there(mosquitto: MosquittoServer, tmp_path: Path) -> None:
    prefix = f"w-{uuid.uuid4().hex[:8]}"
    conf = tmp_path / "fleet.yaml"
    conf.write_text(json.dumps({"broker": {"url": mosquitto.url, "topic_prefix": prefix}}))
    fleet = Fleet(prefix)
    proc, _ = await _start_watch(conf, "--where", "site=pop2", "--count", "1", "--once")
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier=f"pub-{prefix}") as pub:
        await pub.publish(fleet.topic(), fleet.envelope([fleet.obs("icmp")]), qos=1)
        await pub.publish(fleet.topic(agent="b1", site="pop2"), fleet.envelope([fleet.obs("tcp")], "b1", "pop2"), qos=1)
    out_b, _ = await asyncio.wait_for(proc.communicate(), 30)
    out = out_b.decode()
    assert proc.returncode == 0
    assert "pop2/b1" in out and "pop1/a1" not in out and "1 of other agents (--where)" in out, out

    conf.write_text(json.dumps({"broker": {"url": "mqtt://127.0.0.1:1", "connect_timeout_s": 2}}))
    gone = await asyncio.create_subprocess_exec(
        EXE, "watch", "--config", str(conf), "--duration", "30", stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(gone.communicate(), 30)
    assert gone.returncode == 1 and "edgeprobe watch: broker mqtt://127.0.0.1:1" in err.decode(), err
