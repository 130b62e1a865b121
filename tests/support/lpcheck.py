"""A strict reference parser for InfluxDB line protocol: the oracle of the encoder's fuzz tests.

Stricter than InfluxDB 1.x where parsers disagree, so that a line it accepts is read the same
way by 1.x, 2.x and 3.x:

* no raw LF or CR outside string field values; no line starting with ``#`` (a comment);
* measurement, tag keys, tag values and field keys: a backslash escapes ``,`` ``=`` and space
  (measurement: ``,`` and space); a backslash before anything else is a literal backslash, except
  before another backslash or at the end of the line (read differently by different parsers);
  tag values must not contain an unescaped ``=``;
* tags sorted by key, no empty key or value, no duplicate keys, no key ``time``, ``_field`` or
  ``_measurement``; the series key (measurement and tags as written) at most 65535 bytes;
* at least one field, no duplicate field keys; values: ``"…"`` with only ``\\\\`` and ``\\"``
  escapes, ``-12i`` within int64, finite floats that are not integer tokens (so InfluxDB can't
  infer an integer type), and the boolean spellings;
* a timestamp, an int64 in nanoseconds.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

MAX_SERIES_KEY_BYTES = 65535
RESERVED_KEYS = frozenset({"time", "_field", "_measurement"})
BOOLEANS = {"t": True, "T": True, "true": True, "True": True, "TRUE": True}
BOOLEANS |= {"f": False, "F": False, "false": False, "False": False, "FALSE": False}
INT_RE = re.compile(r"^[+-]?\d+i$")
FLOAT_RE = re.compile(r"^[+-]?(?:\d+\.\d*|\.\d+|\d+(?=[eE]))(?:[eE][+-]?\d+)?$")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class LineProtocolError(ValueError):
    pass


@dataclass
class Point:
    measurement: str
    tags: dict[str, str] = field(default_factory=dict)
    fields: dict[str, object] = field(default_factory=dict)
    timestamp_ns: int = 0


class _Reader:
    def __init__(self, line: str) -> None:
        self.s = line
        self.i = 0

    def at_end(self) -> bool:
        return self.i >= len(self.s)

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def token(self, what: str, stops: str, escapable: str, forbidden: str = "") -> str:
        out: list[str] = []
        s = self.s
        while self.i < len(s):
            c = s[self.i]
            if c in "\n\r":
                raise LineProtocolError(f"raw line break in {what} at {self.i}")
            if c == "\\":
                nxt = s[self.i + 1] if self.i + 1 < len(s) else ""
                if nxt == "":
                    raise LineProtocolError(f"{what} ends the line with a backslash")
                if nxt in escapable:
                    out.append(nxt)
                    self.i += 2
                    continue
                if nxt == "\\":
                    raise LineProtocolError(f"double backslash in {what} at {self.i} (ambiguous)")
                out.append(c)
                self.i += 1
                continue
            if c in stops:
                break
            if c in forbidden:
                raise LineProtocolError(f"unescaped {c!r} in {what} at {self.i}")
            out.append(c)
            self.i += 1
        text = "".join(out)
        if not text:
            raise LineProtocolError(f"empty {what} at {self.i}")
        return text

    def expect(self, char: str, what: str) -> None:
        if self.peek() != char:
            raise LineProtocolError(f"expected {char!r} {what} at {self.i}, got {self.peek()!r}")
        self.i += 1

    def string_value(self) -> str:
        self.expect('"', "to open a string")
        out: list[str] = []
        s = self.s
        while self.i < len(s):
            c = s[self.i]
            if c == "\\":
                nxt = s[self.i + 1] if self.i + 1 < len(s) else ""
                if nxt not in ('"', "\\"):
                    raise LineProtocolError(f"unescaped backslash in a string value at {self.i}")
                out.append(nxt)
                self.i += 2
                continue
            if c == '"':
                self.i += 1
                return "".join(out)
            out.append(c)
            self.i += 1
        raise LineProtocolError("unterminated string value")


def _scalar(token: str) -> object:
    if token in BOOLEANS:
        return BOOLEANS[token]
    if INT_RE.match(token):
        value = int(token[:-1])
        if not INT64_MIN <= value <= INT64_MAX:
            raise LineProtocolError(f"integer {token} outside int64")
        return value
    if FLOAT_RE.match(token):
        value = float(token)
        if not math.isfinite(value):
            raise LineProtocolError(f"float {token} is not finite")
        return value
    raise LineProtocolError(f"not a field value: {token[:50]!r}")


def _check_key(key: str, what: str) -> None:
    if key in RESERVED_KEYS:
        raise LineProtocolError(f"{what} {key!r} is reserved")


def parse_line(line: str) -> Point:
    """Parse one line (no trailing newline) or raise LineProtocolError saying why not."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as err:
        raise LineProtocolError(f"not encodable as UTF-8: {err}") from None
    if not line or line[0] == "#":
        raise LineProtocolError("empty line or comment")
    r = _Reader(line)
    point = Point(r.token("measurement", ", ", ", "))
    keys: list[str] = []
    while r.peek() == ",":
        r.i += 1
        key = r.token("tag key", "=", ",= ")
        _check_key(key, "tag key")
        r.expect("=", "after a tag key")
        value = r.token("tag value", ", ", ",= ", forbidden="=")
        if key in point.tags:
            raise LineProtocolError(f"duplicate tag key {key!r}")
        point.tags[key] = value
        keys.append(key)
    if keys != sorted(keys):
        raise LineProtocolError("tags are not sorted by key")
    if len(line[: r.i].encode("utf-8")) > MAX_SERIES_KEY_BYTES:
        raise LineProtocolError("series key longer than 65535 bytes")
    r.expect(" ", "before the fields")
    while True:
        key = r.token("field key", "=", ",= ")
        _check_key(key, "field key")
        r.expect("=", "after a field key")
        if r.peek() == '"':
            value: object = r.string_value()
        else:
            start = r.i
            while not r.at_end() and r.peek() not in ", ":
                if r.peek() in "\n\r":
                    raise LineProtocolError("raw line break in a field value")
                r.i += 1
            value = _scalar(line[start : r.i])
        if key in point.fields:
            raise LineProtocolError(f"duplicate field key {key!r}")
        point.fields[key] = value
        if r.peek() == ",":
            r.i += 1
            continue
        break
    r.expect(" ", "before the timestamp")
    ts = line[r.i :]
    if not re.fullmatch(r"-?\d+", ts):
        raise LineProtocolError(f"bad timestamp {ts[:30]!r}")
    point.timestamp_ns = int(ts)
    if not INT64_MIN < point.timestamp_ns <= INT64_MAX:
        raise LineProtocolError("timestamp outside int64")
    return point
