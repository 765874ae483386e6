"""write_atomic: the whole new content or the old one, the exact mode, no temporary left."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nydus.atomicwrite import write_atomic


def test_replaces_content_with_exact_mode(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    old_umask = os.umask(0o077)
    try:
        write_atomic(target, b"new" * 100_000, 0o644)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new" * 100_000
    assert target.stat().st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == ["f"]


def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "d"
    target.mkdir()  # renaming a file over a directory fails
    with pytest.raises(IsADirectoryError):
        write_atomic(target, b"x")
    assert os.listdir(tmp_path) == ["d"]
