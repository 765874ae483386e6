"""Build a :class:`Node` tree from a directory on disk.

The walk never follows symlinks, sorts entries bytewise (so the result does not
depend on the order in which the file system lists them), and groups hardlinks
by (st_dev, st_ino) into one Node. Xattrs are read without following links;
``security.selinux`` is skipped because it is host policy, not image content.
Single-threaded.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import ConfigError, FormatError
from ..format.erofs import split_xattr_name
from .tree import Node, PathData, check_name, paused_gc

__all__ = ["load_directory"]

_SKIP_XATTRS = {b"security.selinux"}


def _read_xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out: dict[bytes, bytes] = {}
    for name in sorted(names):
        bname = os.fsencode(name)
        if bname in _SKIP_XATTRS or split_xattr_name(bname) is None:
            continue
        try:
            out[bname] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENODATA:
                continue
            raise
    return out


def _node_from_stat(path: bytes, st: os.stat_result, with_xattrs: bool) -> Node:
    n = Node(
        mode=st.st_mode,
        uid=st.st_uid,
        gid=st.st_gid,
        mtime=st.st_mtime_ns // 1_000_000_000,
        mtime_nsec=st.st_mtime_ns % 1_000_000_000,
        path=path,
    )
    if with_xattrs:
        n.xattrs = _read_xattrs(path)
    fmt = stat.S_IFMT(st.st_mode)
    if fmt == stat.S_IFREG:
        n.size = st.st_size
        n.open_data = PathData(path, st.st_blocks * 512 < st.st_size)
    elif fmt == stat.S_IFLNK:
        n.symlink = os.readlink(path)
        n.size = len(n.symlink)
        if n.size > 4095:
            raise FormatError(f"symlink target longer than 4095 bytes: {path!r}")
    elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
        n.rdev = st.st_rdev
    elif fmt == stat.S_IFDIR:
        n.children = {}
    return n


def load_directory(src: str | Path, *, with_xattrs: bool = True) -> Node:
    """Walk ``src`` and return the root Node of its tree."""
    root_path = os.fsencode(os.path.abspath(src))
    try:
        st = os.lstat(root_path)
    except OSError as e:
        raise ConfigError(f"cannot read source directory {os.fsdecode(root_path)}: {e}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"source {os.fsdecode(root_path)} is not a directory")
    with paused_gc():
        root = _node_from_stat(root_path, st, with_xattrs)
        links: dict[tuple[int, int], Node] = {}
        stack = [(root_path, root)]
        while stack:
            dpath, dnode = stack.pop()
            assert dnode.children is not None
            with os.scandir(dpath) as it:
                entries = sorted(it, key=_name)
            for ent in entries:
                name = ent.name
                check_name(name)
                p = ent.path
                cst = ent.stat(follow_symlinks=False)
                if cst.st_nlink > 1 and not stat.S_ISDIR(cst.st_mode):
                    key = (cst.st_dev, cst.st_ino)
                    hit = links.get(key)
                    if hit is not None:
                        dnode.children[name] = hit
                        continue
                    child = links[key] = _node_from_stat(p, cst, with_xattrs)
                else:
                    child = _node_from_stat(p, cst, with_xattrs)
                dnode.children[name] = child
                if child.children is not None:
                    stack.append((p, child))
    return root


def _name(e: os.DirEntry[bytes]) -> bytes:
    return e.name
