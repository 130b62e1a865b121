"""The stream decoders are bounded and linear: a hostile server cannot fill memory or pin a core.

Measured before: the NDJSON decoder held an endless line (3.8-5.4 GiB RSS in one run) and the
SSE decoder rescanned its whole buffer on every read (a core pinned, the event loop stalled up
to 1.5 s).
"""

from __future__ import annotations

import time

import msgspec
import pytest

from edgeprobe.probes.llmstream import (
    MAX_EVENT_BYTES,
    MAX_LINE_BYTES,
    NDJSONDecoder,
    SSEDecoder,
    SSEEvent,
    StreamLimitError,
)


def test_sse_line_past_the_bound_raises() -> None:
    d = SSEDecoder()
    piece = b"data: " + b"x" * 65_530
    fed = 0
    with pytest.raises(StreamLimitError, match="line longer than"):
        while True:
            d.feed(piece)
            fed += len(piece)
            assert fed <= MAX_LINE_BYTES + len(piece)  # raised no later than one read past the bound


def test_ndjson_line_past_the_bound_raises() -> None:
    d = NDJSONDecoder()
    fed = 0
    with pytest.raises(StreamLimitError, match="NDJSON line longer than"):
        while True:
            d.feed(b'{"response": "' + b"y" * 65_000)
            fed += 65_014
            assert fed <= MAX_LINE_BYTES + 65_014


def test_sse_event_past_the_bound_raises_even_in_short_lines() -> None:
    d = SSEDecoder()
    line = b"data: " + b"z" * 1000 + b"\n"  # never a blank line: one event that grows forever
    with pytest.raises(StreamLimitError, match="event with more than"):
        for _ in range(MAX_EVENT_BYTES // 1000 + 10):
            d.feed(line * 64)


def test_sse_long_line_in_small_reads_is_scanned_once() -> None:
    # 900 kB of one line in 64-byte reads: rescanning the buffer on every read is ~6 GB of regex
    # work (tens of seconds); scanning each byte once is milliseconds. The bound is a smoke bound.
    d = SSEDecoder()
    t0 = time.perf_counter()
    d.feed(b"data: ")
    piece = b"a" * 64
    for _ in range(900_000 // 64):
        assert d.feed(piece) == []
    out = d.feed(b"\n\n")
    assert time.perf_counter() - t0 < 5.0
    assert len(out) == 1 and isinstance(out[0], SSEEvent) and len(out[0].data) == 900_000 // 64 * 64


def test_sse_is_unchanged_within_the_bounds() -> None:
    d = SSEDecoder()
    text = b"event: x\r\ndata: a\r\ndata: b\r\n\r\n: ping\n\ndata: c\r"
    got = []
    for i in range(len(text)):  # one byte at a time: the resumed scan must not skip a line end
        got += d.feed(text[i : i + 1])
    got += d.feed(b"\n\n")
    assert [(e.data, getattr(e, "event", None)) for e in got if isinstance(e, SSEEvent)] == [("a\nb", "x"), ("c", None)]


@pytest.mark.parametrize(
    "extra",
    [
        {"max_tokens": 12_800_000},
        {"n": 100},
        {"options": {"num_predict": -1}},
        {"parameters": {"max_new_tokens": 100_000}},
        {"stream": False},
        {"model": "other"},
    ],
)
def test_extra_body_cannot_override_what_a_request_costs(extra: dict[str, object]) -> None:
    from edgeprobe.probes.inference import InferenceConfig
    from edgeprobe.probes.llmstream import build_request_body

    with pytest.raises(msgspec.ValidationError, match="extra_body: may not set"):
        msgspec.convert({"model": "m", "max_tokens": 40, "extra_body": extra}, InferenceConfig)
    with pytest.raises(ValueError, match="extra_body may not set"):
        build_request_body("openai-chat", "m", "hi", 40, extra=extra)


def test_extra_body_still_adds_what_it_is_for() -> None:
    from edgeprobe.probes.inference import InferenceConfig
    from edgeprobe.probes.llmstream import build_request_body

    extra = {"temperature": 0, "options": {"temperature": 0}, "stream_options": {"include_usage": False}}
    cfg = msgspec.convert({"model": "m", "max_tokens": 40, "extra_body": extra}, InferenceConfig)
    _, body = build_request_body("ollama-chat", "m", "hi", cfg.max_tokens, extra=cfg.extra_body)
    assert body["options"] == {"num_predict": 40, "temperature": 0} and body["temperature"] == 0
    with pytest.raises(msgspec.ValidationError, match="bytes as JSON"):
        msgspec.convert({"model": "m", "extra_body": {"x": "y" * 70_000}}, InferenceConfig)


KEY = "sk-edgeprobe-TEST-7f3a9c1e5b2d4680"


@pytest.mark.parametrize("cut", range(1, len(KEY)))
def test_a_key_cut_by_clipping_is_redacted_whole(cut: int) -> None:
    from edgeprobe.probes.inference import REDACT_MIN_PREFIX_CHARS, _clip, redact

    message = "Incorrect API key provided: " + KEY + " (see docs)"
    clipped = _clip(message, len("Incorrect API key provided: ") + cut + 1)  # the key cut after `cut` chars
    out = redact(clipped, KEY)
    if cut >= REDACT_MIN_PREFIX_CHARS:
        assert out == "Incorrect API key provided: ***…", out
    assert KEY[:REDACT_MIN_PREFIX_CHARS] not in out
    assert redact(message, KEY) == "Incorrect API key provided: *** (see docs)"
