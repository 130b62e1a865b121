"""Grafana dashboards (``grafana/``): static checks, then every query of every panel on real data.

Static: the JSON files are what ``grafana/build.py`` generates, they parse, uids are unique, every
datasource a panel, query or variable names is provisioned, every panel has a description and a
unit, the InfluxQL sticks to what InfluxDB 1.x, 2.x and 3.x all run, and every field and tag a
query names is one edgeprobe writes.

On data: two agents (two sites, with coordinates) probe loopback targets and two local responders
(ICMP, TCP including a refused port, HTTP, HTTPS with a valid and an expired certificate, DNS
against a local unbound, and inference with 429, 500 and a silent endpoint) for
a few seconds; their observations and health go agent → mosquitto → collector → a fresh InfluxDB
database. The targets are given coordinates, so the agents write the physical-floor fields
(``distance_km``, ``floor_rtt_ms``, ``inflation_ratio``, ``floor_ttft_ms``) themselves; only
health points a producer did not send are added through the collector's encoder. Then each
query runs with Grafana's macros substituted,
once with every template variable at "All" (``.*``) and once with real single values escaped the
way Grafana escapes them, and must return at least one series.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.util
import json
import re
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import msgspec
import pytest
import yaml

from edgeprobe.collector.lineproto import escape_tag_value, format_field_value
from edgeprobe.localstack import InfluxServer, MosquittoServer, free_port
from edgeprobe.probes.registry import KINDS
from edgeprobe.schema import BASE_FIELD_KEYS, AgentHealth, Observation
from tests.support import certs
from tests.support.paths import REPO
from tests.support.unbound import Unbound
from tests.support.wait import wait_for_async

GRAFANA = REPO / "grafana"
DASH_DIR = GRAFANA / "dashboards"  # for file provisioning: the datasource's fixed uid
IMPORT_DIR = GRAFANA / "import"  # for Grafana's Import: ${DS_EDGEPROBE}, declared in __inputs
DATASOURCES = GRAFANA / "provisioning" / "datasources"

# Fields the speed-of-light floor adds to every observation with coordinates on both ends
# (issue 6), and to inference observations the TTFT floor of a fresh connection.
PHYSICS_FIELDS = ("distance_km", "floor_rtt_ms", "inflation_ratio")
INFERENCE_PHYSICS_FIELDS = ("floor_ttft_ms",)
# Tags edgeprobe writes besides the kinds' tag_fields; "tier" is the job label the docs use for
# edge/core endpoints; "source" and "collector" tag edgeprobe_health.
KNOWN_TAGS = {"agent", "site", "target", "outcome", "job", "tier", "source", "collector"}
SUB_POINT_TAGS = {"ttl"}  # the trace's edgeprobe_trace_hop points (ProbeKind.sub_points)
HEALTH = "edgeprobe_health"

# InfluxQL that InfluxDB 3.x does not run (docs-v2 influxql-v3-reference/feature-support).
NOT_PORTABLE = re.compile(
    r"\b(INTEGRAL|SAMPLE|SLIMIT|SOFFSET|SHOW\s+SERIES|SHOW\s+DATABASES|CARDINALITY|HOLT_WINTERS\w*|"
    r"CHANDE_MOMENTUM_OSCILLATOR|\w*EXPONENTIAL_MOVING_AVERAGE|KAUFMANS_\w+|RELATIVE_STRENGTH_INDEX|"
    r"TRIPLE_EXPONENTIAL_DERIVATIVE|INTO)\b",
    re.IGNORECASE,
)
FIELD_FUNC = re.compile(
    r"\b(?:count|mean|median|min|max|last|first|sum|percentile|spread|stddev|non_negative_difference)"
    r'\(\s*"([^"]+)"',
    re.IGNORECASE,
)
RAW_SELECT = re.compile(r'^SELECT\s+((?:"[^"]+"\s*,\s*)*"[^"]+")\s+FROM', re.IGNORECASE)
FROM_RE = re.compile(r'\bFROM\s+(?:"([^"]+)"|/([^/]+)/)', re.IGNORECASE)
WHERE_IDENT = re.compile(r'"([^"]+)"\s*(?:=~|!~|!=|>=|<=|=|<|>)')
GROUP_BY = re.compile(r"\bGROUP\s+BY\s+(.*?)(?:\s+fill\(|\s+ORDER\s+|\s+LIMIT\s+|$)", re.IGNORECASE)
VAR_RE = re.compile(r"\$(\w+)")


# ----- reading the dashboards ---------------------------------------------------------------------


def load_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("edgeprobe_grafana_build", GRAFANA / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted(DASH_DIR.glob("*.json"))}


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from iter_panels(p.get("panels", []))  # a collapsed row holds its panels


def content_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in iter_panels(dash["panels"]) if p["type"] != "row"]


@dataclass(frozen=True)
class Query:
    dashboard: str
    where: str  # panel title, or "variable <name>"
    ref: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.dashboard.removesuffix('.json')}|{self.where}|{self.ref}"


def all_queries() -> list[Query]:
    out: list[Query] = []
    for name, dash in dashboards().items():
        for var in dash["templating"]["list"]:
            if var["type"] == "query":
                out.append(Query(name, f"variable {var['name']}", "var", var["query"]))
        for p in content_panels(dash):
            for t in p["targets"]:
                out.append(Query(name, p["title"], t["refId"], t["query"]))
    return out


QUERIES = all_queries()


def provisioned_datasource_uids() -> set[str]:
    uids: set[str] = set()
    for path in DATASOURCES.glob("*.y*ml"):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        uids.update(ds["uid"] for ds in doc.get("datasources", []))
    return uids


# ----- what edgeprobe writes ----------------------------------------------------------------------


def known_schema() -> dict[str, set[str]]:
    """Measurement → the field and tag names edgeprobe writes to it."""
    from edgeprobe.collector.service import CollectorStats, health_fields

    schema: dict[str, set[str]] = {}
    for kind in KINDS.values():
        names = set(kind.result_type.__struct_fields__) | set(BASE_FIELD_KEYS) | set(PHYSICS_FIELDS) | KNOWN_TAGS
        if kind.name == "inference":
            names |= set(INFERENCE_PHYSICS_FIELDS)
        schema[kind.measurement] = names | set(kind.tag_fields)
        if kind.sub_points is not None:  # more points per observation (the trace's hops): from a sample run
            from tests.unit.probes.test_trace import filled as sample_trace

            for sub in kind.sub_points(msgspec.to_builtins(sample_trace())):
                more = set(sub.fields) | set(sub.tags) | SUB_POINT_TAGS | KNOWN_TAGS | set(kind.tag_fields)
                schema.setdefault(f"{kind.measurement}_{sub.suffix}", set()).update(more)
    collector_fields = health_fields(CollectorStats(), [1.0], [1], time.time_ns(), 1.0)
    schema[HEALTH] = set(AgentHealth.__struct_fields__) | set(collector_fields) | KNOWN_TAGS
    return schema


def measurements_of(query: str, schema: dict[str, set[str]]) -> list[str]:
    found: list[str] = []
    for quoted, regex in FROM_RE.findall(query):
        if quoted:
            found.append(quoted)
        else:
            found.extend(m for m in schema if re.search(regex, m))
    return found


def names_used(query: str) -> set[str]:
    names = set(FIELD_FUNC.findall(query))
    raw = RAW_SELECT.match(query)
    if raw:
        names.update(re.findall(r'"([^"]+)"', raw.group(1)))
    names.update(WHERE_IDENT.findall(query))
    for group in GROUP_BY.findall(query):
        names.update(re.findall(r'"([^"]+)"', group))
    return names


# ----- Grafana's macros ------------------------------------------------------------------------------


INTERVAL_S = 2  # short buckets: a few seconds of data still give several of them


def grafana_regex_escape(value: str) -> str:
    """How Grafana escapes a variable's value inside an InfluxQL regex (``/`` included)."""
    return re.sub(r"[\\^$*+?.()|\[\]{}/]", lambda m: "\\" + m.group(), value)


