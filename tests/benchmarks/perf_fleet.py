"""Benchmarks 3 and 5: freshness at a steady rate, and a simulated fleet of 1,000 agents.

    .venv/bin/python -m tests.benchmarks.perf_fleet [--quick] [--only freshness,fleet] [--agents N] [--rate R]

A load generator of several processes, each holding many aiomqtt clients, one per simulated agent
(its own client id, its own topic ``edgeprobe/v1/<site>/<agent>/obs``), publishes real envelopes
(golden observations of the realistic mix, fresh ids) at QoS 1 the way an agent does with the
default ``publish.flush_interval_s`` of 1 s: observations complete spread over the second, and each
agent sends what it has once a second (at its own phase). One collector (child process, default
config) writes to influxd.

3. ``freshness``: 50 agents, 400 obs/s in all. The bench polls InfluxDB every 0.1 s for new points;
   freshness = first seen − (``started_at_ns`` + ``duration_ms``), the time from an observation's
   completion at the agent to its visibility in a query (agent batching included; + ≤ 0.1 s of polling).
5. ``fleet``: 1,000 agents (default 5 observations/s each: e.g. 50 targets every 10 s) in 4 processes
   for 150 s (quick: 10 s). Every second: observations published (acknowledged by the broker),
   accepted by the collector and waiting in its spool → lag. At the end every id is counted in InfluxDB.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import math
import multiprocessing as mp
import random
import time
from collections.abc import Sequence
from multiprocessing.sharedctypes import Synchronized
from typing import Any

import aiomqtt

from edgeprobe.agent.config import AUTOCORK_LINGER_S
from edgeprobe.probes.wake import WAKE_GRID_NS
from edgeprobe.schema import encode
from tests.benchmarks.perf_common import (
    OBS_MEASUREMENTS,
    CollectorProc,
    EnvelopeFactory,
    Row,
    collector_config,
    count_points,
    distinct_ids,
    median,
    pct,
    table,
    tree_cpu_s,
    wait_for,
    write_result,
)
from tests.benchmarks.perf_ingest import Stack

GRID_S = WAKE_GRID_NS / 1e9
QUIET = logging.getLogger("bench.mqtt")
QUIET.setLevel(logging.CRITICAL)


async def _agent(
    host: str,
    port: int,
    name: str,
    rate: float,
    until: float,
    published: Synchronized[int],
    failed: Synchronized[int],
    batching: str = "autocork",
) -> None:
    """One simulated agent. ``autocork`` (what the agent's publisher does): observations complete at
    random moments (``rate`` a second on average) and a message leaves when none is in flight
    (published, PUBACK not yet received) and the oldest ready observation has lingered
    ``AUTOCORK_LINGER_S``, rounded up to a tick of the agent's wake-up grid (``WAKE_GRID_NS``); what
    completes meanwhile goes with it. ``timer``: what completed during a
    second leaves together, once a second (the agent's publisher before autocorking,
    ``publish.flush_interval_s`` = 1 s)."""
    f = EnvelopeFactory(agent=name, site=f"site{hash(name) % 20}")
    async with aiomqtt.Client(host, port, identifier=f"bench-{name}", logger=QUIET, clean_session=True) as client:

        async def send(done_ns: list[int]) -> None:
            env = f.envelope(len(done_ns), now_ns=time.time_ns())
            for obs, done in zip(env["observations"], done_ns, strict=True):
                obs["started_at_ns"] = done - int(obs["duration_ms"] * 1e6)
            try:
                await client.publish(f.topic, encode(env), qos=1)
            except aiomqtt.MqttError:
                with failed.get_lock():
                    failed.value += len(done_ns)
                return
            with published.get_lock():
                published.value += len(done_ns)

        if batching == "timer":
            await _timer_agent(rate, until, send)
            return
        ready: list[int] = []
        in_flight: asyncio.Task[None] | None = None
        next_done = time.time() + random.expovariate(rate)
        while True:
            now = time.time()
            if in_flight is not None and in_flight.done():
                in_flight = None
            # The agent's linger (and its spool's group commit) ends on a tick of its wake-up grid.
            due = math.ceil((ready[0] / 1e9 + AUTOCORK_LINGER_S) / GRID_S) * GRID_S if ready else None
            if ready and in_flight is None and due is not None and now >= due:
                batch, ready = ready, []
                in_flight = asyncio.ensure_future(send(batch))
                continue
            if next_done >= until and not ready:
                break
            until_next = next_done - now if next_done < until else AUTOCORK_LINGER_S
            if due is not None:
                until_next = min(until_next, due - now)
            wake = [asyncio.ensure_future(asyncio.sleep(max(0.0, until_next)))]
            if in_flight is not None:
                wake.append(in_flight)
            await asyncio.wait(wake, return_when=asyncio.FIRST_COMPLETED)
            wake[0].cancel()
            if next_done < until and time.time() >= next_done:
                ready.append(time.time_ns())
                next_done += random.expovariate(rate)
        if in_flight is not None:
            await in_flight
        if ready:
            await send(ready)


async def _timer_agent(rate: float, until: float, send: Any) -> None:
    carry = 0.0
    next_tick = time.time() + random.random()
    while next_tick < until:
        await asyncio.sleep(max(0.0, next_tick - time.time()))
        carry += rate
        n = int(carry)
        carry -= n
        next_tick += 1.0
        if n:
            # completed at random moments of the last second (the publisher's batching wait)
            now_ns = time.time_ns()
            await send(sorted(now_ns - int(random.random() * 1e9) for _ in range(n)))


def _generator_main(
    host: str, port: int, names: list[str], rate: float, until: float, published: Any, failed: Any, batching: str
) -> None:
    async def run() -> None:
        await asyncio.gather(*(_agent(host, port, n, rate, until, published, failed, batching) for n in names))

    asyncio.run(run())


def start_generators(
    host: str,
    port: int,
    agents: int,
    rate_per_agent: float,
    duration_s: float,
    processes: int,
    tag: str,
    batching: str = "autocork",
) -> tuple[list[mp.process.BaseProcess], Any, Any, float]:
    ctx = mp.get_context("fork")
    published = ctx.Value("q", 0)
    failed = ctx.Value("q", 0)
    until = time.time() + 2.0 + duration_s  # 2 s to connect everyone
    names = [f"{tag}-a{i}" for i in range(agents)]
    procs: list[mp.process.BaseProcess] = []
    for p in range(processes):
        proc = ctx.Process(
            target=_generator_main,
            args=(host, port, names[p::processes], rate_per_agent, until, published, failed, batching),
        )
        proc.start()
        procs.append(proc)
    return procs, published, failed, until


def _new_points(stack: Stack, db: str, since_ns: int, seen: dict[str, float]) -> int:
    """Poll for points newer than ``since_ns``; note first-seen times; the newest timestamp seen."""
    now = time.time_ns()
    newest = since_ns
    for m in OBS_MEASUREMENTS:
        try:
            rows = stack.influx.rows(f'SELECT "id", "duration_ms" FROM "{m}" WHERE time > {since_ns}', db, epoch="ns")
        except Exception:  # the database may not exist yet
            continue
        for r in rows:
            if r["id"] not in seen and r.get("duration_ms") is not None:
                seen[r["id"]] = (now - (r["time"] + int(r["duration_ms"] * 1e6))) / 1e9
            newest = max(newest, r["time"])
    return newest


def bench_freshness(stack: Stack, quick: bool, batching: str = "autocork") -> dict[str, Any]:
    agents, rate, duration = 50, 8.0, (10.0 if quick else 60.0)
    db = stack.new_db("fresh")
    cfg = collector_config(stack.workdir, f"fresh{stack.runs}", stack.mosquitto.url, stack.influx.url, db)
    col = CollectorProc(cfg, stack.workdir / f"fresh{stack.runs}.stats.json").start()
    cpu0 = col.stats().get("cpu_s", 0.0)
    influx_cpu0 = tree_cpu_s(stack.influx.pid or 0)
    procs, published, _, until = start_generators(
        "127.0.0.1", stack.mosquitto.port, agents, rate, duration, 1, f"fr{stack.runs}", batching
    )
    seen: dict[str, float] = {}
    try:
        while time.time() < until + 3.0:
            # look back 10 s: points arrive out of timestamp order
            _new_points(stack, db, time.time_ns() - 10 * 10**9, seen)
            time.sleep(0.1)
        for p in procs:
            p.join()
        cpu_s = col.stats().get("cpu_s", 0.0) - cpu0
        influx_cpu_s = tree_cpu_s(stack.influx.pid or 0) - influx_cpu0
        final = col.stats()
    finally:
        col.stop()
    ages = list(seen.values())
    n = max(1, published.value)
    res = {"agents": agents, "obs_per_s": agents * rate, "duration_s": duration, "published": published.value,
           "seen": len(ages), "p50_s": median(ages), "p90_s": pct(ages, 90), "p99_s": pct(ages, 99),
           "max_s": max(ages, default=None), "goal_p99_s": 1.0, "poll_interval_s": 0.1,
           "agent_batching": batching, "messages": final.get("received_messages"),
           "collector_cpu_us_per_obs": cpu_s / n * 1e6, "influxd_cpu_us_per_point": influx_cpu_s / n * 1e6,
           "influx_writes": final.get("writes")}  # fmt: skip
    print(table(f"3. freshness: observation completed at the agent → visible in an InfluxDB query (s), "
                f"agents batching: {batching}",
                [("obs_per_s", "obs/s"), ("duration_s", "s"), ("seen", "observations"), ("messages", "messages"),
                 ("p50_s", "p50"), ("p90_s", "p90"), ("p99_s", "p99"), ("max_s", "max"),
                 ("collector_cpu_us_per_obs", "collector µs/obs"), ("influxd_cpu_us_per_point", "influxd µs/pt")],
                [res]))  # fmt: skip
    print("   goal p99 ≤ 1 s (polling adds ≤ 0.1 s)\n")
    return res


def bench_fleet(
    stack: Stack, quick: bool, agents: int, rate: float, processes: int = 4, batching: str = "autocork"
) -> dict[str, Any]:
    duration = 10.0 if quick else 150.0
    db = stack.new_db("fleet")
    cfg = collector_config(stack.workdir, f"fleet{stack.runs}", stack.mosquitto.url, stack.influx.url, db)
    col = CollectorProc(cfg, stack.workdir / f"fleet{stack.runs}.stats.json").start()
    cpu0 = col.stats().get("cpu_s", 0.0)
    procs, published, failed, _ = start_generators(
        "127.0.0.1", stack.mosquitto.port, agents, rate, duration, processes, f"fl{stack.runs}", batching
    )
    t_start = time.time() + 2.0
    try:
        return _follow_fleet(stack, db, col, procs, published, failed, t_start, cpu0, agents, rate, processes, duration)
    finally:
        col.stop()


def _follow_fleet(
    stack: Stack, db: str, col: CollectorProc, procs: list[mp.process.BaseProcess], published: Any, failed: Any,
    t_start: float, cpu0: float, agents: int, rate: float, processes: int, duration: float,
) -> dict[str, Any]:  # fmt: skip
    samples: list[Row] = []
    while any(p.is_alive() for p in procs):
        time.sleep(1.0)
        s = col.stats()
        pub = published.value
        acc = s.get("accepted_observations", 0)
        oldest = s.get("spool_oldest_at_ns")
        samples.append({"t_s": time.time() - t_start, "published": pub, "accepted": acc,
                        "behind_broker": pub - acc, "spool_lines": s.get("spool_lines", 0),
                        "spool_oldest_age_s": (time.time_ns() - oldest) / 1e9 if oldest else 0.0})  # fmt: skip
    total = published.value
    t_end_pub = time.time()
    drained = wait_for(lambda: col.stats().get("accepted_observations", 0) >= total
                       and col.stats().get("spool_lines", 1) == 0, 300, 0.05)  # fmt: skip
    drain_s = time.time() - t_end_pub
    cpu_s = col.stats().get("cpu_s", 0.0) - cpu0
    wall = time.time() - t_start
    final = col.stop()
    points = count_points(stack.influx, db)
    ids = distinct_ids(stack.influx, db)
    steady = [s for s in samples if 5 <= s["t_s"] <= duration]
    rates = [(b["accepted"] - a["accepted"]) for a, b in itertools.pairwise(steady)]
    res = {
        "agents": agents, "processes": processes, "obs_per_s_per_agent": rate, "offered_obs_per_s": agents * rate,
        "duration_s": duration, "published": total, "publish_failed": failed.value,
        # the generators publish from their connect to `until`: duration + 2 s
        "sustained_obs_per_s": total / (duration + 2.0),
        "accepted_obs_per_s_median": median(rates),
        "behind_max": max((s["behind_broker"] for s in steady), default=None),
        "spool_oldest_age_max_s": max((s["spool_oldest_age_s"] for s in steady), default=None),
        "drain_after_stop_s": drain_s, "drained": drained, "collector_cpu_cores": cpu_s / wall,
        "points_in_influx": points, "distinct_ids_in_influx": ids, "lost": total - ids,
        "messages": final.get("received_messages"),
    }  # fmt: skip
    print(table(f"5. simulated fleet: {agents:,} agents × {rate:g} obs/s, {processes} generator processes, "
                f"{duration:.0f} s, one collector",
                [("offered_obs_per_s", "offered obs/s"), ("sustained_obs_per_s", "sustained obs/s"),
                 ("accepted_obs_per_s_median", "collector obs/s (median s)"), ("behind_max", "max behind (obs)"),
                 ("spool_oldest_age_max_s", "max spool age s"), ("drain_after_stop_s", "drain s"),
                 ("collector_cpu_cores", "collector cores"), ("published", "published"),
                 ("distinct_ids_in_influx", "ids in influx"), ("lost", "lost")], [res]))  # fmt: skip
    print()
    return {**res, "samples": samples}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="freshness,fleet")
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=5.0, help="observations per second per agent")
    ap.add_argument(
        "--agent-batching", choices=("autocork", "timer"), default="autocork",
        help="how the simulated agents batch: as the agent does (autocork), or once a second (timer, before)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    stack = Stack()
    try:
        if "freshness" in only:
            res = bench_freshness(stack, args.quick, args.agent_batching)
            print("   →", write_result("perf_freshness", {"quick": args.quick, **res}))
        if "fleet" in only:
            res = bench_fleet(stack, args.quick, args.agents, args.rate, batching=args.agent_batching)
            print("   →", write_result("perf_fleet", {"quick": args.quick, **res}))
    finally:
        stack.close()


if __name__ == "__main__":
    main()
