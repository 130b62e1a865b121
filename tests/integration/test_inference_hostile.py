"""A malicious inference endpoint on 127.0.0.1 cannot exhaust the agent: every bound ends the run
with a typed outcome (protocol_error) and the reason, and the probe's memory stays small."""

from __future__ import annotations

import asyncio
import json
import resource

import pytest
from aiohttp import web

from edgeprobe.probes import inference
from edgeprobe.probes.outcome import Outcome
from tests.integration.test_inference_probe import cfg, once, serve


def endless_app(piece: bytes, content_type: str, head: bytes = b"") -> web.Application:
    """Streams ``head`` then ``piece`` forever (until the client goes away)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"content-type": content_type})
        await resp.prepare(request)
        try:
            await resp.write(head)
            while True:
                await resp.write(piece)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return resp

    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    return app


async def _run(app: web.Application, **kw: object) -> tuple[str, str, dict[str, object]]:
    async with serve(app) as url:
        obs = await once(url, cfg(timeout_s=20.0, **kw))
    return obs.outcome, obs.reason or "", obs.fields


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def test_endless_ndjson_line_is_a_protocol_error() -> None:
    before = _max_rss_mib()
    outcome, reason, _ = await _run(
        endless_app(b"y" * 65_536, "application/x-ndjson", head=b'{"response": "'), api="ollama-generate"
    )
    assert outcome == Outcome.PROTOCOL_ERROR and "NDJSON line longer than" in reason, reason
    assert _max_rss_mib() - before < 64  # was gigabytes


async def test_endless_sse_line_is_a_protocol_error() -> None:
    outcome, reason, _ = await _run(endless_app(b"x" * 65_536, "text/event-stream", head=b"data: "))
    assert outcome == Outcome.PROTOCOL_ERROR and "event-stream line longer than" in reason, reason


async def test_sse_event_without_end_is_a_protocol_error() -> None:
    outcome, reason, _ = await _run(endless_app(b"data: " + b"z" * 4000 + b"\n", "text/event-stream"))
    assert outcome == Outcome.PROTOCOL_ERROR and "event with more than" in reason, reason


async def test_a_stream_past_the_body_bound_ends_with_its_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inference, "STREAM_BODY_MAX_BYTES", 1 << 20)
    token = b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": "tok"}}]}).encode() + b"\n\n"
    outcome, reason, fields = await _run(endless_app(token * 100, "text/event-stream"))
    assert outcome == Outcome.PROTOCOL_ERROR and f"went past {1 << 20} bytes" in reason, reason
    assert isinstance(fields["chunks"], int) and fields["chunks"] > 1000 and fields["ttft_ms"] is not None
