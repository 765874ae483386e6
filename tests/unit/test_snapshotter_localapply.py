"""The bootstrap layer applied by the snapshotter from its own content store (localapply.py).

A good layer is applied in ``Prepare``, committed under its chain ID (as containerd's lookup
after ALREADY_EXISTS finds it) with its bootstrap digest recorded; a stored blob whose bytes
do not hash to the layer's digest, a tar that reaches out of its root or holds a device node,
a layer that is not the chain ID asked for, and a blob that is not stored each fall back to
containerd's own apply (an ordinary active snapshot), counted and logged, with nothing written
outside the snapshot directories.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_snapshotter_service import RecordingMounter

from hostile_tars import end, entry
from nydus.format.erofs import EROFS_MAGIC
from nydus.snapshotter.containerd.errdefs import SnapshotExists, SnapshotNotFound
from nydus.snapshotter.content.remotelayers import LocalLayers, RemoteLayerRegistrar
from nydus.snapshotter.content.store import ContentStore
from nydus.snapshotter.snapshots.core import Snapshotter
from nydus.snapshotter.snapshots.imageref import chain_ids
from nydus.snapshotter.snapshots.labels import (
    CRI_LAYER_DIGEST,
    NYDUS_BLOB,
    NYDUS_BOOTSTRAP,
    SNAPSHOT_REF,
)
from nydus.snapshotter.snapshots.store import Kind

BLOB_DIFF = "sha256:" + "1" * 64  # the Nydus data-blob layer below the bootstrap
# what the snapshotter checks of a bootstrap before recording its digest: the EROFS magic
BOOT = bytes(1024) + EROFS_MAGIC.to_bytes(4, "little") + b"rest of the bootstrap" * 50


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def store_blob(store: ContentStore, digest: str, data: bytes) -> None:
    """``data`` as blob ``digest`` of ``store`` (whatever it hashes to)."""
    path = store.blob_path(digest)
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)


def boot_tar(*extra: bytes) -> bytes:
    return (
        entry(b"image/", typeflag=b"5", mode=0o755)
        + entry(b"image/image.boot", BOOT, mode=0o644)
        + b"".join(extra)
        + end()
    )


class Env:
    """A snapshotter with a content store of blob files and the layers it knows of."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.content = ContentStore(tmp / "content")
        self.local = LocalLayers(self.content)
        self.mounter = RecordingMounter(tmp / "mnt")
        self.sn = Snapshotter(tmp / "root", self.mounter, index_off=True, layer_blobs=self.local)
        # the data-blob layer below, committed as a remote layer the way the registrar does
        with pytest.raises(SnapshotExists):
            self.sn.prepare(
                "nydus-register-1 " + BLOB_DIFF, "", {SNAPSHOT_REF: BLOB_DIFF, NYDUS_BLOB: "true"}
            )

    def store(self, digest: str, data: bytes) -> None:
        store_blob(self.content, digest, data)

    def layer(self, tar: bytes, *, stored: bytes | None = None) -> tuple[str, str]:
        """Record a bootstrap layer made of ``tar`` (gzip) above the blob layer; store
        ``stored`` (default: the layer's real bytes) under its digest. (digest, chain ID)."""
        gz = gzip.compress(tar, mtime=0)
        digest = sha(gz)
        chain = chain_ids([BLOB_DIFF, sha(tar)])[-1]
        self.local.record(chain, BLOB_DIFF, digest)
        self.store(digest, gz if stored is None else stored)
        return digest, chain

    def prepare_layer(self, chain: str) -> list:  # type: ignore[type-arg]
        labels = {SNAPSHOT_REF: chain, NYDUS_BOOTSTRAP: "true"}
        return self.sn.prepare("nydus-register-2 " + chain, BLOB_DIFF, labels)

    def outside(self) -> set[str]:
        """Every path under the test's directory but the snapshots' own directories."""
        snaps = self.tmp / "root" / "snapshots"
        out = set()
        for dirpath, dirnames, filenames in os.walk(self.tmp):
            if Path(dirpath) == snaps:
                dirnames[:] = []
                continue
            out |= {os.path.join(dirpath, n) for n in dirnames + filenames}
        return out


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.sn.close()


