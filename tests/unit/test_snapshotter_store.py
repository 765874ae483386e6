"""Snapshot metadata store (sqlite), containerd filter syntax, disk usage."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest

from nydus.errors import NydusError
from nydus.snapshotter.containerd.errdefs import (
    SnapshotExists,
    SnapshotInvalidArgument,
    SnapshotNotFound,
    SnapshotPreconditionFailed,
)
from nydus.snapshotter.snapshots.filters import parse, parse_all
from nydus.snapshotter.snapshots.fsutil import disk_usage, mounts_under
from nydus.snapshotter.snapshots.store import (
    SCHEMA_VERSION,
    Info,
    Kind,
    MetaStore,
    NydusMount,
    Usage,
)


@pytest.fixture
def store(tmp_path: Path) -> MetaStore:
    return MetaStore(tmp_path / "metadata.db")


def _chain(store: MetaStore) -> None:
    """base (committed) <- mid (committed) <- top (active)."""
    with store.transaction(writable=True) as tx:
        tx.create(Kind.ACTIVE, "k-base", "", {"a": "1"})
        tx.commit_active("k-base", "base", Usage(10, 1), {"layer": "base"})
        tx.create(Kind.ACTIVE, "k-mid", "base")
        tx.commit_active("k-mid", "mid", Usage(20, 2), {"layer": "mid"})
        tx.create(Kind.ACTIVE, "top", "mid", {"x": "y"})


def test_schema_version_and_reopen(tmp_path: Path) -> None:
    s = MetaStore(tmp_path / "m.db")
    assert s.schema_version == SCHEMA_VERSION
    _chain(s)
    s.close()
    s2 = MetaStore(tmp_path / "m.db")
    with s2.transaction() as tx:
        assert [i.name for i in tx.walk()] == ["base", "mid", "top"]


def test_newer_schema_refused(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    MetaStore(db).close()
    c = sqlite3.connect(db)
    c.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    c.commit()
    c.close()
    with pytest.raises(NydusError, match="newer than this snapshotter supports"):
        MetaStore(db)


def test_chain_parents_and_info(store: MetaStore) -> None:
    _chain(store)
    with store.transaction() as tx:
        snap = tx.get_snapshot("top")
        base_id, base, usage = tx.get_info("base")
        mid_id, mid, _ = tx.get_info("mid")
        assert snap.kind == Kind.ACTIVE
        assert snap.parent_ids == (mid_id, base_id)
        assert base.kind == Kind.COMMITTED and base.parent == ""
        assert mid.parent == "base"
        # commit replaces labels (containerd's CommitActive does not inherit them)
        assert base.labels == {"layer": "base"}
        assert usage == Usage(10, 1)
        _, top, _ = tx.get_info("top")
        assert top.labels == {"x": "y"} and top.parent == "mid"


def test_commit_keeps_id(store: MetaStore) -> None:
    with store.transaction(writable=True) as tx:
        s = tx.create(Kind.ACTIVE, "a", "")
        sid = tx.commit_active("a", "c", Usage(), None)
        assert sid == s.id
        with pytest.raises(SnapshotNotFound):
            tx.get_info("a")


def test_errors_match_containerd(store: MetaStore) -> None:
    _chain(store)
    with store.transaction(writable=True) as tx:
        with pytest.raises(SnapshotExists):
            tx.create(Kind.ACTIVE, "top", "mid")
        with pytest.raises(SnapshotNotFound):
            tx.create(Kind.ACTIVE, "new", "nope")
        with pytest.raises(SnapshotInvalidArgument):
            tx.create(Kind.ACTIVE, "new", "top")  # parent not committed
        with pytest.raises(SnapshotInvalidArgument):
            tx.create(Kind.COMMITTED, "new", "")
        with pytest.raises(SnapshotPreconditionFailed):
            tx.get_snapshot("base")  # committed: no mounts
        with pytest.raises(SnapshotExists):
            tx.commit_active("top", "mid", Usage(), None)
        with pytest.raises(SnapshotNotFound):
            tx.commit_active("nope", "x", Usage(), None)
        with pytest.raises(SnapshotPreconditionFailed):
            tx.remove("mid")  # has a child
        tx.create(Kind.VIEW, "v", "mid")
        with pytest.raises(SnapshotPreconditionFailed):
            tx.commit_active("v", "x", Usage(), None)  # a view cannot be committed


def test_remove_then_parent(store: MetaStore) -> None:
    _chain(store)
    with store.transaction(writable=True) as tx:
        sid, kind = tx.remove("top")
        assert kind == Kind.ACTIVE
        tx.remove("mid")
        tx.remove("base")
        assert tx.ids() == set()
        tx.create(Kind.ACTIVE, "again", "")
        assert min(tx.ids()) > sid  # ids are never reused


def test_rollback_on_error(store: MetaStore) -> None:
    with pytest.raises(RuntimeError), store.transaction(writable=True) as tx:
        tx.create(Kind.ACTIVE, "a", "")
        raise RuntimeError("boom")
    with store.transaction() as tx:
        assert tx.ids() == set()


def test_read_only_transaction_refuses_writes(store: MetaStore) -> None:
    with store.transaction() as tx, pytest.raises(NydusError, match="read-only"):
        tx.create(Kind.ACTIVE, "a", "")


def test_update_labels(store: MetaStore) -> None:
    _chain(store)
    with store.transaction(writable=True) as tx:
        before = tx.get_info("top")[1]
        info = tx.update_info("top", {"x": "z", "n": "1"}, ["labels.x"])
        assert info.labels == {"x": "z"}
        info = tx.update_info("top", {"n": "1"}, ["labels.x", "labels.n"])
        assert info.labels == {"n": "1"}
        info = tx.update_info("top", {"all": "new"}, [])
        assert info.labels == {"all": "new"}
        info = tx.update_info("top", {"q": "r"}, ["labels"])
        assert info.labels == {"q": "r"}
        assert info.updated_ns >= before.updated_ns and info.created_ns == before.created_ns
        with pytest.raises(SnapshotInvalidArgument):
            tx.update_info("top", {}, ["name"])
        with pytest.raises(SnapshotNotFound):
            tx.update_info("nope", {}, [])


def test_nydus_mount_rows_outlive_snapshots(store: MetaStore) -> None:
    with store.transaction(writable=True) as tx:
        s = tx.create(Kind.ACTIVE, "a", "")
        tx.put_nydus_mount(NydusMount(s.id, 7, "/mnt/x", "reg/img:1"))
        tx.remove("a")
    with store.transaction() as tx:
        assert tx.nydus_mounts() == [NydusMount(s.id, 7, "/mnt/x", "reg/img:1")]
        assert tx.get_nydus_mount(s.id) is not None


def test_concurrent_creates(store: MetaStore) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(20):
                with store.transaction(writable=True) as tx:
                    tx.create(Kind.ACTIVE, f"t{n}-{i}", "")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with store.transaction() as tx:
        assert len(tx.ids()) == 80


# -- filters -------------------------------------------------------------------------------

INFO = Info(
    name="default/4/sha256:abc",
    parent="sha256:def",
    kind=Kind.COMMITTED,
    created_ns=0,
    updated_ns=0,
    labels={"containerd.io/snapshot.ref": "sha256:abc", "plain": "v", "a.b": "dotted"},
)


@pytest.mark.parametrize(
    ("expr", "want"),
    [
        ("", True),
        ('labels."containerd.io/snapshot.ref"==sha256:abc,parent=="sha256:def"', True),
        ('labels."containerd.io/snapshot.ref"==sha256:abc,parent==""', False),
        ("kind==committed", True),
        ("kind==active", False),
        ("labels.plain", True),
        ("labels.missing", False),
        ("labels.missing!=x", True),
        ("labels.plain!=v", False),
        ("labels.a.b==dotted", True),
        ("name~=^default/[0-9]+/", True),
        ("name~=/^other/", False),
        (r'name=="default/4/sha256:\x61bc"', True),
        (" name == default/4/sha256:abc , kind == committed ", True),
    ],
)
def test_filter_matches(expr: str, want: bool) -> None:
    assert parse(expr).match_snapshot(INFO) is want


def test_filter_any_of_several() -> None:
    assert parse_all(["kind==active", "labels.plain==v"]).match_snapshot(INFO)
    assert not parse_all(["kind==active", "labels.plain==w"]).match_snapshot(INFO)
    assert parse_all([]).match_snapshot(INFO)


def test_parent_equals_empty_matches_root() -> None:
    root = Info("r", "", Kind.COMMITTED, 0, 0, {"containerd.io/snapshot.ref": "sha256:1"})
    assert parse('labels."containerd.io/snapshot.ref"==sha256:1,parent==""').match_snapshot(root)


@pytest.mark.parametrize("bad", ["name==", "==x", 'name=="open', "name~=(", "a b", "name==x,"])
def test_filter_syntax_errors(bad: str) -> None:
    with pytest.raises(SnapshotInvalidArgument):
        parse(bad)


# -- file system helpers ---------------------------------------------------------------------


def test_disk_usage_counts_hardlinks_once(tmp_path: Path) -> None:
    d = tmp_path / "fs"
    d.mkdir()
    (d / "f").write_bytes(b"x" * 10000)
    os.link(d / "f", d / "g")
    (d / "sub").mkdir()
    (d / "sub" / "h").write_bytes(b"")
    u = disk_usage(d)
    assert u.inodes == 4  # fs, f (=g), sub, h
    blocks = sum(os.lstat(p).st_blocks for p in (d, d / "f", d / "sub", d / "sub" / "h"))
    assert u.size == blocks * 512
    assert disk_usage(tmp_path / "missing") == Usage()


def test_mounts_under_sees_proc_mounts() -> None:
    assert "/proc" in mounts_under("/proc")
    assert mounts_under("/nonexistent-dir-xyz") == []
