"""Snapshot metadata in sqlite: names, parents, kinds, labels, usage, Nydus mounts.

Owns ``<root>/metadata.db``. The model is containerd's snapshot storage (``snapshots/storage``):
every snapshot has a numeric id (never reused: ``AUTOINCREMENT``), a unique name (the key of an
active/view snapshot, the name of a committed one), an optional committed parent, a kind, two
timestamps, labels, and for committed snapshots the disk usage measured at commit time.
Committing keeps the id, so the snapshot's directory does not move.

One more table records the Nydus mounts the snapshotter asked for (active/view snapshot id ->
bootstrap snapshot id, lower dir, image reference). It has no foreign key on purpose: a row whose
snapshot is gone is a mount still to be released, and ``Cleanup`` retries it.

Transactions: :meth:`MetaStore.transaction` yields a :class:`Transaction`; leaving the block
commits, an exception rolls back. Write transactions start with ``BEGIN IMMEDIATE``; the database
is in WAL mode with ``synchronous=FULL``. Schema changes go through ``PRAGMA user_version``
migrations; a database newer than this code is refused rather than misread.

The database file (and sqlite's -wal/-shm files) are mode 0600: labels may carry registry
credentials (``containerd.io/snapshot/pullsecret``).

Threading contract: one connection, shared by all threads, serialised by a re-entrant lock held
for the whole transaction. Callers keep file-system work that must be atomic with the metadata
(creating, renaming directories) inside the transaction, as containerd's overlay snapshotter
does, and slow work (mounts, ``du`` of big trees) outside it where they can.
"""

from __future__ import annotations

import contextlib
import enum
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ...credentials import private_file
from ...errors import NydusError
from ..containerd.errdefs import (
    SnapshotExists,
    SnapshotInvalidArgument,
    SnapshotNotFound,
    SnapshotPreconditionFailed,
)
from ..containerd.rpc import updated_labels

__all__ = [
    "SCHEMA_VERSION",
    "Info",
    "Kind",
    "MetaStore",
    "NydusMount",
    "Snapshot",
    "Transaction",
    "Usage",
]

SCHEMA_VERSION = 1

_MIGRATIONS: dict[int, str] = {
    # version reached -> statements that reach it from the version before
    1: """
    CREATE TABLE snapshots (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        name         TEXT    NOT NULL UNIQUE,
        parent_id    INTEGER REFERENCES snapshots(id),
        kind         INTEGER NOT NULL CHECK (kind IN (1, 2, 3)),
        created_ns   INTEGER NOT NULL,
        updated_ns   INTEGER NOT NULL,
        usage_size   INTEGER NOT NULL DEFAULT 0,
        usage_inodes INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX snapshots_parent ON snapshots(parent_id);
    CREATE TABLE labels (
        snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
        key         TEXT    NOT NULL,
        value       TEXT    NOT NULL,
        PRIMARY KEY (snapshot_id, key)
    );
    CREATE TABLE nydus_mounts (
        snapshot_id  INTEGER PRIMARY KEY,
        bootstrap_id INTEGER NOT NULL,
        lower_dir    TEXT    NOT NULL,
        image_ref    TEXT
    );
    """,
}


class Kind(enum.IntEnum):
    """Snapshot kinds, numbered as containerd's ``snapshots.v1.Kind`` enum."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def label(self) -> str:
        """The lower-case name containerd's filters and ``ctr`` use (``active``, ...)."""
        return self.name.lower()


@dataclass(frozen=True)
class Usage:
    """Disk usage as containerd counts it: bytes of allocated blocks, distinct inodes."""

    size: int = 0
    inodes: int = 0


@dataclass(frozen=True)
class Info:
    """What ``Stat``/``List`` report about one snapshot."""

    name: str
    parent: str
    kind: Kind
    created_ns: int
    updated_ns: int
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    """An active or view snapshot as mounts need it: its id and its parents' ids, nearest first."""

    id: int
    kind: Kind
    parent_ids: tuple[int, ...]


