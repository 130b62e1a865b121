"""Smoke versions of the performance benchmarks (tests/benchmarks/perf_*.py): they run, end to end,
on tiny inputs. No speed is asserted (only a generous bound so a hang fails)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

# The benchmarks are the package tests.benchmarks (run with python -m from the repository root);
# tests/ itself is not a package, so put the root on the path to import them here.
from tests.benchmarks import perf_agent, perf_codec, perf_ingest
from tests.benchmarks.perf_common import EnvelopeFactory, ProcSampler, make_messages, table


def test_codec_paths_agree_and_report() -> None:
    res = perf_codec.run(True, sizes=(1, 20), min_time_s=0.005, repeats=1)
    paths = {r["path"] for r in res["rows"]}
    assert {"json.loads", "msgspec typed", "collector decode + line protocol"} <= paths
    assert all(r["us_per_obs"] > 0 for r in res["rows"])
    assert "µs/obs" in table("t", [("us_per_obs", "µs/obs")], res["rows"])


def test_envelopes_are_real_and_unique() -> None:
    messages, total = make_messages(120, 50, agents=3)
    assert total == 120 and len(messages) == 3
    lines = perf_ingest.lines_of(messages)  # decodes with the collector's own decoder: no rejects
    assert len(lines) == 120 and len({ln.rsplit(" ", 1)[1] + ln.split(",", 1)[0] for ln in lines}) == 120
    env = EnvelopeFactory().envelope(10)
    assert len({o["id"] for o in env["observations"]}) == 10


def test_profile_summary(tmp_path: Path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text(
        "main (a.py:1);take (collector/service.py:10);encode_batch (collector/lineproto.py:5) 30\n"
        "main (a.py:1);take (collector/service.py:10);decode_message (collector/decode.py:7) 10\n"
    )
    p = perf_ingest.summarise_profile(raw)
    assert p["samples"] == 40
    assert p["self"][0] == {"function": "encode_batch (lineproto.py)", "ratio": 0.75}


def test_agent_profile_areas() -> None:
    """Each stack counts once, for the first area that names one of its frames, threads first."""
    raw = (
        "thread (1): MainThread;run (asyncio/runners.py:1);EchoSocket._on_timer (edgeprobe/probes/icmp.py:9) 6\n"
        "thread (1): MainThread;Scheduler._run_slot (agent/scheduler.py:3);put (edgeprobe/agent/spool.py:2) 2\n"
        "thread (2): edgeprobe-spool_0;_worker (thread.py:83);commit (edgeprobe/agent/spool.py:617) 1\n"
        "thread (1): MainThread;EpollSelector.select (selectors.py:468) 1\n"
        "garbage line\n"
    )
    areas = perf_agent.profile_areas(raw)
    assert list(areas)[-1] == "other" and abs(sum(areas.values()) - 1) < 1e-9
    assert areas["ICMP engine (timer, reader)"] == 0.6
    assert areas["probe runs (task, handler, probe, result, emit)"] == 0.2  # its spool.put counts as the run's
    assert areas["spool thread"] == 0.1 and areas["event loop select"] == 0.1 and areas["spool (loop side)"] == 0
    assert perf_agent.profile_areas("") == dict.fromkeys(areas, 0.0)


def test_proc_sampler_reads_own_process() -> None:
    s = ProcSampler(os.getpid())
    s.sample()
    assert s.rss_bytes[0] > 0 and s.hwm() >= s.rss_bytes[0]
    assert s.cpu_ratio() >= 0


@pytest.mark.integration
def test_ingest_smoke_nothing_lost() -> None:
    t0 = time.monotonic()
    stack = perf_ingest.Stack()
    try:
        messages, total = make_messages(1000, 50, agents=5)
        direct = perf_ingest.direct_run(stack, perf_ingest.lines_of(messages))
        assert direct["points_in_influx"] == total
        run = perf_ingest.collector_run(stack, messages, total)
        assert run["finished"] and run["lost"] == 0 and run["points_in_influx"] == total
    finally:
        stack.close()
    assert time.monotonic() - t0 < 120  # a hang, not a speed
