"""The target policy (agent/policy.py): address classes and their spellings, resolution, caps, token
budget, environment variables, central jobs and the per-connection check. Fake resolvers only."""

from __future__ import annotations

import ipaddress

import pytest

from edgeprobe.agent.config import AgentConfig, Job, build_jobs
from edgeprobe.agent.policy import (
    PolicyConfig,
    PolicyRefusal,
    TargetPolicy,
    agent_secret_env,
    classify,
    embedded_ipv4,
    legacy_ipv4,
    target_host,
)
from edgeprobe.configfile import ConfigError, convert
from edgeprobe.mqtt import BROKER_ENV
from edgeprobe.probes.http import HttpConfig
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


# ---------------------------------------------------------------------- issue 12, item 17: other spellings


@pytest.mark.parametrize(
    ("addr", "inner"),
    [
        ("::ffff:127.0.0.1", "127.0.0.1"),  # IPv4-mapped
        ("::ffff:a00:1", "10.0.0.1"),  # the same, written in hex
        ("::ffff:0:7f00:1", "127.0.0.1"),  # IPv4-translated (SIIT)
        ("::7f00:1", "127.0.0.1"),  # IPv4-compatible (deprecated)
        ("::a9fe:a9fe", "169.254.169.254"),
        ("64:ff9b::7f00:1", "127.0.0.1"),  # NAT64 well-known prefix
        ("64:ff9b::169.254.169.254", "169.254.169.254"),
        ("64:ff9b:1::a00:5", "10.0.0.5"),  # NAT64 local-use prefix, /96 form
        ("2002:7f00:1::", "127.0.0.1"),  # 6to4
        ("2002:a9fe:a9fe:1:2:3:4:5", "169.254.169.254"),
        ("2002:808:808::1", "8.8.8.8"),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "127.0.0.1"),  # Teredo: the client, inverted
        ("2001:0:4136:e378:8000:63bf:f5ff:fffa", "10.0.0.5"),
        ("::", None),  # unspecified, not 0.0.0.0 in disguise
        ("::1", None),  # loopback, not 0.0.0.1
        ("2001:4860:4860::8888", None),
        ("fe80::1", None),
        ("127.0.0.1", None),  # an IPv4 address carries none
    ],
)
def test_embedded_ipv4(addr: str, inner: str | None) -> None:
    got = embedded_ipv4(ipaddress.ip_address(addr))
    assert got == (None if inner is None else ipaddress.IPv4Address(inner))


@pytest.mark.parametrize(
    ("addr", "why"),
    [
        ("::ffff:0:7f00:1", "loopback"),  # is_global in Python's table: admitted before
        ("::7f00:1", "loopback"),  # likewise
        ("2002:7f00:1::", "loopback"),  # likewise
        ("2002:a00:5::", "private"),
        ("2002:a9fe:a9fe::", "link_local"),
        ("64:ff9b::a9fe:a9fe", "link_local"),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),
        ("::ffff:8.8.8.8", None),
        ("2002:808:808::1", None),  # 6to4 of a public address: global
    ],
)
def test_classify_embedded_ipv4(addr: str, why: str | None) -> None:
    assert classify(ipaddress.ip_address(addr)) == why


@pytest.mark.parametrize(
    ("host", "want"),
    [
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0X7F.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),  # octal
        ("017.0.0.1", "15.0.0.1"),  # a leading 0 is octal, as inet_aton reads it
        ("169.254.43518", "169.254.169.254"),
        ("0", "0.0.0.0"),
        ("256.1", None),
        ("1.2.3.4.5", None),
        ("1.256.0.1", None),
        ("4294967296", None),
        ("08.1", None),  # not octal
        ("example.test", None),
        ("1e100", None),
        ("", None),
    ],
)
def test_legacy_ipv4(host: str, want: str | None) -> None:
    assert legacy_ipv4(host) == (None if want is None else ipaddress.IPv4Address(want))


