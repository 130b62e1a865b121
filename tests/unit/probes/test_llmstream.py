"""edgeprobe.probes.llmstream: framing at every split point, per-API interpretation, figures, request bodies.

The golden streams in tests/golden/streams are raw response bodies (see README there). The
timing model used below: the server writes a stream as *segments* (one SSE event up to and
including its blank line, or one NDJSON line); segment i is sent at a known time and the
network is instantaneous. A read may therefore hold any part of one segment but never bytes
of a later segment, and every event completes at the time of the segment that completes it,
however the segment is cut. That makes the figures exact for every split point.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest

from edgeprobe.probes.llmstream import (
    APIS,
    ERROR_MESSAGE_MAX_CHARS,
    Api,
    EventKind,
    NDJSONDecoder,
    SSEComment,
    SSEDecoder,
    SSEEvent,
    StreamEvent,
    StreamFigures,
    StreamParser,
    StreamProblem,
    StreamStats,
    auth_headers,
    build_request_body,
    check_api,
    check_content_type,
    framing,
    interpret,
    request_headers,
)
from tests.support.paths import STREAMS

MS = 1_000_000


@dataclass(frozen=True)
class Golden:
    file: str
    api: Api
    sep: bytes  # what ends a segment (a server write)
    expect: dict[str, Any]  # StreamFigures fields that must match exactly
    text: str  # the concatenated content text
    times_ms: tuple[float, ...] = ()  # segment send times; default (i + 1) * 10 ms
    mid_event: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _fig(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "prompt_tokens": None,
        "load_ms": None,
        "prompt_eval_ms": None,
        "eval_ms": None,
        "server_total_ms": None,
        "problem": None,
        "error_type": None,
        "error_message": None,
        "malformed_events": 0,
        "keepalive_events": 0,
        "done": True,
    }
    base.update(kw)
    return base


GOLDEN: list[Golden] = [
    Golden(
        "openai-chat-usage.sse",
        "openai-chat",
        b"\n\n",
        # 0 role-only, 1..10 content, 11 finish, 12 usage (choices: []), 13 [DONE]
        _fig(
            ttft_ms=20.0,
            e2e_ms=110.0,
            stream_end_ms=140.0,
            chunks=10,
            output_tokens=10,
            output_tokens_source="usage",
            prompt_tokens=11,
            itl_p50_ms=10.0,
            itl_p95_ms=10.0,
            itl_max_ms=10.0,
            tpot_ms=10.0,
            tokens_per_s=100.0,
            finish_reason="stop",
        ),
        "Hello! 👋 How can I help you today?",
    ),
    Golden(
        "vllm-chat-usage-choices-null.sse",
        "openai-chat",
        b"\n\n",
        # 0 role-only, 1..7 content (12 tokens), 8 finish with content "", 9 usage (choices: null), 10 [DONE]
        _fig(
            ttft_ms=20.0,
            e2e_ms=80.0,
            stream_end_ms=110.0,
            chunks=7,
            output_tokens=12,
            output_tokens_source="usage",
            prompt_tokens=17,
            itl_p50_ms=10.0,
            itl_p95_ms=10.0,
            itl_max_ms=10.0,
            tpot_ms=5.454545,
            tokens_per_s=183.333333,
            finish_reason="stop",
        ),
        "The capital of France is Paris. It is known for the Eiffel Tower.",
    ),
    Golden(
        "gateway-chat-usage-in-delta.sse",
        "openai-chat",
        b"\r\n\r\n",
        # 0,1 comments, 2 role-only, 3..8 content, 9 ': ping', 10..15 content (13 starts with a bare
        # blank line), 16 finish, 17 usage with choices [{"delta":{}}], 18 [DONE]
        _fig(
            ttft_ms=40.0,
            e2e_ms=160.0,
            stream_end_ms=190.0,
            chunks=12,
            output_tokens=9,
            output_tokens_source="usage",
            prompt_tokens=14,
            itl_p50_ms=10.0,
            itl_p95_ms=15.0,
            itl_max_ms=20.0,
            tpot_ms=15.0,
            tokens_per_s=66.666667,
            finish_reason="stop",
            keepalive_events=3,
        ),
        "Sure, here is a haiku:\n\nQuiet edge nodes hum…",
    ),
    Golden(
        "openai-chat-no-done.sse",
        "openai-chat",
        b"\n\n",
        # 0 role-only, 1..4 content, 5 finish; then EOF (t_end = 70 ms)
        _fig(
            ttft_ms=20.0,
            e2e_ms=50.0,
            stream_end_ms=70.0,
            chunks=4,
            output_tokens=4,
            output_tokens_source="chunks",
            itl_p50_ms=10.0,
            itl_p95_ms=10.0,
            itl_max_ms=10.0,
            tpot_ms=10.0,
            tokens_per_s=100.0,
            finish_reason="length",
            done=False,
            problem="stream_cut",
        ),
        "One, two,",
    ),
    Golden(
        "openai-chat-cut-mid-event.sse",
        "openai-chat",
        b"\n\n",
        # 0 role-only, 1..4 content, 5 half an event; EOF at 70 ms
        _fig(
            ttft_ms=20.0,
            e2e_ms=50.0,
            stream_end_ms=70.0,
            chunks=4,
            output_tokens=4,
            output_tokens_source="chunks",
            itl_p50_ms=10.0,
            itl_p95_ms=10.0,
            itl_max_ms=10.0,
            tpot_ms=10.0,
            tokens_per_s=100.0,
            finish_reason=None,
            done=False,
            problem="stream_cut",
        ),
        "Streaming is fun",
        mid_event=True,
    ),
    Golden(
        "openai-chat-error-midstream.sse",
        "openai-chat",
        b"\n\n",
        # 0 role-only, 1..3 content, 4 {"error": ...}, 5 [DONE]
        _fig(
            ttft_ms=20.0,
            e2e_ms=40.0,
            stream_end_ms=60.0,
            chunks=3,
            output_tokens=3,
            output_tokens_source="chunks",
            itl_p50_ms=10.0,
            itl_p95_ms=10.0,
            itl_max_ms=10.0,
            tpot_ms=10.0,
            tokens_per_s=100.0,
            finish_reason=None,
            problem="error_event",
            error_type="InternalServerError",
            error_message="CUDA error: an illegal memory access was encountered. "
            + "x" * (ERROR_MESSAGE_MAX_CHARS - 55)
            + "…",
        ),
        "Let me think",
    ),
    Golden(
        "openai-chat-malformed.sse",
        "openai-chat",
        b"\n\n",
        # 0 role-only, 1 content, 2 unterminated JSON, 3 content, 4 finish, 5 [DONE]
        _fig(
            ttft_ms=20.0,
            e2e_ms=40.0,
            stream_end_ms=60.0,
            chunks=2,
            output_tokens=2,
            output_tokens_source="chunks",
            itl_p50_ms=20.0,
            itl_p95_ms=20.0,
            itl_max_ms=20.0,
            tpot_ms=20.0,
            tokens_per_s=50.0,
            finish_reason="stop",
            problem="malformed",
            malformed_events=1,
        ),
        "A c",
    ),
    Golden(
        "openai-chat-no-content.sse",
        "openai-chat",
        b"\n\n",
        # 0 role-only, 1 finish (length), 2 usage with completion_tokens 0, 3 [DONE]
        _fig(
            ttft_ms=None,
            e2e_ms=None,
            stream_end_ms=40.0,
            chunks=0,
            output_tokens=0,
            output_tokens_source="usage",
            prompt_tokens=9,
            itl_p50_ms=None,
            itl_p95_ms=None,
            itl_max_ms=None,
            tpot_ms=None,
            tokens_per_s=None,
            finish_reason="length",
            problem="no_content",
        ),
        "",
    ),
    Golden(
        "openai-completions-usage.sse",
        "openai-completions",
        b"\n\n",
        # 0..5 content, 6 finish, 7 usage (choices: []), 8 [DONE]
        _fig(
            ttft_ms=10.0,
            e2e_ms=60.0,
            stream_end_ms=90.0,
            chunks=6,
            output_tokens=6,
            output_tokens_source="usage",
            prompt_tokens=6,
            itl_p50_ms=10.0,
            itl_p95_ms=10.0,
            itl_max_ms=10.0,
            tpot_ms=10.0,
            tokens_per_s=100.0,
            finish_reason="length",
        ),
        "\n\n1, 2, 3",
    ),
    Golden(
        "sse-edge-cases.sse",
        "openai-chat",
        b"\r\r",
        # CR line ends. 0 BOM + comment + retry, 1 role-only (event/id/no space), 2 two data lines with
        # a comment between, 3 empty data, 4 content, 5 finish, 6 [DONE]
        _fig(
            ttft_ms=30.0,
            e2e_ms=50.0,
            stream_end_ms=70.0,
            chunks=2,
            output_tokens=2,
            output_tokens_source="chunks",
            itl_p50_ms=20.0,
            itl_p95_ms=20.0,
            itl_max_ms=20.0,
            tpot_ms=20.0,
            tokens_per_s=50.0,
            finish_reason="stop",
            keepalive_events=3,
        ),
        "Grüße 世界",
    ),
    Golden(
        "ollama-chat.ndjson",
        "ollama-chat",
        b"\n",
        # 0..6 content, 7 done:true with durations
        _fig(
            ttft_ms=10.0,
            e2e_ms=70.0,
            stream_end_ms=80.0,
            chunks=7,
            output_tokens=8,
            output_tokens_source="usage",
            prompt_tokens=26,
            itl_p50_ms=10.0,
            itl_p95_ms=10.0,
            itl_max_ms=10.0,
            tpot_ms=8.571429,
            tokens_per_s=116.666667,
            load_ms=512.000123,
            prompt_eval_ms=180.5,
            eval_ms=201.75,
            server_total_ms=912.345678,
            finish_reason="stop",
        ),
        "Hi there! What's up?",
    ),
    Golden(
        "ollama-generate.ndjson",
        "ollama-generate",
        b"\n",
        # 0..8 content, 9 done:true
        _fig(
            ttft_ms=10.0,
            e2e_ms=90.0,
            stream_end_ms=100.0,
            chunks=9,
            output_tokens=9,
            output_tokens_source="usage",
            prompt_tokens=33,
            itl_p50_ms=10.0,
            itl_p95_ms=10.0,
            itl_max_ms=10.0,
            tpot_ms=10.0,
            tokens_per_s=100.0,
            load_ms=21.456789,
            prompt_eval_ms=60.123456,
            eval_ms=300.987654,
            server_total_ms=402.003004,
            finish_reason="length",
        ),
        "The sky is blue because of Rayleigh scattering.",
    ),
    Golden(
        "ollama-chat-error.ndjson",
        "ollama-chat",
        b"\n",
        # 0,1 content, 2 {"error": ...}; EOF at 40 ms
        _fig(
            ttft_ms=10.0,
            e2e_ms=20.0,
            stream_end_ms=40.0,
            chunks=2,
            output_tokens=2,
            output_tokens_source="chunks",
            itl_p50_ms=10.0,
            itl_p95_ms=10.0,
            itl_max_ms=10.0,
            tpot_ms=10.0,
            tokens_per_s=100.0,
            finish_reason=None,
            done=False,
            problem="error_event",
            error_type="error",
            error_message="an error was encountered while running the model: unexpected EOF",
        ),
        "Once upon",
    ),
    Golden(
        "tgi-eos.sse",
        "tgi",
        b"\n\n",
        # 0..3 tokens, 4 ':' keep-alive, 5..9 tokens, 10 special EOS with generated_text and details
        _fig(
            ttft_ms=10.0,
            e2e_ms=100.0,
            stream_end_ms=110.0,
            chunks=9,
            output_tokens=10,  # TGI's generated_tokens counts the EOS token
            output_tokens_source="usage",
            prompt_tokens=7,
            itl_p50_ms=10.0,
            itl_p95_ms=16.5,
            itl_max_ms=20.0,
            tpot_ms=10.0,
            tokens_per_s=100.0,
            finish_reason="eos_token",
            keepalive_events=1,
        ),
        " Deep learning is a subset of machine learning.",
    ),
    Golden(
        "tgi-length.sse",
        "tgi",
        b"\n\n",
        # 0..2 tokens, 3 last (ordinary) token with generated_text: content and end marker at once
        _fig(
            ttft_ms=10.0,
            e2e_ms=40.0,
            stream_end_ms=40.0,
            chunks=4,
            output_tokens=4,
            output_tokens_source="usage",
            itl_p50_ms=10.0,
            itl_p95_ms=10.0,
            itl_max_ms=10.0,
            tpot_ms=10.0,
            tokens_per_s=100.0,
            finish_reason="length",
        ),
        "\nYes. The",
    ),
    Golden(
        "anthropic.sse",
        "anthropic",
        b"\n\n",
        # 0 message_start, 1 content_block_start "", 2 ping, 3..7 text_delta, 8 block stop,
        # 9 message_delta (output_tokens 12), 10 message_stop. Irregular times: gaps 30, 15, 75, 10.
        _fig(
            ttft_ms=400.0,
            e2e_ms=530.0,
            stream_end_ms=533.0,
            chunks=5,
            output_tokens=12,
            output_tokens_source="usage",
            prompt_tokens=25,
            itl_p50_ms=22.5,
            itl_p95_ms=68.25,
            itl_max_ms=75.0,
            tpot_ms=11.818182,
            tokens_per_s=84.615385,
            finish_reason="end_turn",
            keepalive_events=1,
        ),
        "Hello! It's nice to meet you.",
        times_ms=(350, 351, 352, 400, 430, 445, 520, 530, 531, 532, 533),
    ),
    Golden(
        "anthropic-overloaded.sse",
        "anthropic",
        b"\n\n",
        # 0 message_start, 1 block start, 2 ping, 3,4 text_delta, 5 event: error; EOF at 70 ms
        _fig(
            ttft_ms=40.0,
            e2e_ms=50.0,
            stream_end_ms=70.0,
            chunks=2,
            output_tokens=2,
            output_tokens_source="chunks",
            prompt_tokens=25,
            itl_p50_ms=10.0,
            itl_p95_ms=10.0,
            itl_max_ms=10.0,
            tpot_ms=10.0,
            tokens_per_s=100.0,
            finish_reason=None,
            done=False,
            problem="error_event",
            error_type="overloaded_error",
            error_message="Overloaded",
            keepalive_events=1,
        ),
        "Here is",
    ),
]

IDS = [g.file for g in GOLDEN]


def test_every_golden_file_has_expectations() -> None:
    on_disk = {p.name for p in STREAMS.iterdir() if p.suffix in (".sse", ".ndjson")}
    assert on_disk == set(IDS)


def segments(data: bytes, sep: bytes) -> list[bytes]:
    out, pos = [], 0
    for m in re.finditer(re.escape(sep), data):
        out.append(data[pos : m.end()])
        pos = m.end()
    if pos < len(data):
        out.append(data[pos:])
    return out


def times_ns(g: Golden, n: int) -> list[int]:
    if g.times_ms:
        assert len(g.times_ms) == n, f"{g.file}: {n} segments, {len(g.times_ms)} times"
        return [round(t * MS) for t in g.times_ms]
    return [(i + 1) * 10 * MS for i in range(n)]


Reads = list[tuple[int, bytes]]


@dataclass
class Run:
    figures: StreamFigures
    events: list[StreamEvent]
    mid_event: bool
    stats: StreamStats


def run(api: Api, reads: Reads, t_end_ns: int) -> Run:
    parser = StreamParser(api)
    stats = StreamStats(api)
    events: list[StreamEvent] = []
    for t, chunk in reads:
        got = parser.feed(chunk)
        events += got
        stats.add_all(t, got)
    tail = parser.finish()
    events += tail.events
    stats.add_all(t_end_ns, tail.events)
    stats.end(t_end_ns, mid_event=tail.mid_event)
    return Run(stats.figures(), events, tail.mid_event, stats)


def load(g: Golden) -> tuple[list[bytes], list[int], int]:
    segs = segments((STREAMS / g.file).read_bytes(), g.sep)
    ts = times_ns(g, len(segs))
    return segs, ts, ts[-1] + 10 * MS  # the body ends 10 ms after the last write


def check(g: Golden, r: Run) -> None:
    figures = msgspec.structs.asdict(r.figures)
    mismatched = {k: (figures[k], v) for k, v in g.expect.items() if figures[k] != v}
    assert not mismatched, f"{g.file}: (got, expected): {mismatched}"
    assert set(g.expect) == set(figures), f"{g.file}: expectations must name every figure"
    assert "".join(e.text for e in r.events if e.kind is EventKind.CONTENT) == g.text
    assert r.mid_event is g.mid_event
    assert all(bool(e.text) == (e.kind is EventKind.CONTENT) for e in r.events)


@pytest.mark.parametrize("g", GOLDEN, ids=IDS)
def test_golden_one_read_per_segment(g: Golden) -> None:
    segs, ts, t_end = load(g)
    check(g, run(g.api, list(zip(ts, segs, strict=True)), t_end))


@pytest.mark.parametrize("g", GOLDEN, ids=IDS)
def test_golden_at_every_split_point(g: Golden) -> None:
    """Every byte offset of the file: cut the segment that holds it in two there."""
    segs, ts, t_end = load(g)
    for i, seg in enumerate(segs):
        for p in range(1, len(seg)):
            reads = list(zip(ts, segs, strict=True))
            reads[i : i + 1] = [(ts[i], seg[:p]), (ts[i], seg[p:])]
            check(g, run(g.api, reads, t_end))


@pytest.mark.parametrize("g", GOLDEN, ids=IDS)
def test_golden_one_byte_at_a_time(g: Golden) -> None:
    segs, ts, t_end = load(g)
    reads = [(t, seg[k : k + 1]) for t, seg in zip(ts, segs, strict=True) for k in range(len(seg))]
    check(g, run(g.api, reads, t_end))


@pytest.mark.parametrize("g", GOLDEN, ids=IDS)
def test_golden_random_splits(g: Golden) -> None:
    segs, ts, t_end = load(g)
    rng = random.Random(f"{g.file}-splits")
    for _ in range(200):
        reads: Reads = []
        for t, seg in zip(ts, segs, strict=True):
            cuts = sorted(rng.sample(range(1, len(seg)), min(len(seg) - 1, rng.randint(0, 6))))
            bounds = [0, *cuts, len(seg)]
            reads += [(t, seg[a:b]) for a, b in itertools.pairwise(bounds)]
        check(g, run(g.api, reads, t_end))


@pytest.mark.parametrize("g", GOLDEN, ids=IDS)
def test_golden_events_do_not_depend_on_reads(g: Golden) -> None:
    """Reads that cross segments (coalesced by the network): the same events, in the same order."""
    data = (STREAMS / g.file).read_bytes()
    whole = run(g.api, [(0, data)], 1)
    for p in range(len(data) + 1):
        split = run(g.api, [(0, data[:p]), (0, data[p:])], 1)
        assert split.events == whole.events, f"{g.file} split at {p}"
        assert split.mid_event is whole.mid_event


def test_coalesced_reads_share_their_timestamp() -> None:
    """Everything in one read arrives at once: zero gaps, no decode rate, TPOT 0 is a measurement."""
    data = (STREAMS / "openai-chat-usage.sse").read_bytes()
    r = run("openai-chat", [(5 * MS, data)], 6 * MS)
    f = r.figures
    assert (f.ttft_ms, f.e2e_ms, f.stream_end_ms) == (5.0, 5.0, 5.0)
    assert f.itl_max_ms == 0.0 and f.tpot_ms == 0.0 and f.tokens_per_s is None
    assert f.problem is None


# --------------------------------------------------------------------------------------------
# SSE framing details
# --------------------------------------------------------------------------------------------


def test_sse_cr_at_end_of_read_dispatches_at_once_and_skips_the_following_lf() -> None:
    d = SSEDecoder()
    assert d.feed(b"data: a\r") == []
    assert d.feed(b"\n\r") == [SSEEvent(data="a")]  # blank line ends with the CR: dispatched now
    assert d.feed(b"\ndata: b\r\n\r\n") == [SSEEvent(data="b")]  # the LF after that CR is skipped
    assert d.finish().mid_event is False


def test_sse_lf_after_a_consumed_cr_is_not_a_blank_line() -> None:
    d = SSEDecoder()
    out = d.feed(b"data: x\r")
    out += d.feed(b"\n")  # belongs to the CR before: no dispatch
    assert out == []
    assert d.feed(b"\r\n") == [SSEEvent(data="x")]


def test_sse_fields() -> None:
    d = SSEDecoder()
    stream = (
        b"event: delta\nid: 7\ndata\ndata:two\ndata:  three\nretry: 10\nfoo: bar\n\n"
        b": just a comment\n:\n\nevent: lonely\n\nid: 8\0\ndata: x\n\n"
    )
    got = d.feed(stream)
    assert got == [
        SSEEvent(data="\ntwo\n three", event="delta", id="7"),
        SSEComment("just a comment"),
        SSEComment(""),
        SSEEvent(data="x", id="7"),  # an id with NUL is ignored; the last id stays
    ]
    assert d.unknown_lines == 1


def test_sse_utf8_split_inside_a_code_point() -> None:
    payload = 'data: {"t":"€😀"}\n\n'.encode()
    for p in range(len(payload)):
        d = SSEDecoder()
        assert d.feed(payload[:p]) + d.feed(payload[p:]) == [SSEEvent(data='{"t":"€😀"}')]


def test_sse_finish_dispatches_complete_lines_and_drops_a_partial_one() -> None:
    d = SSEDecoder()
    assert d.feed(b"data: [DONE]\n") == []
    tail = d.finish()
    assert tail.events == [SSEEvent(data="[DONE]")] and tail.mid_event and tail.partial_bytes == 0
    d = SSEDecoder()
    d.feed(b'data: {"a":1}\n\ndata: {"b"')
    tail = d.finish()
    assert tail.events == [] and tail.mid_event and tail.partial_bytes == len(b'data: {"b"')
    d = SSEDecoder()
    d.feed(b"data: 1\n\n: trailing comment\n")
    assert d.finish().mid_event is False


def test_done_without_final_blank_line_still_ends_the_stream() -> None:
    r = run("openai-chat", [(MS, b'data: {"choices":[{"delta":{"content":"x"}}]}\n\ndata: [DONE]\n')], 2 * MS)
    assert r.figures.done and r.figures.problem is None and r.figures.stream_end_ms == 2.0
    assert r.mid_event is True


# --------------------------------------------------------------------------------------------
# NDJSON framing
# --------------------------------------------------------------------------------------------


def test_ndjson_partial_lines_crlf_blank_and_malformed() -> None:
    d = NDJSONDecoder()
    assert d.feed(b'{"a":') == []
    got = d.feed(b'1}\r\n\n  \n{"b":2}\nnot json\n{"c"')
    assert [line.value for line in got[:2]] == [{"a": 1}, {"b": 2}]
    assert got[2].error is not None and got[2].raw == "not json"
    tail = d.finish()
    assert tail.lines == [] and tail.mid_event and tail.partial_bytes == 4


def test_ndjson_last_line_without_newline_is_accepted_when_complete() -> None:
    d = NDJSONDecoder()
    assert d.feed(b'{"done":true}') == []
    tail = d.finish()
    assert [line.value for line in tail.lines] == [{"done": True}] and not tail.mid_event


def test_ndjson_non_object_line_is_malformed() -> None:
    p = StreamParser("ollama-generate")
    (ev,) = p.feed(b"[1,2]\n")
    assert ev.kind is EventKind.MALFORMED


# --------------------------------------------------------------------------------------------
# Interpretation
# --------------------------------------------------------------------------------------------


def oa(data: Any, event: str | None = None) -> StreamEvent:
    raw = data if isinstance(data, str) else msgspec.json.encode(data).decode()
    return interpret("openai-chat", SSEEvent(data=raw, event=event))


@pytest.mark.parametrize(
    "chunk",
    [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
        {"choices": [{"index": 0, "delta": {"content": None}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}},
        {"choices": None, "usage": {"prompt_tokens": 3, "completion_tokens": 5}},
        {"choices": [{"index": 0, "delta": {}}], "usage": {"prompt_tokens": 3, "completion_tokens": 5}},
        {"id": "x", "object": "chat.completion.chunk"},
    ],
)
def test_openai_chunks_that_do_not_count(chunk: dict[str, Any]) -> None:
    ev = oa(chunk)
    assert ev.kind is not EventKind.CONTENT and ev.text == ""


def test_openai_usage_and_finish_are_read() -> None:
    assert oa({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}}) == StreamEvent(
        kind=EventKind.USAGE, output_tokens=5, prompt_tokens=3
    )
    ev = oa({"choices": [{"delta": {"content": "hi"}, "finish_reason": "length"}], "usage": {"completion_tokens": 1}})
    assert (ev.kind, ev.text, ev.finish_reason, ev.output_tokens) == (EventKind.CONTENT, "hi", "length", 1)
    assert oa("[DONE]") == StreamEvent(kind=EventKind.DONE, done=True)
    assert oa(" [DONE] ").done


def test_openai_reasoning_and_tool_call_text_count_as_generated() -> None:
    assert oa({"choices": [{"delta": {"reasoning_content": "hmm"}}]}).text == "hmm"
    assert oa({"choices": [{"delta": {"reasoning": "hmm", "content": ""}}]}).text == "hmm"
    call = {"index": 0, "function": {"arguments": '{"ci'}}
    assert oa({"choices": [{"delta": {"tool_calls": [call]}}]}).kind is EventKind.CONTENT


@pytest.mark.parametrize(
    ("data", "event", "etype", "message"),
    [
        ({"error": {"message": "boom", "type": "server_error", "code": None}}, None, "server_error", "boom"),
        ({"error": {"message": "slow down", "code": 429}}, None, "429", "slow down"),
        ({"error": "plain"}, None, "error", "plain"),
        ({"object": "error", "message": "bad", "type": "BadRequestError", "code": 400}, None, "BadRequestError", "bad"),
        ({"message": "named event"}, "error", "error", "named event"),
        ("not json at all", "error", "error", "not json at all"),
    ],
)
def test_openai_error_shapes(data: Any, event: str | None, etype: str, message: str) -> None:
    ev = oa(data, event)
    assert (ev.kind, ev.error_type, ev.error_message) == (EventKind.ERROR, etype, message)


def test_error_message_is_truncated() -> None:
    ev = oa({"error": {"message": "y" * 1000}})
    assert ev.error_message is not None and len(ev.error_message) == ERROR_MESSAGE_MAX_CHARS


def test_malformed_and_keepalive() -> None:
    assert oa('{"choices": [').kind is EventKind.MALFORMED
    assert oa("42").kind is EventKind.MALFORMED
    assert oa("").kind is EventKind.KEEPALIVE
    assert interpret("openai-chat", SSEComment("ping")).kind is EventKind.KEEPALIVE
    ev = oa("garbage")
    assert ev.detail is not None and "garbage" in ev.detail


def test_completions_text() -> None:
    ev = interpret("openai-completions", SSEEvent(data='{"choices":[{"text":" x","index":0}]}'))
    assert ev.kind is EventKind.CONTENT and ev.text == " x"
    ev = interpret("openai-completions", SSEEvent(data='{"choices":[{"text":"","finish_reason":"stop"}]}'))
    assert ev.kind is EventKind.EMPTY and ev.finish_reason == "stop"


def tgi(data: str) -> StreamEvent:
    return interpret("tgi", SSEEvent(data=data))


def test_tgi_special_tokens_do_not_count_and_final_event_is_done() -> None:
    ev = tgi('{"token":{"id":2,"text":"</s>","special":true},"generated_text":null,"details":null}')
    assert ev.kind is EventKind.EMPTY
    ev = tgi('{"token":{"id":2,"text":"</s>","special":true},"generated_text":"ab","details":null}')
    assert ev.kind is EventKind.DONE and ev.output_tokens is None
    assert tgi("[DONE]").kind is EventKind.MALFORMED  # TGI has no [DONE]
    ev = tgi('{"error":"Input validation error: `inputs` must have less than 4096 tokens","error_type":"validation"}')
    assert ev.kind is EventKind.ERROR and ev.error_type == "validation"
    ev = tgi('{"token":{"text":"x","special":false},"details":{"generated_tokens":3,"prompt_tokens":5}}')
    assert (ev.kind, ev.done, ev.output_tokens, ev.prompt_tokens) == (EventKind.CONTENT, True, 3, 5)


def ant(name: str, data: dict[str, Any]) -> StreamEvent:
    return interpret("anthropic", SSEEvent(event=name, data=msgspec.json.encode(data).decode()))


def test_anthropic_events() -> None:
    start = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert ant("content_block_start", start).kind is EventKind.EMPTY
    start["content_block"] = {"type": "text", "text": "Hi"}
    assert ant("content_block_start", start).kind is EventKind.CONTENT
    tool = {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t", "input": {}}}
    assert ant("content_block_start", tool).kind is EventKind.EMPTY

    def delta(d: dict[str, Any]) -> StreamEvent:
        return ant("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": d})

    assert delta({"type": "text_delta", "text": "a"}).text == "a"
    assert delta({"type": "text_delta", "text": ""}).kind is EventKind.EMPTY
    assert delta({"type": "thinking_delta", "thinking": "t"}).text == "t"
    assert delta({"type": "input_json_delta", "partial_json": '{"x'}).text == '{"x'
    assert delta({"type": "signature_delta", "signature": "EqQB"}).kind is EventKind.EMPTY
    md = ant(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "max_tokens"},
            "usage": {"input_tokens": 4, "cache_read_input_tokens": 6, "output_tokens": 9},
        },
    )
    assert (md.kind, md.finish_reason, md.output_tokens, md.prompt_tokens) == (EventKind.USAGE, "max_tokens", 9, 10)
    assert ant("ping", {"type": "ping"}).kind is EventKind.KEEPALIVE
    assert ant("message_stop", {"type": "message_stop"}) == StreamEvent(kind=EventKind.DONE, done=True)
    err = ant("error", {"type": "error", "error": {"type": "api_error", "message": "Internal server error"}})
    assert (err.kind, err.error_type, err.error_message) == (EventKind.ERROR, "api_error", "Internal server error")


def test_ollama_thinking_and_tool_calls_count() -> None:
    p = StreamParser("ollama-chat")
    (ev,) = p.feed(b'{"message":{"role":"assistant","content":"","thinking":"Let me"},"done":false}\n')
    assert ev.kind is EventKind.CONTENT
    (ev,) = p.feed(
        b'{"message":{"role":"assistant","content":"","tool_calls":[{"function":{"name":"f"}}]},"done":false}\n'
    )
    assert ev.kind is EventKind.CONTENT
    (ev,) = p.feed(b'{"message":{"role":"assistant","content":""},"done":false}\n')
    assert ev.kind is EventKind.EMPTY


def test_framing_mismatch_is_malformed() -> None:
    assert interpret("ollama-chat", SSEEvent(data="{}")).kind is EventKind.MALFORMED
    nd = NDJSONDecoder().feed(b"{}\n")[0]
    assert interpret("anthropic", nd).kind is EventKind.MALFORMED


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def content(text: str = "x", **kw: Any) -> StreamEvent:
    return StreamEvent(kind=EventKind.CONTENT, text=text, **kw)


DONE = StreamEvent(kind=EventKind.DONE, done=True)


def test_single_chunk_has_no_gaps_and_no_decode_rate() -> None:
    s = StreamStats()
    s.add(50 * MS, content())
    s.add(60 * MS, StreamEvent(kind=EventKind.USAGE, output_tokens=20))
    s.add(61 * MS, DONE)
    f = s.figures()
    assert (f.ttft_ms, f.e2e_ms, f.stream_end_ms, f.chunks, f.output_tokens) == (50.0, 50.0, 61.0, 1, 20)
    assert f.itl_p50_ms is None and f.itl_max_ms is None and f.tpot_ms is None and f.tokens_per_s is None
    assert f.problem is None


def test_last_usage_report_wins_and_first_error_is_the_cause() -> None:
    s = StreamStats()
    s.add(1 * MS, content(output_tokens=1))
    s.add(2 * MS, content(output_tokens=2))
    s.add(3 * MS, StreamEvent(kind=EventKind.ERROR, error_type="a", error_message="first"))
    s.add(4 * MS, StreamEvent(kind=EventKind.ERROR, error_type="b", error_message="second"))
    f = s.figures()
    assert f.output_tokens == 2 and f.output_tokens_source == "usage"
    assert (f.problem, f.error_type, f.error_message) == ("error_event", "a", "first")
    assert s.problem is StreamProblem.ERROR_EVENT
    reason = s.problem_reason()
    assert reason is not None and "first" in reason and "2 content chunk(s)" in reason


def test_problem_priority_and_reasons() -> None:
    s = StreamStats("anthropic")
    assert s.figures().problem == StreamProblem.STREAM_CUT
    assert s.problem_reason() == "stream stopped before message_stop after 0 content chunk(s)"
    s.end(5 * MS, mid_event=True)
    assert s.problem_reason() == "stream ended without message_stop after 0 content chunk(s) (inside an event)"
    s.add(1 * MS, StreamEvent(kind=EventKind.MALFORMED, detail="data is not JSON: 'x'"))
    assert s.figures().problem == StreamProblem.MALFORMED
    assert s.problem_reason() == "1 malformed event(s) in the stream; first: data is not JSON: 'x'"
    t = StreamStats()
    t.add(1 * MS, DONE)
    assert t.figures().problem == StreamProblem.NO_CONTENT
    t.add(2 * MS, content())
    assert t.problem is None and t.problem_reason() is None
    assert t.figures().stream_end_ms == 1.0  # the end marker's time, not the end of the body


def test_figures_round_to_nanoseconds() -> None:
    s = StreamStats()
    for i, t in enumerate((1_000_001, 2_000_003, 3_000_011)):
        s.add(t, content(str(i)))
    s.add(3_000_012, DONE)
    f = s.figures()
    assert (f.ttft_ms, f.e2e_ms, f.itl_p50_ms, f.itl_max_ms) == (1.000001, 3.000011, 1.000005, 1.000008)
    assert f.tpot_ms == 1.000005 and f.tokens_per_s == 999.995


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


def test_build_request_bodies() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    assert build_request_body("openai-chat", "m", "hi", 16) == (
        "/v1/chat/completions",
        {"model": "m", "messages": msgs, "max_tokens": 16, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert build_request_body("openai-chat", "m", "hi", 16, include_usage=False)[1] == {
        "model": "m",
        "messages": msgs,
        "max_tokens": 16,
        "stream": True,
    }
    assert build_request_body("openai-completions", "m", "hi", 8) == (
        "/v1/completions",
        {"model": "m", "prompt": "hi", "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert build_request_body("ollama-chat", "llama3.2", "hi", 8) == (
        "/api/chat",
        {"model": "llama3.2", "messages": msgs, "stream": True, "options": {"num_predict": 8}},
    )
    assert build_request_body("ollama-generate", "llama3.2", "hi", 8) == (
        "/api/generate",
        {"model": "llama3.2", "prompt": "hi", "stream": True, "options": {"num_predict": 8}},
    )
    assert build_request_body("tgi", "ignored", "hi", 8) == (
        "/generate_stream",
        {"inputs": "hi", "parameters": {"max_new_tokens": 8, "details": True}},
    )
    assert build_request_body("tgi", "ignored", "hi", 8, include_usage=False)[1] == {
        "inputs": "hi",
        "parameters": {"max_new_tokens": 8},
    }
    assert build_request_body("anthropic", "claude-x", "hi", 8) == (
        "/v1/messages",
        {"model": "claude-x", "max_tokens": 8, "messages": msgs, "stream": True},
    )


def test_extra_is_deep_merged() -> None:
    _, body = build_request_body("ollama-chat", "m", "p", 4, extra={"options": {"temperature": 0}, "keep_alive": "5m"})
    assert body["options"] == {"num_predict": 4, "temperature": 0} and body["keep_alive"] == "5m"
    _, body = build_request_body("openai-chat", "m", "p", 4, extra={"seed": 1})
    assert body["max_tokens"] == 4 and body["seed"] == 1
    # Lifting the token limit through extra was allowed once; it let a 40-token budget ask for
    # millions (issue 12): now refused, see test_llmstream_bounds.py.
    with pytest.raises(ValueError, match="may not set max_tokens"):
        build_request_body("openai-chat", "m", "p", 4, extra={"max_tokens": None, "seed": 1})


def test_headers_and_content_types() -> None:
    assert auth_headers("openai-chat", "sk-1") == {"authorization": "Bearer sk-1"}
    assert auth_headers("tgi", "hf_x") == {"authorization": "Bearer hf_x"}
    assert auth_headers("ollama-chat", None) == {}
    assert auth_headers("anthropic", "k") == {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    assert auth_headers("anthropic", "") == {"anthropic-version": "2023-06-01"}
    assert request_headers("ollama-generate", None)["accept"] == "application/x-ndjson"
    assert request_headers("openai-chat", "k")["accept"] == "text/event-stream"
    assert check_content_type("openai-chat", "text/event-stream; charset=utf-8") is None
    assert check_content_type("ollama-chat", "application/x-ndjson") is None
    assert check_content_type("openai-chat", "application/json") == (
        "expected a text/event-stream stream, got application/json"
    )
    assert check_content_type("tgi", None) == "expected a text/event-stream stream, got no Content-Type"


def test_api_names() -> None:
    assert APIS == ("openai-chat", "openai-completions", "ollama-chat", "ollama-generate", "tgi", "anthropic")
    assert [framing(a) for a in APIS] == ["sse", "sse", "ndjson", "ndjson", "sse", "sse"]
    assert check_api("tgi") == "tgi"
    with pytest.raises(ValueError, match="unknown API 'openai'"):
        check_api("openai")
    with pytest.raises(ValueError):
        StreamParser("vllm")  # type: ignore[arg-type]
