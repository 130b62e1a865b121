"""``edgeprobe responder``: a stand-in for streaming LLM endpoints with exact, known timing.

It generates no language. It streams a fixed word list in the wire format of each API that
the inference probe speaks, on an absolute schedule, so a probe (or a test) can be checked
against a known TTFT and token cadence. It never claims to be a model: ``model`` is always
``edgeprobe-responder`` (plus a configured suffix), whatever the request asked for.

Endpoints:

* ``POST /v1/chat/completions``, ``/v1/completions``: OpenAI SSE, or plain JSON without ``stream``.
* ``POST /api/chat``, ``/api/generate``: Ollama NDJSON. Ollama streams unless ``"stream": false``.
* ``POST /generate_stream``: TGI SSE. ``POST /v1/messages``: Anthropic SSE.
* ``GET /v1/models``, ``GET /health``.

Timing. Headers are sent as soon as the request is read. Token *i* (0-based) is sent at
``t0 + ttft + i * interval + jitter_i``, where t0 is the loop time at which the request was read
and ``jitter_i`` is uniform in ±jitter. Every send time is computed against t0, so oversleeping
never piles up. Send times never go backwards. Each token is written to the socket as soon as
it is due: aiohttp's ``StreamResponse.write`` goes straight to the transport, and TCP_NODELAY
is on. The role-only chunk (OpenAI chat) and the other preludes (Anthropic message_start …)
go out together with the first token. The finish, usage and end marker follow the last token
at once.

Settings can be overridden per request with headers: ``x-edgeprobe-ttft-ms``,
``x-edgeprobe-token-interval-ms``, ``x-edgeprobe-jitter-ms``, ``x-edgeprobe-tokens``,
``x-edgeprobe-load-ms`` and ``x-edgeprobe-fail`` (a :data:`FailMode`, or ``none``).

Failure modes (``fail``):

* ``429``: Retry-After and the API's error JSON.
* ``500``: the API's error JSON.
* ``json``: a complete non-streaming JSON body, although a stream was asked for.
* ``cut``: half of the tokens, then the connection is closed with no end marker and no final chunk.
* ``silent``: headers, then no token, only SSE keep-alive comments (NDJSON: nothing).
* ``error-event``: half of the tokens, then the API's in-stream error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

import msgspec
from aiohttp import web

MODEL_BASE: Final = "edgeprobe-responder"
FailMode = Literal["429", "500", "json", "cut", "silent", "error-event"]
ResponderApi = Literal["openai-chat", "openai-completions", "ollama-chat", "ollama-generate", "tgi", "anthropic"]

# What the responder streams: plainly synthetic, so no one mistakes it for a model's output.
_SENTENCE: Final = (
    "This is a synthetic token stream from the edgeprobe responder. It measures timing only and "
    "carries no meaning. Each word is one token, sent on a fixed schedule."
)
WORDS: Final = tuple(_SENTENCE.split(" "))


class ResponderSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    ttft_ms: Annotated[float, msgspec.Meta(ge=0, le=600_000)] = 200.0
    token_interval_ms: Annotated[float, msgspec.Meta(ge=0, le=60_000)] = 20.0
    jitter_ms: Annotated[float, msgspec.Meta(ge=0, le=60_000)] = 0.0  # uniform ± on every send time
    tokens: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 32  # per response, unless max_tokens is lower
    seed: int | None = None  # for the jitter RNG; None = unpredictable
    model_suffix: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:-]*$", max_length=64)] = ""
    fail: FailMode | None = None
    load_ms: Annotated[float, msgspec.Meta(ge=0, le=600_000)] = 0.0  # share of ttft Ollama reports as load
    keepalive_interval_ms: Annotated[float, msgspec.Meta(ge=10, le=600_000)] = 1000.0  # "silent" mode
    silent_max_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 600.0  # "silent" gives up after this
    retry_after_s: Annotated[int, msgspec.Meta(ge=0, le=86_400)] = 1  # "429"


def model_name(settings: ResponderSettings) -> str:
    return f"{MODEL_BASE}-{settings.model_suffix}" if settings.model_suffix else MODEL_BASE


OVERRIDE_HEADERS: Final = {
    "x-edgeprobe-ttft-ms": "ttft_ms",
    "x-edgeprobe-token-interval-ms": "token_interval_ms",
    "x-edgeprobe-jitter-ms": "jitter_ms",
    "x-edgeprobe-tokens": "tokens",
    "x-edgeprobe-load-ms": "load_ms",
    "x-edgeprobe-fail": "fail",
}


def settings_for(base: ResponderSettings, headers: Any) -> ResponderSettings:
    """``base`` with the per-request override headers applied (pure). Raises msgspec.ValidationError."""
    changes: dict[str, Any] = {f: headers[h] for h, f in OVERRIDE_HEADERS.items() if h in headers}
    if not changes:
        return base
    if changes.get("fail", "x").lower() in ("", "none"):
        changes["fail"] = None
    return msgspec.convert(msgspec.structs.asdict(base) | changes, ResponderSettings, strict=False)


def token_text(i: int) -> str:
    word = WORDS[i % len(WORDS)]
    return word if i == 0 else " " + word


def schedule_s(t0: float, settings: ResponderSettings, n: int, rng: random.Random) -> list[float]:
    """Absolute send times (loop seconds) of ``n`` tokens (pure apart from the RNG draws)."""
    out: list[float] = []
    prev = t0
    j = settings.jitter_ms
    for i in range(n):
        when = t0 + (settings.ttft_ms + i * settings.token_interval_ms) / 1000.0
        if j > 0:
            when += rng.uniform(-j, j) / 1000.0
        prev = max(prev, when)
        out.append(prev)
    return out


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


class BadRequest(Exception):
    pass


@dataclass(frozen=True, kw_only=True)
class Ask:
    """What one request asks for, after the settings and the request's limits are applied."""

    api: ResponderApi
    settings: ResponderSettings
    model: str
    stream: bool
    n: int  # tokens to send
    finish: str  # "stop" or "length"
    prompt_tokens: int
    include_usage: bool  # OpenAI stream_options.include_usage / TGI parameters.details


