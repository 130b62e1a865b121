"""A real DNS server for the tests: Debian's ``unbound``, authoritative for a local zone only.

It listens on 127.0.0.1 only (UDP and TCP on one port, DNS over TLS on another, with a
self-signed certificate made by ``openssl``), answers from ``local-data`` for its zones, refuses
every other name (``local-zone: "." refuse``) and never sends a query anywhere
(``do-not-query-localhost``, ``do-not-query-address`` for every address, no forwarding): no test
traffic leaves the machine. Names under ``broken.<zone>`` are handed to the iterator, which may
query nobody: the answer is SERVFAIL. Records change at run time through ``unbound-control`` on a
local socket. Readiness is a real query answered, never a fixed sleep.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode

from edgeprobe.localstack import free_ports

HOST = "127.0.0.1"


def _conf(workdir: Path, port: int, tls_port: int, control: Path, zone: str, records: list[str], tls: bool) -> str:
    lines = [
        "server:",
        f"  interface: {HOST}@{port}",
        f"  port: {port}",
        "  do-ip6: no",
        "  do-daemonize: no",
        '  username: ""',
        '  chroot: ""',
        f'  directory: "{workdir}"',
        f'  pidfile: "{workdir}/unbound.pid"',
        f'  logfile: "{workdir}/unbound.log"',
        "  use-syslog: no",
        "  verbosity: 1",
        "  num-threads: 1",
        "  access-control: 127.0.0.0/8 allow",
        "  do-not-query-localhost: yes",
        "  do-not-query-address: 0.0.0.0/0",
        "  do-not-query-address: ::/0",
        '  module-config: "iterator"',
        "  cache-max-ttl: 0",  # every answer is read from local-data afresh
        '  local-zone: "." refuse',
        f'  local-zone: "{zone}" static',
        f'  local-zone: "broken.{zone}" transparent',
        *(f'  local-data: "{r}"' for r in records),
    ]
    if tls:
        lines += [
            f"  interface: {HOST}@{tls_port}",
            f"  tls-port: {tls_port}",
            f'  tls-service-key: "{workdir}/key.pem"',
            f'  tls-service-pem: "{workdir}/cert.pem"',
        ]
    lines += ["remote-control:", "  control-enable: yes", f'  control-interface: "{control}"']
    return "\n".join(lines) + "\n"


def make_self_signed(workdir: Path, cn: str = HOST) -> None:
    """``key.pem`` and ``cert.pem`` in ``workdir``: self-signed EC P-256 for ``cn`` (an IP SAN)."""
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(workdir / "key.pem"), "-out", str(workdir / "cert.pem"), "-days", "2",
            "-subj", f"/CN={cn}", "-addext", f"subjectAltName=IP:{cn}",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip


@dataclass
class Unbound:
    workdir: Path
    zone: str = "edgeprobe.test."
    records: list[str] = field(default_factory=list)
    tls: bool = True
    port: int = 0
    tls_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def control(self) -> Path:
        return self.workdir / "control.sock"

    @property
    def conf_path(self) -> Path:
        return self.workdir / "unbound.conf"

    def log_tail(self) -> str:
        try:
            return "\n".join((self.workdir / "unbound.log").read_text(errors="replace").splitlines()[-30:])
        except FileNotFoundError:
            return ""

    def start(self, timeout_s: float = 20.0) -> Unbound:
        binary = shutil.which("unbound") or "/usr/sbin/unbound"
        if not Path(binary).exists():
            raise RuntimeError("unbound is not installed (apt-get install unbound; ./run.sh installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.tls:
            make_self_signed(self.workdir)
        self.port, self.tls_port = free_ports(2, HOST)
        self.conf_path.write_text(
            _conf(self.workdir, self.port, self.tls_port, self.control, self.zone, self.records, self.tls)
        )
        self.proc = subprocess.Popen(
            [binary, "-d", "-c", str(self.conf_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        """Poll a real query (the zone's SOA or any answer) until unbound answers it."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        query = dns.message.make_query(self.zone, "SOA")
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"unbound exited with {self.proc.returncode}: {err}\n{self.log_tail()}")
            try:
                answer = dns.query.udp(query, HOST, port=self.port, timeout=0.2)
            except (dns.exception.Timeout, OSError):
                answer = None
            if answer is not None and answer.rcode() == dns.rcode.NOERROR and (not self.tls or self._tls_listening()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"unbound did not answer within {timeout_s} s\n{self.log_tail()}")
            time.sleep(0.02)

    def _tls_listening(self) -> bool:
        try:
            with socket.create_connection((HOST, self.tls_port), timeout=0.2):
                return True
        except OSError:
            return False

    def control_cmd(self, *args: str) -> str:
        out = subprocess.run(
            ["unbound-control", "-c", str(self.conf_path), *args], capture_output=True, text=True, timeout=10
        )
        if out.returncode != 0 or "error" in out.stdout.lower():
            raise RuntimeError(f"unbound-control {' '.join(args)}: {out.stdout} {out.stderr}")
        return out.stdout

    def replace(self, name: str, rtype: str, records: list[str]) -> None:
        """Make ``name``'s ``rtype`` records exactly ``records`` (full local-data lines)."""
        self.control_cmd("local_data_remove", name)
        for r in records:
            self.control_cmd("local_data", r)
        # Other types of the name went with it: put them back from the initial records.
        for r in self.records:
            if r.split()[0] == name and rtype not in r.split():
                self.control_cmd("local_data", r)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None