def substitute(query: str, values: dict[str, str], now_ms: int) -> str:
    """The query as Grafana sends it: time filter, interval macros and variables replaced."""
    q = query.replace("$timeFilter", f"time >= {now_ms - 3_600_000}ms and time <= {now_ms + 60_000}ms")
    q = q.replace("$__interval_ms", str(INTERVAL_S * 1000)).replace("$__interval", f"{INTERVAL_S}s")

    def var(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in values:
            raise AssertionError(f"unknown variable ${name} in {query!r}")
        return values[name]

    return VAR_RE.sub(var, q)


# ----- static checks ----------------------------------------------------------------------------------


def test_json_is_what_build_py_generates() -> None:
    build = load_build()
    for folder, generated in ((DASH_DIR, build.render()), (IMPORT_DIR, build.render_import())):
        on_disk = {p.name: p.read_text(encoding="utf-8") for p in folder.glob("*.json")}
        assert set(on_disk) == set(generated), "run: python grafana/build.py"
        for name, text in generated.items():
            assert on_disk[name] == text, f"{folder.name}/{name} is stale: run python grafana/build.py"


def datasource_refs(node: Any) -> Iterator[Any]:
    """Every value of a "datasource" key anywhere in a dashboard."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from datasource_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from datasource_refs(value)


def test_import_variant_asks_for_the_datasource() -> None:
    """Import in any Grafana asks for an InfluxDB datasource (``__inputs``) and puts its uid in every
    panel, query and variable; with the provisioned uid chosen it is the provisioned dashboard."""
    provisioned = dashboards()
    imported = {p.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted(IMPORT_DIR.glob("*.json"))}
    assert set(imported) == set(provisioned)
    for name, dash in imported.items():
        assert dash["__inputs"] == [
            {
                "name": "DS_EDGEPROBE",
                "label": "InfluxDB (edgeprobe)",
                "description": dash["__inputs"][0]["description"],
                "type": "datasource",
                "pluginId": "influxdb",
                "pluginName": "InfluxDB",
            }
        ], name
        assert {"type": "datasource", "id": "influxdb", "name": "InfluxDB", "version": "1.0.0"} in dash["__requires"]
        panel_types = {p["type"] for p in content_panels(dash)}
        assert {r["id"] for r in dash["__requires"] if r["type"] == "panel"} == panel_types, name
        for var in dash["templating"]["list"]:
            assert var["datasource"] == {"type": "influxdb", "uid": "${DS_EDGEPROBE}"}, (name, var["name"])
        for p in content_panels(dash):
            assert p["datasource"] == {"type": "influxdb", "uid": "${DS_EDGEPROBE}"}, (name, p["title"])
            for t in p["targets"]:
                assert t["datasource"] == {"type": "influxdb", "uid": "${DS_EDGEPROBE}"}, (name, p["title"])
        refs = list(datasource_refs(dash))
        assert refs and all(r == {"type": "influxdb", "uid": "${DS_EDGEPROBE}"} for r in refs), name
        text = json.dumps(dash)
        assert "edgeprobe-influxdb" not in text, name
        # What Grafana's Import does: substitute the chosen datasource's uid for ${DS_EDGEPROBE}.
        chosen = json.loads(text.replace("${DS_EDGEPROBE}", "edgeprobe-influxdb"))
        del chosen["__inputs"], chosen["__requires"]
        assert chosen == provisioned[name], name


def test_provisioned_variant_names_the_fixed_uid_only() -> None:
    """Grafana's file provisioning substitutes no ``${DS_...}``: the provisioned JSON has none."""
    for name, dash in dashboards().items():
        assert "__inputs" not in dash and "${DS_" not in json.dumps(dash), name
        refs = list(datasource_refs(dash))
        assert refs and all(r == {"type": "influxdb", "uid": "edgeprobe-influxdb"} for r in refs), name


def test_dashboards_parse_and_uids_are_unique() -> None:
    dash = dashboards()
    assert len(dash) == 5
    uids = [d["uid"] for d in dash.values()]
    assert len(set(uids)) == len(uids), uids
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,40}", u) for u in uids), uids
    titles = [d["title"] for d in dash.values()]
    assert len(set(titles)) == len(titles)
    for name, d in dash.items():
        ids = [p["id"] for p in iter_panels(d["panels"])]
        assert len(set(ids)) == len(ids), f"{name}: duplicate panel ids"
        var_names = [v["name"] for v in d["templating"]["list"]]
        assert len(set(var_names)) == len(var_names)


