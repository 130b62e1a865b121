"""Layer 1, framing: incremental SSE and NDJSON decoders.

:class:`SSEDecoder` (OpenAI, TGI, Anthropic) and :class:`NDJSONDecoder` (Ollama) take bytes split at
any boundary and return complete framed items (:data:`Framed`).
"""

from __future__ import annotations

import re
from typing import Any, Final, TypeAlias

import msgspec

from edgeprobe.probes.llmstream.apis import _EXCERPT_CHARS, _truncate


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


# Bounds on what a (possibly hostile) server can make the decoders hold. A real event is a few
# hundred bytes; these are generous for long generations and still keep a probe's memory small.
MAX_LINE_BYTES: Final = 1 << 20  # one SSE or NDJSON line without its end
MAX_EVENT_BYTES: Final = 4 << 20  # the data lines of one SSE event before its blank line


class StreamLimitError(ValueError):
    """A bound on the stream's framing was hit (the message says which); the stream is abandoned."""


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

    Bounded and linear: each byte is scanned for a line end once (a read continues the scan
    where the last one stopped), a line may hold :data:`MAX_LINE_BYTES` and an event's data
    :data:`MAX_EVENT_BYTES`; past either, :meth:`feed` raises :class:`StreamLimitError`.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scanned = 0  # bytes at the start of _buf known to hold no line end
        self._event_bytes = 0  # data bytes of the event being read
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
        # No line end before _scanned; a CR was never left at the end unhandled (see _skip_lf).
        while (m := _EOL.search(buf, max(pos, self._scanned))) is not None:
            line = bytes(buf[pos : m.start()])
            if m.end() == size and m.end() - m.start() == 1 and buf[m.start()] == 0x0D:
                self._skip_lf = True  # a CR at the end of this read: its LF may come next
            pos = m.end()
            self._line(line, out)
        del buf[:pos]
        self._scanned = len(buf)
        if len(buf) > MAX_LINE_BYTES:
            raise StreamLimitError(f"an event-stream line longer than {MAX_LINE_BYTES} bytes")
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
            self._event_bytes += len(value) + 1
            if self._event_bytes > MAX_EVENT_BYTES:
                raise StreamLimitError(f"an event-stream event with more than {MAX_EVENT_BYTES} bytes of data")
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
        self._event_bytes = 0
        self._event = None
        self._in_event = False

    def finish(self) -> SSETail:
        """End of stream: dispatch a pending complete event, report whether the stream stopped mid-event."""
        partial = len(self._buf)
        mid_event = partial > 0 or self._in_event
        pending: list[SSEEvent | SSEComment] = []
        self._dispatch(pending)
        self._buf.clear()
        self._scanned = 0
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

    A line that is not JSON comes back as an :class:`NDJSONLine` with ``error`` set. The only
    exception is :class:`StreamLimitError`, for a line longer than :data:`MAX_LINE_BYTES`.
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
        if len(buf) > MAX_LINE_BYTES:
            raise StreamLimitError(f"an NDJSON line longer than {MAX_LINE_BYTES} bytes")
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
