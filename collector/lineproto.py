"""Observations to InfluxDB line protocol (pure).

One observation is one point::

    <measurement>,<tags> <fields> <started_at_ns>

* **measurement**: ``KINDS[kind].measurement`` (``edgeprobe_icmp``, ``edgeprobe_tcp`` …).
* **tags** (sorted by key): ``agent``, ``site``, ``target``, ``outcome``, ``job`` (when set), the
  kind's ``tag_fields`` (when not null), then the agent's labels and the job's labels (a job label
  overrides an agent label of the same key). Labels never shadow the collector's own names: a label
  whose key is a reserved tag (:data:`RESERVED_TAG_KEYS`), a ``tag_fields`` name or a field name of
  the point is left out and counted (``label_clash``); the agent rejects such labels in its config.
  Keys are never re-encoded: a key that is empty, ``time``, ``_field``, ``_measurement`` (reserved
  by InfluxDB 2.x/3.x) or holds a backslash, LF or CR is left out and counted (``bad_key``).
  InfluxDB refuses a series key (measurement + tags) longer than 65535 bytes: when labels or a
  kind's tag fields would make it longer than :data:`MAX_SERIES_KEY_BYTES`, the longest of those
  tags are left out until it fits, each counted (``key_too_long``).
* **fields**: ``id`` (string), ``seq`` (integer), ``duration_ms`` (float), ``sched_lag_ms`` (float,
  when measured), ``overloaded`` (boolean, scheduled runs), ``reason`` (string, when present),
  then every scalar of the kind's result:
  bool → ``true``/``false``, int → ``123i``, float → always written as a float (``5.0``, ``1e+16``)
  so that InfluxDB never infers an integer for a float field, str → ``"…"``. ``None`` (not
  measured) is left out. Lists (per-packet series such as ``rtts_ms``, ``connects_ms``) are left
  out: InfluxDB fields are scalars; the summary fields (``rtt_p95_ms`` …) describe the series.
  NaN and ±Inf can't be stored by InfluxDB and are left out and counted (``nonfinite_field``);
  integers outside int64 likewise (``int_out_of_range``).
* **more points** (``kind.sub_points``, :func:`encode_sub_points`): the trace kind writes one
  ``edgeprobe_trace_hop`` point per hop besides its ``edgeprobe_trace`` point, with the same
  timestamp and tags plus the hop's ``ttl``.
* **timestamp**: ``started_at_ns`` in nanoseconds: a redelivered observation (MQTT QoS 1 is
  at-least-once) lands on the same series and time and overwrites itself.

Escaping (line-protocol spec, checked against InfluxDB 1.6): measurement ``,`` and space; tag
keys, tag values and field keys ``,`` ``=`` and space get a backslash; string field values escape
``\\`` and ``"``; newlines, CR, tabs and any other character go in as they are (1.6 stores
and returns them unchanged).

**Tag values that line protocol can't carry** are stored in a reversible form. InfluxDB reads a
backslash in a tag literally unless it precedes ``,`` ``=`` or space, so a value ending in a
backslash is refused, a newline or CR can't be written at all, an empty value is refused, and
``\\\\`` is read as two backslashes by 1.x but may be read as one escaped backslash by other
line-protocol parsers. Such values are written as::

    ~ep~<value with % → %25, LF → %0A, CR → %0D, \\ → %5C>

This applies to a value that is empty, contains LF or CR, contains a backslash that is last or is
followed by ``\\`` ``,`` ``=`` or space, or itself starts with ``~ep~``. Every other value (spaces,
commas, quotes, tabs, non-ASCII, emoji, ``C:\\temp``) is stored exactly as it is. Readers get the
original back with :func:`decode_tag_value` (any stored value may be passed; values without the
prefix come back unchanged). In InfluxQL, the empty string is ``"target" = '~ep~'``.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from edgeprobe.probes.kind import AnyKind
from edgeprobe.schema import BASE_FIELD_KEYS, RESERVED_TAG_KEYS, Observation

TAG_MARKER: Final = "~ep~"


INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1

# Series keys (measurement and tags, as sent) longer than this are not sent (InfluxDB: 65535).
MAX_SERIES_KEY_BYTES: Final = 60_000
# Keys InfluxDB refuses or reserves (1.x refuses "time"; 2.x/3.x reserve these two).
RESERVED_KEYS: Final = frozenset({"time", "_field", "_measurement"})
HEALTH_MEASUREMENT: Final = "edgeprobe_health"

# Why a part of a point was left out (keys of Encoded.omitted / CollectorStats.omitted).
OMIT_LABEL_CLASH: Final = "label_clash"
OMIT_BAD_KEY: Final = "bad_key"
OMIT_NONFINITE: Final = "nonfinite_field"
OMIT_INT_RANGE: Final = "int_out_of_range"
OMIT_FIELD_CLASH: Final = "field_clash"
OMIT_UNKNOWN_KIND: Final = "unknown_kind"
OMIT_KEY_TOO_LONG: Final = "key_too_long"

_NEEDS_MARKER_RE = re.compile(r"[\n\r]|\\(?:[\\,= ]|$)")
_PCT_ENCODE = {"%": "%25", "\n": "%0A", "\r": "%0D", "\\": "%5C"}
_PCT_ENCODE_RE = re.compile(r"[%\n\r\\]")
_PCT_DECODE = {v: k for k, v in _PCT_ENCODE.items()}
_PCT_DECODE_RE = re.compile(r"%(?:25|0A|0D|5C)")


def encode_tag_value(value: str) -> str:
    """The value as InfluxDB will store it: unchanged, or ``~ep~`` + percent-encoding when needed."""
    if value and not value.startswith(TAG_MARKER) and not _NEEDS_MARKER_RE.search(value):
        return value
    return TAG_MARKER + _PCT_ENCODE_RE.sub(lambda m: _PCT_ENCODE[m.group()], value)


def decode_tag_value(stored: str) -> str:
    """Inverse of :func:`encode_tag_value`: the original value of a tag read back from InfluxDB."""
    if not stored.startswith(TAG_MARKER):
        return stored
    return _PCT_DECODE_RE.sub(lambda m: _PCT_DECODE[m.group()], stored[len(TAG_MARKER) :])


@functools.lru_cache(maxsize=4096)  # keys repeat (result field names, labels): the hot path
def tag_key_ok(key: str) -> bool:
    """Whether ``key`` can be a tag or field key as it is (keys are never re-encoded)."""
    return bool(key) and key not in RESERVED_KEYS and not any(c in key for c in "\\\n\r")


def _escape_key(text: str) -> str:
    """Tag key, tag value or field key: backslash before ``,`` ``=`` and space."""
    return text.replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


_key_text = functools.lru_cache(maxsize=4096)(_escape_key)  # tag and field keys repeat


def escape_measurement(name: str) -> str:
    return name.replace(",", "\\,").replace(" ", "\\ ")


@functools.lru_cache(maxsize=4096)  # agent, site, target, outcome … repeat from point to point
def escape_tag_value(value: str) -> str:
    """Line-protocol text of a tag value (after the reversible encoding)."""
    return _escape_key(encode_tag_value(value))


def escape_field_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_float(value: float) -> str:
    """A finite float as line protocol that InfluxDB always types as float."""
    return repr(float(value))  # '5.0', '1e+16', '-0.0': never an integer token, never an 'i' suffix


def format_field_value(value: Any) -> str | None:
    """Line-protocol text of a scalar field value, or None when it is not stored.

    Raises ValueError for a value InfluxDB can't store (NaN/±Inf, integers beyond int64).
    """
    kind = type(value)
    if kind is float:  # the common case first
        if not math.isfinite(value):
            raise ValueError(f"{value!r} can't be stored in InfluxDB")
        return repr(value)
    if value is None or isinstance(value, list | tuple | dict):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise OverflowError(f"integer {value} is outside int64")
        return f"{value}i"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} can't be stored in InfluxDB")
        return format_float(value)
    if isinstance(value, str):
        return escape_field_string(value)
    return None


def _tag_text(value: Any) -> str | None:
    """A result value used as a tag (``tag_fields``), as text; None when not set."""
    if value is None or isinstance(value, list | tuple | dict):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format_float(value) if math.isfinite(value) else None
    return str(value)


@dataclass(frozen=True, slots=True)
class Encoded:
    line: str
    omitted: tuple[str, ...] = ()  # one OMIT_* class per part left out


def _field_text(key: str, value: Any, omitted: list[str]) -> str | None:
    """The line-protocol text of one field, or None (not measured, or left out: the reason is
    appended to ``omitted``)."""
    if not tag_key_ok(key):
        omitted.append(OMIT_BAD_KEY)
        return None
    try:
        return format_field_value(value)
    except OverflowError:
        omitted.append(OMIT_INT_RANGE)
    except ValueError:
        omitted.append(OMIT_NONFINITE)
    return None


def encode_observation(
    obs: Observation,
    *,
    agent: str,
    site: str,
    measurement: str,
    tag_fields: Collection[str] = (),
    agent_labels: Mapping[str, str] | None = None,
) -> Encoded:
    """One observation as one line of line protocol (no trailing newline)."""
    omitted: list[str] = []
    result = obs.fields

    fields: dict[str, str] = {"id": escape_field_string(obs.id), "seq": f"{obs.seq}i"}
    base: list[tuple[str, Any]] = [("duration_ms", float(obs.duration_ms))]
    if obs.sched_lag_ms is not None:
        base.append(("sched_lag_ms", float(obs.sched_lag_ms)))
    if obs.overloaded is not None:
        base.append(("overloaded", obs.overloaded))
    for key in ("distance_km", "floor_rtt_ms", "inflation_ratio", "floor_ttft_ms"):
        value = getattr(obs, key)
        if value is not None:
            base.append((key, float(value)))
    if obs.reason is not None:
        base.append(("reason", obs.reason))
    for key, value in base:
        try:
            text = format_field_value(value)
        except (ValueError, OverflowError):
            omitted.append(OMIT_NONFINITE)
            continue
        if text is not None:
            fields[key] = text

    tags: dict[str, str] = {"agent": agent, "site": site, "target": obs.target, "outcome": obs.outcome}
    if obs.job is not None:
        tags["job"] = obs.job
    for name in tag_fields:
        if name in RESERVED_TAG_KEYS or not tag_key_ok(name):
            omitted.append(OMIT_FIELD_CLASH)
            continue
        text_value = _tag_text(result.get(name))
        if text_value is not None:
            tags[name] = text_value

    tag_field_set = set(tag_fields)
    for key, value in result.items():
        if key in tag_field_set:
            continue
        if key in fields or key in BASE_FIELD_KEYS or key in RESERVED_TAG_KEYS or key in tags:
            omitted.append(OMIT_FIELD_CLASH)
            continue
        text = _field_text(key, value, omitted)
        if text is not None:
            fields[key] = text

    labels = dict(agent_labels or {})
    labels.update(obs.labels)
    for key, value in labels.items():
        if key in RESERVED_TAG_KEYS or key in tags or key in fields or key in tag_field_set:
            omitted.append(OMIT_LABEL_CLASH)
        elif not tag_key_ok(key):
            omitted.append(OMIT_BAD_KEY)
        else:
            tags[key] = value

    core = {"agent", "site", "target", "outcome", "job"}
    line = _line(measurement, tags, fields, obs.started_at_ns, droppable=set(tags) - core, omitted=omitted)
    return Encoded(line, tuple(omitted))


def _series_key(measurement: str, tags: Mapping[str, str]) -> str:
    tag_text = ",".join(f"{_key_text(k)}={escape_tag_value(tags[k])}" for k in sorted(tags))
    return f"{escape_measurement(measurement)},{tag_text}" if tag_text else escape_measurement(measurement)


def _line(
    measurement: str,
    tags: dict[str, str],
    fields: Mapping[str, str],
    timestamp_ns: int,
    *,
    droppable: set[str],
    omitted: list[str],
) -> str:
    """Assemble a line; tags in ``droppable`` go, longest first, while the series key is too long."""
    key = _series_key(measurement, tags)
    while len(key.encode("utf-8")) > MAX_SERIES_KEY_BYTES and droppable:
        longest = max(droppable, key=lambda k: (len(escape_tag_value(tags[k])) + len(k), k))
        droppable.discard(longest)
        del tags[longest]
        omitted.append(OMIT_KEY_TOO_LONG)
        key = _series_key(measurement, tags)
    field_text = ",".join(f"{_key_text(k)}={v}" for k, v in fields.items())
    return f"{key} {field_text} {timestamp_ns}"


def encode_point(
    measurement: str,
    *,
    tags: Mapping[str, str],
    fields: Mapping[str, Any],
    timestamp_ns: int,
    labels: Mapping[str, str] | None = None,
) -> Encoded | None:
    """A generic point (the ``edgeprobe_health`` points): ``tags`` are the writer's own, ``labels``
    are added unless they clash with a tag or field; None when no field is left to write."""
    omitted: list[str] = []
    field_texts: dict[str, str] = {}
    for key, value in fields.items():
        text = _field_text(key, value, omitted)
        if text is not None:
            field_texts[key] = text
    if not field_texts:
        return None
    all_tags: dict[str, str] = {}
    for key, value in tags.items():
        if tag_key_ok(key):
            all_tags[key] = value
        else:
            omitted.append(OMIT_BAD_KEY)
    own = set(all_tags)
    for key, value in (labels or {}).items():
        if key in RESERVED_TAG_KEYS or key in all_tags or key in field_texts:
            omitted.append(OMIT_LABEL_CLASH)
        elif not tag_key_ok(key):
            omitted.append(OMIT_BAD_KEY)
        else:
            all_tags[key] = value
    line = _line(measurement, all_tags, field_texts, timestamp_ns, droppable=set(all_tags) - own, omitted=omitted)
    return Encoded(line, tuple(omitted))


def encode_sub_points(
    obs: Observation, kind: AnyKind, *, agent: str, site: str, agent_labels: Mapping[str, str] | None = None
) -> list[Encoded]:
    """The points an observation makes besides its own (``kind.sub_points``: the trace's
    ``edgeprobe_trace_hop``), at its timestamp, with its core tags, the kind's tag fields, the
    sub-point's own tags and the labels."""
    if kind.sub_points is None:
        return []
    tags: dict[str, str] = {"agent": agent, "site": site, "target": obs.target, "outcome": obs.outcome}
    if obs.job is not None:
        tags["job"] = obs.job
    for name in kind.tag_fields:
        text = _tag_text(obs.fields.get(name))
        if text is not None and name not in RESERVED_TAG_KEYS:
            tags[name] = text
    labels = dict(agent_labels or {})
    labels.update(obs.labels)
    out = []
    for sub in kind.sub_points(obs.fields):
        enc = encode_point(
            f"{kind.measurement}_{sub.suffix}",
            tags={**tags, **sub.tags},
            fields=sub.fields,
            timestamp_ns=obs.started_at_ns,
            labels=labels,
        )
        if enc is not None:
            out.append(enc)
    return out