async def test_deny_cidrs_see_the_ipv4_address_an_ipv6_one_carries() -> None:
    p = TargetPolicy(PolicyConfig(deny_cidrs=["8.8.8.0/24"]))
    tcp = TcpConfig()
    assert await _code(p, "tcp", "8.8.8.8:53", tcp) == "policy_denied"
    assert await _code(p, "tcp", "[::ffff:8.8.8.8]:53", tcp) == "policy_denied"  # was admitted
    assert await _code(p, "tcp", "[::ffff:0:808:808]:53", tcp) == "policy_denied"
    assert await _code(p, "tcp", "[2002:808:808::1]:53", tcp) == "policy_denied"  # was admitted
    assert await _code(p, "tcp", "[64:ff9b::808:808]:53", tcp) == "policy_denied"
    assert await _code(p, "icmp", "2002:808:808::1", IcmpConfig(count=1)) == "policy_denied"
    assert await _code(p, "tcp", "[2002:808:404::1]:53", tcp) is None  # 8.8.4.4: not denied, global


async def test_tunnelled_forms_of_loopback_and_private_are_refused() -> None:
    p = TargetPolicy(PolicyConfig())
    tcp = TcpConfig()
    assert await _code(p, "tcp", "[2002:7f00:1::]:80", tcp) == "policy_loopback"
    assert await _code(p, "tcp", "[::ffff:0:7f00:1]:80", tcp) == "policy_loopback"
    assert await _code(p, "tcp", "[::7f00:1]:80", tcp) == "policy_loopback"
    assert await _code(p, "tcp", "[64:ff9b::a00:1]:80", tcp) == "policy_private"
    assert await _code(p, "tcp", "[2001:0:4136:e378:8000:63bf:80ff:fffe]:80", tcp) == "policy_loopback"
    assert await _code(p, "http", "http://[2002:a9fe:a9fe::]/latest/meta-data/", HttpConfig()) == "policy_link_local"
    # old IPv4 spellings are the addresses they spell
    assert await _code(p, "tcp", "127.1:80", tcp) == "policy_loopback"
    assert await _code(p, "tcp", "0x7f.1:80", tcp) == "policy_loopback"
    assert await _code(p, "http", "http://2130706433/", HttpConfig()) == "policy_loopback"
    assert await _code(p, "http", "http://169.254.43518/", HttpConfig()) == "policy_link_local"


async def test_allow_cidrs_admit_the_same_host_only() -> None:
    """allow 127.0.0.1/32 admits its IPv4-mapped form (the same host on a dual-stack socket), not a
    6to4 address that merely carries it (that goes to a 6to4 relay)."""
    p = TargetPolicy(PolicyConfig(allow_cidrs=["127.0.0.1/32"]))
    assert await _code(p, "tcp", "[::ffff:127.0.0.1]:80", TcpConfig()) is None
    assert await _code(p, "tcp", "[2002:7f00:1::]:80", TcpConfig()) == "policy_loopback"


async def test_the_rate_cap_counts_every_spelling_of_one_address_once() -> None:
    """378 requests to 127.0.0.1 under a cap of 6 a minute, spelt 7 ways (names included): 6 admitted."""
    resolve = _resolver({"loop.test": ["127.0.0.1"], "loop-mapped.test": ["::ffff:127.0.0.1"]})
    p = TargetPolicy(
        PolicyConfig(allow_cidrs=["127.0.0.0/8"], max_requests_per_target_per_min=6, max_concurrent_requests=1000),
        resolve=resolve,
    )
    spellings = [
        ("tcp", "127.0.0.1:80"),
        ("tcp", "127.1:81"),
        ("tcp", "0x7f.1:82"),
        ("tcp", "[::ffff:127.0.0.1]:83"),
        ("tcp", "loop.test:84"),
        ("http", "http://2130706433:85/"),
        ("icmp", "loop-mapped.test"),
    ]
    configs = {"tcp": TcpConfig(count=1), "http": HttpConfig(), "icmp": IcmpConfig(count=1)}
    codes = [await _code(p, kind, target, configs[kind]) for _ in range(54) for kind, target in spellings]
    assert len(codes) == 378
    assert codes.count(None) == 6
    assert set(codes) == {None, "rate_limited"}
    assert await _code(p, "tcp", "127.0.0.2:80", TcpConfig(count=1)) is None  # another address: its own count


