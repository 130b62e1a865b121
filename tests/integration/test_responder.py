"""edgeprobe.responder, checked by independent clients: the ``openai`` package, and aiohttp + our parser.

Only 127.0.0.1. Timing bounds are loose: a lower bound (nothing can come before its
scheduled time) plus a generous upper bound. Speed is never what is tested.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import openai
import pytest

from edgeprobe.probes.llmstream import (
    APIS,
    Api,
    StreamFigures,
    StreamParser,
    StreamStats,
    build_request_body,
    check_content_type,
    request_headers,
)
from edgeprobe.responder import (
    MODEL_BASE,
    WORDS,
    ResponderSettings,
    RunningResponder,
    schedule_s,
    serve_responder,
    settings_for,
    token_text,
)

FAST = ResponderSettings(ttft_ms=100, token_interval_ms=10, tokens=12, seed=1, keepalive_interval_ms=50)
SLACK_MS = 1000.0  # a smoke bound only: the lower bounds are the real check (never early)


@pytest.fixture
async def responder() -> AsyncIterator[RunningResponder]:
    async with serve_responder("127.0.0.1", 0, FAST) as r:
        yield r


def client(r: RunningResponder, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="not-needed", max_retries=0, **kw)


MESSAGES: Any = [{"role": "user", "content": "say something please"}]


# --------------------------------------------------------------------------------------------
# With the openai package
# --------------------------------------------------------------------------------------------


async def test_openai_stream_chat(responder: RunningResponder) -> None:
    async with client(responder) as c:
        t0 = time.perf_counter()
        stream = await c.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks: list[Any] = []
        content_at: list[float] = []
        async for chunk in stream:
            chunks.append(chunk)
            if chunk.choices and chunk.choices[0].delta.content:
                content_at.append((time.perf_counter() - t0) * 1000)
    assert all(ch.model == MODEL_BASE for ch in chunks)  # never the model that was asked for
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.delta.content == ""
    texts = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(texts) == 12 and "".join(texts) == "".join(token_text(i) for i in range(12))
    finish = chunks[-2]
    assert finish.choices[0].finish_reason == "stop" and finish.choices[0].delta.content is None
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None
    assert (usage.usage.completion_tokens, usage.usage.prompt_tokens) == (12, 3)
    assert 100.0 - 1 <= content_at[0] <= 100.0 + SLACK_MS
    assert 100.0 + 11 * 10 - 1 <= content_at[-1] <= 100.0 + 11 * 10 + SLACK_MS


async def test_openai_stream_completions_respects_max_tokens(responder: RunningResponder) -> None:
    async with client(responder) as c:
        stream = await c.completions.create(model="x", prompt="one two", max_tokens=5, stream=True)
        chunks = [ch async for ch in stream]
    texts = [ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].text]
    assert len(texts) == 5 and chunks[-1].choices[0].finish_reason == "length"
    assert all(ch.model == MODEL_BASE and ch.object == "text_completion" for ch in chunks)


async def test_openai_non_stream(responder: RunningResponder) -> None:
    async with client(responder) as c:
        out = await c.chat.completions.create(model="x", messages=MESSAGES, max_tokens=4)
    assert out.model == MODEL_BASE and out.choices[0].message.content == "This is a synthetic"
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 4


async def test_openai_models_and_suffix() -> None:
    async with serve_responder("127.0.0.1", 0, ResponderSettings(model_suffix="fra1")) as r, client(r) as c:
        models = await c.models.list()
        assert [m.id for m in models.data] == ["edgeprobe-responder-fra1"]


async def test_header_overrides(responder: RunningResponder) -> None:
    async with client(responder) as c:
        t0 = time.perf_counter()
        stream = await c.chat.completions.create(
            model="x",
            messages=MESSAGES,
            stream=True,
            extra_headers={
                "x-edgeprobe-tokens": "3",
                "x-edgeprobe-ttft-ms": "30",
                "x-edgeprobe-token-interval-ms": "0",
            },
        )
        texts = []
        first_ms = None
        async for ch in stream:
            if ch.choices and ch.choices[0].delta.content:
                first_ms = first_ms or (time.perf_counter() - t0) * 1000
                texts.append(ch.choices[0].delta.content)
        assert len(texts) == 3
        assert first_ms is not None and 30 - 1 <= first_ms <= 30 + SLACK_MS
        with pytest.raises(openai.BadRequestError) as bad:
            await c.chat.completions.create(
                model="x", messages=MESSAGES, stream=True, extra_headers={"x-edgeprobe-tokens": "many"}
            )
        assert "tokens" in str(bad.value)


async def test_openai_sees_429(responder: RunningResponder) -> None:
    async with client(responder) as c:
        with pytest.raises(openai.RateLimitError) as err:
            await c.chat.completions.create(
                model="x", messages=MESSAGES, stream=True, extra_headers={"x-edgeprobe-fail": "429"}
            )
    assert err.value.status_code == 429 and err.value.response.headers["retry-after"] == "1"
    assert err.value.code == "rate_limit_exceeded" and "simulated" in err.value.message


async def test_openai_sees_500(responder: RunningResponder) -> None:
    async with client(responder) as c:
        with pytest.raises(openai.InternalServerError) as err:
            await c.chat.completions.create(
                model="x", messages=MESSAGES, stream=True, extra_headers={"x-edgeprobe-fail": "500"}
            )
    assert err.value.status_code == 500


async def test_openai_sees_json_instead_of_a_stream(responder: RunningResponder) -> None:
    async with client(responder) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model="x", messages=MESSAGES, stream=True, extra_headers={"x-edgeprobe-fail": "json"}
        )
        assert raw.headers["content-type"].startswith("application/json")
        parsed = raw.parse()  # a coroutine in older openai releases, the stream itself in newer ones
        stream = await parsed if inspect.isawaitable(parsed) else parsed
        chunks = [ch async for ch in stream]
    assert chunks == []  # an SSE reader finds no events in a JSON body


async def test_openai_sees_the_cut(responder: RunningResponder) -> None:
    texts: list[str] = []
    async with client(responder) as c:
        stream = await c.chat.completions.create(
            model="x", messages=MESSAGES, stream=True, extra_headers={"x-edgeprobe-fail": "cut"}
        )
        with pytest.raises(openai.APIError):
            async for ch in stream:
                if ch.choices and ch.choices[0].delta.content:
                    texts.append(ch.choices[0].delta.content)
    assert len(texts) == 6  # half of 12, then the connection closed


async def test_openai_sees_the_error_event(responder: RunningResponder) -> None:
    texts: list[str] = []
    async with client(responder) as c:
        stream = await c.chat.completions.create(
            model="x", messages=MESSAGES, stream=True, extra_headers={"x-edgeprobe-fail": "error-event"}
        )
        with pytest.raises(openai.APIError) as err:
            async for ch in stream:
                if ch.choices and ch.choices[0].delta.content:
                    texts.append(ch.choices[0].delta.content)
    assert len(texts) == 6 and "simulated error" in err.value.message


async def test_openai_sees_silence(responder: RunningResponder) -> None:
    async with client(responder) as c:
        t0 = time.perf_counter()
        stream = await c.chat.completions.create(
            model="x", messages=MESSAGES, stream=True, extra_headers={"x-edgeprobe-fail": "silent"}
        )
        headers_ms = (time.perf_counter() - t0) * 1000
        assert headers_ms < 100  # headers come at once, long before the (never coming) first token
        chunks: list[Any] = []

        async def read() -> None:
            async for ch in stream:
                chunks.append(ch)

        with pytest.raises(TimeoutError):
            await asyncio.wait_for(read(), 0.4)
        await stream.close()
    assert chunks == []


# --------------------------------------------------------------------------------------------
# Every API, through aiohttp and edgeprobe.probes.llmstream (the probe's parser)
# --------------------------------------------------------------------------------------------


async def fetch(
    r: RunningResponder, api: Api, headers: dict[str, str] | None = None, max_tokens: int = 64, read_s: float = 5.0
) -> tuple[StreamFigures, StreamStats, str, int]:
    path, body = build_request_body(api, "whatever", "hello there", max_tokens)
    parser, stats = StreamParser(api), StreamStats(api)
    async with aiohttp.ClientSession() as session:
        t0 = time.perf_counter_ns()
        async with session.post(
            r.url + path, json=body, headers={**request_headers(api, "k"), **(headers or {})}
        ) as resp:
            ctype = resp.headers.get("content-type", "")
            try:
                async with asyncio.timeout(read_s):
                    async for chunk in resp.content.iter_any():
                        stats.add_all(time.perf_counter_ns() - t0, parser.feed(chunk))
            except (aiohttp.ClientPayloadError, TimeoutError):
                pass
            tail = parser.finish()
            t_end = time.perf_counter_ns() - t0
            stats.add_all(t_end, tail.events)
            stats.end(t_end, mid_event=tail.mid_event)
            return stats.figures(), stats, ctype, resp.status


@pytest.mark.parametrize("api", APIS)
async def test_every_api_parses_cleanly(responder: RunningResponder, api: Api) -> None:
    f, _, ctype, status = await fetch(responder, api)
    assert status == 200 and check_content_type(api, ctype) is None
    assert f.problem is None and f.done and f.chunks == 12
    assert f.output_tokens == (13 if api == "tgi" else 12)  # TGI's count includes the EOS token
    assert f.output_tokens_source == "usage"
    assert f.ttft_ms is not None and 100.0 - 1 <= f.ttft_ms <= 100.0 + SLACK_MS
    assert f.itl_p50_ms is not None and 10.0 - 1 <= f.itl_p50_ms <= 10.0 + SLACK_MS
    assert f.prompt_tokens == (None if api == "tgi" else 2)
    if api.startswith("ollama"):
        assert f.load_ms == 0.0 and f.prompt_eval_ms is not None and f.prompt_eval_ms >= 99.0
        assert f.eval_ms is not None and f.eval_ms >= 11 * 10 - 1


@pytest.mark.parametrize("api", APIS)
async def test_every_api_length_limit(responder: RunningResponder, api: Api) -> None:
    f, _, _, _ = await fetch(responder, api, max_tokens=4)
    assert f.chunks == 4 and f.output_tokens == 4 and f.problem is None
    assert f.finish_reason == {"tgi": "length", "anthropic": "max_tokens"}.get(api, "length")


@pytest.mark.parametrize("api", APIS)
async def test_every_api_cut(responder: RunningResponder, api: Api) -> None:
    f, stats, _, _ = await fetch(responder, api, headers={"x-edgeprobe-fail": "cut"})
    assert f.problem == "stream_cut" and not f.done and f.chunks == 6
    assert f.output_tokens_source == "chunks" or api == "anthropic"  # message_start had no output count
    assert stats.problem_reason() is not None


@pytest.mark.parametrize("api", APIS)
async def test_every_api_error_event(responder: RunningResponder, api: Api) -> None:
    f, _, _, _ = await fetch(responder, api, headers={"x-edgeprobe-fail": "error-event"})
    assert f.problem == "error_event" and f.chunks == 6
    assert f.error_message is not None and "simulated error" in f.error_message


@pytest.mark.parametrize("api", APIS)
async def test_every_api_json_instead_of_stream(responder: RunningResponder, api: Api) -> None:
    _, _, ctype, status = await fetch(responder, api, headers={"x-edgeprobe-fail": "json"})
    assert status == 200 and check_content_type(api, ctype) is not None


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("fail", ["429", "500"])
async def test_every_api_http_errors(responder: RunningResponder, api: Api, fail: str) -> None:
    path, body = build_request_body(api, "m", "p", 4)
    async with aiohttp.ClientSession() as s:
        resp = await s.post(responder.url + path, json=body, headers={"x-edgeprobe-fail": fail})
        payload = await resp.json()
    assert resp.status == int(fail)
    assert ("retry-after" in resp.headers) is (fail == "429")
    assert "error" in payload


@pytest.mark.parametrize("api", ["openai-chat", "ollama-generate"])
async def test_silent_sends_headers_and_keepalives_only(responder: RunningResponder, api: Api) -> None:
    f, _, ctype, status = await fetch(responder, api, headers={"x-edgeprobe-fail": "silent"}, read_s=0.35)
    assert status == 200 and check_content_type(api, ctype) is None
    assert f.chunks == 0 and f.problem == "stream_cut" and f.ttft_ms is None
    if api == "openai-chat":
        assert f.keepalive_events >= 2  # one comment every 50 ms
    else:
        assert f.keepalive_events == 0  # NDJSON has no keep-alive


async def test_health_and_bad_body(responder: RunningResponder) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(responder.url + "/health") as resp:
            assert await resp.json() == {"status": "ok", "model": MODEL_BASE}
        async with s.post(responder.url + "/api/chat", data=b"{not json") as resp:
            assert resp.status == 400 and "error" in await resp.json()
        async with s.post(responder.url + "/v1/chat/completions", json={"max_tokens": "ten"}) as resp:
            assert resp.status == 400


async def test_jitter_is_seeded() -> None:
    s = ResponderSettings(ttft_ms=100, token_interval_ms=10, jitter_ms=5, tokens=8, seed=7)
    f1 = await _figures_with(s)
    f2 = await _figures_with(s)
    assert f1.chunks == f2.chunks == 8
    assert schedule_s(0.0, s, 8, random.Random(7)) == schedule_s(0.0, s, 8, random.Random(7))


async def _figures_with(s: ResponderSettings) -> StreamFigures:
    async with serve_responder("127.0.0.1", 0, s) as r:
        f, _, _, _ = await fetch(r, "openai-chat")
        return f


# --------------------------------------------------------------------------------------------
# Pure parts
# --------------------------------------------------------------------------------------------


def test_schedule_is_absolute_and_monotonic() -> None:
    s = ResponderSettings(ttft_ms=200, token_interval_ms=20, tokens=1000)
    times = schedule_s(10.0, s, 1000, random.Random(0))
    assert times[0] == 10.2 and times[999] == pytest.approx(10.0 + 0.2 + 999 * 0.02, abs=1e-9)
    jittery = ResponderSettings(ttft_ms=200, token_interval_ms=1, jitter_ms=5, tokens=1000)
    times = schedule_s(0.0, jittery, 1000, random.Random(3))
    assert all(b >= a for a, b in itertools.pairwise(times))
    assert all(abs(t - (0.2 + i * 0.001)) <= 0.005 + 1e-9 or t == max(times[: i + 1]) for i, t in enumerate(times))
    assert times[-1] == pytest.approx(0.2 + 999 * 0.001, abs=0.005 + 1e-9)  # no drift


def test_settings_for_headers() -> None:
    base = ResponderSettings(fail="cut")
    assert settings_for(base, {}) is base
    s = settings_for(base, {"x-edgeprobe-ttft-ms": "12.5", "x-edgeprobe-tokens": "3", "x-edgeprobe-fail": "none"})
    assert (s.ttft_ms, s.tokens, s.fail) == (12.5, 3, None)
    with pytest.raises(msgspec.ValidationError):
        settings_for(base, {"x-edgeprobe-fail": "explode"})
    with pytest.raises(msgspec.ValidationError):
        settings_for(base, {"x-edgeprobe-ttft-ms": "-1"})


def test_words_are_plainly_synthetic() -> None:
    assert "".join(token_text(i) for i in range(len(WORDS))).startswith("This is a synthetic token stream")
    assert token_text(len(WORDS)) == " This"