def test_every_datasource_reference_is_provisioned() -> None:
    uids = provisioned_datasource_uids()
    assert uids == {"edgeprobe-influxdb"}
    for name, dash in dashboards().items():
        for var in dash["templating"]["list"]:
            assert var["datasource"]["uid"] in uids, (name, var["name"])
        for p in content_panels(dash):
            assert p["datasource"]["uid"] in uids, (name, p["title"])
            assert p["targets"], (name, p["title"])
            for t in p["targets"]:
                assert t.get("datasource", p["datasource"])["uid"] in uids, (name, p["title"], t["refId"])


def test_every_panel_says_what_it_shows_and_its_unit() -> None:
    for name, dash in dashboards().items():
        for p in content_panels(dash):
            where = (name, p["title"])
            assert len(p.get("description", "")) >= 60, where
            defaults = p["fieldConfig"]["defaults"]
            assert defaults.get("unit"), where
            assert defaults["thresholds"]["steps"], where
            for t in p["targets"]:
                assert t["rawQuery"] is True and t["query"].strip(), where


def test_template_variables() -> None:
    for name, dash in dashboards().items():
        variables = {v["name"]: v for v in dash["templating"]["list"]}
        assert {"site", "agent"} <= set(variables), name
        for v in variables.values():
            assert v["query"].startswith("SHOW TAG VALUES FROM"), v
            assert v["allValue"] == ".*" and v["includeAll"] and v["multi"], v
        used = set()
        for q in (q for q in QUERIES if q.dashboard == name):
            used |= set(VAR_RE.findall(q.text))
        for p in content_panels(dash):
            for word in re.findall(r"\$(\w+)", p["title"] + json.dumps(p.get("repeat", ""))):
                used.add(word)
        macros = {"timeFilter", "__interval", "__interval_ms"}
        assert used - macros <= set(variables), (name, used - macros - set(variables))
        # every variable is used in the regex form, which handles All (.*) and multi-value (a|b)
        for q in (q for q in QUERIES if q.dashboard == name):
            for var in set(VAR_RE.findall(q.text)) - macros:
                assert f"/^${var}$/" in q.text, (q.id, var)
    inference = dashboards()["edgeprobe-inference.json"]
    assert "model" in {v["name"] for v in inference["templating"]["list"]}
    assert {"site", "agent", "target"} <= {
        v["name"] for v in dashboards()["edgeprobe-latency.json"]["templating"]["list"]
    }


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: q.id)
def test_query_is_portable_influxql(query: Query) -> None:
    text = query.text
    assert not NOT_PORTABLE.search(text), f"not supported by InfluxDB 3.x: {text}"
    if text.upper().startswith("SELECT"):
        assert "$timeFilter" in text or re.search(r"time\s*>\s*now\(\)\s*-\s*\d+[smhd]", text), text
        if "GROUP BY time(" in text:
            assert "$__interval" in text and "fill(" in text, text


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: q.id)
def test_query_names_fields_and_tags_edgeprobe_writes(query: Query) -> None:
    schema = known_schema()
    measurements = measurements_of(query.text, schema)
    assert measurements, f"no known measurement in {query.text}"
    for m in measurements:
        assert m in schema, f"{m} is not written by edgeprobe"
    known = set().union(*(schema[m] for m in measurements))
    unknown = {n for n in names_used(query.text) if n not in known and n != "time"}
    assert not unknown, f"{query.id}: not written to {measurements}: {sorted(unknown)}"