# ---- the fast path: one plan per kind, made once ------------------------------------------------
#
# encode_batch first tries _encode_common, which writes the same bytes as encode_observation for the
# common observation (nothing left out) with a plan made once per kind (measurement text, tag fields,
# the "key=" text of each result field); anything it does not handle exactly like the general
# path (a value or key that would be left out and counted, a label that clashes, a series key near
# the limit) makes it return None, and encode_observation writes that observation.
# tests/unit/collector/test_lineproto_fast.py checks both give identical lines.

_PHYSICS_KEYS: Final = ("distance_km", "floor_rtt_ms", "inflation_ratio", "floor_ttft_ms")
_FIELD_CLASH_KEYS: Final = frozenset(BASE_FIELD_KEYS) | RESERVED_TAG_KEYS
_SKIP: Final = ""  # a result key that is a tag field: not a field
_GENERAL: Final = "\0"  # a result key the general path must handle (left out and counted)


@dataclass(slots=True)
class _Plan:
    measurement: str  # as line protocol
    tag_fields: tuple[str, ...]
    tag_field_set: frozenset[str]
    common: bool  # False: every observation of this kind takes the general path
    prefixes: dict[str, str] = field(default_factory=dict)  # result key -> "key=", _SKIP or _GENERAL

    def prefix(self, key: str) -> str:
        text = self.prefixes.get(key)
        if text is None:
            if key in self.tag_field_set:
                text = _SKIP
            elif key in _FIELD_CLASH_KEYS or not tag_key_ok(key):
                text = _GENERAL
            else:
                text = _key_text(key) + "="
            if len(self.prefixes) < 4096:  # result keys come from the kind's struct: a few dozen
                self.prefixes[key] = text
        return text


