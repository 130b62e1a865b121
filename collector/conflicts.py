"""Field type conflicts: read them from InfluxDB's answer, remember them, spot the lines they refuse.

InfluxDB fixes a field's type by the first value it stores (per shard in 1.x, per table in 3.x);
a later line carrying that field with another type is refused. When agents keep sending such
lines, writing each one to learn that it is refused would cost a write request per line. Instead
the collector reads the conflict from InfluxDB's answer (:func:`conflicts_in`), remembers it
(:class:`ConflictMemory`) and dead-letters the lines it matches (:func:`line_conflict`) without a
round trip, while the good points go on in full batches.

The answers this reads (captured from the real servers; tests hold the samples):

* InfluxDB 1.x, HTTP 400 on ``/write``::

    {"error":"partial write: field type conflict: input field \\"x\\" on measurement \\"m\\" is
    type float, already exists as type integer dropped=1"}

  (1.8 adds `` for database: … for retention policy: …``); the measurement and field names are
  shown unescaped, as stored.
* InfluxDB 2.x, HTTP 422 on ``/api/v2/write``: ``{"code":"unprocessable entity","message":
  "failure writing points to database: partial write: field type conflict: input field \\"x\\" on
  measurement \\"m\\" is type string, already exists as type float dropped=10"}``
* InfluxDB 3.x, HTTP 400: ``{"error":"partial write of line protocol occurred","data":
  [{"original_line":"m,t=a x=1.5 2","line_number":1,"error_message":"invalid column type for
  column 'x', expected iox::column_type::field::integer, got iox::column_type::field::float"}]}``
  (the measurement is read from ``original_line``).

Everything here is pure, apart from the memory's clock (monotonic, injectable).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

MAX_NAME_CHARS: Final = 65_536  # longer names in an answer are not remembered
MAX_ANSWER_CHARS: Final = 1_000_000  # only this much of an answer is searched
MAX_DATA_ENTRIES: Final = 1000  # 3.x per-line errors read from one answer at most

# 1.x and 2.x (the same storage engine's message).
_V1_RE: Final = re.compile(
    r'input field "(?P<field>.*?)" on measurement "(?P<measurement>.*?)" '
    r"is type (?P<input>\w+), already exists as type (?P<existing>\w+)"
)
# 3.x (IOx): the column's name, not the table's.
_V3_RE: Final = re.compile(
    r"invalid column type for column '(?P<field>.*?)', expected (?P<existing>[\w:]+), got (?P<input>[\w:]+)"
)
_V3_TYPES: Final = {
    **{"integer": "integer", "float": "float", "string": "string", "boolean": "boolean"},
    **{"uinteger": "unsigned", "unsigned": "unsigned", "tag": "tag", "timestamp": "timestamp"},
}
_BOOLEANS: Final = frozenset({"t", "T", "true", "True", "TRUE", "f", "F", "false", "False", "FALSE"})


@dataclass(frozen=True, slots=True)
class FieldConflict:
    """``field`` of ``measurement`` is stored as ``existing``; a line carried it as ``incoming``."""

    measurement: str
    field: str
    existing: str  # float, integer, unsigned, string, boolean (3.x: also tag, timestamp)
    incoming: str | None = None


def _v3_type(name: str) -> str:
    return _V3_TYPES.get(name.rsplit("::", 1)[-1], name.rsplit("::", 1)[-1])


def _v1_conflicts(text: str) -> list[FieldConflict]:
    out = []
    for m in _V1_RE.finditer(text[:MAX_ANSWER_CHARS]):
        if len(m["field"]) <= MAX_NAME_CHARS and len(m["measurement"]) <= MAX_NAME_CHARS:
            out.append(FieldConflict(m["measurement"], m["field"], m["existing"], m["input"]))
    return out


def _v3_conflict(entry: Any) -> FieldConflict | None:
    if not isinstance(entry, dict):
        return None
    message, line = entry.get("error_message"), entry.get("original_line")
    if not isinstance(message, str) or not isinstance(line, str):
        return None
    m = _V3_RE.search(message[:MAX_ANSWER_CHARS])
    measurement = line_measurement(line[:MAX_ANSWER_CHARS])
    if m is None or measurement is None or len(m["field"]) > MAX_NAME_CHARS:
        return None
    return FieldConflict(measurement, m["field"], _v3_type(m["existing"]), _v3_type(m["input"]))


def conflicts_in(answer: str | bytes | None) -> tuple[FieldConflict, ...]:
    """The field type conflicts an InfluxDB error answer (its body, JSON or text) names; () if none.

    Hostile-input safe: bounded in what it reads, never raises."""
    if answer is None:
        return ()
    text = answer.decode("utf-8", "replace") if isinstance(answer, bytes) else answer
    text = text[:MAX_ANSWER_CHARS]
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        doc = None
    found: list[FieldConflict] = []
    if isinstance(doc, dict):
        for key in ("error", "message"):
            if isinstance(doc.get(key), str):
                found.extend(_v1_conflicts(doc[key]))
        data = doc.get("data")
        entries = data if isinstance(data, list) else [data]
        for entry in entries[:MAX_DATA_ENTRIES]:
            conflict = _v3_conflict(entry)
            if conflict is not None:
                found.append(conflict)
    else:
        found.extend(_v1_conflicts(text))
    return tuple(dict.fromkeys(found))  # unique, in order


# ---- reading a line of line protocol (as far as this needs) ---------------------------------------


def _read_name(line: str, i: int, stops: str, escapable: str) -> tuple[str, int]:
    """Read an escaped name from ``i`` up to an unescaped character of ``stops``; returns (name, end)."""
    out: list[str] = []
    n = len(line)
    while i < n:
        c = line[i]
        if c == "\\" and i + 1 < n and line[i + 1] in escapable:
            out.append(line[i + 1])
            i += 2
            continue
        if c in stops:
            break
        out.append(c)
        i += 1
    return "".join(out), i


def line_measurement(line: str) -> str | None:
    """The measurement of a line (unescaped, as InfluxDB names it), or None for a line without one."""
    end = len(line)
    for stop in (",", " "):
        j = line.find(stop)
        if j != -1 and j < end:
            end = j
    if "\\" not in line[:end]:
        return line[:end] or None
    name, _ = _read_name(line, 0, ", ", ", ")
    return name or None


def _value_type(value: str) -> str:
    if value.startswith('"'):
        return "string"
    if value in _BOOLEANS:
        return "boolean"
    if value.endswith("i"):
        return "integer"
    if value.endswith("u"):
        return "unsigned"
    return "float"


def line_fields(line: str) -> tuple[str, dict[str, str]] | None:
    """``(measurement, {field: type})`` of a line, types as InfluxDB names them; None when the line
    is not line protocol this can read (it is then left to InfluxDB to judge)."""
    n = len(line)
    measurement, i = _read_name(line, 0, ", ", ", ")
    if not measurement:
        return None
    if i < n and line[i] == ",":  # the tag set: up to the first unescaped space
        _, i = _read_name(line, i, " ", ", =")
    if i >= n or line[i] != " ":
        return None
    i += 1
    fields: dict[str, str] = {}
    while i < n:
        key, i = _read_name(line, i, "=", ", =")
        if i >= n or not key:
            return None
        i += 1  # '='
        if i < n and line[i] == '"':
            j = i + 1
            while j < n and line[j] != '"':
                j += 2 if line[j] == "\\" else 1
            if j >= n:
                return None
            value, i = line[i : j + 1], j + 1
        else:
            j = i
            while j < n and line[j] not in ", ":
                j += 1
            value, i = line[i:j], j
        if not value:
            return None
        fields.setdefault(key, _value_type(value))
        if i >= n or line[i] == " ":
            break
        i += 1  # ','
    return (measurement, fields) if fields else None


def line_conflict(line: str, known: Callable[[str, str], str | None]) -> FieldConflict | None:
    """The conflict a line would meet (pure): ``known(measurement, field)`` gives a field's stored
    type (or None); the first field of the line whose type differs is the conflict."""
    parsed = line_fields(line)
    if parsed is None:
        return None
    measurement, fields = parsed
    for name, kind in fields.items():
        existing = known(measurement, name)
        if existing is not None and existing != kind:
            return FieldConflict(measurement, name, existing, kind)
    return None


# ---- the memory --------------------------------------------------------------------------------


class ConflictMemory:
    """The conflicts InfluxDB reported, per (measurement, field): at most ``max_entries`` (the oldest
    learned is forgotten first; 0: nothing is remembered) and each for ``recheck_s`` seconds of
    ``clock`` (monotonic). A forgotten conflict is probed again by the next line that carries the
    field: written, it either lands (an operator fixed the schema) or teaches the conflict again.
    """

    def __init__(self, max_entries: int, recheck_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.recheck_s = recheck_s
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[str, float, int | None]] = OrderedDict()
        self._measurements: Counter[str] = Counter()
        self.learned = 0  # conflicts learned (again) from InfluxDB's answers
        self.expired = 0  # conflicts forgotten after recheck_s
        self.evicted = 0  # conflicts forgotten to stay within max_entries

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, key: tuple[str, str]) -> None:
        del self._entries[key]
        self._measurements[key[0]] -= 1
        if self._measurements[key[0]] <= 0:
            del self._measurements[key[0]]

    def learn(self, conflicts: Iterable[FieldConflict], status: int | None = None) -> int:
        """Remember conflicts (a known one is renewed) and the HTTP status InfluxDB refused them
        with; returns how many were given."""
        count = 0
        if self.max_entries <= 0:
            return 0
        now = self._clock()
        for c in conflicts:
            key = (c.measurement, c.field)
            if key in self._entries:
                self._drop(key)
            while len(self._entries) >= self.max_entries:
                self._drop(next(iter(self._entries)))
                self.evicted += 1
            self._entries[key] = (c.existing, now, status)
            self._measurements[c.measurement] += 1
            count += 1
        self.learned += count
        return count

    def expire(self) -> None:
        """Forget the conflicts older than ``recheck_s`` (entries are in the order learned)."""
        limit = self._clock() - self.recheck_s
        while self._entries:
            key, (_, at, _) = next(iter(self._entries.items()))
            if at > limit:
                break
            self._drop(key)
            self.expired += 1

    def known(self, measurement: str, field: str) -> str | None:
        entry = self._entries.get((measurement, field))
        return entry[0] if entry is not None else None

    def status(self, measurement: str, field: str) -> int | None:
        """The HTTP status InfluxDB refused a remembered conflict with."""
        entry = self._entries.get((measurement, field))
        return entry[2] if entry is not None else None

    def match(self, line: str) -> FieldConflict | None:
        """The remembered conflict ``line`` would meet, or None (cheap for other measurements)."""
        if not self._entries:
            return None
        measurement = line_measurement(line)
        if measurement is None or measurement not in self._measurements:
            return None
        return line_conflict(line, self.known)

    def snapshot(self) -> list[FieldConflict]:
        return [FieldConflict(m, f, existing) for (m, f), (existing, _, _) in self._entries.items()]
