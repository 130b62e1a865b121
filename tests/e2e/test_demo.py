"""The README's main command: `edgeprobe demo` runs the whole pipeline and leaves nothing running."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def run_demo(args: list[str], stop_with: signal.Signals | None) -> tuple[int, str, list[int]]:
    exe = str(Path(sys.executable).with_name("edgeprobe"))
    proc = subprocess.Popen([exe, "demo", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen_children: set[int] = set()
    deadline = time.monotonic() + 12
    while time.monotonic() < deadline and proc.poll() is None:
        seen_children.update(children_of(proc.pid))
        time.sleep(0.5)  # a sample of its children every 0.5 s while the demo runs its 10-12 s scenario
    if stop_with is not None and proc.poll() is None:
        proc.send_signal(stop_with)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out, sorted(seen_children)


@pytest.mark.parametrize("stop_with", [None, signal.SIGINT])
def test_demo_runs_the_pipeline_and_stops_clean(stop_with: signal.Signals | None) -> None:
    args = ["--duration", "10"] if stop_with is None else []
    code, out, children = run_demo(args, stop_with)
    assert code == 0, out
    assert re.search(r"InfluxDB http://127\.0\.0\.1:\d+ database", out)
    assert "Grafana: add an InfluxDB data source" in out
    m = re.search(r"stopped: (\d+) observations produced, (\d+) written to InfluxDB", out)
    assert m, out
    produced, written = int(m[1]), int(m[2])
    assert produced >= 8 and written == produced, out  # every kind ran at least once and nothing was lost
    for kind in ("icmp", "tcp", "http", "inference"):
        assert f"│ {kind}" in out
    assert children, "the demo should have started mosquitto and influxd"
    for pid in children:  # mosquitto and influxd are gone
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in Path(f"/proc/{pid}/status").read_text()
