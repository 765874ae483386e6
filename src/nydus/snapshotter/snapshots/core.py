"""Snapshot semantics: containerd's overlay snapshotter, plus Nydus remote snapshots.

Owns the snapshotter root::

    <root>/metadata.db            sqlite metadata (:mod:`.store`)
    <root>/snapshots/<id>/fs      the snapshot's upper dir (a layer's files once committed)
    <root>/snapshots/<id>/work    overlayfs work dir (active snapshots)

For images that are not Nydus images it behaves as containerd's ``overlayfs`` snapshotter, so it
can be containerd's default: a snapshot without parents mounts as a bind mount of its ``fs``
(``rw`` when active, ``ro`` as a view); a view with one parent binds that parent read-only; all
else is ``overlay`` with ``lowerdir=`` the parents' ``fs`` dirs (nearest first) and, for active
snapshots, ``upperdir=``/``workdir=``; ``index=off`` when the kernel has that parameter. New
directories are made under ``snapshots/new-*`` and renamed into place inside the metadata
transaction; ``Remove`` deletes the record and then every directory the metadata does not know
(as containerd's synchronous remove does); ``Cleanup`` does the same and releases Nydus mounts
whose snapshots are gone. After ``Cleanup``, and after ``Remove`` of a Nydus bootstrap layer,
the mounter's ``collect_garbage`` gets the bootstraps of every Nydus image left, and deletes the
cache files of blobs none of them uses.

Remote-snapshot rules (nydus-reference.md §1.5):

- ``Prepare`` of a layer labelled ``containerd.io/snapshot/nydus-blob`` (with
  ``containerd.io/snapshot.ref = <chainID>``) records a committed snapshot named ``<chainID>``
  on the requested parent and answers ALREADY_EXISTS: containerd then finds it by its labels,
  counts the layer as unpacked and never downloads the blob.
- The ``nydus-bootstrap`` layer is unpacked by containerd like any layer.
- Stock ``ctr image pull`` (containerd 1.6) unpacks with ``rootfs.ApplyLayerWithOpts`` and
  passes **no labels**: ``Prepare("<ns>/<n>/extract-<unique> <chainID>", parent)``. For such
  keys the snapshotter asks the ``layers`` resolver (containerd's images, :mod:`.imageref`)
  which layer ``chainID`` is and takes the labels containerd's unpacker would have passed. A
  bootstrap layer gets its ``nydus-bootstrap`` labels that way (and keeps them through the
  label-less ``Commit``), so the container's ``Prepare`` finds it. A Nydus data-blob layer
  cannot be unpacked at all (containerd has no stream processor for its media type, and
  containerd's metadata layer turns ALREADY_EXISTS without a target into an unknown error):
  it must already be known to containerd before its unpack looks for it, which the content
  store does (:mod:`~..content.remotelayers`); if it is not, ``Prepare`` fails with
  FAILED_PRECONDITION and a message that says so, instead of containerd's "no processor for
  media-type".
- ``Prepare`` of a ``nydus-bootstrap`` layer whose caller named the target
  (``containerd.io/snapshot.ref`` among the labels it passed: the content store's registration,
  the CRI plugin), with a ``layer_blobs`` source (``--content-store``): the layer is applied
  from the snapshotter's own content store (:mod:`.localapply`: digest, safe extractor, chain
  ID checked), committed as ``<chainID>`` and answered ALREADY_EXISTS, so containerd neither
  reads the blob back nor applies it. When the blob is not stored or anything is refused, the
  reason is logged and ``Prepare`` goes on as for any layer: containerd applies it. (A
  label-less ``Prepare`` never takes this path: containerd's metadata layer turns
  ALREADY_EXISTS without a target into an error.)
- ``Prepare`` of an active snapshot (no ``snapshot.ref``: a container's rootfs) or ``View``
  whose parents include a bootstrap snapshot asks the :class:`~.mounter.NydusMounter` to serve
  ``<bootstrap fs>/image/image.boot`` and returns an overlay whose lowest ``lowerdir`` is that
  mount (parents above the bootstrap, if any, stay on top of it). The image reference comes from
  the CRI label or from containerd (:mod:`.imageref`).
- ``Commit`` of a bootstrap layer records the sha256 of its ``image.boot`` (containerd has just
  checked the layer against its diff_id while applying it) in ``snapshots/<id>/bootstrap.sha256``
  (0600, beside the layer's ``fs``, not in it). Every Nydus mount of the image, also after a
  restart (:meth:`Snapshotter._recover`), passes that digest to the mounter, and nydusd refuses
  a bootstrap with other bytes: the bootstrap is the root of trust of everything nydusd serves,
  and at rest nothing else re-checks it. Bootstrap layers committed by an older snapshotter have
  no such file and are mounted without the check (the daemon manager logs it once per image).

Threading contract: all methods may be called concurrently (the gRPC server's worker threads).
Metadata and directory changes happen inside store transactions (one lock); mounter calls,
image lookups and disk-usage walks happen outside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from ...atomicwrite import write_atomic
from ...credentials import private_dir
from ...errors import FormatError, NydusError
from ...metadata import parse_bootstrap_digest, read_bootstrap_file
from ..containerd.errdefs import SnapshotExists, SnapshotNotFound, SnapshotPreconditionFailed
from .filters import parse_all
from .fsutil import disk_usage, remove_tree
from .imageref import ImageRefResolver, LayerResolver, image_ref_from_labels, namespace_of_key
from .labels import (
    NYDUS_BOOTSTRAP,
    NYDUS_FS_VERSION,
    SNAPSHOT_REF,
    is_nydus_blob,
    is_nydus_bootstrap,
)
from .localapply import LayerBlobs, apply_bootstrap_blob, layer_digest_for
from .mounter import MountRequest, NydusMounter, RecoveredMount
from .store import Info, Kind, MetaStore, NydusMount, Snapshot, Transaction, Usage

__all__ = ["Mount", "Snapshotter", "overlay_index_supported"]

log = logging.getLogger(__name__)

_BOOTSTRAP_PATHS = ("image/image.boot", "image.boot")  # upstream layout, then legacy
_BOOTSTRAP_DIGEST_FILE = "bootstrap.sha256"  # in snapshots/<id>/, beside fs/
# containerd's rootfs.applyLayers key (snapshots.UnpackKeyFormat), as its metadata layer
# passes it on: "<namespace>/<n>/extract-<unique> <chainID>"
_UNPACK_KEY = re.compile(r"^([^/]+)/\d+/extract-\S+ (sha256:[0-9a-f]{64})$")
# labels of a bootstrap layer that a label-less Commit must not drop
_KEPT_AT_COMMIT = (NYDUS_BOOTSTRAP, NYDUS_FS_VERSION, SNAPSHOT_REF)


Labels = Mapping[str, str]


@dataclass(frozen=True)
class Mount:
    """One entry of the mount list containerd gets back (``containerd.types.Mount``)."""

    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""


def overlay_index_supported() -> bool:
    """Whether overlayfs has the ``index`` parameter (containerd then passes ``index=off``)."""
    return os.path.exists("/sys/module/overlay/parameters/index")


class Snapshotter:
    """The snapshot operations of containerd's Snapshots service (see module docstring)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        mounter: NydusMounter,
        resolver: ImageRefResolver | None = None,
        *,
        index_off: bool | None = None,
        layers: LayerResolver | None = None,
        layer_blobs: LayerBlobs | None = None,
    ) -> None:
        self.root = Path(root).absolute()
        self.snapshots_dir = self.root / "snapshots"
        # 0700, tightened if it exists: metadata.db holds snapshot labels, which may carry
        # registry credentials (containerd.io/snapshot/pullsecret), as upstream's does
        private_dir(self.root)
        private_dir(self.snapshots_dir)
        self.mounter = mounter
        self.resolver = resolver
        self.layers = layers
        self.layer_blobs = layer_blobs
        #: bootstrap layers applied from the content store / handed back to containerd
        self.local_applies = 0
        self.local_fallbacks = 0
        self.index_off = overlay_index_supported() if index_off is None else index_off
        self.store = MetaStore(self.root / "metadata.db")
        for leftover in self.snapshots_dir.glob("new-*"):  # creations cut short by a crash
            with contextlib.suppress(OSError):
                remove_tree(leftover)
        self._recover()

    def close(self) -> None:
        self.mounter.close()
        self.store.close()

    # -- paths and mounts ---------------------------------------------------------------------

    def upper_path(self, snapshot_id: int) -> Path:
        return self.snapshots_dir / str(snapshot_id) / "fs"

    def work_path(self, snapshot_id: int) -> Path:
        return self.snapshots_dir / str(snapshot_id) / "work"

    def _overlay_mounts(self, snap: Snapshot, lower: Sequence[str] | None = None) -> list[Mount]:
        lowers = (
            [str(self.upper_path(p)) for p in snap.parent_ids] if lower is None else list(lower)
        )
        if not lowers:
            ro = "ro" if snap.kind == Kind.VIEW else "rw"
            return [Mount("bind", str(self.upper_path(snap.id)), (ro, "rbind"))]
        opts: list[str] = ["index=off"] if self.index_off else []
        if snap.kind == Kind.ACTIVE:
            opts += [f"workdir={self.work_path(snap.id)}", f"upperdir={self.upper_path(snap.id)}"]
        elif len(lowers) == 1:
            return [Mount("bind", lowers[0], ("ro", "rbind"))]
        opts.append("lowerdir=" + ":".join(lowers))
        return [Mount("overlay", "overlay", tuple(opts))]

    def _nydus_lowers(self, snap: Snapshot, nm: NydusMount) -> list[str]:
        """Parents above the bootstrap snapshot, then the Nydus mount standing for the rest."""
        above: list[str] = []
        for pid in snap.parent_ids:
            if pid == nm.bootstrap_id:
                break
            above.append(str(self.upper_path(pid)))
        return [*above, nm.lower_dir]

    # -- creating -----------------------------------------------------------------------------

    def _new_dir(self, kind: Kind) -> Path:
        td = Path(tempfile.mkdtemp(prefix="new-", dir=self.snapshots_dir))
        (td / "fs").mkdir()
        os.chmod(td / "fs", 0o755)
        if kind == Kind.ACTIVE:
            (td / "work").mkdir()
            os.chmod(td / "work", 0o711)
        return td

    def _create(
        self, tx: Transaction, kind: Kind, key: str, parent: str, labels: Mapping[str, str]
    ) -> Snapshot:
        td = self._new_dir(kind)
        try:
            snap = tx.create(kind, key, parent, labels)
            if snap.parent_ids:
                st = os.stat(self.upper_path(snap.parent_ids[0]))
                os.lchown(td / "fs", st.st_uid, st.st_gid)
            td.rename(self.snapshots_dir / str(snap.id))
        except BaseException:
            remove_tree(td)
            raise
        return snap

    def prepare(
        self, key: str, parent: str = "", labels: Labels | None = None, namespace: str | None = None
    ) -> list[Mount]:
        """containerd ``Prepare``: a new active snapshot (see module docstring for Nydus)."""
        labels = dict(labels or {})
        target = labels.get(SNAPSHOT_REF, "")
        if target and is_nydus_bootstrap(labels) and self.layer_blobs is not None:
            self._apply_local(self.layer_blobs, target, parent, labels)  # ALREADY_EXISTS
        if not target:
            derived = self._unpack_labels(key)
            if derived:
                labels.update(derived)
                target = labels.get(SNAPSHOT_REF, "")
        if target and is_nydus_blob(labels):
            self._commit_remote(target, parent, labels)
        return self._create_and_mount(Kind.ACTIVE, key, parent, labels, namespace, target)

    def _unpack_labels(self, key: str) -> dict[str, str] | None:
        """For a label-less unpack of a Nydus layer (stock ``ctr image pull``), the labels
        containerd's unpacker would have passed (see the module docstring); else None."""
        m = _UNPACK_KEY.match(key)
        if m is None or self.layers is None:
            return None
        namespace, chain_id = m.groups()
        try:
            layer = self.layers.layer(namespace, chain_id)
        except NydusError as e:
            log.warning("cannot tell which layer %s is: %s", key, e)
            return None
        if layer is None:
            return None
        labels = layer.snapshot_labels()
        if is_nydus_blob(labels):
            raise SnapshotPreconditionFailed(
                f"layer {chain_id} of image {layer.image} is a Nydus data blob: it needs no "
                "unpacking, and containerd cannot unpack it (it has no stream processor for "
                "its media type). containerd asked to unpack it because nothing told it the "
                "layer was there: with containerd 1.6's `ctr image pull`, run "
                "containerd-nydus-grpc with --content-store and proxy containerd's content "
                "store to it (README: Pulling), or pull with nydus-pull"
            )
        if not is_nydus_bootstrap(labels):
            return None  # a plain layer: unpacked as containerd's overlayfs would
        log.info("%s: Nydus bootstrap layer of image %s (labels from containerd)", key, layer.image)
        return labels

    def view(
        self, key: str, parent: str = "", labels: Labels | None = None, namespace: str | None = None
    ) -> list[Mount]:
        """containerd ``View``: a new read-only snapshot of ``parent``."""
        labels = dict(labels or {})
        return self._create_and_mount(Kind.VIEW, key, parent, labels, namespace, "")

    def _create_and_mount(
        self,
        kind: Kind,
        key: str,
        parent: str,
        labels: dict[str, str],
        namespace: str | None,
        target: str,
    ) -> list[Mount]:
        with self.store.transaction(writable=True) as tx:
            snap = self._create(tx, kind, key, parent, labels)
            boot = None if target else self._find_bootstrap(tx, snap)
        if boot is None:
            return self._overlay_mounts(snap)
        try:
            nm = self._mount_nydus(snap, key, boot, labels, namespace)
        except BaseException:
            self._discard(key)
            raise
        return self._overlay_mounts(snap, self._nydus_lowers(snap, nm))

    def _commit_remote(self, target: str, parent: str, labels: dict[str, str]) -> NoReturn:
        """Record remote layer ``target`` as committed, then answer ALREADY_EXISTS."""
        with self.store.transaction(writable=True) as tx:
            try:
                tx.get_info(target)
            except SnapshotNotFound:
                td = self._new_dir(Kind.COMMITTED)
                try:
                    sid = tx.create_committed(target, parent, labels)
                    td.rename(self.snapshots_dir / str(sid))
                except BaseException:
                    remove_tree(td)
                    raise
                log.info("remote Nydus layer %s committed as snapshot %d (skipped)", target, sid)
        raise SnapshotExists(f"target snapshot {target!r}: Nydus blob layer, nothing to unpack")

    def _apply_local(
        self, blobs: LayerBlobs, target: str, parent: str, labels: dict[str, str]
    ) -> None:
        """Apply bootstrap layer ``target`` from the content store, commit it and answer
        ALREADY_EXISTS; return (after logging why) when containerd should apply it itself."""
        with self.store.transaction() as tx:
            try:
                tx.get_info(target)
            except SnapshotNotFound:
                pass
            else:
                raise SnapshotExists(f"target snapshot {target!r}: Nydus bootstrap layer exists")
            try:
                parent_info = tx.get_info(parent)[1] if parent else None
            except SnapshotNotFound:
                return  # the normal path reports it
        parent_chain = ""
        if parent_info is not None:
            parent_chain = parent_info.labels.get(SNAPSHOT_REF) or parent.rsplit("/", 1)[-1]
        digest = layer_digest_for(blobs, target, parent_chain, labels)
        if not digest:
            return self._fall_back(target, "which blob it is is unknown (no manifest lists it)")
        try:
            blob = blobs.open_blob(digest)
        except (NydusError, OSError) as e:
            return self._fall_back(target, f"blob {digest} cannot be opened: {e}")
        if blob is None:
            return self._fall_back(target, f"blob {digest} is not in the content store")
        start = time.monotonic()
        td = self._new_dir(Kind.COMMITTED)
        try:
            try:
                with blob:
                    res = apply_bootstrap_blob(blob, digest, td / "fs", parent_chain, target)
            except (NydusError, OSError) as e:
                return self._fall_back(target, f"blob {digest} refused: {e}")
            if parent_info is not None:
                with self.store.transaction() as tx:
                    pid = tx.get_info(parent)[0]
                st = os.stat(self.upper_path(pid))
                os.lchown(td / "fs", st.st_uid, st.st_gid)
            usage = disk_usage(td / "fs")
            with self.store.transaction(writable=True) as tx:
                sid = tx.create_committed(target, parent, labels, usage)
                td.rename(self.snapshots_dir / str(sid))
        finally:
            if td.exists():
                remove_tree(td)
        self._record_bootstrap_digest(sid)
        self.local_applies += 1
        log.info(
            "Nydus bootstrap layer %s (blob %s, %d entries) applied from the content store in "
            "%.0f ms: committed as snapshot %d, containerd skips it",
            target,
            digest,
            res.entries,
            (time.monotonic() - start) * 1000,
            sid,
        )
        raise SnapshotExists(f"target snapshot {target!r}: Nydus bootstrap layer applied")

    def _fall_back(self, target: str, why: str) -> None:
        self.local_fallbacks += 1
        log.warning(
            "Nydus bootstrap layer %s not applied from the content store (containerd applies "
            "it): %s",
            target,
            why,
        )

    def _find_bootstrap(self, tx: Transaction, snap: Snapshot) -> Info | None:
        for pid in snap.parent_ids:
            info = tx.info_by_id(pid)
            if info is not None and is_nydus_bootstrap(info.labels):
                return info
        return None

    # -- Nydus --------------------------------------------------------------------------------

    def bootstrap_file(self, bootstrap_id: int) -> Path:
        fs = self.upper_path(bootstrap_id)
        for rel in _BOOTSTRAP_PATHS:
            path = fs / rel
            # the layer made these names: a symlink could name any file of the host
            if any(p.is_symlink() for p in (path, *list(path.parents)[: rel.count("/")])):
                raise FormatError(
                    f"Nydus bootstrap layer (snapshot {bootstrap_id}): {rel} is or lies below "
                    f"a symlink (refused: it could name a file outside the snapshot)"
                )
            if path.is_file():
                return path
        raise FormatError(
            f"Nydus bootstrap layer (snapshot {bootstrap_id}) has no {_BOOTSTRAP_PATHS[0]} "
            f"under {fs}"
        )

    def _digest_path(self, bootstrap_id: int) -> Path:
        return self.snapshots_dir / str(bootstrap_id) / _BOOTSTRAP_DIGEST_FILE

    def _record_bootstrap_digest(self, bootstrap_id: int) -> None:
        """Hash the committed layer's bootstrap (the bytes nydusd will read: for a blob with
        an inlined bootstrap, that bootstrap) and write ``sha256:HEX`` beside its ``fs``."""
        try:
            boot = self.bootstrap_file(bootstrap_id)
            data = read_bootstrap_file(boot)
        except FormatError as e:  # the mount will report it; the commit itself is fine
            log.warning("snapshot %d: no bootstrap digest recorded: %s", bootstrap_id, e)
            return
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        write_atomic(self._digest_path(bootstrap_id), digest.encode() + b"\n", 0o600)
        log.info("snapshot %d: bootstrap %s is %s (recorded)", bootstrap_id, boot, digest)

    def recorded_bootstrap_digest(self, bootstrap_id: int) -> str | None:
        """The digest recorded at the bootstrap layer's commit; ``None`` for a layer committed
        by an older snapshotter. A damaged record is a FormatError, never "no digest"."""
        path = self._digest_path(bootstrap_id)
        try:
            text = path.read_text(errors="replace")[:200]
        except FileNotFoundError:
            return None
        except OSError as e:
            raise FormatError(f"bootstrap digest record {path}: {e.strerror}") from e
        try:
            return parse_bootstrap_digest(text)
        except NydusError as e:
            raise FormatError(f"bootstrap digest record {path} is damaged: {e}") from e

    def _image_ref(
        self, key: str, boot: Info, labels: Mapping[str, str], namespace: str | None
    ) -> str | None:
        ref = image_ref_from_labels(labels, boot.labels)
        if ref or self.resolver is None:
            return ref
        ns = namespace_of_key(key) or namespace_of_key(boot.name) or namespace
        chain_id = boot.labels.get(SNAPSHOT_REF) or boot.name.rsplit("/", 1)[-1]
        if not ns:
            log.warning("no namespace for %s: cannot ask containerd for its image", key)
            return None
        try:
            return self.resolver.image_ref(ns, chain_id)
        except NydusError as e:
            log.warning("image reference of %s unknown: %s", chain_id, e)
            return None

    def _mount_nydus(
        self,
        snap: Snapshot,
        key: str,
        boot: Info,
        labels: Mapping[str, str],
        namespace: str | None,
    ) -> NydusMount:
        with self.store.transaction() as tx:
            boot_id, _, _ = tx.get_info(boot.name)
        bootstrap = self.bootstrap_file(boot_id)
        digest = self.recorded_bootstrap_digest(boot_id)
        image_ref = self._image_ref(key, boot, labels, namespace)
        merged = {**boot.labels, **labels}
        log.info(
            "snapshot %d (%s): Nydus image %s, bootstrap %s", snap.id, key, image_ref, bootstrap
        )
        lower = self.mounter.mount(MountRequest(str(snap.id), bootstrap, image_ref, merged, digest))
        nm = NydusMount(snap.id, boot_id, str(lower), image_ref)
        try:
            with self.store.transaction(writable=True) as tx:
                tx.put_nydus_mount(nm)
        except BaseException:
            self.mounter.umount(str(snap.id))
            raise
        return nm

    def _recover(self) -> None:
        found: list[RecoveredMount] = []
        with self.store.transaction() as tx:
            ids = tx.ids()
            for nm in tx.nydus_mounts():
                if nm.snapshot_id not in ids:
                    continue  # released by the next Cleanup
                try:
                    boot = self.bootstrap_file(nm.bootstrap_id)
                except FormatError:
                    boot = self.upper_path(nm.bootstrap_id) / _BOOTSTRAP_PATHS[0]
                try:
                    digest = self.recorded_bootstrap_digest(nm.bootstrap_id)
                except FormatError as e:
                    log.error("snapshot %d: not recovered: %s", nm.snapshot_id, e)
                    continue
                found.append(
                    RecoveredMount(
                        str(nm.snapshot_id), boot, nm.image_ref, Path(nm.lower_dir), digest
                    )
                )
        if found:
            log.info("recovering %d Nydus mount(s)", len(found))
        self.mounter.recover(found)

    # -- queries ------------------------------------------------------------------------------

    def mounts(self, key: str) -> list[Mount]:
        """containerd ``Mounts`` of an active or view snapshot."""
        with self.store.transaction() as tx:
            snap = tx.get_snapshot(key)
            nm = tx.get_nydus_mount(snap.id)
        if nm is not None:
            return self._overlay_mounts(snap, self._nydus_lowers(snap, nm))
        return self._overlay_mounts(snap)

    def stat(self, key: str) -> Info:
        with self.store.transaction() as tx:
            return tx.get_info(key)[1]

    def update(self, name: str, labels: Mapping[str, str], fieldpaths: Sequence[str]) -> Info:
        with self.store.transaction(writable=True) as tx:
            return tx.update_info(name, labels, tuple(fieldpaths))

    def usage(self, key: str) -> Usage:
        """Recorded usage of a committed snapshot; measured (``du``) for an active one."""
        with self.store.transaction() as tx:
            sid, info, usage = tx.get_info(key)
        if info.kind == Kind.ACTIVE:
            return disk_usage(self.upper_path(sid))
        return usage

    def walk(self, filters: Sequence[str] = ()) -> list[Info]:
        """containerd ``Walk``/``List``: every snapshot matching any of ``filters``."""
        f = parse_all(filters)
        with self.store.transaction() as tx:
            return [i for i in tx.walk() if f.match_snapshot(i)]

    # -- committing and removing --------------------------------------------------------------

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        """containerd ``Commit``: active ``key`` becomes committed ``name``."""
        with self.store.transaction() as tx:
            sid, info, _ = tx.get_info(key)
        labels = dict(labels or {})
        if is_nydus_bootstrap(info.labels) and not is_nydus_bootstrap(labels):
            # a label-less commit (stock ctr) of a bootstrap layer we labelled at Prepare
            for k in _KEPT_AT_COMMIT:
                if k in info.labels:
                    labels.setdefault(k, info.labels[k])
        if is_nydus_bootstrap(labels) or is_nydus_bootstrap(info.labels):
            self._record_bootstrap_digest(sid)
        usage = disk_usage(self.upper_path(sid))
        with self.store.transaction(writable=True) as tx:
            tx.commit_active(key, name, usage, labels)

    def _orphan_dirs(self, tx: Transaction) -> list[Path]:
        ids = {str(i) for i in tx.ids()}
        return [p for p in self.snapshots_dir.iterdir() if p.name not in ids]

    def _remove_dirs(self, dirs: Sequence[Path]) -> None:
        for d in dirs:
            try:
                remove_tree(d)
            except OSError as e:
                log.warning("cannot remove %s: %s", d, e)

    def remove(self, key: str) -> None:
        """containerd ``Remove``: release its Nydus mount, drop it, delete orphan dirs."""
        with self.store.transaction() as tx:
            sid, info, _ = tx.get_info(key)
            nm = tx.get_nydus_mount(sid)
        if nm is not None:
            self.mounter.umount(str(sid))
            with self.store.transaction(writable=True) as tx:
                tx.delete_nydus_mount(sid)
        with self.store.transaction(writable=True) as tx:
            tx.remove(key)
            orphans = self._orphan_dirs(tx)
        self._remove_dirs(orphans)
        if is_nydus_bootstrap(info.labels):
            self.collect_garbage()

    def live_bootstraps(self) -> list[Path]:
        """The bootstrap files of every Nydus image still here (committed bootstrap layers)."""
        with self.store.transaction() as tx:
            ids = [
                sid
                for sid, value in tx.labelled(NYDUS_BOOTSTRAP)
                if is_nydus_bootstrap({NYDUS_BOOTSTRAP: value})
            ]
        out = []
        for sid in ids:
            try:
                out.append(self.bootstrap_file(sid))
            except FormatError:
                continue  # being unpacked, or damaged: it references nothing we can know
        return out

    def collect_garbage(self) -> None:
        """Let the mounter delete cached blobs no remaining Nydus image uses."""
        try:
            self.mounter.collect_garbage(self.live_bootstraps())
        except (NydusError, OSError) as e:
            log.warning("cache GC failed: %s", e)

    def _discard(self, key: str) -> None:
        """Undo a snapshot whose Nydus mount failed (containerd never learns of it)."""
        try:
            self.remove(key)
        except NydusError as e:
            log.warning("cannot discard snapshot %s after a failed mount: %s", key, e)

    def cleanup(self) -> None:
        """containerd ``Cleanup``: release stale Nydus mounts, delete orphan directories."""
        with self.store.transaction() as tx:
            ids = tx.ids()
            stale = [nm for nm in tx.nydus_mounts() if nm.snapshot_id not in ids]
        for nm in stale:
            try:
                self.mounter.umount(str(nm.snapshot_id))
            except NydusError as e:
                log.warning("cleanup: cannot release Nydus mount %d: %s", nm.snapshot_id, e)
                continue
            with self.store.transaction(writable=True) as tx:
                tx.delete_nydus_mount(nm.snapshot_id)
        with self.store.transaction(writable=True) as tx:
            orphans = self._orphan_dirs(tx)
        self._remove_dirs(orphans)
        self.collect_garbage()
