"""Streaming LLM responses, pure: framing, per-API interpretation, the figures, request bodies.

The inference probe reads bytes off the socket and hands them over here, with the monotonic
time they arrived. Nothing in this module does I/O or reads a clock.

Three layers, each usable on its own:

1. Framing. :class:`SSEDecoder` (OpenAI, TGI, Anthropic) and :class:`NDJSONDecoder` (Ollama)
   take bytes split at any boundary and return complete framed items.
2. Interpretation. :func:`interpret` (or one of :data:`INTERPRETERS`) turns one framed item of a
   given API into a :class:`StreamEvent`. Only an event carrying non-empty generated text is
   ``content``. Role-only chunks, finish chunks, usage chunks (whatever their ``choices``
   look like), special tokens and empty blocks are not.
3. Figures. :class:`StreamStats` takes ``(t_ns, StreamEvent)`` pairs and computes
   :class:`StreamFigures`: TTFT, E2E, the gaps between chunks, TPOT, tokens, the server's
   own durations, and the :class:`StreamProblem` if there is one.

:class:`StreamParser` chains layers 1 and 2 for one API.

Definitions (see shared/reference/llm-latency-and-streaming.md for how other tools differ):

* ``ttft_ms``: from t0 (the caller's, normally just before the request is written) to the
  first content event.
* ``e2e_ms``: from t0 to the last content event. ``stream_end_ms``: from t0 to the end marker,
  or to the end of the stream when no end marker came.
* ``itl_*_ms``: gaps between consecutive content events, i.e. chunk cadence. A chunk can hold
  several tokens.
* ``tpot_ms = (e2e - ttft) / (output_tokens - 1)``. This is vLLM's TPOT and GenAI-Perf's ITL,
  and it excludes TTFT. ``tokens_per_s = (output_tokens - 1) / (e2e - ttft)`` is the decode
  rate. Both need two or more content chunks, because with a single chunk the decode phase
  cannot be seen.
* ``output_tokens`` is the server's usage report when there is one (``output_tokens_source =
  "usage"``). Otherwise it is the number of content chunks (``"chunks"``).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from typing import Any, Final, Literal, TypeAlias, get_args

import msgspec

from edgeprobe.probes.stats import percentile

Api: TypeAlias = Literal["openai-chat", "openai-completions", "ollama-chat", "ollama-generate", "tgi", "anthropic"]
APIS: Final[tuple[Api, ...]] = get_args(Api)
Framing: TypeAlias = Literal["sse", "ndjson"]

ERROR_MESSAGE_MAX_CHARS: Final = 300
_EXCERPT_CHARS: Final = 120


def check_api(api: str) -> Api:
    """``api`` as an :data:`Api`. Raises ValueError, naming the known APIs, when it is none of them."""
    for known in APIS:
        if api == known:
            return known
    raise ValueError(f"unknown API {api!r}; known: {', '.join(APIS)}")


def framing(api: Api) -> Framing:
    """How ``api`` frames its stream: Ollama uses NDJSON and the others use SSE."""
    return "ndjson" if api.startswith("ollama-") else "sse"


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------------------------
# 1. Framing
# --------------------------------------------------------------------------------------------


class SSEEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One dispatched server-sent event. ``event`` is None when the event had no ``event:`` line."""

    data: str
    event: str | None = None
    id: str | None = None


class SSEComment(msgspec.Struct, frozen=True):
    """A comment line (``: ping``), with the one optional leading space removed. It is never content."""

    text: str


class SSETail(msgspec.Struct, frozen=True, kw_only=True):
    """What :meth:`SSEDecoder.finish` found when the stream ended.

    ``events`` holds an event whose lines were all complete but whose blank line never came (at
    most one; such an event is dispatched anyway). ``mid_event`` is True when the stream ended
    inside an event: an undispatched field line, or a partial line (``partial_bytes`` > 0),
    which is dropped.
    """

    events: list[SSEEvent]
    mid_event: bool
    partial_bytes: int


_EOL: Final = re.compile(rb"\r\n|\r|\n")
_BOM: Final = b"\xef\xbb\xbf"


def _strip_one_space(value: str) -> str:
    return value[1:] if value.startswith(" ") else value


