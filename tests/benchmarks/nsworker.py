"""What the truth benchmarks run inside a lab namespace (``ip netns exec NS python -m tests.benchmarks.nsworker``).

* ``serve``: a small HTTP and HTTPS server (aiohttp) for the HTTP-phase benchmark.
* ``http URL N``: N edgeprobe HTTP probes, one after the other, each on a fresh connection;
  prints one JSON object per probe (the observation's fields). ``http-loop``: the same for each
  URL read from stdin, so a caller can interleave them with curl runs one by one.
* ``load CONFIG_JSON``: ONE real agent process (``run_agent``: scheduler, probes, spool, publisher,
  against a mosquitto started in this namespace) for a while; prints one JSON summary with the
  lab path's observations, the load job's counts, and this process's own CPU time and RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec


def _rss_kib() -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _serve(host: str, port: int, tls_port: int | None, cert: str | None, key: str | None) -> None:
    from aiohttp import web

    async def index(request: web.Request) -> web.Response:
        return web.Response(text="edgeprobe lab\n")

    app = web.Application()
    app.router.add_get("/", index)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    if tls_port and cert and key:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        await web.TCPSite(runner, host, tls_port, ssl_context=ctx).start()
    print("ready", flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
    finally:
        await runner.cleanup()


async def _http(url: str, n: int, insecure: bool, gap_s: float) -> None:
    from edgeprobe.probes.context import ProbeContext
    from edgeprobe.probes.handler import run_probe
    from edgeprobe.probes.http import HttpConfig
    from edgeprobe.probes.registry import KINDS

    config = HttpConfig(verify_tls=not insecure)
    async with ProbeContext() as ctx:
        for i in range(n):
            obs = await run_probe(KINDS["http"], url, config, ctx, seq=i)
            print(json.dumps({"outcome": obs.outcome, "reason": obs.reason, **obs.fields}), flush=True)
            await asyncio.sleep(gap_s)


async def _http_loop(insecure: bool) -> None:
    """One probe per URL read from stdin, its fields printed as one JSON line; until stdin closes."""
    from edgeprobe.probes.context import ProbeContext
    from edgeprobe.probes.handler import run_probe
    from edgeprobe.probes.http import HttpConfig
    from edgeprobe.probes.registry import KINDS

    config = HttpConfig(verify_tls=not insecure)
    loop = asyncio.get_running_loop()
    async with ProbeContext() as ctx:
        seq = 0
        while url := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
            obs = await run_probe(KINDS["http"], url, config, ctx, seq=seq)
            seq += 1
            print(json.dumps({"outcome": obs.outcome, "reason": obs.reason, **obs.fields}), flush=True)


async def _load(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one agent with the jobs in ``spec`` for ``warmup_s + duration_s``; measure the window."""
    from edgeprobe.agent.config import load_agent_config
    from edgeprobe.agent.daemon import AgentHandles, run_agent
    from edgeprobe.localstack import MosquittoServer
    from edgeprobe.schema import Observation

    broker = MosquittoServer().start()
    tmp = Path(tempfile.mkdtemp(prefix="eplab-agent-"))
    try:
        cfg_doc = {
            "agent": {"id": "bench-agent", "site": "lab", "max_concurrent_probes": spec.get("max_concurrent", 512)},
            "broker": {"url": broker.url},
            "spool": {"path": str(tmp / "spool.db")},
            "jobs": spec["jobs"],
        }
        path = tmp / "agent.json"  # JSON is YAML
        path.write_text(json.dumps(cfg_doc))
        cfg, jobs = load_agent_config(path)
        lab_job = spec["lab_job"]
        lab_obs: list[dict[str, Any]] = []
        load = {"runs": 0, "sent": 0, "received": 0, "overloaded": 0, "lag_ms": []}
        window = {"on": False}

        def tap(obs: Observation) -> None:
            if obs.job == lab_job:
                lab_obs.append(
                    {
                        "started_at_ns": obs.started_at_ns,
                        "rtts_ms": obs.fields.get("rtts_ms"),
                        "sched_lag_ms": obs.sched_lag_ms,
                        "overloaded": obs.overloaded,
                        "in_window": window["on"],
                    }
                )
            elif window["on"]:
                load["runs"] += 1
                load["sent"] += int(obs.fields.get("sent") or 0)  # type: ignore[call-overload]
                load["received"] += int(obs.fields.get("received") or 0)  # type: ignore[call-overload]
                load["overloaded"] += bool(obs.overloaded)
                load["lag_ms"].append(obs.sched_lag_ms)

        stop = asyncio.Event()
        started: asyncio.Future[AgentHandles] = asyncio.get_running_loop().create_future()
        agent = asyncio.create_task(run_agent(cfg, jobs, stop=stop, started=started, tap=tap))
        handles = await started
        await asyncio.sleep(float(spec.get("warmup_s", 3.0)))
        window["on"] = True
        cpu0, t0 = _cpu_s(), time.monotonic()
        await asyncio.sleep(float(spec["duration_s"]))
        cpu1, t1 = _cpu_s(), time.monotonic()
        window["on"] = False
        rss = _rss_kib()
        stop.set()
        await agent
        lags = sorted(x for x in load.pop("lag_ms") if x is not None)  # type: ignore[attr-defined]
        return {
            "window_s": t1 - t0,
            "cpu_s": cpu1 - cpu0,
            "cpu_share": (cpu1 - cpu0) / (t1 - t0),
            "rss_kib": rss.get("VmRSS"),
            "rss_peak_kib": rss.get("VmHWM"),
            "load": load,
            "load_lag_p50_ms": lags[len(lags) // 2] if lags else None,
            "load_lag_p99_ms": lags[int(len(lags) * 0.99)] if lags else None,
            "skipped_slots": handles.scheduler.skipped_slots,
            "overloaded_runs": handles.scheduler.overloaded_runs,
            "lab": lab_obs,
        }
    finally:
        broker.stop()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--host", required=True)
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--tls-port", type=int)
    serve.add_argument("--cert")
    serve.add_argument("--key")
    http = sub.add_parser("http")
    http.add_argument("url")
    http.add_argument("n", type=int)
    http.add_argument("--insecure", action="store_true")
    http.add_argument("--gap-s", type=float, default=0.02)
    loop = sub.add_parser("http-loop", help="probe each URL read from stdin")
    loop.add_argument("--insecure", action="store_true")
    load = sub.add_parser("load")
    load.add_argument("spec", help="JSON: jobs, lab_job, duration_s, warmup_s, max_concurrent")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        asyncio.run(_serve(args.host, args.port, args.tls_port, args.cert, args.key))
    elif args.cmd == "http":
        asyncio.run(_http(args.url, args.n, args.insecure, args.gap_s))
    elif args.cmd == "http-loop":
        asyncio.run(_http_loop(args.insecure))
    else:
        result = asyncio.run(_load(json.loads(args.spec)))
        sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
