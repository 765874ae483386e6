"""The Snapshots gRPC service in process: overlay semantics, remote Nydus layers, errors.

Each test talks to a real grpcio server on a unix socket through a real channel, as containerd
does; only the Nydus mounter is a test double (it hands out plain directories and records calls).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2, field_mask_pb2

from nydus.errors import BackendError
from nydus.snapshotter.containerd.errdefs import SnapshotExists, SnapshotPreconditionFailed
from nydus.snapshotter.containerd.proto import (
    CONTENT_SERVICE,
    IMAGES_SERVICE,
    SNAPSHOTS_SERVICE,
    content_pb2,
    descriptor_pb2,
    images_pb2,
    snapshots_pb2,
)
from nydus.snapshotter.containerd.rpc import ServiceClient, generic_handler
from nydus.snapshotter.server import SnapshotterServer
from nydus.snapshotter.snapshots.core import Snapshotter
from nydus.snapshotter.snapshots.imageref import ContainerdImageResolver, LayerMatch, chain_ids
from nydus.snapshotter.snapshots.labels import (
    CRI_IMAGE_REF,
    NYDUS_BLOB,
    NYDUS_BOOTSTRAP,
    NYDUS_FS_VERSION,
    SNAPSHOT_REF,
)
from nydus.snapshotter.snapshots.mounter import (
    DaemonManagerMissing,
    MountRequest,
    NydusMounter,
    RecoveredMount,
)

S = snapshots_pb2


class RecordingMounter(NydusMounter):
    """Test double: "mounts" by handing out an empty directory, records every call."""

    def __init__(self, base: Path, fail: bool = False) -> None:
        self.base = base
        self.fail = fail
        self.mounted: dict[str, tuple[Path, str | None, dict[str, str]]] = {}
        self.umounted: list[str] = []
        self.recovered: list[RecoveredMount] = []
        self.gc_calls: list[list[Path]] = []
        self.digests: dict[str, str | None] = {}

    def mount(self, request: MountRequest) -> Path:
        snapshot_id, bootstrap_path = request.snapshot_id, request.bootstrap_path
        labels = request.labels
        image_ref, bootstrap_digest = request.image_ref, request.bootstrap_digest
        if self.fail:
            raise SnapshotPreconditionFailed("mounter told to fail")
        assert bootstrap_path.is_file()
        self.mounted[snapshot_id] = (bootstrap_path, image_ref, dict(labels))
        self.digests[snapshot_id] = bootstrap_digest
        d = self.base / f"rafs-{snapshot_id}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def umount(self, snapshot_id: str) -> None:
        self.umounted.append(snapshot_id)

    def recover(self, mounts: Sequence[RecoveredMount]) -> None:
        self.recovered = list(mounts)

    def collect_garbage(self, live_bootstraps: Sequence[Path]) -> None:
        self.gc_calls.append(list(live_bootstraps))


class FakeResolver:
    def __init__(self, ref: str | None) -> None:
        self.ref = ref
        self.asked: list[tuple[str, str]] = []

    def image_ref(self, namespace: str, chain_id: str) -> str | None:
        self.asked.append((namespace, chain_id))
        return self.ref


class Env:
    """A snapshotter + server on a short socket path, and a client for it."""

    def __init__(self, root: Path, mounter: NydusMounter, resolver: FakeResolver | None) -> None:
        self.root = root
        self.mounter = mounter
        self.resolver = resolver
        self.sock_dir = Path(tempfile.mkdtemp(prefix="snt", dir="/tmp"))
        self.start()

    def start(self) -> None:
        self.sn = Snapshotter(self.root, self.mounter, self.resolver, index_off=True)
        self.server = SnapshotterServer(self.sn, self.sock_dir / "s.sock", max_workers=4)
        self.server.start()
        self.channel = grpc.insecure_channel(f"unix:{self.sock_dir / 's.sock'}")
        self.c = ServiceClient(self.channel, SNAPSHOTS_SERVICE, timeout=10)

    def stop(self) -> None:
        self.channel.close()
        self.server.stop()
        self.sn.close()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.sock_dir, ignore_errors=True)

    # thin wrappers -----------------------------------------------------------------------
    def prepare(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list:
        r = self.c.unary(
            "Prepare",
            S.PrepareSnapshotRequest(key=key, parent=parent, labels=labels or {}),
            S.PrepareSnapshotResponse,
        )
        return list(r.mounts)

    def view(self, key: str, parent: str) -> list:
        r = self.c.unary(
            "View", S.ViewSnapshotRequest(key=key, parent=parent), S.ViewSnapshotResponse
        )
        return list(r.mounts)

    def mounts(self, key: str) -> list:
        return list(self.c.unary("Mounts", S.MountsRequest(key=key), S.MountsResponse).mounts)

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> None:
        req = S.CommitSnapshotRequest(name=name, key=key, labels=labels or {})
        self.c.unary("Commit", req, empty_pb2.Empty)

    def remove(self, key: str) -> None:
        self.c.unary("Remove", S.RemoveSnapshotRequest(key=key), empty_pb2.Empty)

    def stat(self, key: str) -> S.Info:
        return self.c.unary("Stat", S.StatSnapshotRequest(key=key), S.StatSnapshotResponse).info

    def list(self, *filters: str) -> list[S.Info]:
        req = S.ListSnapshotsRequest(filters=list(filters))
        return [i for r in self.c.stream("List", req, S.ListSnapshotsResponse) for i in r.info]

    def usage(self, key: str) -> S.UsageResponse:
        return self.c.unary("Usage", S.UsageRequest(key=key), S.UsageResponse)

    def cleanup(self) -> None:
        self.c.unary("Cleanup", S.CleanupRequest(), empty_pb2.Empty)

    def fs(self, key_or_id: str | int) -> Path:
        if isinstance(key_or_id, int):
            sid = key_or_id
        else:
            with self.sn.store.transaction() as tx:
                sid = tx.get_info(key_or_id)[0]
        return self.root / "snapshots" / str(sid) / "fs"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path / "root", RecordingMounter(tmp_path / "mnt"), FakeResolver("reg:5000/img:1"))
    yield e
    e.close()


def code_of(fn, *args) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as ei:
        fn(*args)
    return ei.value.code()  # type: ignore[attr-defined,no-any-return]


def snapshot_dirs(e: Env) -> list[str]:
    return sorted(p.name for p in (e.root / "snapshots").iterdir())


# -- overlay semantics (containerd's overlayfs snapshotter) ------------------------------------


def test_layers_mount_like_containerd_overlay(env: Env) -> None:
    (m,) = env.prepare("default/1/extract-a sha256:a")
    assert (m.type, list(m.options)) == ("bind", ["rw", "rbind"])
    a = Path(m.source)
    assert a == env.fs("default/1/extract-a sha256:a") and a.is_dir()
    assert (a.parent / "work").is_dir()
    (a / "file-a").write_text("a")
    env.commit("default/2/sha256:a", "default/1/extract-a sha256:a")

    (m,) = env.prepare("default/3/extract-b", "default/2/sha256:a")
    b = env.fs("default/3/extract-b")
    assert m.type == "overlay" and m.source == "overlay"
    assert list(m.options) == [
        "index=off",
        f"workdir={b.parent / 'work'}",
        f"upperdir={b}",
        f"lowerdir={a}",
    ]
    env.commit("default/4/sha256:b", "default/3/extract-b")

    # a view of one layer is a read-only bind of that layer
    (m,) = env.view("default/5/v1", "default/2/sha256:a")
    assert (m.type, m.source, list(m.options)) == ("bind", str(a), ["ro", "rbind"])
    assert not (env.fs("default/5/v1").parent / "work").exists()
    # a view of several layers is a lowerdir-only overlay, nearest layer first
    (m,) = env.view("default/6/v2", "default/4/sha256:b")
    assert list(m.options) == ["index=off", f"lowerdir={b}:{a}"]
    # a view without parent binds its own empty dir read-only
    (m,) = env.view("default/7/v3", "")
    assert list(m.options) == ["ro", "rbind"]
    # a container on top of both layers
    (m,) = env.prepare("default/8/ctr", "default/4/sha256:b")
    assert list(m.options)[-1] == f"lowerdir={b}:{a}"
    assert env.mounts("default/8/ctr") == [m]


def test_stat_list_usage_update(env: Env) -> None:
    env.prepare("default/1/x", "", {"k": "v"})
    info = env.stat("default/1/x")
    assert (info.name, info.parent, info.kind, dict(info.labels)) == (
        "default/1/x",
        "",
        S.ACTIVE,
        {"k": "v"},
    )
    assert info.created_at.seconds > 0
    (env.fs("default/1/x") / "data").write_bytes(b"z" * 8192)
    u = env.usage("default/1/x")
    assert u.inodes == 2 and u.size >= 8192
    env.commit("default/2/c", "default/1/x", {"c": "1"})
    assert env.usage("default/2/c") == u
    assert env.stat("default/2/c").kind == S.COMMITTED
    env.prepare("default/3/y", "default/2/c")
    assert [i.name for i in env.list()] == ["default/2/c", "default/3/y"]
    assert [i.name for i in env.list("kind==active")] == ["default/3/y"]
    assert [i.name for i in env.list('parent=="default/2/c"', "labels.c==1")] == [
        "default/2/c",
        "default/3/y",
    ]
    req = S.UpdateSnapshotRequest(
        info=S.Info(name="default/2/c", labels={"c": "2", "d": "3"}),
        update_mask=field_mask_pb2.FieldMask(paths=["labels.d"]),
    )
    out = env.c.unary("Update", req, S.UpdateSnapshotResponse).info
    assert dict(out.labels) == {"c": "1", "d": "3"}
    assert dict(env.stat("default/2/c").labels) == {"c": "1", "d": "3"}


def test_error_codes(env: Env) -> None:
    env.prepare("default/1/a")
    env.commit("default/2/c", "default/1/a")
    env.prepare("default/3/b", "default/2/c")
    env.view("default/4/v", "default/2/c")
    G = grpc.StatusCode
    assert code_of(env.prepare, "default/3/b", "default/2/c") == G.ALREADY_EXISTS
    assert code_of(env.prepare, "default/5/z", "default/9/none") == G.NOT_FOUND
    assert code_of(env.prepare, "default/5/z", "default/3/b") == G.INVALID_ARGUMENT
    assert code_of(env.mounts, "default/2/c") == G.FAILED_PRECONDITION
    assert code_of(env.mounts, "nope") == G.NOT_FOUND
    assert code_of(env.stat, "nope") == G.NOT_FOUND
    assert code_of(env.commit, "default/2/c", "default/3/b") == G.ALREADY_EXISTS
    assert code_of(env.commit, "default/6/d", "default/4/v") == G.FAILED_PRECONDITION
    assert code_of(env.remove, "default/2/c") == G.FAILED_PRECONDITION
    assert code_of(env.remove, "nope") == G.NOT_FOUND
    assert code_of(env.list, "name==") == G.INVALID_ARGUMENT


def test_remove_and_cleanup_leave_no_dirs(env: Env) -> None:
    env.prepare("default/1/a")
    env.commit("default/2/c", "default/1/a")
    env.prepare("default/3/b", "default/2/c")
    assert len(snapshot_dirs(env)) == 2
    env.remove("default/3/b")
    env.remove("default/2/c")
    assert snapshot_dirs(env) == []
    # Cleanup deletes directories the metadata does not know about
    stray = env.root / "snapshots" / "9999" / "fs"
    stray.mkdir(parents=True)
    (stray / "junk").write_text("x")
    (env.root / "snapshots" / "rm-12").mkdir()
    env.prepare("default/4/keep")
    env.cleanup()
    assert snapshot_dirs(env) == [str(_id(env, "default/4/keep"))]


def _id(env: Env, key: str) -> int:
    with env.sn.store.transaction() as tx:
        return tx.get_info(key)[0]


def test_state_survives_restart(env: Env) -> None:
    env.prepare("default/1/a")
    env.commit("default/2/c", "default/1/a")
    before = env.prepare("default/3/b", "default/2/c")
    env.stop()
    env.start()
    assert env.mounts("default/3/b") == before
    assert [i.name for i in env.list()] == ["default/2/c", "default/3/b"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount overlayfs")
def test_returned_mounts_really_mount(env: Env, tmp_path: Path) -> None:
    env.prepare("default/1/a")
    (env.fs("default/1/a") / "f").write_text("lower\n")
    (env.fs("default/1/a") / "only-a").write_text("a\n")
    env.commit("default/2/a", "default/1/a")
    env.prepare("default/3/b", "default/2/a")
    (env.fs("default/3/b") / "f").write_text("upper\n")
    env.commit("default/4/b", "default/3/b")
    (m,) = env.prepare("default/5/ctr", "default/4/b")
    target = tmp_path / "rootfs"
    target.mkdir()
    subprocess.run(
        ["mount", "-t", m.type, m.source, "-o", ",".join(m.options), str(target)], check=True
    )
    try:
        assert (target / "f").read_text() == "upper\n"
        assert (target / "only-a").read_text() == "a\n"
        (target / "new").write_text("rw\n")
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert (env.fs("default/5/ctr") / "new").read_text() == "rw\n"


# -- Nydus remote snapshots --------------------------------------------------------------------

CHAIN1, CHAIN2, CHAIN3 = "sha256:" + "1" * 64, "sha256:" + "2" * 64, "sha256:" + "3" * 64


def pull_nydus_image(e: Env, ns: str = "default", cri_ref: str | None = None) -> str:
    """Replay what containerd's unpacker does for a Nydus image; return the bootstrap name."""
    extra = {CRI_IMAGE_REF: cri_ref} if cri_ref else {}
    G = grpc.StatusCode
    blob = {NYDUS_BLOB: "true", **extra}
    # two blob layers: skipped, committed under their chain IDs
    assert code_of(e.prepare, f"{ns}/1/extract-1 {CHAIN1}", "", {SNAPSHOT_REF: CHAIN1, **blob}) == (
        G.ALREADY_EXISTS
    )
    assert code_of(
        e.prepare, f"{ns}/2/extract-2 {CHAIN2}", CHAIN1, {SNAPSHOT_REF: CHAIN2, **blob}
    ) == (G.ALREADY_EXISTS)
    # containerd then looks the target up with exactly this filter
    (found,) = e.list(f'labels."containerd.io/snapshot.ref"=={CHAIN2},parent=="{CHAIN1}"')
    assert found.kind == S.COMMITTED and found.name == CHAIN2
    # the bootstrap layer is unpacked normally on top of the (empty) remote layers
    labels = {SNAPSHOT_REF: CHAIN3, NYDUS_BOOTSTRAP: "true", **extra}
    (m,) = e.prepare(f"{ns}/3/extract-3 {CHAIN3}", CHAIN2, labels)
    assert m.type == "overlay"
    boot = e.fs(f"{ns}/3/extract-3 {CHAIN3}")
    (boot / "image").mkdir()
    (boot / "image" / "image.boot").write_bytes(b"bootstrap")
    e.commit(f"{ns}/4/{CHAIN3}", f"{ns}/3/extract-3 {CHAIN3}", labels)
    return f"{ns}/4/{CHAIN3}"