def _words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(v) for v in value)
    if isinstance(value, dict):
        return _words(value.get("content")) + _words(value.get("text"))
    return 0


def _limit(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"token limit must be an integer, got {value!r}")
    return None if value < 0 else value  # Ollama's num_predict -1 means no limit


def parse_ask(api: ResponderApi, body: Any, settings: ResponderSettings) -> Ask:
    """Read a request body (pure)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if api in ("openai-chat", "openai-completions"):
        stream = body.get("stream") is True
        limit = _limit(body.get("max_completion_tokens", body.get("max_tokens")))
        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        prompt = body.get("messages") if api == "openai-chat" else body.get("prompt")
    elif api in ("ollama-chat", "ollama-generate"):
        stream = body.get("stream") is not False
        options = body.get("options")
        limit = _limit(options.get("num_predict")) if isinstance(options, dict) else None
        include_usage = True
        prompt = body.get("messages") if api == "ollama-chat" else body.get("prompt")
    elif api == "tgi":
        stream = True
        params = body.get("parameters")
        params = params if isinstance(params, dict) else {}
        limit = _limit(params.get("max_new_tokens"))
        include_usage = params.get("details") is True
        prompt = body.get("inputs")
    else:
        stream = body.get("stream") is True
        limit = _limit(body.get("max_tokens"))
        include_usage = True
        prompt = body.get("messages")
    n = settings.tokens if limit is None else min(settings.tokens, limit)
    finish = "length" if limit is not None and limit <= settings.tokens else "stop"
    return Ask(
        api=api,
        settings=settings,
        model=model_name(settings),
        stream=stream,
        n=n,
        finish=finish,
        prompt_tokens=max(1, _words(prompt)),
        include_usage=include_usage,
    )


# --------------------------------------------------------------------------------------------
# Wire formats
# --------------------------------------------------------------------------------------------

_enc = msgspec.json.Encoder()


def _sse(obj: Any, event: str | None = None, space: bool = True) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + (b"data: " if space else b"data:") + _enc.encode(obj) + b"\n\n"


@dataclass(kw_only=True)
class Timings:
    """Send times (perf_counter ns) recorded while streaming, for Ollama's final durations."""

    start_ns: int
    first_ns: int | None = None
    last_ns: int | None = None


