"""Benchmark 4: the agent's footprint (CPU share, RSS), import and start-up time.

    .venv/bin/python -m tests.benchmarks.perf_agent [--quick] [--duration-s S] [--only a,b,c,import]

The real agent (``edgeprobe agent run -c …``, a child process) publishing to a real mosquitto, its
spool a SQLite file (default synchronous=full, group commit). /proc/<pid>/stat (utime+stime) and
/proc/<pid>/status (VmRSS, VmHWM) are sampled once a second after a warm-up of one interval.

a. 1,000 ICMP targets (127.0.x.y, loopback) every 10 s, default options (5 echoes 1 s apart).
b. 200 HTTP targets (GET http://127.0.0.1:<port>/health?i=N on the responder, aiohttp) every 30 s.
(--quick: 10 s measured after a 4 s warm-up, so b and c see only part of a round.)
c. 20 inference targets (the responder, OpenAI chat stream, 200 ms TTFT, 32 tokens 20 ms apart) every 60 s.

Import: ``python -X importtime`` of what ``edgeprobe agent run`` imports, and whether scapy was
imported (it must not be). Start-up: from spawning ``edgeprobe agent run`` to its retained
``online`` status on the broker.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgeprobe.localstack import MosquittoServer, free_port
from tests.benchmarks.perf_common import PREFIX, ROOT, ProcSampler, Row, median, pct, table, write_result

EDGEPROBE = str(Path(sys.executable).with_name("edgeprobe"))


class Counter:
    """Counts observations and notes the online status, from a paho subscriber thread."""

    def __init__(self, host: str, port: int) -> None:
        self.observations = 0
        self.messages = 0
        self.online_at: float | None = None
        self.lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-counter")
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.subscribe([(f"{PREFIX}/v1/+/+/obs", 0), (f"{PREFIX}/v1/+/+/status", 0)])
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic.endswith("/status"):
            if b'"online"' in msg.payload and self.online_at is None:
                self.online_at = time.monotonic()
            return
        n = len(msgspec.json.decode(msg.payload).get("observations", []))
        with self.lock:
            self.observations += n
            self.messages += 1

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def agent_yaml(broker_url: str, spool: Path, job: str) -> str:
    return f"""agent:
  id: bench-agent
  site: bench
broker:
  url: {broker_url}
spool:
  path: {spool}
publish:
  replay_max_per_s: 100000
