"""Benchmark 4: the agent's footprint (CPU share, RSS) next to fping's, import and start-up time.

    .venv/bin/python -m tests.benchmarks.perf_agent [--quick] [--duration-s S] [--repeat N]
                                                   [--only a,b,c,d,import] [--no-pin] [--profile]

The real agent (``edgeprobe agent run -c …``, a child process) publishing to a real mosquitto, its
spool a SQLite file (default synchronous=full, group commit), default delivery (``collector``): the
benchmark's subscriber confirms every message on ``…/ack`` as a collector would, so nothing is
re-sent for want of a confirmation. /proc/<pid>/stat (utime+stime) and /proc/<pid>/status (VmRSS,
VmHWM) are sampled once a second after a warm-up of one interval.

a. 1,000 ICMP targets (127.0.x.y, loopback) every 10 s, default options (5 echoes 1 s apart:
   500 echoes/s, 100 obs/s), **side by side with fping** on the same 1,000 targets at the same
   echo rate: ``fping -l -p 2000 -i 1 -q -f FILE`` (every target every 2 s = 500 echoes/s; ``-i 1``
   because fping's default 10 ms between any two pings caps it at 100 echoes/s). Both run through
   the same windows; the CPU of each comes from /proc over the same window; printed: ``agent ÷
   fping`` per window (``--repeat``, default 3), its median and spread. fping's echo rate is
   counted from its own summary. Pinned (``taskset``, unless ``--no-pin``): the agent on the last
   CPU, fping on the first.
b. 200 HTTP targets (GET http://127.0.0.1:<port>/health?i=N on the responder, aiohttp) every 30 s.
c. 20 inference targets (the responder, OpenAI chat stream, 200 ms TTFT, 32 tokens 20 ms apart) every 60 s.
d. 200 TCP connect targets (the responder's port) every 30 s.
(--quick: 10 s measured after a 4 s warm-up, so b, c and d see only part of a round.)
Every case reports CPU per observation (ms of CPU ÷ observations published in the window, the
agent's idle floor included). Case a also reports how long each observation took from its run's
end (``started_at_ns`` + ``duration_ms``) to the benchmark's subscriber: spool commit, autocork
linger and MQTT together (p50/p99 per window).

``--profile``: after case a's windows (so that they are not disturbed), py-spy samples the agent
for one more window (250 Hz, busy samples only; ``pip install py-spy`` into .venv first) and prints
the share of the agent's busy samples per area: the ICMP engine, the probe runs (task, handler,
probe, result, emit), the scheduler's timer, the loop's select, the spool, MQTT and the publisher
(:func:`profile_areas`); the raw profile is kept in bench-results/.

Import: ``python -X importtime`` of what ``edgeprobe agent run`` imports, and whether scapy was
imported (it must not be). Start-up: from spawning ``edgeprobe agent run`` to its retained
``online`` status on the broker.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import selectors
import shutil
import signal
import socket
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
from edgeprobe.schema import DeliveryAck, ack_topic, encode
from tests.benchmarks.perf_common import (
    PREFIX,
    ROOT,
    ProcSampler,
    Row,
    median,
    py_spy,
    py_spy_stacks,
    table,
    write_result,
)

EDGEPROBE = str(Path(sys.executable).with_name("edgeprobe"))


class Counter:
    """Counts observations and notes the online status, from a paho subscriber thread; confirms
    every message on the agent's ``…/ack`` topic as a collector does (delivery ``collector``), so
    the agent deletes what it sent instead of sending it again."""

    def __init__(self, host: str, port: int) -> None:
        self.observations = 0
        self.messages = 0
        self.lags_s: list[float] = []  # per observation: its run's end → here (wall clocks of one host)
        self.online_at: float | None = None
        self.lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-counter")
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.subscribe([(f"{PREFIX}/v1/+/+/obs", 1), (f"{PREFIX}/v1/+/+/status", 0)])
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic.endswith("/status"):
            if b'"online"' in msg.payload and self.online_at is None:
                self.online_at = time.monotonic()
            return
        env = msgspec.json.decode(msg.payload)
        if env.get("batch"):
            ack = DeliveryAck(v=1, agent=env["agent"], site=env["site"], collector="bench",
                              at_ns=time.time_ns(), batches=[env["batch"]])  # fmt: skip
            client.publish(ack_topic(PREFIX, env["site"], env["agent"]), encode(ack), qos=1)
        observations = env.get("observations", [])
        now_ns = time.time_ns()
        lags = [(now_ns - o["started_at_ns"] - o["duration_ms"] * 1e6) / 1e9 for o in observations]
        with self.lock:
            self.observations += len(observations)
            self.messages += 1
            self.lags_s.extend(lags)

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


def tcp_job(ports: Sequence[int], interval_s: float) -> str:
    targets = [f'"127.0.0.1:{port}"' for port in ports]
    return f"  - kind: tcp\n    interval_s: {interval_s}\n    targets: [{', '.join(targets)}]\n"


class Listeners:
    """``n`` TCP listeners on 127.0.0.1 (free ports) that accept and close, on one thread: the
    targets of the tcp case (connect probes need a distinct host:port each)."""

    def __init__(self, n: int) -> None:
        self.sel = selectors.DefaultSelector()
        self.socks = []
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sock.listen(64)
            sock.setblocking(False)
            self.sel.register(sock, selectors.EVENT_READ)
            self.socks.append(sock)
        self.ports = [s.getsockname()[1] for s in self.socks]
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            for key, _ in self.sel.select(0.2):
                with contextlib.suppress(OSError):
                    conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
                    conn.close()

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
        for sock in self.socks:
            sock.close()
        self.sel.close()


def fping_targets(n: int) -> list[str]:
    return [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(n)]


def fping_sent(summary: str) -> int:
    """Echoes sent, summed over fping's per-target summary lines (``… : xmt/rcv/%loss = 5/5/0%``)."""
    return sum(int(m.group(1)) for m in re.finditer(r"xmt/rcv/%loss = (\d+)/", summary))


def cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def pinned(cmd: list[str], cpu: int | None) -> list[str]:
    return cmd if cpu is None or shutil.which("taskset") is None else ["taskset", "-c", str(cpu), *cmd]


def run_case(
    name: str,
    job: str,
    interval_s: float,
    duration_s: float,
    mosq: MosquittoServer,
    workdir: Path,
    warm_s: float = 15.0,
    *,
    repeat: int = 1,
    fping: list[str] | None = None,
    pin: bool = True,
    profile_to: Path | None = None,
) -> Row:
    """One agent for ``repeat`` consecutive windows of ``duration_s``; with ``fping`` (its targets),
    fping runs through the same windows and each window gives a ratio."""
    key = name[0]  # "a", "b", "c", "d"
    cfg = workdir / f"agent-{key}.yaml"
    spool = workdir / f"spool-{key}.db"
    cfg.write_text(agent_yaml(mosq.url, spool, job))
    counter = Counter("127.0.0.1", mosq.port)
    cores = cpus()
    agent_cpu = cores[-1] if pin and len(cores) > 1 else None
    fping_cpu = cores[0] if pin and len(cores) > 1 else None
    t_spawn = time.monotonic()
    proc = subprocess.Popen(pinned([EDGEPROBE, "agent", "run", "-c", str(cfg), "--log-level", "warning"], agent_cpu),
                            cwd=ROOT)  # fmt: skip
    fping_proc: subprocess.Popen[str] | None = None
    windows: list[Row] = []
    fping_rate = None
    try:
        while counter.online_at is None and proc.poll() is None and time.monotonic() - t_spawn < 30:
            time.sleep(0.01)
        startup_s = (counter.online_at - t_spawn) if counter.online_at is not None else None
        if fping is not None:
            targets = workdir / "fping-targets.txt"
            targets.write_text("".join(f"{t}\n" for t in fping))
            per_target_ms = round(interval_s * 1000 / 5)  # 5 echoes per target per interval, like the agent's
            cmd = ["fping", "-l", "-p", str(per_target_ms), "-i", "1", "-q", "-f", str(targets)]
            fping_proc = subprocess.Popen(pinned(cmd, fping_cpu), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          text=True)  # fmt: skip
            fping_t0 = time.monotonic()
        warm = min(interval_s, warm_s)
        time.sleep(warm)  # the first round of every target (scheduler offsets spread them over an interval)
        for _ in range(repeat):
            sampler = ProcSampler(proc.pid)
            fs = ProcSampler(fping_proc.pid) if fping_proc is not None else None
            obs0, lag0 = counter.observations, len(counter.lags_s)
            t0 = time.monotonic()
            while time.monotonic() - t0 < duration_s and proc.poll() is None:
                sampler.sample()
                time.sleep(1.0)
            cpu = sampler.cpu_ratio()
            wall = time.monotonic() - t0
            obs = counter.observations - obs0
            lags = sorted(counter.lags_s[lag0:])
            w: Row = {"cpu_core_ratio": cpu, "observations": obs, "measured_s": wall,
                      "rss_median_mb": (median(sampler.rss_bytes) or 0) / 2**20, "rss_hwm_mb": sampler.hwm() / 2**20,
                      "cpu_ms_per_obs": cpu * wall * 1000 / obs if obs else None,
                      "done_to_subscriber_p50_s": lags[len(lags) // 2] if lags else None,
                      "done_to_subscriber_p99_s": lags[int(len(lags) * 0.99)] if lags else None}  # fmt: skip
            if fs is not None:
                w["fping_cpu_core_ratio"] = fs.cpu_ratio()
                w["fping_rss_mb"] = fs.rss() / 2**20
                w["agent_over_fping"] = cpu / w["fping_cpu_core_ratio"] if w["fping_cpu_core_ratio"] else None
            windows.append(w)
        if profile_to is not None and proc.poll() is None:
            pinned_spy = pinned([py_spy(), "record", "--nonblocking", "--threads", "--rate", "250", "--format", "raw",
                                 "-d", str(round(duration_s)), "-o", str(profile_to), "-p", str(proc.pid)],
                                fping_cpu)  # fmt: skip
            subprocess.run(pinned_spy, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=duration_s + 60)  # fmt: skip
        if fping_proc is not None:
            fping_proc.send_signal(signal.SIGINT)  # prints the per-target summary
            _, err = fping_proc.communicate(timeout=30)
            fping_rate = fping_sent(err) / (time.monotonic() - fping_t0)
    finally:
        if fping_proc is not None and fping_proc.poll() is None:
            fping_proc.kill()
            fping_proc.wait()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        counter.close()
    cpu_all = [w["cpu_core_ratio"] for w in windows]
    row: Row = {
        "case": name,
        "windows": windows,
        "measured_s": sum(w["measured_s"] for w in windows),
        "cpu_core_ratio": median(cpu_all),
        "cpu_percent_of_one_core": (median(cpu_all) or 0) * 100,
        "cpu_percent_min": min(cpu_all, default=0) * 100,
        "cpu_percent_max": max(cpu_all, default=0) * 100,
        "rss_median_mb": median([w["rss_median_mb"] for w in windows]),
        "rss_hwm_mb": max((w["rss_hwm_mb"] for w in windows), default=0),
        "observations": sum(w["observations"] for w in windows),
        "obs_per_s": sum(w["observations"] for w in windows) / max(1e-9, sum(w["measured_s"] for w in windows)),
        "cpu_ms_per_obs": median([w["cpu_ms_per_obs"] for w in windows if w["cpu_ms_per_obs"] is not None]),
        "startup_to_online_s": startup_s,
        "pinned": agent_cpu is not None,
    }
    if fping is not None:
        ratios = [w["agent_over_fping"] for w in windows if w.get("agent_over_fping") is not None]
        fcpu = [w["fping_cpu_core_ratio"] for w in windows]
        row |= {
            "fping_cpu_percent_of_one_core": (median(fcpu) or 0) * 100,
            "fping_rss_mb": median([w["fping_rss_mb"] for w in windows]),
            "fping_echoes_per_s": fping_rate,
            "agent_over_fping_median": median(ratios),
            "agent_over_fping_min": min(ratios, default=None),
            "agent_over_fping_max": max(ratios, default=None),
        }
    return row


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


# Areas of the agent's time, by the first frame of a stack that names one (pure; py-spy's raw
# format: "thread (…);frame;frame … count", frames as "function (path:line)").
PROFILE_AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("spool thread", ("edgeprobe-spool",)),
    ("ICMP engine (timer, reader)", ("EchoSocket._on_timer", "EchoSocket._on_readable")),
    ("probe runs (task, handler, probe, result, emit)", ("Scheduler._run_slot", "run_probe (", "probe (")),
    ("scheduler timer", ("Scheduler._on_due", "Scheduler._arm")),
    ("spool (loop side)", ("spool.py",)),
    ("MQTT and publisher", ("publisher.py", "aiomqtt", "paho", "mqtt.py")),
    ("event loop select", ("EpollSelector.select", "select (selectors")),
)