async def test_a_name_resolving_to_several_addresses_counts_against_each() -> None:
    resolve = _resolver({"both.test": ["127.0.0.1", "127.0.0.2"]})
    p = TargetPolicy(PolicyConfig(allow_cidrs=["127.0.0.0/8"], max_requests_per_target_per_min=2), resolve=resolve)
    assert await _code(p, "tcp", "127.0.0.2:1", TcpConfig(count=1)) is None
    assert await _code(p, "tcp", "both.test:1", TcpConfig(count=1)) is None
    assert await _code(p, "tcp", "both.test:1", TcpConfig(count=1)) == "rate_limited"  # 127.0.0.2 had 2
    assert await _code(p, "tcp", "127.0.0.1:1", TcpConfig(count=1)) is None


# ---------------------------------------------------------------------- issue 12, item 9: api_key_env


@pytest.mark.parametrize(
    "name", ["EDGEPROBE_BROKER_PASSWORD", "EDGEPROBE_BROKER_USERNAME", "EDGEPROBE_INFLUX_TOKEN", *BROKER_ENV]
)
def test_the_agent_s_own_secrets_are_never_allowed(name: str) -> None:
    assert agent_secret_env(name)
    with pytest.raises(ValueError, match=rf"api_key_envs\[0\]: {name} holds this agent's own credentials"):
        PolicyConfig(api_key_envs=[name])


async def test_remote_requests_read_only_the_listed_environment_variables() -> None:
    url = "http://127.0.0.1:9/v1"
    cfg = PolicyConfig(allow_cidrs=["127.0.0.0/8"], api_key_envs=["LLM_KEY"], inference_tokens_per_hour=10**6)
    p = TargetPolicy(cfg)
    assert await _code(p, "inference", url, InferenceConfig(model="m", api_key_env="LLM_KEY")) is None
    assert await _code(p, "inference", url, InferenceConfig(model="m")) is None  # no key at all
    assert await _code(p, "inference", url, InferenceConfig(model="m", api_key_env="HOME")) == "env_not_allowed"
    for secret in ("EDGEPROBE_BROKER_PASSWORD", "EDGEPROBE_INFLUX_TOKEN", "edgeprobe_broker_password"):
        assert await _code(p, "inference", url, InferenceConfig(model="m", api_key_env=secret)) == "env_reserved"
    default = TargetPolicy(PolicyConfig(allow_cidrs=["127.0.0.0/8"]))  # the default allows none
    assert await _code(default, "inference", url, InferenceConfig(model="m", api_key_env="LLM_KEY")) == (
        "env_not_allowed"
    )


def test_no_job_may_read_the_agent_s_own_secrets_not_even_the_file_s() -> None:
    raw = {
        "agent": {"id": "a", "site": "s"},
        "jobs": [{"kind": "inference", "targets": ["http://127.0.0.1:9/v1"], "interval_s": 60,
                  "options": {"model": "m", "api_key_env": "EDGEPROBE_BROKER_PASSWORD"}}],
    }  # fmt: skip
    cfg = convert(raw, AgentConfig, "agent.yaml")
    with pytest.raises(ConfigError, match=r"agent.yaml: jobs\[0\].options: .*EDGEPROBE_BROKER_PASSWORD.*credentials"):
        build_jobs(cfg, "agent.yaml")
    raw["jobs"][0]["options"]["api_key_env"] = "LLM_KEY"  # type: ignore[index]
    assert build_jobs(convert(raw, AgentConfig, "agent.yaml"), "agent.yaml")[0].kind.name == "inference"


# ---------------------------------------------------------------------- issue 12, item 8: central jobs


def _jobs(jobs: list[dict[str, object]]) -> list[Job]:
    cfg = convert({"agent": {"id": "a", "site": "s"}, "jobs": jobs}, AgentConfig, "t")
    return build_jobs(cfg, "t")


