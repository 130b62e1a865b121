"""``edgeprobe demo``: the whole pipeline on one machine, without Docker.

Starts mosquitto and influxd as plain processes on free loopback ports (the same launcher the
tests use), a local HTTP target, the collector and an agent probing loopback targets, and shows
what arrives in a live terminal view. Ctrl-C (or ``--duration``) stops everything it started.
Traffic stays on 127.0.0.1 / ::1.

``--keep DIR``: mosquitto's and InfluxDB's data, configs and the spools stay in DIR, and their
ports are chosen once (``DIR/ports.json``) and reused by every later run with the same DIR, so a
Grafana datasource pointed at the kept InfluxDB keeps working; at the end the demo prints the steps
to see the data in Grafana.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from rich.console import Console, Group
from rich.live import Live

from edgeprobe.agent.config import AgentConfig, build_jobs
from edgeprobe.agent.daemon import run_agent
from edgeprobe.configfile import convert
from edgeprobe.livetable import View
from edgeprobe.responder import ResponderSettings, serve_responder

# Two local responders standing in for an edge and a core inference site. Their time to first
# token is the server's own (queue + prefill stand-in): loopback adds no distance.
RESPONDERS = {
    "edge": {"ttft_ms": 40.0, "token_interval_ms": 15.0, "tokens": 24, "model_suffix": "edge"},
    "core": {"ttft_ms": 120.0, "token_interval_ms": 25.0, "tokens": 24, "model_suffix": "core"},
}


DRAIN_TIMEOUT_S = 15.0  # after the agent stops: how long the collector gets to write the last batches


def screen(view: View, header: str, written: int | None) -> Group:
    """The live table (:mod:`edgeprobe.livetable`) with what reached InfluxDB below it."""
    return view.render(header, f"{view.seen} observations produced, {'?' if written is None else written} in InfluxDB.")


async def _http_target() -> tuple[web.AppRunner, int]:
    async def hello(_: web.Request) -> web.Response:
        return web.Response(text="edgeprobe demo target\n")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(runner.addresses[0][1])


def agent_config(broker_url: str, http_port: int, responder_urls: dict[str, str], interval_s: float) -> dict[str, Any]:
    """The demo agent's config: every kind, each run short enough for ``interval_s`` (>= 4 s)."""
    return {
        "agent": {"id": "demo-agent", "site": "local", "labels": {"pop": "demo"}},
        "broker": {"url": broker_url},
        "jobs": [
            {
                "kind": "icmp",
                "targets": ["127.0.0.1", "::1"],
                "interval_s": interval_s,
                "options": {"count": 5, "interval_s": 0.1, "timeout_s": 1.0},
            },
            {
                "kind": "tcp",
                "targets": [f"127.0.0.1:{http_port}"],
                "interval_s": interval_s,
                "options": {"count": 3, "interval_s": 0.1, "timeout_s": 0.5},
            },
            {
                "kind": "http",
                "targets": [f"http://127.0.0.1:{http_port}/"],
                "interval_s": interval_s,
                "options": {"timeout_s": 2.0},
            },
            {
                "kind": "inference",
                "targets": [{"target": url, "labels": {"tier": tier}} for tier, url in responder_urls.items()],
                "interval_s": interval_s,
                "options": {"model": "demo", "max_tokens": 16, "timeout_s": 2.0, "first_token_timeout_s": 1.5},
            },
        ],
    }


PORTS_FILE = "ports.json"
DATABASE = "edgeprobe"


def kept_ports(keep_dir: Path) -> dict[str, int]:
    """The ports of a kept demo: read from ``keep_dir/ports.json``, else chosen now and saved there."""
    from edgeprobe.localstack import free_ports

    path = keep_dir / PORTS_FILE
    names = ("mosquitto", "influxd_http", "influxd_rpc")
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(saved, dict) and all(isinstance(saved.get(n), int) for n in names):
            return {n: int(saved[n]) for n in names}
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    keep_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(json.dumps(ports, indent=2) + "\n", encoding="utf-8")
    return ports


def grafana_steps(keep_dir: Path, influx_url: str, influx_config: Path, influxd: str) -> list[str]:
    """How to look at a kept demo's data in Grafana, with this run's paths and URL."""
    grafana = keep_dir / "grafana"
    prov = grafana / "provisioning"
    return [
        f"Kept in {keep_dir}: mosquitto/ and influxd/ (data, config, log), the spools, {PORTS_FILE} (the same",
        f"ports next time: edgeprobe demo --keep {keep_dir}). To see the data in Grafana:",
        "  1. Start InfluxDB on the kept data (loopback only, no authentication: a demo):",
        f"       {influxd} -config {influx_config}",
        "  2. Export the dashboards and provisioning files:",
        f"       edgeprobe dashboards export {grafana}",
        f"  3. Datasource: in {prov / 'datasources' / 'edgeprobe.yaml'} set",
        f"       url: {influx_url}   database: {DATABASE}   jsonData.dbName: {DATABASE}",
        "     and delete user and secureJsonData (this InfluxDB has no users); keep uid edgeprobe-influxdb.",
        f"     (In Grafana's UI instead: an InfluxDB data source, query language InfluxQL, URL {influx_url},",
        f"     database {DATABASE}.)",
        f"  4. Dashboards: in {prov / 'dashboards' / 'edgeprobe.yaml'} set options.path to",
        f"       {grafana / 'dashboards'}",
        f"     and start Grafana with GF_PATHS_PROVISIONING={prov} (a Grafana in Docker: --network host,",
        f"     both folders mounted); or import {grafana / 'import'}/*.json (Dashboards > New > Import),",
        "     which asks for the datasource of step 3.",
    ]


