"""The controller against hostile agents, on a real mosquitto with the shipped ACL (the fixtures of
test_fleet.py): agent logins publish poisoned retained statuses (terminal escape sequences, rich
markup, huge fields, wrong types, another agent's identity) and answers; ``fleet ls`` shows
sanitized text and skips the bad ones, ``fleet probe`` still works. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgeprobe.fleet import scan_statuses
from edgeprobe.schema import SCHEMA_VERSION, status_topic
from edgeprobe.termtext import is_term_safe, term_safe
from tests.integration.test_fleet import Fleet, agents, cli, fleet, listener, wait_until

pytestmark = pytest.mark.integration
__all__ = ["agents", "fleet"]  # fixtures, used by name

EVIL = (
    "\x1b]0;pwned title\x07"  # window title
    "\x1b]52;c;ZWNobyBwd25lZA==\x07"  # clipboard
    "\x1b[2J\x1b[H"  # clear screen, cursor home
    "\x1b]8;;https://evil.example/\x1b\\click\x1b]8;;\x1b\\"  # OSC 8 link
    "\u202egnp.exe"  # bidi override
    "\x9b31m"  # C1 CSI
)
MARKUP = "[/bold][link=https://evil.example]x[/link]"  # rich markup: an error (abort) or a link


def raw_status(site: str, agent: str, **fields: Any) -> bytes:
    now = time.time_ns()
    doc: dict[str, Any] = {"v": SCHEMA_VERSION, "agent": agent, "site": site, "state": "online", "at_ns": now}
    doc["heartbeat_at_ns"] = now
    doc.update(fields)
    return json.dumps(doc).encode()


async def publish_as(fleet: Fleet, login: str, site: str, payload: bytes) -> None:
    async with fleet.client(login) as c:
        await c.publish(status_topic("edgeprobe", site, login), payload, qos=1, retain=True)


async def test_poisoned_statuses_are_sanitized_or_skipped(
    fleet: Fleet, agents: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "1200")  # the CLI's table, wide enough to show whole cells
    real = await agents(fleet.agent_cfg("a1"))
    await wait_until(real.ready.is_set, what="a1 ready")
    # a2: its own identity, but escape sequences and markup everywhere a string goes
    await publish_as(
        fleet,
        "a2",
        "s2",
        raw_status(
            "s2",
            "a2",
            version=EVIL,
            labels={"m": MARKUP, "tier": EVIL},
            kinds=["tcp", EVIL],
            job_kinds=[EVIL],
            config_error=EVIL,
            accepts_commands=True,
        ),
    )
    # a3: wrong types
    await publish_as(fleet, "a3", "s3", raw_status("s3", "a3", labels={"tier": 5}, kinds="tcp"))
    # a5 (site s9) claims to be a1 and says it is offline
    await publish_as(fleet, "a5", "s9", raw_status("s1", "a1", state="offline"))

    scan = await scan_statuses(fleet.broker("controller"), quiet_s=0.3)
    by = {s.agent: s for s in scan.statuses}
    assert set(by) == {"a1", "a2"}, by
    assert by["a1"].state == "online" and by["a1"].site == "s1"
    assert scan.skipped == {"malformed": 1, "spoofed": 1}

    fleet_yaml = tmp_path / "fleet.yaml"
    fleet_yaml.write_text(yaml.safe_dump({"broker": fleet.broker_dict("controller"), "key_file": str(fleet.key_file)}))
    table = await asyncio.to_thread(cli, "fleet", "ls", "--config", str(fleet_yaml))
    assert table.returncode == 0, table.stderr
    for stream in (table.stdout, table.stderr):
        assert is_term_safe(stream.replace("\n", "")), repr(stream)
    assert "\\x1b]0;pwned title\\x07" in table.stdout, table.stdout  # shown, inert
    assert f"m={MARKUP}" in table.stdout, table.stdout  # shown as text, not read as markup
    assert "skipped 2 invalid status message(s) (malformed 1, spoofed 1)" in table.stderr, table.stderr
    as_json = await asyncio.to_thread(cli, "fleet", "ls", "--config", str(fleet_yaml), "--json")
    rows = {r["agent"]: r for r in json.loads(as_json.stdout)}
    assert set(rows) == {"a1", "a2"} and rows["a1"]["state"] == "online"
    assert rows["a2"]["version"] == EVIL  # --json keeps the data (JSON escapes it)

    # huge: a whole message over the limit, and one field over its limit
    await publish_as(fleet, "a3", "s3", raw_status("s3", "a3", version="v" * 100_000))
    await publish_as(fleet, "a5", "s9", raw_status("s9", "a5", labels={"k": "x" * 1000}))
    scan = await scan_statuses(fleet.broker("controller"), quiet_s=0.3)
    assert {s.agent for s in scan.statuses} == {"a1", "a2"}
    assert scan.skipped == {"too_large": 1, "too_long": 1}

    # fleet probe still works with all of that retained on the broker (a2 is listed online but
    # runs no agent: it does not answer, which is reported, not fatal)
    sock, port = listener()
    try:
        args = ["fleet", "probe", "tcp", f"127.0.0.1:{port}", "-o", "count=1", "--timeout", "5"]
        done = await asyncio.to_thread(cli, *args, "--config", str(fleet_yaml), "--where", "agent=a1", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["summary"]["answered"] == 1
        table = await asyncio.to_thread(cli, *args, "--config", str(fleet_yaml))
        assert "a1" in table.stdout and "a2: no answer" in table.stderr, (table.stdout, table.stderr)
        assert is_term_safe(table.stdout.replace("\n", "")) and is_term_safe(table.stderr.replace("\n", ""))
    finally:
        sock.close()
        for login, site in (("a2", "s2"), ("a3", "s3"), ("a5", "s9")):
            await publish_as(fleet, login, site, b"")  # clear the retained copies


def test_term_safe() -> None:
    out = term_safe(EVIL)
    assert is_term_safe(out) and "\x1b" not in out and "\u202e" not in out and "\x9b" not in out
    assert out.startswith("\\x1b]0;pwned title\\x07")
    assert term_safe("fra1-a ✓ 東京") == "fra1-a ✓ 東京"  # ordinary text unchanged
    assert term_safe("x" * 10, 4) == "xxxx…"
    assert term_safe("a\nb\tc") == "a\\x0ab\\x09c"
