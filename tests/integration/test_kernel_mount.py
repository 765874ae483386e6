"""nydus.kernel_mount against the real kernel: file-backed EROFS with a blob device.

The image comes from Debian's mkfs.erofs 1.5 (``--chunksize=4096 --blobdev=BLOB META SRC``):
the same shape as a RAFS v6 bootstrap plus one blob, made by an independent tool. 1.5 cannot
store 255-byte names, so the corpus is built with ``max_name=254``.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from corpus import make_tree
from nydus.kernel_mount import (
    build_mount_data,
    erofs_supported,
    mount_erofs,
    umount,
    umount_or_detach,
)
from treecmp import compare_trees

MKFS = shutil.which("mkfs.erofs")


def test_mount_data_is_comma_separated_absolute_devices() -> None:
    assert build_mount_data(["/a/b", "/c"]) == b"device=/a/b,device=/c"
    assert build_mount_data(["/a"], "directio") == b"device=/a,directio"
    assert build_mount_data([]) == b""
    with pytest.raises(ValueError, match="absolute"):
        build_mount_data(["relative/blob"])
    with pytest.raises(ValueError, match="comma"):
        build_mount_data(["/a,b"])


def test_relative_paths_are_refused() -> None:
    with pytest.raises(ValueError, match="bootstrap path must be absolute"):
        mount_erofs("meta.img", "/mnt", [])
    with pytest.raises(ValueError, match="mountpoint path must be absolute"):
        mount_erofs("/meta.img", "mnt", [])


@pytest.fixture(scope="module")
def erofs_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(source tree, meta image, blob image) built by mkfs.erofs."""
    if MKFS is None:
        pytest.skip("mkfs.erofs not installed (scripts/setup.sh installs erofs-utils)")
    work = tmp_path_factory.mktemp("erofs")
    src = work / "src"
    make_tree(src, scale="small", max_name=254)
    meta, blob = work / "meta.img", work / "blob.img"
    proc = subprocess.run(
        [MKFS, "--chunksize=4096", f"--blobdev={blob}", str(meta), str(src)],
        capture_output=True,
        text=True,
        errors="replace",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return src, meta, blob


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    yield mnt
    if os.path.ismount(mnt):
        umount(mnt, lazy=True)


@pytest.mark.kernel
def test_erofs_supported() -> None:
    assert erofs_supported()


@pytest.mark.kernel
def test_mount_compare_umount(erofs_image: tuple[Path, Path, Path], mountpoint: Path) -> None:
    src, meta, blob = erofs_image
    mount_erofs(str(meta), str(mountpoint), [str(blob)])
    assert os.path.ismount(mountpoint)
    assert compare_trees(src, mountpoint) == []
    umount(str(mountpoint))
    assert not os.path.ismount(mountpoint)


@pytest.mark.kernel
def test_wrong_device_count_is_einval_with_hint(
    erofs_image: tuple[Path, Path, Path], mountpoint: Path
) -> None:
    _, meta, blob = erofs_image
    with pytest.raises(OSError) as exc:
        mount_erofs(meta, mountpoint, [blob, blob])
    assert exc.value.errno == errno.EINVAL
    assert "EINVAL" in str(exc.value) and "extra_devices" in str(exc.value)
    assert not os.path.ismount(mountpoint)


@pytest.mark.kernel
def test_not_an_erofs_image_is_einval(tmp_path: Path, mountpoint: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(bytes(8192))
    with pytest.raises(OSError) as exc:
        mount_erofs(junk, mountpoint, [])
    assert exc.value.errno == errno.EINVAL
    assert "dmesg" in str(exc.value)


@pytest.mark.kernel
def test_missing_bootstrap_is_enoent(tmp_path: Path, mountpoint: Path) -> None:
    with pytest.raises(OSError) as exc:
        mount_erofs(tmp_path / "nope.img", mountpoint, [])
    assert exc.value.errno == errno.ENOENT
    assert "ENOENT" in str(exc.value)


@pytest.mark.kernel
def test_umount_of_a_plain_directory_is_einval(tmp_path: Path) -> None:
    with pytest.raises(OSError) as exc:
        umount(tmp_path)
    assert exc.value.errno == errno.EINVAL
    assert "not a mount point" in str(exc.value)


@pytest.mark.kernel
def test_umount_or_detach_detaches_a_busy_mount_and_ignores_no_mount(
    erofs_image: tuple[Path, Path, Path], mountpoint: Path, tmp_path: Path
) -> None:
    src, meta, blob = erofs_image
    name = min(
        str(p.relative_to(src))
        for p in src.rglob("*")
        if p.is_file() and not p.is_symlink() and p.stat().st_size
    )
    mount_erofs(meta, mountpoint, [blob])
    held = os.open(mountpoint / name, os.O_RDONLY)  # makes a plain umount fail with EBUSY
    try:
        calls: list[bool] = []
        umount_or_detach(mountpoint, lambda: calls.append(os.path.ismount(mountpoint)))
        assert calls == [True]  # called once, before the detach
        assert not os.path.ismount(mountpoint)
        assert os.pread(held, 1 << 20, 0) == (src / name).read_bytes()  # still served
    finally:
        os.close(held)
    umount_or_detach(mountpoint, lambda: calls.append(False))  # EINVAL: not mounted, no call
    assert calls == [True]
    with pytest.raises(OSError) as exc:
        umount_or_detach(tmp_path / "missing")
    assert exc.value.errno == errno.ENOENT
