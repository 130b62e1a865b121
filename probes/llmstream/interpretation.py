"""Layer 2, interpretation: one framed item of a given API becomes one :class:`StreamEvent`.

:func:`interpret` (or one of :data:`INTERPRETERS`) turns one framed item of a given API into a
:class:`StreamEvent`. Only an event carrying non-empty generated text is ``content``. Role-only
chunks, finish chunks, usage chunks (whatever their ``choices`` look like), special tokens and
empty blocks are not.

:class:`StreamParser` chains layer 1 (:mod:`edgeprobe.probes.llmstream.decoders`) and this layer
for one API.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from typing import Any, Final, TypeAlias

import msgspec

from edgeprobe.probes.llmstream.apis import _EXCERPT_CHARS, ERROR_MESSAGE_MAX_CHARS, Api, _truncate, check_api, framing
from edgeprobe.probes.llmstream.decoders import Framed, NDJSONDecoder, NDJSONLine, SSEComment, SSEDecoder, SSEEvent


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
