"""End to end: agent inference jobs → mosquitto → collector → InfluxDB, against the responder.

One job streams normally (with an API key from the environment), the others get a failure from
the responder on every run (429, 500, a JSON body, a cut stream, silence, an error event): every
job keeps producing observations with its own outcome, every one lands in ``edgeprobe_inference``
with the ``model``/``api`` tags, and the API key appears in no log line, no MQTT message (all of
``edgeprobe/#`` is recorded) and no InfluxDB value (``SELECT * FROM /.*/``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from typing import Any

import aiomqtt
import pytest

from edgeprobe.agent.config import AgentConfig, build_jobs
from edgeprobe.agent.daemon import run_agent
from edgeprobe.collector.config import CollectorConfig
from edgeprobe.collector.service import run_collector
from edgeprobe.configfile import convert
from edgeprobe.responder import ResponderSettings, serve_responder
from edgeprobe.schema import Observation
from tests.support.wait import wait_for_async

pytestmark = pytest.mark.integration

KEY = "sk-e2e-SECRET-3b9d0c7a41e6f258"
KEY_ENV = "EDGEPROBE_E2E_INFERENCE_KEY"
SETTINGS = ResponderSettings(ttft_ms=30, token_interval_ms=5, tokens=8, seed=5, keepalive_interval_ms=100)

JOBS = {  # job name → (api, responder failure mode, expected outcome)
    "inf-ok": ("openai-chat", None, "ok"),
    "inf-ollama": ("ollama-chat", None, "ok"),
    "inf-429": ("openai-chat", "429", "http_error"),
    "inf-500": ("anthropic", "500", "http_error"),
    "inf-json": ("openai-completions", "json", "not_streaming"),
    "inf-cut": ("tgi", "cut", "stream_cut"),
    "inf-silent": ("openai-chat", "silent", "timeout"),
    "inf-error": ("anthropic", "error-event", "stream_error"),
}


def rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for series in result["results"][0].get("series", []) or []:
        for values in series["values"]:
            row = dict(zip(series["columns"], values, strict=True))
            row["_measurement"] = series["name"]
            out.append(row)
    return out


def in_memory_spool(raw: dict[str, Any], typ: type) -> None:
    if "spool" in typ.__struct_fields__:  # configs with a durable spool: keep this test's in memory
        raw["spool"] = {"path": None}


async def record_mqtt(host: str, port: int, seen: list[tuple[str, bytes]], ready: asyncio.Event) -> None:
    async with aiomqtt.Client(host, port) as client:
        await client.subscribe("edgeprobe/#", qos=1)
        ready.set()
        async for msg in client.messages:
            seen.append((str(msg.topic), bytes(msg.payload)))  # type: ignore[arg-type]


async def test_inference_jobs_end_to_end(
    mosquitto: Any, influxdb: Any, influx_db: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, KEY)
    mqtt_seen: list[tuple[str, bytes]] = []
    produced: list[Observation] = []
    async with serve_responder("127.0.0.1", 0, SETTINGS, shutdown_timeout_s=0.3) as responder:
        jobs_raw = []
        for name, (api, fail, _) in JOBS.items():
            options: dict[str, Any] = {
                "model": f"e2e-{api}",
                "api": api,
                "api_key_env": KEY_ENV,
                "max_tokens": 6,
                "timeout_s": 1.0,
                "first_token_timeout_s": 0.5,
            }
            if fail is not None:
                options["extra_headers"] = {"x-edgeprobe-fail": fail}
            jobs_raw.append(
                {"name": name, "kind": "inference", "targets": [responder.url], "interval_s": 3.0, "options": options}
            )
        agent_raw: dict[str, Any] = {
            "agent": {"id": "e2e-inf", "site": "lab-2", "labels": {"tier": "pop"}},
            "broker": {"url": mosquitto.url},
            "publish": {"flush_interval_s": 0.2},
            "jobs": jobs_raw,
        }
        in_memory_spool(agent_raw, AgentConfig)
        acfg = convert(agent_raw, AgentConfig, "e2e")
        jobs = build_jobs(acfg, "e2e")
        collector_raw: dict[str, Any] = {
            "broker": {"url": mosquitto.url, "client_id": f"e2e-inf-collector-{influx_db}"},
            "influx": {"api": "v1", "url": influxdb.url, "database": influx_db, "flush_interval_s": 0.2},
        }
        in_memory_spool(collector_raw, CollectorConfig)
        ccfg = convert(collector_raw, CollectorConfig, "e2e")

        mqtt_ready = asyncio.Event()
        mqtt_task = asyncio.create_task(record_mqtt(mosquitto.host, mosquitto.port, mqtt_seen, mqtt_ready))
        await asyncio.wait_for(mqtt_ready.wait(), 10)
        collector_stop, agent_stop = asyncio.Event(), asyncio.Event()
        collector_ready = asyncio.Event()
        collector_task = asyncio.create_task(run_collector(ccfg, stop=collector_stop, on_ready=collector_ready.set))
        await asyncio.wait_for(collector_ready.wait(), 20)  # subscribed before the agent publishes
        agent_task = asyncio.create_task(run_agent(acfg, jobs, stop=agent_stop, tap=produced.append))
        await wait_for_async(  # two runs of every job (asserted below)
            lambda: collections.Counter(o.job for o in produced),
            30,
            "two runs of every job",
            until=lambda runs: all(runs[name] >= 2 for name in JOBS),
        )
        agent_stop.set()
        await asyncio.wait_for(agent_task, 15)

        def inference_rows() -> list[dict[str, Any]]:
            return rows(influxdb.query("SELECT * FROM edgeprobe_inference", influx_db))

        stored = await wait_for_async(
            lambda: asyncio.to_thread(inference_rows),
            20,
            f"the {len(produced)} observations in InfluxDB",
            until=lambda got: len(got) >= len(produced),
            interval_s=0.3,
        )
        everything = await asyncio.to_thread(influxdb.query, "SELECT * FROM /.*/", influx_db)
        collector_stop.set()
        await asyncio.wait_for(collector_task, 15)

        def agent_states() -> list[str]:
            return [json.loads(p)["state"] for t, p in mqtt_seen if t.endswith("/e2e-inf/status")]

        # The agent's last message is its "offline" status: everything it sent before reached the recorder.
        await wait_for_async(
            agent_states, 10, "the agent's offline status at the recorder", until=lambda s: s[-1:] == ["offline"]
        )
        mqtt_task.cancel()
        await asyncio.gather(mqtt_task, return_exceptions=True)

    # every job kept running whatever the endpoint answered, each with its own outcome
    per_job = collections.defaultdict(list)
    for obs in produced:
        per_job[obs.job].append(obs)
    for name, (_, _, outcome) in JOBS.items():
        assert len(per_job[name]) >= 2, (name, len(per_job[name]))
        assert {o.outcome for o in per_job[name]} == {outcome}, (name, [(o.outcome, o.reason) for o in per_job[name]])

    # all of them in InfluxDB, exactly once, with model and api as tags
    assert sorted(r["id"] for r in stored) == sorted(o.id for o in produced)
    by_id = {o.id: o for o in produced}
    for r in stored:
        obs = by_id[r["id"]]
        api, _, outcome = JOBS[obs.job or ""]
        assert r["_measurement"] == "edgeprobe_inference"
        assert r["agent"] == "e2e-inf" and r["site"] == "lab-2" and r["tier"] == "pop"
        assert r["target"] == responder.url and r["job"] == obs.job
        assert r["model"] == f"e2e-{api}" and r["api"] == api and r["outcome"] == outcome
        assert r["connection"] == "new" and r["connect_ms"] is not None and r["net_rtt_ms"] is not None
        if outcome == "ok":
            assert r["chunks"] == 6 and r["output_tokens"] == 6 and r["output_tokens_source"] == "usage"
            assert r["ttft_ms"] >= SETTINGS.ttft_ms and r["itl_p50_ms"] is not None and r["server_ms"] is not None
            assert r["reason"] is None
        else:
            assert r["reason"] == obs.reason and r["reason"]
        if obs.job == "inf-429":
            assert r["status"] == 429 and r["reason"].startswith("HTTP 429 Too Many Requests: Rate limit reached")
        if obs.job == "inf-ollama":
            assert r["prompt_eval_ms"] is not None and r["load_ms"] is not None

    # the key went nowhere but to the server
    assert KEY not in caplog.text
    obs_messages = [p for t, p in mqtt_seen if t.endswith("/obs")]
    assert obs_messages, "no observation message recorded"
    for topic, payload in mqtt_seen:
        assert KEY not in topic and KEY.encode() not in payload
    assert KEY not in json.dumps(everything)
    assert KEY_ENV not in json.dumps(everything)  # not even the variable's name is stored
