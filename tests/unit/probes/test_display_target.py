"""What a result stores as its target (``display_target``) and what a checked context shares (pure)."""

from __future__ import annotations

import pytest

from edgeprobe.probes.context import ProbeContext
from edgeprobe.probes.handler import hide_in_text
from edgeprobe.probes.http import is_credential_param, redact_url
from edgeprobe.probes.registry import KINDS


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://api.example.net/v1", "https://api.example.net/v1"),
        ("https://x.test/v1?key=AIzaSyA", "https://x.test/v1?key=REDACTED"),
        ("https://x.test/v1?region=eu&api_key=s3cr3t&n=1", "https://x.test/v1?region=eu&api_key=REDACTED&n=1"),
        ("https://x.test/?APIKEY=a;Token=b;other=c", "https://x.test/?APIKEY=REDACTED;Token=REDACTED;other=c"),
        ("https://x.test/?access_token=a&auth=b&password=c&secret=d",
         "https://x.test/?access_token=REDACTED&auth=REDACTED&password=REDACTED&secret=REDACTED"),
        ("https://s3.test/o?X-Amz-Signature=abc&X-Amz-Credential=AK", "https://s3.test/o?X-Amz-Signature=REDACTED&X-Amz-Credential=AK"),
        ("https://x.test/?sig=abc&sv=2024", "https://x.test/?sig=REDACTED&sv=2024"),  # Azure SAS
        ("https://x.test/?client_secret=a&private_token=b", "https://x.test/?client_secret=REDACTED&private_token=REDACTED"),
        ("https://x.test/?api%5Fkey=a", "https://x.test/?api%5Fkey=REDACTED"),  # percent-encoded name
        ("https://x.test/?api-key=a", "https://x.test/?api-key=REDACTED"),
        ("https://x.test/?monkey=1&keys=2&tokenizer=3", "https://x.test/?monkey=1&keys=2&tokenizer=3"),
        ("https://x.test/?token", "https://x.test/?token"),  # no value, nothing to hide
        ("https://x.test/?token=", "https://x.test/?token="),
        ("https://x.test/cb#access_token=a&state=1", "https://x.test/cb#access_token=REDACTED&state=1"),
        ("https://x.test/key/abc?q=key", "https://x.test/key/abc?q=key"),  # only parameter names count
    ],
)  # fmt: skip
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize("name", ["key", "KEY", "api_key", "Api-Key", "x-goog-api-key", "access_token", "sig"])
def test_credential_params(name: str) -> None:
    assert is_credential_param(name)


@pytest.mark.parametrize("name", ["keyword", "monkey", "q", "signed", "authority", "page_token_count"])
def test_not_credential_params(name: str) -> None:
    assert not is_credential_param(name)


def test_the_url_kinds_declare_their_display_target() -> None:
    for name in ("http", "inference"):
        assert KINDS[name].shown_target("http://h.test/?key=abcd") == "http://h.test/?key=REDACTED"
    for name in ("icmp", "tcp"):
        assert KINDS[name].shown_target("h.test:1") == "h.test:1"


def test_hide_in_text() -> None:
    target, shown = "http://h.test/v1?key=s3cr%2Bt&x=1", "http://h.test/v1?key=REDACTED&x=1"
    assert hide_in_text(f"GET {target} failed", target, shown) == f"GET {shown} failed"
    assert hide_in_text("server said: bad key s3cr+t", target, shown) == "server said: bad key REDACTED"
    assert hide_in_text("echo /v1?key=s3cr%2Bt", target, shown) == "echo /v1?key=REDACTED"
    assert hide_in_text("x=1 stays", target, shown) == "x=1 stays"  # short, unchanged pieces are kept
    assert hide_in_text("anything", "a", "a") == "anything"


async def test_a_restricted_view_shares_its_owner_s_resources_and_closes_none() -> None:
    closed: list[str] = []

    class Res:
        async def aclose(self) -> None:
            closed.append("res")

    async def make() -> Res:
        return Res()

    async def refuse_all(name: str, address: str, port: int) -> str | None:
        return "no"

    owner = ProbeContext()
    assert owner.check_address is None
    view = owner.restricted(refuse_all)
    assert view.check_address is refuse_all
    res = await view.resource("k", make)
    assert await owner.resource("k", make) is res
    assert view.restricted(refuse_all).resource is not None
    await view.aclose()
    assert closed == [] and await owner.resource("k", make) is res
    await owner.aclose()
    assert closed == ["res"]
    with pytest.raises(RuntimeError, match="closed"):
        await view.resource("k", make)