@dataclass(frozen=True)
class NydusMount:
    """A Nydus mount requested for an active/view snapshot (see module docstring)."""

    snapshot_id: int
    bootstrap_id: int
    lower_dir: str
    image_ref: str | None


def _now_ns() -> int:
    return time.time_ns()


class Transaction:
    """Operations inside one transaction (see :meth:`MetaStore.transaction`)."""

    def __init__(self, conn: sqlite3.Connection, writable: bool) -> None:
        self._c = conn
        self.writable = writable

    # -- lookups ------------------------------------------------------------------------------

    def _row(self, name: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._c.execute(
            "SELECT s.*, p.name AS parent_name FROM snapshots s "
            "LEFT JOIN snapshots p ON p.id = s.parent_id WHERE s.name = ?",
            (name,),
        ).fetchone()
        return row

    def _labels(self, snapshot_id: int) -> dict[str, str]:
        rows = self._c.execute(
            "SELECT key, value FROM labels WHERE snapshot_id = ? ORDER BY key", (snapshot_id,)
        )
        return {k: v for k, v in rows}

    def _info(self, row: sqlite3.Row) -> Info:
        return Info(
            name=row["name"],
            parent=row["parent_name"] or "",
            kind=Kind(row["kind"]),
            created_ns=row["created_ns"],
            updated_ns=row["updated_ns"],
            labels=self._labels(row["id"]),
        )

    def get_info(self, key: str) -> tuple[int, Info, Usage]:
        """Id, info and recorded usage of ``key`` (any kind)."""
        row = self._row(key)
        if row is None:
            raise SnapshotNotFound(f"snapshot {key!r} does not exist")
        return row["id"], self._info(row), Usage(row["usage_size"], row["usage_inodes"])

    def info_by_id(self, snapshot_id: int) -> Info | None:
        row: sqlite3.Row | None = self._c.execute(
            "SELECT s.*, p.name AS parent_name FROM snapshots s "
            "LEFT JOIN snapshots p ON p.id = s.parent_id WHERE s.id = ?",
            (snapshot_id,),
        ).fetchone()
        return None if row is None else self._info(row)

    def parent_ids(self, snapshot_id: int) -> tuple[int, ...]:
        """Ids of the ancestors of ``snapshot_id``, nearest first (not including itself)."""
        rows = self._c.execute(
            "WITH RECURSIVE chain(id, parent_id, depth) AS ("
            "  SELECT id, parent_id, 0 FROM snapshots WHERE id = ?"
            "  UNION ALL"
            "  SELECT s.id, s.parent_id, chain.depth + 1 FROM snapshots s"
            "  JOIN chain ON s.id = chain.parent_id"
            ") SELECT id FROM chain WHERE depth > 0 ORDER BY depth",
            (snapshot_id,),
        )
        return tuple(r[0] for r in rows)

    def get_snapshot(self, key: str) -> Snapshot:
        """The active or view snapshot ``key``; a committed one is a precondition failure."""
        row = self._row(key)
        if row is None:
            raise SnapshotNotFound(f"snapshot {key!r} does not exist")
        kind = Kind(row["kind"])
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise SnapshotPreconditionFailed(f"requested snapshot {key!r} not active or view")
        return Snapshot(row["id"], kind, self.parent_ids(row["id"]))

    def walk(self) -> Iterator[Info]:
        """Every snapshot, in id order."""
        rows = self._c.execute(
            "SELECT s.*, p.name AS parent_name FROM snapshots s "
            "LEFT JOIN snapshots p ON p.id = s.parent_id ORDER BY s.id"
        ).fetchall()
        for row in rows:
            yield self._info(row)

    def ids(self) -> set[int]:
        return {r[0] for r in self._c.execute("SELECT id FROM snapshots")}

    def labelled(self, key: str) -> list[tuple[int, str]]:
        """``(id, label value)`` of every snapshot that has label ``key``, in id order."""
        rows = self._c.execute(
            "SELECT snapshot_id, value FROM labels WHERE key = ? ORDER BY snapshot_id", (key,)
        )
        return [(r[0], r[1]) for r in rows]

    # -- changes ------------------------------------------------------------------------------

    def _need_write(self) -> None:
        if not self.writable:
            raise NydusError("internal error: write in a read-only snapshot transaction")

    def _put_labels(self, snapshot_id: int, labels: Mapping[str, str]) -> None:
        self._c.execute("DELETE FROM labels WHERE snapshot_id = ?", (snapshot_id,))
        self._c.executemany(
            "INSERT INTO labels (snapshot_id, key, value) VALUES (?, ?, ?)",
            [(snapshot_id, k, v) for k, v in labels.items()],
        )

    def _parent_id(self, parent: str) -> int | None:
        if not parent:
            return None
        row = self._row(parent)
        if row is None:
            raise SnapshotNotFound(f"parent snapshot {parent!r} does not exist")
        if Kind(row["kind"]) != Kind.COMMITTED:
            raise SnapshotInvalidArgument(f"parent {parent!r} is not a committed snapshot")
        pid: int = row["id"]
        return pid

    def create(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None = None
    ) -> Snapshot:
        """Record a new active or view snapshot ``key`` on top of committed ``parent``."""
        self._need_write()
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise SnapshotInvalidArgument(
                f"snapshot kind {kind.label} invalid; only active or view can be created"
            )
        if not key:
            raise SnapshotInvalidArgument("snapshot key must not be empty")
        sid = self._insert(key, parent, kind, labels or {}, Usage())
        return Snapshot(sid, kind, self.parent_ids(sid))

    def create_committed(
        self, name: str, parent: str, labels: Mapping[str, str], usage: Usage = Usage()
    ) -> int:
        """Record a committed snapshot directly (a remote layer that needs no unpacking)."""
        self._need_write()
        return self._insert(name, parent, Kind.COMMITTED, labels, usage)

    def _insert(
        self, name: str, parent: str, kind: Kind, labels: Mapping[str, str], usage: Usage
    ) -> int:
        parent_id = self._parent_id(parent)
        if self._row(name) is not None:
            raise SnapshotExists(f"snapshot {name!r} already exists")
        now = _now_ns()
        cur = self._c.execute(
            "INSERT INTO snapshots (name, parent_id, kind, created_ns, updated_ns, usage_size, "
            "usage_inodes) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (name, parent_id, int(kind), now, now, usage.size, usage.inodes),
        )
        sid = cur.lastrowid
        assert sid is not None
        self._put_labels(sid, labels)
        return sid

    def commit_active(
        self, key: str, name: str, usage: Usage, labels: Mapping[str, str] | None
    ) -> int:
        """Turn active ``key`` into committed ``name`` (same id); labels are replaced."""
        self._need_write()
        if self._row(name) is not None:
            raise SnapshotExists(f"committed snapshot {name!r} already exists")
        row = self._row(key)
        if row is None:
            raise SnapshotNotFound(f"active snapshot {key!r} does not exist")
        if Kind(row["kind"]) != Kind.ACTIVE:
            raise SnapshotPreconditionFailed(f"snapshot {key!r} is not active")
        now = _now_ns()
        self._c.execute(
            "UPDATE snapshots SET name = ?, kind = ?, created_ns = ?, updated_ns = ?, "
            "usage_size = ?, usage_inodes = ? WHERE id = ?",
            (name, int(Kind.COMMITTED), now, now, usage.size, usage.inodes, row["id"]),
        )
        self._put_labels(row["id"], labels or {})
        sid: int = row["id"]
        return sid

    def remove(self, key: str) -> tuple[int, Kind]:
        """Delete ``key``'s record (not its directory); refused while it has children."""
        self._need_write()
        row = self._row(key)
        if row is None:
            raise SnapshotNotFound(f"snapshot {key!r} does not exist")
        child = self._c.execute(
            "SELECT name FROM snapshots WHERE parent_id = ? LIMIT 1", (row["id"],)
        ).fetchone()
        if child is not None:
            raise SnapshotPreconditionFailed(
                f"cannot remove snapshot {key!r} with child {child[0]!r}"
            )
        self._c.execute("DELETE FROM snapshots WHERE id = ?", (row["id"],))
        return row["id"], Kind(row["kind"])

    def update_info(
        self, name: str, labels: Mapping[str, str], fieldpaths: list[str] | tuple[str, ...]
    ) -> Info:
        """containerd's UpdateInfo: only labels are mutable; no paths means "all labels"."""
        self._need_write()
        row = self._row(name)
        if row is None:
            raise SnapshotNotFound(f"snapshot {name!r} does not exist")
        updated = updated_labels(self._labels(row["id"]), labels, fieldpaths, f"snapshot {name!r}")
        self._c.execute("UPDATE snapshots SET updated_ns = ? WHERE id = ?", (_now_ns(), row["id"]))
        self._put_labels(row["id"], updated)
        _, info, _ = self.get_info(name)
        return info

    # -- Nydus mounts -------------------------------------------------------------------------

    def put_nydus_mount(self, m: NydusMount) -> None:
        self._need_write()
        self._c.execute(
            "INSERT OR REPLACE INTO nydus_mounts (snapshot_id, bootstrap_id, lower_dir, image_ref)"
            " VALUES (?, ?, ?, ?)",
            (m.snapshot_id, m.bootstrap_id, m.lower_dir, m.image_ref),
        )

    def get_nydus_mount(self, snapshot_id: int) -> NydusMount | None:
        row = self._c.execute(
            "SELECT * FROM nydus_mounts WHERE snapshot_id = ?", (snapshot_id,)
        ).fetchone()
        if row is None:
            return None
        return NydusMount(
            row["snapshot_id"], row["bootstrap_id"], row["lower_dir"], row["image_ref"]
        )

    def nydus_mounts(self) -> list[NydusMount]:
        rows = self._c.execute("SELECT * FROM nydus_mounts ORDER BY snapshot_id").fetchall()
        return [
            NydusMount(r["snapshot_id"], r["bootstrap_id"], r["lower_dir"], r["image_ref"])
            for r in rows
        ]

    def delete_nydus_mount(self, snapshot_id: int) -> None:
        self._need_write()
        self._c.execute("DELETE FROM nydus_mounts WHERE snapshot_id = ?", (snapshot_id,))


class MetaStore:
    """The sqlite database of one snapshotter root (see module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            # 0600: labels may carry registry credentials (sqlite gives its -wal/-shm files
            # the database file's mode)
            for p in (
                self.path,
                *(self.path.with_name(self.path.name + x) for x in ("-wal", "-shm", "-journal")),
            ):
                if p == self.path or p.exists():
                    private_file(p)
        except OSError as e:
            raise NydusError(f"cannot open snapshot metadata {self.path}: {e.strerror}") from e
        try:
            self._conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30
            )
        except sqlite3.Error as e:
            raise NydusError(f"cannot open snapshot metadata {self.path}: {e}") from e
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = FULL")
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            version: int = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise NydusError(
                    f"snapshot metadata {self.path} has schema version {version}, newer than "
                    f"this snapshotter supports ({SCHEMA_VERSION}): refusing to touch it"
                )
            while version < SCHEMA_VERSION:
                version += 1
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    for stmt in _MIGRATIONS[version].split(";"):
                        if stmt.strip():
                            self._conn.execute(stmt)
                    self._conn.execute(f"PRAGMA user_version = {version}")
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise

    @property
    def schema_version(self) -> int:
        with self._lock:
            v: int = self._conn.execute("PRAGMA user_version").fetchone()[0]
            return v

    @contextlib.contextmanager
    def transaction(self, writable: bool = False) -> Iterator[Transaction]:
        """A transaction: commit on normal exit, roll back on an exception."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE" if writable else "BEGIN")
            except sqlite3.Error as e:
                raise NydusError(f"snapshot metadata {self.path}: cannot begin: {e}") from e
            try:
                yield Transaction(self._conn, writable)
            except BaseException as e:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error):
                    raise NydusError(f"snapshot metadata {self.path}: {e}") from e
                raise
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as e:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise NydusError(f"snapshot metadata {self.path}: commit failed: {e}") from e

    def close(self) -> None:
        with self._lock:
            self._conn.close()