jobs:
{job}"""


def icmp_job(n: int, interval_s: float) -> str:
    targets = [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(n)]
    return f"  - kind: icmp\n    interval_s: {interval_s}\n    targets: [{', '.join(targets)}]\n"


def http_job(n: int, interval_s: float, port: int) -> str:
    targets = [f'"http://127.0.0.1:{port}/health?i={i}"' for i in range(n)]
    return f"  - kind: http\n    interval_s: {interval_s}\n    targets: [{', '.join(targets)}]\n"


def inference_job(n: int, interval_s: float, port: int) -> str:
    targets = [f'"http://127.0.0.1:{port}/v1/chat/completions?i={i}"' for i in range(n)]
    return (
        f"  - kind: inference\n    interval_s: {interval_s}\n    targets: [{', '.join(targets)}]\n"
        "    options: {model: bench}\n"
    )


def run_case(
    name: str,
    job: str,
    interval_s: float,
    duration_s: float,
    mosq: MosquittoServer,
    workdir: Path,
    warm_s: float = 15.0,
) -> Row:
    key = name[0]  # "a", "b", "c"
    cfg = workdir / f"agent-{key}.yaml"
    spool = workdir / f"spool-{key}.db"
    cfg.write_text(agent_yaml(mosq.url, spool, job))
    counter = Counter("127.0.0.1", mosq.port)
    t_spawn = time.monotonic()
    proc = subprocess.Popen([EDGEPROBE, "agent", "run", "-c", str(cfg), "--log-level", "warning"], cwd=ROOT)
    try:
        while counter.online_at is None and proc.poll() is None and time.monotonic() - t_spawn < 30:
            time.sleep(0.01)
        startup_s = (counter.online_at - t_spawn) if counter.online_at is not None else None
        warm = min(interval_s, warm_s)
        time.sleep(warm)  # the first round of every target (scheduler offsets spread them over an interval)
        sampler = ProcSampler(proc.pid)
        obs0 = counter.observations
        t0 = time.monotonic()
        while time.monotonic() - t0 < duration_s and proc.poll() is None:
            sampler.sample()
            time.sleep(1.0)
        cpu = sampler.cpu_ratio()
        wall = time.monotonic() - t0
        obs = counter.observations - obs0
        hwm = sampler.hwm()
        rss = sampler.rss_bytes
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        counter.close()
    return {
        "case": name,
        "measured_s": wall,
        "cpu_core_ratio": cpu,
        "cpu_percent_of_one_core": cpu * 100,
        "rss_median_mb": (median(rss) or 0) / 2**20,
        "rss_max_mb": max(rss, default=0) / 2**20,
        "rss_hwm_mb": hwm / 2**20,
        "observations": obs,
        "obs_per_s": obs / wall,
        "startup_to_online_s": startup_s,
    }


def import_figures() -> dict[str, Any]:
    mods = "import edgeprobe.cli, edgeprobe.agent.config, edgeprobe.agent.daemon, edgeprobe.probes.registry"
    runs: list[float] = []
    scapy = None
    for _ in range(5):
        out = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", f"{mods}; import sys; print('scapy' in sys.modules)"],
            capture_output=True, text=True, cwd=ROOT, check=True,
        )  # fmt: skip
        scapy = out.stdout.strip() == "True"
        total_us = 0
        for line in out.stderr.splitlines():
            m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)
            if m and not m.group(2).startswith(" "):
                total_us += int(m.group(1))
        runs.append(total_us / 1000)
    cli = []
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run([EDGEPROBE, "--help"], capture_output=True, check=True, cwd=ROOT)
        cli.append((time.perf_counter() - t0) * 1000)
    return {"import_ms_median": median(runs), "import_ms_min": min(runs), "scapy_imported": scapy,
            "edgeprobe_help_ms_median": median(cli)}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--duration-s", type=float, default=None, help="measured time per case (default 60; quick 10)")
    ap.add_argument("--only", default="a,b,c,import")
    args = ap.parse_args(argv)
    duration = args.duration_s or (10.0 if args.quick else 60.0)
    warm = 4.0 if args.quick else 15.0
    only = set(args.only.split(","))
    workdir = Path(tempfile.mkdtemp(prefix="edgeprobe-perf-agent-"))
    mosq = MosquittoServer().start()
    port = free_port()
    responder = subprocess.Popen([EDGEPROBE, "responder", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
                                 stderr=subprocess.DEVNULL)  # fmt: skip
    rows: list[Row] = []
    figures: dict[str, Any] = {"quick": args.quick, "duration_s": duration}
    try:
        time.sleep(1.0)
        if "a" in only:
            rows.append(run_case("a: 1,000 icmp / 10 s", icmp_job(1000, 10), 10, duration, mosq, workdir, warm))
        if "b" in only:
            rows.append(run_case("b: 200 http / 30 s", http_job(200, 30, port), 30, duration, mosq, workdir, warm))
        if "c" in only:
            job = inference_job(20, 60, port)
            rows.append(run_case("c: 20 inference / 60 s", job, 60, duration, mosq, workdir, warm))
        if rows:
            print(table(f"4. agent footprint ({duration:.0f} s measured per case after a warm-up)",
                        [("case", "case"), ("cpu_percent_of_one_core", "CPU % of a core"),
                         ("rss_median_mb", "RSS MB"), ("rss_hwm_mb", "peak RSS MB"), ("obs_per_s", "obs/s"),
                         ("startup_to_online_s", "start→online s")], rows))  # fmt: skip
            a = next((r for r in rows if r["case"].startswith("a")), None)
            if a is not None:
                print(f"   goal (a): < 60 MB RSS and < 2 % of one core: RSS {a['rss_hwm_mb']:.1f} MB, "
                      f"CPU {a['cpu_percent_of_one_core']:.2f} %")  # fmt: skip
        figures["cases"] = rows
        if "import" in only:
            imp = import_figures()
            figures["import"] = imp
            print(f"   import of cli+agent.config+daemon+registry: {imp['import_ms_median']:.0f} ms median "
                  f"(-X importtime), scapy imported: {imp['scapy_imported']}; `edgeprobe --help` "
                  f"{imp['edgeprobe_help_ms_median']:.0f} ms")  # fmt: skip
        print("   →", write_result("perf_agent", figures))
    finally:
        responder.terminate()
        responder.wait(10)
        mosq.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    _ = (pct, os)


if __name__ == "__main__":
    main()