class Dialect:
    """One API's bytes. SSE by default."""

    content_type = "text/event-stream; charset=utf-8"
    keepalive = b": keep-alive\n\n"

    def __init__(self, ask: Ask) -> None:
        self.ask = ask
        self.created = int(time.time())
        self.id = uuid.uuid4().hex[:24]

    def text(self) -> str:
        return "".join(token_text(i) for i in range(self.ask.n))

    def prelude(self) -> bytes:
        return b""

    def token(self, i: int) -> bytes:
        raise NotImplementedError

    def tail(self, timings: Timings) -> bytes:
        raise NotImplementedError

    def error_tail(self) -> bytes:
        raise NotImplementedError

    def complete(self, timings: Timings) -> dict[str, Any]:
        raise NotImplementedError

    def error_body(self, status: int) -> dict[str, Any]:
        message = _status_message(status, self.ask.model)
        etype = {429: "rate_limit_exceeded", 500: "server_error"}.get(status, "invalid_request_error")
        return {"error": {"message": message, "type": etype, "param": None, "code": etype}}


def _status_message(status: int, model: str) -> str:
    if status == 429:
        return f"Rate limit reached for {model} (simulated by the edgeprobe responder)."
    if status == 500:
        return "The server had an error while processing your request (simulated by the edgeprobe responder)."
    return f"HTTP {status}"


STREAM_ERROR_MESSAGE: Final = "simulated error in the middle of the stream (edgeprobe responder)"


class OpenAIChat(Dialect):
    obj = "chat.completion.chunk"
    prefix = "chatcmpl-"

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.prefix + self.id,
            "object": self.obj,
            "created": self.created,
            "model": self.ask.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.ask.include_usage:
            chunk["usage"] = None
        return chunk

    def _choice(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def _usage(self) -> dict[str, int]:
        p, n = self.ask.prompt_tokens, self.ask.n
        return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}

    def prelude(self) -> bytes:
        return _sse(self._chunk([self._choice({"role": "assistant", "content": ""})]))

    def token(self, i: int) -> bytes:
        return _sse(self._chunk([self._choice({"content": token_text(i)})]))

    def _finish_chunk(self) -> bytes:
        return _sse(self._chunk([self._choice({}, self.ask.finish)]))

    def tail(self, timings: Timings) -> bytes:
        out = self._finish_chunk()
        if self.ask.include_usage:
            usage = self._chunk([])
            usage["usage"] = self._usage()
            out += _sse(usage)
        return out + b"data: [DONE]\n\n"

    def error_tail(self) -> bytes:
        err = {"error": {"message": STREAM_ERROR_MESSAGE, "type": "server_error", "param": None, "code": None}}
        return _sse(err) + b"data: [DONE]\n\n"

    def complete(self, timings: Timings) -> dict[str, Any]:
        return {
            "id": self.prefix + self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.ask.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.text()},
                    "logprobs": None,
                    "finish_reason": self.ask.finish,
                }
            ],
            "usage": self._usage(),
        }


