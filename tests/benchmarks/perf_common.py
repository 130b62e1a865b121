"""Shared pieces of the performance benchmarks (``tests/benchmarks/perf_*.py``).

Real envelopes made from the golden samples (``tests/golden``), tables, JSON results, medians, a
collector child process that reports its counters, /proc sampling and InfluxDB counting.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

from edgeprobe.localstack import InfluxServer
from edgeprobe.schema import encode, obs_topic

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
RESULTS = ROOT / "bench-results"
PREFIX = "edgeprobe"
OBS_MEASUREMENTS = ("edgeprobe_icmp", "edgeprobe_tcp", "edgeprobe_http", "edgeprobe_inference")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")

Row = dict[str, Any]

# A realistic mix of kinds per 10 observations: ICMP dominates a fleet, then TCP and HTTP, a little
# inference. Failures come from the golden samples too (timeouts, refused, dns_error, 429).
MIX = ("icmp", "icmp", "icmp", "icmp", "tcp", "tcp", "http", "http", "icmp", "inference")


def golden_observations() -> dict[str, list[dict[str, Any]]]:
    """The golden observations by kind (plain dicts)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(GOLDEN.glob("obs_v1_*.json")):
        for obs in json.loads(path.read_text())["observations"]:
            out.setdefault(obs["kind"], []).append(obs)
    return out


class EnvelopeFactory:
    """Fresh, valid envelopes of real observations: unique ids, unique timestamps (one point each)."""

    def __init__(self, agent: str = "bench-a0", site: str = "bench", base_ns: int | None = None) -> None:
        self.agent = agent
        self.site = site
        self.templates = golden_observations()
        self._counts = {k: 0 for k in self.templates}
        self.seq = 0
        # Timestamps a few minutes in the past, 1 µs apart per agent: every observation is its own point.
        self.base_ns = base_ns if base_ns is not None else time.time_ns() - 600 * 10**9
        self.topic = obs_topic(PREFIX, site, agent)

    def observation(self, kind: str | None = None) -> dict[str, Any]:
        kind = kind or MIX[self.seq % len(MIX)]
        pool = self.templates[kind]
        obs = copy.deepcopy(pool[self._counts[kind] % len(pool)])
        self._counts[kind] += 1
        obs["id"] = uuid.uuid4().hex
        obs["seq"] = self.seq
        obs["started_at_ns"] = self.base_ns + self.seq * 1000
        self.seq += 1
        return obs

    def envelope(self, count: int, *, now_ns: int | None = None) -> dict[str, Any]:
        return {
            "v": 1,
            "agent": self.agent,
            "site": self.site,
            "sent_at_ns": now_ns or time.time_ns(),
            "labels": {"tier": "pop", "region": "eu-west"},
            "observations": [self.observation() for _ in range(count)],
        }

    def payload(self, count: int) -> tuple[bytes, list[str]]:
        env = self.envelope(count)
        return encode(env), [o["id"] for o in env["observations"]]


def make_messages(total: int, per_message: int, agents: int = 50) -> tuple[list[tuple[str, bytes]], int]:
    """``total`` observations in messages of ``per_message`` from ``agents`` agents: (topic, payload) list."""
    factories = [EnvelopeFactory(agent=f"bench-a{i}") for i in range(agents)]
    messages: list[tuple[str, bytes]] = []
    made = 0
    i = 0
    while made < total:
        f = factories[i % agents]
        n = min(per_message, total - made)
        payload, _ = f.payload(n)
        messages.append((f.topic, payload))
        made += n
        i += 1
    return messages, made


# ---- figures -------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def pct(values: Sequence[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(
    title: str,
    columns: Sequence[tuple[str, str]],
    rows: Sequence[Row],
    digits: int = 2,
    formatter: Callable[[Any, int], str] | None = None,
) -> str:
    """A plain-text table of ``rows`` (dicts) with ``columns`` (key, heading); cells via ``formatter``."""
    cell = formatter or fmt
    cells = [[head for _, head in columns]] + [[cell(row.get(key), digits) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(cells[0], widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells[1:]]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    def first(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "os": first(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": sys.version.split()[0],
        "mosquitto": first(["mosquitto", "-h"]),
        "influxd": first(["influxd", "version"]),
    }


def write_result(name: str, figures: dict[str, Any], out_dir: Path | None = None) -> Path:
    out = (out_dir or RESULTS) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), **figures}
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return out


# ---- py-spy --------------------------------------------------------------------------------


def py_spy() -> str:
    """py-spy's path: on PATH or next to this Python (not a dependency: ``pip install py-spy``)."""
    return shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))


