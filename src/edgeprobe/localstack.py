"""Real mosquitto and influxd as child processes on free loopback ports, for tests and the demo.

Each server runs from the Debian package's binary (``/usr/sbin/mosquitto`` 2.x,
``/usr/bin/influxd`` 1.6) with a generated config in its own temporary directory, listens only
on 127.0.0.1, and is stopped with SIGTERM (SIGKILL after a grace period). Nothing here touches
the system services that the packages may have started on their default ports.

Use either form::

    async with MosquittoServer() as broker, InfluxServer() as influx:
        ...  # broker.url == "mqtt://127.0.0.1:PORT", influx.url == "http://127.0.0.1:PORT"

    broker = MosquittoServer().start()   # sync, e.g. from a pytest session fixture
    ...
    broker.stop()

Children are started in their own session (a terminal Ctrl-C reaches only our process, whose
teardown stops them) and, on Linux, get SIGKILL if the thread that started them dies, so none
outlives the process that started it. Start servers from a long-lived thread (the main thread,
or the event loop's thread for ``astart``). An ``atexit`` hook stops any server left running.

The HTTP client for InfluxDB uses only the standard library (``urllib``), so importing this
module costs nothing; its calls block, which is fine in tests and set-up code.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Final, Self

HOST = "127.0.0.1"
_SEARCH_DIRS = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin", "/sbin", "/bin")
_START_TRIES = 3
_POLL_INTERVAL_S = 0.05
_ADDRESS_IN_USE = re.compile(r"address already in use", re.IGNORECASE)


class LocalStackError(RuntimeError):
    """A local server could not be found, started or used."""


class BinaryNotFoundError(LocalStackError):
    """The server's binary is not installed; the message says which package to install."""


class ServerStartError(LocalStackError):
    """The server did not become ready; the message ends with the tail of its log."""


class InfluxError(LocalStackError):
    """InfluxDB answered a query or write with an error (``status`` is the HTTP status)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _AddressInUseError(Exception):
    """The server exited because one of its ports was taken (a free-port race)."""


def find_binary(name: str) -> str | None:
    """Path of executable ``name`` on PATH or in the usual system dirs (sbin is often off PATH)."""
    found = shutil.which(name)
    if found is not None:
        return found
    for directory in _SEARCH_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` distinct TCP ports that were free on ``host`` a moment ago (bind port 0, close)."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def free_port(host: str = HOST) -> int:
    """One TCP port that was free on ``host`` a moment ago."""
    return free_ports(1, host)[0]


def _tail(path: Path, offset: int = 0, max_lines: int = 40) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return ""
    lines = data.decode("utf-8", errors="replace").splitlines()
    return "\n".join(lines[-max_lines:])


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _make_preexec() -> Callable[[], None] | None:
    """A child-side hook asking the kernel to SIGKILL the child when its parent thread dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    parent_pid = os.getpid()

    def set_parent_death_signal() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL))
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return set_parent_death_signal


_LIVE: set[_ServerProcess] = set()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_LIVE):
        server.stop_grace_s = min(server.stop_grace_s, 2.0)
        server.stop()