class OpenAICompletions(OpenAIChat):
    obj = "text_completion"
    prefix = "cmpl-"

    def _choice(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"index": 0, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish}

    def prelude(self) -> bytes:
        return b""  # legacy completions have no role chunk

    def complete(self, timings: Timings) -> dict[str, Any]:
        return {
            "id": self.prefix + self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.ask.model,
            "choices": [{"index": 0, "text": self.text(), "logprobs": None, "finish_reason": self.ask.finish}],
            "usage": self._usage(),
        }


def _rfc3339_now() -> str:
    ns = time.time_ns()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 1_000_000_000)) + f".{ns % 1_000_000_000:09d}Z"


class Ollama(Dialect):
    content_type = "application/x-ndjson"
    keepalive = b""  # NDJSON has no comments; an empty line would break strict clients

    @property
    def chat(self) -> bool:
        return self.ask.api == "ollama-chat"

    def _line(self, text: str, **more: Any) -> dict[str, Any]:
        obj: dict[str, Any] = {"model": self.ask.model, "created_at": _rfc3339_now()}
        if self.chat:
            obj["message"] = {"role": "assistant", "content": text}
        else:
            obj["response"] = text
        obj.update(more)
        return obj

    def token(self, i: int) -> bytes:
        return _enc.encode(self._line(token_text(i), done=False)) + b"\n"

    def _final(self, text: str, timings: Timings) -> dict[str, Any]:
        now = time.perf_counter_ns()
        ttft_ns = (timings.first_ns or now) - timings.start_ns
        load_ns = min(round(self.ask.settings.load_ms * 1e6), ttft_ns)
        eval_ns = (timings.last_ns - timings.first_ns) if timings.first_ns and timings.last_ns else 0
        more: dict[str, Any] = {"done_reason": self.ask.finish, "done": True}
        if not self.chat:
            more["context"] = [1, 2, 3]
        more |= {
            "total_duration": now - timings.start_ns,
            "load_duration": load_ns,
            "prompt_eval_count": self.ask.prompt_tokens,
            "prompt_eval_duration": ttft_ns - load_ns,
            "eval_count": self.ask.n,
            "eval_duration": eval_ns,
        }
        return self._line(text, **more)

    def tail(self, timings: Timings) -> bytes:
        return _enc.encode(self._final("", timings)) + b"\n"

    def error_tail(self) -> bytes:
        return _enc.encode({"error": STREAM_ERROR_MESSAGE}) + b"\n"

    def complete(self, timings: Timings) -> dict[str, Any]:
        return self._final(self.text(), timings)

    def error_body(self, status: int) -> dict[str, Any]:
        return {"error": _status_message(status, self.ask.model)}


class TGI(Dialect):
    def _event(self, index: int, token_id: int, text: str, special: bool, final: bool) -> bytes:
        details = None
        if final and self.ask.include_usage:
            generated = self.ask.n + (1 if special else 0)  # TGI counts the EOS token
            reason = "length" if self.ask.finish == "length" else "eos_token"
            details = {"finish_reason": reason, "generated_tokens": generated, "seed": None}
        obj = {
            "index": index,
            "token": {"id": token_id, "text": text, "logprob": -0.25, "special": special},
            "generated_text": self.text() if final else None,
            "details": details,
        }
        return _sse(obj, space=False)

    def token(self, i: int) -> bytes:
        last = i == self.ask.n - 1 and self.ask.finish == "length"  # the last token ends a length-limited stream
        return self._event(i + 1, 1000 + i, token_text(i), special=False, final=last)

    def tail(self, timings: Timings) -> bytes:
        if self.ask.finish == "length" and self.ask.n > 0:
            return b""
        return self._event(self.ask.n + 1, 2, "</s>", special=True, final=True)

    def error_tail(self) -> bytes:
        return _sse({"error": STREAM_ERROR_MESSAGE, "error_type": "generation"}, space=False)

    def complete(self, timings: Timings) -> dict[str, Any]:
        return {"generated_text": self.text()}

    def error_body(self, status: int) -> dict[str, Any]:
        etype = {429: "overloaded", 500: "generation"}.get(status, "validation")
        return {"error": _status_message(status, self.ask.model), "error_type": etype}


