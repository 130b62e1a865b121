"""Run the trace probe inside a lab namespace and print each run as one JSON line.

    python -m tests.support.tracerun TARGET CONFIG_JSON [--runs N] [--step]

CONFIG_JSON is one config or a list of them (each run runs them all, in order, one line each).

All runs share one ProbeContext (as an agent's do: path_changed compares with the previous run).
``--step``: wait for a line on stdin before each run after the first (the test changes the route
in between). Each line: the observation's fields plus outcome, reason, duration_ms, hops and the
process CPU seconds the run took (``cpu_s``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import msgspec

from edgeprobe.probes import trace
from edgeprobe.probes.context import ProbeContext
from edgeprobe.probes.handler import run_probe


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("config")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--step", action="store_true")
    args = parser.parse_args(argv)
    given = json.loads(args.config)
    configs = [msgspec.convert(c, trace.TraceConfig) for c in (given if isinstance(given, list) else [given])]
    trace.tracepkt._scapy()  # imported before the first run: its import is not a run's CPU
    async with ProbeContext() as ctx:
        for i in range(args.runs):
            if i and args.step and not sys.stdin.readline():
                break
            for config in configs:
                cpu0 = time.process_time()
                obs = await run_probe(trace.KIND, args.target, config, ctx, seq=i)
                out = {
                    **obs.fields,
                    "outcome": obs.outcome,
                    "reason": obs.reason,
                    "duration_ms": obs.duration_ms,
                    "cpu_s": time.process_time() - cpu0,
                    "hops": trace.hops_of(obs.fields),
                }
                print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
