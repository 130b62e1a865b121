"""Accuracy of the inference probe against the responder, with the ``openai`` package as reference.

    .venv/bin/python -m tests.benchmarks.bench_inference [--runs 20] [--ttft-ms 200] [--interval-ms 20]

The responder (TTFT 200 ms, 20 ms per token, 16 tokens by default) runs in this process on a thread
and event loop of its own, on 127.0.0.1. A middleware and a wrapper around aiohttp's
``StreamResponse.write`` record, with the same ``perf_counter`` clock, when each request arrived
and when its first token was written: the server-side TTFT, the truth the clients are held to.

Clients, ``--runs`` requests each, one after the other:

* ``probe new``: the inference probe, ``connection: new`` (a fresh connection per request).
  Its ``ttft_ms`` includes dns + connect (``setup_ms``); ``ttft - setup`` is the comparable figure.
* ``probe reuse``: ``connection: reuse`` on one kept-alive connection (after one warm-up request).
* ``openai new``: ``openai.AsyncOpenAI`` (a client per request, so a new connection), streaming
  with ``stream_options.include_usage``. TTFT from just before ``create()`` (what an SDK user
  measures) and from httpx's request hook (just before the request is sent: the probe's t0 rule).
* ``openai warm``: one client, kept-alive connection, after one warm-up request.

Columns (medians over the runs, ms): ``ttft`` as the client reports it; ``ttft-setup`` (probe new:
without the handshakes); ``server`` the server-side TTFT; ``overhead`` = client TTFT (from its
send point) − server TTFT, i.e. loopback transit both ways plus the client's own work; ``itl_p50``
the median of per-request median gaps between content chunks; ``tokens`` how many requests had
exactly the expected content chunks and usage count.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx2
import openai
from aiohttp import web

from edgeprobe.probes import inference
from edgeprobe.probes.context import ProbeContext
from edgeprobe.probes.handler import run_probe
from edgeprobe.responder import ResponderSettings, make_app


@dataclass
class ServerLog:
    records: list[dict[str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ttfts_ms(self, first: int, count: int) -> list[float]:
        with self.lock:
            recs = self.records[first : first + count]
        return [(r["first_write"] - r["arrived"]) / 1e6 for r in recs if "first_write" in r]


@contextmanager
def responder_thread(settings: ResponderSettings, log: ServerLog) -> Iterator[str]:
    """The responder on its own thread and loop, with server-side timestamps into ``log``."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()
    url: list[str] = []

    @web.middleware
    async def stamp(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
        rec = {"arrived": time.perf_counter_ns()}
        with log.lock:
            log.records.append(rec)
        request["edgeprobe_bench"] = rec
        return await handler(request)

    original_write = web.StreamResponse.write

    async def write(self: web.StreamResponse, data: Any) -> None:
        await original_write(self, data)
        req = getattr(self, "_req", None)
        if req is not None and "edgeprobe_bench" in req:
            req["edgeprobe_bench"].setdefault("first_write", time.perf_counter_ns())

    web.StreamResponse.write = write  # type: ignore[method-assign]

    async def serve() -> None:
        app = make_app(settings)
        app.middlewares.append(stamp)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
        ready.set()
        await stop.wait()
        await runner.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("responder did not start")
    try:
        yield url[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
        web.StreamResponse.write = original_write  # type: ignore[method-assign]


@dataclass
class Sample:
    ttft_ms: float  # as the client reports it, from its own t0
    send_ttft_ms: float  # from the moment the request is sent (probe: ttft - setup; openai: request hook)
    itl_p50_ms: float | None
    exact: bool  # content chunks and token count as expected


async def probe_run(url: str, ctx: ProbeContext, config: inference.InferenceConfig, tokens: int) -> Sample:
    obs = await run_probe(inference.KIND, url, config, ctx, seq=0)
    f = obs.fields
    if obs.outcome != "ok":
        raise RuntimeError(f"probe: {obs.outcome}: {obs.reason}")
    ttft, setup = float(f["ttft_ms"]), float(f["setup_ms"])  # type: ignore[arg-type]
    itl = f["itl_p50_ms"]
    exact = f["chunks"] == tokens and f["output_tokens"] == tokens and f["output_tokens_source"] == "usage"
    return Sample(ttft, ttft - setup, float(itl) if isinstance(itl, float) else None, exact)


async def openai_run(client: openai.AsyncOpenAI, marks: dict[str, float], tokens: int) -> Sample:
    t0 = time.perf_counter()
    stream = await client.chat.completions.create(
        model="bench",
        messages=[{"role": "user", "content": "Reply with one short sentence."}],
        max_tokens=tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    content_at: list[float] = []
    usage_tokens = None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            content_at.append(time.perf_counter())
        if chunk.usage is not None:
            usage_tokens = chunk.usage.completion_tokens
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(content_at)]
    return Sample(
        ttft_ms=(content_at[0] - t0) * 1000,
        send_ttft_ms=(content_at[0] - marks["request"]) * 1000,
        itl_p50_ms=statistics.median(gaps) if gaps else None,
        exact=len(content_at) == tokens and usage_tokens == tokens,
    )


def openai_client(url: str, marks: dict[str, float]) -> openai.AsyncOpenAI:
    async def on_request(request: httpx2.Request) -> None:
        marks["request"] = time.perf_counter()

    http_client = httpx2.AsyncClient(event_hooks={"request": [on_request]})
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="not-needed", max_retries=0, http_client=http_client)


@dataclass
class Row:
    client: str
    samples: list[Sample]
    server_ms: list[float]


async def bench(url: str, log: ServerLog, runs: int, tokens: int) -> list[Row]:
    rows: list[Row] = []
    config_new = inference.InferenceConfig(model="bench", max_tokens=tokens, connection="new")
    config_reuse = inference.InferenceConfig(model="bench", max_tokens=tokens, connection="reuse")

    start = len(log.records)
    samples = []
    for _ in range(runs):
        async with ProbeContext() as ctx:
            samples.append(await probe_run(url, ctx, config_new, tokens))
    rows.append(Row("probe new", samples, log.ttfts_ms(start, runs)))

    async with ProbeContext() as ctx:
        await probe_run(url, ctx, config_reuse, tokens)  # warm-up: opens the connection
        start = len(log.records)
        samples = [await probe_run(url, ctx, config_reuse, tokens) for _ in range(runs)]
    rows.append(Row("probe reuse", samples, log.ttfts_ms(start, runs)))

    marks: dict[str, float] = {}
    start = len(log.records)
    samples = []
    for _ in range(runs):
        async with openai_client(url, marks) as client:
            samples.append(await openai_run(client, marks, tokens))
    rows.append(Row("openai new", samples, log.ttfts_ms(start, runs)))

    async with openai_client(url, marks) as client:
        await openai_run(client, marks, tokens)
        start = len(log.records)
        samples = [await openai_run(client, marks, tokens) for _ in range(runs)]
    rows.append(Row("openai warm", samples, log.ttfts_ms(start, runs)))
    return rows


def report(rows: list[Row], settings: ResponderSettings, runs: int, tokens: int) -> list[str]:
    med = statistics.median
    lines = [
        f"responder: ttft {settings.ttft_ms:g} ms, {settings.token_interval_ms:g} ms per token, {tokens} tokens;"
        f" {runs} requests per client; medians in ms",
        f"{'client':<12} {'ttft':>9} {'send→ft':>9} {'server':>9} {'overhead':>9} {'itl_p50':>9} {'tokens':>8}",
    ]
    by_name = {}
    for row in rows:
        s = row.samples
        ttft = med([x.ttft_ms for x in s])
        send = med([x.send_ttft_ms for x in s])
        server = med(row.server_ms)
        overhead = med([x.send_ttft_ms - srv for x, srv in zip(s, row.server_ms, strict=True)])
        itl = med([x.itl_p50_ms for x in s if x.itl_p50_ms is not None])
        exact = sum(x.exact for x in s)
        by_name[row.client] = (ttft, send, itl)
        figures = f"{ttft:>9.3f} {send:>9.3f} {server:>9.3f} {overhead:>9.3f} {itl:>9.3f}"
        lines.append(f"{row.client:<12} {figures} {exact:>4}/{len(s):<3}")
    lines.append("send→ft: probe = ttft - setup_ms; openai = from httpx's request hook (just before sending)")
    for a, b in (("probe new", "openai new"), ("probe reuse", "openai warm")):
        (ta, sa, ia), (tb, sb, ib) = by_name[a], by_name[b]
        lines.append(
            f"{a} - {b}: ttft {ta - tb:+.3f} ms (openai from create()), send→ft {sa - sb:+.3f} ms,"
            f" itl_p50 {ia - ib:+.3f} ms"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--ttft-ms", type=float, default=200.0)
    parser.add_argument("--interval-ms", type=float, default=20.0)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args(argv)
    settings = ResponderSettings(ttft_ms=args.ttft_ms, token_interval_ms=args.interval_ms, tokens=args.tokens, seed=1)
    log = ServerLog()
    with responder_thread(settings, log) as url:
        rows = asyncio.run(bench(url, log, args.runs, args.tokens))
    for line in report(rows, settings, args.runs, args.tokens):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
