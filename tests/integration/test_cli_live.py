"""The ad-hoc commands as people run them: the real ``edgeprobe`` in a subprocess, its output read
as it comes, Ctrl-C (SIGINT) in the middle. Traffic goes to 127.0.0.1 only.

What we wait on is always a signal: a line on the child's stdout, connections a local listener
accepted, or the kernel's count of echo replies it sent (``/proc/net/snmp``, Icmp OutEchoReps).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.support.paths import REPO
from tests.support.wait import wait_for

EXE = shutil.which("edgeprobe") or str(REPO / ".venv/bin/edgeprobe")
ROUND_S = 0.2  # -i: 20 echoes take about 3.8 s


@dataclass
class Child:
    """A running ``edgeprobe`` whose stdout lines are collected as they arrive, with their times."""

    proc: subprocess.Popen[str]
    started: float
    lines: list[tuple[float, str]] = field(default_factory=list)
    reader: threading.Thread | None = None

    def out(self) -> list[str]:
        return [line for _, line in self.lines]

    def count(self, text: str) -> int:
        return sum(text in line for line in self.out())

    def finish(self, timeout_s: float = 30) -> tuple[int, str, str]:
        code = self.proc.wait(timeout=timeout_s)
        assert self.reader is not None
        self.reader.join(timeout_s)
        assert self.proc.stderr is not None
        return code, "\n".join(self.out()), self.proc.stderr.read()


def start(*args: str) -> Child:
    proc = subprocess.Popen(
        [EXE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"}
    )
    child = Child(proc, time.monotonic())

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:  # as each line comes: the CLI flushes every line
            child.lines.append((time.monotonic(), line.rstrip("\n")))

    child.reader = threading.Thread(target=read, daemon=True)
    child.reader.start()
    return child


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()


def echo_replies_sent() -> int:
    """The kernel's count of ICMP echo replies it sent (loopback answering our pings among them)."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Icmp:")]
    names, values = rows[0], rows[1]
    return int(values[names.index("OutEchoReps")])


def test_ping_prints_each_reply_as_it_comes(children: list[Child]) -> None:
    child = start("ping", "127.0.0.1", "-c", "20", "-i", str(ROUND_S))
    children.append(child)
    wait_for(lambda: child.count("icmp_seq="), 10, "the first reply line")
    first_at = child.lines[-1][0] - child.started
    assert child.proc.poll() is None, "the first reply was printed only when the run ended"
    code, out, err = child.finish()
    ended_at = time.monotonic() - child.started
    assert code == 0, err
    assert out.startswith("PING 127.0.0.1 (127.0.0.1): 56 data bytes over a ")
    assert child.count("reply from 127.0.0.1: icmp_seq=") == 20
    assert "icmp_seq=1 ttl=" in out  # the reply's TTL, where known
    assert "20 packets transmitted, 20 received, 0% packet loss" in out
    assert first_at < ended_at - 10 * ROUND_S, (first_at, ended_at)


def test_ping_interrupted_prints_the_statistics_of_what_was_sent(children: list[Child]) -> None:
    child = start("ping", "127.0.0.1", "-c", "20", "-i", str(ROUND_S))
    children.append(child)
    wait_for(lambda: child.count("icmp_seq="), 10, "three reply lines", until=lambda n: n >= 3)
    child.proc.send_signal(signal.SIGINT)
    code, out, err = child.finish()
    assert code == 0, err  # like iputils ping: interrupted after replies came is success
    assert "Aborted" not in out + err and "Traceback" not in err
    stats = [line for line in child.out() if "packets transmitted" in line]
    assert len(stats) == 1, out
    sent, received = int(stats[0].split()[0]), int(stats[0].split()[3])
    assert 3 <= received <= sent < 20, stats
    assert "rtt min/avg/max/stddev = " in out


def test_ping_interrupted_json_is_the_partial_run(children: list[Child]) -> None:
    before = echo_replies_sent()
    child = start("ping", "127.0.0.1", "-c", "20", "-i", str(ROUND_S), "--json")
    children.append(child)
    wait_for(lambda: echo_replies_sent() - before, 10, "loopback answering 3 echoes", until=lambda n: n >= 3)
    child.proc.send_signal(signal.SIGINT)
    code, out, err = child.finish()
    assert code == 0, err
    doc = json.loads(out)
    assert doc["interrupted"] is True and doc["outcome"] == "ok"
    assert 1 <= doc["received"] <= doc["sent"] < 20
    assert len(doc["rtts_ms"]) == doc["sent"]


@pytest.fixture
def counting_listener() -> Iterator[tuple[int, list[int]]]:
    """A listener on 127.0.0.1 that accepts and counts connections."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[int] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    server.close()


def test_tcp_prints_each_attempt_and_is_interruptible(
    children: list[Child], counting_listener: tuple[int, list[int]]
) -> None:
    port, _ = counting_listener
    child = start("tcp", f"127.0.0.1:{port}", "-c", "20", "-i", str(ROUND_S))
    children.append(child)
    wait_for(lambda: child.count("connected to"), 10, "three attempt lines", until=lambda n: n >= 3)
    assert child.proc.poll() is None
    child.proc.send_signal(signal.SIGINT)
    code, out, err = child.finish()
    assert code == 0, err
    assert out.startswith(f"TCP connect to 127.0.0.1:{port} (127.0.0.1)")
    summary = [line for line in child.out() if " attempts, " in line]
    assert len(summary) == 1 and int(summary[0].split()[0]) < 20, out
    assert "connect min/median/avg/max = " in out


def test_tcp_interrupted_json(children: list[Child], counting_listener: tuple[int, list[int]]) -> None:
    port, accepted = counting_listener
    child = start("tcp", f"127.0.0.1:{port}", "-c", "20", "-i", str(ROUND_S), "--json")
    children.append(child)
    wait_for(lambda: len(accepted), 10, "three connections accepted", until=lambda n: n >= 3)
    child.proc.send_signal(signal.SIGINT)
    code, out, err = child.finish()
    assert code == 0, err
    doc = json.loads(out)
    assert doc["interrupted"] is True
    assert 3 <= doc["received"] <= doc["sent"] < 20 and len(doc["connects_ms"]) == doc["sent"]


@pytest.fixture
def responder() -> Iterator[str]:
    """``edgeprobe responder`` on a free port of 127.0.0.1; its URL, once it says it listens."""
    proc = subprocess.Popen(
        [EXE, "responder", "--port", "0", "--ttft-ms", "20", "--token-interval-ms", "1", "--tokens", "4"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # the signal: "edgeprobe responder on http://127.0.0.1:PORT (…"
        assert line.startswith("edgeprobe responder on http://127.0.0.1:"), line
        yield line.split()[3]
    finally:
        proc.terminate()
        proc.wait(10)


def test_ttft_prints_each_request_and_is_interruptible(children: list[Child], responder: str) -> None:
    child = start("ttft", responder, "-m", "m", "-c", "20", "-i", str(ROUND_S))
    children.append(child)
    wait_for(lambda: child.count("time to first token:"), 20, "two request blocks", until=lambda n: n >= 2)
    assert child.proc.poll() is None
    assert any(line.startswith("request 1/20") for line in child.out())
    child.proc.send_signal(signal.SIGINT)
    code, out, err = child.finish()
    assert code == 0, err
    assert "Aborted" not in out + err and "Traceback" not in err
    assert "interrupted after " in err
    summary = [line for line in child.out() if line.startswith("--- ")]
    assert len(summary) == 1 and " requests to " in summary[0], out
    assert "ttft min/median/max = " in out