class Anthropic(Dialect):
    def _message(self, content: list[dict[str, Any]], stop: str | None, output_tokens: int) -> dict[str, Any]:
        return {
            "id": "msg_" + self.id,
            "type": "message",
            "role": "assistant",
            "model": self.ask.model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": self.ask.prompt_tokens, "output_tokens": output_tokens},
        }

    def prelude(self) -> bytes:
        start = {"type": "message_start", "message": self._message([], None, 1)}
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        return _sse(start, "message_start") + _sse(block, "content_block_start") + _sse({"type": "ping"}, "ping")

    def token(self, i: int) -> bytes:
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": token_text(i)}}
        return _sse(delta, "content_block_delta")

    def _stop_reason(self) -> str:
        return "max_tokens" if self.ask.finish == "length" else "end_turn"

    def tail(self, timings: Timings) -> bytes:
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": self._stop_reason(), "stop_sequence": None},
            "usage": {"output_tokens": self.ask.n},
        }
        return (
            _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
            + _sse(delta, "message_delta")
            + _sse({"type": "message_stop"}, "message_stop")
        )

    def error_tail(self) -> bytes:
        err = {"type": "error", "error": {"type": "overloaded_error", "message": STREAM_ERROR_MESSAGE}}
        return _sse(err, "error")

    def complete(self, timings: Timings) -> dict[str, Any]:
        return self._message([{"type": "text", "text": self.text()}], self._stop_reason(), self.ask.n)

    def error_body(self, status: int) -> dict[str, Any]:
        etype = {429: "rate_limit_error", 500: "api_error"}.get(status, "invalid_request_error")
        return {"type": "error", "error": {"type": etype, "message": _status_message(status, self.ask.model)}}


DIALECTS: Final[dict[ResponderApi, type[Dialect]]] = {
    "openai-chat": OpenAIChat,
    "openai-completions": OpenAICompletions,
    "ollama-chat": Ollama,
    "ollama-generate": Ollama,
    "tgi": TGI,
    "anthropic": Anthropic,
}

ROUTES: Final[dict[str, ResponderApi]] = {
    "/v1/chat/completions": "openai-chat",
    "/v1/completions": "openai-completions",
    "/api/chat": "ollama-chat",
    "/api/generate": "ollama-generate",
    "/generate_stream": "tgi",
    "/v1/messages": "anthropic",
}


# --------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------

SETTINGS_KEY: Final = web.AppKey("settings", ResponderSettings)
RNG_KEY: Final = web.AppKey("rng", random.Random)
_NO_BUFFERING: Final = {"cache-control": "no-cache", "x-accel-buffering": "no"}


async def _sleep_until(loop: asyncio.AbstractEventLoop, when: float) -> None:
    delay = when - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)


