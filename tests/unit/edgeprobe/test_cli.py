"""The ad-hoc CLI: --json fields, human output, one-line errors and exit codes."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeprobe.cli import main
from tests.support.paths import REPO

PING_FIELDS = {"target", "address", "sent", "received", "loss_ratio", "rtt_min_ms", "rtt_avg_ms", "rtt_max_ms",
               "rtt_stddev_ms", "rtts_ms"}  # fmt: skip
TCP_FIELDS = {"target", "dns_ms", "connect_ms", "connects_ms"}
HTTP_FIELDS = {"url", "status", "dns_ms", "connect_ms", "tls_ms", "ttfb_ms", "total_ms", "bytes"}


class Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello edgeprobe\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return int(port)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """Completes TCP handshakes (the kernel's backlog) but never reads or answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s.getsockname()[1]
    s.close()


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_ping_json_fields() -> None:
    code, out, err = run("ping", "127.0.0.1", "-c", "5", "-i", "0.05", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc.keys() >= PING_FIELDS
    assert doc["target"] == "127.0.0.1" and doc["address"] == "127.0.0.1"
    assert doc["sent"] == 5 and doc["received"] == 5 and doc["loss_ratio"] == 0
    assert len(doc["rtts_ms"]) == 5 and all(r > 0 for r in doc["rtts_ms"])
    assert doc["rtt_min_ms"] <= doc["rtt_avg_ms"] <= doc["rtt_max_ms"]
    assert doc["outcome"] == "ok" and doc["reason"] is None


def test_ping_human_output_looks_like_ping() -> None:
    code, out, _ = run("ping", "::1", "-c", "3", "-i", "0.05")
    assert code == 0
    assert out.startswith("PING ::1 (::1)")
    assert out.count("icmp_seq=") == 3
    assert "3 packets transmitted, 3 received, 0.0% packet loss" in out
    assert "rtt min/avg/max/stddev = " in out


def test_tcp_json_fields(http_port: int) -> None:
    code, out, err = run("tcp", f"127.0.0.1:{http_port}", "-c", "3", "-i", "0.05", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc.keys() >= TCP_FIELDS
    assert len(doc["connects_ms"]) == 3 and all(c > 0 for c in doc["connects_ms"])
    assert doc["connect_ms"] > 0 and doc["dns_ms"] >= 0


def test_http_json_fields(http_port: int) -> None:
    url = f"http://127.0.0.1:{http_port}/"
    code, out, err = run("http", url, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc.keys() >= HTTP_FIELDS
    assert doc["url"] == url and doc["status"] == 200 and doc["bytes"] == len(b"hello edgeprobe\n")
    assert doc["tls_ms"] is None  # plain http: no TLS phase, not a 0
    assert 0 < doc["connect_ms"] <= doc["ttfb_ms"] <= doc["total_ms"]


def test_http_human_output_has_phase_table(http_port: int) -> None:
    code, out, _ = run("http", f"http://127.0.0.1:{http_port}/")
    assert code == 0
    for phase in ("dns", "connect", "tls", "ttfb", "total"):
        assert f"  {phase}" in out
    assert "status 200" in out


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_closed_port_is_refused(closed_port: int) -> None:
    code, out, err = run("tcp", f"127.0.0.1:{closed_port}", "-c", "1", "--json")
    assert code == 1
    assert json.loads(out)["outcome"] == "refused"
    line = one_line_error(err)
    assert line.startswith(f"edgeprobe tcp 127.0.0.1:{closed_port}: refused: ")


def test_closed_port_http_is_refused(closed_port: int) -> None:
    code, _, err = run("http", f"http://127.0.0.1:{closed_port}/")
    assert code == 1
    assert ": refused: " in one_line_error(err)


def test_unresolvable_name_is_a_dns_error() -> None:
    # conftest's guard answers .invalid names with EAI_NONAME: no DNS query leaves the machine
    for args in (["ping", "nonexistent.invalid", "-c", "1"], ["tcp", "nonexistent.invalid:80", "-c", "1"],
                 ["http", "http://nonexistent.invalid/"]):  # fmt: skip
        code, _, err = run(*args)
        assert code == 1, args
        assert ": dns_error: " in one_line_error(err), err


def test_timeout(silent_port: int) -> None:
    code, out, err = run("http", f"http://127.0.0.1:{silent_port}/", "--timeout", "0.5", "--json")
    assert code == 1
    assert json.loads(out)["outcome"] == "timeout"
    assert ": timeout: " in one_line_error(err)


def test_bad_option_is_usage_error() -> None:
    code, _, err = run("ping", "127.0.0.1", "-c", "0")
    assert code == 2
    assert "count" in one_line_error(err)


def test_bad_target_is_usage_error() -> None:
    code, _, err = run("tcp", "127.0.0.1", "--json")
    assert code == 2
    assert "HOST:PORT" in one_line_error(err)
    code, _, err = run("http", "ftp://127.0.0.1/")
    assert code == 2


def test_installed_command_runs(tmp_path: Path) -> None:
    exe = shutil.which("edgeprobe") or str(REPO / ".venv/bin/edgeprobe")
    proc = subprocess.run([exe, "ping", "127.0.0.1", "-c", "2", "-i", "0.05", "--json"],
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["received"] == 2