def test_good_bootstrap_layer_is_applied_and_committed(env: Env) -> None:
    _, chain = env.layer(boot_tar())
    with pytest.raises(SnapshotExists):
        env.prepare_layer(chain)
    assert (env.sn.local_applies, env.sn.local_fallbacks) == (1, 0)
    # committed under the chain ID on the blob layer, found by containerd's lookup filter
    (info,) = env.sn.walk([f'labels."{SNAPSHOT_REF}"=={chain},parent=="{BLOB_DIFF}"'])
    assert info.kind == Kind.COMMITTED and info.name == chain
    assert info.labels[NYDUS_BOOTSTRAP] == "true"
    with env.sn.store.transaction() as tx:
        sid = tx.get_info(chain)[0]
    assert env.sn.bootstrap_file(sid).read_bytes() == BOOT
    assert env.sn.recorded_bootstrap_digest(sid) == sha(BOOT)
    assert env.sn.usage(chain).inodes == 3  # fs/, image/, image.boot
    # the active snapshot of the Prepare was never made: no other snapshot directory
    assert sorted(p.name for p in env.sn.snapshots_dir.iterdir()) == sorted(
        [str(sid), str(sid - 1)]
    )
    # asked again (another namespace): ALREADY_EXISTS, nothing applied twice
    with pytest.raises(SnapshotExists):
        env.prepare_layer(chain)
    assert env.sn.local_applies == 1
    # a container on the image gets the Nydus mount with the recorded digest
    env.sn.prepare("default/9/ctr", chain)
    ((path, _, _),) = env.mounter.mounted.values()
    assert path == env.sn.bootstrap_file(sid)
    assert list(env.mounter.digests.values()) == [sha(BOOT)]


def _fall_back(env: Env, chain: str, caplog: pytest.LogCaptureFixture, why: str) -> None:
    before = env.outside()
    with caplog.at_level(logging.WARNING, "nydus.snapshotter.snapshots.core"):
        mounts = env.prepare_layer(chain)
    # an ordinary active snapshot for containerd to apply the layer into
    ((kind, opts),) = [(m.type, m.options) for m in mounts]
    assert kind == "overlay" and any(o.startswith("upperdir=") for o in opts)
    assert env.sn.stat("nydus-register-2 " + chain).kind == Kind.ACTIVE
    with pytest.raises(SnapshotNotFound):
        env.sn.stat(chain)
    assert (env.sn.local_applies, env.sn.local_fallbacks) == (0, 1)
    assert "containerd applies it" in caplog.text and why in caplog.text, caplog.text
    # nothing written outside the snapshot directories, and no directory left behind but the
    # blob layer's and the active snapshot's (whose fs is empty)
    assert env.outside() == before
    dirs = sorted(env.sn.snapshots_dir.iterdir(), key=lambda p: int(p.name))
    assert len(dirs) == 2 and list((dirs[1] / "fs").iterdir()) == []
    assert not (env.tmp / "root" / "escape").exists() and not (env.tmp / "escape").exists()