def test_nydus_blob_layers_are_skipped_idempotently(env: Env) -> None:
    pull_nydus_image(env)
    # a second pull (other namespace) finds the remote layers already there
    G = grpc.StatusCode
    labels = {SNAPSHOT_REF: CHAIN1, NYDUS_BLOB: "true"}
    assert code_of(env.prepare, "other/1/extract-1 x", "", labels) == G.ALREADY_EXISTS
    names = [i.name for i in env.list()]
    assert names.count(CHAIN1) == 1 and names.count(CHAIN2) == 1
    assert "other/1/extract-1 x" not in names


def test_container_on_nydus_image_gets_nydus_lower(env: Env) -> None:
    boot = pull_nydus_image(env)
    (m,) = env.prepare("default/5/ctr", boot)
    mounter = env.mounter
    assert isinstance(mounter, RecordingMounter)
    (sid,) = mounter.mounted
    bootstrap_path, image_ref, labels = mounter.mounted[sid]
    assert bootstrap_path == env.fs(boot) / "image" / "image.boot"
    assert image_ref == "reg:5000/img:1"
    assert labels[NYDUS_BOOTSTRAP] == "true"
    assert env.resolver is not None and env.resolver.asked == [("default", CHAIN3)]
    upper = env.fs("default/5/ctr")
    assert list(m.options) == [
        "index=off",
        f"workdir={upper.parent / 'work'}",
        f"upperdir={upper}",
        f"lowerdir={mounter.base / f'rafs-{sid}'}",
    ]
    assert env.mounts("default/5/ctr") == [m]
    # a view of the image binds the Nydus mount read-only
    (v,) = env.view("default/6/view", boot)
    view_id = str(_id(env, "default/6/view"))
    assert (v.type, v.source, list(v.options)) == (
        "bind",
        str(mounter.base / f"rafs-{view_id}"),
        ["ro", "rbind"],
    )
    # removing releases the mounts
    env.remove("default/5/ctr")
    env.remove("default/6/view")
    assert mounter.umounted == [sid, view_id]
    with env.sn.store.transaction() as tx:
        assert tx.nydus_mounts() == []


