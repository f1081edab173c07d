import os
from pathlib import Path

import pytest

from pmet.fileio import atomic_folder, atomic_write


def test_atomic_write_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write(tmp_path / "sub" / "out.json", lambda tmp: Path(tmp).write_text("{}"))
    finally:
        os.umask(old)
    assert p.read_text() == "{}"
    assert p.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")

    def broken(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.json"]


def test_atomic_folder_all_or_nothing(tmp_path):
    """A folder written by atomic_folder appears whole (ordinary permissions) or not at all."""
    def broken(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_folder(tmp_path / "model", broken)
    assert os.listdir(tmp_path) == []
    old = os.umask(0o022)
    try:
        out = atomic_folder(tmp_path / "cache" / "model", lambda tmp: (tmp / "config.json").write_text("{}"))
    finally:
        os.umask(old)
    assert os.listdir(out) == ["config.json"] and os.listdir(out.parent) == ["model"]
    assert out.stat().st_mode & 0o777 == 0o755
