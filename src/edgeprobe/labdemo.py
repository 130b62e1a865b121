"""``edgeprobe demo`` as root: the physics demo on the WAN lab (edge vs core TTFT from real distances).

It builds the lab of ``examples/lab-demo.yaml`` (PoPs with agents in New York, Chicago and
Frankfurt; responders at a New York IXP, a Frankfurt edge site, Ashburn and Council Bluffs, all
with the same server timing), starts mosquitto and influxd on host loopback, an agent inside each
PoP's namespace (its broker is reached through a relay listening on the PoP's own 127.0.0.1: no
host interface is touched), a responder inside each endpoint's namespace, and the collector; the
agents probe every endpoint (icmp, tcp, http, inference, trace) and the live view reads back from
InfluxDB what the collector wrote. At the end (``--duration`` or Ctrl-C) it prints a summary per
PoP, writes it as JSON with ``--summary-json``, and removes the lab and everything it started.

Without the privilege to build namespaces it runs the loopback demo (:mod:`edgeprobe.demo`), and
says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Final

import yaml
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from edgeprobe.configfile import ConfigError, convert, read_yaml
from edgeprobe.demo import DATABASE
from edgeprobe.demo import main as loopback_main
from edgeprobe.lab import build
from edgeprobe.lab.netns import LabError, host_networks, in_netns, lab_problem, listen_in
from edgeprobe.lab.topology import Topology, validate
from edgeprobe.probes.geo import floor_rtt_ms

log = logging.getLogger(__name__)

# The same server-side timing on every responder: differences between endpoints are network only.
SERVER: Final = {"ttft_ms": 40.0, "token_interval_ms": 10.0, "tokens": 16, "seed": 1}
RESPONDER_PORT: Final = 8000
BROKER_PORT_IN_LAB: Final = 1883  # on each PoP's own 127.0.0.1, relayed to the host's mosquitto
# A first token over a fresh plain-HTTP connection needs the TCP handshake and the request's own
# round trip (no TLS here; TLS 1.3 would add one more): TTFT ≈ server TTFT + 2 × RTT.
TTFT_ROUND_TRIPS: Final = 2
EDGEPROBE: Final = [sys.executable, "-m", "edgeprobe"]


def demo_topology_path() -> Path:
    return Path(str(files("edgeprobe") / "examples" / "lab-demo.yaml"))


def load_demo_topology(name: str) -> Topology:
    raw = read_yaml(demo_topology_path())
    raw["name"] = name
    return validate(raw, str(demo_topology_path()), host_networks())


def pops(topo: Topology) -> list[str]:
    return [n.name for n in topo.nodes.values() if n.role == "agent"]


def endpoints(topo: Topology) -> list[str]:
    return [n.name for n in topo.nodes.values() if n.role == "inference"]


def tier(node: str) -> str:
    """edge / region / core, from the node's name (``edge-nyc`` → edge)."""
    return node.split("-", 1)[0]


@dataclass(frozen=True, slots=True)
class Expect:
    """What physics and the configured links say one (PoP, endpoint) pair should show."""

    distance_km: float  # great circle
    floor_rtt_ms: float  # straight fibre over the great circle
    path_rtt_ms: float  # the configured delays along the routed path, both ways
    ttft_ms: float  # server TTFT + TTFT_ROUND_TRIPS × path RTT


def expectations(topo: Topology, server_ttft_ms: float = SERVER["ttft_ms"]) -> dict[tuple[str, str], Expect]:
    out = {}
    for p in pops(topo):
        for e in endpoints(topo):
            km = topo.distance_km(p, e)
            rtt = topo.expected_rtt_ms(p, e) or 0.0
            out[(p, e)] = Expect(km, floor_rtt_ms(km), rtt, server_ttft_ms + TTFT_ROUND_TRIPS * rtt)
    return out


