"""Config files are bounded input: regular files only, at most 1 MiB, no YAML aliases, few labels.

Each case once hung, crashed or was accepted after tens of seconds: ``-c /dev/zero`` read without
end, a 50 MB config with 250,000 labels loaded in 44 s, and an 815-byte alias bomb passed
``agent check`` then crashed the real apply.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeprobe.agent.config import MAX_LABELS, load_agent_config
from edgeprobe.configfile import MAX_CONFIG_BYTES, ConfigError, read_yaml

GOOD = """\
agent: {id: a1, site: s1}
jobs:
  - kind: tcp
    targets: ["127.0.0.1:9"]
    interval_s: 30
"""

# Nine levels of nine aliases: 9**9 (387 million) leaves once expanded.
ALIAS_BOMB = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    + ["agent: {id: a1, site: s1, labels: {k: v}}", "jobs: []", "extra: *i"]
)


def test_device_is_refused_at_once() -> None:
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"^/dev/zero: not a regular file"):
        read_yaml("/dev/zero")
    assert time.monotonic() - t0 < 1.0


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "agent.yaml"
    os.mkfifo(fifo)  # nobody writes to it: a blocking open would hang forever
    with pytest.raises(ConfigError, match="not a regular file"):
        read_yaml(fifo)


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"^{tmp_path}: "):
        read_yaml(tmp_path)


def test_file_over_the_cap_is_refused_before_parsing(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text(GOOD + "# " + "x" * MAX_CONFIG_BYTES + "\n")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=rf"big.yaml: \d+ bytes; a config file may have at most {MAX_CONFIG_BYTES}"):
        load_agent_config(big)
    assert time.monotonic() - t0 < 1.0


def test_file_at_the_cap_is_read(tmp_path: Path) -> None:
    p = tmp_path / "agent.yaml"
    text = GOOD + "#" * (MAX_CONFIG_BYTES - len(GOOD) - 1) + "\n"
    p.write_text(text)
    assert p.stat().st_size == MAX_CONFIG_BYTES
    assert load_agent_config(p)[0].agent.id == "a1"


def test_alias_bomb_is_refused_with_its_line(tmp_path: Path) -> None:
    p = tmp_path / "bomb.yaml"
    p.write_text(ALIAS_BOMB)
    assert p.stat().st_size < 1024
    with pytest.raises(ConfigError) as err:
        load_agent_config(p)
    msg = str(err.value)
    assert msg.startswith(f"{p}: not valid YAML (line 2, column ") and "aliases (*name) are not accepted" in msg


def test_anchor_without_alias_is_fine(tmp_path: Path) -> None:
    p = tmp_path / "agent.yaml"
    p.write_text(GOOD.replace("agent: {", "agent: &me {"))
    assert load_agent_config(p)[0].agent.site == "s1"


def test_too_many_labels_are_refused(tmp_path: Path) -> None:
    labels = ", ".join(f"k{i}: v" for i in range(MAX_LABELS + 1))
    p = tmp_path / "agent.yaml"
    p.write_text(GOOD.replace("site: s1}", f"site: s1, labels: {{{labels}}}}}"))
    with pytest.raises(ConfigError, match=rf"agent.labels: {MAX_LABELS + 1} labels; at most {MAX_LABELS}"):
        load_agent_config(p)
    labels = ", ".join(f"k{i}: v" for i in range(MAX_LABELS))
    p.write_text(GOOD.replace("site: s1}", f"site: s1, labels: {{{labels}}}}}"))
    assert len(load_agent_config(p)[0].agent.labels) == MAX_LABELS


@pytest.mark.parametrize("path", ["/dev/zero", "bomb"])
def test_cli_check_answers_in_one_line(tmp_path: Path, path: str) -> None:
    if path == "bomb":
        (tmp_path / "bomb.yaml").write_text(ALIAS_BOMB)
        path = str(tmp_path / "bomb.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "edgeprobe", "agent", "check", "-c", path],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and path in lines[0] and "Traceback" not in proc.stderr, proc.stderr
