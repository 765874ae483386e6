"""File operations confined to one directory tree: the root a layer is extracted into.

:class:`RootDir` opens directories *inside* a root the way a chroot would see them: every
symlink met on the way is followed, but an absolute target or a ``..`` starts again from (or
stops at) the root, never above it. This is what containerd's ``fs.RootPath`` does for its
layer applier, and what ``openat2(2)`` with ``RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`` does in
the kernel, atomically. openat2 (Linux 5.6+, called through ctypes) is the fast path; where it
is missing (``ENOSYS``, or ``EPERM`` from a seccomp filter) a component walk with
``O_PATH | O_NOFOLLOW`` that follows symlinks by hand (``readlinkat``) gives the same answers.
The walk is also how missing directories are created (``mkdir -p`` semantics, through
symlinks, still inside the root).

Callers get directory file descriptors and do everything else with ``*at()`` calls on one
plain name in such a directory (``os.open(name, dir_fd=...)``, ``os.mkdir(dir_fd=...)``,
``os.unlink(dir_fd=...)``...), never on a string path joined to the root. Helpers here cover
what has no ``*at()`` form in Python: :func:`chmod_at` (on a node that cannot be opened,
through an ``O_PATH | O_NOFOLLOW`` descriptor) and :func:`lsetxattr_at`.

Names are bytes, one component each (no ``/``, not ``.`` or ``..``): callers normalise tar
paths before they get here.

Threading: a :class:`RootDir` belongs to one thread (it owns file descriptors).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import stat
from collections.abc import Callable, Sequence

from ..libc import libc

__all__ = [
    "RootDir",
    "chmod_at",
    "dir_names",
    "lstat_at",
    "lsetxattr_at",
    "openat2_available",
    "remove_all",
]

log = logging.getLogger(__name__)

# openat2(2): the syscall has number 437 on every architecture using the generic table
# (x86_64, aarch64, riscv64, ...), which is where this is expected to run.
_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437, "riscv64": 437, "ppc64le": 437, "s390x": 437}.get(
    platform.machine()
)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
_MAX_SYMLINKS = 40  # the kernel's limit (MAXSYMLINKS)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_openat2_ok: bool | None = None  # probed on first use


def _openat2(dirfd: int, path: bytes, flags: int, resolve: int) -> int:
    assert _SYS_OPENAT2 is not None
    how = _OpenHow(flags, 0, resolve)
    for _ in range(64):
        fd = libc().syscall(
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_int(dirfd),
            ctypes.c_char_p(path),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err not in (errno.EINTR, errno.EAGAIN):  # EAGAIN: a rename raced with ".."
            raise OSError(err, os.strerror(err), path)
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)


def openat2_available() -> bool:
    """Whether the kernel (and any seccomp filter) lets this process call openat2."""
    global _openat2_ok
    if _openat2_ok is None:
        if _SYS_OPENAT2 is None:
            _openat2_ok = False
        else:
            try:
                os.close(_openat2(-100, b"/", os.O_PATH | os.O_CLOEXEC, 0))  # AT_FDCWD
                _openat2_ok = True
            except OSError as e:
                if e.errno not in (errno.ENOSYS, errno.EPERM):
                    raise
                log.info(
                    "openat2 unavailable (%s): resolving paths component by component",
                    os.strerror(e.errno or 0),
                )
                _openat2_ok = False
    return _openat2_ok


class RootDir:
    """Directories inside ``root`` (see the module docstring).

    ``use_openat2=False`` forces the component walk (tests compare both).
    """

    def __init__(self, root: str | os.PathLike[str], *, use_openat2: bool | None = None) -> None:
        self.fd = os.open(root, _DIR_FLAGS)
        self._openat2 = openat2_available() if use_openat2 is None else use_openat2

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RootDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open_dir(
        self,
        parts: Sequence[bytes],
        *,
        create: bool = False,
        on_create: Callable[[int, bytes], None] | None = None,
    ) -> int:
        """An ``O_RDONLY | O_DIRECTORY`` fd of the directory ``parts`` names inside the root.

        Symlinks on the way are followed inside the root. With ``create``, missing
        directories are made (mode 0755, the caller's owner) and ``on_create(parent_fd,
        name)`` is told of each. Raises ``OSError`` (``ENOENT``, ``ENOTDIR``, ``ELOOP``...).
        """
        if not parts:
            return os.open(b".", _DIR_FLAGS, dir_fd=self.fd)
        if self._openat2:
            try:
                return _openat2(
                    self.fd, b"/".join(parts), _DIR_FLAGS, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS
                )
            except FileNotFoundError:
                if not create:
                    raise
        return self._walk(parts, create, on_create)

    def _walk(
        self, parts: Sequence[bytes], create: bool, on_create: Callable[[int, bytes], None] | None
    ) -> int:
        """The component walk: ``O_PATH | O_NOFOLLOW`` one name at a time, symlinks read
        and their targets walked in turn; ``..`` never goes above the root."""
        stack = [os.dup(self.fd)]  # fds from the root down to the current directory
        todo = list(reversed(parts))  # a stack: the next component is last
        links = 0
        try:
            while todo:
                name = todo.pop()
                if name in (b"", b"."):
                    continue
                if name == b"..":
                    if len(stack) > 1:
                        os.close(stack.pop())
                    continue
                cur = stack[-1]
                try:
                    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(name, 0o755, dir_fd=cur)
                    fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=cur)
                    os.fchmod(fd, 0o755)  # exact, whatever the umask
                    if on_create is not None:
                        on_create(cur, name)
                st = os.fstat(fd)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(fd)
                    continue
                if not stat.S_ISLNK(st.st_mode):
                    os.close(fd)
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), name)
                try:
                    target = os.readlink(b"", dir_fd=fd)
                finally:
                    os.close(fd)
                links += 1
                if links > _MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name)
                if target.startswith(b"/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                todo.extend(reversed(target.split(b"/")))
            return os.open(b".", _DIR_FLAGS, dir_fd=stack[-1])
        finally:
            for fd in stack:
                os.close(fd)


def dir_names(fd: int) -> list[bytes]:
    """The entry names of the directory ``fd`` (``os.listdir`` gives str for an fd)."""
    return [os.fsencode(n) for n in os.listdir(fd)]


def lstat_at(dir_fd: int, name: bytes) -> os.stat_result | None:
    """``lstat`` of ``name`` in ``dir_fd``, None if it does not exist."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def remove_all(dir_fd: int, name: bytes) -> bool:
    """``rm -rf`` of ``name`` in ``dir_fd`` without following any symlink; iterative, so a
    deep tree cannot exhaust the stack. Returns whether something was removed."""
    st = lstat_at(dir_fd, name)
    if st is None:
        return False
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return True
    # (parent fd, name, fd of the directory, its entries not looked at yet), top down
    top = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
    stack: list[tuple[int, bytes, int, list[bytes]]] = [(dir_fd, name, top, dir_names(top))]
    try:
        while stack:
            parent, dname, fd, pending = stack[-1]
            while pending:
                child = pending.pop()
                cst = lstat_at(fd, child)
                if cst is None:
                    continue
                if stat.S_ISDIR(cst.st_mode):
                    cfd = os.open(child, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
                    stack.append((fd, child, cfd, dir_names(cfd)))
                    break
                os.unlink(child, dir_fd=fd)
            else:
                stack.pop()
                os.close(fd)
                os.rmdir(dname, dir_fd=parent)
    finally:
        for _p, _n, fd, _l in stack:
            os.close(fd)
    return True


def chmod_at(dir_fd: int, name: bytes, mode: int) -> None:
    """chmod ``name`` in ``dir_fd`` (a device node or fifo, which must not be opened)
    without following a symlink: through an ``O_PATH | O_NOFOLLOW`` descriptor and its
    ``/proc/self/fd`` entry. A symlink is left alone (Linux has no lchmod)."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            return
        try:
            os.chmod(f"/proc/self/fd/{fd}", mode)
        except FileNotFoundError:  # no /proc: the plain call (its race needs a local writer)
            os.chmod(name, mode, dir_fd=dir_fd, follow_symlinks=True)
    finally:
        os.close(fd)


def lsetxattr_at(dir_fd: int, name: bytes, key: bytes, value: bytes) -> None:
    """``lsetxattr`` on ``name`` in ``dir_fd`` (a symlink, device or fifo: nothing that may
    be opened), through the directory's ``/proc/self/fd`` entry; the last component is not
    followed."""
    os.setxattr(b"/proc/self/fd/%d/%s" % (dir_fd, name), key, value, follow_symlinks=False)
