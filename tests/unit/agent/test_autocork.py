"""The publisher's autocorking: an observation leaves after a short linger (0.2 s) when nothing is
in flight, and waits (to go with others) while a message awaits its collector's confirmation, up to
flush_interval_s."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from edgeprobe.agent.config import AgentConfig
from edgeprobe.agent.publisher import Publisher
from edgeprobe.agent.spool import MemorySpool
from edgeprobe.configfile import convert
from edgeprobe.schema import DeliveryAck, Observation, encode


def obs(i: int) -> Observation:
    return Observation(
        id=f"{i:032x}", seq=i, kind="icmp", target="127.0.0.1", started_at_ns=i, duration_ms=1.0, outcome="ok"
    )


class FakeClient:
    def __init__(self) -> None:
        self.obs_messages: list[dict[str, Any]] = []
        self.sent = asyncio.Event()

    async def publish(self, topic: str, payload: bytes, qos: int = 0, timeout: float = 0.0, **kw: Any) -> None:
        if topic.endswith("/obs"):
            self.obs_messages.append(msgspec.json.decode(payload))
            self.sent.set()


async def test_nothing_in_flight_sends_at_once_and_in_flight_gathers() -> None:
    cfg = convert({"agent": {"id": "a1", "site": "s1"}, "publish": {"flush_interval_s": 60}}, AgentConfig, "t")
    spool = MemorySpool(max_bytes=10**6, max_age_s=3600)
    pub = Publisher(cfg, spool, ["icmp"])
    client = FakeClient()
    stop = asyncio.Event()
    pump = asyncio.create_task(pub._pump(client, stop, None))  # type: ignore[arg-type]
    try:
        spool.put(obs(0))
        await asyncio.wait_for(client.sent.wait(), 5)  # not after flush_interval_s (60 s)
        assert [len(m["observations"]) for m in client.obs_messages] == [1]
        client.sent.clear()
        spool.put(obs(1))  # the first waits for its confirmation: these two gather
        spool.put(obs(2))
        await asyncio.sleep(0.2)
        assert len(client.obs_messages) == 1
        batch = client.obs_messages[0]["batch"]
        pub.confirm(encode(DeliveryAck(v=1, agent="a1", site="s1", collector="c", at_ns=1, batches=[batch])))
        await asyncio.wait_for(client.sent.wait(), 5)
        assert [len(m["observations"]) for m in client.obs_messages] == [1, 2]
    finally:
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