def test_digest_mismatch_falls_back(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    # the stored file is another (valid) bootstrap layer than the one the manifest names
    other = gzip.compress(boot_tar(entry(b"image/other", b"x")), mtime=0)
    _, chain = env.layer(boot_tar(), stored=other)
    _fall_back(env, chain, caplog, "hashes to")


def test_tar_escaping_its_root_falls_back(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    _, chain = env.layer(boot_tar(entry(b"../escape", b"pwned"), entry(b"../../escape", b"x")))
    _fall_back(env, chain, caplog, "refused")


def test_device_node_or_symlink_falls_back(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    tar = boot_tar(
        entry(b"image/null", typeflag=b"3", devmajor=1, devminor=3),
        entry(b"image/link", typeflag=b"2", linkname=b"/etc/shadow"),
    )
    _, chain = env.layer(tar)
    _fall_back(env, chain, caplog, "may only hold dir, reg entries")


def test_bootstrap_layer_declaring_more_than_1_gib_falls_back(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    # refused at the header (a gzip of a few KiB could otherwise fill the disk with 2 GiB)
    _, chain = env.layer(boot_tar(entry(b"image/huge", size=2 << 30)))
    _fall_back(env, chain, caplog, "more than 1073741824 bytes of data")


def test_chain_id_mismatch_falls_back(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    # the blob is intact and matches its digest, but it is not the layer of the chain ID asked
    digest, _ = env.layer(boot_tar())
    wrong = chain_ids([BLOB_DIFF, sha(b"another diff")])[-1]
    env.local.record(wrong, BLOB_DIFF, digest)
    _fall_back(env, wrong, caplog, "makes chain ID")


def test_missing_blob_falls_back(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    digest, chain = env.layer(boot_tar())
    env.content.blob_path(digest).unlink()
    _fall_back(env, chain, caplog, "not in the content store")


def test_unknown_layer_falls_back(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    chain = chain_ids([BLOB_DIFF, sha(b"unrecorded")])[-1]
    _fall_back(env, chain, caplog, "unknown")


def test_cri_layer_digest_label_names_the_blob(env: Env) -> None:
    tar = boot_tar()
    gz = gzip.compress(tar, mtime=0)
    env.store(sha(gz), gz)  # stored, but no manifest recorded it
    chain = chain_ids([BLOB_DIFF, sha(tar)])[-1]
    labels = {SNAPSHOT_REF: chain, NYDUS_BOOTSTRAP: "true", CRI_LAYER_DIGEST: sha(gz)}
    with pytest.raises(SnapshotExists):
        env.sn.prepare("default/3/extract-3 " + chain, BLOB_DIFF, labels)
    assert env.sn.stat(chain).kind == Kind.COMMITTED


def test_label_less_unpack_is_never_answered_already_exists(env: Env) -> None:
    """containerd's metadata layer turns ALREADY_EXISTS without a target into an error: a
    Prepare whose caller passed no ``snapshot.ref`` (stock ``ctr``'s own unpack, labels derived
    by the snapshotter) must get an active snapshot even when the layer could be applied."""

    class Layers:
        def layer(self, namespace: str, chain_id: str):  # type: ignore[no-untyped-def]
            from nydus.snapshotter.snapshots.imageref import LayerMatch

            return LayerMatch("img", "m", 1, (BLOB_DIFF, chain_id), {NYDUS_BOOTSTRAP: "true"})

    env.sn.layers = Layers()
    _, chain = env.layer(boot_tar())
    mounts = env.sn.prepare(f"default/3/extract-3 {chain}", BLOB_DIFF)
    assert mounts and env.sn.local_applies == 0


def test_registrar_records_the_bootstrap_layer(tmp_path: Path) -> None:
    """The content side learns the bootstrap layer's blob and chain ID from the manifest."""
    docs: dict[str, bytes] = {}

    def add(doc: dict) -> str:  # type: ignore[type-arg]
        data = json.dumps(doc).encode()
        docs[sha(data)] = data
        return sha(data)

    tar = boot_tar()
    gz = gzip.compress(tar, mtime=0)
    diff_ids = [BLOB_DIFF, sha(tar)]
    cfg = add({"rootfs": {"type": "layers", "diff_ids": diff_ids}})
    manifest = add(
        {
            "config": {"digest": cfg},
            "layers": [
                {"digest": sha(b"blob"), "annotations": {NYDUS_BLOB: "true"}},
                {"digest": sha(gz), "annotations": {NYDUS_BOOTSTRAP: "true"}},
            ],
        }
    )
    local = LocalLayers(ContentStore(tmp_path / "content"))
    store_blob(local.store, sha(gz), gz)
    r = RemoteLayerRegistrar("/nonexistent.sock", docs.get, lambda: "nydus", local=local)
    plan = r.plan(manifest)
    assert plan is not None and plan.bootstrap is not None
    chain = chain_ids(diff_ids)[-1]
    assert (plan.bootstrap.chain_id, plan.bootstrap.parent) == (chain, BLOB_DIFF)
    assert plan.bootstrap.labels[NYDUS_BOOTSTRAP] == "true"
    assert local.layer_digest(chain, BLOB_DIFF) == sha(gz)
    assert local.layer_digest(chain, "sha256:" + "9" * 64) is None  # another parent
    assert local.has_blob(sha(gz)) and not local.has_blob(sha(b"blob"))
