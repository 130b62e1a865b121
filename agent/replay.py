"""The control channel's replay state, kept across restarts (next to the agent's spool).

* Commands: every accepted command's nonce until its document expires. A command recorded on the
  wire and sent again — after a restart too — is refused (``replayed``).
* Central configuration: the highest ``issued_at_ns`` seen per topic. A document older than that is
  refused (``config_replayed``), so re-publishing an old document (retained, while the agent is
  down, or live) can't undo a newer one, a ``fleet clear`` included (a clear is a document too).
  The same document again (the retained copy after a reconnect or restart) is not older: it is
  applied again.

The state is a small JSON file replaced atomically (:func:`edgeprobe.files.write_new_file`, mode
0600, fsynced) after each change and before the change takes effect: a command is recorded before
it runs. Bounded: nonces are dropped when their document expires and there are at most
``max_nonces`` (documents may live at most ``control.max_command_ttl_s``); the file is read only up
to :data:`MAX_FILE_BYTES`. With ``spool.path: null`` (an in-memory agent) the state is in memory
too, like the spool.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Final

import msgspec

from edgeprobe.files import write_new_file

log = logging.getLogger("edgeprobe.agent.replay")

STATE_FILE_NAME: Final = "control-state.json"
MAX_FILE_BYTES: Final = 16 * 1024 * 1024
MAX_TOPICS: Final = 10_000


class ReplayStateError(Exception):
    """The state could not be written (``code`` ``replay_state_error``)."""

    code = "replay_state_error"


class _File(msgspec.Struct, kw_only=True):
    v: int = 1
    nonces: dict[str, int] = {}  # command nonce -> expires_at_ns
    config: dict[str, int] = {}  # config topic -> highest issued_at_ns seen


def state_path_for(spool_path: str | None) -> Path | None:
    """The state file beside the spool file, or None for an in-memory spool."""
    return None if spool_path is None else Path(spool_path).parent / STATE_FILE_NAME


class ReplayState:
    def __init__(self, path: Path | None, *, max_nonces: int = 100_000) -> None:
        self.path = path
        self.max_nonces = max_nonces
        self.load_errors = 0
        self.write_errors = 0
        self._state = self._load()

    def _load(self) -> _File:
        if self.path is None:
            return _File()
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return _File()
        except OSError as err:
            self.load_errors += 1
            log.error("replay state %s: cannot read (%s): starting without it", self.path, err.strerror or err)
            return _File()
        try:
            if len(data) > MAX_FILE_BYTES:
                raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
            state = msgspec.json.decode(data, type=_File)
        except (ValueError, msgspec.DecodeError) as err:
            self.load_errors += 1
            log.error("replay state %s: unreadable (%s): starting without it", self.path, err)
            return _File()
        now = time.time_ns()
        state.nonces = dict(
            sorted(((n, e) for n, e in state.nonces.items() if e > now), key=lambda kv: kv[1])[-self.max_nonces :]
        )
        if len(state.config) > MAX_TOPICS:
            state.config = dict(sorted(state.config.items(), key=lambda kv: kv[1])[-MAX_TOPICS:])
        log.info(
            "replay state %s: %d command nonce(s), %d config topic(s)", self.path, len(state.nonces), len(state.config)
        )
        return state

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_new_file(self.path, msgspec.json.encode(self._state), mode=0o600, replace=True)
        except OSError as err:
            self.write_errors += 1
            log.error("replay state %s: cannot write (%s)", self.path, err.strerror or err)
            raise ReplayStateError(f"cannot write the replay state: {err.strerror or err}") from None

    # ------------------------------------------------------------------ commands

    def seen_command(self, nonce: str) -> bool:
        exp = self._state.nonces.get(nonce)
        return exp is not None and exp > time.time_ns()

    def record_command(self, nonce: str, expires_at_ns: int) -> None:
        """Remember an accepted command's nonce (written before it runs). :class:`ReplayStateError`
        when it can't be written: the caller refuses the command (it could run again after a restart)."""
        now = time.time_ns()
        nonces = {n: e for n, e in self._state.nonces.items() if e > now}
        nonces[nonce] = expires_at_ns
        if len(nonces) > self.max_nonces:
            nonces = dict(sorted(nonces.items(), key=lambda kv: kv[1])[-self.max_nonces :])
        self._state.nonces = nonces
        self._save()

    # ------------------------------------------------------------------ configuration

    def config_is_older(self, topic: str, issued_at_ns: int) -> bool:
        """True when a document issued before ``issued_at_ns`` was already seen on ``topic``."""
        return issued_at_ns < self._state.config.get(topic, issued_at_ns)

    def record_config(self, topic: str, issued_at_ns: int) -> None:
        """Remember the newest document seen on ``topic``. A write failure is logged and counted
        (``write_errors``), not raised: the document still applies; only a restart would forget it."""
        if issued_at_ns <= self._state.config.get(topic, -1):
            return
        self._state.config[topic] = issued_at_ns
        if len(self._state.config) > MAX_TOPICS:
            oldest = min(self._state.config, key=lambda t: self._state.config[t])
            del self._state.config[oldest]
        try:
            self._save()
        except ReplayStateError:
            pass
