"""The words and columns of ``fleet probe`` / ``fleet ls`` (issue 13, item 5): pure functions."""

from __future__ import annotations

from edgeprobe.fleet import missing_privileges, refusal_words, status_row
from edgeprobe.schema import Status


def test_refusal_words_never_say_refused() -> None:
    assert refusal_words("policy_loopback") == "denied by policy (policy_loopback)"
    assert refusal_words("token_budget") == "denied by policy (token_budget)"
    assert refusal_words("expired") == "request rejected (expired)"
    assert refusal_words(None) == "denied by policy (no code)"
    for code in ("policy_denied", "bad_signature", "replayed", "commands_disabled", None):
        assert "refused" not in refusal_words(code)


def test_status_row_splits_jobs_and_capabilities() -> None:
    st = Status(
        v=1, agent="a", site="s", state="online", at_ns=0, kinds=["icmp", "tcp"], job_kinds=["tcp"],
        icmp_permitted=False, accepts_commands=True,
    )  # fmt: skip
    assert missing_privileges(st) == {"icmp": "no perm"}
    row = status_row(st, now_ns=0)
    assert row["job_kinds"] == ["tcp"] and row["can_run"] == ["tcp"] and row["cannot_run"] == {"icmp": "no perm"}
    assert (row["accepts_commands"], row["accepts_config"]) == (True, False)
    old = Status(v=1, agent="a", site="s", state="online", at_ns=0, kinds=["icmp"])  # an older agent
    assert status_row(old, now_ns=0)["job_kinds"] is None and status_row(old, now_ns=0)["can_run"] == ["icmp"]
