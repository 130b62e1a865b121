"""Generate edgeprobe's Grafana dashboards from this one source, in two variants of the same panels.

* ``grafana/dashboards/*.json``: for file provisioning (the compose stack, ``edgeprobe dashboards
  export``'s ``provisioning/``). Every panel, query and variable names the provisioned datasource by
  its fixed uid, because Grafana's file provisioning does not substitute ``${DS_...}`` inputs.
* ``grafana/import/*.json``: for Grafana's "Import dashboard" (UI or API). The same JSON with every
  datasource reference ``${DS_EDGEPROBE}``, declared in ``__inputs``, so Import asks which InfluxDB
  datasource to use, whatever its uid.

Run ``python grafana/build.py`` after editing; ``tests/integration/test_dashboards.py`` fails when the JSON
files differ from what this script generates, and runs every query against a real InfluxDB.

Conventions kept by every dashboard:

* One datasource, provisioned with uid :data:`DATASOURCE_UID`
  (``grafana/provisioning/datasources/edgeprobe.yaml``); every panel, query and variable names it
  (the import variant: :data:`DS_INPUT` instead, see :func:`for_import`).
* Raw InfluxQL only, and only what InfluxDB 1.x, 2.x (``/query`` v1 compatibility with a DBRP
  mapping) and 3.x (InfluxQL over ``/query``) all run: ``count``, ``mean``, ``median``,
  ``percentile``, ``min``, ``max``, ``last``, ``non_negative_difference``, regex ``FROM``, ``SHOW TAG
  VALUES``, subqueries, ``GROUP BY time(..)``/tags, ``fill``, ``ORDER BY time DESC``, ``LIMIT``. Not
  used: ``INTEGRAL``, ``SAMPLE``, ``SLIMIT``/``SOFFSET``, ``SHOW SERIES``/``DATABASES``, cardinality
  queries, the technical-analysis functions (3.x lacks them).
* Template variables filter as regexes, ``"site" =~ /^$site$/``; "All" is ``.*``.
* Every panel has a description that says what the number means, and a unit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "dashboards"
IMPORT_DIR = HERE / "import"

DATASOURCE_UID = "edgeprobe-influxdb"
DS = {"type": "influxdb", "uid": DATASOURCE_UID}
DS_INPUT = "DS_EDGEPROBE"  # the import variant's datasource input: ${DS_EDGEPROBE}
TAG = "edgeprobe"

F_SITE = '"site" =~ /^$site$/'
F_AGENT = '"agent" =~ /^$agent$/'
F_TARGET = '"target" =~ /^$target$/'
F_MODEL = '"model" =~ /^$model$/'
OK = "\"outcome\" = 'ok'"
NOT_OK = "\"outcome\" != 'ok'"
# edgeprobe_health: tag "source" is "agent" (the agents' reports) or "collector" (its own points,
# tagged "collector" with the collector's name).
HEALTH_AGENT = "\"source\" = 'agent'"
HEALTH_COLLECTOR = "\"source\" = 'collector'"
STATUS_429 = '"status" = 429'
STATUS_5XX = ('"status" >= 500', '"status" < 600')

GREEN, YELLOW, ORANGE, RED, BLUE = "green", "yellow", "orange", "red", "blue"

Json = dict[str, Any]


# ----- building blocks --------------------------------------------------------------------------


def where(*conds: str) -> str:
    return " AND ".join(("$timeFilter", *conds))


def steps(*pairs: tuple[str, float | None]) -> Json:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in pairs]}


def target(
    query: str, ref: str = "A", *, alias: str | None = None, fmt: str = "time_series", hide: bool = False
) -> Json:
    t: Json = {"refId": ref, "datasource": DS, "rawQuery": True, "query": query, "resultFormat": fmt}
    if alias is not None:
        t["alias"] = alias
    if hide:
        t["hide"] = True
    return t


def variable(name: str, label: str, query: str, description: str) -> Json:
    return {
        "name": name,
        "label": label,
        "description": description,
        "type": "query",
        "datasource": DS,
        "query": query,
        "definition": query,
        "refresh": 2,  # on time range change
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "sort": 1,
        "regex": "",
        "hide": 0,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
    }


def var_site() -> Json:
    return variable(
        "site",
        "Site (PoP)",
        'SHOW TAG VALUES FROM /^edgeprobe_/ WITH KEY = "site"',
        "The PoP or IXP an agent runs at (the agent's site in its config).",
    )


def var_agent() -> Json:
    return variable(
        "agent",
        "Agent",
        f'SHOW TAG VALUES FROM /^edgeprobe_/ WITH KEY = "agent" WHERE {F_SITE}',
        "Agent id (the MQTT username in the compose stack), limited to the chosen sites.",
    )


def var_target(measurement: str, label: str = "Target") -> Json:
    return variable(
        "target",
        label,
        f'SHOW TAG VALUES FROM {measurement} WITH KEY = "target" WHERE {F_SITE} AND {F_AGENT}',
        "A probed target as configured (host, host:port or URL).",
    )


def var_model() -> Json:
    return variable(
        "model",
        "Model",
        f'SHOW TAG VALUES FROM "edgeprobe_inference" WITH KEY = "model" WHERE {F_SITE} AND {F_AGENT}',
        "Model name the inference job asks for.",
    )


def field_config(
    unit: str,
    thresholds: Json | None = None,
    *,
    custom: Json | None = None,
    overrides: list[Json] | None = None,
    decimals: int | None = None,
    minimum: float | None = None,
    no_value: str | None = None,
) -> Json:
    defaults: Json = {"unit": unit, "thresholds": thresholds or steps((GREEN, None))}
    if custom is not None:
        defaults["custom"] = custom
    if decimals is not None:
        defaults["decimals"] = decimals
    if minimum is not None:
        defaults["min"] = minimum
    if no_value is not None:
        defaults["noValue"] = no_value
    return {"defaults": defaults, "overrides": overrides or []}


def ts_custom(*, stack: str = "none", draw: str = "line", fill: int = 0, thresholds_style: str = "off") -> Json:
    return {
        "drawStyle": draw,
        "lineWidth": 1,
        "fillOpacity": fill,
        "pointSize": 4,
        "showPoints": "auto",
        "spanNulls": False,
        "axisPlacement": "auto",
        "stacking": {"mode": stack, "group": "A"},
        "thresholdsStyle": {"mode": thresholds_style},
    }


def override(name: str, *props: tuple[str, Any], regex: bool = False) -> Json:
    matcher = {"id": "byRegexp" if regex else "byName", "options": name}
    return {"matcher": matcher, "properties": [{"id": k, "value": v} for k, v in props]}


def panel(kind: str, title: str, description: str, targets: list[Json], fc: Json, **more: Any) -> Json:
    p: Json = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": targets,
        "fieldConfig": fc,
    }
    p.update(more)
    return p


def timeseries(
    title: str,
    description: str,
    targets: list[Json],
    unit: str,
    thresholds: Json | None = None,
    *,
    stack: str = "none",
    draw: str = "line",
    fill: int = 0,
    overrides: list[Json] | None = None,
    thresholds_style: str = "off",
    interval: str | None = None,
    minimum: float | None = 0,
    **more: Any,
) -> Json:
    fc = field_config(
        unit,
        thresholds,
        custom=ts_custom(stack=stack, draw=draw, fill=fill, thresholds_style=thresholds_style),
        overrides=overrides,
        minimum=minimum,
    )
    p = panel(
        "timeseries",
        title,
        description,
        targets,
        fc,
        options={
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max", "lastNotNull"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        **more,
    )
    if interval is not None:
        p["interval"] = interval
    return p


def table(
    title: str,
    description: str,
    targets: list[Json],
    unit: str,
    thresholds: Json | None = None,
    *,
    overrides: list[Json] | None = None,
    transformations: list[Json] | None = None,
    sort_by: list[Json] | None = None,
    color_cells: bool = False,
    decimals: int | None = None,
) -> Json:
    custom: Json = {"align": "auto", "filterable": True}
    if color_cells:
        custom["cellOptions"] = {"type": "color-background", "mode": "basic"}
    fc = field_config(unit, thresholds, custom=custom, overrides=overrides, decimals=decimals)
    return panel(
        "table",
        title,
        description,
        targets,
        fc,
        options={"showHeader": True, "cellHeight": "sm", "sortBy": sort_by or [], "footer": {"show": False}},
        transformations=transformations or [],
    )


def stat(title: str, description: str, targets: list[Json], unit: str, thresholds: Json, **more: Any) -> Json:
    return panel(
        "stat",
        title,
        description,
        targets,
        field_config(unit, thresholds, no_value="0"),
        options={
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "none",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
        },
        **more,
    )


def row(title: str, *, repeat: str | None = None) -> Json:
    r: Json = {"type": "row", "title": title, "collapsed": False, "panels": []}
    if repeat is not None:
        r["repeat"] = repeat
    return r


MERGE: Json = {"id": "merge", "options": {}}


def organize(rename: dict[str, str] | None = None, exclude: tuple[str, ...] = ()) -> Json:
    return {
        "id": "organize",
        "options": {"renameByName": rename or {}, "excludeByName": dict.fromkeys(exclude, True), "indexByName": {}},
    }


def layout(items: list[tuple[Json, int, int]]) -> list[Json]:
    """Place panels left to right in rows of 24 columns; give ids. Items are (panel, width, height)."""
    out: list[Json] = []
    x = y = row_h = 0
    for pid, (p, w, h) in enumerate(items, start=1):
        if p["type"] == "row":
            if x:
                y += row_h
            p["gridPos"] = {"h": 1, "w": 24, "x": 0, "y": y}
            p["id"] = pid
            out.append(p)
            y += 1
            x = row_h = 0
            continue
        if x + w > 24:
            y += row_h
            x = row_h = 0
        p["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
        p["id"] = pid
        out.append(p)
        x += w
        row_h = max(row_h, h)
    return out


def dashboard(
    uid: str, title: str, description: str, variables: list[Json], items: list[tuple[Json, int, int]]
) -> Json:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": [TAG],
        "editable": True,
        "graphTooltip": 1,  # shared crosshair
        "timezone": "browser",
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "schemaVersion": 39,
        "version": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "annotations": {"list": []},
        "links": [
            {
                "type": "dashboards",
                "title": "edgeprobe",
                "tags": [TAG],
                "asDropdown": False,
                "includeVars": True,
                "keepTime": True,
                "targetBlank": False,
                "icon": "external link",
                "tooltip": "",
                "url": "",
            }
        ],
        "templating": {"list": variables},
        "panels": layout(items),
    }


# ----- thresholds --------------------------------------------------------------------------------

RTT_STEPS = steps((GREEN, None), (YELLOW, 50), (RED, 150))  # ms, round trip
JITTER_STEPS = steps((GREEN, None), (YELLOW, 5), (RED, 20))  # ms
LOSS_STEPS = steps((GREEN, None), (YELLOW, 0.01), (RED, 0.05))  # ratio
TTFT_STEPS = steps((GREEN, None), (YELLOW, 500), (RED, 1000))  # ms
ITL_STEPS = steps((GREEN, None), (YELLOW, 50), (RED, 100))  # ms between tokens
INFLATION_STEPS = steps((BLUE, None), (GREEN, 1), (YELLOW, 2), (RED, 3))  # measured / floor
PATH = "$tag_agent → $tag_target"


# ----- 1. Fleet ----------------------------------------------------------------------------------


def fleet() -> Json:
    health_agent = HEALTH_AGENT
    items: list[tuple[Json, int, int]] = [
        (row("Agents"), 24, 1),
        (
            stat(
                "Agents online",
                "Agents whose own health report (edgeprobe_health, sent every publish.health_interval_s, 30 s by "
                "default) reached InfluxDB in the last 2 minutes. Presence proper (online/offline, with the MQTT "
                "last will) is a retained MQTT status message that is not stored in InfluxDB; this is its stored "
                "proxy. 0 with agents running means their health is not arriving.",
                [
                    target(
                        'SELECT count("uptime_s") AS "agents" FROM (SELECT last("uptime_s") AS "uptime_s" '
                        f'FROM "edgeprobe_health" WHERE time > now() - 2m AND {health_agent} AND {F_SITE} '
                        f'AND {F_AGENT} GROUP BY "agent")'
                    )
                ],
                "short",
                steps((RED, None), (GREEN, 1)),
            ),
            4,
            6,
        ),
        (
            table(
                "Agents: last health report",
                "The newest health report of each agent: when it was sampled (Time, shown as an age), uptime, "
                "spool depth (observations not yet acknowledged by the broker), reconnects since the agent "
                "started and whether it was connected to the broker. An agent whose last report is older than a "
                "few health intervals is offline or cannot reach the broker.",
                [
                    target(
                        'SELECT "uptime_s", "spool_depth", "reconnects", "connected", "version" '
                        f'FROM "edgeprobe_health" WHERE {where(health_agent, F_SITE, F_AGENT)} '
                        'GROUP BY "agent", "site" ORDER BY time DESC LIMIT 1',
                        fmt="table",
                    )
                ],
                "short",
                overrides=[
                    override("Time", ("unit", "dateTimeFromNow"), ("displayName", "last report")),
                    override("uptime_s", ("unit", "s"), ("displayName", "uptime")),
                    override("spool_depth", ("displayName", "spool depth")),
                ],
                transformations=[MERGE],
            ),
            10,
            6,
        ),
        (
            table(
                "Agents: last observation per job",
                "When each agent's newest observation of each job was taken (Time, shown as an age) and its "
                "sequence number. Observations are timestamped with the probe's start, so an agent that stopped "
                "probing or publishing shows a growing age here.",
                [
                    target(
                        f'SELECT last("seq") AS "seq" FROM /^edgeprobe_/ WHERE {where(F_SITE, F_AGENT)} '
                        'GROUP BY "agent", "site", "job"',
                        fmt="table",
                    )
                ],
                "short",
                overrides=[override("Time", ("unit", "dateTimeFromNow"), ("displayName", "last observation"))],
                transformations=[MERGE],
                sort_by=[{"displayName": "agent", "desc": False}],
            ),
            10,
            6,
        ),
        (
            timeseries(
                "Observations per second per agent",
                "Observations stored per second, per agent and probe kind (measurement): count in each time "
                "bucket divided by the bucket length. A step down means an agent stopped probing, lost its broker "
                "or the collector stopped writing.",
                [
                    target(
                        f'SELECT count("seq") * 1000 / $__interval_ms FROM /^edgeprobe_/ '
                        f'WHERE {where(F_SITE, F_AGENT)} GROUP BY time($__interval), "agent" fill(0)',
                        alias="$tag_agent · $m",
                    )
                ],
                "suffix: obs/s",
                stack="normal",
                fill=20,
                interval="30s",
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Probe success ratio (outcomes, share of observations)",
                "Every observation has an outcome (ok, timeout, refused, unreachable, dns_error, tls_error, "
                "http_error, …). Stacked to 100 %: the green 'ok' share is the success ratio, the rest is what "
                "failed and how. Failures are data: a timeout is stored as a timeout, never as a zero.",
                [
                    target(
                        f'SELECT count("seq") FROM /^edgeprobe_/ WHERE {where(F_SITE, F_AGENT)} '
                        'GROUP BY time($__interval), "outcome" fill(0)',
                        alias="$tag_outcome · $m",
                    )
                ],
                "short",
                stack="percent",
                draw="bars",
                fill=80,
                interval="30s",
                overrides=[override("^ok ·", ("color", {"mode": "fixed", "fixedColor": GREEN}), regex=True)],
            ),
            12,
            8,
        ),
        (
            table(
                "Failed observations by agent and outcome",
                "Number of observations in the time range that did not end 'ok', per agent and outcome, with the "
                "probe kind (measurement) they came from. The reason of each is stored in the 'reason' field.",
                [
                    target(
                        f'SELECT count("reason") AS "failures" FROM /^edgeprobe_/ '
                        f'WHERE {where(F_SITE, F_AGENT, NOT_OK)} GROUP BY "agent", "outcome", "job"',
                        fmt="table",
                    )
                ],
                "short",
                steps((GREEN, None), (YELLOW, 1), (RED, 100)),
                transformations=[MERGE, organize(exclude=("Time",))],
                sort_by=[{"displayName": "failures", "desc": True}],
                color_cells=False,
            ),
            24,
            6,
        ),
        (row("Delivery: agents"), 24, 1),
        (
            timeseries(
                "Spool depth per agent",
                "Observations an agent holds that the broker has not acknowledged yet (in flight included). "
                "Near zero in normal operation; it grows while the broker is unreachable and drains in order "
                "afterwards. Past spool.max_bytes or spool.max_age_s the oldest are dropped (next panel).",
                [
                    target(
                        f'SELECT last("spool_depth") FROM "edgeprobe_health" '
                        f'WHERE {where(health_agent, F_SITE, F_AGENT)} GROUP BY time($__interval), "agent" fill(none)',
                        alias="$tag_agent",
                    )
                ],
                "short",
                steps((GREEN, None), (YELLOW, 1000), (RED, 10000)),
                thresholds_style="line",
                interval="30s",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Oldest waiting observation per agent",
                "Age of the oldest observation in the agent's spool, in seconds: how far behind delivery is. "
                "Empty when the spool is empty.",
                [
                    target(
                        f'SELECT max("spool_oldest_age_s") FROM "edgeprobe_health" '
                        f'WHERE {where(health_agent, F_SITE, F_AGENT)} GROUP BY time($__interval), "agent" fill(none)',
                        alias="$tag_agent",
                    )
                ],
                "s",
                steps((GREEN, None), (YELLOW, 60), (RED, 600)),
                interval="30s",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Dropped observations per agent",
                "Observations an agent dropped from its spool in each time bucket, because the spool reached "
                "its byte limit or the observation its age limit. These are lost data; anything above zero "
                "needs a look. (Differences of the spool's lifetime counters, which survive agent restarts.)",
                [
                    target(
                        'SELECT non_negative_difference(max("dropped_bytes_limit")) AS "bytes limit", '
                        'non_negative_difference(max("dropped_age_limit")) AS "age limit" '
                        f'FROM "edgeprobe_health" WHERE {where(health_agent, F_SITE, F_AGENT)} '
                        'GROUP BY time($__interval), "agent" fill(none)',
                        alias="$tag_agent: $col",
                    )
                ],
                "short",
                steps((GREEN, None), (RED, 1)),
                draw="bars",
                fill=80,
                interval="1m",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Produced vs acknowledged per agent",
                "Observations the scheduler produced and the broker acknowledged (PUBACK) in each time bucket. "
                "In steady state the two match; acknowledged falls behind while the broker is away and exceeds "
                "produced while the spool drains. (Differences of per-process counters; a restart is skipped.)",
                [
                    target(
                        'SELECT non_negative_difference(max("produced")) AS "produced", '
                        'non_negative_difference(max("acknowledged")) AS "acknowledged" '
                        f'FROM "edgeprobe_health" WHERE {where(health_agent, F_SITE, F_AGENT)} '
                        'GROUP BY time($__interval), "agent" fill(none)',
                        alias="$tag_agent: $col",
                    )
                ],
                "short",
                interval="1m",
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Broker trouble per agent: reconnects and failed publishes",
                "Per time bucket: broker connections re-established after a lost one, and batches the broker "
                "did not acknowledge in time (they stay in the spool and are sent again; nothing is lost).",
                [
                    target(
                        'SELECT non_negative_difference(max("reconnects")) AS "reconnects", '
                        'non_negative_difference(max("publish_failures")) AS "failed publishes" '
                        f'FROM "edgeprobe_health" WHERE {where(health_agent, F_SITE, F_AGENT)} '
                        'GROUP BY time($__interval), "agent" fill(none)',
                        alias="$tag_agent: $col",
                    )
                ],
                "short",
                steps((GREEN, None), (YELLOW, 1)),
                draw="bars",
                fill=80,
                interval="1m",
            ),
            12,
            8,
        ),
        (row("Delivery: collectors"), 24, 1),
        (
            timeseries(
                "Collector: received, written, rejected, dead-lettered",
                "Per collector and time bucket: observations received from MQTT, points InfluxDB accepted "
                "(observations and health), messages or observations rejected by validation (bad schema, "
                "spoofed topic, too large …; the reason is in the rejected_<reason> fields and the log) and "
                "points InfluxDB refused for good (dead-lettered to a file with the reason). Written should "
                "track received; rejected and dead-lettered should stay at zero. (Differences of per-process "
                "counters; a restart is skipped.)",
                [
                    target(
                        'SELECT non_negative_difference(max("received_observations")) AS "received", '
                        'non_negative_difference(max("written_points")) AS "written", '
                        'non_negative_difference(max("rejected")) AS "rejected", '
                        'non_negative_difference(max("dead_lettered")) AS "dead-lettered" '
                        f'FROM "edgeprobe_health" WHERE {where(HEALTH_COLLECTOR)} '
                        'GROUP BY time($__interval), "collector" fill(none)',
                        alias="$tag_collector: $col",
                    )
                ],
                "short",
                interval="1m",
                overrides=[
                    override(
                        ".*: (rejected|dead-lettered)$", ("color", {"mode": "fixed", "fixedColor": RED}), regex=True
                    )
                ],
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Collector: InfluxDB write latency and retries",
                "Duration of the collector's InfluxDB writes since its previous health point (p95 and the "
                "longest), and write attempts that failed and were retried (connection refused, timeout, 5xx, "
                "429; right axis). Rising latency or retries means InfluxDB is struggling; the collector keeps "
                "the data in its spool and backs off.",
                [
                    target(
                        'SELECT max("write_latency_p95_ms") AS "write p95", max("write_latency_max_ms") AS "write max" '
                        f'FROM "edgeprobe_health" WHERE {where(HEALTH_COLLECTOR)} '
                        'GROUP BY time($__interval), "collector" fill(none)',
                        alias="$tag_collector: $col",
                    ),
                    target(
                        'SELECT non_negative_difference(max("write_retries")) AS "retries" FROM "edgeprobe_health" '
                        f'WHERE {where(HEALTH_COLLECTOR)} GROUP BY time($__interval), "collector" fill(none)',
                        "B",
                        alias="$tag_collector: $col",
                    ),
                ],
                "ms",
                steps((GREEN, None), (YELLOW, 500), (RED, 2000)),
                interval="1m",
                overrides=[
                    override(
                        ".*: retries$",
                        ("unit", "short"),
                        ("custom.drawStyle", "bars"),
                        ("custom.axisPlacement", "right"),
                        regex=True,
                    )
                ],
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Collector: spool depth and oldest waiting line",
                "Lines (observations and health points) the collector has taken from MQTT and committed to its "
                "own spool but not yet written to InfluxDB, and the age of the oldest (right axis). Near zero "
                "normally; it grows while InfluxDB is down and drains when it is back. Nothing is acknowledged "
                "to the broker before it is in this spool.",
                [
                    target(
                        'SELECT max("spool_depth") AS "spool depth" FROM "edgeprobe_health" '
                        f'WHERE {where(HEALTH_COLLECTOR)} GROUP BY time($__interval), "collector" fill(none)',
                        alias="$tag_collector: $col",
                    ),
                    target(
                        'SELECT max("spool_oldest_age_s") AS "oldest" FROM "edgeprobe_health" '
                        f'WHERE {where(HEALTH_COLLECTOR)} GROUP BY time($__interval), "collector" fill(none)',
                        "B",
                        alias="$tag_collector: $col",
                    ),
                ],
                "short",
                steps((GREEN, None), (YELLOW, 10000), (RED, 100000)),
                interval="1m",
                overrides=[override(".*: oldest$", ("unit", "s"), ("custom.axisPlacement", "right"), regex=True)],
            ),
            8,
            8,
        ),
    ]
    return dashboard(
        "edgeprobe-fleet",
        "edgeprobe · Fleet",
        "Which agents are alive, how much they measure, how much succeeds, and whether delivery keeps up.",
        [var_site(), var_agent()],
        items,
    )


# ----- 2. Latency --------------------------------------------------------------------------------


def latency() -> Json:
    icmp_filters = (F_SITE, F_AGENT, F_TARGET)
    band_overrides = [
        override("p95", ("custom.fillBelowTo", "min"), ("custom.fillOpacity", 30), ("custom.lineWidth", 0)),
        override("min", ("custom.lineWidth", 0)),
        override("p50", ("custom.lineWidth", 2), ("color", {"mode": "fixed", "fixedColor": GREEN})),
    ]
    items: list[tuple[Json, int, int]] = [
        (row("All paths"), 24, 1),
        (
            table(
                "Median RTT: agent × target (ICMP)",
                "Median of the per-run median round-trip times (rtt_p50_ms) over the time range, one row per "
                "agent and one column per target. Empty cells: that agent does not probe that target, or every "
                "packet was lost.",
                [
                    target(
                        f'SELECT median("rtt_p50_ms") AS "rtt_p50_ms" FROM "edgeprobe_icmp" '
                        f'WHERE {where(*icmp_filters)} GROUP BY "agent", "target"',
                        fmt="table",
                    )
                ],
                "ms",
                RTT_STEPS,
                transformations=[
                    MERGE,
                    {
                        "id": "groupingToMatrix",
                        "options": {"columnField": "target", "rowField": "agent", "valueField": "rtt_p50_ms"},
                    },
                ],
                color_cells=True,
                decimals=2,
            ),
            24,
            7,
        ),
        (
            timeseries(
                "RTT p50 per path (ICMP)",
                "Median round-trip time per agent → target path: in each time bucket, the median of the runs' "
                "median RTTs (each run sends `count` echo requests). Lost packets are not counted as RTTs; see "
                "the loss panel.",
                [
                    target(
                        f'SELECT median("rtt_p50_ms") FROM "edgeprobe_icmp" WHERE {where(*icmp_filters)} '
                        'GROUP BY time($__interval), "agent", "target" fill(none)',
                        alias=PATH,
                    )
                ],
                "ms",
                RTT_STEPS,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Packet loss per path (ICMP)",
                "Share of echo requests without a reply (loss_ratio, 0–100 %), averaged over the runs in each "
                "time bucket. Lost packets stay in the denominator; they are never zero-RTT samples.",
                [
                    target(
                        f'SELECT mean("loss_ratio") FROM "edgeprobe_icmp" WHERE {where(*icmp_filters)} '
                        'GROUP BY time($__interval), "agent", "target" fill(none)',
                        alias=PATH,
                    )
                ],
                "percentunit",
                LOSS_STEPS,
                thresholds_style="line",
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Jitter per path: RFC 3550 (ICMP)",
                "RFC 3550 interarrival jitter, the smoothed estimator iperf3 reports: J += (|D| − J)/16 over "
                "consecutive replies in send order. Median of the runs in each bucket. Other tools call other "
                "things jitter; they are in the table below under their own names.",
                [
                    target(
                        f'SELECT median("jitter_rfc3550_ms") FROM "edgeprobe_icmp" WHERE {where(*icmp_filters)} '
                        'GROUP BY time($__interval), "agent", "target" fill(none)',
                        alias=PATH,
                    )
                ],
                "ms",
                JITTER_STEPS,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Delay variation per path: PDV p95 and IPDV (ICMP)",
                "pdv_p95_ms (RFC 5481 PDV: p95 − min RTT of a run), the spread users feel in buffering; "
                "ipdv_p95_ms (RFC 3393 IPDV: |RTTᵢ − RTTᵢ₋₁| of consecutive answered packets, p95), the "
                "packet-to-packet change. Median of the runs in each bucket.",
                [
                    target(
                        'SELECT median("pdv_p95_ms") AS "PDV p95", median("ipdv_p95_ms") AS "IPDV p95" '
                        f'FROM "edgeprobe_icmp" WHERE {where(*icmp_filters)} '
                        'GROUP BY time($__interval), "agent", "target" fill(none)',
                        alias=f"{PATH}: $col",
                    )
                ],
                "ms",
                JITTER_STEPS,
            ),
            12,
            8,
        ),
        (
            table(
                "Jitter and loss per path, every definition (ICMP)",
                "Over the time range, per path, medians of the runs' values: rtt_stddev_ms (population standard "
                "deviation, ping's mdev, Telegraf's 'jitter'), jitter_rfc3550_ms (iperf3's), ipdv_mean_ms and "
                "ipdv_p95_ms (RFC 3393, SmokePing IRTT's), pdv_p95_ms (RFC 5481, p95 − min); loss is the mean "
                "loss ratio.",
                [
                    target(
                        'SELECT median("rtt_stddev_ms") AS "stddev", median("jitter_rfc3550_ms") AS "RFC 3550", '
                        'median("ipdv_mean_ms") AS "IPDV mean", median("ipdv_p95_ms") AS "IPDV p95", '
                        'median("pdv_p95_ms") AS "PDV p95", mean("loss_ratio") AS "loss" '
                        f'FROM "edgeprobe_icmp" WHERE {where(*icmp_filters)} GROUP BY "agent", "target"',
                        fmt="table",
                    )
                ],
                "ms",
                JITTER_STEPS,
                overrides=[override("loss", ("unit", "percentunit"), ("thresholds", LOSS_STEPS))],
                transformations=[MERGE, organize(exclude=("Time",))],
                color_cells=True,
                decimals=2,
            ),
            24,
            7,
        ),
        (
            timeseries(
                "TCP connect time per path",
                "Median TCP handshake time (SYN → SYN-ACK, connect_ms: the median of a run's attempts) per agent "
                "→ host:port, in each time bucket. It is one network round trip plus the target's accept time.",
                [
                    target(
                        f'SELECT median("connect_ms") FROM "edgeprobe_tcp" WHERE {where(F_SITE, F_AGENT)} '
                        'GROUP BY time($__interval), "agent", "target" fill(none)',
                        alias=PATH,
                    )
                ],
                "ms",
                RTT_STEPS,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "HTTP time to first byte per path",
                "Median time from the start of the request to the first byte of the response (ttfb_ms, curl's "
                "time_starttransfer: DNS, connect, TLS and the server's wait included) per agent → URL.",
                [
                    target(
                        f'SELECT median("ttfb_ms") FROM "edgeprobe_http" WHERE {where(F_SITE, F_AGENT)} '
                        'GROUP BY time($__interval), "agent", "target" fill(none)',
                        alias=PATH,
                    )
                ],
                "ms",
                steps((GREEN, None), (YELLOW, 200), (RED, 1000)),
            ),
            12,
            8,
        ),
        (
            timeseries(
                "DNS query time by resolver",
                "Median DNS query time per agent → resolver (rtt_min_ms: a run's fastest answer among the "
                "resolvers of its job; one resolver per job gives one line per resolver), with the transport "
                "asked (udp; tcp and tls include their handshakes), in each time bucket. NXDOMAIN counts as an "
                "answer; SERVFAIL, REFUSED and no answer are failures, never times.",
                [
                    target(
                        f'SELECT median("rtt_min_ms") FROM "edgeprobe_dns" WHERE {where(F_SITE, F_AGENT)} '
                        'GROUP BY time($__interval), "agent", "resolver_set", "transport" fill(none)',
                        alias="$tag_agent → $tag_resolver_set ($tag_transport)",
                    )
                ],
                "ms",
                steps((GREEN, None), (YELLOW, 50), (RED, 250)),
            ),
            12,
            8,
        ),
        (row("TLS certificates (HTTP)"), 24, 1),
        (
            table(
                "Certificates expiring soonest",
                "Per https target, days until its certificate expires (cert_expiry_days: the leaf's notAfter − "
                "the time of the probe, negative once expired) and until the earliest notAfter among the "
                "certificates the server sent (chain_expiry_days, blackbox_exporter's "
                "probe_ssl_earliest_cert_expiry): each agent's latest value, the lowest over the agents (a PoP "
                "may be served another certificate). Recorded with verify_tls off and when verification fails "
                "too (outcome tls_error), e.g. for an expired certificate. Soonest first.",
                [
                    target(
                        'SELECT min("cert_expiry_days") AS "cert_expiry_days", '
                        'min("chain_expiry_days") AS "chain_expiry_days" FROM ('
                        'SELECT last("cert_expiry_days") AS "cert_expiry_days", '
                        'last("chain_expiry_days") AS "chain_expiry_days" '
                        f'FROM "edgeprobe_http" WHERE {where(F_SITE, F_AGENT)} GROUP BY "agent", "target"'
                        ') GROUP BY "target"',
                        fmt="table",
                    )
                ],
                "d",
                steps((RED, None), (ORANGE, 7), (YELLOW, 14), (GREEN, 30)),
                transformations=[MERGE, organize(exclude=("Time",))],
                sort_by=[{"displayName": "cert_expiry_days", "desc": False}],
                color_cells=True,
                decimals=1,
            ),
            24,
            6,
        ),
        (row("Path detail: $agent", repeat="agent"), 24, 1),
        (
            timeseries(
                "$agent → $target: RTT band",
                "SmokePing's 'smoke': the shaded band runs from the fastest reply in each time bucket "
                "(min of rtt_min_ms) to the typical slow reply (median of the runs' p95 RTT); the line is the "
                "median of the runs' median RTTs. A wide band is jitter; a band that lifts is congestion or a "
                "route change.",
                [
                    target(
                        'SELECT min("rtt_min_ms") AS "min", median("rtt_p50_ms") AS "p50", '
                        'median("rtt_p95_ms") AS "p95" '
                        f'FROM "edgeprobe_icmp" WHERE {where(F_AGENT, F_TARGET)} '
                        "GROUP BY time($__interval) fill(none)",
                        alias="$col",
                    )
                ],
                "ms",
                RTT_STEPS,
                overrides=band_overrides,
                repeat="target",
                repeatDirection="h",
                maxPerRow=3,
                minimum=None,
            ),
            8,
            7,
        ),
    ]
    return dashboard(
        "edgeprobe-latency",
        "edgeprobe · Latency",
        "Which PoPs see which latency, loss and jitter to which targets.",
        [var_site(), var_agent(), var_target('"edgeprobe_icmp"', "ICMP target")],
        items,
    )


# ----- 3. Inference ------------------------------------------------------------------------------


def inference() -> Json:
    inf = (F_SITE, F_AGENT, F_TARGET, F_MODEL)
    ok = OK
    fresh = "\"connection\" = 'new'"
    ep = "$tag_site → $tag_target"
    parts = (
        'mean("dns_ms") AS "dns", mean("connect_ms") AS "connect", mean("tls_ms") AS "tls", '
        'mean("net_rtt_ms") AS "network (request round trip)", mean("server_ms") AS "server"'
    )
    items: list[tuple[Json, int, int]] = [
        (row("Time to first token"), 24, 1),
        (
            timeseries(
                "TTFT p50 / p95 per endpoint per PoP",
                "Time to first token (ttft_ms): from just before the request is written to the first event "
                "carrying generated text (role-only chunks, comments and keep-alives don't count), for "
                "successful requests. p50 and p95 of the requests in each time bucket, per site (PoP) → "
                "endpoint. Includes DNS, TCP and TLS when the connection was new.",
                [
                    target(
                        'SELECT percentile("ttft_ms", 50) AS "p50", percentile("ttft_ms", 95) AS "p95" '
                        f'FROM "edgeprobe_inference" WHERE {where(*inf, ok)} '
                        'GROUP BY time($__interval), "site", "target" fill(none)',
                        alias=f"{ep} $col",
                    )
                ],
                "ms",
                TTFT_STEPS,
                thresholds_style="line",
            ),
            14,
            8,
        ),
        (
            table(
                "TTFT per endpoint per PoP (time range)",
                "Over the time range, per PoP, endpoint and model: TTFT p50 and p95 of the successful requests, "
                "and how many requests that is.",
                [
                    target(
                        'SELECT percentile("ttft_ms", 50) AS "TTFT p50", percentile("ttft_ms", 95) AS "TTFT p95", '
                        'count("ttft_ms") AS "requests" '
                        f'FROM "edgeprobe_inference" WHERE {where(*inf, ok)} GROUP BY "site", "target", "model"',
                        fmt="table",
                    )
                ],
                "ms",
                TTFT_STEPS,
                overrides=[override("requests", ("unit", "short"), ("custom.cellOptions", {"type": "auto"}))],
                transformations=[MERGE, organize(exclude=("Time",))],
                color_cells=True,
                decimals=1,
            ),
            10,
            8,
        ),
        (
            timeseries(
                "Where TTFT goes at $site: network vs server (fresh connections)",
                "Mean time of each part of TTFT on new connections, stacked: dns, TCP connect and TLS "
                "handshakes on the request's own connection; one network round trip for the request and its "
                "first token (net_rtt_ms: a TCP handshake to the same host and port just before, on a separate "
                "connection); and the server's share, server_ms = ttft − setup − one round trip (queueing, "
                "prefill and the first decode step, which cannot be told apart from outside). The top is the mean "
                "TTFT less the client's time to write the request (setup_ms − dns − connect − tls, usually well "
                "under 1 ms). Pick one endpoint to see one path.",
                [
                    target(
                        f'SELECT {parts} FROM "edgeprobe_inference" WHERE {where(*inf, ok, fresh)} '
                        "GROUP BY time($__interval) fill(none)",
                        alias="$col",
                    )
                ],
                "ms",
                TTFT_STEPS,
                stack="normal",
                fill=60,
                repeat="site",
                repeatDirection="h",
                maxPerRow=2,
                overrides=[
                    override("server", ("color", {"mode": "fixed", "fixedColor": "purple"})),
                    override("network (request round trip)", ("color", {"mode": "fixed", "fixedColor": BLUE})),
                ],
            ),
            12,
            8,
        ),
        (
            table(
                "TTFT broken down per PoP and endpoint (fresh connections, means)",
                "Per PoP and endpoint over the time range, the mean of each part of TTFT on new connections: "
                "dns, connect, tls, one request round trip (network, net_rtt_ms) and the server's share "
                "(server_ms = ttft − setup − one round trip), next to the mean TTFT. A large network share says: "
                "move closer; a large server share says: the endpoint is slow or queueing.",
                [
                    target(
                        f'SELECT {parts}, mean("ttft_ms") AS "TTFT" FROM "edgeprobe_inference" '
                        f'WHERE {where(*inf, ok, fresh)} GROUP BY "site", "target"',
                        fmt="table",
                    )
                ],
                "ms",
                TTFT_STEPS,
                transformations=[MERGE, organize(exclude=("Time",))],
                decimals=1,
            ),
            24,
            7,
        ),
        (row("Token stream"), 24, 1),
        (
            timeseries(
                "Inter-token latency p50 / p95 per endpoint per PoP",
                "Gaps between consecutive content-bearing stream events (itl_p50_ms, itl_p95_ms of each request), "
                "median over the requests in each bucket. Steady small gaps read as a smooth stream; a high p95 "
                "is stalls. One event may carry several tokens (see tokens/s).",
                [
                    target(
                        'SELECT median("itl_p50_ms") AS "ITL p50", median("itl_p95_ms") AS "ITL p95" '
                        f'FROM "edgeprobe_inference" WHERE {where(*inf, ok)} '
                        'GROUP BY time($__interval), "site", "target" fill(none)',
                        alias=f"{ep} $col",
                    )
                ],
                "ms",
                ITL_STEPS,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Decode speed: tokens per second per endpoint per PoP",
                "Output tokens per second over the decode phase (after the first token), median over the requests "
                "in each bucket. Token counts come from the server's usage report when it sends one, else from "
                "the number of content events.",
                [
                    target(
                        f'SELECT median("tokens_per_s") FROM "edgeprobe_inference" WHERE {where(*inf, ok)} '
                        'GROUP BY time($__interval), "site", "target" fill(none)',
                        alias=ep,
                    )
                ],
                "suffix: tok/s",
                steps((RED, None), (YELLOW, 10), (GREEN, 30)),
            ),
            12,
            8,
        ),
        (row("Failures"), 24, 1),
        (
            timeseries(
                "Inference outcomes by kind",
                "Requests per time bucket by outcome: ok, http_error (the server answered 429, 5xx …), timeout "
                "(no first token, or the stream stalled), protocol_error (stream cut or malformed) and others. "
                "A 429 or 5xx is a result worth storing: it is what a user at that PoP got.",
                [
                    target(
                        f'SELECT count("seq") FROM "edgeprobe_inference" WHERE {where(*inf)} '
                        'GROUP BY time($__interval), "outcome" fill(0)',
                        alias="$tag_outcome",
                    )
                ],
                "short",
                stack="normal",
                draw="bars",
                fill=80,
                interval="1m",
                overrides=[override("ok", ("color", {"mode": "fixed", "fixedColor": GREEN}))],
            ),
            12,
            8,
        ),
        (
            timeseries(
                "HTTP 429 and 5xx per endpoint",
                "Requests per time bucket answered with HTTP 429 (rate limited: the provider's quota or "
                "capacity) and with a 5xx (the endpoint failed), per endpoint.",
                [
                    target(
                        f'SELECT count("status") AS "429" FROM "edgeprobe_inference" '
                        f'WHERE {where(*inf, STATUS_429)} GROUP BY time($__interval), "target" fill(none)',
                        alias="$tag_target: HTTP $col",
                    ),
                    target(
                        f'SELECT count("status") AS "5xx" FROM "edgeprobe_inference" '
                        f"WHERE {where(*inf, *STATUS_5XX)} "
                        'GROUP BY time($__interval), "target" fill(none)',
                        "B",
                        alias="$tag_target: HTTP $col",
                    ),
                ],
                "short",
                steps((GREEN, None), (RED, 1)),
                draw="bars",
                fill=80,
                interval="1m",
            ),
            12,
            8,
        ),
        (row("Edge vs core"), 24, 1),
        (
            timeseries(
                "TTFT p50 by tier per PoP: edge vs core",
                "Median TTFT of successful requests per endpoint tier (the job label 'tier', e.g. edge or core) "
                "and PoP, side by side. The gap between the lines at one PoP is what moving inference to the edge "
                "buys a user there.",
                [
                    target(
                        f'SELECT median("ttft_ms") FROM "edgeprobe_inference" WHERE {where(*inf, ok)} '
                        'GROUP BY time($__interval), "tier", "site" fill(none)',
                        alias="$tag_tier @ $tag_site",
                    )
                ],
                "ms",
                TTFT_STEPS,
            ),
            12,
            8,
        ),
        (
            table(
                "Edge vs core per PoP (time range)",
                "Per PoP (rows) and endpoint tier (columns): median TTFT of successful requests over the time "
                "range. Read across a row to compare tiers from one place.",
                [
                    target(
                        'SELECT median("ttft_ms") AS "ttft_ms" FROM "edgeprobe_inference" '
                        f'WHERE {where(*inf, ok)} GROUP BY "site", "tier"',
                        fmt="table",
                    )
                ],
                "ms",
                TTFT_STEPS,
                transformations=[
                    MERGE,
                    {
                        "id": "groupingToMatrix",
                        "options": {"columnField": "tier", "rowField": "site", "valueField": "ttft_ms"},
                    },
                ],
                color_cells=True,
                decimals=1,
            ),
            12,
            8,
        ),
    ]
    return dashboard(
        "edgeprobe-inference",
        "edgeprobe · Inference",
        "Time to first token from each PoP to each inference endpoint, how much of it is network, the token "
        "stream, failures, and edge versus core.",
        [var_site(), var_agent(), var_target('"edgeprobe_inference"', "Endpoint"), var_model()],
        items,
    )


# ----- 4. Physics --------------------------------------------------------------------------------


def physics() -> Json:
    f = (F_SITE, F_AGENT, F_TARGET)
    items: list[tuple[Json, int, int]] = [
        (
            timeseries(
                "Measured minimum RTT vs the speed-of-light floor per path (ICMP)",
                "The fastest reply in each bucket (min of rtt_min_ms) next to the floor: the round trip light in "
                "fibre (≈204,000 km/s, c/1.468) needs over the great-circle distance between agent and target "
                "(floor_rtt_ms, ≈0.98 ms per 100 km), and twice that, roughly what typical fibre routes cost. "
                "Needs coordinates on both the agent and the target.",
                [
                    target(
                        'SELECT min("rtt_min_ms") AS "measured min RTT", mean("floor_rtt_ms") AS "fibre floor", '
                        'mean("floor_rtt_ms") * 2 AS "2× floor (typical route)" '
                        f'FROM "edgeprobe_icmp" WHERE {where(*f)} '
                        'GROUP BY time($__interval), "agent", "target" fill(none)',
                        alias=f"{PATH}: $col",
                    )
                ],
                "ms",
                RTT_STEPS,
                overrides=[
                    override(".*: fibre floor$", ("custom.lineStyle", {"fill": "dash", "dash": [10, 10]}), regex=True),
                    override(".*: 2× floor.*$", ("custom.lineStyle", {"fill": "dot"}), regex=True),
                ],
            ),
            24,
            9,
        ),
        (
            table(
                "Inflation ratio ranked (all probe kinds)",
                "inflation_ratio = measured minimum RTT (ICMP), handshake RTT (TCP, HTTP) or network round trip "
                "(inference) divided by the straight-line fibre floor; median over the time range per path and "
                "probe kind, highest first. 1 is physically perfect; around 2 is a typical fibre route; well "
                "above that is a detour, a far-away anycast instance or queueing. Below 1 is impossible: the "
                "coordinates are wrong.",
                [
                    target(
                        'SELECT median("inflation_ratio") AS "inflation", mean("distance_km") AS "distance", '
                        'mean("floor_rtt_ms") AS "floor RTT" '
                        f'FROM /^edgeprobe_/ WHERE {where(*f)} GROUP BY "agent", "target", "job"',
                        fmt="table",
                    )
                ],
                "suffix:×",
                INFLATION_STEPS,
                overrides=[
                    override("distance", ("unit", "lengthkm"), ("custom.cellOptions", {"type": "auto"})),
                    override("floor RTT", ("unit", "ms"), ("custom.cellOptions", {"type": "auto"})),
                ],
                transformations=[MERGE, organize(exclude=("Time",))],
                sort_by=[{"displayName": "inflation", "desc": True}],
                color_cells=True,
                decimals=2,
            ),
            12,
            9,
        ),
        (
            panel(
                "xychart",
                "Distance vs RTT",
                "One point per path: great-circle distance between agent and target (x, km) against the fastest "
                "measured round trip over the time range (y, ms), with the fibre floor for the same distance. "
                "Points far above the floor line are paths worth asking the carrier about.",
                [
                    target(
                        'SELECT mean("distance_km") AS "distance_km", min("rtt_min_ms") AS "min RTT", '
                        'mean("floor_rtt_ms") AS "fibre floor" '
                        f'FROM "edgeprobe_icmp" WHERE {where(*f)} GROUP BY "agent", "target"',
                        fmt="table",
                    )
                ],
                field_config(
                    "ms",
                    RTT_STEPS,
                    custom={"show": "points", "pointSize": {"fixed": 8}},
                    overrides=[override("distance_km", ("unit", "lengthkm"))],
                ),
                options={
                    "seriesMapping": "auto",
                    "dims": {"x": "distance_km"},
                    "legend": {"showLegend": True, "displayMode": "list", "placement": "bottom"},
                    "tooltip": {"mode": "single"},
                },
                transformations=[MERGE, organize(exclude=("Time", "agent", "target"))],
            ),
            12,
            9,
        ),
        (
            timeseries(
                "Inflation ratio per path over time (ICMP)",
                "Median inflation ratio (minimum RTT / straight-line fibre floor) per path in each bucket. A step "
                "up at a constant distance is a route change.",
                [
                    target(
                        f'SELECT median("inflation_ratio") FROM "edgeprobe_icmp" WHERE {where(*f)} '
                        'GROUP BY time($__interval), "agent", "target" fill(none)',
                        alias=PATH,
                    )
                ],
                "suffix:×",
                INFLATION_STEPS,
                thresholds_style="line",
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Inference TTFT vs its network floor",
                "Median TTFT of successful requests per PoP → endpoint next to floor_ttft_ms, the least a "
                "fresh connection can take by physics alone: one straight-line fibre round trip for each "
                "handshake (TCP, then TLS: one for TLS 1.3, two for TLS 1.2) and one for the request. What is "
                "above the floor is routing, queueing and the server.",
                [
                    target(
                        'SELECT median("ttft_ms") AS "TTFT p50", mean("floor_ttft_ms") AS "network floor" '
                        f'FROM "edgeprobe_inference" WHERE {where(*f, OK)} '
                        'GROUP BY time($__interval), "site", "target" fill(none)',
                        alias="$tag_site → $tag_target: $col",
                    )
                ],
                "ms",
                TTFT_STEPS,
                overrides=[
                    override(".*: network floor$", ("custom.lineStyle", {"fill": "dash", "dash": [10, 10]}), regex=True)
                ],
            ),
            12,
            8,
        ),
    ]
    return dashboard(
        "edgeprobe-physics",
        "edgeprobe · Physics",
        "How far each path is from the physical limit: measured RTT against the speed of light in fibre.",
        [var_site(), var_agent(), var_target("/^edgeprobe_/")],
        items,
    )


# ----- 5. Path (trace) --------------------------------------------------------------------------

F_TRACE = (F_SITE, F_AGENT, F_TARGET)


def path() -> Json:
    """The trace kind's measurements: edgeprobe_trace (one point per run) and edgeprobe_trace_hop
    (one point per hop per run, tagged ttl)."""
    items: list[tuple[Json, int, int]] = [
        (
            table(
                "Latest hops",
                "For the chosen agent and target, per hop (TTL): the address that answered in the last run "
                "that heard it, its smallest RTT in that run, loss over the time range, AS and IXP (from the "
                "agent's local ipasn / PeeringDB files, when configured). A hop silent in every run shows no "
                "address. Choose one agent and one target: with several, their hops are merged by TTL.",
                [
                    target(
                        'SELECT last("address") AS "address", last("rtt_min_ms") AS "rtt min", '
                        'mean("loss_ratio") AS "loss", last("asn") AS "AS", last("ixp") AS "IXP" '
                        f'FROM "edgeprobe_trace_hop" WHERE {where(*F_TRACE)} GROUP BY "ttl"',
                        fmt="table",
                    )
                ],
                "ms",
                RTT_STEPS,
                overrides=[
                    override("loss", ("unit", "percentunit"), ("decimals", 0)),
                    override("AS", ("unit", "none"), ("decimals", 0)),
                ],
                transformations=[organize(exclude=("Time",))],
                sort_by=[{"displayName": "ttl", "desc": False}],
            ),
            24,
            9,
        ),
        (
            timeseries(
                "Hop count",
                "The TTL at which the target answered (hop_count), per agent → target; a gap is a run that "
                "did not reach the target (its last hops were silent).",
                [
                    target(
                        f'SELECT last("hop_count") FROM "edgeprobe_trace" WHERE {where(*F_TRACE)} '
                        'GROUP BY time($__interval), "agent", "target" fill(none)',
                        alias=PATH,
                    )
                ],
                "none",
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Distinct paths per interval",
                "How many different paths (path_id: the ordered responding addresses, silent hops as *) the "
                "runs of each interval took: 1 is a stable path, 2 or more a path change (or per-packet load "
                "balancing) within the interval. Each run after a change also carries path_changed = true.",
                [
                    target(
                        'SELECT count(distinct("path_id")) FROM "edgeprobe_trace" '
                        f'WHERE {where(*F_TRACE)} GROUP BY time($__interval), "agent", "target" fill(none)',
                        alias=PATH,
                    )
                ],
                "none",
                steps((GREEN, None), (YELLOW, 2)),
                draw="bars",
                fill=60,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "RTT at each hop",
                "Median of each hop's smallest RTT (rtt_min_ms) per TTL for the chosen agent and target: "
                "where the lines step up is where the milliseconds are added. Routers answer traceroute "
                "from their slow path, so an intermediate hop may look slower than the ones after it.",
                [
                    target(
                        f'SELECT median("rtt_min_ms") FROM "edgeprobe_trace_hop" WHERE {where(*F_TRACE)} '
                        'GROUP BY time($__interval), "ttl" fill(none)',
                        alias="hop $tag_ttl",
                    )
                ],
                "ms",
                RTT_STEPS,
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Largest RTT step",
                "Per agent → target, the largest increase of the smallest RTT from one responding hop to the "
                "next (largest_step_ms) in each run, and the last responding hop's RTT (last_hop_rtt_ms).",
                [
                    target(
                        'SELECT max("largest_step_ms") AS "largest step", mean("last_hop_rtt_ms") AS "last hop" '
                        f'FROM "edgeprobe_trace" WHERE {where(*F_TRACE)} '
                        'GROUP BY time($__interval), "agent", "target" fill(none)',
                        alias=f"{PATH}: $col",
                    )
                ],
                "ms",
                RTT_STEPS,
            ),
            12,
            8,
        ),
    ]
    return dashboard(
        "edgeprobe-path",
        "edgeprobe · Path",
        "The path to each target hop by hop (the trace kind): latest hops, hop count, path changes and "
        "where along the path the RTT is added.",
        [var_site(), var_agent(), var_target('"edgeprobe_trace"')],
        items,
    )


DASHBOARDS = {
    "edgeprobe-fleet.json": fleet,
    "edgeprobe-latency.json": latency,
    "edgeprobe-inference.json": inference,
    "edgeprobe-physics.json": physics,
    "edgeprobe-path.json": path,
}


def for_import(board: Json) -> Json:
    """``board`` for Grafana's Import: every reference to the provisioned datasource becomes
    ``${DS_EDGEPROBE}``, declared in ``__inputs`` (Import asks for an InfluxDB datasource and
    substitutes its uid everywhere); ``__requires`` lists the plugins the dashboard uses."""
    ref = {"type": "influxdb", "uid": f"${{{DS_INPUT}}}"}

    def swap(node: Any) -> Any:
        if node == DS:
            return dict(ref)
        if isinstance(node, dict):
            return {k: swap(v) for k, v in node.items()}
        if isinstance(node, list):
            return [swap(v) for v in node]
        return node

    def panel_types(panels: list[Json]) -> set[str]:
        found: set[str] = set()
        for p in panels:
            if p["type"] != "row":
                found.add(p["type"])
            found |= panel_types(p.get("panels", []))
        return found

    requires = [{"type": "datasource", "id": "influxdb", "name": "InfluxDB", "version": "1.0.0"}]
    requires += [{"type": "panel", "id": t, "name": t, "version": ""} for t in sorted(panel_types(board["panels"]))]
    inputs = [
        {
            "name": DS_INPUT,
            "label": "InfluxDB (edgeprobe)",
            "description": "The InfluxDB datasource (query language InfluxQL) holding edgeprobe's database.",
            "type": "datasource",
            "pluginId": "influxdb",
            "pluginName": "InfluxDB",
        }
    ]
    return {"__inputs": inputs, "__requires": requires, **swap(board)}


def _text(board: Json) -> str:
    return json.dumps(board, indent=2, ensure_ascii=False) + "\n"


def render() -> dict[str, str]:
    """File name → JSON text of every dashboard, for provisioning (the fixed datasource uid)."""
    return {name: _text(build()) for name, build in DASHBOARDS.items()}


def render_import() -> dict[str, str]:
    """File name → JSON text of every dashboard, for Grafana's Import (``${DS_EDGEPROBE}``)."""
    return {name: _text(for_import(build())) for name, build in DASHBOARDS.items()}


def main(argv: list[str]) -> int:
    """``build.py [DIR]``: write DIR/dashboards and DIR/import (default: grafana/ itself)."""
    root = Path(argv[1]) if len(argv) > 1 else HERE
    for folder, texts in (("dashboards", render()), ("import", render_import())):
        out = root / folder
        out.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            (out / name).write_text(text, encoding="utf-8")
            print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
