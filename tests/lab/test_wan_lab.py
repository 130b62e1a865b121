"""``edgeprobe lab``: up/down leave nothing behind, and pings between sites match physics (needs root).

Each test's lab has a run-specific name (``t<pid>…``), so parallel runs never touch each other's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeprobe.configfile import read_yaml
from edgeprobe.lab import build
from edgeprobe.lab.netns import host_networks, namespaces, pids_in
from edgeprobe.lab.topology import Topology, validate
from tests.support.wait import wait_for

pytestmark = pytest.mark.lab

EXAMPLE = Path(__file__).resolve().parents[2] / "src" / "edgeprobe" / "examples" / "lab-three-sites.yaml"
EDGEPROBE = [sys.executable, "-c", "from edgeprobe.cli import main; main()"]
_count = 0


def lab_name() -> str:
    global _count
    _count += 1
    return f"t{os.getpid()}x{_count}"


def topology_file(tmp_path: Path, name: str) -> Path:
    text = EXAMPLE.read_text(encoding="utf-8").replace("name: tri", f"name: {name}")
    path = tmp_path / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def ours(name: str) -> list[str]:
    return [ns for ns in namespaces() if ns.startswith(f"eplab-{name}-")]


def host_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return sorted(line.split(":")[1].strip() for line in out.splitlines())


def gone(pids: list[int]) -> None:
    """Every pid has exited (killed processes are reaped by init a moment later: wait for that)."""
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), 5.0, f"processes {pids} gone")


def edgeprobe(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*EDGEPROBE, *args], capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture
def up_lab(lab_host: None, tmp_path: Path) -> Iterator[tuple[Topology, str]]:
    name = lab_name()
    path = topology_file(tmp_path, name)
    links_before = host_links()
    proc = edgeprobe("lab", "up", str(path))
    topo = validate(read_yaml(path), str(path), host_networks())
    try:
        yield topo, proc.stdout
    finally:
        build.down(name)
    assert ours(name) == []
    assert host_links() == links_before


def test_up_states_the_link_and_its_accuracy_then_down_leaves_nothing(lab_host: None, tmp_path: Path) -> None:
    name = lab_name()
    path = topology_file(tmp_path, name)
    links_before = host_links()
    out = edgeprobe("lab", "up", str(path)).stdout
    try:
        assert re.search(
            r"links: the (userspace link emulator|kernel's netem).*it adds [+-][\d.]+ ms per round trip", out
        )
        made = ours(name)
        assert len(made) == 6 + 3  # one per node, one per emulated link
        inside = [pid for ns in made for pid in pids_in(ns)]
        if "userspace" in out:
            assert len(inside) == 3  # one emulator per emulated link, each inside its link namespace
        assert host_links() == links_before  # nothing was made in the host's namespace
        listed = edgeprobe("lab", "ls").stdout
        assert f"lab {name} (from {path}" in listed and "h-fra" in listed
        lo = edgeprobe(
            "lab", "exec", "--lab", name, "h-nyc", "--", "ip", "-4", "-o", "addr", "show", "dev", "lo"
        ).stdout
        assert "10.88.0.4/32" in lo
    finally:
        down = edgeprobe("lab", "down", name).stdout
    assert "removed 9 namespaces" in down
    assert ours(name) == []
    assert host_links() == links_before
    gone(inside)
    assert not build.state_path(name).exists()


def test_down_cleans_up_after_a_crash(lab_host: None, tmp_path: Path) -> None:
    name = lab_name()
    topo = validate(read_yaml(topology_file(tmp_path, name)), "t.yaml", host_networks())
    build.up(topo, calibrate=False)
    inside = [pid for ns in ours(name) for pid in pids_in(ns)]
    build.state_path(name).unlink()  # as if `lab up`'s state were lost with the machine's crash
    assert name in edgeprobe("lab", "ls").stdout
    assert "removed 9 namespaces" in edgeprobe("lab", "down", name).stdout
    assert ours(name) == []
    gone(inside)


def test_ping_between_three_sites_matches_floor_times_route_factor(up_lab: tuple[Topology, str]) -> None:
    topo, out = up_lab
    stated = re.search(r"it adds ([+-][\d.]+) ms per round trip \(median\), ([+-][\d.]+) ms at most", out)
    assert stated is not None, out
    added_max_ms = max(0.0, float(stated.group(2)))
    pairs = [("h-nyc", "h-chi"), ("h-nyc", "h-fra"), ("h-chi", "h-fra")]
    got = build.ping_many(topo, pairs, count=20, interval_s=0.02)
    rows = []
    for a, b in pairs:
        path = topo.path(a, b) or []
        expected = topo.expected_rtt_ms(a, b) or 0.0
        measured = got[(a, b)]
        assert measured is not None, (a, b)
        rows.append((a, b, topo.distance_km(a, b), expected, measured[0], measured[1]))
        emulated = sum(lk.emulated for lk in path)
        assert measured[0] >= expected - 0.01, (a, b, measured, expected)  # never faster than the configured light
        # Within the stated accuracy per emulated link on the path, plus 0.5 ms for a busy shared host.
        assert measured[1] - expected <= emulated * added_max_ms + 0.5, (a, b, measured, expected, added_max_ms)
    print("\npair              distance km  expected rtt ms  min ms   avg ms")
    for a, b, km, expected, lo, avg in rows:
        print(f"{a + '–' + b:<18}{km:>11.0f}{expected:>17.3f}{lo:>8.3f}{avg:>9.3f}")


def test_without_privilege_it_is_a_one_line_error(lab_host: None, tmp_path: Path) -> None:
    path = topology_file(tmp_path, lab_name())
    path.chmod(0o644)
    tmp_path.chmod(0o755)
    # Root without capabilities (bounding set emptied): the check is on CAP_NET_ADMIN/CAP_SYS_ADMIN,
    # and uid 0 still reads the checkout wherever it is (a fresh clone in a 0700 mktemp directory
    # is out of reach for an unprivileged uid).
    drop = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]
    proc = subprocess.run([*drop, *EDGEPROBE, "lab", "up", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr == (
        "edgeprobe lab: needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) to create network namespaces\n"
    )
