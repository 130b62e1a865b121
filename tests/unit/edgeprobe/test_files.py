"""edgeprobe.files.write_new_file: the one way files that may hold secrets are written."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from edgeprobe.files import write_new_file


def test_new_file_gets_exactly_its_mode_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_new_file(tmp_path / "pub", b"x", mode=0o644)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "pub").stat().st_mode) == 0o644


def test_existing_entries_are_refused_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"old")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for name in ("f", "dangling"):
        with pytest.raises(FileExistsError):
            write_new_file(tmp_path / name, b"new")
    assert (tmp_path / "f").read_bytes() == b"old" and not (tmp_path / "nowhere").exists()
    with pytest.raises(IsADirectoryError):
        write_new_file(tmp_path, b"new", replace=True)


def test_replace_renames_a_new_file_into_place(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "cfg").symlink_to(victim)
    write_new_file(tmp_path / "cfg", b"new", replace=True)
    assert victim.read_bytes() == b"precious" and (tmp_path / "cfg").read_bytes() == b"new"
    assert stat.S_IMODE((tmp_path / "cfg").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg", "victim"]  # no temporary file left
