"""Layer 3, the figures: :class:`StreamStats` takes ``(t_ns, StreamEvent)`` pairs.

It computes :class:`StreamFigures`: TTFT, E2E, the gaps between chunks, TPOT, tokens, the server's
own durations, and the :class:`StreamProblem` if there is one.

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
from collections.abc import Iterable
from enum import StrEnum
from typing import Literal

import msgspec

from edgeprobe.probes.llmstream.apis import Api
from edgeprobe.probes.llmstream.interpretation import END_MARKERS, EventKind, StreamEvent
from edgeprobe.probes.stats import percentile


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