async def test_job_problems_name_every_refused_target() -> None:
    p = TargetPolicy(PolicyConfig(allow_cidrs=["127.0.0.1/32"]), resolve=_resolver({"meta.test": ["169.254.169.254"]}))
    jobs = _jobs([
        {"name": "ok", "kind": "tcp", "targets": ["127.0.0.1:80", "8.8.8.8:53"], "interval_s": 10,
         "options": {"count": 1}},
        {"name": "bad", "kind": "tcp", "targets": ["127.0.0.1:81", "127.0.0.2:80", "meta.test:80", "nowhere.test:1"],
         "interval_s": 10, "options": {"count": 1}},
        {"name": "loud", "kind": "icmp", "targets": ["8.8.8.8"], "interval_s": 60, "options": {"count": 50}},
        {"name": "keyed", "kind": "http", "targets": ["http://10.0.0.1/?api_key=SECRET123"], "interval_s": 10},
        {"name": "llm", "kind": "inference", "targets": ["http://127.0.0.1:9/v1"], "interval_s": 60,
         "options": {"model": "m", "api_key_env": "HOME"}},
    ])  # fmt: skip
    problems = await p.job_problems(jobs)
    text = "\n".join(problems)
    assert "job 'bad' (tcp) target '127.0.0.2:80': policy_loopback" in text
    assert "job 'bad' (tcp) target 'meta.test:80': policy_link_local: 169.254.169.254" in text
    assert "job 'bad' (tcp) target 'nowhere.test:1': dns_error" in text
    assert "job 'loud' (icmp): too_many_packets" in text
    assert "job 'keyed' (http) target 'http://10.0.0.1/?api_key=REDACTED': policy_private" in text
    assert "job 'llm' (inference): env_not_allowed" in text
    assert "SECRET123" not in text and "'ok'" not in text and len(problems) == 6
    assert await p.job_problems(jobs[:1]) == []
    assert await p.job_problems(jobs[4:], remote=False) == []  # the file's own jobs may read any variable
    refusal = await p.central_refusal(jobs[1:2], jobs)
    assert refusal is not None and refusal.startswith("refused by this agent's policy: job 'bad'")


def test_central_runs_per_second() -> None:
    p = TargetPolicy(PolicyConfig(max_central_runs_per_s=2))
    a = _jobs([{"kind": "tcp", "targets": [f"127.0.0.1:{i}" for i in range(1, 61)], "interval_s": 30,
                "options": {"count": 1}}])  # fmt: skip
    assert p.runs_per_s(a) == pytest.approx(2.0)
    assert p.rate_problem(a) is None  # at the cap
    b = _jobs([{"kind": "tcp", "targets": ["127.0.0.1:1", "127.0.0.1:2"], "interval_s": 0.5, "options": {"count": 1,
                "timeout_s": 0.1, "interval_s": 0.01}}])  # fmt: skip
    assert p.runs_per_s(b) == pytest.approx(4.0)
    problem = p.rate_problem(b)
    assert problem is not None and problem.startswith("too_many_runs: central jobs would make 4 runs/s")
    assert TargetPolicy(PolicyConfig(max_central_runs_per_s=0)).rate_problem(a) is not None  # none at all


async def test_address_check_is_what_a_probe_asks_before_each_connection() -> None:
    p = TargetPolicy(PolicyConfig(allow_cidrs=["127.0.0.1/32"], allow_hosts=["lab.test"], deny_cidrs=["8.8.8.0/24"]))
    check = p.address_check()
    assert await check("127.0.0.1", "127.0.0.1", 80) is None
    assert await check("x.test", "::ffff:127.0.0.1", 80) is None
    why = await check("rebound.test", "127.0.0.2", 80)
    assert why is not None and why.startswith("policy_loopback: 127.0.0.2 is a loopback address")
    assert (await check("x.test", "2002:808:808::1", 443) or "").startswith("policy_denied")
    assert (await check("x.test", "fe80::1%eth0", 443) or "").startswith("policy_link_local")
    assert await check("Lab.Test.", "10.1.2.3", 80) is None  # allow_hosts: whatever it resolves to
