"""The README's main command: `edgeprobe demo` runs the whole pipeline and leaves nothing running."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.support.wait import wait_for

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
    # --loopback: the loopback demo also as root (as root, `edgeprobe demo` builds the WAN lab)
    proc = subprocess.Popen(
        [exe, "demo", "--loopback", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
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
    # mosquitto, influxd and the collector's workers are gone; multiprocessing's resource tracker
    # ends when it reads EOF from the demo's exit, a few milliseconds after the demo itself.
    wait_for(
        lambda: not [p for p in children if alive(p)], 10, lambda: f"the demo's children to end: {still(children)}"
    )


def alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def still(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120])
        except OSError:
            pass
    return out


def test_demo_keep_leaves_the_data_on_fixed_ports_and_says_how_to_see_it(tmp_path: Path) -> None:
    """``--keep DIR``: the data, configs and ports survive the run, the printed steps work: the kept
    influxd starts from the printed command and holds what the demo wrote; a second run reuses the ports."""
    from edgeprobe.localstack import find_binary
    from tests.support.wait import wait_for

    keep = tmp_path / "kept"
    exe = str(Path(sys.executable).with_name("edgeprobe"))
    first = subprocess.run(
        [exe, "demo", "--duration", "6", "--keep", str(keep)], capture_output=True, text=True, timeout=120
    )
    assert first.returncode == 0, first.stdout + first.stderr
    out = first.stdout
    m = re.search(r"stopped: (\d+) observations produced, (\d+) written to InfluxDB", out)
    assert m and int(m[2]) == int(m[1]) >= 4, out
    ports = json.loads((keep / "ports.json").read_text())
    url = f"http://127.0.0.1:{ports['influxd_http']}"
    assert f"InfluxDB {url} database" in out
    influxd = find_binary("influxd")
    command = f"{influxd} -config {keep / 'influxd' / 'influxd.conf'}"
    for step in (command, f"edgeprobe dashboards export {keep / 'grafana'}", f"url: {url}   database: edgeprobe"):
        assert step in out, (step, out)
    assert (keep / "mosquitto" / "mosquitto.db").is_file()  # mosquitto's persistence, saved on exit

    # Step 1 as printed: the kept InfluxDB comes back with the demo's points.
    proc = subprocess.Popen(command.split(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:

        def count() -> int:
            q = urllib.parse.urlencode({"db": "edgeprobe", "q": 'SELECT count("seq") FROM /^edgeprobe_/'})
            try:
                with urllib.request.urlopen(f"{url}/query?{q}", timeout=2) as resp:
                    body = json.loads(resp.read())
            except OSError:
                return 0
            return sum(int(s["values"][0][1]) for s in body["results"][0].get("series", []))

        assert wait_for(count, 30, "the demo's points in the kept InfluxDB") == int(m[2])
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    # Steps 2-4: the export holds the files the steps name.
    export = subprocess.run(
        [exe, "dashboards", "export", str(keep / "grafana")], capture_output=True, text=True, timeout=60
    )
    assert export.returncode == 0, export.stderr
    for rel in ("provisioning/datasources/edgeprobe.yaml", "provisioning/dashboards/edgeprobe.yaml", "import"):
        assert (keep / "grafana" / rel).exists(), rel

    second = subprocess.run(
        [exe, "demo", "--duration", "5", "--keep", str(keep)], capture_output=True, text=True, timeout=120
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"InfluxDB {url} database" in second.stdout and f"127.0.0.1:{ports['mosquitto']}" in second.stdout
    assert json.loads((keep / "ports.json").read_text()) == ports
