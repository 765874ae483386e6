"""The RAFS FUSE adapter: one or more :class:`~nydus.fs.RafsFs` in one FUSE inode space.

Single-image mode: the image is mounted at ``/`` and its inode numbers are the node ids (root
1). Shared-daemon mode (upstream's pseudo fs): the FUSE root is a small in-memory tree of
directories; each image is attached at a path such as ``/sub`` or ``/a/b`` and gets a *slot*;
its node ids are ``slot << 56 | ino``. Pseudo directories other than the root use slot 255.

Lookup counts are kept per slot. Detaching an image (``DELETE /api/v1/mount``) removes it from
the tree at once and asks the kernel to drop the dentry; files still open on it keep working,
and its storage is closed when the kernel has forgotten its last inode (or at shutdown).

Errors become errnos at this edge: NotFoundError on LOOKUP is a cached negative entry;
getxattr with xattrs disabled is ENOSYS in single mode (the kernel stops asking) but
EOPNOTSUPP when several images share the connection.

Threading contract: every Operations method is thread-safe; ``attach``/``detach`` may run
concurrently with requests (from the API thread).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import fuse
from ..errors import NotFoundError
from ..fs.metrics import StatsFop
from ..fs.rafs import DEFAULT_TIMEOUT, ROOT_INO, Attr, Ino, RafsFs
from ..fuse import ROOT_ID, FuseError, NodeId, RequestContext
from ..fuse.protocol import ATTR, ENTRY_OUT_HEAD, AttrFields, pack_attr, pack_attr_out

__all__ = ["RafsVfs", "MountSlot", "SLOT_SHIFT", "PSEUDO_SLOT"]

log = logging.getLogger("nydus.daemon")

SLOT_SHIFT = 56
LOCAL_MASK = (1 << SLOT_SHIFT) - 1
PSEUDO_SLOT = 255
MAX_SLOTS = 254
_DT_DIR = stat.S_IFDIR >> 12
_CACHE_LIMIT = 1 << 18
_U64 = (1 << 64) - 1
_ENTRY_OUT = struct.Struct(ENTRY_OUT_HEAD.format + ATTR.format.lstrip("<"))  # 128 bytes


@dataclass
class MountSlot:
    """One attached image."""

    slot: int
    path: str
    fs: RafsFs
    on_close: Callable[[], None] | None = None
    nlookup: int = 0
    detached: bool = False
    closed: bool = False
    # packed replies per inode: the image is immutable, so they never go stale
    entries: dict[int, fuse.Entry] = field(default_factory=dict, repr=False)
    attrs: dict[int, fuse.AttrReply] = field(default_factory=dict, repr=False)


@dataclass
class _PseudoDir:
    nodeid: int
    parent: int
    name: bytes
    mtime: int = field(default_factory=lambda: time.time_ns())
    children: dict[bytes, int] = field(default_factory=dict)  # name -> nodeid


def _rdev32(dev: int) -> int:
    """The kernel's new_encode_dev (fuse_attr.rdev is 32 bits)."""
    if not dev:
        return 0
    ma, mi = os.major(dev), os.minor(dev)
    return ((mi & 0xFF) | ((ma & 0xFFF) << 8) | ((mi & ~0xFF) << 12)) & 0xFFFFFFFF