def agent_config(topo: Topology, pop: str, spool: Path, interval_s: float) -> dict[str, Any]:
    """The agent config of one PoP: every kind against every endpoint, with coordinates (pure)."""
    site = topo.sites[topo.nodes[pop].site]
    targets = []
    for e in endpoints(topo):
        es = topo.sites[topo.nodes[e].site]
        targets.append((e, topo.nodes[e].address, {"latitude": es.lat, "longitude": es.lon}))

    def spec(target: str, e: str, where: dict[str, float]) -> dict[str, Any]:
        return {"target": target, **where, "labels": {"endpoint": e, "tier": tier(e)}}

    port = RESPONDER_PORT
    return {
        "agent": {
            "id": pop,
            "site": pop,
            "latitude": site.lat,
            "longitude": site.lon,
            "labels": {"pop": pop},
        },
        "broker": {"url": f"mqtt://127.0.0.1:{BROKER_PORT_IN_LAB}"},
        "spool": {"path": str(spool)},
        "jobs": [
            {
                "kind": "icmp",
                "targets": [spec(a, e, w) for e, a, w in targets],
                "interval_s": interval_s,
                "options": {"count": 5, "interval_s": 0.1, "timeout_s": 1.0},
            },
            {
                "kind": "tcp",
                "targets": [spec(f"{a}:{port}", e, w) for e, a, w in targets],
                "interval_s": interval_s,
                "options": {"count": 3, "interval_s": 0.1, "timeout_s": 0.5},
            },
            {
                "kind": "http",
                "targets": [spec(f"http://{a}:{port}/health", e, w) for e, a, w in targets],
                "interval_s": interval_s,
                "options": {"timeout_s": 2.0},
            },
            {
                "kind": "inference",
                "targets": [spec(f"http://{a}:{port}", e, w) for e, a, w in targets],
                "interval_s": max(interval_s, 5.0),  # a run may take 5 s: net_rtt connect + request + close
                "options": {
                    "model": "demo",
                    "max_tokens": 8,
                    "connection": "new",
                    "timeout_s": 2.0,
                    "first_token_timeout_s": 1.5,
                },
            },
            {
                "kind": "trace",
                "targets": [spec(a, e, w) for e, a, w in targets],
                "interval_s": max(interval_s, 10.0),
                "options": {"queries": 1, "max_hops": 8, "timeout_s": 1.0},
            },
        ],
    }


# ---------------------------------------------------------------- reading back from InfluxDB

QUERIES: Final = {
    "icmp": 'SELECT median("rtt_p50_ms") AS rtt_p50_ms, min("rtt_min_ms") AS rtt_min_ms, '
    'median("jitter_rfc3550_ms") AS jitter_ms, count("seq") AS icmp_n FROM "edgeprobe_icmp"',
    "tcp": 'SELECT median("connect_ms") AS connect_ms, count("seq") AS tcp_n FROM "edgeprobe_tcp"',
    "http": 'SELECT median("ttfb_ms") AS http_ttfb_ms, count("seq") AS http_n FROM "edgeprobe_http"',
    "inference": 'SELECT median("ttft_ms") AS ttft_p50_ms, median("setup_ms") AS setup_ms, '
    'median("server_ms") AS server_ms, median("net_rtt_ms") AS net_rtt_ms, count("ttft_ms") AS ttft_n '
    'FROM "edgeprobe_inference"',
    "trace": 'SELECT last("hop_count") AS hops, count("seq") AS trace_n FROM "edgeprobe_trace"',
}
FAILS: Final = 'SELECT count("seq") AS failed FROM /^edgeprobe_(icmp|tcp|http|inference|trace)$/'