def test_cri_label_wins_over_containerd_lookup(env: Env) -> None:
    boot = pull_nydus_image(env, cri_ref="registry.example/app:cri")
    env.prepare("default/5/ctr", boot)
    assert isinstance(env.mounter, RecordingMounter)
    ((_, ref, _),) = env.mounter.mounted.values()
    assert ref == "registry.example/app:cri"
    assert env.resolver is not None and env.resolver.asked == []


def test_nydus_mount_survives_restart_and_is_recovered(env: Env) -> None:
    boot = pull_nydus_image(env)
    before = env.prepare("default/5/ctr", boot)
    env.stop()
    env.start()
    assert env.mounts("default/5/ctr") == before
    assert isinstance(env.mounter, RecordingMounter)
    (rec,) = env.mounter.recovered
    assert rec.image_ref == "reg:5000/img:1"
    assert rec.bootstrap_path == env.fs(boot) / "image" / "image.boot"


def test_without_daemon_manager_nydus_fails_clearly_and_leaves_nothing(tmp_path: Path) -> None:
    e = Env(tmp_path / "root", DaemonManagerMissing(), FakeResolver("reg:5000/img:1"))
    try:
        boot = pull_nydus_image(e)
        dirs = snapshot_dirs(e)
        with pytest.raises(grpc.RpcError) as ei:
            e.prepare("default/5/ctr", boot)
        assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
        msg = ei.value.details()  # type: ignore[attr-defined]
        assert "daemon manager" in msg and "reg:5000/img:1" in msg
        assert "default/5/ctr" not in [i.name for i in e.list()]
        assert snapshot_dirs(e) == dirs
        # plain images still work with the same snapshotter
        e.prepare("default/6/plain")
    finally:
        e.close()