# ----- on real data ---------------------------------------------------------------------------------

AGENTS = (  # id, site, latitude, longitude
    ("dash-fra1", "fra1", 50.11, 8.68),
    ("dash-mad1", "mad1", 40.42, -3.70),
)
# Where the targets "are", for the physics fields (the loopback addresses play an edge site in
# Amsterdam and a core site in Ashburn).
TARGET_COORDS = {"127.0.0.1": (52.37, 4.90), "127.0.0.2": (39.04, -77.49)}
CERT_DAYS = {"https_valid": 30.0, "https_expired": -2.0}  # days to notAfter of the https targets' certificates


@asynccontextmanager
async def serve_https(tmp: Path) -> AsyncIterator[dict[str, str]]:
    """Minimal HTTPS servers on 127.0.0.1, one per certificate of CERT_DAYS: their URLs."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # a client that refused the certificate, or a handshake cut by a stopping agent
        finally:
            writer.close()

    servers, urls = [], {}
    for key, days in CERT_DAYS.items():
        leaf = certs.make_cert(
            certs.name(f"{key}.test"), not_after=certs.now() + dt.timedelta(days=days), sans=certs.LOOPBACK_SANS
        )
        (tmp / key).mkdir()
        server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=certs.server_context(tmp / key, leaf))
        servers.append(server)
        urls[key] = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/health"
    try:
        yield urls
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


@asynccontextmanager
async def serve_dns(workdir: Path) -> AsyncIterator[str]:
    """unbound on 127.0.0.1, authoritative for edgeprobe.test only (tests/support/unbound.py): its ip:port."""
    server = Unbound(
        workdir,
        records=["www.edgeprobe.test. 300 IN A 192.0.2.10", "www.edgeprobe.test. 300 IN AAAA 2001:db8::10"],
        tls=False,
    )
    await asyncio.to_thread(server.start)
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        await asyncio.to_thread(server.stop)


def target_host(target: str) -> str:
    if "://" in target:
        return urlsplit(target).hostname or ""
    return target.rsplit(":", 1)[0] if target.count(":") == 1 else target


@dataclass
class Filled:
    influx: InfluxServer
    db: str
    produced: list[Observation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _count(influx: InfluxServer, db: str, q: str) -> int:
    return sum(int(r.get("count", 0) or 0) for r in influx.rows(q, db))


def agent_config(
    aid: str,
    site: str,
    lat: float,
    lon: float,
    broker: str,
    prefix: str,
    urls: dict[str, str],
    closed: int,
    spool_dir: Path,
) -> dict[str, Any]:
    from edgeprobe.agent.config import AgentConfig, PublishConfig

    edge_port = urlsplit(urls["edge"]).port
    icmp = {"count": 5, "interval_s": 0.02, "timeout_s": 0.5}
    jobs: list[dict[str, Any]] = [
        {
            "name": "icmp-edge",
            "kind": "icmp",
            "targets": ["127.0.0.1"],
            "interval_s": 1.0,
            "options": icmp,
            "labels": {"tier": "edge"},
        },
        {
            "name": "icmp-core",
            "kind": "icmp",
            "targets": ["127.0.0.2"],
            "interval_s": 1.0,
            "options": icmp,
            "labels": {"tier": "core"},
        },
        {
            "name": "tcp",
            "kind": "tcp",
            "targets": [f"127.0.0.1:{edge_port}", f"127.0.0.1:{closed}"],
            "interval_s": 1.0,
            "options": {"count": 2, "interval_s": 0.05, "timeout_s": 0.3},
        },
        {
            "name": "http",
            "kind": "http",
            "targets": [f"{urls['edge']}/health", f"{urls['core']}/health"],
            "interval_s": 1.0,
            "options": {"timeout_s": 0.5},
        },
        {  # certificate facts: a valid self-signed certificate (not verified: ok) and an expired one (tls_error)
            "name": "https",
            "kind": "http",
            "targets": [urls["https_valid"]],
            "interval_s": 1.0,
            "options": {"timeout_s": 0.5, "verify_tls": False},
        },
        {
            "name": "https-expired",
            "kind": "http",
            "targets": [urls["https_expired"]],
            "interval_s": 1.0,
            "options": {"timeout_s": 0.5},
        },
        {  # the local unbound: an answer, an NXDOMAIN (ok) and a REFUSED name outside its zone (dns_error)
            "name": "dns",
            "kind": "dns",
            "targets": ["www.edgeprobe.test", "nope.edgeprobe.test", "outside.example"],
            "interval_s": 1.0,
            "options": {"resolvers": [urls["dns"]], "timeout_s": 0.5},
        },
        {
            "name": "dns-tcp",
            "kind": "dns",
            "targets": ["www.edgeprobe.test"],
            "interval_s": 1.0,
            "options": {"resolvers": [urls["dns"]], "transport": "tcp", "rtype": "AAAA", "timeout_s": 0.5},
        },
    ]
    if "trace" in KINDS:  # loopback is one hop away (raw sockets: the tests run as root)
        jobs.append(
            {
                "name": "trace",
                "kind": "trace",
                "targets": ["127.0.0.1", "127.0.0.2"],
                "interval_s": 2.0,
                "options": {"queries": 2, "max_hops": 3, "timeout_s": 0.3},
            }
        )
    if "inference" in KINDS:
        opts = {"model": "edgeprobe-responder", "max_tokens": 6, "timeout_s": 0.5, "first_token_timeout_s": 0.4}
        for tier in ("edge", "core"):
            jobs.append(
                {
                    "name": f"inference-{tier}",
                    "kind": "inference",
                    "targets": [urls[tier]],
                    "interval_s": 2.0,
                    "options": opts,
                    "labels": {"tier": tier},
                }
            )
        for fail in ("429", "500", "silent"):
            jobs.append(
                {
                    "name": f"inference-{fail}",
                    "kind": "inference",
                    "targets": [urls["edge"], urls["core"]],
                    "interval_s": 2.0,
                    "options": {**opts, "extra_headers": {"x-edgeprobe-fail": fail}},
                }
            )
    publish: dict[str, Any] = {"flush_interval_s": 0.2}
    if "health_interval_s" in PublishConfig.__struct_fields__:
        publish["health_interval_s"] = 1.0
    for job in jobs:  # targets with coordinates: the agent writes the physical floor itself
        job["targets"] = [
            {"target": t, "latitude": TARGET_COORDS[target_host(t)][0], "longitude": TARGET_COORDS[target_host(t)][1]}
            if isinstance(t, str) and target_host(t) in TARGET_COORDS
            else t
            for t in job["targets"]
        ]
    cfg: dict[str, Any] = {
        "agent": {"id": aid, "site": site, "latitude": lat, "longitude": lon},
        "broker": {"url": broker, "topic_prefix": prefix},
        "publish": publish,
        "jobs": jobs,
    }
    if "spool" in AgentConfig.__struct_fields__:
        cfg["spool"] = {"path": str(spool_dir / f"{aid}.spool.sqlite")}
    return cfg


async def run_pipeline(broker: MosquittoServer, filled: Filled, spool_dir: Path) -> None:
    from edgeprobe.agent.config import AgentConfig, build_jobs
    from edgeprobe.agent.daemon import run_agent
    from edgeprobe.collector.config import CollectorConfig
    from edgeprobe.collector.service import run_collector
    from edgeprobe.configfile import convert
    from edgeprobe.responder import ResponderSettings, serve_responder

    prefix = f"dash{uuid.uuid4().hex[:8]}"
    influx, db = filled.influx, filled.db
    # Edge answers sooner than core; "silent" (no token, keep-alives only) gives up after 3 s.
    edge_settings = ResponderSettings(ttft_ms=30, token_interval_ms=5, tokens=6, seed=1, silent_max_s=3)
    core_settings = ResponderSettings(ttft_ms=90, token_interval_ms=8, tokens=6, seed=2, silent_max_s=3)
    async with (
        serve_responder("127.0.0.1", 0, edge_settings) as edge,
        serve_responder("127.0.0.1", 0, core_settings) as core,
        serve_https(spool_dir) as https_urls,
        serve_dns(spool_dir / "unbound") as dns_resolver,
    ):
        urls = {"edge": edge.url, "core": core.url, "dns": dns_resolver, **https_urls}
        closed = free_port()  # nothing listens: the TCP probe gets "refused", a real failure
        ccfg_raw: dict[str, Any] = {
            "name": "dash-collector",
            "broker": {"url": broker.url, "client_id": f"dash-collector-{prefix}", "topic_prefix": prefix},
            "influx": {"api": "v1", "url": influx.url, "database": db, "flush_interval_s": 0.2},
        }
        if "spool" in CollectorConfig.__struct_fields__:
            ccfg_raw["spool"] = {"path": str(spool_dir / "collector.spool.sqlite")}
        if "health_interval_s" in CollectorConfig.__struct_fields__:
            ccfg_raw["health_interval_s"] = 1.0
        ccfg = convert(ccfg_raw, CollectorConfig, "dashboards test")
        agents = []
        for aid, site, lat, lon in AGENTS:
            acfg = convert(
                agent_config(aid, site, lat, lon, broker.url, prefix, urls, closed, spool_dir), AgentConfig, aid
            )
            agents.append((acfg, build_jobs(acfg, aid)))
        collector_stop, agent_stop, collector_ready = asyncio.Event(), asyncio.Event(), asyncio.Event()
        collector_task = asyncio.create_task(run_collector(ccfg, stop=collector_stop, on_ready=collector_ready.set))
        await asyncio.wait_for(collector_ready.wait(), 20)  # subscribed before the agents publish
        agent_tasks = [
            asyncio.create_task(run_agent(acfg, jobs, stop=agent_stop, tap=filled.produced.append))
            for acfg, jobs in agents
        ]
        # The scenario: a few seconds of data (each job every 2 s; "silent" gives up after 3 s).
        await asyncio.sleep(6.5)
        agent_stop.set()
        await asyncio.wait_for(asyncio.gather(*agent_tasks), 30)
        want = len(filled.produced)
        await wait_for_async(
            lambda: asyncio.to_thread(_count, influx, db, 'SELECT count("seq") FROM /^edgeprobe_/'),
            30,
            f"the {want} observations in InfluxDB",
            until=lambda n: n >= want,
            interval_s=0.3,
        )
        collector_health = f'SELECT count("uptime_s") FROM "{HEALTH}" WHERE "source" = \'collector\''
        before = await asyncio.to_thread(_count, influx, db, collector_health)
        await wait_for_async(
            lambda: asyncio.to_thread(_count, influx, db, collector_health),
            15,
            "one more collector health point in InfluxDB",
            until=lambda n: n > before,
            interval_s=0.3,
        )
        collector_stop.set()
        await asyncio.wait_for(collector_task, 30)
    got = _count(influx, db, 'SELECT count("seq") FROM /^edgeprobe_/')
    assert got == want, f"pipeline: produced {want} observations, InfluxDB has {got}"
    filled.notes.append(f"pipeline: {want} observations from {len(AGENTS)} agents stored")


def health_line(tags: dict[str, str], fields: dict[str, Any], at_ns: int) -> str:
    tag_text = ",".join(f"{k}={escape_tag_value(v)}" for k, v in sorted(tags.items()))
    field_text = ",".join(f"{k}={t}" for k, v in fields.items() if (t := format_field_value(v)) is not None)
    return f"{HEALTH},{tag_text} {field_text} {at_ns}"


def add_health_if_missing(filled: Filled) -> None:
    """Health points of the same shape as the collector writes, for sources that wrote too few."""
    from edgeprobe.collector.service import CollectorStats, health_fields

    now = time.time_ns()
    lines: list[str] = []
    for aid, site, _, _ in AGENTS:
        n = _count(
            filled.influx,
            filled.db,
            f'SELECT count("uptime_s") FROM "{HEALTH}" WHERE "source" = \'agent\' AND "agent" = \'{aid}\'',
        )
        if n >= 3:
            continue
        for i in range(24):  # every 5 s over the last 2 minutes
            h = AgentHealth(
                v=1,
                agent=aid,
                site=site,
                at_ns=now - (24 - i) * 5_000_000_000,
                started_at_ns=now - 10**12,
                uptime_s=1000.0 + 5 * i,
                spool_depth=i % 3,
                produced=10 * i,
                acknowledged=10 * i,
                published=10 * i,
                connects=1,
                connected=True,
                spool_oldest_age_s=0.5,
            )
            fields = {
                k: v
                for k, v in msgspec.structs.asdict(h).items()
                if k not in {"v", "agent", "site", "at_ns", "labels", "component"}
            }
            lines.append(health_line({"agent": aid, "site": site, "source": "agent"}, fields, h.at_ns))
        filled.notes.append(f"health: {aid} wrote {n} agent health points, added 24 of the same shape")
    n = _count(filled.influx, filled.db, f'SELECT count("uptime_s") FROM "{HEALTH}" WHERE "source" = \'collector\'')
    if n < 3:
        stats = CollectorStats()
        for i in range(24):
            stats.received_observations += 10
            stats.written_points += 10
            at = now - (24 - i) * 5_000_000_000
            fields = health_fields(stats, [2.0, 3.0], [10], at, 5.0 * i)
            lines.append(health_line({"source": "collector", "collector": "dash-collector"}, fields, at))
        filled.notes.append(f"health: the collector wrote {n} health points, added 24 of the same shape")
    if lines:
        filled.influx.write("\n".join(lines), filled.db)


@pytest.fixture(scope="module")
def filled(
    mosquitto: MosquittoServer, influxdb: InfluxServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Filled]:
    db = f"dash_{uuid.uuid4().hex[:12]}"
    influxdb.create_database(db)
    data = Filled(influxdb, db)
    try:
        asyncio.run(run_pipeline(mosquitto, data, tmp_path_factory.mktemp("dash-spools")))
        if "inference" not in KINDS:
            pytest.fail("the inference kind is not registered (issue 3): no inference data to test with")
        physics = _count(influxdb, db, 'SELECT count("distance_km") FROM /^edgeprobe_/')
        assert physics > 0, "the agents were given target coordinates: distance_km must be written"
        data.notes.append(f"physics: {physics} observations carry distance_km from the agents themselves")
        add_health_if_missing(data)
        print("\n" + "\n".join(data.notes))
        yield data
    finally:
        influxdb.drop_database(db)


def first_value(influx: InfluxServer, db: str, key: str, measurements: list[str], cond: str = "") -> str | None:
    values: set[str] = set()
    for m in measurements:
        q = f'SHOW TAG VALUES FROM "{m}" WITH KEY = "{key}"' + (f" WHERE {cond}" if cond else "")
        values.update(r["value"] for r in influx.rows(q, db))
    return min(values) if values else None


def real_values(query: str, influx: InfluxServer, db: str) -> dict[str, str]:
    """A single value per variable, one the query's measurements hold, escaped as Grafana does."""
    measurements = measurements_of(query, known_schema())
    values = {"site": ".*", "agent": ".*", "target": ".*", "model": ".*"}
    conds: list[str] = []
    for key in ("site", "agent", "target", "model"):
        if f"${key}" not in query:
            continue
        value = first_value(influx, db, key, measurements, " AND ".join(conds))
        assert value is not None, f"no {key} values in {measurements}"
        values[key] = grafana_regex_escape(value)
        conds.append(f'"{key}" =~ /^{values[key]}$/')
    return values


