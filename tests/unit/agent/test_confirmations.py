"""Delivery confirmations on the agent side (publish.delivery "collector"), without a broker: what a
valid ``…/ack`` frees, and that a hostile one frees nothing, is counted and logged once, escaped."""

from __future__ import annotations

import logging

import msgspec
import pytest

from edgeprobe.agent.config import AgentConfig
from edgeprobe.agent.publisher import MAX_CONFIRM_BYTES, Publisher, _Sent
from edgeprobe.agent.spool import MemorySpool
from edgeprobe.configfile import convert
from edgeprobe.schema import MAX_ACK_BATCHES, DeliveryAck, Observation, encode


def obs(i: int) -> Observation:
    return Observation(
        id=f"{i:032x}", seq=i, kind="icmp", target="127.0.0.1", started_at_ns=i, duration_ms=1.0, outcome="ok"
    )


async def sent_publisher() -> tuple[Publisher, MemorySpool]:
    """A publisher with two messages sent and unconfirmed: b-1 (observations 0, 1) and b-2 (2)."""
    cfg = convert({"agent": {"id": "a1", "site": "s1"}}, AgentConfig, "test")
    assert cfg.publish.delivery == "collector"  # the default
    spool = MemorySpool(max_bytes=10**6, max_age_s=3600)
    for i in range(3):
        spool.put(obs(i))
    pub = Publisher(cfg, spool, ["icmp"])
    entries = await spool.take(3)
    pub._unconfirmed = {"b-1": _Sent(entries[:2], 0.0), "b-2": _Sent(entries[2:], 0.0)}
    pub.stats.unconfirmed = 3
    return pub, spool


def ack(batches: list[str], agent: str = "a1", site: str = "s1", v: int = 1) -> bytes:
    return encode(DeliveryAck(v=v, agent=agent, site=site, collector="c", at_ns=1, batches=batches))


async def test_a_confirmation_deletes_what_it_names_and_nothing_else() -> None:
    pub, spool = await sent_publisher()
    pub.confirm(ack(["b-2", "b-9"]))
    assert len(spool) == 2 and spool.stats().in_flight == 2  # b-1 still waits
    assert pub.stats.acknowledged_observations == 1 and pub.stats.unconfirmed == 2
    assert pub.stats.unknown_confirmations == 1 and pub.health().unconfirmed == 2
    pub._send_again("test")  # go-back-N: b-1 available again, first in line
    assert spool.available() == 2 and pub.stats.resent_unconfirmed == 2 and not pub._unconfirmed
    pub.confirm(ack(["b-1"]))  # late: sent again meanwhile, nothing to free
    assert spool.available() == 2 and pub.stats.unknown_confirmations == 2


@pytest.mark.parametrize(
    "payload",
    [
        ack(["b-1"], agent="a2"),  # another agent's
        ack(["b-1"], site="s2"),
        ack(["b-1"], v=9),
        ack(["b-1"] * (MAX_ACK_BATCHES + 1)),
        b'{"v": 1, "agent": "a1", "site": "s1", "batches": "b-1"}',
        b"\xff\xfe not json \x1b[31m",
        b"[" * 100_000,
        b" " * (MAX_CONFIRM_BYTES + 1),
    ],
)
async def test_a_hostile_confirmation_frees_nothing_and_is_counted(
    payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    pub, spool = await sent_publisher()
    caplog.set_level(logging.WARNING)
    pub.confirm(payload)
    pub.confirm(payload)
    assert len(spool) == 3 and pub.stats.unconfirmed == 3 and pub.stats.bad_confirmations == 2
    logged = [r.getMessage() for r in caplog.records if "refused a message on" in r.getMessage()]
    assert len(logged) == 1  # at most once a minute
    assert all(c.isprintable() for c in logged[0]) and len(logged[0]) < 500


def test_envelopes_carry_the_batch_id_and_old_ones_decode() -> None:
    from edgeprobe.schema import Envelope

    old = b'{"v":1,"agent":"a1","site":"s1","sent_at_ns":1,"observations":[]}'
    assert msgspec.json.decode(old, type=Envelope).batch is None