def test_failed_mount_leaves_nothing(tmp_path: Path) -> None:
    e = Env(tmp_path / "root", RecordingMounter(tmp_path / "mnt", fail=True), FakeResolver(None))
    try:
        boot = pull_nydus_image(e)
        dirs = snapshot_dirs(e)
        assert code_of(e.prepare, "default/5/ctr", boot) == grpc.StatusCode.FAILED_PRECONDITION
        assert snapshot_dirs(e) == dirs
    finally:
        e.close()


def test_cleanup_releases_mounts_of_vanished_snapshots(env: Env) -> None:
    boot = pull_nydus_image(env)
    env.prepare("default/5/ctr", boot)
    sid = _id(env, "default/5/ctr")
    with env.sn.store.transaction(writable=True) as tx:  # as if we crashed before umount
        tx.remove("default/5/ctr")
    env.cleanup()
    assert isinstance(env.mounter, RecordingMounter)
    assert env.mounter.umounted == [str(sid)]
    with env.sn.store.transaction() as tx:
        assert tx.nydus_mounts() == []
    assert str(sid) not in snapshot_dirs(env)


def test_gc_gets_the_bootstraps_left_after_cleanup_and_bootstrap_removal(env: Env) -> None:
    assert isinstance(env.mounter, RecordingMounter)
    boot = pull_nydus_image(env)
    boot_file = env.fs(boot) / "image" / "image.boot"
    env.prepare("default/5/ctr", boot)
    env.remove("default/5/ctr")
    assert env.mounter.gc_calls == []  # a container's snapshot: no image went away
    env.cleanup()
    assert env.mounter.gc_calls == [[boot_file]]
    env.remove(boot)  # the image's bootstrap layer: its blobs may be unused now
    assert env.mounter.gc_calls[-1] == []


