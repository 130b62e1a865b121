"""A central configuration document stops at its ``expires_at`` (not at the agent's next restart):
an in-process agent on a real mosquitto with the shipped ACL (the fixtures of test_fleet.py), a
document that lives 2 s. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from edgeprobe.agent.control import ConfigDocument
from edgeprobe.fleet import publish_documents
from edgeprobe.schema import config_topic
from edgeprobe.signing import load_private_key, stamp
from tests.integration.test_fleet import Fleet, agents, control_up, fleet, listener, statuses, wait_until

pytestmark = pytest.mark.integration
__all__ = ["agents", "fleet"]  # fixtures, used by name


async def test_an_expired_document_stops_at_its_expiry(fleet: Fleet, agents: Any) -> None:
    sock, port = listener()
    topic = config_topic("edgeprobe", "s2", "a2")
    key = load_private_key(fleet.key_file)
    local = {"name": "local", "kind": "tcp", "targets": [f"127.0.0.1:{port}"], "interval_s": 1.0,
             "options": {"count": 1, "timeout_s": 0.3}}  # fmt: skip
    try:
        r = await agents(fleet.agent_cfg("a2", jobs=[local]))
        await control_up(r)
        c = r.handles.control
        assert c is not None
        lifetime_s = 2.0
        doc = ConfigDocument(**stamp(lifetime_s), topic=topic, jobs=[local | {"name": "central"}])
        t0 = time.monotonic()
        await publish_documents(fleet.broker("controller"), key, [doc])
        await wait_until(lambda: any(o.job == "central" for o in r.seen), 10, "the central job running")
        assert c.docs and c.central_scheduler is not None and c.expired_docs == 0
        await wait_until(lambda: c.expired_docs == 1, 10, "the document expired")
        assert time.monotonic() - t0 >= lifetime_s - 0.2  # not before its time
        assert c.central_scheduler is None and not c.docs and not c.central_jobs
        assert c.config_error == "agent: expired; reverted to the file's jobs"
        n = len(r.seen)
        await wait_until(lambda: sum(o.job == "local" for o in r.seen[n:]) >= 2, 10, "the file's job still running")
        assert not any(o.job == "central" for o in r.seen[n + 1 :])  # one run may have been under way

        async def status_shows_it() -> bool:
            s = (await statuses(fleet)).get("a2")
            return s is not None and s.config_docs == [] and "expired" in (s.config_error or "")

        await wait_until(status_shows_it, 10, "the expiry in the status")
    finally:
        await publish_documents(fleet.broker("controller"), key, [ConfigDocument(**stamp(60), topic=topic, jobs=[])])
        sock.close()
