"""The content store (:mod:`nydus.snapshotter.content.store`) and its gRPC service.

Store tests call the library; service tests talk to a real grpcio server on a unix socket with
the request sequences containerd's content proxy sends (``content/proxy``): a ``Write`` session
opened with STAT (ref, total, expected), WRITEs at increasing offsets, a COMMIT with the
expected digest; ``Read`` with offset and size; ``List``/``Delete``/``ListStatuses``/``Abort``
as its garbage collector uses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2, field_mask_pb2

from nydus.snapshotter.containerd.errdefs import (
    ContentLocked,
    ContentOutOfRange,
    SnapshotExists,
    SnapshotInvalidArgument,
    SnapshotNotFound,
    SnapshotPreconditionFailed,
)
from nydus.snapshotter.containerd.proto import CONTENT_SERVICE, content_pb2
from nydus.snapshotter.containerd.rpc import ServiceClient
from nydus.snapshotter.content.nydusblobs import NydusContentHooks, nydus_blob_layers
from nydus.snapshotter.content.service import ContentService
from nydus.snapshotter.content.store import ContentStore, LazyEntry
from nydus.snapshotter.server import SnapshotterServer
from nydus.snapshotter.snapshots.core import Snapshotter
from nydus.snapshotter.snapshots.mounter import DaemonManagerMissing

C = content_pb2
NYDUS_BLOB_TYPE = "application/vnd.oci.image.layer.nydus.blob.v1"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "content")


def put(store: ContentStore, data: bytes, ref: str = "r", labels: dict | None = None) -> str:  # type: ignore[type-arg]
    w = store.writer(ref, len(data), sha(data))
    w.write(data)
    return w.commit(len(data), sha(data), labels)


# -- the store -------------------------------------------------------------------------------


def test_commit_info_read(store: ContentStore) -> None:
    data = os.urandom(3 << 20)
    d = put(store, data, labels={"a": "1"})
    assert d == sha(data)
    info = store.info(d)
    assert (info.size, dict(info.labels), info.lazy) == (len(data), {"a": "1"}, False)
    p = store.blob_path(d)
    assert p == store.root / "blobs" / "sha256" / d.split(":")[1]
    assert stat.S_IMODE(p.stat().st_mode) == 0o444
    assert b"".join(store.read(d)) == data
    assert store.list_statuses() == []  # the ingest is gone
    with pytest.raises(SnapshotExists):  # a second writer expecting it: already there
        store.writer("other", len(data), d)


def test_write_resumes_after_close_and_after_a_crash(tmp_path: Path, store: ContentStore) -> None:
    data = os.urandom(1 << 20)
    w = store.writer("layer-1", len(data), sha(data))
    w.write(data[:1000])
    w.close()
    st = store.status("layer-1")
    assert (st.ref, st.offset, st.total, st.expected) == ("layer-1", 1000, len(data), sha(data))
    w = store.writer("layer-1")
    assert w.offset == 1000 and w.total == len(data)
    w.write(data[1000:5000])
    # the process dies without closing: a new store on the same directory resumes too
    again = ContentStore(tmp_path / "content")
    w2 = again.writer("layer-1")
    assert w2.offset == 5000
    w2.write(data[5000:])
    assert w2.commit(len(data), sha(data)) == sha(data)
    assert b"".join(again.read(sha(data))) == data


def test_digest_mismatch_commits_nothing(store: ContentStore) -> None:
    data = b"hello world"
    wrong = sha(b"something else")
    w = store.writer("m", 0, wrong)
    w.write(data)
    with pytest.raises(SnapshotPreconditionFailed, match="unexpected commit digest"):
        w.commit(len(data), wrong)
    for d in (wrong, sha(data)):
        with pytest.raises(SnapshotNotFound):
            store.info(d)
    assert list(store.walk()) == []
    assert [s.ref for s in store.list_statuses()] == ["m"]  # left for the client to abort
    store.abort("m")
    assert store.list_statuses() == []
    with pytest.raises(SnapshotNotFound):
        store.abort("m")


def test_size_mismatch_commits_nothing(store: ContentStore) -> None:
    data = b"0123456789"
    w = store.writer("s")
    w.write(data)
    with pytest.raises(SnapshotPreconditionFailed, match="unexpected commit size"):
        w.commit(len(data) + 1, sha(data))
    assert list(store.walk()) == []
    w = store.writer("s")  # resumable, and committable with the right size
    assert w.commit(len(data), "") == sha(data)


def test_write_offsets_follow_containerd(store: ContentStore) -> None:
    w = store.writer("o")
    w.write_at(0, b"abc")
    with pytest.raises(ContentOutOfRange):
        w.write_at(1, b"x")
    w.write_at(3, b"def")
    w.write_at(0, b"XY")  # a write at 0 starts over
    assert w.offset == 2
    assert w.commit(0, sha(b"XY")) == sha(b"XY")


@pytest.mark.parametrize(
    "ref",
    [
        "../../../../etc/passwd",
        "/absolute/path",
        "..",
        "a/b/../../c",
        "nul\x00inside",
        "default/3/layer-sha256:" + "a" * 64,
        "é" * 1000,
    ],
)
def test_hostile_refs_stay_inside(tmp_path: Path, store: ContentStore, ref: str) -> None:
    before = set(os.listdir(tmp_path))
    w = store.writer(ref)
    w.write(b"data")
    w.close()
    (ingest,) = list(store.ingest_dir.iterdir())
    assert ingest.parent == store.ingest_dir and len(ingest.name) == 64
    assert store.status(ref).ref == ref
    assert [s.ref for s in store.list_statuses()] == [ref]
    store.abort(ref)
    assert set(os.listdir(tmp_path)) == before and list(store.ingest_dir.iterdir()) == []


def test_bad_refs_and_digests_are_invalid(store: ContentStore) -> None:
    with pytest.raises(SnapshotInvalidArgument):
        store.writer("")
    with pytest.raises(SnapshotInvalidArgument):
        store.writer("x" * 5000)
    for bad in ("sha256:../../etc", "sha256:" + "A" * 64, "md5:" + "a" * 32, "sha256:abc", ""):
        with pytest.raises(SnapshotInvalidArgument):
            store.info(bad)
        with pytest.raises(SnapshotInvalidArgument):
            store.put_lazy(bad, 1)


def test_one_writer_per_ref(store: ContentStore) -> None:
    w1 = store.writer("same")
    w1.write(b"first")
    with pytest.raises(ContentLocked):
        store.writer("same", wait=0.2)
    with pytest.raises(ContentLocked):
        store.abort("same")

    got: list[int] = []

    def second() -> None:
        w = store.writer("same", wait=10)  # waits for the first to finish
        got.append(w.offset)
        w.close()

    t = threading.Thread(target=second)
    t.start()
    w1.close()
    t.join(10)
    assert got == [5]


def test_concurrent_writers_of_the_same_content(store: ContentStore) -> None:
    data = os.urandom(1 << 20)
    results: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def write(i: int) -> None:
        w = store.writer(f"ref-{i}")
        barrier.wait()
        for off in range(0, len(data), 64 << 10):
            w.write(data[off : off + (64 << 10)])
        try:
            results.append(w.commit(len(data), sha(data)))
        except SnapshotExists as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [sha(data)] and len(errors) == 3
    assert b"".join(store.read(sha(data))) == data
    assert store.list_statuses() == []


def test_read_ranges(store: ContentStore) -> None:
    data = bytes(range(256)) * 10000  # 2.5 MiB: several chunks
    d = put(store, data)
    assert b"".join(store.read(d, 10, 20)) == data[10:30]
    assert b"".join(store.read(d, len(data) - 5, 100)) == data[-5:]  # clipped at the end
    assert b"".join(store.read(d, 1 << 20)) == data[1 << 20 :]
    assert b"".join(store.read(d, len(data))) == b""
    assert b"".join(store.read(d, -3, 4)) == data[:4]
    with pytest.raises(ContentOutOfRange):
        store.read(d, len(data) + 1)
    with pytest.raises(SnapshotNotFound):
        store.read(sha(b"nope"))


def test_update_labels(store: ContentStore) -> None:
    d = put(store, b"x", labels={"a": "1", "b": "2"})
    assert dict(store.update(d, {"c": "3"}, ["labels.c"]).labels) == {"a": "1", "b": "2", "c": "3"}
    assert dict(store.update(d, {}, ["labels.a"]).labels) == {"b": "2", "c": "3"}
    assert dict(store.update(d, {"z": "9"}, ["labels"]).labels) == {"z": "9"}
    assert dict(store.update(d, {"y": "8"}).labels) == {"y": "8"}
    with pytest.raises(SnapshotInvalidArgument):
        store.update(d, {}, ["size"])
    with pytest.raises(SnapshotNotFound):
        store.update(sha(b"absent"), {"a": "1"})


def test_lazy_entries(store: ContentStore) -> None:
    blob = os.urandom(100_000)
    d = sha(blob)
    assert store.put_lazy(d, len(blob), {"media_type": NYDUS_BLOB_TYPE})
    assert not store.put_lazy(d, len(blob))  # once
    info = store.info(d)
    assert (info.size, info.lazy) == (len(blob), True)
    assert not store.has_blob(d)
    assert not (store.root / "blobs" / "sha256").exists() or not any(
        (store.root / "blobs" / "sha256").iterdir()
    ), "a lazy entry must not be a (fake) blob file"
    assert [(i.digest, i.lazy) for i in store.walk()] == [(d, True)]
    with pytest.raises(SnapshotNotFound):
        store.read(d)
    store.update(d, {"l": "v"})
    assert dict(store.info(d).labels) == {"l": "v"}
    # wrong bytes never become the blob
    with pytest.raises(SnapshotPreconditionFailed):
        store.materialize(d, [blob[:-1], b"?"])
    assert store.info(d).lazy and store.list_statuses() == []
    with pytest.raises(SnapshotPreconditionFailed):
        store.materialize(d, [blob, b"more"])
    # the right ones do
    info = store.materialize(d, [blob[:1000], blob[1000:]])
    assert not info.lazy and b"".join(store.read(d)) == blob
    assert store.lazy(d) is None
    store.delete(d)
    with pytest.raises(SnapshotNotFound):
        store.delete(d)


def test_real_write_replaces_a_lazy_entry(store: ContentStore) -> None:
    blob = b"the real bytes"
    store.put_lazy(sha(blob), len(blob))
    assert put(store, blob) == sha(blob)  # not ALREADY_EXISTS: the bytes were missing
    assert not store.info(sha(blob)).lazy and store.lazy(sha(blob)) is None
    assert not store.put_lazy(sha(blob), len(blob))


def test_delete_removes_lazy_entries_and_labels(store: ContentStore) -> None:
    d = sha(b"lazy")
    store.put_lazy(d, 4)
    store.update(d, {"a": "b"})
    store.delete(d)
    assert list(store.walk()) == []
    assert not any(p.is_file() for p in store.root.rglob("*"))


def test_temporaries_of_a_crash_are_removed(tmp_path: Path, store: ContentStore) -> None:
    d = put(store, b"x")
    junk = store.root / "lazy" / "sha256" / ".tmp-deadbeef"
    junk.parent.mkdir(parents=True)
    junk.write_text("{")
    (store.root / "blobs" / "sha256" / ".tmp-0").write_text("partial")
    # a lazy blob's download cut short: the store's own ingest, which containerd never sees
    w = store.writer("nydus-materialize-" + sha(b"big"))
    w.write(b"partial")
    w.close()
    assert store.list_statuses() == []
    again = ContentStore(tmp_path / "content")
    assert not junk.exists() and not (store.root / "blobs" / "sha256" / ".tmp-0").exists()
    assert [i.digest for i in again.walk()] == [d]
    assert list(again.ingest_dir.iterdir()) == []


# -- Nydus manifests -------------------------------------------------------------------------


def nydus_manifest(blobs: list[bytes], boot: bytes = b"boot") -> bytes:
    layers = [
        {
            "mediaType": NYDUS_BLOB_TYPE,
            "digest": sha(b),
            "size": len(b),
            "annotations": {"containerd.io/snapshot/nydus-blob": "true"},
        }
        for b in blobs
    ]
    layers.append(
        {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": sha(boot),
            "size": len(boot),
            "annotations": {"containerd.io/snapshot/nydus-bootstrap": "true"},
        }
    )
    doc = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(b"c")},
        "layers": layers,
    }
    return json.dumps(doc).encode()


def test_nydus_blob_layers_parsing() -> None:
    blobs = [b"one", b"two"]
    assert nydus_blob_layers(nydus_manifest(blobs)) == [
        (sha(b), len(b), NYDUS_BLOB_TYPE) for b in blobs
    ]
    assert nydus_blob_layers(b'{"layers": []}') == []
    assert nydus_blob_layers(b"nydus-blob but not JSON") == []
    assert nydus_blob_layers(os.urandom(1000)) == []
    hostile = json.loads(nydus_manifest([b"x"]))
    hostile["layers"][0]["digest"] = "sha256:../../../etc/passwd"
    assert nydus_blob_layers(json.dumps(hostile).encode()) == []
    hostile["layers"][0].update(digest=sha(b"x"), size=-1)
    assert nydus_blob_layers(json.dumps(hostile).encode()) == []


def test_hooks_record_lazy_entries_for_a_nydus_manifest(store: ContentStore) -> None:
    hooks = NydusContentHooks(store)
    blobs = [os.urandom(1000), os.urandom(2000)]
    m = put(store, nydus_manifest(blobs))
    hooks.committed(m, "ns/1/manifest-" + m)
    assert hooks.recorded() == [m]
    for b in blobs:
        info = store.info(sha(b))
        assert info.lazy and info.size == len(b)
    with pytest.raises(SnapshotNotFound):
        store.info(sha(b"boot"))  # the bootstrap layer is downloaded for real
    plain = put(store, b'{"layers": [], "config": {}}', ref="plain")
    hooks.committed(plain, "ns/2/x")
    assert hooks.recorded() == [m]
    hooks.deleted(m)
    assert hooks.recorded() == []
    with pytest.raises(SnapshotPreconditionFailed, match="does not fetch"):
        hooks.lazy_source(LazyEntry(sha(blobs[0]), 1000, 0))


# -- the gRPC service ----------------------------------------------------------------------


class Hooks(NydusContentHooks):
    def __init__(self, store: ContentStore, lazy_bytes: dict[str, bytes]) -> None:
        super().__init__(store)
        self.lazy_bytes = lazy_bytes
        self.reads: list[str] = []

    def before_read(self, digest: str) -> None:
        self.reads.append(digest)

    def lazy_source(self, entry: LazyEntry) -> Iterable[bytes]:
        data = self.lazy_bytes.get(entry.digest)
        if data is None:
            raise SnapshotPreconditionFailed(f"{entry.digest}: no source")
        return [data]


class Server:
    def __init__(self, root: Path, lazy_bytes: dict[str, bytes] | None = None) -> None:
        self.store = ContentStore(root / "content")
        self.hooks = Hooks(self.store, lazy_bytes or {})
        self.sock_dir = Path(tempfile.mkdtemp(prefix="cnt", dir="/tmp"))
        self.sn = Snapshotter(root / "sn", DaemonManagerMissing(), index_off=True)
        self.server = SnapshotterServer(
            self.sn, self.sock_dir / "s.sock", content=ContentService(self.store, self.hooks)
        )
        self.server.start()
        self.channel = grpc.insecure_channel(f"unix:{self.sock_dir / 's.sock'}")
        self.c = ServiceClient(self.channel, CONTENT_SERVICE, timeout=30)

    def close(self) -> None:
        self.channel.close()
        self.server.stop()
        self.sn.close()
        shutil.rmtree(self.sock_dir, ignore_errors=True)

    def write(
        self, ref: str, data: bytes, expected: str | None = None, chunk: int = 1 << 20
    ) -> list[C.WriteContentResponse]:
        """What containerd's proxy writer sends: STAT, WRITEs, COMMIT."""
        exp = sha(data) if expected is None else expected

        def reqs() -> Iterator[C.WriteContentRequest]:
            yield C.WriteContentRequest(action=C.STAT, ref=ref, total=len(data))
            off = 0
            while off < len(data):
                yield C.WriteContentRequest(
                    action=C.WRITE, offset=off, data=data[off : off + chunk]
                )
                off += chunk
            yield C.WriteContentRequest(
                action=C.COMMIT, total=len(data), offset=len(data), expected=exp, labels={"k": "v"}
            )

        return list(self.c.bidi("Write", reqs(), C.WriteContentResponse))

    def read(self, digest: str, offset: int = 0, size: int = 0) -> bytes:
        req = C.ReadContentRequest(digest=digest, offset=offset, size=size)
        return b"".join(r.data for r in self.c.stream("Read", req, C.ReadContentResponse))

    def info(self, digest: str) -> C.Info:
        return self.c.unary("Info", C.InfoRequest(digest=digest), C.InfoResponse).info

    def list(self, *filters: str) -> list[C.Info]:
        req = C.ListContentRequest(filters=list(filters))
        return [i for r in self.c.stream("List", req, C.ListContentResponse) for i in r.info]


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path, {})
    yield s
    s.close()