# -- image reference lookup through containerd's API (a fake containerd) ----------------------


class FakeContainerd:
    """Images + Content services serving a handful of JSON blobs."""

    def __init__(self, images: list[tuple[str, str, str]], blobs: dict[str, bytes]) -> None:
        self.images = images  # (name, media type, digest)
        self.blobs = blobs
        self.namespaces: list[str] = []

    def list_images(self, req: images_pb2.ListImagesRequest, ctx: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        self.namespaces += [v for k, v in ctx.invocation_metadata() if k == "containerd-namespace"]
        return images_pb2.ListImagesResponse(
            images=[
                images_pb2.Image(
                    name=n,
                    target=descriptor_pb2.Descriptor(
                        media_type=mt, digest=d, size=len(self.blobs.get(d, b""))
                    ),
                )
                for n, mt, d in self.images
            ]
        )

    def read(self, req: content_pb2.ReadContentRequest, ctx: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        if req.digest not in self.blobs:
            ctx.abort(grpc.StatusCode.NOT_FOUND, f"content {req.digest} not found")
        data = self.blobs[req.digest]
        for off in range(0, len(data), 7):  # several chunks, as a stream
            yield content_pb2.ReadContentResponse(offset=off, data=data[off : off + 7])


def _blob(blobs: dict[str, bytes], doc: dict) -> str:  # type: ignore[type-arg]
    import hashlib

    data = json.dumps(doc).encode()
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[d] = data
    return d


def test_resolver_finds_image_by_chain_id(tmp_path: Path) -> None:
    blobs: dict[str, bytes] = {}
    diff_ids = ["sha256:" + "a" * 64, "sha256:" + "b" * 64]
    other_cfg = _blob(blobs, {"rootfs": {"type": "layers", "diff_ids": ["sha256:" + "c" * 64]}})
    cfg = _blob(blobs, {"rootfs": {"type": "layers", "diff_ids": diff_ids}})
    oci_m = "application/vnd.oci.image.manifest.v1+json"
    other = _blob(blobs, {"mediaType": oci_m, "config": {"digest": other_cfg}, "layers": []})
    manifest = _blob(blobs, {"mediaType": oci_m, "config": {"digest": cfg}, "layers": []})
    index = _blob(
        blobs,
        {
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {"mediaType": oci_m, "digest": other},
                {"mediaType": oci_m, "digest": manifest},
            ],
        },
    )
    fake = FakeContainerd(
        [
            ("127.0.0.1:5000/other:1", oci_m, other),
            ("127.0.0.1:5000/broken:1", oci_m, "sha256:" + "f" * 64),  # content gone
            ("127.0.0.1:5000/nydus:1", "application/vnd.oci.image.index.v1+json", index),
        ],
        blobs,
    )
    sock = Path(tempfile.mkdtemp(prefix="ctd", dir="/tmp")) / "c.sock"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        [
            generic_handler(IMAGES_SERVICE, {"List": fake.list_images}),
            generic_handler(CONTENT_SERVICE, {"Read": fake.read}),
        ]
    )
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    try:
        r = ContainerdImageResolver(sock, timeout=5)
        top = chain_ids(diff_ids)[-1]
        assert r.image_ref("k8s.io", top) == "127.0.0.1:5000/nydus:1"
        assert r.image_ref("k8s.io", diff_ids[0]) == "127.0.0.1:5000/nydus:1"
        assert r.image_ref("k8s.io", "sha256:" + "9" * 64) is None
        assert set(fake.namespaces) == {"k8s.io"}
    finally:
        server.stop(None)
        shutil.rmtree(sock.parent, ignore_errors=True)