def read_stats(influx: Any, since_ns: int) -> dict[tuple[str, str], dict[str, Any]]:
    """(pop, endpoint) → figures over this run, from what the collector wrote."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    where = f' WHERE time >= {since_ns} AND "outcome" = \'ok\' GROUP BY "pop", "endpoint"'
    for q in QUERIES.values():
        for row in influx.rows(q + where, db=DATABASE):
            key = (str(row.get("pop")), str(row.get("endpoint")))
            out.setdefault(key, {}).update({k: v for k, v in row.items() if k not in ("time", "pop", "endpoint")})
    fail_where = f' WHERE time >= {since_ns} AND "outcome" != \'ok\' GROUP BY "pop", "endpoint"'
    for row in influx.rows(FAILS + fail_where, db=DATABASE):
        key = (str(row.get("pop")), str(row.get("endpoint")))
        slot = out.setdefault(key, {})
        slot["failed"] = int(slot.get("failed", 0)) + int(row.get("failed") or 0)
    return out


# ---------------------------------------------------------------- the summary (pure)


def _r(value: Any, digits: int = 3) -> float | None:
    return round(float(value), digits) if isinstance(value, int | float) else None


def summarize(topo: Topology, stats: Mapping[tuple[str, str], Mapping[str, Any]], mode: str) -> dict[str, Any]:
    """The ``--summary-json`` document: per (PoP, endpoint) figures, per PoP the TTFT ratios."""
    expect = expectations(topo)
    out: dict[str, Any] = {
        "lab": {"name": topo.name, "links": mode, "topology": topo.source},
        "server": {**SERVER, "ttft_round_trips": TTFT_ROUND_TRIPS, "tls": False},
        "pops": {},
    }
    for p in pops(topo):
        per: dict[str, Any] = {}
        for e in endpoints(topo):
            s, x = stats.get((p, e), {}), expect[(p, e)]
            per[e] = {
                "label": topo.nodes[e].label,
                "tier": tier(e),
                "distance_km": _r(x.distance_km, 1),
                "floor_rtt_ms": _r(x.floor_rtt_ms),
                "path_rtt_ms": _r(x.path_rtt_ms),
                "rtt_p50_ms": _r(s.get("rtt_p50_ms")),
                "rtt_min_ms": _r(s.get("rtt_min_ms")),
                "inflation_ratio": _r(s["rtt_min_ms"] / x.floor_rtt_ms)
                if isinstance(s.get("rtt_min_ms"), int | float) and x.floor_rtt_ms >= floor_rtt_ms(1.0)
                else None,
                "jitter_ms": _r(s.get("jitter_ms")),
                "ttft_p50_ms": _r(s.get("ttft_p50_ms")),
                "expected_ttft_ms": _r(x.ttft_ms),
                "setup_ms": _r(s.get("setup_ms")),
                "net_rtt_ms": _r(s.get("net_rtt_ms")),
                "server_ms": _r(s.get("server_ms")),
                "hops": s.get("hops"),
                "runs": {k: int(s.get(f"{k}_n") or 0) for k in ("icmp", "tcp", "http", "ttft", "trace")},
                "failed": int(s.get("failed") or 0),
            }
        out["pops"][p] = {"label": topo.nodes[p].label, "endpoints": per, **_ratios(per)}
    return out


def compare(fast: Mapping[str, Any], slow: Mapping[str, Any]) -> dict[str, float | None]:
    """TTFT ratio slow/fast, measured and expected, and how much of the difference is network
    (1 − the difference of the server shares / the difference of the TTFTs)."""
    diff = slow["ttft_p50_ms"] - fast["ttft_p50_ms"]
    share = None
    if diff > 0 and all(isinstance(v.get("server_ms"), float) for v in (fast, slow)):
        share = round(1.0 - (slow["server_ms"] - fast["server_ms"]) / diff, 3)
    return {
        "ttft_ratio": round(slow["ttft_p50_ms"] / fast["ttft_p50_ms"], 3),
        "expected_ttft_ratio": round(slow["expected_ttft_ms"] / fast["expected_ttft_ms"], 3),
        "network_share_of_difference": share,
    }


def _ratios(per: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per PoP: slowest vs fastest endpoint, and the fastest edge endpoint vs the central one."""
    measured = {e: v["ttft_p50_ms"] for e, v in per.items() if v["ttft_p50_ms"] is not None}
    if len(measured) < 2:
        return {"fastest": None, "slowest": None, "slowest_to_fastest_ttft_ratio": None, "edge_vs_core": None}
    fast, slow = min(measured, key=measured.__getitem__), max(measured, key=measured.__getitem__)
    c = compare(per[fast], per[slow])
    out: dict[str, Any] = {
        "fastest": fast,
        "slowest": slow,
        "slowest_to_fastest_ttft_ratio": c["ttft_ratio"],
        "expected_slowest_to_fastest_ttft_ratio": c["expected_ttft_ratio"],
        "network_share_of_difference": c["network_share_of_difference"],
        "edge_vs_core": None,
    }
    edges = [e for e in measured if tier(e) == "edge"]
    cores = [e for e in measured if tier(e) == "core"]
    if edges and cores:
        edge = min(edges, key=measured.__getitem__)
        out["edge_vs_core"] = {"edge": edge, "core": cores[0], **compare(per[edge], per[cores[0]])}
    return out