@functools.lru_cache(maxsize=256)
def _plan(measurement: str, tag_fields: tuple[str, ...]) -> _Plan:
    common = all(name not in RESERVED_TAG_KEYS and tag_key_ok(name) for name in tag_fields)
    return _Plan(escape_measurement(measurement), tag_fields, frozenset(tag_fields), common)


def _float_text(value: Any) -> str | None:
    number = float(value)
    return repr(number) if number - number == 0.0 else None  # NaN and ±Inf: the general path


def _encode_common(
    obs: Observation, plan: _Plan, agent: str, site: str, agent_labels: Mapping[str, str] | None
) -> str | None:
    """The line of an observation that leaves nothing out, as encode_observation writes it; else None."""
    result: dict[str, Any] = obs.fields
    parts = ["id=" + escape_field_string(obs.id), f"seq={obs.seq}i"]
    text = _float_text(obs.duration_ms)
    if text is None:
        return None
    parts.append("duration_ms=" + text)
    if obs.sched_lag_ms is not None:
        text = _float_text(obs.sched_lag_ms)
        if text is None:
            return None
        parts.append("sched_lag_ms=" + text)
    if obs.overloaded is not None:
        parts.append("overloaded=true" if obs.overloaded else "overloaded=false")
    for key in _PHYSICS_KEYS:
        value = getattr(obs, key)
        if value is not None:
            text = _float_text(value)
            if text is None:
                return None
            parts.append(f"{key}={text}")
    if obs.reason is not None:
        if type(obs.reason) is not str:
            return None
        parts.append("reason=" + escape_field_string(obs.reason))
    known = plan.prefixes
    for key, value in result.items():
        prefix = known.get(key)
        if prefix is None:
            prefix = plan.prefix(key)
        if prefix is _SKIP:
            continue
        if prefix is _GENERAL:
            return None
        kind = type(value)
        if kind is float:
            if value - value != 0.0:
                return None
            parts.append(prefix + repr(value))
        elif kind is int:
            if not INT64_MIN <= value <= INT64_MAX:
                return None
            parts.append(f"{prefix}{value}i")
        elif kind is str:
            parts.append(prefix + escape_field_string(value))
        elif kind is bool:
            parts.append(prefix + ("true" if value else "false"))
        elif value is None or kind is list or kind is dict or kind is tuple:
            continue
        else:
            return None

    tags: dict[str, str] = {"agent": agent, "site": site, "target": obs.target, "outcome": obs.outcome}
    if obs.job is not None:
        tags["job"] = obs.job
    for name in plan.tag_fields:
        tag = _tag_text(result.get(name))
        if tag is not None:
            tags[name] = tag
    if agent_labels or obs.labels:
        labels = dict(agent_labels or {})
        labels.update(obs.labels)
        for key, value in labels.items():
            # Conservative: any key that might clash (with a field present or not) takes the general path.
            if key in _FIELD_CLASH_KEYS or key in tags or key in plan.tag_field_set or key in result:
                return None
            if not tag_key_ok(key):
                return None
            tags[key] = value
    key_text = plan.measurement + "," + ",".join(f"{_key_text(k)}={escape_tag_value(tags[k])}" for k in sorted(tags))
    if len(key_text) * 4 > MAX_SERIES_KEY_BYTES and len(key_text.encode("utf-8")) > MAX_SERIES_KEY_BYTES:
        return None
    return f"{key_text} {','.join(parts)} {obs.started_at_ns}"


