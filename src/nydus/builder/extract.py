"""Apply an OCI layer tar to a directory: the one place that writes layer contents to disk.

:func:`extract_layer` streams a layer (gzip, zstd or plain, told apart by magic: see
:mod:`.tarstream`; entries read by the strict :mod:`.tarreader`) onto a root directory with
the semantics of containerd's applier (``archive/tar.go`` ``Apply``), which is what a
container sees when the layer is unpacked onto its parents:

- entry names are normalised (leading ``/`` and ``./`` dropped); a ``..`` component, a NUL
  byte, a component over 255 bytes or a path over the reader's ``max_path`` is a
  :class:`~nydus.errors.FormatError` (stricter than containerd, which cleans ``..`` away; the
  same rule as ``nydus-image``). The entry for the root itself is ignored, as containerd does.
- every path is resolved *inside* the root (:class:`.inroot.RootDir`: ``openat2`` with
  ``RESOLVE_IN_ROOT``): a symlink among the parents is followed, but ``/`` and ``..`` in its
  target mean the root, never the host. Missing parents are created (0755), through such
  symlinks too, like containerd's ``mkdirAll`` on ``fs.RootPath``. A parent that is not a
  directory is a FormatError.
- the last component is never followed: an existing entry of that name is removed (a whole
  tree for a directory) and the new one created, except that a directory entry for an
  existing directory only updates its attributes. Nothing is ever written *through* a
  symlink or an existing hard link.
- hardlink targets are resolved the same way (symlinked parents inside the root), the target
  itself is not followed (a link to a symlink links the symlink); a missing target or a
  directory is a FormatError. As in containerd the link's header sets the owner, mode and
  times of the shared inode, which is inside the root by construction.
- ``.wh.NAME`` removes ``NAME`` (of the lower layers: an entry this layer created is kept, as
  the OCI spec says); ``.wh..wh..opq`` empties its directory of everything this layer did not
  create (in any order: markers after the children work); other ``.wh..wh.*`` names and
  whatever lies below a top-level one (AUFS metadata, e.g. ``.wh..wh.plnk/``) are skipped
  with a warning. A whiteout naming ``.``, ``..`` or nothing is a
  FormatError.
- ownership (``lchown``), xattrs (after the chown, so ``security.capability`` survives;
  ``ENOTSUP``/``EPERM`` are warnings as in containerd; the overlay's own
  ``trusted.overlay.*``/``user.overlay.*`` are never set from a layer), permission bits
  including setuid/setgid/sticky (after the chown, which clears them; never on a symlink)
  and mtimes (atime = mtime; directories last, so later entries do not disturb them).
- device nodes and fifos are made with ``mknod``. Not running as root, ownership is left
  as it is and device nodes are skipped with a warning (containerd in a user namespace does
  the same), like ``tar`` without ``--same-owner``.
- file data is written in 1 MiB pieces as it is read; all-zero pieces become holes, so a
  decompression bomb of zeros costs neither memory nor disk.

The layer's ``diff_id`` is hashed from the uncompressed stream while it is applied. It can
only be known at the end, so a mismatch raises :class:`~nydus.errors.IntegrityError`
*after* the files were written. There is deliberately no extraction into a temporary
directory and rename: the root is normally a mount (an overlay of the snapshot's parents,
which whiteouts, opaque directories and hardlinks must see), and a tree cannot be renamed
onto a mount point. The caller owns the root and discards it on any error, as containerd
removes the active snapshot when an apply fails (the snapshotter's unpacker does that too);
on an error nothing outside the root has been touched.

Threading: one call per thread; the layer stream decompresses on a thread of its own.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import FormatError, IntegrityError, NotFoundError, NydusError
from .inroot import RootDir, chmod_at, dir_names, lsetxattr_at, lstat_at, remove_all
from .tarreader import BLK, CHR, DIR, FIFO, HARDLINK, REG, SYMLINK, TarEntry, TarLimits, TarReader
from .tarsource import split_entry_path
from .tarstream import LayerStream

__all__ = ["ExtractResult", "extract_layer"]

log = logging.getLogger(__name__)

WRITE_PIECE = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPAQUE = b".wh..wh..opq"
_NEVER_SET_XATTRS = (b"trusted.overlay.", b"user.overlay.")
_MAX_NS = (1 << 63) - 1
MAX_SYMLINK = 4095  # bytes of a symlink target (PATH_MAX - 1)
MAX_MAJOR, MAX_MINOR = 0xFFF, 0xFFFFF  # what Linux's dev_t encoding keeps
# errno values an entry of the tar causes (anything else is the host's trouble: ENOSPC, EIO)
_CONTENT_ERRNOS = {
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.ELOOP,
    errno.ENAMETOOLONG,
    errno.EPERM,
    errno.EINVAL,
    errno.EMLINK,
    errno.ENOTEMPTY,
    errno.EXDEV,
    errno.E2BIG,
    errno.ERANGE,
    errno.EFBIG,
}
_IGNORED_XATTR_ERRNOS = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES}


@dataclass
class ExtractResult:
    """What :func:`extract_layer` applied."""

    diff_id: str  # sha256 of the uncompressed tar
    compression: str  # none, gzip or zstd
    entries: int  # tar entries read
    whiteouts: int  # whiteouts and opaque markers applied
    skipped: int  # entries not applied (AUFS metadata, device nodes when not root)


def extract_layer(
    stream: BinaryIO,
    root: str | os.PathLike[str],
    *,
    diff_id: str | None = None,
    limits: TarLimits | None = None,
    use_openat2: bool | None = None,
    kinds: frozenset[str] | None = None,
) -> ExtractResult:
    """Apply the layer read from ``stream`` onto the directory ``root`` (see the module
    docstring); check its ``diff_id`` if given. ``kinds`` (entry kinds of
    :mod:`.tarreader`: ``"reg"``, ``"dir"``, ...) narrows what the layer may hold: an entry
    of another kind is a FormatError (whiteout markers are regular files to the tar).
    ``use_openat2=False`` forces the component-walk fallback (tests)."""
    try:
        rd = RootDir(root, use_openat2=use_openat2)
    except OSError as err:
        raise NotFoundError(
            f"cannot open the extraction root {os.fspath(root)}: {err.strerror}"
        ) from None
    with rd, LayerStream(stream) as ls:
        reader = TarReader(ls, limits)
        ap = _Applier(rd, reader)
        try:
            for e in reader:
                if kinds is not None and e.kind not in kinds:
                    raise FormatError(
                        f"tar entry at {e.offset} {e.name[:200]!r}: a {e.kind} entry, and this "
                        f"layer may only hold {', '.join(sorted(kinds))} entries"
                    )
                ap.apply(e)
            ap.finish()
        finally:
            ap.close()
        got = ls.diff_id
        result = ExtractResult(got, ls.compression, reader.entries, ap.whiteouts, ap.skipped)
    if diff_id is not None and got != diff_id:
        raise IntegrityError(
            f"layer diff ID is {got}, config says {diff_id} (the layer was applied to "
            f"{os.fspath(root)}: discard it)"
        )
    return result


def _mtime_ns(e: TarEntry) -> int:
    ns = e.mtime * 1_000_000_000 + e.mtime_nsec
    return ns if 0 <= ns <= _MAX_NS else 0  # out of range: the epoch, as containerd does


@dataclass
class _Frame:
    """A directory being emptied for an opaque marker."""

    fd: int
    key: bytes
    pending: list[bytes]  # names not looked at yet
    keep: bool  # made by this layer, or holds something that was
    parent_fd: int
    name: bytes


class _Applier:
    """Applies entries one by one; keeps what opaque markers and directory times need."""

    def __init__(self, rd: RootDir, reader: TarReader) -> None:
        self.rd = rd
        self.reader = reader
        self.limits = reader.limits
        self.as_root = os.geteuid() == 0
        # the parent directory of the previous entry: (its parts, fd, key); an entry only
        # changes children of its own parent, so this never goes stale
        self._cache: tuple[tuple[bytes, ...], int, bytes] | None = None
        self.kept: set[tuple[bytes, bytes]] = set()  # (directory key, name) made by the layer
        self.dirs: list[tuple[list[bytes], int]] = []  # directory entries and their mtimes
        self.whiteouts = 0
        self.skipped = 0
        self._warned: set[str] = set()

    def close(self) -> None:
        if self._cache is not None:
            os.close(self._cache[1])
            self._cache = None

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    # ------------------------------------------------------------------ resolution

    @staticmethod
    def _dir_key(fd: int) -> bytes:
        """A directory's identity for opaque markers: its resolved path (containerd keys
        unpacked paths the same way), or device and inode without /proc."""
        try:
            return os.readlink(b"/proc/self/fd/%d" % fd)
        except OSError:
            st = os.fstat(fd)
            return b"%d:%d" % (st.st_dev, st.st_ino)

    def _created(self, parent_fd: int, name: bytes) -> None:
        self.kept.add((self._dir_key(parent_fd), name))

    def _parent(self, parts: list[bytes], e: TarEntry) -> tuple[int, bytes]:
        key = tuple(parts[:-1])
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2]
        self.close()
        try:
            fd = self.rd.open_dir(key, create=True, on_create=self._created)
        except OSError as err:
            if err.errno == errno.ENOTDIR:
                raise FormatError(
                    f"tar entry at {e.offset}: {e.name[:200]!r} lies below an "
                    f"entry that is not a directory"
                ) from None
            raise self._error(e, err, "cannot make its parent directory") from None
        dkey = self._dir_key(fd)
        self._cache = (key, fd, dkey)
        return fd, dkey

    def _error(self, e: TarEntry, err: OSError | ValueError, what: str) -> NydusError:
        if isinstance(err, ValueError):
            return FormatError(f"tar entry at {e.offset} {e.name[:200]!r}: {what}: {err}")
        msg = f"tar entry at {e.offset} {e.name[:200]!r}: {what}: {err.strerror}"
        return FormatError(msg) if err.errno in _CONTENT_ERRNOS else NydusError(msg)

    # ------------------------------------------------------------------ entries

    def apply(self, e: TarEntry) -> None:
        parts = split_entry_path(e.name, "path", self.limits, e.offset)
        if not parts:
            if e.kind != DIR:
                raise FormatError(f"tar entry at {e.offset}: the root must be a directory")
            return  # containerd ignores the root's own entry
        name = parts[-1]
        if parts[0].startswith(b".wh..wh.") and name != _OPAQUE:
            self._warn_once("aufs", "AUFS metadata entries skipped: %r", e.name)
            self.skipped += 1
            return  # /.wh..wh.plnk and the like, as containerd
        pfd, pkey = self._parent(parts, e)
        if name.startswith(b".wh."):
            self._whiteout(pfd, pkey, name, e)
            return
        old = lstat_at(pfd, name)
        try:
            if old is not None and not (e.kind == DIR and stat.S_ISDIR(old.st_mode)):
                remove_all(pfd, name)
            if e.kind == REG:
                self._file(pfd, name, e)
            elif e.kind == DIR:
                self._dir(pfd, name, parts, e, new=old is None or not stat.S_ISDIR(old.st_mode))
            elif e.kind == SYMLINK:
                self._symlink(pfd, name, e)
            elif e.kind == HARDLINK:
                self._hardlink(pfd, name, e)
            elif e.kind in (CHR, BLK, FIFO):
                if not self._node(pfd, name, e):
                    return
            else:  # pragma: no cover - the reader knows no other kinds
                raise FormatError(f"tar entry at {e.offset}: unknown kind {e.kind}")
        except (OSError, ValueError) as err:
            raise self._error(e, err, f"cannot create the {e.kind}") from None
        self.kept.add((pkey, name))

    def _file(self, pfd: int, name: bytes, e: TarEntry) -> None:
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=pfd,
        )
        try:
            for off, data in self.reader.chunks(e, WRITE_PIECE):
                if data.count(0) == len(data):
                    continue  # a hole
                view = memoryview(data)
                while view:
                    n = os.pwrite(fd, view, off)
                    view, off = view[n:], off + n
            os.ftruncate(fd, e.size)
            self._attrs_fd(fd, e)
        finally:
            os.close(fd)

    def _dir(self, pfd: int, name: bytes, parts: list[bytes], e: TarEntry, new: bool) -> None:
        if new:
            os.mkdir(name, 0o700, dir_fd=pfd)
        fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        try:
            self._attrs_fd(fd, e, times=False)
        finally:
            os.close(fd)
        self.dirs.append((parts, _mtime_ns(e)))

    def _symlink(self, pfd: int, name: bytes, e: TarEntry) -> None:
        if not e.linkname:
            raise FormatError(
                f"tar entry at {e.offset}: symlink {e.name[:200]!r} has an empty target"
            )
        if len(e.linkname) > MAX_SYMLINK:
            raise FormatError(
                f"tar entry at {e.offset}: symlink {e.name[:200]!r} target "
                f"longer than {MAX_SYMLINK} bytes"
            )
        os.symlink(e.linkname, name, dir_fd=pfd)
        self._attrs_at(pfd, name, e, chmod=False)

    def _hardlink(self, pfd: int, name: bytes, e: TarEntry) -> None:
        tparts = split_entry_path(e.linkname, "hardlink target", self.limits, e.offset)
        if not tparts:
            raise FormatError(f"tar entry at {e.offset}: hardlink {e.name[:200]!r} names the root")
        what = f"hardlink {e.name[:200]!r} to {e.linkname[:200]!r}"
        try:
            tfd = self.rd.open_dir(tparts[:-1])
        except (FileNotFoundError, NotADirectoryError):
            raise FormatError(f"tar entry at {e.offset}: {what}: target missing") from None
        try:
            os.link(tparts[-1], name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            raise FormatError(f"tar entry at {e.offset}: {what}: target missing") from None
        except PermissionError:
            if (st := lstat_at(tfd, tparts[-1])) is not None and stat.S_ISDIR(st.st_mode):
                raise FormatError(
                    f"tar entry at {e.offset}: {what}: the target names a directory"
                ) from None
            raise
        finally:
            os.close(tfd)
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        self._attrs_at(pfd, name, e, chmod=not stat.S_ISLNK(st.st_mode))

    def _node(self, pfd: int, name: bytes, e: TarEntry) -> bool:
        if e.kind != FIFO and not self.as_root:
            self._warn_once("dev", "device nodes need root: %r and others skipped", e.name)
            self.skipped += 1
            return False
        kind = {CHR: stat.S_IFCHR, BLK: stat.S_IFBLK, FIFO: stat.S_IFIFO}[e.kind]
        if e.kind != FIFO and (e.devmajor > MAX_MAJOR or e.devminor > MAX_MINOR):
            raise FormatError(
                f"tar entry at {e.offset}: device {e.devmajor}:{e.devminor} "
                f"does not fit Linux's device numbers"
            )
        dev = os.makedev(e.devmajor, e.devminor) if e.kind != FIFO else 0
        os.mknod(name, kind | 0o600, dev, dir_fd=pfd)
        self._attrs_at(pfd, name, e, chmod=True)
        return True

    # ------------------------------------------------------------------ attributes

    def _xattrs(self, e: TarEntry, set_one: Callable[[bytes, bytes], None]) -> None:
        total = sum(len(k) + len(v) + 4 for k, v in e.xattrs.items())
        if total > self.limits.max_xattr_bytes:
            raise FormatError(
                f"tar entry at {e.offset}: xattrs larger than {self.limits.max_xattr_bytes} bytes"
            )
        for key, value in e.xattrs.items():
            if key.startswith(_NEVER_SET_XATTRS):
                self._warn_once("ovl", "overlay xattrs in a layer are not set: %r", key)
                continue
            if key == b"system.posix_acl_default" and e.kind != DIR:
                continue  # only directories have default ACLs
            try:
                set_one(key, value)
            except OSError as err:
                if err.errno not in _IGNORED_XATTR_ERRNOS:
                    raise
                self._warn_once(
                    f"x{key!r}", "xattr %r of %r not set: %s", key, e.name, err.strerror
                )

    def _attrs_fd(self, fd: int, e: TarEntry, *, times: bool = True) -> None:
        if self.as_root:
            os.fchown(fd, e.uid, e.gid)
        self._xattrs(e, lambda k, v: os.setxattr(fd, k, v))
        os.fchmod(fd, e.mode)
        if times:
            ns = _mtime_ns(e)
            os.utime(fd, ns=(ns, ns))

    def _attrs_at(self, pfd: int, name: bytes, e: TarEntry, *, chmod: bool) -> None:
        if self.as_root:
            os.chown(name, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
        self._xattrs(e, lambda k, v: lsetxattr_at(pfd, name, k, v))
        if chmod:
            chmod_at(pfd, name, e.mode)
        ns = _mtime_ns(e)
        os.utime(name, ns=(ns, ns), dir_fd=pfd, follow_symlinks=False)

    # ------------------------------------------------------------------ whiteouts

    def _whiteout(self, pfd: int, pkey: bytes, name: bytes, e: TarEntry) -> None:
        if name == _OPAQUE:
            try:
                self._opaque(pfd)
            except OSError as err:
                raise self._error(e, err, "cannot empty the opaque directory") from None
            self.whiteouts += 1
            return
        if name.startswith(b".wh..wh."):
            self._warn_once("aufs", "AUFS metadata entries skipped: %r", e.name)
            self.skipped += 1
            return
        victim = name[4:]
        if victim in (b"", b".", b".."):
            raise FormatError(
                f"tar entry at {e.offset}: whiteout {e.name[:200]!r} names no file of its directory"
            )
        self.whiteouts += 1
        if (pkey, victim) in self.kept:
            return  # a whiteout hides lower layers only (OCI image spec)
        try:
            remove_all(pfd, victim)
        except OSError as err:
            raise self._error(e, err, "cannot remove the whited-out entry") from None

    def _opaque(self, pfd: int) -> None:
        """Remove from the directory ``pfd`` everything this layer did not create; a
        directory with such entries below it stays. Iterative (deep trees)."""
        top = os.open(b".", _DIR_FLAGS, dir_fd=pfd)
        frames = [_Frame(top, self._dir_key(top), dir_names(top), True, -1, b"")]
        try:
            while frames:
                f = frames[-1]
                descended = False
                while f.pending:
                    child = f.pending.pop()
                    cst = lstat_at(f.fd, child)
                    if cst is None:
                        continue
                    kept = (f.key, child) in self.kept
                    if stat.S_ISDIR(cst.st_mode):
                        cfd = os.open(child, _DIR_FLAGS, dir_fd=f.fd)
                        frames.append(
                            _Frame(cfd, self._dir_key(cfd), dir_names(cfd), kept, f.fd, child)
                        )
                        descended = True
                        break
                    if kept:
                        f.keep = True
                    else:
                        os.unlink(child, dir_fd=f.fd)
                if descended:
                    continue
                frames.pop()
                os.close(f.fd)
                if frames:
                    if f.keep:
                        frames[-1].keep = True
                    else:
                        os.rmdir(f.name, dir_fd=f.parent_fd)
        finally:
            for f in frames:
                os.close(f.fd)

    # ------------------------------------------------------------------ the end

    def finish(self) -> None:
        """Directory mtimes, last: creating entries in a directory changes its mtime."""
        self.close()
        for parts, ns in self.dirs:
            try:
                fd = self.rd.open_dir(parts[:-1])
            except OSError:
                continue  # removed or replaced later in the layer
            try:
                st = lstat_at(fd, parts[-1])
                if st is not None and stat.S_ISDIR(st.st_mode):
                    os.utime(parts[-1], ns=(ns, ns), dir_fd=fd, follow_symlinks=False)
            finally:
                os.close(fd)
