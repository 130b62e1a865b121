"""The write boundary to InfluxDB: line-protocol lines in, :class:`WriteError` out.

Two writers with one interface (:class:`InfluxWriter`):

* :class:`V1Writer`: ``POST <url>/write?db=&rp=&precision=ns`` with aiohttp (InfluxDB 1.x, and
  InfluxDB 3.x through its v1-compatible API). Auth: HTTP Basic with username/password, or
  ``Authorization: Token …``. Optionally ``CREATE DATABASE`` first (:meth:`V1Writer.prepare`).
* :class:`V2Writer`: ``POST <url>/api/v2/write?org=&bucket=&precision=ns`` through
  ``influxdb_client``'s async client, ``Authorization: Token …``.

Both send the same body: the lines joined by ``\\n``, gzip-compressed when ``gzip`` is on.
Every foreign exception is translated here into :class:`WriteError` (cause kept): connection
problems, timeouts, 5xx, 408 and 429 are ``retryable``; other 4xx are not, with InfluxDB's error
text (which names the offending line for parse errors). Credentials are never part of a message.
A refusal that names field type conflicts carries them (:attr:`WriteError.conflicts`, read from the
whole answer by :func:`edgeprobe.collector.conflicts.conflicts_in`), so the collector can set the
lines they refuse aside without writing each one.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Protocol, Self
from urllib.parse import urlencode

import aiohttp

from edgeprobe.collector.config import InfluxConfig
from edgeprobe.collector.conflicts import FieldConflict, conflicts_in

MAX_ERROR_CHARS = 500
RETRYABLE_STATUS = frozenset({408, 429})
# A problem with the lines themselves: worth bisecting. 422: InfluxDB 2.x's refusal of points
# (field type conflicts, points outside the retention period).
DATA_ERROR_STATUS = frozenset({400, 413, 422})


class WriteError(Exception):
    """A failed write. ``retryable``: the same lines may succeed later; ``status``: HTTP status."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        timeout: bool = False,
        conflicts: tuple[FieldConflict, ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status = status
        self.timeout = timeout  # no answer within influx.timeout_s (the server may be slow, or the batch large)
        self.conflicts = conflicts  # the field type conflicts InfluxDB named (data errors only)

    @property
    def data_error(self) -> bool:
        """InfluxDB refused (some of) the lines themselves: bisect to find them."""
        return not self.retryable and self.status in DATA_ERROR_STATUS

    def __repr__(self) -> str:
        return f"WriteError({self.message!r}, retryable={self.retryable}, status={self.status})"


def status_retryable(status: int) -> bool:
    return status >= 500 or status in RETRYABLE_STATUS


def error_text(body: bytes | str | None, fallback: str) -> str:
    """InfluxDB's error message from a response body (1.x ``error``, 2.x/3.x ``message``)."""
    if body is None:
        return fallback
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        for key in ("error", "message"):
            if isinstance(doc.get(key), str) and doc[key]:
                text = doc[key]
                break
    text = " ".join(text.split()) or fallback
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def line_body(lines: Sequence[str]) -> bytes:
    return "\n".join(lines).encode("utf-8")


# gzip level 1: about 10x smaller line protocol for a third of level 5's CPU (measured on the
# benchmark's mix: 10.5x vs 13.2x, 1.2 vs 4.1 µs a line).
GZIP_LEVEL = 1
MAX_PARTS_IN_FLIGHT = 4  # concurrent requests one write is split into at most
MIN_PART_LINES = 1000  # no part smaller than this (small writes stay one request)


def write_parts(lines: int) -> int:
    """How many concurrent requests a write of ``lines`` lines is split into."""
    return max(1, min(MAX_PARTS_IN_FLIGHT, lines // MIN_PART_LINES))


def _gzip_body(lines: Sequence[str]) -> bytes:
    return gzip.compress(line_body(lines), compresslevel=GZIP_LEVEL)


def _transport_error(exc: BaseException, what: str) -> WriteError:
    """A connection-level failure (no HTTP status). Messages name the exception, never credentials."""
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return WriteError(f"{what}: timed out", retryable=True, timeout=True)
    detail = str(exc) if isinstance(exc, OSError | aiohttp.ClientError) else ""
    detail = " ".join(detail.split())[:MAX_ERROR_CHARS]
    return WriteError(f"{what}: {type(exc).__name__}{': ' + detail if detail else ''}", retryable=True)


class InfluxWriter(Protocol):
    async def prepare(self) -> None:
        """Make the destination ready (v1: CREATE DATABASE when configured); raises WriteError."""
        ...

    async def write(self, lines: Sequence[str]) -> None:
        """Write the lines in one request; raises WriteError."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


def auth_headers(config: InfluxConfig) -> dict[str, str]:
    """The Authorization header for ``config`` (a token, or HTTP Basic), shared by every reader and
    writer of the v1 API (the collector's writes, ``edgeprobe advise``'s queries)."""
    if config.token is not None:
        return {"Authorization": f"Token {config.token.reveal()}"}
    if config.username is not None:
        password = config.password.reveal() if config.password is not None else ""
        creds = base64.b64encode(f"{config.username}:{password}".encode()).decode("ascii")
        return {"Authorization": f"Basic {creds}"}
    return {}


def _quote_ident(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


class V1Writer:
    def __init__(self, config: InfluxConfig) -> None:
        self._config = config
        self._base = config.url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    def _headers(self) -> dict[str, str]:
        return {"Content-Type": "text/plain; charset=utf-8", **auth_headers(self._config)}

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._config.timeout_s), raise_for_status=False
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _post(self, path: str, params: dict[str, str], body: bytes, headers: dict[str, str]) -> bytes:
        if self._session is None:
            raise RuntimeError("V1Writer used outside 'async with'")
        what = f"POST {self._base}{path}"
        try:
            async with self._session.post(self._base + path, params=params, data=body, headers=headers) as resp:
                text = await resp.read()
                if 200 <= resp.status < 300:
                    return text
                status, reason = resp.status, resp.reason or ""
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _transport_error(exc, what) from exc
        retryable = status_retryable(status)
        raise WriteError(
            f"{what}: HTTP {status}: {error_text(text, reason)}",
            retryable=retryable,
            status=status,
            conflicts=() if retryable else conflicts_in(text),
        )

    async def prepare(self) -> None:
        if not self._config.create_database:
            return
        headers = self._headers()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        body = urlencode({"q": f"CREATE DATABASE {_quote_ident(self._config.database)}"}).encode()
        answer = await self._post("/query", {}, body, headers)
        # InfluxQL reports statement errors inside a 200 answer: {"results":[{"error": "..."}]}
        try:
            results = json.loads(answer).get("results", [])
        except (ValueError, AttributeError):
            results = []
        for result in results if isinstance(results, list) else []:
            if isinstance(result, dict) and isinstance(result.get("error"), str):
                raise WriteError(f"CREATE DATABASE: {error_text(result['error'], '')}", retryable=False)

    async def write(self, lines: Sequence[str]) -> None:
        """Write the lines: in up to :data:`MAX_PARTS_IN_FLIGHT` requests at once when there are
        many (InfluxDB works on concurrent writes in parallel), all of which must succeed. When
        one fails, the error raised is a retryable one if any part's was (the caller writes all
        the lines again: points overwrite themselves), else the first part's refusal."""
        if not lines:
            return
        parts = write_parts(len(lines))
        if parts == 1:
            await self._write_part(lines)
            return
        size = -(-len(lines) // parts)
        results = await asyncio.gather(
            *(self._write_part(lines[i : i + size]) for i in range(0, len(lines), size)), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if not errors:
            return
        for err in errors:
            if not isinstance(err, WriteError):
                raise err
        raise next((e for e in errors if isinstance(e, WriteError) and e.retryable), errors[0])

    async def _write_part(self, lines: Sequence[str]) -> None:
        cfg = self._config
        params = {"db": cfg.database, "precision": "ns"}
        if cfg.retention_policy:
            params["rp"] = cfg.retention_policy
        headers = self._headers()
        if cfg.gzip:
            # zlib lets go of the GIL: compressed beside the event loop, not on it.
            body = await asyncio.to_thread(_gzip_body, lines)
            headers["Content-Encoding"] = "gzip"
        else:
            body = line_body(lines)
        await self._post("/write", params, body, headers)


class V2Writer:
    def __init__(self, config: InfluxConfig) -> None:
        self._config = config
        self._client: Any = None
        self._write_api: Any = None

    async def __aenter__(self) -> Self:
        try:
            from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
        except ImportError as exc:
            raise RuntimeError(
                "writing to InfluxDB 2.x/3.x (influx.api: v2) needs the collector extra: "
                "pip install 'edgeprobe[collector]'"
            ) from exc

        cfg = self._config
        token = cfg.token.reveal() if cfg.token is not None else ""
        self._client = InfluxDBClientAsync(
            url=cfg.url,
            token=token,
            org=cfg.org or "",
            timeout=int(cfg.timeout_s * 1000),
            enable_gzip=cfg.gzip,
        )
        self._write_api = self._client.write_api()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
            self._write_api = None

    async def prepare(self) -> None:
        return None

    async def write(self, lines: Sequence[str]) -> None:
        if not lines:
            return
        if self._write_api is None:
            raise RuntimeError("V2Writer used outside 'async with'")
        from influxdb_client.client.exceptions import InfluxDBError
        from influxdb_client.domain.write_precision import WritePrecision

        cfg = self._config
        what = f"POST {cfg.url.rstrip('/')}/api/v2/write"
        try:
            await self._write_api.write(
                bucket=cfg.bucket, org=cfg.org, record=list(lines), write_precision=WritePrecision.NS
            )
        except InfluxDBError as exc:
            status = getattr(exc, "status", None)
            if not isinstance(status, int) or status <= 0:
                raise WriteError(f"{what}: {error_text(exc.message, 'failed')}", retryable=True) from exc
            body = getattr(exc, "body", None)
            retryable = status_retryable(status)
            raise WriteError(
                f"{what}: HTTP {status}: {error_text(body, str(exc.message))}",
                retryable=retryable,
                status=status,
                conflicts=() if retryable else conflicts_in(body if isinstance(body, str | bytes) else None),
            ) from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _transport_error(exc, what) from exc


def make_writer(config: InfluxConfig) -> V1Writer | V2Writer:
    return V1Writer(config) if config.api == "v1" else V2Writer(config)