async def run_demo(duration_s: float | None, interval_s: float, console: Console, keep_dir: Path | None = None) -> int:
    from edgeprobe.collector.config import CollectorConfig
    from edgeprobe.collector.service import run_collector
    from edgeprobe.localstack import InfluxServer, MosquittoServer

    if keep_dir is not None:
        ports = await asyncio.to_thread(kept_ports, keep_dir)
        broker_server = MosquittoServer(port=ports["mosquitto"], workdir=keep_dir / "mosquitto")
        influx_server = InfluxServer(
            port=ports["influxd_http"], rpc_port=ports["influxd_rpc"], workdir=keep_dir / "influxd"
        )
    else:
        broker_server, influx_server = MosquittoServer(), InfluxServer()
    started_ns = time.time_ns()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    view = View()
    console.print("[bold]edgeprobe demo[/bold]: starting mosquitto and influxd on free loopback ports …")
    async with contextlib.AsyncExitStack() as stack:
        broker = await stack.enter_async_context(broker_server)
        influx = await stack.enter_async_context(influx_server)
        influx_config = influx.config_path
        responder_urls: dict[str, str] = {}
        for tier, settings in RESPONDERS.items():
            running = await stack.enter_async_context(
                serve_responder("127.0.0.1", 0, convert(settings, ResponderSettings, "demo"))
            )
            responder_urls[tier] = running.url
        runner, http_port = await _http_target()
        database = DATABASE
        ccfg = convert(
            {
                "broker": {"url": broker.url},
                "influx": {"api": "v1", "url": influx.url, "database": database},
                # removed with the workdir (kept with --keep)
                "spool": {"path": str(influx.workdir / "collector-spool.sqlite")},
            },
            CollectorConfig,
            "demo",
        )
        raw = agent_config(broker.url, http_port, responder_urls, interval_s)
        raw["spool"] = {"path": str(broker.workdir / "agent-spool.db")}  # removed with the workdir
        acfg = convert(raw, AgentConfig, "demo")
        jobs = build_jobs(acfg, "demo")
        header = (
            f"mosquitto {broker.url}   InfluxDB {influx.url} database {database!r}   responders "
            + "  ".join(f"{tier} {url}" for tier, url in responder_urls.items())
            + "\n"
            f"Grafana: add an InfluxDB data source, query language InfluxQL, URL {influx.url}, "
            f"database {database}   (Ctrl-C stops everything)"
        )
        collector_stop = asyncio.Event()
        collector_task = asyncio.create_task(run_collector(ccfg, stop=collector_stop))
        agent_stop = asyncio.Event()
        agent_task = asyncio.create_task(run_agent(acfg, jobs, stop=agent_stop, tap=view.add))
        written: int | None = None
        deadline = None if duration_s is None else loop.time() + duration_s
        try:
            with Live(screen(view, header, written), console=console, refresh_per_second=4) as live:
                while not stop.is_set() and (deadline is None or loop.time() < deadline):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 1.0)
                    written = await asyncio.to_thread(count_points, influx, database, started_ns)
                    live.update(screen(view, header, written))
                agent_stop.set()
                await agent_task
                # The collector writes the last batches: wait until InfluxDB holds everything produced
                # (a loaded machine takes longer than an idle one), at most DRAIN_TIMEOUT_S.
                drain_deadline = loop.time() + DRAIN_TIMEOUT_S
                while loop.time() < drain_deadline:
                    written = await asyncio.to_thread(count_points, influx, database, started_ns)
                    if written is not None and written >= view.seen:
                        break
                    await asyncio.sleep(0.2)
                collector_stop.set()
                await collector_task
                written = await asyncio.to_thread(count_points, influx, database, started_ns)
                live.update(screen(view, header, written))
        finally:
            agent_stop.set()
            collector_stop.set()
            for task in (agent_task, collector_task):
                if not task.done():
                    task.cancel()
            await asyncio.gather(agent_task, collector_task, return_exceptions=True)
            await runner.cleanup()
    produced = view.seen
    console.print(f"\nstopped: {produced} observations produced, {written} written to InfluxDB; nothing left running.")
    if keep_dir is not None:
        from edgeprobe.localstack import find_binary

        influxd = find_binary("influxd") or "influxd"
        for line in grafana_steps(keep_dir, influx_server.url, influx_config, influxd):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    return 0


def count_points(influx: Any, database: str, since_ns: int = 0) -> int | None:
    """Points this run wrote (time >= ``since_ns``: a kept database holds earlier runs' too)."""
    try:
        res = influx.query(f'SELECT count("seq") FROM /^edgeprobe_/ WHERE time >= {since_ns}', db=database)
    except Exception:
        return None
    total = 0
    for series in res.get("results", [{}])[0].get("series", []) or []:
        total += int(series["values"][0][1])
    return total


def main(duration_s: float | None, interval_s: float, keep_dir: str | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)  # piped: wide enough for the table rather than 80 columns
    keep = None if keep_dir is None else Path(keep_dir).absolute()
    return asyncio.run(run_demo(duration_s, interval_s, console, keep))
