"""End to end on real servers: agent (ICMP, TCP, HTTP jobs on loopback) → mosquitto → collector → InfluxDB.

Every observation the agent produced must be in InfluxDB exactly once (counted by id), with the
right tags and plausible values, read back with InfluxQL over the v1 query API.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import pytest
from aiohttp import web

from edgeprobe.agent.config import AgentConfig, build_jobs
from edgeprobe.agent.daemon import run_agent
from edgeprobe.collector.config import CollectorConfig
from edgeprobe.collector.service import run_collector
from edgeprobe.configfile import convert
from edgeprobe.schema import Observation
from tests.support.wait import wait_for_async

pytestmark = pytest.mark.integration


async def http_target() -> tuple[web.AppRunner, int]:
    async def hello(_: web.Request) -> web.Response:
        return web.Response(text="x" * 1234)

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


def rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for series in result["results"][0].get("series", []) or []:
        for values in series["values"]:
            row = dict(zip(series["columns"], values, strict=True))
            row["_measurement"] = series["name"]
            out.append(row)
    return out


async def wait_for_count(influxdb: Any, db: str, want: int, timeout_s: float = 20) -> int:
    def count() -> int:
        res = influxdb.query('SELECT count("seq") FROM /^edgeprobe_/', db)
        return sum(int(r["count"]) for r in rows(res))

    got: int = await wait_for_async(
        lambda: asyncio.to_thread(count),
        timeout_s,
        f"{want} observations in InfluxDB",
        until=lambda n: n >= want,
        interval_s=0.3,
    )
    return got


async def test_agent_to_influx_exactly_once(mosquitto: Any, influxdb: Any, influx_db: str, tmp_path: Any) -> None:
    runner, port = await http_target()
    try:
        acfg = convert(
            {
                "agent": {
                    "id": "e2e-a1",
                    "site": "lab-1",
                    "labels": {"tier": "pop"},
                    "latitude": 50.1109,  # Frankfurt
                    "longitude": 8.6821,
                },
                "broker": {"url": mosquitto.url},
                "publish": {"flush_interval_s": 0.2},
                "spool": {"path": str(tmp_path / "agent-spool.db")},
                "jobs": [
                    {
                        "kind": "icmp",
                        "targets": [
                            "127.0.0.1",
                            # London, 637 km away: the physical floor is written with it
                            {"target": "::1", "latitude": 51.5074, "longitude": -0.1278, "labels": {"city": "lon"}},
                        ],
                        "interval_s": 1.0,
                        "options": {"count": 3, "interval_s": 0.05, "timeout_s": 0.5},
                        "labels": {"path": "loopback"},
                    },
                    {
                        "kind": "tcp",
                        "targets": [f"127.0.0.1:{port}"],
                        "interval_s": 1.0,
                        "options": {"count": 2, "interval_s": 0.05, "timeout_s": 0.3},
                    },
                    {
                        "kind": "http",
                        "targets": [f"http://127.0.0.1:{port}/"],
                        "interval_s": 1.0,
                        "options": {"timeout_s": 0.5},
                    },
                ],
            },
            AgentConfig,
            "e2e",
        )
        jobs = build_jobs(acfg, "e2e")
        ccfg = convert(
            {
                "broker": {"url": mosquitto.url, "client_id": f"e2e-collector-{influx_db}"},
                "influx": {"api": "v1", "url": influxdb.url, "database": influx_db, "flush_interval_s": 0.2},
                "spool": {"path": str(tmp_path / "collector-spool.sqlite")},
            },
            CollectorConfig,
            "e2e",
        )
        produced: list[Observation] = []
        collector_stop, agent_stop = asyncio.Event(), asyncio.Event()
        collector_ready = asyncio.Event()
        collector_task = asyncio.create_task(run_collector(ccfg, stop=collector_stop, on_ready=collector_ready.set))
        await asyncio.wait_for(collector_ready.wait(), 20)  # subscribed before the agent publishes
        agent_task = asyncio.create_task(run_agent(acfg, jobs, stop=agent_stop, tap=produced.append))
        await wait_for_async(  # about four intervals: the counts asserted below
            lambda: collections.Counter(o.kind for o in produced),
            30,
            "two ICMP, one TCP and one HTTP run per interval, three intervals",
            until=lambda n: n["icmp"] >= 6 and n["tcp"] >= 3 and n["http"] >= 3,
        )
        agent_stop.set()
        handles = await asyncio.wait_for(agent_task, 15)
        assert len(handles.outbox) == 0 and handles.outbox.dropped == 0
        got = await wait_for_count(influxdb, influx_db, len(produced))
        collector_stop.set()
        await asyncio.wait_for(collector_task, 15)
    finally:
        await runner.cleanup()

    by_kind = collections.Counter(o.kind for o in produced)
    print(f"\ne2e: produced {len(produced)} observations {dict(by_kind)}; InfluxDB count(seq) = {got}")
    assert by_kind["icmp"] >= 6 and by_kind["tcp"] >= 3 and by_kind["http"] >= 3, by_kind
    assert got == len(produced)

    res = await asyncio.to_thread(
        influxdb.query, "SELECT * FROM edgeprobe_icmp, edgeprobe_tcp, edgeprobe_http", influx_db
    )
    stored = rows(res)
    ids = collections.Counter(r["id"] for r in stored)
    assert set(ids) == {o.id for o in produced}
    assert max(ids.values()) == 1  # exactly once
    print(f"e2e: {len(stored)} points read back, {len(ids)} distinct ids, max copies per id {max(ids.values())}")
    for r in stored:
        assert r["agent"] == "e2e-a1" and r["site"] == "lab-1" and r["tier"] == "pop"
        assert r["outcome"] == "ok", r
        assert r["_measurement"] == f"edgeprobe_{r['job']}"
        if r["_measurement"] == "edgeprobe_icmp":
            assert r["target"] in ("127.0.0.1", "::1") and r["path"] == "loopback"
            if r["target"] == "::1":
                assert r["city"] == "lon"
                assert 630 < r["distance_km"] < 645
                assert r["floor_rtt_ms"] == pytest.approx(2 * r["distance_km"] / 204.218, rel=1e-4)
                assert r["inflation_ratio"] == pytest.approx(r["rtt_min_ms"] / r["floor_rtt_ms"], rel=1e-3)
            else:
                assert r["distance_km"] is None and r["city"] is None  # no coordinates: no floor
            assert r["sent"] == 3 and r["received"] == 3 and r["loss_ratio"] == 0
            assert 0 < r["rtt_min_ms"] <= r["rtt_avg_ms"] <= r["rtt_max_ms"] < 20
        elif r["_measurement"] == "edgeprobe_tcp":
            assert r["target"] == f"127.0.0.1:{port}"
            assert 0 < r["connect_ms"] < 50
        else:
            assert r["target"] == f"http://127.0.0.1:{port}/"
            assert r["status"] == 200 and r["bytes"] == 1234
            assert 0 < r["connect_ms"] <= r["ttfb_ms"] <= r["total_ms"] < 200
    # seq is per agent and unique
    assert len({r["seq"] for r in stored}) == len(stored)