class SSEDecoder:
    """Incremental ``text/event-stream`` parser, after the WHATWG HTML event-stream rules.

    Bytes may be split anywhere: inside a UTF-8 sequence, between ``\\r`` and ``\\n``, in the
    middle of a field name. Lines end with CRLF, LF or a lone CR. A ``\\r`` at the end of one read
    ends its line at once, and an ``\\n`` at the start of the next read is then skipped, so
    events are dispatched as early as the bytes allow. ``data:`` works with or without the
    space after the colon. Several ``data:`` lines are joined with ``\\n``. Comment lines come out
    as :class:`SSEComment`, in stream order. ``id:`` is kept. ``retry:`` and unknown fields are
    ignored, and unknown fields are counted in ``unknown_lines``.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skip_lf = False
        self._first_line = True
        self._data: list[str] = []
        self._event: str | None = None
        self._last_id: str | None = None
        self._in_event = False
        self.unknown_lines = 0

    def feed(self, chunk: bytes) -> list[SSEEvent | SSEComment]:
        out: list[SSEEvent | SSEComment] = []
        if not chunk:
            return out
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        buf = self._buf
        buf += chunk
        size = len(buf)
        pos = 0
        while (m := _EOL.search(buf, pos)) is not None:
            line = bytes(buf[pos : m.start()])
            if m.end() == size and m.end() - m.start() == 1 and buf[m.start()] == 0x0D:
                self._skip_lf = True  # a CR at the end of this read: its LF may come next
            pos = m.end()
            self._line(line, out)
        del buf[:pos]
        return out

    def _line(self, raw: bytes, out: list[SSEEvent | SSEComment]) -> None:
        if self._first_line:
            self._first_line = False
            raw = raw.removeprefix(_BOM)
        if not raw:
            self._dispatch(out)
            return
        text = raw.decode("utf-8", "replace")
        if text.startswith(":"):
            out.append(SSEComment(_strip_one_space(text[1:])))
            return
        self._in_event = True
        name, _, value = text.partition(":")
        value = _strip_one_space(value)
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value or None
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name != "retry":
            self.unknown_lines += 1

    def _dispatch(self, out: list[SSEEvent | SSEComment]) -> None:
        if self._data:
            out.append(SSEEvent(data="\n".join(self._data), event=self._event, id=self._last_id))
        self._data = []
        self._event = None
        self._in_event = False

    def finish(self) -> SSETail:
        """End of stream: dispatch a pending complete event, report whether the stream stopped mid-event."""
        partial = len(self._buf)
        mid_event = partial > 0 or self._in_event
        pending: list[SSEEvent | SSEComment] = []
        self._dispatch(pending)
        self._buf.clear()
        self._skip_lf = False
        events = [e for e in pending if isinstance(e, SSEEvent)]
        return SSETail(events=events, mid_event=mid_event, partial_bytes=partial)


class NDJSONLine(msgspec.Struct, frozen=True, kw_only=True):
    """One non-blank line of an NDJSON stream.

    When ``error`` is None, ``value`` is the parsed JSON. Otherwise the line is not JSON:
    ``error`` says why, and ``raw`` holds the start of the line.
    """

    value: Any = None
    error: str | None = None
    raw: str | None = None


class NDJSONTail(msgspec.Struct, frozen=True, kw_only=True):
    """What :meth:`NDJSONDecoder.finish` found.

    ``lines`` holds a last line without a newline if it parses as JSON. ``mid_event`` is True when
    unterminated bytes were left over that do not parse. Those bytes are a cut line, not a
    malformed one, and are dropped.
    """

    lines: list[NDJSONLine]
    mid_event: bool
    partial_bytes: int


def _parse_json_line(line: bytes) -> NDJSONLine:
    try:
        return NDJSONLine(value=msgspec.json.decode(line))
    except msgspec.DecodeError as err:
        raw = _truncate(line.decode("utf-8", "replace"), _EXCERPT_CHARS)
        return NDJSONLine(error=f"not JSON: {err}", raw=raw)


class NDJSONDecoder:
    """Incremental newline-delimited JSON parser. Blank lines are skipped and CRLF is accepted.

    A line that is not JSON comes back as an :class:`NDJSONLine` with ``error`` set. Nothing raises.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> list[NDJSONLine]:
        out: list[NDJSONLine] = []
        if not chunk:
            return out
        buf = self._buf
        start = len(buf)
        buf += chunk
        pos = 0
        while (nl := buf.find(b"\n", start)) != -1:
            line = bytes(buf[pos:nl]).strip()
            pos = start = nl + 1
            if line:
                out.append(_parse_json_line(line))
        del buf[:pos]
        return out

    def finish(self) -> NDJSONTail:
        rest = bytes(self._buf).strip()
        partial = len(self._buf)
        self._buf.clear()
        if not rest:
            return NDJSONTail(lines=[], mid_event=False, partial_bytes=partial)
        line = _parse_json_line(rest)
        if line.error is None:
            return NDJSONTail(lines=[line], mid_event=False, partial_bytes=0)
        return NDJSONTail(lines=[], mid_event=True, partial_bytes=partial)