def series(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for r in result.get("results", []) for s in r.get("series", []) or []]


@pytest.mark.integration
@pytest.mark.parametrize("query", QUERIES, ids=lambda q: q.id)
def test_query_returns_data(query: Query, filled: Filled) -> None:
    now_ms = time.time_ns() // 1_000_000
    all_values = {"site": ".*", "agent": ".*", "target": ".*", "model": ".*"}
    for label, values in (("all", all_values), ("one", real_values(query.text, filled.influx, filled.db))):
        q = substitute(query.text, values, now_ms)
        got = series(filled.influx.query(q, filled.db))
        assert got, f"{query.id} ({label}): no series for\n{q}"
        if query.ref != "var":
            assert any(v is not None for s in got for row in s["values"] for v in row[1:]), f"{query.id}: all null"


def panel_rows(filled: Filled, dashboard: str, title: str, ref: str = "A") -> list[dict[str, Any]]:
    """The rows a panel's query returns with every variable at All (tags merged into each row)."""
    (query,) = [q for q in QUERIES if q.dashboard == dashboard and q.where == title and q.ref == ref]
    q = substitute(query.text, {"site": ".*", "agent": ".*", "target": ".*", "model": ".*"}, time.time_ns() // 10**6)
    rows = []
    for s in series(filled.influx.query(q, filled.db)):
        for values in s["values"]:
            rows.append(
                {"_measurement": s["name"], **s.get("tags", {}), **dict(zip(s["columns"], values, strict=True))}
            )
    return rows


@pytest.mark.integration
def test_panels_show_what_they_say(filled: Filled) -> None:
    fleet, latency, inference = "edgeprobe-fleet.json", "edgeprobe-latency.json", "edgeprobe-inference.json"
    (online,) = panel_rows(filled, fleet, "Agents online")
    assert online["agents"] == len(AGENTS)

    matrix = panel_rows(filled, latency, "Median RTT: agent × target (ICMP)")
    assert {(r["agent"], r["target"]) for r in matrix} == {(a[0], t) for a in AGENTS for t in TARGET_COORDS}

    failures = panel_rows(filled, fleet, "Failed observations by agent and outcome")
    assert {r["outcome"] for r in failures} >= {"refused", "http_error", "timeout"}, failures

    outcomes = {r["outcome"] for r in panel_rows(filled, inference, "Inference outcomes by kind") if r["count"]}
    assert outcomes >= {"ok", "http_error", "timeout"}, outcomes
    for ref in ("A", "B"):
        assert (
            sum(
                r[c] or 0
                for r in panel_rows(filled, inference, "HTTP 429 and 5xx per endpoint", ref)
                for c in r
                if c in ("429", "5xx")
            )
            > 0
        )

    # The stacked parts of TTFT add up to TTFT less the client's time to write the request.
    parts = ("dns", "connect", "tls", "network (request round trip)", "server")
    breakdown = panel_rows(filled, inference, "TTFT broken down per PoP and endpoint (fresh connections, means)")
    assert len(breakdown) == len(AGENTS) * 2
    for r in breakdown:
        total = sum(r[p] or 0.0 for p in parts)
        assert 0 < total <= r["TTFT"] + 1e-6, r
    expiring = panel_rows(filled, latency, "Certificates expiring soonest")
    assert len(expiring) == len(CERT_DAYS), expiring  # the http:// targets have no certificate
    for r in expiring:
        days = CERT_DAYS["https_expired" if r["cert_expiry_days"] < 0 else "https_valid"]
        assert days - 0.01 < r["cert_expiry_days"] <= days and r["chain_expiry_days"] == r["cert_expiry_days"], r
    assert {r["cert_expiry_days"] < 0 for r in expiring} == {True, False}  # kept from the tls_error runs too
    dns_times = [r for r in panel_rows(filled, latency, "DNS query time by resolver") if r["median"] is not None]
    assert {(r["agent"], r["transport"]) for r in dns_times} == {(a[0], t) for a in AGENTS for t in ("udp", "tcp")}
    medians = [(r["agent"], r["transport"], r["time"], r["median"]) for r in dns_times]
    assert all(0 < r["median"] < 500 for r in dns_times), medians
    for outcome, rcode in (("ok", "NXDOMAIN"), ("dns_error", "REFUSED")):  # NXDOMAIN is an answer, REFUSED is not
        q = f'SELECT count("seq") FROM "edgeprobe_dns" WHERE "outcome" = \'{outcome}\' AND "rcodes" = \'{rcode}\''
        assert _count(filled.influx, filled.db, q) > 0, q
    if "trace" in KINDS:
        path = "edgeprobe-path.json"
        hops = panel_rows(filled, path, "Latest hops")
        assert [r["ttl"] for r in hops] == ["1"] and hops[0]["address"] in ("127.0.0.1", "127.0.0.2"), hops
        assert all(r["loss"] == 0.0 and 0 < r["rtt min"] < 50 for r in hops), hops
        counts = [r["last"] for r in panel_rows(filled, path, "Hop count") if r["last"] is not None]
        assert counts and set(counts) == {1}, counts
        distinct = [r["count"] for r in panel_rows(filled, path, "Distinct paths per interval") if r["count"]]
        assert distinct and set(distinct) == {1}, distinct  # loopback never changes its path
    tiers = panel_rows(filled, inference, "Edge vs core per PoP (time range)")
    assert {(r["site"], r["tier"]) for r in tiers} == {(a[1], t) for a in AGENTS for t in ("edge", "core")}
    print("\nTTFT p50 by site and tier (responders: edge 30 ms, core 90 ms to first token):")
    for r in sorted(tiers, key=lambda r: (r["site"], r["tier"])):
        print(f"  {r['site']} {r['tier']}: {r['ttft_ms']:.1f} ms")