def _times(ratio: float | None, expected: float | None) -> str:
    if ratio is None or expected is None:
        return "-"
    if ratio >= 1.0:
        return f"{ratio:.1f}× slower (expected {expected:.1f}×)"
    return f"{1 / ratio:.1f}× faster (expected {1 / expected:.1f}×)"


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """'from New York: edge NYC IXP TTFT 43 ms, central Iowa 88 ms: 2.0× slower; 96 % of the difference
    is network (expected 2.1×)', one per PoP."""
    lines = []
    for p in summary["pops"].values():
        if p["fastest"] is None:
            lines.append(f"from {p['label']}: not enough inference results for a comparison")
            continue
        pairs = [(p["fastest"], p["slowest"])]
        if p["edge_vs_core"] is not None and p["edge_vs_core"]["core"] != p["slowest"]:
            pairs.insert(0, (p["edge_vs_core"]["edge"], p["edge_vs_core"]["core"]))
        parts = []
        for fast, slow in pairs:
            f, s = p["endpoints"][fast], p["endpoints"][slow]
            c = compare(f, s)
            share = c["network_share_of_difference"]
            parts.append(
                f"{f['label']} TTFT {f['ttft_p50_ms']:.0f} ms, {s['label']} {s['ttft_p50_ms']:.0f} ms: "
                + _times(c["ttft_ratio"], c["expected_ttft_ratio"])
                + ("" if share is None else f"; {100 * share:.0f} % of the difference is network")
            )
        lines.append(f"from {p['label']}: " + ";  ".join(parts))
    return lines


def _f(value: Any, digits: int = 1) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:.{digits}f}"


def render(summary: Mapping[str, Any], header: str, footer: str) -> Group:
    table = Table(expand=False)
    cols = ("PoP", "endpoint", "km", "floor RTT", "RTT p50", "inflation", "jitter", "TTFT p50", "× fastest")
    for col in (*cols, "expected", "setup", "server", "hops", "runs", "fail"):
        table.add_column(col, justify="left" if col in ("PoP", "endpoint") else "right")
    for p in summary["pops"].values():
        fastest = p["endpoints"].get(p["fastest"] or "", {}).get("ttft_p50_ms")
        for e in p["endpoints"].values():
            ratio = e["ttft_p50_ms"] / fastest if fastest and e["ttft_p50_ms"] is not None else None
            table.add_row(
                p["label"],
                e["label"],
                _f(e["distance_km"], 0),
                _f(e["floor_rtt_ms"]),
                _f(e["rtt_p50_ms"]),
                _f(e["inflation_ratio"], 2),
                _f(e["jitter_ms"], 2),
                _f(e["ttft_p50_ms"]),
                "-" if ratio is None else f"{ratio:.2f}×",
                _f(e["expected_ttft_ms"]),
                _f(e["setup_ms"]),
                _f(e["server_ms"]),
                "-" if e["hops"] is None else str(e["hops"]),
                str(sum(e["runs"].values())),
                Text(str(e["failed"]), style="red" if e["failed"] else ""),
            )
    return Group(Text(header), table, Text(footer, style="dim"))


# ---------------------------------------------------------------- running it


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