class RafsVfs(fuse.Operations):
    """See the module docstring."""

    def __init__(
        self, *, timeout: float = DEFAULT_TIMEOUT, zero_message_open: bool = False
    ) -> None:
        self.timeout = timeout
        self._tsec = int(timeout)
        self._tnsec = min(int((timeout - int(timeout)) * 1e9), 999_999_999)
        self.zero_message_open = zero_message_open
        self._lock = threading.RLock()
        self._root: MountSlot | None = None  # image at "/"
        self._slots: dict[int, MountSlot] = {}
        self._pseudo: dict[int, _PseudoDir] = {ROOT_INO: _PseudoDir(ROOT_INO, ROOT_INO, b"")}
        self._next_pseudo = 2
        self.notify_entry: Callable[[int, bytes], object] | None = None
        self.notify_inode: Callable[[int], object] | None = None
        self.started = time.time_ns()

    # ------------------------------------------------------------------ mounts

    @staticmethod
    def normalize(path: str) -> str:
        if not path.startswith("/"):
            raise FuseError(errno.EINVAL, f"mount path must be absolute: {path!r}")
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts):
            raise FuseError(errno.EINVAL, f"mount path must not contain '..': {path!r}")
        return "/" + "/".join(parts)

    def mounts(self) -> dict[str, MountSlot]:
        with self._lock:
            out = {m.path: m for m in self._slots.values() if not m.detached}
            if self._root is not None and not self._root.detached:
                out["/"] = self._root
            return out

    def get(self, path: str) -> MountSlot:
        m = self.mounts().get(self.normalize(path))
        if m is None:
            raise NotFoundError(f"nothing is mounted at {path}")
        return m

    def attach(self, path: str, fs: RafsFs, on_close: Callable[[], None] | None = None) -> int:
        """Attach ``fs`` at ``path``; returns its slot (0 for ``/``)."""
        path = self.normalize(path)
        with self._lock:
            if path in self.mounts():
                raise FuseError(errno.EEXIST, f"{path} is already mounted")
            if path == "/":
                if self._pseudo[ROOT_INO].children:
                    raise FuseError(errno.EBUSY, "cannot mount at / while sub-mounts exist")
                self._root = MountSlot(0, "/", fs, on_close)
                return 0
            if self._root is not None:
                raise FuseError(
                    errno.EBUSY,
                    "an image is mounted at /; sub-mounts need a shared daemon "
                    "(start nydusd without --bootstrap)",
                )
            slot = next((s for s in range(1, MAX_SLOTS + 1) if s not in self._slots), None)
            if slot is None:
                raise FuseError(errno.ENOSPC, f"at most {MAX_SLOTS} images per daemon")
            parent: int = ROOT_ID  # node ids of the pseudo tree
            parts = path.strip("/").encode().split(b"/")
            for part in parts[:-1]:
                d = self._pseudo[parent]
                child = d.children.get(part)
                if child is None:
                    child = (PSEUDO_SLOT << SLOT_SHIFT) | self._next_pseudo
                    self._next_pseudo += 1
                    self._pseudo[child] = _PseudoDir(child, parent, part)
                    d.children[part] = child
                    d.mtime = time.time_ns()
                elif child not in self._pseudo:
                    raise FuseError(errno.EBUSY, f"an image is mounted at a parent of {path}")
                parent = child
            d = self._pseudo[parent]
            if parts[-1] in d.children:
                raise FuseError(errno.EEXIST, f"{path} is a directory of other mounts")
            self._slots[slot] = MountSlot(slot, path, fs, on_close)
            d.children[parts[-1]] = (slot << SLOT_SHIFT) | ROOT_INO
            d.mtime = time.time_ns()
        self._notify(parent, parts[-1])
        return slot

    def detach(self, path: str) -> MountSlot:
        """Remove the image at ``path`` from the tree; its storage closes when unused."""
        path = self.normalize(path)
        with self._lock:
            m = self.mounts().get(path)
            if m is None:
                raise NotFoundError(f"nothing is mounted at {path}")
            m.detached = True
            if m.slot == 0:
                self._root = None
                self._close_slot(m)  # the kernel never forgets the root: close now
                return m
            parts = path.strip("/").encode().split(b"/")
            parent: int = ROOT_ID
            chain = [parent]
            for part in parts[:-1]:
                parent = self._pseudo[parent].children[part]
                chain.append(parent)
            del self._pseudo[parent].children[parts[-1]]
            self._pseudo[parent].mtime = time.time_ns()
            removed: list[tuple[int, bytes]] = [(parent, parts[-1])]
            # prune pseudo directories left empty
            for i in range(len(chain) - 1, 0, -1):
                node = self._pseudo[chain[i]]
                if node.children:
                    break
                up = self._pseudo[node.parent]
                del up.children[node.name]
                up.mtime = time.time_ns()
                removed.append((node.parent, node.name))
            if m.nlookup <= 0:
                self._close_slot(m)
        for parent_id, name in removed:
            self._notify(parent_id, name)
        return m

    def replace(self, path: str, fs: RafsFs, on_close: Callable[[], None] | None = None) -> None:
        """Swap the image at ``path`` (remount): new lookups see the new image."""
        self.detach(path)  # no lock across both: notifications must not run under our lock
        self.attach(path, fs, on_close)

    def close_all(self) -> None:
        with self._lock:
            slots = list(self._slots.values()) + ([self._root] if self._root else [])
            self._slots.clear()
            self._root = None
        for m in slots:
            self._close_slot(m)

    def export_layout(self) -> dict[str, Any]:
        """Slots and pseudo directories, so another process can rebuild the same node ids."""
        with self._lock:
            return {
                "root": self._root.path if self._root is not None else None,
                "slots": {str(m.slot): m.path for m in self._slots.values() if not m.detached},
                "pseudo": [
                    [d.nodeid, d.parent, d.name.decode("utf-8", "surrogateescape")]
                    for d in self._pseudo.values()
                    if d.nodeid != ROOT_INO
                ],
                "next_pseudo": self._next_pseudo,
            }

    def import_layout(
        self, layout: dict[str, Any], images: dict[str, tuple[RafsFs, Callable[[], None] | None]]
    ) -> None:
        """Rebuild :meth:`export_layout`'s tree with freshly opened images (by path)."""
        with self._lock:
            if self._slots or self._root is not None or self._pseudo[ROOT_INO].children:
                raise FuseError(errno.EBUSY, "import_layout needs an empty VFS")
            if layout.get("root"):
                fs, close = images[layout["root"]]
                self._root = MountSlot(0, "/", fs, close)
                return
            for nodeid, parent, name in sorted(layout.get("pseudo", [])):
                self._pseudo[int(nodeid)] = _PseudoDir(
                    int(nodeid), int(parent), str(name).encode("utf-8", "surrogateescape")
                )
            for d in list(self._pseudo.values()):
                if d.nodeid != ROOT_INO:
                    self._pseudo[d.parent].children[d.name] = d.nodeid
            self._next_pseudo = int(layout.get("next_pseudo", self._next_pseudo))
            for slot_s, path in layout.get("slots", {}).items():
                slot = int(slot_s)
                fs, close = images[path]
                self._slots[slot] = MountSlot(slot, path, fs, close)
                parent = ROOT_INO
                parts = path.strip("/").encode().split(b"/")
                for part in parts[:-1]:
                    parent = self._pseudo[parent].children[part]
                self._pseudo[parent].children[parts[-1]] = (slot << SLOT_SHIFT) | ROOT_INO

    def _close_slot(self, m: MountSlot) -> None:
        with self._lock:
            if m.closed:
                return
            m.closed = True
            if m.slot:
                self._slots.pop(m.slot, None)
        log.info("closing image %s", m.path)
        try:
            if m.on_close is not None:
                m.on_close()
            else:
                m.fs.close()
        except Exception:
            log.exception("closing %s", m.path)

    def _notify(self, parent: int, name: bytes) -> None:
        """A pseudo directory changed: drop the kernel's dentry for ``name`` (if it has one)
        and the directory's cached attributes and listing (readdir cache)."""
        try:
            if self.notify_entry is not None:
                self.notify_entry(parent, name)
            if self.notify_inode is not None:
                self.notify_inode(parent)
        except Exception:
            log.exception("notify failed")

    # ------------------------------------------------------------------ node ids

    def _resolve(self, nodeid: NodeId) -> tuple[MountSlot | None, Ino]:
        """(slot, its inode number) or (None, the pseudo directory's node id, which is the
        pseudo tree's inode number)."""
        slot = nodeid >> SLOT_SHIFT
        if slot == 0:
            root = self._root
            if root is not None:
                return root, Ino(nodeid)
            if nodeid == ROOT_ID:
                return None, Ino(nodeid)
            raise FuseError(errno.ESTALE, f"stale node {nodeid}")
        if slot == PSEUDO_SLOT:
            if nodeid in self._pseudo:
                return None, Ino(nodeid)
            raise FuseError(errno.ESTALE, f"stale node {nodeid:#x}")
        m = self._slots.get(slot)
        if m is None or m.closed:
            raise FuseError(errno.ESTALE, f"stale node {nodeid:#x}")
        return m, Ino(nodeid & LOCAL_MASK)

    def _file(self, nodeid: NodeId, pseudo_error: int) -> tuple[RafsFs, Ino]:
        """(fs, local inode) of an image's node; FuseError(``pseudo_error``) for a pseudo one."""
        m, local = self._resolve(nodeid)
        if m is None:
            raise FuseError(pseudo_error)
        return m.fs, local

    def _fields(self, m: MountSlot, a: Attr) -> AttrFields:
        return AttrFields.read_only(
            (m.slot << SLOT_SHIFT) | a.ino,
            a.mode,
            a.size,
            a.nlink,
            (a.mtime, a.mtime_nsec),
            blocks=a.blocks,
            uid=a.uid,
            gid=a.gid,
            rdev=_rdev32(a.rdev),
            blksize=a.blksize,
        )

    def _pseudo_fields(self, d: _PseudoDir) -> AttrFields:
        t = divmod(d.mtime, 1_000_000_000)
        return AttrFields.read_only(d.nodeid, stat.S_IFDIR | 0o755, 4096, 2 + len(d.children), t)

    def _count(self, m: MountSlot | None, n: int = 1) -> None:
        if m is not None and m.slot:
            with self._lock:
                m.nlookup += n

    def _entry(self, m: MountSlot, a: Attr) -> fuse.Entry:
        e = m.entries.get(a.ino)
        if e is None:
            f = self._fields(m, a)
            raw = _ENTRY_OUT.pack(
                f.ino,
                0,
                self._tsec,
                self._tsec,
                self._tnsec,
                self._tnsec,
                f.ino,
                f.size,
                f.blocks,
                f.atime & _U64,
                f.mtime & _U64,
                f.ctime & _U64,
                f.atime_ns,
                f.mtime_ns,
                f.ctime_ns,
                f.mode,
                f.nlink,
                f.uid,
                f.gid,
                f.rdev,
                f.blksize,
                0,
            )
            e = fuse.Entry(f.ino, f, self.timeout, self.timeout, raw=raw)
            if len(m.entries) >= _CACHE_LIMIT:
                m.entries.clear()
            m.entries[a.ino] = e
        return e

    def _attr_reply(self, m: MountSlot, local: Ino) -> fuse.AttrReply:
        r = m.attrs.get(local)
        if r is None:
            f = self._fields(m, m.fs.getattr(local))
            r = fuse.AttrReply(f, self.timeout, raw=pack_attr_out(self.timeout, pack_attr(f)))
            if len(m.attrs) >= _CACHE_LIMIT:
                m.attrs.clear()
            m.attrs[local] = r
        else:
            m.fs.stats.record(StatsFop.GETATTR, local, True)
        return r

    # ------------------------------------------------------------------ Operations

    def lookup(self, ctx: RequestContext, parent: NodeId, name: bytes) -> fuse.Entry:
        m, local = self._resolve(parent)
        if m is None:
            with self._lock:
                d = self._pseudo[local]
                child = d.children.get(name)
                if child is None:
                    raise FuseError(errno.ENOENT)
                if child in self._pseudo:
                    f = self._pseudo_fields(self._pseudo[child])
                    return fuse.Entry(child, f, self.timeout, self.timeout)
                cm = self._slots[child >> SLOT_SHIFT]
            a = cm.fs.getattr(ROOT_INO)
            self._count(cm)
            return self._entry(cm, a)
        try:
            a = m.fs.lookup(local, name)
        except NotFoundError:
            return fuse.Entry(0, None, self.timeout, 0.0)
        self._count(m)
        return self._entry(m, a)

    def forget(self, items: Sequence[tuple[int, int]]) -> None:
        to_close: list[MountSlot] = []
        with self._lock:
            for nodeid, n in items:
                slot = nodeid >> SLOT_SHIFT
                if slot == 0 or slot == PSEUDO_SLOT:
                    continue
                m = self._slots.get(slot)
                if m is None:
                    continue
                m.nlookup -= n
                if m.detached and m.nlookup <= 0 and not m.closed:
                    to_close.append(m)
        for m in to_close:
            self._close_slot(m)

    def getattr(self, ctx: RequestContext, nodeid: NodeId, fh: int | None) -> fuse.AttrReply:
        m, local = self._resolve(nodeid)
        if m is None:
            with self._lock:
                return fuse.AttrReply(self._pseudo_fields(self._pseudo[local]), 1.0)
        return self._attr_reply(m, local)

    def readlink(self, ctx: RequestContext, nodeid: NodeId) -> bytes:
        fs, local = self._file(nodeid, errno.EINVAL)
        return fs.readlink(local)

    def access(self, ctx: RequestContext, nodeid: NodeId, mask: int) -> None:
        m, local = self._resolve(nodeid)
        if m is None:
            if mask & os.W_OK:
                raise FuseError(errno.EROFS)
            return
        m.fs.access(local, mask, ctx.uid, ctx.gid)

    def statfs(self, ctx: RequestContext, nodeid: NodeId) -> fuse.StatFs:
        m, _local = self._resolve(nodeid)
        if m is None:
            return fuse.StatFs(files=len(self._pseudo))
        s = m.fs.statfs()
        return fuse.StatFs(
            blocks=s.blocks, files=s.files, bsize=s.bsize, namelen=s.namelen, frsize=s.bsize
        )

    def open(self, ctx: RequestContext, nodeid: NodeId, flags: int) -> fuse.OpenReply:
        fs, local = self._file(nodeid, errno.EISDIR)
        if self.zero_message_open:
            # With FUSE_NO_OPEN_SUPPORT negotiated, ENOSYS makes the kernel stop sending
            # OPEN/RELEASE for good and treat every open as keep_cache: two round trips
            # less per file. Per-file open counts are then not available.
            raise FuseError(errno.ENOSYS)
        fh = fs.open(local, flags)
        return fuse.OpenReply(fh=fh, keep_cache=True, noflush=True)

    def read(
        self, ctx: RequestContext, nodeid: NodeId, fh: int, offset: int, size: int
    ) -> list[bytes | memoryview]:
        fs, local = self._file(nodeid, errno.EISDIR)
        return fs.read(local, offset, size)

    def release(self, ctx: RequestContext, nodeid: NodeId, fh: int) -> None:
        m, local = self._resolve(nodeid)
        if m is not None:
            m.fs.release(local, fh)

    def lseek(self, ctx: RequestContext, nodeid: NodeId, fh: int, offset: int, whence: int) -> int:
        fs, local = self._file(nodeid, errno.EINVAL)
        return fs.lseek(local, offset, whence)

    def opendir(self, ctx: RequestContext, nodeid: NodeId, flags: int) -> fuse.OpenReply:
        m, local = self._resolve(nodeid)
        if self.zero_message_open:
            # FUSE_NO_OPENDIR_SUPPORT: from now on the kernel opens directories itself with
            # keep_cache + cache_dir. Pseudo directories stay correct: every mount/umount
            # sends an entry invalidation, which also drops the parent's readdir cache.
            raise FuseError(errno.ENOSYS)
        if m is None:
            return fuse.OpenReply()
        m.fs.opendir(local)
        return fuse.OpenReply(keep_cache=True, cache_dir=True)

    def readdir(
        self, ctx: RequestContext, nodeid: NodeId, fh: int, offset: int, plus: bool
    ) -> Iterator[fuse.DirEntry]:
        m, local = self._resolve(nodeid)
        if m is None:
            return self._pseudo_readdir(local, offset, plus)
        return self._fs_readdir(m, local, offset, plus)

    def _fs_readdir(
        self, m: MountSlot, ino: Ino, offset: int, plus: bool
    ) -> Iterator[fuse.DirEntry]:
        base = m.slot << SLOT_SHIFT
        parent_override: int | None = None
        if ino == ROOT_INO and m.slot:
            parent_override = self._mount_parent(m)
        for e in m.fs.readdir(ino, offset, plus):
            nodeid = base | e.ino
            if e.name == b".." and parent_override is not None:
                nodeid = parent_override
            entry = None
            if plus and e.attr is not None:
                entry = self._entry(m, e.attr)
                if e.name not in (b".", b".."):
                    self._count(m)
            yield fuse.DirEntry(e.name, nodeid, e.dtype, e.offset, entry)

    def _mount_parent(self, m: MountSlot) -> int:
        with self._lock:
            for d in self._pseudo.values():
                if (m.slot << SLOT_SHIFT | ROOT_INO) in d.children.values():
                    return d.nodeid
        return ROOT_INO

    def _pseudo_readdir(self, nodeid: int, offset: int, plus: bool) -> Iterator[fuse.DirEntry]:
        with self._lock:
            d = self._pseudo[nodeid]
            rows: list[tuple[bytes, int]] = [(b".", nodeid), (b"..", d.parent)]
            rows += sorted(d.children.items())
        for i in range(offset, len(rows)):
            name, child = rows[i]
            entry = None
            if plus:
                entry = self._pseudo_entry(name, child)
            yield fuse.DirEntry(name, child, _DT_DIR, i + 1, entry)

    def _pseudo_entry(self, name: bytes, child: int) -> fuse.Entry | None:
        with self._lock:
            pd = self._pseudo.get(child)
            if pd is not None:
                return fuse.Entry(child, self._pseudo_fields(pd), self.timeout, self.timeout)
            cm = self._slots.get(child >> SLOT_SHIFT)
        if cm is None:
            return None
        a = cm.fs.getattr(ROOT_INO)
        if name not in (b".", b".."):
            self._count(cm)
        return self._entry(cm, a)

    def getxattr(self, ctx: RequestContext, nodeid: NodeId, name: bytes) -> bytes:
        fs, local = self._file(nodeid, errno.ENODATA)
        try:
            return fs.getxattr(local, name)
        except OSError as e:
            raise self._xattr_error(e) from None

    def listxattr(self, ctx: RequestContext, nodeid: NodeId) -> list[bytes]:
        m, local = self._resolve(nodeid)
        if m is None:
            return []
        try:
            return m.fs.listxattr(local)
        except OSError as e:
            raise self._xattr_error(e) from None

    def _xattr_error(self, e: OSError) -> OSError:
        if e.errno == errno.ENOSYS and (self._slots or self._root is None):
            return FuseError(errno.EOPNOTSUPP, "xattrs disabled for this image")
        return e
