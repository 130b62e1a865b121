"""The advisor's reader: InfluxQL over the v1 query API (``POST <url>/query``), nothing else.

The same connection settings as the collector (:class:`edgeprobe.collector.config.InfluxConfig`,
its ``EDGEPROBE_INFLUX_*`` variables, its authentication headers): InfluxDB 1.x with ``database``
(HTTP Basic or a token), and InfluxDB 2.x/3.x through their v1-compatible ``/query`` with a token,
the bucket standing for the database (``api: v2``; 2.x needs a DBRP mapping for it, 3.x has one).

Building the queries and reading the answers are pure (:func:`inference_query`,
:func:`parse_inference`, …); :func:`query` is the one HTTP call. Every failure becomes an
:class:`AdviseError` whose message is one line a person can act on; credentials never appear in it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from typing import Any, Final

import aiohttp

from edgeprobe.advise.model import (
    ICMP_FIELD,
    ICMP_MEASUREMENT,
    INFERENCE_FIELDS,
    INFERENCE_MEASUREMENT,
    INFERENCE_TAGS,
    PATH_TAGS,
    TCP_FIELD,
    TCP_MEASUREMENT,
    InferenceSample,
    PathSample,
)
from edgeprobe.collector.config import InfluxConfig
from edgeprobe.collector.influx import auth_headers, error_text
from edgeprobe.collector.lineproto import decode_tag_value, encode_tag_value

MAX_ANSWER_BYTES: Final = 512 * 1024 * 1024
SINCE_RE: Final = re.compile(r"^[1-9][0-9]{0,6}(s|m|h|d|w)$")
WHERE_RE: Final = re.compile(r"^(?P<key>[A-Za-z_][A-Za-z0-9_]{0,63})(?P<op>!=|=)(?P<value>.*)$", re.DOTALL)
PATH_WHERE_KEYS: Final = frozenset({"site", "agent"})  # the conditions that also restrict icmp/tcp


class AdviseError(Exception):
    """A problem the user can act on, phrased as one line."""


class UsageError(AdviseError):
    """A bad option value (``--since``, ``--where``): the command line, not the data."""


def check_since(since: str) -> str:
    if not SINCE_RE.match(since):
        raise UsageError(f"--since: expected a duration such as 30m, 24h or 7d, got {since!r}")
    return since


def parse_where(items: Sequence[str]) -> list[tuple[str, str, str]]:
    """``key=value`` / ``key!=value`` filters on tags, as (key, op, value); AdviseError otherwise."""
    out = []
    for item in items:
        m = WHERE_RE.match(item)
        if m is None:
            raise UsageError(
                f"--where: expected TAG=VALUE or TAG!=VALUE (a tag name of letters, digits, _), got {item!r}"
            )
        out.append((m.group("key"), m.group("op"), m.group("value")))
    return out


def quote_ident(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _where(since: str, where: Sequence[tuple[str, str, str]]) -> str:
    parts = [f"time > now() - {check_since(since)}"]
    # tag values are stored as the collector encodes them (decode_tag_value's inverse)
    parts += [f"{quote_ident(k)} {op} {quote_string(encode_tag_value(v))}" for k, op, v in where]
    return " AND ".join(parts)


def inference_query(since: str, where: Sequence[tuple[str, str, str]], limit: int) -> str:
    # "seq" is on every point: a failure without any timing still counts as an attempt.
    fields = ", ".join(quote_ident(f) for f in ("seq", *INFERENCE_FIELDS))
    group = ", ".join(quote_ident(t) for t in INFERENCE_TAGS)
    return (
        f"SELECT {fields} FROM {quote_ident(INFERENCE_MEASUREMENT)} WHERE {_where(since, where)} "
        f"GROUP BY {group} ORDER BY time DESC LIMIT {int(limit)}"
    )


def path_query(kind: str, since: str, where: Sequence[tuple[str, str, str]], limit: int) -> str:
    measurement, field = (ICMP_MEASUREMENT, ICMP_FIELD) if kind == "icmp" else (TCP_MEASUREMENT, TCP_FIELD)
    own = [w for w in where if w[0] in PATH_WHERE_KEYS]
    group = ", ".join(quote_ident(t) for t in PATH_TAGS)
    return (
        f'SELECT "seq", {quote_ident(field)} FROM {quote_ident(measurement)} WHERE {_where(since, own)} '
        f"GROUP BY {group} ORDER BY time DESC LIMIT {int(limit)}"
    )


def _series(answer: Any, what: str) -> Iterator[tuple[dict[str, str], list[str], list[list[Any]]]]:
    """(tags, columns, rows) of each series of the first statement; AdviseError for its error."""
    if not isinstance(answer, dict) or not isinstance(answer.get("results"), list):
        raise AdviseError(f"{what}: InfluxDB's answer is not a query result")
    if "error" in answer and isinstance(answer["error"], str):
        raise AdviseError(f"{what}: {error_text(answer['error'], 'error')}")
    for result in answer["results"][:1]:
        if not isinstance(result, dict):
            continue
        if isinstance(result.get("error"), str):
            raise AdviseError(f"{what}: {error_text(result['error'], 'error')}")
        for s in result.get("series") or []:
            tags = {str(k): decode_tag_value(str(v)) for k, v in (s.get("tags") or {}).items()}
            yield tags, [str(c) for c in s.get("columns", [])], s.get("values") or []


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def parse_inference(answer: Any) -> list[InferenceSample]:
    out = []
    for tags, columns, rows in _series(answer, INFERENCE_MEASUREMENT):
        for row in rows:
            rec = dict(zip(columns, row, strict=False))
            out.append(
                InferenceSample(
                    site=tags.get("site", ""),
                    target=tags.get("target", ""),
                    outcome=tags.get("outcome", ""),
                    tier=tags.get("tier", ""),
                    **{f: _num(rec.get(f)) for f in INFERENCE_FIELDS},
                )
            )
    return out


def parse_paths(kind: str, answer: Any) -> list[PathSample]:
    field = ICMP_FIELD if kind == "icmp" else TCP_FIELD
    out = []
    for tags, columns, rows in _series(answer, kind):
        for row in rows:
            rec = dict(zip(columns, row, strict=False))
            out.append(
                PathSample(
                    kind=kind,
                    site=tags.get("site", ""),
                    target=tags.get("target", ""),
                    outcome=tags.get("outcome", ""),
                    rtt_ms=_num(rec.get(field)),
                )
            )
    return out


def database_of(config: InfluxConfig) -> str:
    """The database the queries name: v1's database, or v2's bucket (through a DBRP mapping)."""
    return config.database if config.api == "v1" else (config.bucket or "")


async def query(config: InfluxConfig, text: str, session: aiohttp.ClientSession | None = None) -> Any:
    """Run one InfluxQL statement against ``config``'s database; the decoded JSON answer.

    AdviseError when InfluxDB can't be reached, refuses (HTTP status, with its message), answers
    with something that is not JSON, or names a database that does not exist.
    """
    base = config.url.rstrip("/")
    headers = auth_headers(config)
    headers["Content-Type"] = "application/x-www-form-urlencoded"
    params = {"db": database_of(config), "epoch": "ns"}
    own = session is None
    s = session or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=config.timeout_s))
    try:
        async with s.post(f"{base}/query", params=params, data={"q": text}, headers=headers) as resp:
            chunks, size = [], 0
            async for chunk in resp.content.iter_any():
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    break
            body = b"".join(chunks)
            status, reason = resp.status, resp.reason or ""
    except TimeoutError:
        raise AdviseError(f"InfluxDB at {base}: no answer within {config.timeout_s:g} s") from None
    except (aiohttp.ClientError, OSError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise AdviseError(f"cannot reach InfluxDB at {base}: {detail or type(exc).__name__}") from None
    finally:
        if own:
            await s.close()
    if len(body) > MAX_ANSWER_BYTES:
        raise AdviseError(f"InfluxDB at {base}: the answer is over {MAX_ANSWER_BYTES} bytes; narrow --since or --where")
    if status == 401 or status == 403:
        raise AdviseError(f"InfluxDB at {base}: HTTP {status}: {error_text(body, reason)} (check the credentials)")
    if status != 200:
        raise AdviseError(f"InfluxDB at {base}: HTTP {status}: {error_text(body, reason)}")
    try:
        answer = json.loads(body)
    except ValueError:
        raise AdviseError(f"InfluxDB at {base}: the answer is not JSON (is this InfluxDB?)") from None
    db = database_of(config)
    for result in answer.get("results", []) if isinstance(answer, dict) else []:
        err = result.get("error") if isinstance(result, dict) else None
        if isinstance(err, str) and err.startswith("database not found"):
            raise AdviseError(f"InfluxDB at {base}: database {db!r} not found (--database, EDGEPROBE_INFLUX_DATABASE)")
    return answer
