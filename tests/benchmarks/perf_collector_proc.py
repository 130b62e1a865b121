"""A collector process for the benchmarks: ``python -m tests.benchmarks.perf_collector_proc CONFIG STATS``.

Runs :func:`edgeprobe.collector.service.run_collector` like ``edgeprobe collector run`` does, and every 0.1 s
(and at exit) replaces ``STATS`` with its counters as JSON, so the benchmark can follow it without
querying InfluxDB. SIGTERM stops it cleanly (final flush).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from edgeprobe.collector.config import load_collector_config
from edgeprobe.collector.service import CollectorStats, run_collector
from tests.benchmarks.perf_common import tree_cpu_s


def _dump(stats: CollectorStats, path: Path) -> None:
    doc = {
        **stats.as_dict(),
        "connected": stats.connected,
        "spooled_lines": stats.spooled_lines,
        "writes": stats.writes,
        "spool_oldest_at_ns": stats.spool_oldest_at_ns,
        "at_ns": time.time_ns(),
        "cpu_s": tree_cpu_s(os.getpid()),  # with the worker processes (edgeprobe.collector.ingest)
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)


async def main(config_path: str, stats_path: str) -> None:
    config = load_collector_config(config_path)
    stats = CollectorStats()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    path = Path(stats_path)

    async def reporter() -> None:
        while True:
            _dump(stats, path)
            await asyncio.sleep(0.1)

    task = asyncio.create_task(reporter())
    try:
        await run_collector(config, stop=stop, stats=stats)
    finally:
        task.cancel()
        stats.connected = False
        _dump(stats, path)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(main(sys.argv[1], sys.argv[2]))
