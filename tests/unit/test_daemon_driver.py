"""The data-path drivers without a kernel mount: FsDriver's one check at the config and API
edges, an EROFS image waiting for the daemon's FUSE mount, and the fallback to FUSE when the
kernel cannot mount file-backed EROFS."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from nydus import kernel_mount
from nydus.config import DaemonConfig, FsDriver
from nydus.daemon import DaemonOptions, ImageSource, Nydusd
from nydus.daemon.driver import ErofsDriver, FuseDriver
from nydus.errors import ConfigError


def _cfg(fixtures_dir: Path) -> dict[str, Any]:
    return {
        "device": {
            "backend": {"type": "localfs", "config": {"dir": str(fixtures_dir / "v6" / "blobs")}}
        }
    }


def test_fs_driver_config_values_and_messages(fixtures_dir: Path) -> None:
    cfg = _cfg(fixtures_dir)
    assert DaemonConfig.from_json({**cfg, "fs_driver": "erofs"}).fs_driver is FsDriver.EROFS
    assert DaemonConfig.from_json(cfg).fs_driver is None
    with pytest.raises(ConfigError) as ei:
        DaemonConfig.from_json({**cfg, "fs_driver": "nope"})
    assert str(ei.value) == 'fs_driver: expected "fusedev" or "erofs", got \'nope\''
    with pytest.raises(ConfigError, match="fs_driver: expected string, got 5"):
        DaemonConfig.from_json({**cfg, "fs_driver": 5})
    out = DaemonConfig.from_json({**cfg, "fs_driver": "fusedev"}).to_json()
    assert '"fs_driver": "fusedev"' in out


class _NoKernelErofs:
    """An ErofsManager stand-in whose kernel has no file-backed EROFS."""

    def __init__(self) -> None:
        self.images: dict[str, Any] = {}
        self.on_lost: Any = None
        self.tried: list[str] = []

    def mount(self, path: str, *args: Any, **kw: Any) -> None:
        self.tried.append(path)
        raise OSError(errno.ENOTBLK, "no file-backed erofs")


def test_erofs_driver_falls_back_to_fuse(fixtures_dir: Path, tmp_path: Path) -> None:
    d = Nydusd(DaemonOptions(mountpoint=str(tmp_path), blobfs_dir=str(tmp_path / "bfs")))
    boot = fixtures_dir / "v6" / "rafs-v6-2.2.boot"
    im = d.open_image("/img", ImageSource(str(boot), _cfg(fixtures_dir)))
    manager = _NoKernelErofs()
    lost: list[str] = []
    drv = ErofsDriver(manager, d.fuse, lambda: True, lost.append)  # type: ignore[arg-type]
    assert manager.on_lost is not None
    served = drv.attach(im)
    assert isinstance(served, FuseDriver) and manager.tried == ["/img"]
    im.driver = served
    assert im.describe()["fs_driver"] == "fusedev" and "erofs" not in im.describe()
    slot = d.vfs.mounts()["/img"]
    assert slot.on_close == im.close  # after the fallback the VFS owns the image
    served.detach(im)
    assert "/img" not in d.vfs.mounts() and slot.closed


@pytest.mark.skipif(not kernel_mount.erofs_supported(), reason="needs erofs in the kernel")
def test_erofs_image_waits_for_the_fuse_mount(fixtures_dir: Path, tmp_path: Path) -> None:
    d = Nydusd(DaemonOptions(mountpoint=str(tmp_path), blobfs_dir=str(tmp_path / "bfs")))
    boot = fixtures_dir / "v6" / "rafs-v6-2.2.boot"
    im = d.mount("/img", ImageSource(str(boot), _cfg(fixtures_dir)), fs_driver=FsDriver.EROFS)
    try:
        assert im.driver is d.erofs
        info = d.info()["backend_collection"]["/img"]
        assert info["fs_driver"] == "erofs" and info["erofs"] is None  # no kernel mount yet
        fuse = d.mount("/f", ImageSource(str(boot), _cfg(fixtures_dir)), fs_driver=FsDriver.FUSEDEV)
        assert fuse.driver is d.fuse and "erofs" not in fuse.describe()
    finally:
        d.shutdown()
