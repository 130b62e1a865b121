"""Ad-hoc target policy (agent/policy.py): address classes, resolution, caps, token budget."""

from __future__ import annotations

import ipaddress

import pytest

from edgeprobe.agent.policy import PolicyConfig, PolicyRefusal, TargetPolicy, classify, target_host
from edgeprobe.probes.icmp import IcmpConfig
from edgeprobe.probes.inference import InferenceConfig
from edgeprobe.probes.tcp import TcpConfig


def test_target_host() -> None:
    assert target_host("example.com") == "example.com"
    assert target_host("example.com:443") == "example.com"
    assert target_host("[::1]:80") == "::1"
    assert target_host("::1") == "::1"
    assert target_host("https://user@api.example.com:8443/v1/chat") == "api.example.com"
    assert target_host("http://[fe80::1]/") == "fe80::1"


@pytest.mark.parametrize(
    ("addr", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("172.16.0.1", "private"),
        ("169.254.169.254", "link_local"),  # cloud metadata
        ("fe80::1", "link_local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "reserved"),  # CGNAT: not global
        ("::ffff:10.0.0.1", "private"),  # IPv4-mapped
        ("fc00::1", "private"),
        ("8.8.8.8", None),
        ("2001:4860:4860::8888", None),
    ],
)
def test_classify(addr: str, why: str | None) -> None:
    assert classify(ipaddress.ip_address(addr)) == why


def _resolver(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    async def resolve(host: str) -> list[str]:
        if host not in table:
            raise OSError("no such name")
        return table[host]

    return resolve


async def _code(policy: TargetPolicy, kind: str, target: str, config: object) -> str | None:
    try:
        await policy.admit(kind, target, config)
    except PolicyRefusal as ref:
        return ref.code
    policy.release()
    return None


async def test_default_refuses_private_and_checks_every_resolved_address() -> None:
    table = {"mixed.test": ["8.8.8.8", "10.0.0.5"], "public.test": ["8.8.4.4", "2001:4860:4860::8844"]}
    p = TargetPolicy(PolicyConfig(), resolve=_resolver(table))
    tcp = TcpConfig()
    assert await _code(p, "tcp", "127.0.0.1:80", tcp) == "policy_loopback"
    assert await _code(p, "tcp", "[::1]:80", tcp) == "policy_loopback"
    assert await _code(p, "tcp", "169.254.169.254:80", tcp) == "policy_link_local"
    assert await _code(p, "tcp", "mixed.test:80", tcp) == "policy_private"  # one bad address is enough
    assert await _code(p, "tcp", "nowhere.test:80", tcp) == "dns_error"
    assert await _code(p, "tcp", "public.test:80", tcp) is None


async def test_allow_and_deny_lists() -> None:
    cfg = PolicyConfig(allow_cidrs=["127.0.0.0/8", "::1/128"], allow_hosts=["Lab.Internal"], deny_cidrs=["8.8.8.0/24"])
    p = TargetPolicy(cfg, resolve=_resolver({"lab.internal": ["10.9.9.9"], "g.test": ["8.8.8.8"]}))
    assert await _code(p, "tcp", "127.0.0.2:80", TcpConfig()) is None
    assert await _code(p, "tcp", "[::1]:80", TcpConfig()) is None
    assert await _code(p, "tcp", "lab.internal:80", TcpConfig()) is None
    assert await _code(p, "tcp", "10.0.0.1:80", TcpConfig()) == "policy_private"
    assert await _code(p, "tcp", "g.test:80", TcpConfig()) == "policy_denied"


async def test_caps() -> None:
    cfg = PolicyConfig(
        allow_cidrs=["127.0.0.0/8"],
        max_requests_per_target_per_min=2,
        max_packets_per_request=5,
        max_concurrent_requests=1,
    )
    p = TargetPolicy(cfg)
    assert await _code(p, "icmp", "127.0.0.1", IcmpConfig(count=6)) == "too_many_packets"
    await p.admit("icmp", "127.0.0.1", IcmpConfig(count=5))  # holds the one slot
    assert await _code(p, "tcp", "127.0.0.2:1", TcpConfig()) == "too_many_requests"
    p.release()
    assert await _code(p, "icmp", "127.0.0.1", IcmpConfig(count=1)) is None
    assert await _code(p, "icmp", "127.0.0.1", IcmpConfig(count=1)) == "rate_limited"  # 3rd in a minute
    assert await _code(p, "icmp", "127.0.0.3", IcmpConfig(count=1)) is None  # per target


async def test_inference_token_budget() -> None:
    p = TargetPolicy(PolicyConfig(allow_cidrs=["127.0.0.0/8"], inference_tokens_per_hour=40))
    url = "http://127.0.0.1:9/v1/chat/completions"
    cfg = InferenceConfig(model="m", max_tokens=16)
    assert await _code(p, "inference", url, cfg) is None
    assert await _code(p, "inference", url.replace(".1:", ".2:"), cfg) is None
    assert p.tokens_used_last_hour() == 32
    assert await _code(p, "inference", url.replace(".1:", ".3:"), cfg) == "token_budget"


def test_bad_cidr_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="allow_cidrs"):
        PolicyConfig(allow_cidrs=["10.0.0.0/33"])