def _closing(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _stream(request: web.Request, d: Dialect, t0: float, timings: Timings) -> web.StreamResponse:
    ask, s = d.ask, d.ask.settings
    loop = asyncio.get_running_loop()
    resp = web.StreamResponse(status=200, headers={"content-type": d.content_type, **_NO_BUFFERING})
    await resp.prepare(request)  # the headers leave now: time to first byte is small
    try:
        if s.fail == "silent":
            end = t0 + s.silent_max_s
            while loop.time() < end and not _closing(request):
                await asyncio.sleep(s.keepalive_interval_ms / 1000.0)
                if d.keepalive:
                    await resp.write(d.keepalive)
            return resp
        times = schedule_s(t0, s, ask.n, request.app[RNG_KEY])
        stop_after = ask.n // 2 if s.fail in ("cut", "error-event") else ask.n
        if ask.n == 0:
            await _sleep_until(loop, t0 + s.ttft_ms / 1000.0)
            await resp.write(d.prelude())
        for i in range(stop_after):
            await _sleep_until(loop, times[i])
            await resp.write(d.prelude() + d.token(i) if i == 0 else d.token(i))
            timings.last_ns = time.perf_counter_ns()
            if timings.first_ns is None:
                timings.first_ns = timings.last_ns
        if s.fail == "cut":
            if request.transport is not None:
                request.transport.close()  # FIN after what was written: no final chunk, no end marker
            return resp
        await resp.write(d.error_tail() if s.fail == "error-event" else d.tail(timings))
    except ConnectionError:
        pass  # the client went away; nothing to answer
    return resp


async def _complete(request: web.Request, d: Dialect, t0: float, timings: Timings) -> web.StreamResponse:
    """A non-streaming answer, sent when the last token would have been generated."""
    s, n = d.ask.settings, d.ask.n
    loop = asyncio.get_running_loop()
    await _sleep_until(loop, t0 + (s.ttft_ms + max(0, n - 1) * s.token_interval_ms) / 1000.0)
    timings.first_ns = timings.start_ns + round(s.ttft_ms * 1e6)
    timings.last_ns = time.perf_counter_ns()
    if s.fail == "cut":
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=500)  # never reaches the client
    if s.fail == "error-event":
        return web.json_response(d.error_body(500), status=500)
    return web.json_response(d.complete(timings))


async def _generate(request: web.Request) -> web.StreamResponse:
    api = ROUTES[request.path]
    start_ns = time.perf_counter_ns()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    base = request.app[SETTINGS_KEY]
    try:
        settings = settings_for(base, request.headers)
        body = await request.json()
        ask = parse_ask(api, body, settings)
    except (msgspec.ValidationError, BadRequest, ValueError) as err:
        ask = parse_ask(api, {}, base)
        d = DIALECTS[api](ask)
        payload = d.error_body(400)
        _set_message(payload, str(err))
        return web.json_response(payload, status=400)
    d = DIALECTS[api](ask)
    timings = Timings(start_ns=start_ns)
    if settings.fail in ("429", "500"):
        status = int(settings.fail)
        headers = {"retry-after": str(settings.retry_after_s)} if status == 429 else None
        return web.json_response(d.error_body(status), status=status, headers=headers)
    if ask.stream and settings.fail != "json":
        return await _stream(request, d, t0, timings)
    return await _complete(request, d, t0, timings)


def _set_message(payload: dict[str, Any], message: str) -> None:
    err = payload.get("error")
    if isinstance(err, dict):
        err["message"] = message
    else:
        payload["error"] = message


async def _models(request: web.Request) -> web.Response:
    model = model_name(request.app[SETTINGS_KEY])
    return web.json_response(
        {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "edgeprobe"}]}
    )


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "model": model_name(request.app[SETTINGS_KEY])})


def make_app(settings: ResponderSettings | None = None) -> web.Application:
    settings = settings or ResponderSettings()
    app = web.Application()
    app[SETTINGS_KEY] = settings
    app[RNG_KEY] = random.Random(settings.seed)
    for path in ROUTES:
        app.router.add_post(path, _generate)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    return app


@dataclass(frozen=True)
class RunningResponder:
    host: str
    port: int
    settings: ResponderSettings

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@contextlib.asynccontextmanager
async def serve_responder(
    host: str, port: int, settings: ResponderSettings | None = None, *, shutdown_timeout_s: float = 2.0
) -> AsyncIterator[RunningResponder]:
    """Serve on ``host``:``port`` (0 picks a free port) until the block exits."""
    settings = settings or ResponderSettings()
    runner = web.AppRunner(make_app(settings), access_log=None, shutdown_timeout=shutdown_timeout_s)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        yield RunningResponder(host, int(bound), settings)
    finally:
        await runner.cleanup()


async def run_responder(host: str, port: int, settings: ResponderSettings | None = None) -> None:
    """Serve until cancelled (for the CLI command)."""
    async with serve_responder(host, port, settings):
        await asyncio.Event().wait()
