"""``edgeprobe advise`` end to end: connection settings, the reads, the report (the I/O lives here
and in :func:`edgeprobe.advise.influxql.query`; everything between is pure)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections.abc import Mapping, Sequence

import aiohttp

from edgeprobe import configfile
from edgeprobe.advise import influxql
from edgeprobe.advise.influxql import AdviseError
from edgeprobe.advise.model import InferenceSample, PathSample
from edgeprobe.advise.pairs import pair_stats
from edgeprobe.advise.report import Report, Source, build_report
from edgeprobe.advise.whatif import CandidatesFile
from edgeprobe.collector.config import INFLUX_ENV, CollectorConfig, InfluxConfig


def influx_settings(
    config_path: str | None,
    url: str | None = None,
    database: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> InfluxConfig:
    """The collector's InfluxDB settings: its config file's ``influx:`` (when given), the
    ``EDGEPROBE_INFLUX_*`` variables over it, ``--influx-url``/``--database`` over both. Raises
    ConfigError."""
    env = os.environ if environ is None else environ
    data = configfile.read_yaml(config_path) if config_path else {}
    configfile.apply_env(data, INFLUX_ENV, env)
    if url is not None:
        configfile.set_path(data, "influx.url", url)
    if database is not None:
        key = "influx.bucket" if str((data.get("influx") or {}).get("api", "v1")) == "v2" else "influx.database"
        configfile.set_path(data, key, database)
    source = config_path or "--influx-url/--database/EDGEPROBE_INFLUX_*"
    return configfile.convert(data, CollectorConfig, source).influx


async def read(
    config: InfluxConfig, since: str, where: Sequence[tuple[str, str, str]], limit: int
) -> tuple[list[InferenceSample], list[PathSample]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=config.timeout_s)) as session:
        answer = await influxql.query(config, influxql.inference_query(since, where, limit), session)
        samples = influxql.parse_inference(answer)
        paths: list[PathSample] = []
        if samples:
            for kind in ("icmp", "tcp"):
                answer = await influxql.query(config, influxql.path_query(kind, since, where, limit), session)
                paths += influxql.parse_paths(kind, answer)
    return samples, paths


def advise(
    config: InfluxConfig,
    *,
    since: str,
    where: Sequence[str],
    min_samples: int,
    max_points_per_series: int,
    candidates: CandidatesFile | None = None,
    weights: Mapping[str, float] | None = None,
    k: int | None = None,
    now: dt.datetime | None = None,
) -> Report:
    """Read, compute, report. AdviseError (one line) for no data, too little data, and for what the
    reader reports (InfluxDB unreachable, refusing, the database missing)."""
    influxql.check_since(since)
    filters = influxql.parse_where(where)
    samples, paths = asyncio.run(read(config, since, filters, max_points_per_series))
    db = influxql.database_of(config)
    scope = f"in the last {since}" + (f" where {' and '.join(where)}" if where else "")
    if not samples:
        raise AdviseError(f"no inference measurements (edgeprobe_inference) {scope} in database {db!r} at {config.url}")
    pairs = pair_stats(samples, paths, min_samples)
    if not any(p.ranked for p in pairs):
        most = max(p.samples for p in pairs)
        raise AdviseError(
            f"too little data {scope}: {len(pairs)} PoP × endpoint pair(s), the best with {most} successful "
            f"sample(s); a pair needs {min_samples} (--min-samples) to be ranked; widen --since"
        )
    source = Source(
        url=config.url,
        database=db,
        since=since,
        where=list(where),
        min_samples=min_samples,
        max_points_per_series=max_points_per_series,
        points_read=len(samples),
    )
    stamp = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return build_report(source, pairs, stamp, candidates, weights, k)
