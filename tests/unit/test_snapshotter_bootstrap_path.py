"""The snapshotter finds a Nydus image's bootstrap only as a regular file of the bootstrap
layer: a layer whose ``image/image.boot`` (or ``image``) is a symlink, which could name any
file of the host, is refused with a clear error and nothing is mounted."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import grpc
import pytest
from test_snapshotter_service import (  # noqa: F401 (env is a fixture)
    Env,
    RecordingMounter,
    env,
    pull_nydus_image,
)


@pytest.mark.parametrize("link", ["file", "dir"])
def test_symlinked_bootstrap_is_refused(env: Env, tmp_path: Path, link: str) -> None:  # noqa: F811
    boot = pull_nydus_image(env)
    host = tmp_path / "host"
    (host / "image").mkdir(parents=True)
    (host / "image" / "image.boot").write_bytes(b"a host file")
    fs = env.fs(boot)
    if link == "file":
        os.unlink(fs / "image" / "image.boot")
        os.symlink(host / "image" / "image.boot", fs / "image" / "image.boot")
    else:
        shutil.rmtree(fs / "image")
        os.symlink(host / "image", fs / "image")
    with pytest.raises(grpc.RpcError) as ei:
        env.prepare("default/5/ctr", boot)
    assert "symlink" in str(ei.value.details()), ei.value.details()  # type: ignore[attr-defined]
    assert isinstance(env.mounter, RecordingMounter) and not env.mounter.mounted