Framed: TypeAlias = SSEEvent | SSEComment | NDJSONLine


# --------------------------------------------------------------------------------------------
# 2. Interpretation
# --------------------------------------------------------------------------------------------


class EventKind(StrEnum):
    CONTENT = "content"  # carries non-empty generated text: the only kind that counts as a chunk
    EMPTY = "empty"  # role-only, finish chunk, empty block start, special token, block stop …
    USAGE = "usage"  # a token report and nothing else
    DONE = "done"  # the end marker
    ERROR = "error"  # the provider reports an error in the stream
    KEEPALIVE = "keepalive"  # comment line, ping, empty data
    MALFORMED = "malformed"  # not JSON, or not an object, where the API sends JSON objects


class StreamEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One framed item, interpreted. ``kind`` is its main class. The other fields hold everything it
    carries, because one event can carry several things: for example, TGI's last token is also
    its end marker, and some servers put usage on every content chunk.

    Token counts come from the server. ``output_tokens`` is the cumulative count so far, and the
    last report wins. Durations are the server's own, in ns, as Ollama reports them.
    """

    kind: EventKind
    text: str = ""  # generated text (visible, reasoning, or tool-call arguments); non-empty iff CONTENT
    done: bool = False
    finish_reason: str | None = None
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    error_type: str | None = None
    error_message: str | None = None  # at most ERROR_MESSAGE_MAX_CHARS
    detail: str | None = None  # why a MALFORMED event is malformed, with an excerpt
    load_ns: int | None = None
    prompt_eval_ns: int | None = None
    eval_ns: int | None = None
    total_ns: int | None = None


def _event(
    *,
    text: str = "",
    done: bool = False,
    finish_reason: str | None = None,
    output_tokens: int | None = None,
    prompt_tokens: int | None = None,
    error_type: str | None = None,
    error_message: str | None = None,
    load_ns: int | None = None,
    prompt_eval_ns: int | None = None,
    eval_ns: int | None = None,
    total_ns: int | None = None,
) -> StreamEvent:
    is_error = error_type is not None or error_message is not None
    if is_error:
        message = error_message if error_message is not None else error_type or "error"
        error_message = _truncate(message, ERROR_MESSAGE_MAX_CHARS)
    if text:
        kind = EventKind.CONTENT
    elif is_error:
        kind = EventKind.ERROR
    elif done:
        kind = EventKind.DONE
    elif output_tokens is not None or prompt_tokens is not None:
        kind = EventKind.USAGE
    else:
        kind = EventKind.EMPTY
    return StreamEvent(
        kind=kind,
        text=text,
        done=done,
        finish_reason=finish_reason,
        output_tokens=output_tokens,
        prompt_tokens=prompt_tokens,
        error_type=error_type,
        error_message=error_message,
        load_ns=load_ns,
        prompt_eval_ns=prompt_eval_ns,
        eval_ns=eval_ns,
        total_ns=total_ns,
    )


KEEPALIVE_EVENT: Final = StreamEvent(kind=EventKind.KEEPALIVE)


def _malformed(why: str, raw: str | None = None) -> StreamEvent:
    detail = why if raw is None else f"{why}: {_truncate(raw, _EXCERPT_CHARS)!r}"
    return StreamEvent(kind=EventKind.MALFORMED, detail=detail)


def _int(obj: Any, key: str) -> int | None:
    """A non-negative integer member of a JSON object, else None (bools are not counts)."""
    if not isinstance(obj, dict):
        return None
    value = obj.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _first_int(obj: Any, *keys: str) -> int | None:
    for key in keys:
        value = _int(obj, key)
        if value is not None:
            return value
    return None


def _str(obj: Any, key: str) -> str | None:
    if not isinstance(obj, dict):
        return None
    value = obj.get(key)
    return value if isinstance(value, str) else None


def _error_of(value: Any) -> tuple[str | None, str]:
    """(type, message) of an error member: a string or an object with message/type/code."""
    if isinstance(value, str):
        return None, value
    if isinstance(value, dict):
        message = _str(value, "message") or _str(value, "error") or _str(value, "detail")
        etype = _str(value, "type") or _str(value, "code")
        if etype is None and isinstance(value.get("code"), int):
            etype = str(value["code"])
        if message is None:
            message = msgspec.json.encode(value).decode()
        return etype, message
    return None, msgspec.json.encode(value).decode()


ObjectHandler: TypeAlias = Callable[[dict[str, Any], str | None], StreamEvent]


def _sse_json(item: Framed, handler: ObjectHandler, *, done_sentinel: bool) -> StreamEvent:
    """Common SSE steps: comments are keep-alives, ``[DONE]`` ends the stream, data must be an object."""
    if isinstance(item, SSEComment):
        return KEEPALIVE_EVENT
    if isinstance(item, NDJSONLine):
        return _malformed("an NDJSON line where an SSE event was expected", item.raw)
    data = item.data.strip()
    if not data:
        return KEEPALIVE_EVENT
    if done_sentinel and data == "[DONE]":
        return _event(done=True)
    try:
        obj = msgspec.json.decode(data)
    except msgspec.DecodeError:
        if item.event == "error":
            return _event(error_type="error", error_message=data)
        return _malformed("data is not JSON", data)
    if not isinstance(obj, dict):
        if item.event == "error":
            return _event(error_type="error", error_message=data)
        return _malformed("data is not a JSON object", data)
    return handler(obj, item.event)


def _openai_error(obj: dict[str, Any], event_name: str | None) -> StreamEvent | None:
    if obj.get("error") is not None:
        etype, message = _error_of(obj["error"])
        return _event(error_type=etype or "error", error_message=message)
    if obj.get("object") == "error":  # vLLM's ErrorResponse, sent as a chunk by older versions
        return _event(error_type=_str(obj, "type") or "error", error_message=_str(obj, "message") or "error")
    if event_name == "error":
        etype, message = _error_of(obj)
        return _event(error_type=etype or "error", error_message=message)
    return None


def _openai_usage(obj: dict[str, Any]) -> tuple[int | None, int | None]:
    usage = obj.get("usage")
    return _int(usage, "completion_tokens"), _int(usage, "prompt_tokens")


def _openai_chat_object(obj: dict[str, Any], event_name: str | None) -> StreamEvent:
    err = _openai_error(obj, event_name)
    if err is not None:
        return err
    texts: list[str] = []
    finish: str | None = None
    choices = obj.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict):
            content = _str(delta, "content")
            reasoning = _str(delta, "reasoning_content") or _str(delta, "reasoning")
            texts += [t for t in (reasoning, content) if t]
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                fn = call.get("function") if isinstance(call, dict) else None
                texts += [t for t in (_str(fn, "name"), _str(fn, "arguments")) if t]
        finish = _str(choice, "finish_reason") or finish
    out_tokens, prompt_tokens = _openai_usage(obj)
    return _event(text="".join(texts), finish_reason=finish, output_tokens=out_tokens, prompt_tokens=prompt_tokens)


def _openai_completions_object(obj: dict[str, Any], event_name: str | None) -> StreamEvent:
    err = _openai_error(obj, event_name)
    if err is not None:
        return err
    texts: list[str] = []
    finish: str | None = None
    choices = obj.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        text = _str(choice, "text")
        if text:
            texts.append(text)
        finish = _str(choice, "finish_reason") or finish
    out_tokens, prompt_tokens = _openai_usage(obj)
    return _event(text="".join(texts), finish_reason=finish, output_tokens=out_tokens, prompt_tokens=prompt_tokens)


def _tgi_object(obj: dict[str, Any], event_name: str | None) -> StreamEvent:
    if obj.get("error") is not None or event_name == "error":
        etype, message = _error_of(obj["error"] if obj.get("error") is not None else obj)
        return _event(error_type=_str(obj, "error_type") or etype or "error", error_message=message)
    token = obj.get("token")
    text = ""
    if isinstance(token, dict) and token.get("special") is not True:
        text = _str(token, "text") or ""
    details = obj.get("details")
    # The last event carries generated_text (and details when asked for): it is the end marker.
    done = obj.get("generated_text") is not None or isinstance(details, dict)
    return _event(
        text=text,
        done=done,
        finish_reason=_str(details, "finish_reason"),
        output_tokens=_int(details, "generated_tokens"),
        prompt_tokens=_first_int(details, "input_length", "prompt_tokens"),  # the name varies by version
    )


def _anthropic_prompt_tokens(usage: Any) -> int | None:
    parts = [_int(usage, key) for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")]
    known = [p for p in parts if p is not None]
    return sum(known) if known else None


def _anthropic_object(obj: dict[str, Any], event_name: str | None) -> StreamEvent:
    etype = _str(obj, "type") or event_name
    if etype == "error" or event_name == "error":
        err_type, err_message = _error_of(obj["error"] if obj.get("error") is not None else obj)
        return _event(error_type=err_type or "error", error_message=err_message)
    if etype == "ping":
        return KEEPALIVE_EVENT
    if etype == "message_start":
        # message_start's usage.output_tokens is a placeholder (1 or so), not a count: ignored
        message = obj.get("message")
        usage = message.get("usage") if isinstance(message, dict) else None
        return _event(prompt_tokens=_anthropic_prompt_tokens(usage))
    if etype == "content_block_start":
        block = obj.get("content_block")
        text = _str(block, "text") or _str(block, "thinking") or ""
        return _event(text=text)
    if etype == "content_block_delta":
        delta = obj.get("delta")
        dtype = _str(delta, "type")
        key = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}.get(dtype or "")
        return _event(text=(_str(delta, key) or "") if key else "")
    if etype == "message_delta":
        usage = obj.get("usage")
        return _event(
            finish_reason=_str(obj.get("delta"), "stop_reason"),
            output_tokens=_int(usage, "output_tokens"),
            prompt_tokens=_anthropic_prompt_tokens(usage),
        )
    if etype == "message_stop":
        return _event(done=True)
    return _event()  # content_block_stop, signature_delta and event types added later


def _ollama_object(value: Any, *, chat: bool) -> StreamEvent:
    if not isinstance(value, dict):
        return _malformed("line is not a JSON object", msgspec.json.encode(value).decode())
    if value.get("error") is not None:
        etype, err_message = _error_of(value["error"])
        return _event(error_type=etype or "error", error_message=err_message)
    if chat:
        message = value.get("message")
        text = _str(message, "content") or _str(message, "thinking") or ""
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if not text and calls:
            text = msgspec.json.encode(calls).decode()
    else:
        text = _str(value, "response") or _str(value, "thinking") or ""
    if value.get("done") is not True:
        return _event(text=text)
    return _event(
        text=text,
        done=True,
        finish_reason=_str(value, "done_reason"),
        output_tokens=_int(value, "eval_count"),
        prompt_tokens=_int(value, "prompt_eval_count"),
        load_ns=_int(value, "load_duration"),
        prompt_eval_ns=_int(value, "prompt_eval_duration"),
        eval_ns=_int(value, "eval_duration"),
        total_ns=_int(value, "total_duration"),
    )


def _ndjson(item: Framed, *, chat: bool) -> StreamEvent:
    if isinstance(item, SSEComment):
        return KEEPALIVE_EVENT
    if isinstance(item, SSEEvent):
        return _malformed("an SSE event where an NDJSON line was expected", item.data)
    if item.error is not None:
        return _malformed(item.error, item.raw)
    return _ollama_object(item.value, chat=chat)


def interpret_openai_chat(item: Framed) -> StreamEvent:
    return _sse_json(item, _openai_chat_object, done_sentinel=True)


def interpret_openai_completions(item: Framed) -> StreamEvent:
    return _sse_json(item, _openai_completions_object, done_sentinel=True)


def interpret_tgi(item: Framed) -> StreamEvent:
    return _sse_json(item, _tgi_object, done_sentinel=False)


def interpret_anthropic(item: Framed) -> StreamEvent:
    return _sse_json(item, _anthropic_object, done_sentinel=False)


def interpret_ollama_chat(item: Framed) -> StreamEvent:
    return _ndjson(item, chat=True)


def interpret_ollama_generate(item: Framed) -> StreamEvent:
    return _ndjson(item, chat=False)


INTERPRETERS: Final[Mapping[Api, Callable[[Framed], StreamEvent]]] = {
    "openai-chat": interpret_openai_chat,
    "openai-completions": interpret_openai_completions,
    "ollama-chat": interpret_ollama_chat,
    "ollama-generate": interpret_ollama_generate,
    "tgi": interpret_tgi,
    "anthropic": interpret_anthropic,
}

END_MARKERS: Final[Mapping[Api, str]] = {
    "openai-chat": "data: [DONE]",
    "openai-completions": "data: [DONE]",
    "ollama-chat": '"done": true',
    "ollama-generate": '"done": true',
    "tgi": "the final event with generated_text",
    "anthropic": "message_stop",
}


def interpret(api: Api, item: Framed) -> StreamEvent:
    return INTERPRETERS[api](item)


class StreamTail(msgspec.Struct, frozen=True, kw_only=True):
    events: list[StreamEvent]  # events completed by the end of the stream (usually none)
    mid_event: bool  # the stream stopped inside an event: a cut
    partial_bytes: int


class StreamParser:
    """Framing plus interpretation for one API and one response body."""

    def __init__(self, api: Api) -> None:
        self.api: Api = check_api(api)
        self._interpret = INTERPRETERS[self.api]
        self._sse = SSEDecoder() if framing(self.api) == "sse" else None
        self._ndjson = NDJSONDecoder() if self._sse is None else None

    def feed(self, chunk: bytes) -> list[StreamEvent]:
        items: Iterable[Framed]
        if self._sse is not None:
            items = self._sse.feed(chunk)
        else:
            assert self._ndjson is not None
            items = self._ndjson.feed(chunk)
        return [self._interpret(item) for item in items]

    def finish(self) -> StreamTail:
        if self._sse is not None:
            sse = self._sse.finish()
            events = [self._interpret(e) for e in sse.events]
            return StreamTail(events=events, mid_event=sse.mid_event, partial_bytes=sse.partial_bytes)
        assert self._ndjson is not None
        nd = self._ndjson.finish()
        events = [self._interpret(line) for line in nd.lines]
        return StreamTail(events=events, mid_event=nd.mid_event, partial_bytes=nd.partial_bytes)


# --------------------------------------------------------------------------------------------
# 3. Figures
# --------------------------------------------------------------------------------------------


class StreamProblem(StrEnum):
    """What went wrong with a stream that was received, from most to least telling.

    The probe maps these to outcomes.
    """

    ERROR_EVENT = "error_event"  # the provider reported an error inside the stream
    MALFORMED = "malformed"  # one or more data lines were not JSON objects (figures so far are kept)
    STREAM_CUT = "stream_cut"  # the stream ended (or was abandoned) without its end marker
    NO_CONTENT = "no_content"  # the stream ended properly but carried no generated text


class StreamFigures(msgspec.Struct, kw_only=True):
    """The figures of one streamed response. Times are in ms from the caller's t0. None: not measured."""

    ttft_ms: float | None  # first content event
    e2e_ms: float | None  # last content event
    stream_end_ms: float | None  # end marker, else end of stream, else None
    chunks: int  # content events
    output_tokens: int
    output_tokens_source: Literal["usage", "chunks"]  # the server's report, or content events counted
    prompt_tokens: int | None
    itl_p50_ms: float | None  # gaps between consecutive content events; None with < 2 chunks
    itl_p95_ms: float | None
    itl_max_ms: float | None
    tpot_ms: float | None  # (e2e - ttft) / (output_tokens - 1); None with < 2 chunks or < 2 tokens
    tokens_per_s: float | None  # (output_tokens - 1) / (e2e - ttft); None when that is undefined
    load_ms: float | None  # Ollama's load_duration
    prompt_eval_ms: float | None  # Ollama's prompt_eval_duration
    eval_ms: float | None  # Ollama's eval_duration
    server_total_ms: float | None  # Ollama's total_duration
    finish_reason: str | None
    done: bool  # the API's end marker was seen
    problem: str | None  # a StreamProblem value
    error_type: str | None
    error_message: str | None  # at most ERROR_MESSAGE_MAX_CHARS
    malformed_events: int
    keepalive_events: int


