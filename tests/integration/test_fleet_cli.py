"""``edgeprobe fleet probe`` and ``fleet ls`` as an operator runs them (issue 13, item 5), on a real
mosquitto with the shipped ACL, per-agent users and a signed controller key (the fixtures of
test_fleet.py): exit codes (all ok -> 0; a denial or a failure -> 1, each agent named on a line of
its own at the end), a policy refusal worded "denied by policy (<code>)" (TCP's "refused" is a
reset), agents that do not accept commands skipped and named, and ``fleet ls`` columns and
``--json`` keys. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.test_fleet import (
    Fleet,
    Running,
    agents,
    cli,
    control_up,
    fleet,
    listener,
    statuses,
    wait_until,
)

pytestmark = pytest.mark.integration
__all__ = ["agents", "fleet"]  # fixtures, used by name

# The keys of a `fleet ls --json` object (docs/fleet.md, "fleet ls").
LS_KEYS = {
    "agent",
    "site",
    "state",
    "age_s",
    "version",
    "labels",
    "job_kinds",
    "kinds",
    "can_run",
    "cannot_run",
    "icmp_permitted",
    "latitude",
    "longitude",
    "queued",
    "accepts_commands",
    "accepts_config",
    "refused",
    "refusals",
    "config_docs",
    "config_error",
}


def controller_file(fleet: Fleet, tmp_path: Path) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"broker": fleet.broker_dict("controller"), "key_file": str(fleet.key_file)}))
    return path


async def start_four(fleet: Fleet, agents: Any, port: int) -> None:
    """a1 accepts commands (loopback allowed) and runs a tcp job; a2 (no labels) accepts them with
    the default policy (loopback denied); a3 has no control channel; a4 accepts config only."""
    job = {"name": "j", "kind": "tcp", "targets": [f"127.0.0.1:{port}"], "interval_s": 60}
    a1: Running = await agents(fleet.agent_cfg("a1", jobs=[job]))
    a2: Running = await agents({**fleet.agent_cfg("a2", policy={}), "agent": {"id": "a2", "site": "s2"}})
    a3: Running = await agents(fleet.agent_cfg("a3", control={"accept_commands": False, "accept_config": False}))
    a4: Running = await agents(
        fleet.agent_cfg(
            "a4", control={"public_key_file": str(fleet.pub_file), "accept_commands": False, "accept_config": True}
        )
    )
    await control_up(a1)
    await control_up(a2)
    await control_up(a4)
    await wait_until(a3.ready.is_set, what="a3 online")

    async def all_online() -> bool:
        st = await statuses(fleet)
        return all(a in st and st[a].state == "online" for a in ("a1", "a2", "a3", "a4"))

    await wait_until(all_online, 30, "four agents online")


def last_lines(text: str, n: int) -> list[str]:
    return text.strip().splitlines()[-n:]


async def test_fleet_probe_exit_codes_wording_and_skipping(fleet: Fleet, agents: Any, tmp_path: Path) -> None:
    sock, port = listener()
    closed, closed_port = listener()
    closed.close()  # nothing listens there: a TCP probe's outcome is "refused" (a reset)
    try:
        await start_four(fleet, agents, port)
        conf = str(controller_file(fleet, tmp_path))
        base = ["fleet", "probe", "tcp", "-c", "1", "--timeout", "15", "--config", conf]
        skipped = "skipped 2 agent(s) that do not accept commands: a3, a4"

        # all asked answer ok -> 0 (tier=pop: a1 asked, a3 skipped, said, and not a failure)
        ok = await asyncio.to_thread(cli, *base, f"127.0.0.1:{port}", "--where", "tier=pop")
        assert ok.returncode == 0, (ok.stdout, ok.stderr)
        assert "connect_ms: min" in ok.stdout, ok.stdout
        assert ok.stderr.strip() == "skipped 1 agent(s) that do not accept commands: a3", ok.stderr
        ok1 = await asyncio.to_thread(cli, *base, f"127.0.0.1:{port}", "--where", "agent=a1", "--json")
        assert ok1.returncode == 0, ok1.stderr
        assert json.loads(ok1.stdout)["summary"]["answered"] == 1 and ok1.stderr == ""

        # a2's policy denies loopback -> 1, a2 named last, in words other than "refused"
        mixed = await asyncio.to_thread(cli, *base, f"127.0.0.1:{port}")
        assert mixed.returncode == 1, (mixed.stdout, mixed.stderr)
        assert "denied by policy" in mixed.stdout, mixed.stdout  # the table's outcome cell (wrapped)
        assert skipped in mixed.stderr, mixed.stderr
        end = last_lines(mixed.stderr, 1)
        assert end[0].startswith("a2: denied by policy (policy_loopback): "), mixed.stderr
        assert "refused" not in (mixed.stdout + mixed.stderr).replace("refused.", ""), (mixed.stdout, mixed.stderr)
        print(mixed.stdout + mixed.stderr)

        # the same as JSON: stdout is exactly the JSON document, the lines go to stderr
        js = await asyncio.to_thread(cli, *base, f"127.0.0.1:{port}", "--json")
        assert js.returncode == 1, js.stderr
        out = json.loads(js.stdout)
        assert out["summary"]["denied"] == 1 and out["summary"]["failed"] == 0
        assert out["summary"]["not_accepting"] == ["a3", "a4"]
        assert {r["agent"]: r["status"] for r in out["replies"]} == {"a1": "ok", "a2": "refused"}
        assert skipped in js.stderr and last_lines(js.stderr, 1)[0].startswith("a2: denied by policy"), js.stderr

        # a1 runs it and measures a failure (TCP reset: the outcome "refused") -> 1, a1 named
        failed = await asyncio.to_thread(cli, *base, f"127.0.0.1:{closed_port}", "--where", "agent=a1")
        assert failed.returncode == 1, (failed.stdout, failed.stderr)
        assert last_lines(failed.stderr, 1)[0].startswith("a1: failed: refused"), failed.stderr
        print(failed.stdout + failed.stderr)

        # only agents that do not accept commands match: nobody asked -> 1, said so
        none = await asyncio.to_thread(cli, *base, f"127.0.0.1:{port}", "--where", "agent=a3")
        assert none.returncode == 1
        assert "skipped 1 agent(s) that do not accept commands: a3" in none.stderr, none.stderr
        assert "no online agent that accepts commands matches" in none.stderr, none.stderr
    finally:
        sock.close()


async def test_fleet_ls_columns_and_json(fleet: Fleet, agents: Any, tmp_path: Path) -> None:
    sock, port = listener()
    try:
        await start_four(fleet, agents, port)
        conf = str(controller_file(fleet, tmp_path))
        done = await asyncio.to_thread(cli, "fleet", "ls", "--config", conf, "--json")
        assert done.returncode == 0, done.stderr
        rows = json.loads(done.stdout)  # nothing but the JSON array on stdout
        assert isinstance(rows, list) and all(isinstance(r, dict) for r in rows)
        assert all(set(r) == LS_KEYS for r in rows), [sorted(r) for r in rows]
        by = {r["agent"]: r for r in rows}
        assert by["a1"]["job_kinds"] == ["tcp"] and by["a2"]["job_kinds"] == []
        assert by["a3"]["job_kinds"] == []  # no control channel: the file's jobs, from the publisher
        for r in rows:
            assert "tcp" in r["can_run"] and set(r["can_run"]) <= set(r["kinds"])
            icmp_ok = r["icmp_permitted"]
            assert ("icmp" in r["can_run"]) is icmp_ok
            assert r["cannot_run"] == ({} if icmp_ok else {"icmp": "no perm"})
        assert (by["a1"]["accepts_commands"], by["a1"]["accepts_config"]) == (True, True)
        assert (by["a3"]["accepts_commands"], by["a3"]["accepts_config"]) == (False, False)
        assert (by["a4"]["accepts_commands"], by["a4"]["accepts_config"]) == (False, True)

        table = await asyncio.to_thread(cli, "fleet", "ls", "--config", conf)
        assert table.returncode == 0, table.stderr
        print(table.stdout)
        for header in ("jobs", "can", "run", "accepts"):  # "can run" wraps in 80 columns
            assert f" {header} " in "".join(table.stdout.splitlines()[1:3]), table.stdout
        a4_line = next(line for line in table.stdout.splitlines() if " a4 " in line)
        assert " cfg " in a4_line and "cmd" not in a4_line, table.stdout
        a1_line = next(line for line in table.stdout.splitlines() if " a1 " in line)
        can_run = "all" if by["a1"]["icmp_permitted"] else "all but"
        assert " cmd,cfg " in a1_line and " tcp " in a1_line and f" {can_run} " in a1_line, table.stdout
    finally:
        sock.close()