def py_spy_stacks(text: str) -> Iterator[tuple[list[str], int]]:
    """(frames, samples) per line of py-spy's raw (collapsed) output, ``frame;frame;… count``,
    frames as ``function (path:line)``; other lines are skipped."""
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if n.isdigit():
            yield stack.split(";"), int(n)


# ---- processes -----------------------------------------------------------------------------


def _ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:  # gone
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and its live descendants, from /proc."""
    ticks = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        ticks += _ticks(p)
        todo += _children(p)
    return ticks / CLK_TCK


class ProcSampler:
    """CPU (utime+stime) and RSS of one process from /proc, between :meth:`start` and :meth:`sample`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.t0 = time.monotonic()
        self.ticks0 = self.ticks()
        self.rss_bytes: list[int] = []

    def ticks(self) -> int:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def hwm(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    def restart(self) -> None:
        self.t0 = time.monotonic()
        self.ticks0 = self.ticks()
        self.rss_bytes.clear()

    def sample(self) -> None:
        self.rss_bytes.append(self.rss())

    def cpu_ratio(self) -> float:
        """CPU seconds per wall second since (re)start: 0.01 = 1 % of one core."""
        return (self.ticks() - self.ticks0) / CLK_TCK / max(1e-9, time.monotonic() - self.t0)


COLLECTOR_YAML = """\
name: {name}
broker:
  url: {mqtt_url}
  client_id: {client_id}
subscription:
  qos: 1
{shared}influx:
  url: {influx_url}
  database: {database}
spool:
  path: {spool}
health_interval_s: 10
"""


def collector_config(
    workdir: Path, name: str, mqtt_url: str, influx_url: str, database: str, shared_group: str | None = None
) -> Path:
    path = workdir / f"{name}.yaml"
    path.write_text(
        COLLECTOR_YAML.format(
            name=name,
            mqtt_url=mqtt_url,
            client_id=f"bench-{name}",
            influx_url=influx_url,
            database=database,
            spool=workdir / f"{name}.spool.sqlite",
            shared=f"  shared_group: {shared_group}\n" if shared_group else "",
        )
    )
    return path


class CollectorProc:
    """A collector in a child process (``perf_collector_proc``) writing its counters to a JSON file."""

    def __init__(self, config: Path, stats_path: Path) -> None:
        self.config = config
        self.stats_path = stats_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> CollectorProc:
        self.stats_path.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.benchmarks.perf_collector_proc", str(self.config), str(self.stats_path)],
            cwd=ROOT,
        )
        deadline = time.monotonic() + 20
        while not self.stats().get("connected"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"collector {self.config} did not connect")
            time.sleep(0.05)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stats(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.stats_path.read_bytes())
            return data
        except (OSError, ValueError):
            return {}

    def stop(self, timeout_s: float = 30.0) -> dict[str, Any]:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.stats()


def wait_for(check: Any, timeout_s: float, poll_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def count_points(influx: InfluxServer, db: str, measurements: Sequence[str] = OBS_MEASUREMENTS) -> int:
    """Points (one per observation id, ids being unique) in the observation measurements of ``db``."""
    total = 0
    for m in measurements:
        rows = influx.rows(f'SELECT count("seq") FROM "{m}"', db)
        total += int(rows[0]["count"]) if rows else 0
    return total


def distinct_ids(influx: InfluxServer, db: str, measurements: Sequence[str] = OBS_MEASUREMENTS) -> int:
    total = 0
    for m in measurements:
        rows = influx.rows(f'SELECT count(distinct("id")) FROM "{m}"', db)
        total += int(rows[0]["count"]) if rows else 0
    return total


def chunks(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def json_default(obj: Any) -> Any:
    return msgspec.to_builtins(obj)