def test_chain_ids() -> None:
    import hashlib

    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    assert chain_ids([a]) == [a]
    assert chain_ids([a, b])[1] == "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()


# -- stock `ctr image pull`: label-less unpacks ------------------------------------------------


class FakeLayers:
    """A LayerResolver answering from a table (an exception value is raised)."""

    def __init__(self, table: dict[str, LayerMatch | Exception]) -> None:
        self.table = table
        self.asked: list[tuple[str, str]] = []

    def layer(self, namespace: str, chain_id: str) -> LayerMatch | None:
        self.asked.append((namespace, chain_id))
        hit = self.table.get(chain_id)
        if isinstance(hit, Exception):
            raise hit
        return hit


def test_label_less_unpack_gets_the_labels_containerds_unpacker_would_pass(
    tmp_path: Path,
) -> None:
    chains = (CHAIN1, CHAIN2, CHAIN3)
    img = "reg:5000/img:1"
    blob = {NYDUS_BLOB: "true"}
    boot_ann = {NYDUS_BOOTSTRAP: "true", NYDUS_FS_VERSION: "6", "org.other": "x"}
    plain = "sha256:" + "4" * 64
    broken = "sha256:" + "5" * 64
    layers = FakeLayers(
        {
            CHAIN1: LayerMatch(img, "sha256:" + "m" * 64, 0, chains, blob),
            CHAIN2: LayerMatch(img, "sha256:" + "m" * 64, 1, chains, blob),
            CHAIN3: LayerMatch(img, "sha256:" + "m" * 64, 2, chains, boot_ann),
            plain: LayerMatch("reg:5000/plain:1", "sha256:" + "p" * 64, 0, (plain,), {}),
            broken: BackendError("containerd is down"),
        }
    )
    mounter = RecordingMounter(tmp_path / "mnt")
    sn = Snapshotter(tmp_path / "root", mounter, FakeResolver(img), index_off=True, layers=layers)
    try:
        # a blob layer cannot be unpacked: a clear refusal, nothing created
        with pytest.raises(SnapshotPreconditionFailed, match=r"is a Nydus data blob.*--content"):
            sn.prepare(f"default/1/extract-1 {CHAIN1}", "", {})
        assert sn.walk() == []
        # what the content store's registrar does first: labelled prepares (remote layers)
        for chain, parent in ((CHAIN1, ""), (CHAIN2, CHAIN1)):
            with pytest.raises(SnapshotExists):
                sn.prepare(
                    f"default/2/nydus-register {chain}", parent, {SNAPSHOT_REF: chain, **blob}
                )
        # the bootstrap layer: labelled as by containerd's unpacker, through the commit too
        key = f"default/3/extract-3 {CHAIN3}"
        sn.prepare(key, CHAIN2, {})
        want = {SNAPSHOT_REF: CHAIN3, NYDUS_BOOTSTRAP: "true", NYDUS_FS_VERSION: "6"}
        assert dict(sn.stat(key).labels) == want
        with sn.store.transaction() as tx:
            fs = sn.upper_path(tx.get_info(key)[0])
        (fs / "image").mkdir()
        (fs / "image" / "image.boot").write_bytes(b"bootstrap")
        sn.commit(f"default/4/{CHAIN3}", key, {})
        assert dict(sn.stat(f"default/4/{CHAIN3}").labels) == want
        # so the container's Prepare finds the bootstrap among its parents
        sn.prepare("default/5/ctr", f"default/4/{CHAIN3}", {})
        ((boot, ref, labels),) = mounter.mounted.values()
        assert boot == fs / "image" / "image.boot" and ref == img
        assert labels[NYDUS_BOOTSTRAP] == "true"
        # plain layers, unknown layers and a failing lookup change nothing
        for i, chain in enumerate((plain, broken, "sha256:" + "6" * 64)):
            k = f"default/{10 + i}/extract-{i} {chain}"
            sn.prepare(k, "", {})
            assert dict(sn.stat(k).labels) == {}
        # only unpack keys without labels are looked up
        asked = len(layers.asked)
        sn.prepare("default/20/ctr-2", "", {})
        sn.prepare(f"default/21/extract-x {CHAIN1}x", "", {})
        assert len(layers.asked) == asked
    finally:
        sn.close()