class _ServerProcess:
    """Shared process handling: spawn, readiness polling, stop, restart, pause/resume."""

    name: ClassVar[str]
    binary_name: ClassVar[str]
    package: ClassVar[str]
    scheme: ClassVar[str]

    def __init__(
        self,
        *,
        port: int | None = None,
        keep: bool = False,
        workdir: str | os.PathLike[str] | None = None,
        start_timeout_s: float = 20.0,
        stop_grace_s: float = 10.0,
        binary: str | None = None,
    ) -> None:
        self.host = HOST
        self.keep = keep
        # A directory of the caller's (created if missing, never removed): with a fixed port, the
        # server's data and config outlive the process, e.g. `edgeprobe demo --keep DIR`.
        self._given_workdir = Path(workdir) if workdir is not None else None
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self.paused = False
        self._binary = binary
        self._fixed_port = port
        self._port = port
        self._workdir: Path | None = None
        self._state_kept = False  # stopped with keep_state: the next start reuses workdir and port
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offsets: dict[Path, int] = {}

    # ----- attributes -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise LocalStackError(f"{self.name}: no port yet (not started)")
        return self._port

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise LocalStackError(f"{self.name}: no workdir (not started, or stopped)")
        return self._workdir

    @property
    def log_path(self) -> Path:
        """The server's own log."""
        return self.workdir / f"{self.name}.log"

    @property
    def output_path(self) -> Path:
        """Where the child's stdout and stderr go (the same file as the log for influxd)."""
        return self.workdir / f"{self.name}.out"

    @property
    def config_path(self) -> Path:
        return self.workdir / f"{self.name}.conf"

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs (paused counts as running), else None."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host}:{self._port} {state}>"

    # ----- for subclasses ---------------------------------------------------------------------

    def _allocate_ports(self) -> None:
        self._port = free_port(self.host)

    def _write_config(self) -> None:
        raise NotImplementedError

    def _command(self, binary: str) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        """True once the server answers; called repeatedly while the child is alive."""
        raise NotImplementedError

    def _child_env(self) -> dict[str, str]:
        return dict(os.environ)

    # ----- lifecycle --------------------------------------------------------------------------

    def start(self) -> Self:
        """Start on free ports (or the fixed ``port``) and wait until ready. Returns self."""
        if self._state_kept:
            self._state_kept = False
            self._run_attempts(new_ports=False)
            return self
        self._prepare_start()
        try:
            self._run_attempts(new_ports=self._fixed_port is None)
        except BaseException:
            self._remove_workdir()
            raise
        return self

    async def astart(self) -> Self:
        """``start`` without blocking the event loop (the child is spawned in the loop's thread)."""
        if self._state_kept:
            self._state_kept = False
            await self._arun_attempts(new_ports=False)
            return self
        self._prepare_start()
        try:
            await self._arun_attempts(new_ports=self._fixed_port is None)
        except BaseException:
            await asyncio.to_thread(self._remove_workdir)
            raise
        return self

    def stop(self, *, keep_state: bool = False) -> None:
        """SIGTERM, wait ``stop_grace_s``, SIGKILL; then remove the workdir unless ``keep``.

        With ``keep_state`` the workdir and port stay, and the next ``start`` comes back with the
        persisted state (mosquitto's sessions and queues, InfluxDB's data): an outage, not a reset.
        """
        self._terminate()
        if keep_state:
            self._state_kept = True
        else:
            self._state_kept = False
            self._remove_workdir()

    async def astop(self, *, keep_state: bool = False) -> None:
        await asyncio.to_thread(lambda: self.stop(keep_state=keep_state))

    def restart(self) -> None:
        """Stop and start again on the same port(s) and workdir, so persisted state survives."""
        self._require_started()
        self._terminate()
        self._run_attempts(new_ports=False)

    async def arestart(self) -> None:
        self._require_started()
        await asyncio.to_thread(self._terminate)
        await self._arun_attempts(new_ports=False)

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open but nothing is answered."""
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self._signal(signal.SIGCONT)
        self.paused = False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await self.astart()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.astop()

    # ----- internals --------------------------------------------------------------------------

    def _require_started(self) -> None:
        if self._workdir is None or self._port is None:
            raise LocalStackError(f"{self.name}: not started")

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is None or not self.running:
            raise LocalStackError(f"{self.name}: not running")
        self._proc.send_signal(sig)

    def _prepare_start(self) -> None:
        if self.running:
            raise LocalStackError(f"{self!r} is already running")
        self._binary = self._binary or find_binary(self.binary_name)
        if self._binary is None:
            raise BinaryNotFoundError(
                f"{self.binary_name} not found: apt-get install {self.package} (./run.sh test installs it)"
            )
        if self._given_workdir is not None:
            self._given_workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._workdir = self._given_workdir
        else:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"edgeprobe-{self.name}-"))

    def _spawn(self, new_ports: bool) -> None:
        assert self._binary is not None
        if new_ports:
            self._allocate_ports()
        self._write_config()
        self._log_offsets = {p: _file_size(p) for p in {self.log_path, self.output_path}}
        with self.output_path.open("ab") as out:
            self._proc = subprocess.Popen(
                self._command(self._binary),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self._child_env(),
                start_new_session=True,
                preexec_fn=_make_preexec(),  # only calls prctl, resolved before the fork
            )
        _LIVE.add(self)

    def _new_output(self) -> str:
        """Everything the child logged since it was spawned."""
        return "\n".join(_tail(p, off, max_lines=10_000) for p, off in self._log_offsets.items())

    def _log_tail(self) -> str:
        parts = []
        for path, offset in self._log_offsets.items():
            text = _tail(path, offset)
            if text:
                parts.append(f"--- {path} ---\n{text}")
        return "\n".join(parts) or "(no log output)"

    def _check_started(self) -> bool:
        """True when ready, False while still starting; raises if the child died."""
        assert self._proc is not None
        code = self._proc.poll()
        if code is None:
            return self._ready()
        if _ADDRESS_IN_USE.search(self._new_output()):
            raise _AddressInUseError
        raise ServerStartError(
            f"{self.name} exited with code {code} while starting on port {self._port}.\n{self._log_tail()}"
        )

    def _timed_out(self) -> ServerStartError:
        tail = self._log_tail()
        self._terminate()
        return ServerStartError(
            f"{self.name} not ready after {self.start_timeout_s:.0f} s on port {self._port}.\n{tail}"
        )

    def _after_failed_attempt(self, attempt: int, new_ports: bool) -> float:
        """Reap the child after a port race; return the pause before the next try."""
        tail = self._log_tail()
        self._terminate()
        if attempt == _START_TRIES - 1:
            raise ServerStartError(f"{self.name}: address in use {_START_TRIES} times.\n{tail}")
        return 0.0 if new_ports else 0.3

    def _run_attempts(self, new_ports: bool) -> None:
        for attempt in range(_START_TRIES):
            try:
                self._spawn(new_ports)
                deadline = time.monotonic() + self.start_timeout_s
                while not self._check_started():
                    if time.monotonic() > deadline:
                        raise self._timed_out()
                    time.sleep(_POLL_INTERVAL_S)
                return
            except _AddressInUseError:
                time.sleep(self._after_failed_attempt(attempt, new_ports))
            except BaseException:
                self._terminate()
                raise

    async def _arun_attempts(self, new_ports: bool) -> None:
        for attempt in range(_START_TRIES):
            try:
                self._spawn(new_ports)
                deadline = time.monotonic() + self.start_timeout_s
                while not await asyncio.to_thread(self._check_started):
                    if time.monotonic() > deadline:
                        raise self._timed_out()
                    await asyncio.sleep(_POLL_INTERVAL_S)
                return
            except _AddressInUseError:
                await asyncio.sleep(self._after_failed_attempt(attempt, new_ports))
            except BaseException:
                self._terminate()
                raise

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        _LIVE.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            if self.paused:
                proc.send_signal(signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
            try:
                proc.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.paused = False

    def _remove_workdir(self) -> None:
        if self._workdir is not None and not self.keep and self._given_workdir is None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


# deploy/mosquitto/mosquitto.conf's max_packet_size: 1 MiB of payload (the collector's default
# limits.max_message_bytes) + 4 KiB for the topic and headers (tests/integration/test_compose.py checks
# they agree).
MAX_PACKET_SIZE: Final = 1024 * 1024 + 4096


class MosquittoServer(_ServerProcess):
    """A real mosquitto 2.x broker on ``127.0.0.1:port``, persistence on in its workdir.

    ``extra_config`` lines go after the ``listener`` line, so listener options (cafile, certfile,
    ...) apply to it; a further listener needs its own ``listener PORT 127.0.0.1`` line (see
    :func:`free_port`). Set anonymous access with ``allow_anonymous``, not in ``extra_config``.
    ``log_all`` turns on ``log_type all`` (every packet) instead of mosquitto's default types.
    ``max_packet_size`` is the shipped broker's (deploy/mosquitto/mosquitto.conf), so tests run
    like production; None: no limit. ``persistence=False``: nothing is written to disk, so a
    restart (or a crash) loses every session and queued message, as a broker without persistence
    or killed before its autosave does.
    """

    name = "mosquitto"
    binary_name = "mosquitto"
    package = "mosquitto"
    scheme = "mqtt"
    _RUNNING = re.compile(r"mosquitto version \S+ running")
    _DEFAULT_LOG_TYPES = ("error", "warning", "notice", "information")

    def __init__(
        self,
        *,
        port: int | None = None,
        allow_anonymous: bool = True,
        extra_config: Sequence[str] = (),
        log_all: bool = False,
        max_packet_size: int | None = MAX_PACKET_SIZE,
        persistence: bool = True,
        keep: bool = False,
        workdir: str | os.PathLike[str] | None = None,
        start_timeout_s: float = 20.0,
        stop_grace_s: float = 10.0,
        binary: str | None = None,
    ) -> None:
        super().__init__(
            port=port,
            keep=keep,
            workdir=workdir,
            start_timeout_s=start_timeout_s,
            stop_grace_s=stop_grace_s,
            binary=binary,
        )
        self.allow_anonymous = allow_anonymous
        self.extra_config = list(extra_config)
        self.log_all = log_all
        self.max_packet_size = max_packet_size
        self.persistence = persistence

    def _write_config(self) -> None:
        lines = ["# generated by edgeprobe.localstack"]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to user mosquitto, who cannot write the workdir
        lines += [
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            f"log_dest file {self.log_path}",
            *(f"log_type {t}" for t in (("all",) if self.log_all else self._DEFAULT_LOG_TYPES)),
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "connection_messages true",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            *([f"max_packet_size {self.max_packet_size}"] if self.max_packet_size else []),
            "set_tcp_nodelay true",  # as deploy/mosquitto/mosquitto.conf: no 40 ms Nagle delay on confirmations
            f"listener {self.port} {self.host}",
            *self.extra_config,
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def _command(self, binary: str) -> list[str]:
        return [binary, "-c", str(self.config_path)]

    def _ready(self) -> bool:
        if not self._RUNNING.search(_tail(self.log_path, self._log_offsets.get(self.log_path, 0))):
            return False
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0):
                return True
        except OSError:
            return False


class InfluxServer(_ServerProcess):
    """A real influxd 1.6 with its HTTP API on ``127.0.0.1:port`` and RPC on ``rpc_port``.

    Reporting, the ``_internal`` monitor store, the query log and the HTTP request log are off.
    Queries and writes use the v1 HTTP API (``/query``, ``/write``) through ``urllib``.
    """

    name = "influxd"
    binary_name = "influxd"
    package = "influxdb"
    scheme = "http"

    def __init__(
        self,
        *,
        port: int | None = None,
        rpc_port: int | None = None,
        keep: bool = False,
        workdir: str | os.PathLike[str] | None = None,
        start_timeout_s: float = 20.0,
        stop_grace_s: float = 10.0,
        binary: str | None = None,
    ) -> None:
        super().__init__(
            port=port,
            keep=keep,
            workdir=workdir,
            start_timeout_s=start_timeout_s,
            stop_grace_s=stop_grace_s,
            binary=binary,
        )
        if port is not None and rpc_port is None:
            rpc_port = free_port(self.host)
        self._rpc_port = rpc_port

    @property
    def rpc_port(self) -> int:
        if self._rpc_port is None:
            raise LocalStackError(f"{self.name}: no rpc port yet (not started)")
        return self._rpc_port

    @property
    def output_path(self) -> Path:
        return self.log_path

    def _allocate_ports(self) -> None:
        self._port, self._rpc_port = free_ports(2, self.host)

    def _child_env(self) -> dict[str, str]:
        # influxd lets INFLUXDB_* variables override its config file: keep ours authoritative.
        return {k: v for k, v in os.environ.items() if not k.startswith("INFLUXDB_")}

    def _write_config(self) -> None:
        w = self.workdir
        self.config_path.write_text(
            "# generated by edgeprobe.localstack\n"
            "reporting-disabled = true\n"
            f'bind-address = "{self.host}:{self.rpc_port}"\n'
            f'[meta]\n  dir = "{w}/meta"\n  logging-enabled = false\n'
            f'[data]\n  dir = "{w}/data"\n  wal-dir = "{w}/wal"\n  query-log-enabled = false\n'
            "[monitor]\n  store-enabled = false\n"
            f'[http]\n  bind-address = "{self.host}:{self.port}"\n  log-enabled = false\n'
            "[continuous_queries]\n  log-enabled = false\n"
            "[logging]\n  suppress-logo = true\n"
        )

    def _command(self, binary: str) -> list[str]:
        return [binary, "-config", str(self.config_path)]

    def _ready(self) -> bool:
        return self.ping(timeout_s=1.0)

    # ----- v1 HTTP API ------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None = None,
        body: bytes | None = None,
        timeout_s: float = 10.0,
    ) -> tuple[int, bytes]:
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        req = urllib.request.Request(url, data=body, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as err:
            with err:
                return int(err.code), bytes(err.read())

    @staticmethod
    def _error_text(body: bytes) -> str:
        try:
            decoded = json.loads(body)
        except ValueError:
            return body.decode("utf-8", errors="replace").strip()
        if isinstance(decoded, dict) and "error" in decoded:
            return str(decoded["error"])
        return body.decode("utf-8", errors="replace").strip()

    def query(
        self, q: str, db: str | None = None, *, epoch: str | None = None, timeout_s: float = 10.0
    ) -> dict[str, Any]:
        """Run InfluxQL (POST /query) and return the decoded JSON; raise InfluxError on any error.

        ``epoch`` ("ns", "ms", "s", ...) returns times as integers instead of RFC 3339 strings.
        """
        params = {"q": q}
        if db is not None:
            params["db"] = db
        if epoch is not None:
            params["epoch"] = epoch
        status, body = self._request("POST", "/query", params, timeout_s=timeout_s)
        if status != 200:
            raise InfluxError(f"query {q!r} failed ({status}): {self._error_text(body)}", status)
        decoded: dict[str, Any] = json.loads(body)
        for result in decoded.get("results", []):
            if "error" in result:
                raise InfluxError(f"query {q!r} failed: {result['error']}", status)
        return decoded

    def rows(self, q: str, db: str | None = None, *, epoch: str | None = None) -> list[dict[str, Any]]:
        """The first statement's series flattened into dicts (column -> value, plus group tags)."""
        out: list[dict[str, Any]] = []
        results = self.query(q, db, epoch=epoch).get("results", [])
        for series in results[0].get("series", []) if results else []:
            tags = series.get("tags", {})
            for values in series.get("values", []):
                out.append({**tags, **dict(zip(series["columns"], values, strict=True))})
        return out

    def write(self, lines: str, db: str, *, precision: str = "ns", timeout_s: float = 10.0) -> None:
        """Write line protocol (POST /write); raise InfluxError unless the server answers 204."""
        params = {"db": db, "precision": precision}
        status, body = self._request("POST", "/write", params, lines.encode(), timeout_s=timeout_s)
        if status != 204:
            raise InfluxError(f"write to {db!r} failed ({status}): {self._error_text(body)}", status)

    def create_database(self, name: str) -> None:
        self.query(f"CREATE DATABASE {quote_ident(name)}")

    def drop_database(self, name: str) -> None:
        self.query(f"DROP DATABASE {quote_ident(name)}")

    def ping(self, timeout_s: float = 2.0) -> bool:
        """True if GET /ping answers 204 within ``timeout_s``."""
        try:
            status, _ = self._request("GET", "/ping", timeout_s=timeout_s)
        except OSError:
            return False
        return status == 204


def quote_ident(name: str) -> str:
    """An InfluxQL identifier in double quotes, with backslash and quote escaped."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