def code_of(e: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return e.value.code()  # type: ignore[attr-defined,no-any-return]


def test_service_write_read_info_list_delete(srv: Server) -> None:
    data = os.urandom((3 << 20) + 17)
    resps = srv.write("default/1/layer-x", data, chunk=1 << 20)
    assert [r.action for r in resps] == [C.STAT] + [C.WRITE] * 4 + [C.COMMIT]
    assert resps[0].offset == 0 and resps[-1].offset == len(data)
    assert resps[-1].digest == sha(data)
    info = srv.info(sha(data))
    assert info.size == len(data) and dict(info.labels) == {"k": "v"}
    assert srv.read(sha(data)) == data
    assert srv.read(sha(data), 1000, 5000) == data[1000:6000]
    assert srv.read(sha(data), len(data) - 10, 1 << 30) == data[-10:]
    with pytest.raises(grpc.RpcError) as e:
        srv.read(sha(data), len(data) + 1)
    assert code_of(e) == grpc.StatusCode.OUT_OF_RANGE
    # containerd's fetch opens a writer expecting a blob that is already there
    with pytest.raises(grpc.RpcError) as e:
        srv.write("default/2/layer-x", data)
    assert code_of(e) == grpc.StatusCode.ALREADY_EXISTS
    assert [i.digest for i in srv.list()] == [sha(data)]
    assert srv.list("labels.k==w") == [] and len(srv.list("labels.k==v")) == 1
    assert len(srv.list(f"digest=={sha(data)}")) == 1
    req = C.UpdateRequest(
        info=C.Info(digest=sha(data), labels={"n": "1"}),
        update_mask=field_mask_pb2.FieldMask(paths=["labels.n"]),
    )
    assert dict(srv.c.unary("Update", req, C.UpdateResponse).info.labels) == {"k": "v", "n": "1"}
    srv.c.unary("Delete", C.DeleteContentRequest(digest=sha(data)), empty_pb2.Empty)
    with pytest.raises(grpc.RpcError) as e:
        srv.info(sha(data))
    assert code_of(e) == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        srv.info("sha256:../../x")
    assert code_of(e) == grpc.StatusCode.INVALID_ARGUMENT


def test_service_digest_mismatch_and_resume(srv: Server) -> None:
    data = os.urandom(100_000)
    with pytest.raises(grpc.RpcError) as e:
        srv.write("ns/1/bad", data, expected=sha(b"other"))
    assert code_of(e) == grpc.StatusCode.FAILED_PRECONDITION
    assert srv.list() == []
    st = srv.c.unary("Status", C.StatusRequest(ref="ns/1/bad"), C.StatusResponse).status
    assert st.offset == len(data) and st.total == len(data)
    # a new session resumes: STAT answers the offset, the client sends the rest
    first = [
        C.WriteContentRequest(action=C.STAT, ref="ns/1/resume", total=len(data)),
        C.WriteContentRequest(action=C.WRITE, offset=0, data=data[:40_000]),
    ]
    list(srv.c.bidi("Write", first, C.WriteContentResponse))
    (resp,) = srv.c.bidi(
        "Write",
        [C.WriteContentRequest(action=C.STAT, ref="ns/1/resume", total=len(data))],
        C.WriteContentResponse,
    )
    assert resp.offset == 40_000 and resp.total == len(data)
    assert resp.digest == sha(data[:40_000])
    rest = [
        C.WriteContentRequest(action=C.STAT, ref="ns/1/resume"),
        C.WriteContentRequest(action=C.WRITE, offset=40_000, data=data[40_000:]),
        C.WriteContentRequest(action=C.COMMIT, offset=len(data), expected=sha(data)),
    ]
    assert list(srv.c.bidi("Write", rest, C.WriteContentResponse))[-1].digest == sha(data)
    # a write at the wrong offset
    bad = [
        C.WriteContentRequest(action=C.STAT, ref="ns/1/skip"),
        C.WriteContentRequest(action=C.WRITE, offset=0, data=b"abc"),
        C.WriteContentRequest(action=C.WRITE, offset=10, data=b"def"),
    ]
    with pytest.raises(grpc.RpcError) as e:
        list(srv.c.bidi("Write", bad, C.WriteContentResponse))
    assert code_of(e) == grpc.StatusCode.OUT_OF_RANGE
    refs = C.ListStatusesResponse
    sts = srv.c.unary("ListStatuses", C.ListStatusesRequest(filters=["ref==ns/1/skip"]), refs)
    assert [s.ref for s in sts.statuses] == ["ns/1/skip"]
    srv.c.unary("Abort", C.AbortRequest(ref="ns/1/skip"), empty_pb2.Empty)
    srv.c.unary("Abort", C.AbortRequest(ref="ns/1/bad"), empty_pb2.Empty)
    assert srv.c.unary("ListStatuses", C.ListStatusesRequest(), refs).statuses == []
    with pytest.raises(grpc.RpcError) as e:  # no ref
        list(srv.c.bidi("Write", [C.WriteContentRequest(action=C.STAT)], C.WriteContentResponse))
    assert code_of(e) == grpc.StatusCode.INVALID_ARGUMENT


def test_service_concurrent_sessions_on_one_ref(srv: Server) -> None:
    """The second session waits, then gets UNAVAILABLE (containerd retries those)."""
    gate = threading.Event()

    def slow() -> Iterator[C.WriteContentRequest]:
        yield C.WriteContentRequest(action=C.STAT, ref="ns/1/busy")
        gate.wait(10)

    t = threading.Thread(target=lambda: list(srv.c.bidi("Write", slow(), C.WriteContentResponse)))
    t.start()
    try:
        import time

        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as e:
            list(
                srv.c.bidi(
                    "Write",
                    [C.WriteContentRequest(action=C.STAT, ref="ns/1/busy")],
                    C.WriteContentResponse,
                )
            )
        assert code_of(e) == grpc.StatusCode.UNAVAILABLE
    finally:
        gate.set()
        t.join(10)
    (resp,) = srv.c.bidi(
        "Write", [C.WriteContentRequest(action=C.STAT, ref="ns/1/busy")], C.WriteContentResponse
    )
    assert resp.offset == 0


def test_service_lazy_entries(tmp_path: Path) -> None:
    blobs = [os.urandom(50_000), os.urandom(70_000)]
    srv = Server(tmp_path, {sha(blobs[0]): blobs[0]})
    try:
        manifest = nydus_manifest(blobs)
        srv.write("ns/1/manifest-x", manifest)
        # Info answers the size: containerd's metadata commits the layer without downloading it
        for b in blobs:
            assert srv.info(sha(b)).size == len(b)
        assert {i.digest for i in srv.list()} == {sha(manifest), *(sha(b) for b in blobs)}
        srv.read(sha(manifest))
        assert srv.hooks.reads == [sha(manifest)]
        # a read of a lazy entry fetches the real bytes (checked), or fails clearly
        assert srv.read(sha(blobs[0]), 10, 20) == blobs[0][10:30]
        assert srv.store.has_blob(sha(blobs[0]))
        with pytest.raises(grpc.RpcError) as e:
            srv.read(sha(blobs[1]))
        assert code_of(e) == grpc.StatusCode.FAILED_PRECONDITION and "no source" in str(e.value)
        # garbage collection deletes lazy entries like blobs
        srv.c.unary("Delete", C.DeleteContentRequest(digest=sha(blobs[1])), empty_pb2.Empty)
        assert {i.digest for i in srv.list()} == {sha(manifest), sha(blobs[0])}
    finally:
        srv.close()


# -- what the registrar registers --------------------------------------------------------------


def test_registrar_plans_the_bottom_run_of_blob_layers() -> None:
    from nydus.snapshotter.containerd.proto import descriptor_pb2
    from nydus.snapshotter.content.remotelayers import RemoteLayerRegistrar, image_uses
    from nydus.snapshotter.snapshots.imageref import chain_ids

    blobs: dict[str, bytes] = {}

    def add(doc: dict) -> str:  # type: ignore[type-arg]
        data = json.dumps(doc).encode()
        blobs[sha(data)] = data
        return sha(data)

    manifest_bytes = nydus_manifest([b"one", b"two"])
    doc = json.loads(manifest_bytes)
    diff_ids = [sha(b"one"), sha(b"two"), sha(b"boot-tar")]
    doc["config"]["digest"] = add({"rootfs": {"type": "layers", "diff_ids": diff_ids}})
    manifest = add(doc)
    index = add({"manifests": [{"digest": sha(b"other")}, {"digest": manifest}]})
    r = RemoteLayerRegistrar("/nonexistent.sock", blobs.get, lambda: "nydus")
    plan = r.plan(manifest)
    assert plan is not None and plan.config == doc["config"]["digest"]
    chains = chain_ids(diff_ids)
    assert [(ly.chain_id, ly.parent) for ly in plan.layers] == [
        (chains[0], ""),
        (chains[1], chains[0]),
    ]
    assert dict(plan.layers[1].labels) == {
        "containerd.io/snapshot/nydus-blob": "true",
        "containerd.io/snapshot.ref": chains[1],
    }
    # no config yet: no plan (asked again later); not a manifest: none either
    doc["config"]["digest"] = sha(b"not fetched")
    assert r.plan(add(doc)) is None and r.plan(sha(b"absent")) is None
    # images that use the manifest: directly, or through an index
    D = descriptor_pb2.Descriptor
    assert image_uses(blobs.get, D(digest=manifest), manifest)
    assert image_uses(
        blobs.get, D(media_type="application/vnd.oci.image.index.v1+json", digest=index), manifest
    )
    assert not image_uses(blobs.get, D(digest=sha(b"other")), manifest)
    # without a containerd, ensure() logs and registers nothing (never raises into a Read)
    assert r.ensure(manifest) == []
