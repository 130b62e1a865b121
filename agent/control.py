"""The agent's control channel: signed ad-hoc requests and central configuration from the broker.

Topics (``<p>`` is ``broker.topic_prefix``):

* ``<p>/v1/<site>/<agent>/cmd`` — ad-hoc requests for this agent (:class:`AdhocCommand`, signed
  ``cmd``). The CLI picks the agents and sends each its own command naming it, so a command
  can't be redirected to another agent. The answer (:class:`edgeprobe.schema.CommandReply`) goes to
  ``<p>/v1/results/<request_id>/<agent>``; the observation also goes the normal way (spool →
  obs → InfluxDB) with ``job="adhoc"`` and the label (tag) ``request_id``.
* ``<p>/v1/<site>/<agent>/config`` (retained) and ``<p>/v1/config/group/<name>`` (retained):
  :class:`ConfigDocument` s, signed ``config``. A group document applies when its ``where``
  labels all match (``site`` and ``agent`` match the agent's site and id). Jobs of all documents
  in force run next to the local file's jobs, validated exactly like them (``build_jobs`` over
  local + central jobs), then against the agent's local policy (:mod:`edgeprobe.agent.policy`):
  every target of the document's jobs (addresses, deny/allow), packets per run, the environment
  variables a job reads, and the runs per second of all central jobs together. A document that
  fails is refused whole (``config_invalid``, or ``config_policy`` with every refused target),
  reported in the status (``config_error``), and the last good version of it keeps running.

Ad-hoc requests and central jobs run with a :class:`ProbeContext` that checks every address a
probe connects to against the policy (redirect hops, names resolved again): ``policy_refused``.

Every refusal is answered (commands), counted by code and shown in the retained status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import Counter
from typing import Any

import aiomqtt
import msgspec

from edgeprobe.agent.config import AgentConfig, Job, JobConfig, build_jobs
from edgeprobe.agent.policy import PolicyRefusal, TargetPolicy
from edgeprobe.agent.publisher import agent_client_ids
from edgeprobe.agent.replay import ReplayState, ReplayStateError, state_path_for
from edgeprobe.agent.scheduler import Scheduler
from edgeprobe.configfile import ConfigError, convert
from edgeprobe.mqtt import run_session
from edgeprobe.probes.context import ProbeContext
from edgeprobe.probes.handler import hide_in_text, run_probe
from edgeprobe.probes.registry import find_kind
from edgeprobe.schema import (
    NAME_RE,
    SCHEMA_VERSION,
    CommandReply,
    Observation,
    cmd_topic,
    config_topic,
    encode,
    group_config_topic,
    result_topic,
)
from edgeprobe.signing import SignatureError, Signed, Verifier, load_public_key

log = logging.getLogger("edgeprobe.agent.control")

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ADHOC_JOB = "adhoc"


class AdhocCommand(Signed, kw_only=True, forbid_unknown_fields=True):
    request_id: str
    agent: str  # the one agent this command is for
    kind: str
    target: str
    options: dict[str, Any] = msgspec.field(default_factory=dict)


class ConfigDocument(Signed, kw_only=True, forbid_unknown_fields=True):
    topic: str  # the topic it was published to: a document moved elsewhere is refused
    # group documents: labels the agent must have (plus site/agent)
    where: dict[str, str] = msgspec.field(default_factory=dict)
    jobs: list[dict[str, Any]] = msgspec.field(default_factory=list)  # like the file's jobs; [] clears the document


class Refusal(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def label_match(where: dict[str, str], site: str, agent: str, labels: dict[str, str]) -> bool:
    have = {**labels, "site": site, "agent": agent}
    return all(have.get(k) == v for k, v in where.items())


class Control:
    def __init__(
        self,
        cfg: AgentConfig,
        local_jobs: list[Job],
        scheduler: Scheduler,
        ctx: ProbeContext,
        emit: Any,
        *,
        policy: TargetPolicy | None = None,
    ) -> None:
        self.cfg = cfg
        self.local_jobs = local_jobs
        self.main = scheduler
        self.ctx = ctx
        self.emit = emit
        c = cfg.control
        key = load_public_key(c.public_key_file) if c.public_key_file else None
        self.cmd_verifier = Verifier(key, max_ttl_s=c.max_command_ttl_s) if key else None
        self.cfg_verifier = Verifier(key, max_ttl_s=c.max_config_ttl_s) if key else None
        # nonces and config issued_at kept across restarts, beside the spool (agent/replay.py)
        self.replay = ReplayState(state_path_for(cfg.spool.resolved_path(cfg.agent.id)))
        self.policy = policy or TargetPolicy(cfg.policy)
        self.remote_ctx = ctx.restricted(self.policy.address_check())  # what the controller asks for
        ident, prefix = cfg.agent, cfg.broker.topic_prefix
        self.cmd_topic = cmd_topic(prefix, ident.site, ident.id)
        self.config_topic = config_topic(prefix, ident.site, ident.id)
        self.group_prefix = group_config_topic(prefix, "")
        self.refusals: Counter[str] = Counter()
        self.last_refusal: str | None = None
        self.config_error: str | None = None
        self.docs: dict[str, tuple[ConfigDocument, list[JobConfig]]] = {}  # topic -> last good
        self.central_jobs: list[Job] = []
        self.config_changes = 0  # accepted central configurations (tests, debugging)
        self.adhoc_runs = 0  # ad-hoc observations produced
        self._central_produced = 0  # by central schedulers that were replaced
        self.replies_sent = 0
        self._central: tuple[Scheduler, asyncio.Event, asyncio.Task[None]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._expiry: dict[str, asyncio.TimerHandle] = {}  # topic -> timer at its document's expires_at
        self.expired_docs = 0  # central documents that expired while in force
        self._client: aiomqtt.Client | None = None
        self.on_status_change: Any = None  # callable(): the publisher republishes the status
        self.on_subscribed: Any = None  # callable(): after each (re)subscription (daemon.py: on_ready)

    # ------------------------------------------------------------------ status

    def status_fields(self) -> dict[str, Any]:
        c = self.cfg.control
        return {
            "accepts_commands": c.accept_commands,
            "accepts_config": c.accept_config,
            "job_kinds": sorted({j.kind.name for j in [*self.local_jobs, *self.central_jobs]}),
            "refused": sum(self.refusals.values()),
            "refusals": dict(self.refusals),
            "last_refusal": self.last_refusal,
            "config_docs": sorted(t.rsplit("/", 2)[-2] + "/" + t.rsplit("/", 1)[-1] for t in self.docs),
            "config_error": self.config_error,
        }

    def _refused(self, code: str, reason: str) -> None:
        self.refusals[code] += 1
        self.last_refusal = f"{code}: {reason}"
        log.warning("refused: %s: %s", code, reason)
        if self.on_status_change is not None:
            self.on_status_change()

    # ------------------------------------------------------------------ connection

    async def run(self, stop: asyncio.Event) -> None:
        c = self.cfg.control
        if not (c.accept_commands or c.accept_config):
            return

        async def session(client: aiomqtt.Client) -> None:
            await self._session(client, stop)

        try:
            await run_session(
                # broker.client_id names the publisher's connection; this one adds -control to it
                msgspec.structs.replace(self.cfg.broker, client_id=None),
                agent_client_ids(self.cfg)[1],
                session,
                stop=stop,
                name="control channel",
                log=log,
                clean_session=True,
            )
        finally:
            for timer in self._expiry.values():
                timer.cancel()
            self._expiry.clear()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._stop_central()

    async def _session(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        """One connection: subscribe, then handle messages until ``stop`` (or an MqttError)."""
        c = self.cfg.control
        self._client = client
        try:
            if c.accept_commands:
                await client.subscribe(self.cmd_topic, qos=1)
            if c.accept_config:
                await client.subscribe(self.config_topic, qos=1)
                await client.subscribe(self.group_prefix + "+", qos=1)
            log.info("control channel up (commands: %s, config: %s)", c.accept_commands, c.accept_config)
            if self.on_subscribed is not None:
                self.on_subscribed()
            stop_wait = asyncio.ensure_future(stop.wait())
            try:
                messages = client.messages.__aiter__()
                while True:
                    nxt = asyncio.ensure_future(messages.__anext__())
                    done, _ = await asyncio.wait({nxt, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                    if nxt not in done:
                        nxt.cancel()
                        return
                    msg = nxt.result()
                    await self._on_message(str(msg.topic), bytes(msg.payload) if msg.payload else b"")
            finally:
                stop_wait.cancel()
        finally:
            self._client = None

    async def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == self.cmd_topic:
            self._on_command(payload)
        elif topic == self.config_topic or topic.startswith(self.group_prefix):
            await self._on_config(topic, payload)

    # ------------------------------------------------------------------ commands

    def _on_command(self, payload: bytes) -> None:
        request_id = _guess_request_id(payload)
        target: tuple[str, str] | None = None  # (as sent, as shown): a reason never carries a URL's key
        try:
            if self.cmd_verifier is None or not self.cfg.control.accept_commands:
                raise Refusal("commands_disabled", "this agent does not accept commands (control.accept_commands)")
            try:
                cmd = self.cmd_verifier.open(payload, "cmd", AdhocCommand, replay=True)
            except SignatureError as err:
                raise Refusal(err.code, err.reason) from None
            if self.replay.seen_command(cmd.nonce):
                raise Refusal("replayed", f"nonce {cmd.nonce} was already used (before a restart)")
            request_id = cmd.request_id
            if not REQUEST_ID_RE.match(cmd.request_id):
                raise Refusal("bad_request", "request_id: expected 1-64 letters, digits, '_' or '-'")
            if cmd.agent != self.cfg.agent.id:
                raise Refusal("wrong_agent", f"command is for agent {cmd.agent!r}, not this one")
            kind = find_kind(cmd.kind)  # its name or an alias (ping, ttft)
            if kind is None:
                raise Refusal("bad_request", f"unknown probe kind {cmd.kind!r}")
            target = (cmd.target, kind.shown_target(cmd.target))
            try:
                config = convert(cmd.options, kind.config_type, "request", prefix="options")
            except ConfigError as err:
                raise Refusal("bad_request", str(err)) from None
            problem = kind.check_target(cmd.target)
            if problem is not None:
                raise Refusal("bad_request", problem)
            try:  # before it runs: a restart must not run it again
                self.replay.record_command(cmd.nonce, cmd.expires_at_ns)
            except ReplayStateError as err:
                raise Refusal(err.code, str(err)) from None
        except Refusal as ref:
            reason = ref.reason if target is None else hide_in_text(ref.reason, *target)
            self._refused(ref.code, reason)
            if request_id is not None:
                self._spawn(self._reply(request_id, status="refused", code=ref.code, reason=reason))
            return
        self._spawn(self._adhoc(cmd, kind, config))

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _adhoc(self, cmd: AdhocCommand, kind: Any, config: Any) -> None:
        try:
            await self.policy.admit(kind.name, cmd.target, config)
        except PolicyRefusal as ref:
            reason = hide_in_text(ref.reason, cmd.target, kind.shown_target(cmd.target))
            self._refused(ref.code, reason)
            await self._reply(cmd.request_id, status="refused", code=ref.code, reason=reason)
            return
        try:
            obs = await run_probe(
                kind,
                cmd.target,
                config,
                self.remote_ctx,
                seq=next(self.main._seq),
                job=ADHOC_JOB,
                labels={"request_id": cmd.request_id},
            )
        finally:
            self.policy.release()
        self.adhoc_runs += 1
        self.emit(obs)
        await self._reply(cmd.request_id, status="ok", observation=obs)

    async def _reply(
        self,
        request_id: str,
        *,
        status: str,
        code: str | None = None,
        reason: str | None = None,
        observation: Observation | None = None,
    ) -> None:
        client = self._client
        if client is None:
            return
        ident = self.cfg.agent
        reply = CommandReply(
            v=SCHEMA_VERSION,
            request_id=request_id,
            agent=ident.id,
            site=ident.site,
            at_ns=time.time_ns(),
            status=status,
            code=code,
            reason=reason,
            observation=observation,
        )
        topic = result_topic(self.cfg.broker.topic_prefix, request_id, ident.id)
        try:
            await client.publish(topic, encode(reply), qos=1, timeout=self.cfg.publish.ack_timeout_s)
            self.replies_sent += 1
        except aiomqtt.MqttError as err:
            log.warning("could not send the reply to request %s: %s", request_id, err)

    # ------------------------------------------------------------------ central configuration

    async def _on_config(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message is not signed: ignored (publish a signed empty document)
        assert self.cfg_verifier is not None
        name = topic.rsplit("/", 1)[-1] if topic.startswith(self.group_prefix) else "agent"
        targets: list[tuple[str, str]] = []  # (as sent, as shown): a reason never carries a URL's key
        try:
            try:
                doc = self.cfg_verifier.open(payload, "config", ConfigDocument, replay=False)
            except SignatureError as err:
                raise Refusal(f"config_{err.code}", err.reason) from None
            targets = _doc_targets(doc)
            if doc.topic != topic:
                raise Refusal("config_wrong_topic", f"document was signed for {doc.topic}, arrived on {topic}")
            previous = self.docs.get(topic)
            if previous is not None:
                if previous[0].nonce == doc.nonce:
                    return  # the retained copy again (reconnect)
                if doc.issued_at_ns < previous[0].issued_at_ns:
                    raise Refusal("config_replayed", "older than the document in force")
            if self.replay.config_is_older(topic, doc.issued_at_ns):
                raise Refusal("config_replayed", "older than a document already seen on this topic (before a restart)")
            self.replay.record_config(topic, doc.issued_at_ns)
            ident = self.cfg.agent
            if topic != self.config_topic and not label_match(doc.where, ident.site, ident.id, ident.labels):
                if self.docs.pop(topic, None) is not None:  # no longer for us
                    await self._apply(dict(self.docs), [])
                return
            source = f"central config {name}"
            job_cfgs: list[JobConfig] = []
            for i, raw in enumerate(doc.jobs):
                if not isinstance(raw, dict):
                    raise Refusal("config_invalid", f"{source}: jobs[{i}]: expected a mapping")
                item = dict(raw)
                item.setdefault("name", f"{name}.{item.get('kind', 'job')}-{i}")
                try:
                    job_cfgs.append(convert(item, JobConfig, source, prefix=f"jobs[{i}]"))
                except ConfigError as err:
                    raise Refusal("config_invalid", str(err)) from None
            try:  # alone first, for an error that names this document's own jobs
                doc_jobs = build_jobs(msgspec.structs.replace(self.cfg, jobs=job_cfgs), source)
            except ConfigError as err:
                raise Refusal("config_invalid", str(err)) from None
            docs = dict(self.docs)
            docs[topic] = (doc, job_cfgs)
            try:
                await self._apply(docs, doc_jobs)
            except ConfigError as err:
                raise Refusal("config_invalid", str(err)) from None
        except Refusal as ref:
            reason = ref.reason
            for sent, shown in targets:
                reason = hide_in_text(reason, sent, shown)
            self.config_error = f"{name}: {reason}"
            self._refused(ref.code, reason)
            return
        self.config_error = None
        self._arm_expiry(topic, doc)
        if self.on_status_change is not None:
            self.on_status_change()

    def _arm_expiry(self, topic: str, doc: ConfigDocument) -> None:
        """Expire ``doc`` at its ``expires_at_ns``: a timer on the loop's monotonic clock for the
        remaining lifetime (the wall clock is read once, now; a later step of it changes nothing)."""
        old = self._expiry.pop(topic, None)
        if old is not None:
            old.cancel()
        remaining_s = max(0.0, (doc.expires_at_ns - time.time_ns()) / 1e9)
        self._expiry[topic] = asyncio.get_running_loop().call_later(
            remaining_s, lambda: self._spawn(self._expire(topic, doc.nonce))
        )

    async def _expire(self, topic: str, nonce: str) -> None:
        """The document on ``topic`` reached its expires_at: drop it and run the file's jobs (and the
        other documents in force) only, as if it had been cleared; logged and shown in the status."""
        self._expiry.pop(topic, None)
        current = self.docs.get(topic)
        if current is None or current[0].nonce != nonce:
            return  # replaced or dropped since
        name = topic.rsplit("/", 1)[-1] if topic.startswith(self.group_prefix) else "agent"
        remaining = {t: d for t, d in self.docs.items() if t != topic}
        try:
            await self._apply(remaining, [])
        except (ConfigError, Refusal) as err:  # they passed together before; stop them all rather than guess
            log.error("central configuration: after %s expired the rest does not apply (%s): stopped", name, err)
            await self._stop_central()
            self.docs, self.central_jobs = {}, []
        self.expired_docs += 1
        self.config_error = f"{name}: expired; reverted to the file's jobs" + (
            " and the other documents in force" if self.docs else ""
        )
        log.warning("central configuration %s expired: %s", name, self.config_error)
        if self.on_status_change is not None:
            self.on_status_change()

    async def _apply(self, docs: dict[str, tuple[ConfigDocument, list[JobConfig]]], new: list[Job]) -> None:
        """Validate local + central jobs together (exactly like the file), then the ``new`` jobs and
        the central rate against the policy (:class:`Refusal`); on success run them."""
        central_cfgs = [j for topic in sorted(docs) for j in docs[topic][1]]
        all_cfg = msgspec.structs.replace(self.cfg, jobs=[*self.cfg.jobs, *central_cfgs])
        jobs = build_jobs(all_cfg, "central config")  # raises ConfigError
        central_jobs = jobs[len(self.cfg.jobs) :]
        refusal = await self.policy.central_refusal(new, central_jobs)
        if refusal is not None:
            raise Refusal("config_policy", refusal)
        self.docs = docs
        self.central_jobs = central_jobs
        self.config_changes += 1
        log.info(
            "central configuration applied: %d document(s), %d job(s): %s",
            len(docs),
            len(self.central_jobs),
            ", ".join(f"{j.name} ({j.kind.name}, {len(j.targets)} target(s))" for j in self.central_jobs) or "none",
        )
        await self._stop_central()
        if self.central_jobs:
            sched = Scheduler(
                self.cfg.agent.id,
                self.central_jobs,
                self.remote_ctx,
                self.emit,
                self.cfg.agent.max_concurrent_probes,
                self.main.agent_at,
            )
            sched._seq = self.main._seq  # one sequence per agent
            stop = asyncio.Event()
            task = asyncio.create_task(sched.run(stop, 0.0), name="central-scheduler")
            self._central = (sched, stop, task)

    async def reload(self, cfg: AgentConfig, local_jobs: list[Job], *, policy_changed: bool) -> None:
        """The agent's file was reloaded (SIGHUP) with ``cfg`` (only keys that may change live
        differ). The central documents in force are checked again as a restart would check them:
        with the file's new jobs (``build_jobs`` over both) and, when the policy changed, against
        it. When they no longer pass, the file wins: the central jobs stop and the documents are
        dropped, with the reason in the log and the status (``config_error``); the controller
        publishes them again (or corrected) to bring them back."""
        self.cfg = cfg
        self.local_jobs = local_jobs
        if not self.docs:
            return
        central_cfgs = [j for topic in sorted(self.docs) for j in self.docs[topic][1]]
        problem: str | None = None
        try:
            build_jobs(msgspec.structs.replace(cfg, jobs=[*cfg.jobs, *central_cfgs]), "central config")
        except ConfigError as err:
            problem = str(err)
        if problem is None and policy_changed:
            problem = await self.policy.central_refusal(self.central_jobs, self.central_jobs)
        if problem is None:
            return
        for timer in self._expiry.values():
            timer.cancel()
        self._expiry.clear()
        await self._stop_central()
        dropped = sorted(t.rsplit("/", 1)[-1] for t in self.docs)
        self.docs, self.central_jobs = {}, []
        self.config_error = f"after the agent's file was reloaded: {problem}; central jobs stopped"
        log.warning(
            "central configuration (%s) no longer applies after the reload: %s; its jobs stopped",
            ", ".join(dropped),
            problem,
        )
        if self.on_status_change is not None:
            self.on_status_change()

    async def _stop_central(self) -> None:
        if self._central is None:
            return
        sched, stop, task = self._central
        self._central = None
        self._central_produced += sched.produced
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    @property
    def produced(self) -> int:
        """Observations produced here (central jobs and ad-hoc runs), for the health counters."""
        current = self._central[0].produced if self._central is not None else 0
        return self._central_produced + current + self.adhoc_runs

    @property
    def central_scheduler(self) -> Scheduler | None:
        return None if self._central is None else self._central[0]


def _doc_targets(doc: ConfigDocument) -> list[tuple[str, str]]:
    """Every target of a document's jobs that its kind shows otherwise: (as sent, as shown)."""
    found = []
    for raw in doc.jobs:
        if not isinstance(raw, dict) or not isinstance(raw.get("kind"), str):
            continue
        kind = find_kind(raw["kind"])
        entries = raw.get("targets")
        for entry in entries if isinstance(entries, list) else []:
            sent = entry.get("target") if isinstance(entry, dict) else entry
            if kind is not None and isinstance(sent, str) and kind.shown_target(sent) != sent:
                found.append((sent, kind.shown_target(sent)))
    return found


def _guess_request_id(payload: bytes) -> str | None:
    """The request id of a message that may not verify, to send the refusal somewhere useful."""
    try:
        outer = msgspec.json.decode(payload)
        doc = msgspec.json.decode(outer["payload"]) if isinstance(outer.get("payload"), str) else outer
        rid = doc.get("request_id")
    except (msgspec.DecodeError, AttributeError, KeyError, TypeError):
        return None
    return rid if isinstance(rid, str) and REQUEST_ID_RE.match(rid) and NAME_RE.match(rid) else None
