"""Signed controller messages: signature, expiry, replay, tampering (agent/signing.py)."""

from __future__ import annotations

import base64
import stat
import time
from pathlib import Path

import msgspec
import pytest

from edgeprobe.agent.control import AdhocCommand, ConfigDocument
from edgeprobe.signing import (
    SignatureError,
    SignedMessage,
    Verifier,
    generate_key,
    load_private_key,
    load_public_key,
    sign,
    stamp,
)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    generate_key(tmp_path / "c.key", tmp_path / "c.pub")
    return tmp_path / "c.key", tmp_path / "c.pub"


def _cmd(ttl_s: float = 60.0, now_ns: int | None = None) -> AdhocCommand:
    return AdhocCommand(**stamp(ttl_s, now_ns), request_id="r1", agent="a1", kind="tcp", target="127.0.0.1:1")


def _code(fn: object) -> str:
    with pytest.raises(SignatureError) as info:
        fn()  # type: ignore[operator]
    return info.value.code


def test_round_trip_and_private_key_mode(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    assert priv.stat().st_mode & 0o777 == 0o600
    v = Verifier(load_public_key(pub), max_ttl_s=300)
    cmd = _cmd()
    got = v.open(sign(cmd, "cmd", load_private_key(priv)), "cmd", AdhocCommand, replay=True)
    assert got == cmd


def test_refusals(keys: tuple[Path, Path], tmp_path: Path) -> None:
    priv, pub = keys
    key = load_private_key(priv)
    v = Verifier(load_public_key(pub), max_ttl_s=300)
    raw = sign(_cmd(), "cmd", key)
    # unsigned: a bare command
    assert _code(lambda: v.open(msgspec.json.encode(_cmd()), "cmd", AdhocCommand, replay=True)) == "unsigned"
    # tampered: payload changed after signing
    msg = msgspec.json.decode(raw, type=SignedMessage)
    bad = msgspec.structs.replace(msg, payload=msg.payload.replace("127.0.0.1:1", "127.0.0.1:2"))
    assert _code(lambda: v.open(msgspec.json.encode(bad), "cmd", AdhocCommand, replay=True)) == "bad_signature"
    # signed by another key
    generate_key(tmp_path / "o.key", tmp_path / "o.pub")
    other = sign(_cmd(), "cmd", load_private_key(tmp_path / "o.key"))
    assert _code(lambda: v.open(other, "cmd", AdhocCommand, replay=True)) == "bad_signature"
    # a config signature is no command signature
    doc = ConfigDocument(**stamp(60), topic="t")
    assert _code(lambda: v.open(sign(doc, "config", key), "cmd", AdhocCommand, replay=True)) == "bad_signature"
    # expired
    old = sign(_cmd(ttl_s=1, now_ns=time.time_ns() - 10**10), "cmd", key)
    assert _code(lambda: v.open(old, "cmd", AdhocCommand, replay=True)) == "expired"
    # too long-lived (would make the replay cache unbounded)
    assert _code(lambda: v.open(sign(_cmd(ttl_s=3600), "cmd", key), "cmd", AdhocCommand, replay=True)) == "ttl_too_long"
    # replayed
    v.open(raw, "cmd", AdhocCommand, replay=True)
    assert _code(lambda: v.open(raw, "cmd", AdhocCommand, replay=True)) == "replayed"
    # garbage signature encoding
    junk = msgspec.json.encode(SignedMessage(v=1, payload=msg.payload, sig=base64.b64encode(b"x").decode() + "!"))
    assert _code(lambda: v.open(junk, "cmd", AdhocCommand, replay=True)) == "bad_signature"


def test_replay_cache_is_bounded_by_expiry(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    key = load_private_key(priv)
    v = Verifier(load_public_key(pub), max_ttl_s=300, max_nonces=3)
    now = time.time_ns()
    for _ in range(3):
        v.open(sign(_cmd(ttl_s=5, now_ns=now), "cmd", key), "cmd", AdhocCommand, replay=True, now_ns=now)
    full = sign(_cmd(ttl_s=5, now_ns=now), "cmd", key)
    assert _code(lambda: v.open(full, "cmd", AdhocCommand, replay=True, now_ns=now)) == "busy"
    later = now + 6 * 10**9  # the three have expired: their nonces are forgotten
    fresh = sign(_cmd(ttl_s=5, now_ns=later), "cmd", key)
    v.open(fresh, "cmd", AdhocCommand, replay=True, now_ns=later)
    assert len(v._seen) == 1


def test_keygen_creates_the_private_key_0600_even_over_a_wider_file(tmp_path: Path) -> None:
    priv, pub = tmp_path / "c.key", tmp_path / "c.pub"
    priv.write_text("old")
    priv.chmod(0o644)
    with pytest.raises(FileExistsError, match="use --force"):
        generate_key(priv, pub)
    assert priv.read_text() == "old"  # refused: nothing overwritten
    generate_key(priv, pub, replace=True)
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    load_private_key(priv)


def test_keygen_never_writes_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = tmp_path / "c.key"
    link.symlink_to(victim)
    with pytest.raises(FileExistsError):
        generate_key(link, tmp_path / "c.pub")
    generate_key(link, tmp_path / "c.pub", replace=True)  # the link is replaced, not followed
    assert victim.read_text() == "precious" and not link.is_symlink()
    assert stat.S_IMODE(link.stat().st_mode) == 0o600


def test_cli_keygen_refuses_to_overwrite_in_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgeprobe.cli import main

    priv, pub = tmp_path / "c.key", tmp_path / "c.pub"
    runner = CliRunner()
    assert runner.invoke(main, ["fleet", "keygen", str(priv), str(pub)]).exit_code == 0
    first = priv.read_bytes()
    res = runner.invoke(main, ["fleet", "keygen", str(priv), str(pub)])
    assert res.exit_code != 0 and "exists; use --force" in res.output and priv.read_bytes() == first
    assert runner.invoke(main, ["fleet", "keygen", "--force", str(priv), str(pub)]).exit_code == 0
    assert priv.read_bytes() != first
