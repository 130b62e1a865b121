"""Benchmarks 1 and 6: the collector's ingest ceiling next to InfluxDB's own, one and two collectors.

    .venv/bin/python -m tests.benchmarks.perf_ingest [--quick] [--only ingest,horizontal] [--profile]

1. ``ingest``: N observations (a realistic mix of kinds from the golden samples, 50 per message,
   50 agents) published at QoS 1 by 2 publisher processes through mosquitto into one collector
   (a child process, default config: SQLite spool with synchronous=full, 5,000-line gzip batches)
   into influxd; and, alternating with it in the same run, the same points written straight to
   influxd by a minimal client (5,000-line gzip batches, 4 writers in flight). Rate = observations /
   time from the first publish to the last point written. ``collector / direct`` per pair, median
   over the runs. ``--profile`` samples the collector with py-spy during one extra run.
6. ``horizontal``: the same with two collectors sharing ``$share/bench/...``
   (``subscription.shared_group``) next to one collector and the direct writer; then a run in which
   one of the two is stopped (SIGTERM) mid-run: every id must be in InfluxDB exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import logging
import multiprocessing as mp
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt

from edgeprobe.collector.decode import decode_message
from edgeprobe.collector.lineproto import encode_batch
from edgeprobe.localstack import InfluxServer, MosquittoServer
from edgeprobe.probes.registry import KINDS
from tests.benchmarks.perf_common import (
    PREFIX,
    CollectorProc,
    Row,
    chunks,
    collector_config,
    count_points,
    distinct_ids,
    make_messages,
    median,
    py_spy,
    py_spy_stacks,
    table,
    tree_cpu_s,
    wait_for,
    write_result,
)

PER_MESSAGE = 50
PUBLISHERS = 2  # processes
CLIENTS_PER_PUBLISHER = 4
IN_FLIGHT_PER_CLIENT = 50
DIRECT_WRITERS = 4
BATCH_LINES = 5000
QUIET = logging.getLogger("bench.mqtt")
QUIET.setLevel(logging.ERROR)


# ---- publishing ----------------------------------------------------------------------------


async def _publish(
    host: str,
    port: int,
    messages: Sequence[tuple[str, bytes]],
    clients: int,
    tag: str,
    messages_per_s: float | None = None,
) -> None:
    """Publish ``messages`` at QoS 1 from ``clients`` connections: as fast as they go, or paced at
    ``messages_per_s`` in all (each message at its own moment over the whole run)."""

    async def one(i: int, part: Sequence[tuple[str, bytes]]) -> None:
        sem = asyncio.Semaphore(IN_FLIGHT_PER_CLIENT)
        loop = asyncio.get_running_loop()
        per_client_s = None if messages_per_s is None else clients / messages_per_s
        async with aiomqtt.Client(
            host, port, identifier=f"bench-pub-{tag}-{i}", max_inflight_messages=IN_FLIGHT_PER_CLIENT, logger=QUIET
        ) as c:
            t0 = loop.time()

            async def send(k: int, topic: str, payload: bytes) -> None:
                if per_client_s is not None:
                    await asyncio.sleep(max(0.0, t0 + k * per_client_s - loop.time()))
                async with sem:
                    await c.publish(topic, payload, qos=1)

            await asyncio.gather(*(send(k, t, p) for k, (t, p) in enumerate(part)))

    parts = [messages[i::clients] for i in range(clients)]
    await asyncio.gather(*(one(i, p) for i, p in enumerate(parts) if p))


def _publisher_main(
    host: str, port: int, messages: list[tuple[str, bytes]], clients: int, tag: str, messages_per_s: float | None
) -> None:
    asyncio.run(_publish(host, port, messages, clients, tag, messages_per_s))


def publish_in_processes(
    host: str,
    port: int,
    messages: Sequence[tuple[str, bytes]],
    processes: int = PUBLISHERS,
    messages_per_s: float | None = None,
) -> list[mp.process.BaseProcess]:
    ctx = mp.get_context("fork")
    procs: list[mp.process.BaseProcess] = []
    each = None if messages_per_s is None else messages_per_s / processes
    for i in range(processes):
        p = ctx.Process(
            target=_publisher_main,
            args=(host, port, list(messages[i::processes]), CLIENTS_PER_PUBLISHER, f"{i}", each),
        )
        p.start()
        procs.append(p)
    return procs


# ---- the direct writer ---------------------------------------------------------------------


def lines_of(messages: Sequence[tuple[str, bytes]]) -> list[str]:
    out: list[str] = []
    for topic, payload in messages:
        d = decode_message(topic, payload, prefix=PREFIX, max_bytes=1 << 24, kinds=KINDS)
        assert d.meta is not None and not d.rejects, d.rejects
        out.extend(
            encode_batch(
                d.observations, agent=d.meta.agent, site=d.meta.site, kinds=KINDS, agent_labels=d.meta.labels
            ).lines
        )
    return out


async def direct_write(url: str, db: str, lines: Sequence[str], writers: int = DIRECT_WRITERS) -> float:
    """Write ``lines`` to /write in gzip batches with ``writers`` in flight; seconds taken."""
    batches = list(chunks(lines, BATCH_LINES))
    queue: asyncio.Queue[Sequence[str]] = asyncio.Queue()
    for b in batches:
        queue.put_nowait(b)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/query", data={"q": f'CREATE DATABASE "{db}"'}) as r:
            assert r.status == 200

        async def worker() -> None:
            while not queue.empty():
                batch = queue.get_nowait()
                body = gzip.compress(("\n".join(batch) + "\n").encode(), compresslevel=5)
                async with session.post(
                    f"{url}/write",
                    params={"db": db, "precision": "ns"},
                    data=body,
                    headers={"Content-Encoding": "gzip"},
                ) as r:
                    assert r.status == 204, await r.text()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(writers)))
        return time.perf_counter() - t0


# ---- one collector run ---------------------------------------------------------------------


class Stack:
    def __init__(self) -> None:
        self.mosquitto = MosquittoServer(extra_config=["max_queued_messages 1000000"]).start()
        self.influx = InfluxServer().start()
        self.workdir = Path(tempfile.mkdtemp(prefix="edgeprobe-perf-"))
        self.runs = 0

    def close(self) -> None:
        self.mosquitto.stop()
        self.influx.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def new_db(self, what: str) -> str:
        self.runs += 1
        return f"perf_{what}_{self.runs}"


def collector_run(
    stack: Stack,
    messages: Sequence[tuple[str, bytes]],
    total: int,
    *,
    collectors: int = 1,
    stop_one_at_ratio: float | None = None,
    profile_to: Path | None = None,
    obs_per_s: float | None = None,
) -> Row:
    """Publish ``messages`` into ``collectors`` collectors (shared group when 2+); the figures."""
    db = stack.new_db("c")
    group = f"g{stack.runs}" if collectors > 1 else None
    procs = []
    for i in range(collectors):
        name = f"c{stack.runs}-{i}"
        cfg = collector_config(stack.workdir, name, stack.mosquitto.url, stack.influx.url, db, group)
        procs.append(CollectorProc(cfg, stack.workdir / f"{name}.stats.json").start())
    spy: subprocess.Popen[bytes] | None = None
    if profile_to is not None:
        spy = subprocess.Popen(
            [py_spy(), "record", "--nonblocking", "--rate", "200",
             "--format", "raw", "-o", str(profile_to), "-p", str(procs[0].pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    cpu0 = [p.stats().get("cpu_s", 0.0) for p in procs]
    influx_cpu0 = tree_cpu_s(stack.influx.pid or 0)
    t0 = time.perf_counter()
    pace = None if obs_per_s is None else obs_per_s * len(messages) / total  # messages a second
    pubs = publish_in_processes("127.0.0.1", stack.mosquitto.port, messages, messages_per_s=pace)
    stopped: dict[str, Any] | None = None
    if stop_one_at_ratio is not None:
        at = total * stop_one_at_ratio
        wait_for(lambda: sum(p.stats().get("accepted_observations", 0) for p in procs) >= at, 120)
        stopped = procs[0].stop()
        stopped["publishing_when_stopped"] = any(p.is_alive() for p in pubs)
    for p in pubs:
        p.join()
        if p.exitcode != 0:
            for c in procs:
                c.stop()
            raise RuntimeError(f"a publisher process failed (exit {p.exitcode})")
    t_pub = time.perf_counter() - t0
    live = procs[1:] if stopped is not None else procs

    def done() -> bool:
        s = [p.stats() for p in live]
        accepted = sum(x.get("accepted_observations", 0) for x in s) + (
            stopped.get("accepted_observations", 0) if stopped else 0
        )
        return accepted >= total and all(x.get("spool_lines", 1) == 0 for x in s)

    finished = wait_for(done, 600 if stopped is None else 20, poll_s=0.02)
    elapsed = time.perf_counter() - t0
    held = None
    if stopped is not None:
        # What the broker had already given the stopped member stays in its persistent session
        # (clean_session=False) until it comes back: count it, then restart it like a rolling restart.
        held = (
            total
            - sum(p.stats().get("accepted_observations", 0) for p in live)
            - stopped.get("accepted_observations", 0)
        )
        procs[0] = CollectorProc(procs[0].config, procs[0].stats_path.with_suffix(".again.json")).start()
        live = procs
        finished = wait_for(done, 120, poll_s=0.05)
    cpu_s = sum(p.stats().get("cpu_s", 0.0) - c for p, c in zip(procs, cpu0, strict=True))
    influx_cpu_s = tree_cpu_s(stack.influx.pid or 0) - influx_cpu0
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(30)
    finals = [p.stop() for p in procs]
    if stopped is not None:
        finals.insert(0, stopped)
    points = count_points(stack.influx, db)
    ids = distinct_ids(stack.influx, db) if stop_one_at_ratio is not None else None
    accepted = [s.get("accepted_observations", 0) for s in finals]
    return {
        "db": db,
        "collectors": collectors,
        "observations": total,
        "finished": finished,
        "publish_s": t_pub,
        "elapsed_s": elapsed,
        "obs_per_s": total / elapsed,
        "collector_cpu_cores": cpu_s / elapsed,
        # CPU time per observation over the run, the collector's worker processes included
        "collector_cpu_us_per_obs": cpu_s / total * 1e6,
        "influxd_cpu_us_per_point": influx_cpu_s / total * 1e6,
        "accepted_per_collector": accepted,
        "redelivered": sum(accepted) - total,
        "points_in_influx": points,
        "distinct_ids_in_influx": ids,
        "lost": total - points,
        "held_by_stopped_member": held,
        "publishing_when_stopped": stopped.get("publishing_when_stopped") if stopped is not None else None,
    }


def direct_run(stack: Stack, lines: Sequence[str]) -> Row:
    db = stack.new_db("d")
    influx_cpu0 = tree_cpu_s(stack.influx.pid or 0)
    seconds = asyncio.run(direct_write(stack.influx.url, db, lines))
    influx_cpu_s = tree_cpu_s(stack.influx.pid or 0) - influx_cpu0
    points = count_points(stack.influx, db)
    return {"db": db, "observations": len(lines), "elapsed_s": seconds, "obs_per_s": len(lines) / seconds,
            "points_in_influx": points, "influxd_cpu_us_per_point": influx_cpu_s / len(lines) * 1e6}  # fmt: skip


# ---- profiles ------------------------------------------------------------------------------


def summarise_profile(path: Path, top: int = 20) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    idle = 0
    for frames, count in py_spy_stacks(path.read_text()):
        total += count
        names = [_frame_name(f) for f in frames]
        if names and names[-1].startswith(("select (selectors", "_run_once (asyncio", "poll (selectors")):
            idle += count
        self_c[names[-1]] += count
        for name in set(names):
            incl[name] += count

    def share(c: int) -> float:
        return c / total if total else 0.0

    return {
        "samples": total,
        "idle_ratio": share(idle),
        "self": [{"function": f, "ratio": share(c)} for f, c in self_c.most_common(top)],
        "inclusive": [{"function": f, "ratio": share(c)} for f, c in incl.most_common(top * 3)],
    }


def _frame_name(frame: str) -> str:
    # "func (path/to/module.py:123)" -> "func (module.py)"
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rsplit("/", 1)[-1]
    return f"{name} ({file})"


# ---- the benchmarks ------------------------------------------------------------------------


def bench_ingest(stack: Stack, quick: bool, profile: bool) -> dict[str, Any]:
    total = 20_000 if quick else 250_000
    runs = 2 if quick else 3
    messages, total = make_messages(total, PER_MESSAGE)
    lines = lines_of(messages)
    pairs: list[Row] = []
    for r in range(runs):
        d = direct_run(stack, lines)
        c = collector_run(stack, messages, total)
        pairs.append({"run": r + 1, "direct_obs_per_s": d["obs_per_s"], "collector_obs_per_s": c["obs_per_s"],
                      "ratio": c["obs_per_s"] / d["obs_per_s"], "collector_cpu_cores": c["collector_cpu_cores"],
                      "publish_s": c["publish_s"], "collector_s": c["elapsed_s"], "direct_s": d["elapsed_s"],
                      "lost": c["lost"], "direct_points": d["points_in_influx"],
                      "collector_cpu_us_per_obs": c["collector_cpu_us_per_obs"],
                      "influxd_cpu_us_per_point": c["influxd_cpu_us_per_point"],
                      "direct_influxd_cpu_us_per_point": d["influxd_cpu_us_per_point"]})  # fmt: skip
    summary = {
        "observations_per_run": total,
        "observations_per_message": PER_MESSAGE,
        "runs": runs,
        "direct_obs_per_s_median": median([p["direct_obs_per_s"] for p in pairs]),
        "collector_obs_per_s_median": median([p["collector_obs_per_s"] for p in pairs]),
        "ratio_median": median([p["ratio"] for p in pairs]),
        "goal_ratio": 0.8,
        "lost_total": sum(p["lost"] for p in pairs),
        "ratio_min": min(p["ratio"] for p in pairs),
        "ratio_max": max(p["ratio"] for p in pairs),
        "collector_cpu_us_per_obs_median": median([p["collector_cpu_us_per_obs"] for p in pairs]),
        "influxd_cpu_us_per_point_median": median([p["influxd_cpu_us_per_point"] for p in pairs]),
        "direct_influxd_cpu_us_per_point_median": median([p["direct_influxd_cpu_us_per_point"] for p in pairs]),
    }
    print(table(f"1. collector ingest ceiling ({total:,} observations per run, {PER_MESSAGE} per message)",
                [("run", "run"), ("direct_obs_per_s", "direct obs/s"), ("collector_obs_per_s", "collector obs/s"),
                 ("ratio", "collector/direct"), ("collector_cpu_cores", "collector cores"),
                 ("collector_s", "collector s"), ("publish_s", "publish s"), ("lost", "lost"),
                 ("collector_cpu_us_per_obs", "collector µs/obs"), ("influxd_cpu_us_per_point", "influxd µs/pt"),
                 ("direct_influxd_cpu_us_per_point", "influxd µs/pt direct")], pairs))  # fmt: skip
    print(f"   median: direct {summary['direct_obs_per_s_median']:,.0f} obs/s, collector "
          f"{summary['collector_obs_per_s_median']:,.0f} obs/s, "
          f"ratio {summary['ratio_median']:.2f} (min {summary['ratio_min']:.2f}, max {summary['ratio_max']:.2f}; "
          f"goal ≥ 0.8); CPU per observation: collector {summary['collector_cpu_us_per_obs_median']:.1f} µs, "
          f"influxd {summary['influxd_cpu_us_per_point_median']:.1f} µs "
          f"(direct: {summary['direct_influxd_cpu_us_per_point_median']:.1f} µs)\n")  # fmt: skip
    result: dict[str, Any] = {"summary": summary, "runs": pairs}
    if profile:
        prof = stack.workdir / "collector.pyspy.txt"
        c = collector_run(stack, messages, total, profile_to=prof)
        if prof.exists():
            result["profile"] = summarise_profile(prof)
            result["profile"]["run"] = c
            shutil.copy(prof, write_result("perf_ingest_profile_raw", {}).with_suffix(".txt"))
            print_profile(result["profile"])
    return result


KEY_FUNCTIONS = (
    "take (service.py)", "decode_message (decode.py)", "encode_batch (lineproto.py)", "append (spool.py)",
    "peek (spool.py)", "delete_through (spool.py)", "write (influx.py)", "compress (gzip.py)", "ack (service.py)",
    "_handle_publish (client.py)", "_packet_read (client.py)", "_update_gauges (service.py)",
)  # fmt: skip


def print_profile(p: dict[str, Any]) -> None:
    print(f"   py-spy: {p['samples']} samples (200 Hz, busy threads only) of the collector during one run")
    print(table("   top self time", [("function", "function"), ("ratio", "share")], p["self"][:12]))
    keyed = [r for r in p["inclusive"] if any(r["function"].endswith(k) for k in KEY_FUNCTIONS)]
    print(table("   inclusive, hot path", [("function", "function"), ("ratio", "share")], keyed))
    print()


def bench_horizontal(stack: Stack, quick: bool) -> dict[str, Any]:
    total = 20_000 if quick else 150_000
    runs = 1 if quick else 2
    messages, total = make_messages(total, PER_MESSAGE)
    lines = lines_of(messages)
    rows: list[Row] = []
    for r in range(runs):
        d = direct_run(stack, lines)
        # Paced at InfluxDB's own (direct) rate: the publishers keep publishing over the whole run.
        one = collector_run(stack, messages, total, collectors=1, obs_per_s=d["obs_per_s"])
        two = collector_run(stack, messages, total, collectors=2, obs_per_s=d["obs_per_s"])
        rows.append({"run": r + 1, "direct_obs_per_s": d["obs_per_s"], "one_obs_per_s": one["obs_per_s"],
                     "two_obs_per_s": two["obs_per_s"], "two_over_one": two["obs_per_s"] / one["obs_per_s"],
                     "two_over_direct": two["obs_per_s"] / d["obs_per_s"],
                     "two_split": two["accepted_per_collector"], "lost": one["lost"] + two["lost"]})  # fmt: skip
    # Paced at one collector's rate: one member is stopped at 40 % while the publishers still publish.
    pace = median([r["one_obs_per_s"] for r in rows])
    failover = collector_run(stack, messages, total, collectors=2, stop_one_at_ratio=0.4, obs_per_s=pace)
    failover["doubled"] = (failover["points_in_influx"] or 0) - (failover["distinct_ids_in_influx"] or 0)
    failover["paced_obs_per_s"] = pace
    summary: dict[str, Any] = {
        "observations_per_run": total,
        "runs": runs,
        "direct_obs_per_s_median": median([r["direct_obs_per_s"] for r in rows]),
        "one_collector_obs_per_s_median": median([r["one_obs_per_s"] for r in rows]),
        "two_collectors_obs_per_s_median": median([r["two_obs_per_s"] for r in rows]),
        "two_over_one_median": median([r["two_over_one"] for r in rows]),
        "failover": {k: failover[k] for k in ("observations", "accepted_per_collector", "redelivered",
                                              "points_in_influx", "distinct_ids_in_influx", "lost", "finished",
                                              "held_by_stopped_member", "doubled", "paced_obs_per_s",
                                              "publishing_when_stopped")},
    }  # fmt: skip
    print(table(f"6. horizontal: two collectors on one $share group ({total:,} observations per run)",
                [("run", "run"), ("direct_obs_per_s", "influx direct obs/s"), ("one_obs_per_s", "1 collector"),
                 ("two_obs_per_s", "2 collectors"), ("two_over_one", "2/1"), ("two_over_direct", "2/direct"),
                 ("two_split", "split"), ("lost", "lost")], rows))  # fmt: skip
    f = summary["failover"]
    print(f"   one of two stopped at 40 % (publishers paced at {f['paced_obs_per_s']:,.0f} obs/s, still "
          f"publishing then: {f['publishing_when_stopped']}): sent {f['observations']:,}, doubled {f['doubled']}, "
          f"accepted per collector {f['accepted_per_collector']}, "
          f"in InfluxDB {f['points_in_influx']:,} points / {f['distinct_ids_in_influx']:,} distinct ids, "
          f"lost {f['lost']}, re-delivered (overwritten) {f['redelivered']}; held in the stopped member's "
          f"session until it was restarted: {f['held_by_stopped_member']}\n")  # fmt: skip
    return {"summary": summary, "runs": rows, "failover": failover}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="ingest,horizontal")
    ap.add_argument("--profile", action="store_true", help="py-spy the collector during one extra ingest run")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    stack = Stack()
    try:
        if "ingest" in only:
            res = bench_ingest(stack, args.quick, args.profile)
            print("   →", write_result("perf_ingest", {"quick": args.quick, **res}))
        if "horizontal" in only:
            res = bench_horizontal(stack, args.quick)
            print("   →", write_result("perf_horizontal", {"quick": args.quick, **res}))
    finally:
        stack.close()


if __name__ == "__main__":
    main()