def profile_areas(text: str) -> dict[str, float]:
    """The share of samples per area of :data:`PROFILE_AREAS` (the rest: "other"), in that order."""
    counts = {name: 0 for name, _ in PROFILE_AREAS} | {"other": 0}
    total = 0
    for frames, n in py_spy_stacks(text):
        total += n
        area = next((name for name, keys in PROFILE_AREAS if any(k in f for f in frames for k in keys)), "other")
        counts[area] += n
    return {name: c / total if total else 0.0 for name, c in counts.items()}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--duration-s", type=float, default=None, help="measured time per window (default 60; quick 10)")
    ap.add_argument(
        "--repeat", type=int, default=None, help="windows of case a, side by side with fping (default 3; quick 1)"
    )
    ap.add_argument("--only", default="a,b,c,d,import")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the agent and fping to CPUs of their own")
    ap.add_argument("--profile", action="store_true", help="py-spy the agent of case a for one more window")
    args = ap.parse_args(argv)
    if args.profile and not Path(py_spy()).exists():
        ap.error("--profile needs py-spy: .venv/bin/pip install py-spy")
    duration = args.duration_s or (10.0 if args.quick else 60.0)
    repeat = args.repeat or (1 if args.quick else 3)
    warm = 4.0 if args.quick else 15.0
    only = set(args.only.split(","))
    workdir = Path(tempfile.mkdtemp(prefix="edgeprobe-perf-agent-"))
    mosq = MosquittoServer().start()
    port = free_port()
    responder = subprocess.Popen([EDGEPROBE, "responder", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
                                 stderr=subprocess.DEVNULL)  # fmt: skip
    listeners = Listeners(200) if "d" in only else None
    rows: list[Row] = []
    figures: dict[str, Any] = {"quick": args.quick, "duration_s": duration, "repeat": repeat}
    kw: dict[str, Any] = {"pin": not args.no_pin}
    try:
        time.sleep(1.0)
        if "a" in only:
            have_fping = shutil.which("fping") is not None
            prof = workdir / "agent-profile.txt" if args.profile else None
            rows.append(run_case("a: 1,000 icmp / 10 s", icmp_job(1000, 10), 10, duration, mosq, workdir, warm,
                                 repeat=repeat, fping=fping_targets(1000) if have_fping else None, profile_to=prof,
                                 **kw))  # fmt: skip
            if prof is not None and prof.exists():
                areas = profile_areas(prof.read_text())
                figures["profile_a"] = areas
                shutil.copy(prof, write_result("perf_agent_profile_raw", {}).with_suffix(".txt"))
                print(f"   (a) py-spy, one more window of {duration:.0f} s, share of the agent's busy samples:")
                for area, share in areas.items():
                    print(f"       {share * 100:5.1f} %  {area}")
        if "b" in only:
            rows.append(
                run_case("b: 200 http / 30 s", http_job(200, 30, port), 30, duration, mosq, workdir, warm, **kw)
            )
        if "c" in only:
            job = inference_job(20, 60, port)
            rows.append(run_case("c: 20 inference / 60 s", job, 60, duration, mosq, workdir, warm, **kw))
        if "d" in only and listeners is not None:
            job = tcp_job(listeners.ports, 30)
            rows.append(run_case("d: 200 tcp / 30 s", job, 30, duration, mosq, workdir, warm, **kw))
        if rows:
            print(table(f"4. agent footprint ({duration:.0f} s measured per window after a warm-up)",
                        [("case", "case"), ("cpu_percent_of_one_core", "CPU % of a core"),
                         ("rss_median_mb", "RSS MB"), ("rss_hwm_mb", "peak RSS MB"), ("obs_per_s", "obs/s"),
                         ("cpu_ms_per_obs", "CPU ms/obs"),
                         ("startup_to_online_s", "start→online s")], rows))  # fmt: skip
            a = next((r for r in rows if r["case"].startswith("a")), None)
            if a is not None and a.get("agent_over_fping_median") is not None:
                each = ", ".join(f"{w['cpu_core_ratio'] * 100:.2f} % ÷ {w['fping_cpu_core_ratio'] * 100:.2f} % = "
                                 f"{w['agent_over_fping']:.2f}" for w in a["windows"])  # fmt: skip
                print(f"   (a) side by side, {len(a['windows'])} window(s) of {duration:.0f} s: {each}")
                fresh = ", ".join(f"{w['done_to_subscriber_p50_s']:.2f}/{w['done_to_subscriber_p99_s']:.2f}"
                                  for w in a["windows"] if w["done_to_subscriber_p50_s"] is not None)  # fmt: skip
                print(f"   (a) run end → at the subscriber, p50/p99 s per window: {fresh}")
                print(f"   (a) fping: {a['fping_echoes_per_s']:.0f} echoes/s, RSS {a['fping_rss_mb']:.1f} MB; "
                      f"agent: {a['obs_per_s'] * 5:.0f} echoes/s")  # fmt: skip
                print(f"   agent ÷ fping = {a['agent_over_fping_median']:.2f} (median; "
                      f"{a['agent_over_fping_min']:.2f}–{a['agent_over_fping_max']:.2f}); goal ≤ 2 and RSS < 60 MB: "
                      f"peak RSS {a['rss_hwm_mb']:.1f} MB")  # fmt: skip
        figures["cases"] = rows
        if "import" in only:
            imp = import_figures()
            figures["import"] = imp
            print(f"   import of cli+agent.config+daemon+registry: {imp['import_ms_median']:.0f} ms median "
                  f"(-X importtime), scapy imported: {imp['scapy_imported']}; `edgeprobe --help` "
                  f"{imp['edgeprobe_help_ms_median']:.0f} ms")  # fmt: skip
        print("   →", write_result("perf_agent", figures))
    finally:
        if listeners is not None:
            listeners.close()
        responder.terminate()
        responder.wait(10)
        mosq.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