def relay_to(port: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
    """A connection handler that relays to 127.0.0.1:``port`` in this (the host's) namespace."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_w), _pipe(up_r, writer))

    return handle


def wait_listening(ns: str, address: str, port: int, timeout_s: float) -> None:
    """Until something accepts TCP on ``address:port`` inside ``ns`` (LabError after ``timeout_s``)."""

    def attempt() -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex((address, port)) == 0

    deadline = time.monotonic() + timeout_s
    while not in_netns(ns, attempt):
        if time.monotonic() > deadline:
            raise LabError(f"nothing listens on {address}:{port} in {ns} after {timeout_s:.0f} s")
        time.sleep(0.05)


def start_in(lab: str, node: str, argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` inside ``node``'s namespace, its output to ``log_path``."""
    with open(log_path, "wb") as out:
        return subprocess.Popen(
            build.exec_args(lab, node, argv),
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C reaches the demo only, which stops them in order
        )


def check_running(procs: list[subprocess.Popen[bytes]], names: list[str], workdir: Path) -> None:
    """LabError (with the end of its log) when an agent or responder has exited."""
    for proc, name in zip(procs, names, strict=True):
        if proc.poll() is not None:
            tail = (workdir / f"{name}.log").read_text(encoding="utf-8", errors="replace")[-800:]
            raise LabError(f"the process in {name} exited with {proc.returncode}: {tail.strip()}")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)