@dataclass(slots=True)
class Batch:
    lines: list[str] = field(default_factory=list)
    omitted: Counter[str] = field(default_factory=Counter)


def encode_batch(
    observations: Iterable[Observation],
    *,
    agent: str,
    site: str,
    kinds: Mapping[str, AnyKind],
    agent_labels: Mapping[str, str] | None = None,
) -> Batch:
    """The lines of one envelope's (already validated) observations.

    An observation of a kind missing from ``kinds`` is left out and counted (``unknown_kind``);
    :func:`edgeprobe.collector.decode.decode_message` rejects those before they get here.
    """
    batch = Batch()
    for obs in observations:
        kind = kinds.get(obs.kind)
        if kind is None:
            batch.omitted[OMIT_UNKNOWN_KIND] += 1
            continue
        if kind.sub_points is not None:  # the trace's hops: their own points, before the run's
            for extra in encode_sub_points(obs, kind, agent=agent, site=site, agent_labels=agent_labels):
                batch.lines.append(extra.line)
                batch.omitted.update(extra.omitted)
        plan = _plan(kind.measurement, tuple(kind.tag_fields))
        if plan.common:
            line = _encode_common(obs, plan, agent, site, agent_labels)
            if line is not None:
                batch.lines.append(line)
                continue
        enc = encode_observation(
            obs,
            agent=agent,
            site=site,
            measurement=kind.measurement,
            tag_fields=kind.tag_fields,
            agent_labels=agent_labels,
        )
        batch.lines.append(enc.line)
        batch.omitted.update(enc.omitted)
    return batch
