"""The hostile-layer corpus (``tests/hostile_tars.py``) through the layer extractor.

:func:`nydus.builder.extract.extract_layer` is what writes layers to disk (the snapshotter's
unpacker, ``nydus-pull``). Every case must either apply inside a fresh root, with the paths the
case names there, or fail with a clear FormatError; and in every case nothing outside the root
changes: a sentinel tree beside the root (files and a directory with known modes, owners and
contents, the target of the ``slip-*`` cases) is compared before and after, as are the
directory holding both and the host paths the corpus names. Run as root, so owners and modes
are really set. Both path resolvers run: openat2 (``RESOLVE_IN_ROOT``) and the component walk.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostile_tars import DEFAULT_OUTSIDE, Case, hostile_cases, make_sentinel, tree_state
from nydus.builder.extract import extract_layer
from nydus.builder.inroot import openat2_available
from nydus.errors import FormatError

HOST_CANARIES = [
    "/tmp/nydus-hostile-abs",
    "/tmp/nydus-hostile-through",
    "/evil",
    "/tmp/evil",
    DEFAULT_OUTSIDE.decode(),
    "/slip",
    "/tmp/slip",
]
SLOW = {"many-entries"}  # 200k files: the openat2 run only


def lexists_in(root: Path, path: str) -> bool:
    """Whether ``path`` (absolute in the image) exists below ``root``, without following
    symlinks and for paths longer than PATH_MAX."""
    parts = [p for p in path.split("/") if p]
    fd = os.open(root, os.O_PATH)
    try:
        for name in parts[:-1]:
            try:
                nfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY, dir_fd=fd)
            except OSError:
                return False
            os.close(fd)
            fd = nfd
        if not parts:
            return True
        try:
            os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True
    finally:
        os.close(fd)


def _cases() -> list[pytest.param]:  # type: ignore[valid-type]
    out = []
    for case in hostile_cases():
        for walk in (False, True):
            if walk and case.name in SLOW:
                continue
            how = "walk" if walk else "openat2"
            out.append(pytest.param(case.name, walk, id=f"{case.name}-{how}"))
    return out


@pytest.fixture
def clean_tmp(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, emptied after the test with rm(1): deep-path cases leave 2000-level trees
    that pytest's own (recursive) clean-up cannot remove."""
    yield tmp_path
    subprocess.run(["rm", "-rf", "--one-file-system", str(tmp_path / "root")], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="owners and modes need root")
@pytest.mark.parametrize(("name", "walk"), _cases())
def test_hostile_layer_extract(name: str, walk: bool, clean_tmp: Path) -> None:
    tmp_path = clean_tmp
    if not walk and not openat2_available():
        pytest.skip("no openat2 here")
    for canary in HOST_CANARIES:
        assert not os.path.lexists(canary), f"{canary} exists before the test"
    outside = tmp_path / "outside"
    make_sentinel(str(outside))
    case: Case = next(c for c in hostile_cases(os.fsencode(outside)) if c.name == name)
    layer = tmp_path / "layer"
    layer.write_bytes(case.make())
    root = tmp_path / "root"
    root.mkdir()
    before = tree_state(str(outside))
    beside = sorted(os.listdir(tmp_path))

    with open(layer, "rb") as f:
        if case.apply_expect == "either":  # depends on the file system
            try:
                extract_layer(f, root, use_openat2=not walk)
            except FormatError as e:
                assert case.apply_match in str(e), str(e)
        elif case.apply_expect == "error":
            with pytest.raises(FormatError) as ei:
                extract_layer(f, root, use_openat2=not walk)
            assert (case.apply_match or case.match) in str(ei.value), str(ei.value)
            assert "\n" not in str(ei.value)
        else:
            extract_layer(f, root, use_openat2=not walk)
            paths = case.paths if case.apply_paths is None else case.apply_paths
            for path in paths:
                assert lexists_in(root, path), f"{path} missing below the root"
            for path in case.absent:
                assert not lexists_in(root, path), f"{path} present below the root"

    assert tree_state(str(outside)) == before, "the sentinel outside the root changed"
    assert sorted(os.listdir(tmp_path)) == beside
    for canary in HOST_CANARIES:
        assert not os.path.lexists(canary), f"{case.name} wrote {canary}"
    if case.name.startswith("slip-") and case.apply_expect == "ok":
        # whatever the layer made is inside the root and is not the sentinel's
        sentinel_inodes = {v[5] for v in before.values()}
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames + filenames:
                st = os.lstat(os.path.join(dirpath, n))
                assert st.st_ino not in sentinel_inodes, (n, stat.filemode(st.st_mode))