def _ms(ns: float) -> float:
    return round(ns / 1e6, 6)


def _opt_ms(ns: int | None) -> float | None:
    return None if ns is None else _ms(ns)


class StreamStats:
    """Collects the interpreted events of one response with their arrival times.

    ``t_ns`` is monotonic time in ns relative to the caller's t0. Events parsed from the same
    read share its timestamp. Call :meth:`end` when the body ended or the reading stopped, then
    :meth:`figures`.
    """

    def __init__(self, api: Api | None = None) -> None:
        self.api = api
        self.content_at_ns: list[int] = []
        self.done_at_ns: int | None = None
        self.end_at_ns: int | None = None
        self.ended_mid_event = False
        self.usage_output_tokens: int | None = None
        self.prompt_tokens: int | None = None
        self.finish_reason: str | None = None
        self.error_type: str | None = None
        self.error_message: str | None = None
        self.malformed_events = 0
        self.malformed_detail: str | None = None
        self.keepalive_events = 0
        self.load_ns: int | None = None
        self.prompt_eval_ns: int | None = None
        self.eval_ns: int | None = None
        self.total_ns: int | None = None

    def add(self, t_ns: int, event: StreamEvent) -> None:
        if event.kind is EventKind.KEEPALIVE:
            self.keepalive_events += 1
            return
        if event.kind is EventKind.MALFORMED:
            self.malformed_events += 1
            if self.malformed_detail is None:
                self.malformed_detail = event.detail
            return
        if event.text:
            self.content_at_ns.append(t_ns)
        if event.output_tokens is not None:
            self.usage_output_tokens = event.output_tokens  # cumulative: the last report wins
        if event.prompt_tokens is not None:
            self.prompt_tokens = event.prompt_tokens
        if event.finish_reason:
            self.finish_reason = event.finish_reason
        if event.error_message is not None and self.error_message is None:  # the first error is the cause
            self.error_type = event.error_type
            self.error_message = event.error_message
        self.load_ns = event.load_ns if event.load_ns is not None else self.load_ns
        self.prompt_eval_ns = event.prompt_eval_ns if event.prompt_eval_ns is not None else self.prompt_eval_ns
        self.eval_ns = event.eval_ns if event.eval_ns is not None else self.eval_ns
        self.total_ns = event.total_ns if event.total_ns is not None else self.total_ns
        if event.done and self.done_at_ns is None:
            self.done_at_ns = t_ns

    def add_all(self, t_ns: int, events: Iterable[StreamEvent]) -> None:
        for event in events:
            self.add(t_ns, event)

    def end(self, t_ns: int, *, mid_event: bool = False) -> None:
        """The body ended (EOF or last chunk) at ``t_ns``; ``mid_event``: it stopped inside an event."""
        if self.end_at_ns is None:
            self.end_at_ns = t_ns
        self.ended_mid_event = self.ended_mid_event or mid_event

    @property
    def chunks(self) -> int:
        return len(self.content_at_ns)

    @property
    def done(self) -> bool:
        return self.done_at_ns is not None

    @property
    def problem(self) -> StreamProblem | None:
        if self.error_message is not None:
            return StreamProblem.ERROR_EVENT
        if self.malformed_events:
            return StreamProblem.MALFORMED
        if self.done_at_ns is None:
            return StreamProblem.STREAM_CUT
        if not self.content_at_ns:
            return StreamProblem.NO_CONTENT
        return None

    def problem_reason(self) -> str | None:
        """A one-line reason for the problem, for the observation's ``reason``."""
        problem = self.problem
        if problem is None:
            return None
        if problem is StreamProblem.ERROR_EVENT:
            what = f"{self.error_type}: {self.error_message}" if self.error_type else self.error_message
            return f"error event in the stream after {self.chunks} content chunk(s): {what}"
        if problem is StreamProblem.MALFORMED:
            return f"{self.malformed_events} malformed event(s) in the stream; first: {self.malformed_detail}"
        if problem is StreamProblem.STREAM_CUT:
            marker = END_MARKERS[self.api] if self.api is not None else "the end marker"
            how = "stopped before" if self.end_at_ns is None else "ended without"
            where = " (inside an event)" if self.ended_mid_event else ""
            return f"stream {how} {marker} after {self.chunks} content chunk(s){where}"
        return "the stream ended properly but carried no generated text"

    def figures(self) -> StreamFigures:
        times = self.content_at_ns
        n = len(times)
        ttft_ns = times[0] if n else None
        e2e_ns = times[-1] if n else None
        source: Literal["usage", "chunks"]
        if self.usage_output_tokens is not None:
            output_tokens, source = self.usage_output_tokens, "usage"
        else:
            output_tokens, source = n, "chunks"
        itl_p50 = itl_p95 = itl_max = None
        if n >= 2:
            gaps = sorted(b - a for a, b in itertools.pairwise(times))
            itl_p50 = _ms(percentile(gaps, 50))
            itl_p95 = _ms(percentile(gaps, 95))
            itl_max = _ms(gaps[-1])
        tpot = tokens_per_s = None
        if n >= 2 and output_tokens >= 2 and ttft_ns is not None and e2e_ns is not None:
            decode_ns = e2e_ns - ttft_ns
            tpot = _ms(decode_ns / (output_tokens - 1))
            if decode_ns > 0:
                tokens_per_s = round((output_tokens - 1) / (decode_ns / 1e9), 6)
        end_ns = self.done_at_ns if self.done_at_ns is not None else self.end_at_ns
        problem = self.problem
        return StreamFigures(
            ttft_ms=_opt_ms(ttft_ns),
            e2e_ms=_opt_ms(e2e_ns),
            stream_end_ms=_opt_ms(end_ns),
            chunks=n,
            output_tokens=output_tokens,
            output_tokens_source=source,
            prompt_tokens=self.prompt_tokens,
            itl_p50_ms=itl_p50,
            itl_p95_ms=itl_p95,
            itl_max_ms=itl_max,
            tpot_ms=tpot,
            tokens_per_s=tokens_per_s if tokens_per_s is None or math.isfinite(tokens_per_s) else None,
            load_ms=_opt_ms(self.load_ns),
            prompt_eval_ms=_opt_ms(self.prompt_eval_ns),
            eval_ms=_opt_ms(self.eval_ns),
            server_total_ms=_opt_ms(self.total_ns),
            finish_reason=self.finish_reason,
            done=self.done,
            problem=None if problem is None else problem.value,
            error_type=self.error_type,
            error_message=self.error_message,
            malformed_events=self.malformed_events,
            keepalive_events=self.keepalive_events,
        )


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``extra``. Nested mappings are merged, and everything else is replaced."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def build_request_body(
    api: Api,
    model: str,
    prompt: str,
    max_tokens: int,
    include_usage: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of a streaming request for ``api``. ``extra`` is deep-merged last.

    ``include_usage`` asks OpenAI-style servers for the usage chunk (``stream_options``) and TGI
    for ``details`` (generated_tokens, finish_reason). Ollama and Anthropic always report usage.
    """
    api = check_api(api)
    messages = [{"role": "user", "content": prompt}]
    path: str
    body: dict[str, Any]
    if api == "openai-chat":
        path = "/v1/chat/completions"
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True}
    elif api == "openai-completions":
        path = "/v1/completions"
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True}
    elif api == "ollama-chat":
        path = "/api/chat"
        body = {"model": model, "messages": messages, "stream": True, "options": {"num_predict": max_tokens}}
    elif api == "ollama-generate":
        path = "/api/generate"
        body = {"model": model, "prompt": prompt, "stream": True, "options": {"num_predict": max_tokens}}
    elif api == "tgi":
        path = "/generate_stream"
        parameters: dict[str, Any] = {"max_new_tokens": max_tokens}
        if include_usage:
            parameters["details"] = True
        body = {"inputs": prompt, "parameters": parameters}
    else:
        path = "/v1/messages"
        body = {"model": model, "max_tokens": max_tokens, "messages": messages, "stream": True}
    if include_usage and api in ("openai-chat", "openai-completions"):
        body["stream_options"] = {"include_usage": True}
    if extra:
        body = _merge(body, extra)
    return path, body


ANTHROPIC_VERSION: Final = "2023-06-01"


def auth_headers(api: Api, key: str | None) -> dict[str, str]:
    """Credentials for ``api``: ``x-api-key`` plus ``anthropic-version`` for Anthropic, Bearer otherwise.

    Without a key there is no credential header, but Anthropic's version header is still sent.
    """
    api = check_api(api)
    if api == "anthropic":
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if key:
            headers["x-api-key"] = key
        return headers
    return {"authorization": f"Bearer {key}"} if key else {}


STREAM_CONTENT_TYPES: Final[Mapping[Framing, tuple[str, ...]]] = {
    "sse": ("text/event-stream",),
    "ndjson": ("application/x-ndjson", "application/jsonl", "application/json-seq"),
}


def request_headers(api: Api, key: str | None) -> dict[str, str]:
    """Content-Type, Accept and credentials for a streaming request to ``api``."""
    accept = STREAM_CONTENT_TYPES[framing(check_api(api))][0]
    return {"content-type": "application/json", "accept": accept, **auth_headers(api, key)}


def check_content_type(api: Api, content_type: str | None) -> str | None:
    """None when ``content_type`` is the streaming type ``api`` should answer with, else what is wrong.

    A server that answers ``application/json`` to a streaming request either ignored ``stream`` or
    sent an error body. Neither is a stream, and timing it as one would be wrong.
    """
    wanted = STREAM_CONTENT_TYPES[framing(check_api(api))]
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime in wanted:
        return None
    shown = content_type if content_type else "no Content-Type"
    return f"expected a {wanted[0]} stream, got {shown}"