async def run_lab_demo(
    duration_s: float | None, interval_s: float, console: Console, summary_json: Path | None, lab_name: str
) -> int:
    from edgeprobe.collector.config import CollectorConfig
    from edgeprobe.collector.service import run_collector
    from edgeprobe.localstack import InfluxServer, MosquittoServer

    topo = load_demo_topology(lab_name)
    if lab_name in build.labs_up():
        console.print(f"a lab {lab_name!r} is left from an earlier run: removing it first")
        await asyncio.to_thread(build.down, lab_name)
    console.print(f"[bold]edgeprobe demo[/bold] on the WAN lab: building {len(topo.nodes)} namespaces …")
    result = await asyncio.to_thread(build.up, topo)
    accuracy = result.accuracy.sentence(result.mode) if result.accuracy else f"links: {result.mode}"
    console.print(accuracy, markup=False, highlight=False)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started_ns = time.time_ns()
    procs: list[subprocess.Popen[bytes]] = []
    names: list[str] = []  # the node each of procs runs in
    relays: list[asyncio.Server] = []
    summary: dict[str, Any] = summarize(topo, {}, result.mode)
    workdir = Path(tempfile.mkdtemp(prefix=f"eplab-{lab_name}-"))
    try:
        async with MosquittoServer() as broker, InfluxServer() as influx:
            for e in endpoints(topo):
                argv = [*EDGEPROBE, "responder", "--host", "0.0.0.0", "--port", str(RESPONDER_PORT)]
                argv += ["--ttft-ms", str(SERVER["ttft_ms"]), "--token-interval-ms", str(SERVER["token_interval_ms"])]
                argv += ["--tokens", str(SERVER["tokens"]), "--seed", str(SERVER["seed"]), "--model-suffix", e]
                procs.append(await asyncio.to_thread(start_in, lab_name, e, argv, workdir / f"{e}.log"))
                names.append(e)
            for e in endpoints(topo):
                await asyncio.to_thread(wait_listening, topo.node_ns(e), topo.nodes[e].address, RESPONDER_PORT, 30.0)
            for p in pops(topo):
                sock = await asyncio.to_thread(listen_in, topo.node_ns(p), "127.0.0.1", BROKER_PORT_IN_LAB)
                relays.append(await asyncio.start_server(relay_to(broker.port), sock=sock))
                path = workdir / f"{p}.yaml"
                text = yaml.safe_dump(agent_config(topo, p, workdir / f"{p}.spool", interval_s))
                await asyncio.to_thread(path.write_text, text, "utf-8")
                argv = [*EDGEPROBE, "agent", "run", "-c", str(path)]
                procs.append(await asyncio.to_thread(start_in, lab_name, p, argv, workdir / f"{p}.log"))
                names.append(p)
            ccfg = convert(
                {
                    "broker": {"url": broker.url},
                    "influx": {"api": "v1", "url": influx.url, "database": DATABASE},
                    "spool": {"path": str(workdir / "collector-spool.sqlite")},
                },
                CollectorConfig,
                "demo",
            )
            collector_stop = asyncio.Event()
            collector = asyncio.create_task(run_collector(ccfg, stop=collector_stop))
            grafana = (
                f"Grafana: an InfluxDB data source, query language InfluxQL, URL {influx.url}, database {DATABASE}"
            )
            header = (
                f"{accuracy}\nmosquitto {broker.url}   InfluxDB {influx.url}   server timing on every responder: "
                f"TTFT {SERVER['ttft_ms']:.0f} ms, {SERVER['token_interval_ms']:.0f} ms/token\n{grafana}   "
                "(Ctrl-C stops everything)"
            )
            footer = (
                "km: great circle; floor RTT: straight fibre at c/1.468; inflation: min RTT / floor; expected: "
                f"server TTFT + {TTFT_ROUND_TRIPS} × configured path RTT (TCP handshake + request, no TLS)"
            )
            deadline = None if duration_s is None else loop.time() + duration_s
            try:
                with Live(render(summary, header, footer), console=console, refresh_per_second=2) as live:
                    while not stop.is_set() and (deadline is None or loop.time() < deadline):
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), 2.0)
                        with contextlib.suppress(Exception):
                            stats = await asyncio.to_thread(read_stats, influx, started_ns)
                            summary = summarize(topo, stats, result.mode)
                        live.update(render(summary, header, footer))
                        if not stop.is_set():
                            check_running(procs, names, workdir)
                    await asyncio.to_thread(_stop, procs[len(endpoints(topo)) :])  # the agents flush on SIGTERM
                    await asyncio.sleep(2.0)  # the collector's last batch
                    collector_stop.set()
                    await collector
                    with contextlib.suppress(Exception):
                        summary = summarize(topo, await asyncio.to_thread(read_stats, influx, started_ns), result.mode)
                    live.update(render(summary, header, footer))
            finally:
                collector_stop.set()
                if not collector.done():
                    collector.cancel()
                await asyncio.gather(collector, return_exceptions=True)
    finally:
        for r in relays:
            r.close()
        await asyncio.to_thread(_stop, procs)
        await asyncio.to_thread(build.down, lab_name)
        await asyncio.to_thread(shutil.rmtree, workdir, True)
    console.print()
    for line in summary_lines(summary):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    if summary_json is not None:
        await asyncio.to_thread(summary_json.write_text, json.dumps(summary, indent=1) + "\n", "utf-8")
        console.print(f"summary written to {summary_json}", markup=False, highlight=False)
    left = build.labs_up().get(lab_name, [])
    console.print(
        "stopped: the lab's namespaces, links and processes are removed; nothing is left running."
        if not left
        else f"stopped, but {len(left)} namespaces are left: edgeprobe lab down {lab_name}",
        markup=False,
        highlight=False,
    )
    return 0 if not left else 1


def main(
    duration_s: float | None,
    interval_s: float,
    keep_dir: str | None = None,
    summary_json: str | None = None,
    lab_name: str = "demo",
    *,
    loopback: bool = False,
) -> int:
    """The lab demo when this process may build namespaces, else the loopback demo (saying why)."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=170)
    why = lab_problem()
    if keep_dir is not None:
        why = "--keep keeps the loopback demo's data"
    if loopback:
        why = "--loopback"
    if why is not None:
        console.print(
            f"not running the WAN lab demo: {why}; running the loopback demo instead "
            "(everything on 127.0.0.1: it cannot show distance, only the responders' own timing).",
            markup=False,
            highlight=False,
        )
        return loopback_main(duration_s, interval_s, keep_dir)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    path = None if summary_json is None else Path(summary_json).absolute()
    try:
        return asyncio.run(run_lab_demo(duration_s, interval_s, console, path, lab_name))
    except (LabError, ConfigError) as err:
        console.print(f"edgeprobe demo: {err}", markup=False, highlight=False)
        build.down(lab_name)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the demo's own handler was set (while building the lab)
        build.down(lab_name)
        return 130
