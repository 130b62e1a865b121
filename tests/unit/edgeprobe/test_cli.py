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
    assert "3 packets transmitted, 3 received, 0% packet loss" in out
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
    for phase in ("dns", "connect", "ttfb", "total"):
        assert f"  {phase}" in out
    assert "  tls" not in out and " - ms" not in out  # plain http: no TLS phase, not a row of dashes
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


class Redirect(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", "/elsewhere?token=s3cret-value")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def redirect_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_range_errors_name_the_flag_typed() -> None:
    for args, expected in (
        (["ping", "127.0.0.1", "-W", "0"], "edgeprobe ping: -W/--timeout must be ≥ 0.001 s and ≤ 60 s, got 0"),
        (["ping", "127.0.0.1", "-c", "0"], "edgeprobe ping: -c/--count must be ≥ 1 and ≤ 10000, got 0"),
        (["ping", "127.0.0.1", "-t", "256"], "edgeprobe ping: -t/--ttl must be ≥ 1 and ≤ 255, got 256"),
        (["tcp", "127.0.0.1:80", "-i", "0"], "edgeprobe tcp: -i/--interval must be ≥ 0.01 s and ≤ 60 s, got 0"),
    ):
        code, _, err = run(*args)
        assert code == 2, args
        assert one_line_error(err) == expected


def test_help_shows_the_kinds_defaults() -> None:
    from edgeprobe.probes.icmp import IcmpConfig
    from edgeprobe.probes.tcp import TcpConfig

    code, out, _ = run("ping", "--help")
    assert code == 0
    flat = " ".join(out.split())
    d = IcmpConfig()
    for flag, value in (("--count", d.count), ("--interval", d.interval_s),
                        ("--timeout", d.timeout_s), ("--size", d.size_bytes)):  # fmt: skip
        assert f"{flag} " in flat and f"[default: {value}]" in flat, flag
    code, out, _ = run("tcp", "--help")
    assert f"[default: {TcpConfig().timeout_s}]" in " ".join(out.split())


def test_ping_quiet_prints_only_the_first_line_and_the_summary() -> None:
    code, out, _ = run("ping", "127.0.0.1", "-c", "3", "-i", "0.05", "-q")
    assert code == 0
    assert out.startswith("PING 127.0.0.1 (127.0.0.1)") and "icmp_seq=" not in out
    assert "3 packets transmitted, 3 received" in out


def test_ping_ttl_option() -> None:
    code, out, err = run("ping", "127.0.0.1", "-c", "2", "-i", "0.05", "-t", "1", "--json")
    assert code == 0, err  # loopback is 0 hops away: a TTL of 1 reaches it
    assert json.loads(out)["received"] == 2
    code, out, _ = run("ping", "127.0.0.1", "-c", "1", "-t", "7")
    assert out.splitlines()[0].endswith(", ttl 7")


def test_ping_several_targets_at_once() -> None:
    code, out, err = run("ping", "127.0.0.1", "127.0.0.2", "::1", "-c", "3", "-i", "0.05", "-q")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3, out  # one summary line per target (-q: no reply lines)
    for target, line in zip(("127.0.0.1", "127.0.0.2", "::1"), lines, strict=True):
        assert line.startswith(f"{target} : xmt/rcv/%loss = 3/3/0%, min/avg/max = "), line
    code, out, _ = run("ping", "127.0.0.1", "::1", "-c", "2", "-i", "0.05", "--json")
    docs = [json.loads(line) for line in out.splitlines()]
    assert [d["target"] for d in docs] == ["127.0.0.1", "::1"] and all(d["received"] == 2 for d in docs)


def test_several_targets_one_failing_exits_1() -> None:
    code, out, _ = run("ping", "127.0.0.1", "nonexistent.invalid", "-c", "1", "-q")
    assert code == 1
    assert "127.0.0.1 : xmt/rcv/%loss = 1/1/0%" in out
    assert "nonexistent.invalid : dns_error: " in out


def test_http_count_summary(http_port: int) -> None:
    code, out, err = run("http", f"http://127.0.0.1:{http_port}/", "-c", "3", "-i", "0")
    assert code == 0, err
    assert out.count("status 200") == 3
    assert f"--- 3 requests to http://127.0.0.1:{http_port}/: 3 ok ---" in out
    assert "total    min/median/max = " in out and "ttfb     min/median/max = " in out


def test_failure_output_is_quiet_and_has_no_python_none() -> None:
    code, out, err = run("http", "http://nonexistent.invalid/")
    assert code == 1
    assert "None" not in out + err and " - ms" not in out and "?" not in out
    assert out.strip() == "http://nonexistent.invalid/"
    code, out, err = run("ping", "nonexistent.invalid", "-c", "1")
    assert code == 1 and out == ""  # no header nor statistics of nothing; the one error line
    assert "?" not in err and "None" not in err
    assert one_line_error(err).startswith("edgeprobe ping nonexistent.invalid: dns_error: ")  # the command typed


def test_redirect_without_follow_shows_the_location(redirect_port: int) -> None:
    code, out, _ = run("http", f"http://127.0.0.1:{redirect_port}/")
    assert code == 0
    assert "status 302" in out
    assert "redirect to /elsewhere?token=REDACTED (not followed; -L follows redirects)" in out


def test_https_to_a_plain_http_port_suggests_http(http_port: int) -> None:
    code, _, err = run("http", f"https://127.0.0.1:{http_port}/")
    assert code == 1
    line = one_line_error(err)
    assert ": tls_error: " in line and "plain HTTP? try http://" in line


def test_url_mistakes_are_named() -> None:
    code, _, err = run("http", "http://::1:8080/")
    assert code == 2
    assert "an IPv6 address in a URL goes in brackets: http://[::1]:8080/" in one_line_error(err)
    code, _, err = run("http", "http://127.0.0.1:99999/")
    assert code == 2
    assert "invalid port in 'http://127.0.0.1:99999/': 99999 is out of range, expected 1..65535" in one_line_error(err)


def test_fleet_probe_takes_the_ad_hoc_flags_and_aliases() -> None:
    code, _, err = run("fleet", "probe", "ping", "127.0.0.1", "-W", "0", "--broker", "mqtt://127.0.0.1:1")
    assert code == 2
    assert one_line_error(err) == "edgeprobe fleet probe: -W/--probe-timeout must be ≥ 0.001 s and ≤ 60 s, got 0"
    code, _, err = run("fleet", "probe", "tcp", "127.0.0.1:80", "-s", "100", "--broker", "mqtt://127.0.0.1:1")
    assert code == 2 and one_line_error(err) == "edgeprobe fleet probe: -s/--size is not an option of tcp"
    code, _, err = run("fleet", "probe", "ping", "127.0.0.1", "-c", "2", "-o", "count=3")
    assert code == 2 and "-c/--count and -o count= both given" in one_line_error(err)
