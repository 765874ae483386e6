"""FUSE kernel protocol: opcodes, flags and the wire structs of the requests we serve.

Layouts follow ``include/uapi/linux/fuse.h`` for protocol 7.31 and later (the kernel here speaks
7.45). Everything is little-endian native C layout with natural alignment; each struct below is
a :class:`struct.Struct` whose size is asserted at import time against the kernel's sizes.

Only pure encoding lives here: no I/O, no policy. Threading: immutable module data, safe.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "KERNEL_VERSION",
    "KERNEL_MINOR_VERSION",
    "MIN_MINOR_VERSION",
    "Opcode",
    "InitFlags",
    "FOPEN_DIRECT_IO",
    "FOPEN_KEEP_CACHE",
    "FOPEN_NONSEEKABLE",
    "FOPEN_CACHE_DIR",
    "FOPEN_STREAM",
    "FOPEN_NOFLUSH",
    "FOPEN_PASSTHROUGH",
    "IN_HEADER",
    "OUT_HEADER",
    "INIT_IN",
    "INIT_OUT",
    "ATTR",
    "ENTRY_OUT_HEAD",
    "ATTR_OUT_HEAD",
    "OPEN_IN",
    "OPEN_OUT",
    "READ_IN",
    "RELEASE_IN",
    "FORGET_IN",
    "BATCH_FORGET_IN",
    "FORGET_ONE",
    "GETATTR_IN",
    "GETXATTR_IN",
    "GETXATTR_OUT",
    "ACCESS_IN",
    "INTERRUPT_IN",
    "FLUSH_IN",
    "LSEEK_IN",
    "LSEEK_OUT",
    "KSTATFS",
    "DIRENT_HEAD",
    "NOTIFY_INVAL_ENTRY_OUT",
    "NOTIFY_INVAL_INODE_OUT",
    "NOTIFY_INVAL_ENTRY",
    "NOTIFY_INVAL_INODE",
    "NOTIFY_RESEND",
    "NOTIFY_STORE",
    "NOTIFY_STORE_OUT",
    "BACKING_MAP",
    "FUSE_DEV_IOC_CLONE",
    "FUSE_DEV_IOC_BACKING_OPEN",
    "FUSE_DEV_IOC_BACKING_CLOSE",
    "FUSE_INT_REQ_BIT",
    "FUSE_GETATTR_FH",
    "FUSE_READ_LOCKOWNER",
    "FUSE_MIN_READ_BUFFER",
    "InHeader",
    "InitIn",
    "AttrFields",
    "pack_attr",
    "pack_entry_out",
    "pack_attr_out",
    "pack_open_out",
    "pack_statfs",
    "pack_dirent",
    "pack_direntplus",
    "dirent_size",
    "direntplus_size",
    "pack_out_header",
    "split_cstring",
    "opcode_name",
]

KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 45  # what this codec knows
MIN_MINOR_VERSION = 31  # oldest minor we agree to speak (layouts below assume >= 7.31)

FUSE_MIN_READ_BUFFER = 8192
FUSE_INT_REQ_BIT = 1 << 0  # set in the unique of INTERRUPT requests
FUSE_GETATTR_FH = 1 << 0
FUSE_READ_LOCKOWNER = 1 << 1

# fuse_dev ioctls: _IOR(229, 0, u32), _IOW(229, 1, struct fuse_backing_map), _IOW(229, 2, u32)
FUSE_DEV_IOC_CLONE = 0x8004E500
FUSE_DEV_IOC_BACKING_OPEN = 0x4010E501
FUSE_DEV_IOC_BACKING_CLOSE = 0x4004E502


class Opcode:
    """FUSE request opcodes (``enum fuse_opcode``)."""

    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52
    COPY_FILE_RANGE_64 = 53


_OPCODE_NAMES = {
    v: k for k, v in vars(Opcode).items() if not k.startswith("_") and isinstance(v, int)
}


def opcode_name(op: int) -> str:
    """``"READ"`` for 15; ``"OP_99"`` for an opcode this codec does not know."""
    return _OPCODE_NAMES.get(op, f"OP_{op}")


class InitFlags:
    """INIT flags; bits 32..63 travel in ``flags2`` when FUSE_INIT_EXT is set."""

    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    FILE_OPS = 1 << 2
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    INIT_RESERVED = 1 << 31
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    CREATE_SUPP_GROUP = 1 << 34
    HAS_EXPIRE_ONLY = 1 << 35
    DIRECT_IO_ALLOW_MMAP = 1 << 36
    PASSTHROUGH = 1 << 37
    NO_EXPORT_SUPPORT = 1 << 38
    HAS_RESEND = 1 << 39
    ALLOW_IDMAP = 1 << 40
    OVER_IO_URING = 1 << 41
    REQUEST_TIMEOUT = 1 << 42


# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FOPEN_PASSTHROUGH = 1 << 7

# notify codes (fuse_out_header.error of an unsolicited message, unique == 0)
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3
NOTIFY_STORE = 4  # push data into a file's page cache
NOTIFY_RESEND = 7  # 7.40+: requeue requests read but never answered (after a takeover)

# ---------------------------------------------------------------------------- structs

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
INIT_IN = struct.Struct("<IIIII44x")  # major minor max_readahead flags flags2 unused[11]
# major minor max_readahead flags max_background congestion_threshold max_write time_gran
# max_pages map_alignment flags2 max_stack_depth request_timeout unused[11]
INIT_OUT = struct.Struct("<IIIIHHIIHHIIH22x")
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid nsecs
ATTR_OUT_HEAD = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
GETATTR_IN = struct.Struct("<IIQ")  # getattr_flags dummy fh
OPEN_IN = struct.Struct("<II")  # flags open_flags
OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
RELEASE_IN = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
FLUSH_IN = struct.Struct("<QIIQ")  # fh unused padding lock_owner
FORGET_IN = struct.Struct("<Q")  # nlookup
BATCH_FORGET_IN = struct.Struct("<II")  # count dummy
FORGET_ONE = struct.Struct("<QQ")  # nodeid nlookup
GETXATTR_IN = struct.Struct("<II")  # size padding
GETXATTR_OUT = struct.Struct("<II")  # size padding
ACCESS_IN = struct.Struct("<II")  # mask padding
INTERRUPT_IN = struct.Struct("<Q")  # unique
LSEEK_IN = struct.Struct("<QQII")  # fh offset whence padding
LSEEK_OUT = struct.Struct("<Q")
KSTATFS = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize
DIRENT_HEAD = struct.Struct("<QQII")  # ino off namelen type
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("<QII")  # parent namelen flags
NOTIFY_STORE_OUT = struct.Struct("<QQII")  # nodeid offset size padding
NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")  # ino off len
BACKING_MAP = struct.Struct("<iIQ")  # fd flags padding

for _s, _n in (
    (IN_HEADER, 40),
    (OUT_HEADER, 16),
    (INIT_IN, 64),
    (INIT_OUT, 64),
    (ATTR, 88),
    (ENTRY_OUT_HEAD, 40),
    (ATTR_OUT_HEAD, 16),
    (GETATTR_IN, 16),
    (OPEN_IN, 8),
    (OPEN_OUT, 16),
    (READ_IN, 40),
    (RELEASE_IN, 24),
    (FLUSH_IN, 24),
    (FORGET_IN, 8),
    (BATCH_FORGET_IN, 8),
    (FORGET_ONE, 16),
    (GETXATTR_IN, 8),
    (ACCESS_IN, 8),
    (INTERRUPT_IN, 8),
    (LSEEK_IN, 24),
    (KSTATFS, 80),
    (DIRENT_HEAD, 24),
    (NOTIFY_INVAL_ENTRY_OUT, 16),
    (BACKING_MAP, 16),
):
    assert _s.size == _n, (_s.format, _s.size, _n)

ENTRY_OUT_SIZE = ENTRY_OUT_HEAD.size + ATTR.size  # 128
ATTR_OUT_SIZE = ATTR_OUT_HEAD.size + ATTR.size  # 104


@dataclass(frozen=True, slots=True)
class InHeader:
    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    total_extlen: int

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> InHeader:
        ln, op, unique, nodeid, uid, gid, pid, ext, _pad = IN_HEADER.unpack_from(buf, 0)
        return cls(ln, op, unique, nodeid, uid, gid, pid, ext)


@dataclass(frozen=True, slots=True)
class InitIn:
    major: int
    minor: int
    max_readahead: int
    flags: int  # 64-bit: flags | flags2 << 32 when INIT_EXT is set

    @classmethod
    def unpack(cls, body: bytes | bytearray | memoryview) -> InitIn:
        if len(body) >= INIT_IN.size:
            major, minor, ra, flags, flags2 = INIT_IN.unpack_from(body, 0)
        else:  # pre-7.36 kernels send 16 bytes
            major, minor, ra, flags = struct.unpack_from("<IIII", body, 0)
            flags2 = 0
        if flags & InitFlags.INIT_EXT:
            flags |= flags2 << 32
        return cls(major, minor, ra, flags)


@dataclass(frozen=True, slots=True)
class AttrFields:
    """What ``fuse_attr`` carries; times as (seconds, nanoseconds)."""

    ino: int
    size: int
    blocks: int
    atime: int
    mtime: int
    ctime: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int = 4096
    flags: int = 0

    @classmethod
    def read_only(
        cls,
        ino: int,
        mode: int,
        size: int,
        nlink: int,
        stamp: tuple[int, int],
        *,
        blocks: int | None = None,
        uid: int = 0,
        gid: int = 0,
        rdev: int = 0,
        blksize: int = 4096,
    ) -> AttrFields:
        """A node that never changes: ``stamp`` (seconds, nanoseconds) is its atime, mtime and
        ctime; ``blocks`` defaults to ``size // 512``."""
        s, ns = stamp
        return cls(
            ino,
            size,
            size // 512 if blocks is None else blocks,
            s,
            s,
            s,
            ns,
            ns,
            ns,
            mode,
            nlink,
            uid,
            gid,
            rdev,
            blksize,
        )


def pack_attr(a: AttrFields) -> bytes:
    return ATTR.pack(
        a.ino,
        a.size,
        a.blocks,
        a.atime & _U64,
        a.mtime & _U64,
        a.ctime & _U64,
        a.atime_ns,
        a.mtime_ns,
        a.ctime_ns,
        a.mode,
        a.nlink,
        a.uid,
        a.gid,
        a.rdev,
        a.blksize,
        a.flags,
    )


_U64 = (1 << 64) - 1
_NSEC = 1_000_000_000


def _split_timeout(seconds: float) -> tuple[int, int]:
    if seconds <= 0:
        return 0, 0
    whole = int(seconds)
    return whole, min(int((seconds - whole) * _NSEC), _NSEC - 1)


def pack_entry_out(
    nodeid: int, generation: int, entry_timeout: float, attr_timeout: float, attr: bytes
) -> bytes:
    """``fuse_entry_out``; ``attr`` is a packed ``fuse_attr`` (ignored bytes when nodeid is 0)."""
    es, ens = _split_timeout(entry_timeout)
    as_, ans = _split_timeout(attr_timeout)
    return ENTRY_OUT_HEAD.pack(nodeid, generation, es, as_, ens, ans) + attr


def pack_attr_out(attr_timeout: float, attr: bytes) -> bytes:
    s, ns = _split_timeout(attr_timeout)
    return ATTR_OUT_HEAD.pack(s, ns, 0) + attr


def pack_open_out(fh: int, open_flags: int, backing_id: int = 0) -> bytes:
    return OPEN_OUT.pack(fh, open_flags, backing_id)


def pack_statfs(
    blocks: int,
    bfree: int,
    bavail: int,
    files: int,
    ffree: int,
    bsize: int,
    namelen: int,
    frsize: int,
) -> bytes:
    return KSTATFS.pack(blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, 0)


def _align8(n: int) -> int:
    return (n + 7) & ~7


def dirent_size(namelen: int) -> int:
    return _align8(DIRENT_HEAD.size + namelen)


def direntplus_size(namelen: int) -> int:
    return _align8(ENTRY_OUT_SIZE + DIRENT_HEAD.size + namelen)


def pack_dirent(ino: int, off: int, dtype: int, name: bytes) -> bytes:
    """One ``fuse_dirent`` padded to 8 bytes; ``dtype`` is the DT_* value (mode >> 12)."""
    raw = DIRENT_HEAD.pack(ino, off, len(name), dtype) + name
    return raw + b"\0" * (-len(raw) % 8)


def pack_direntplus(entry_out: bytes, ino: int, off: int, dtype: int, name: bytes) -> bytes:
    raw = entry_out + DIRENT_HEAD.pack(ino, off, len(name), dtype) + name
    return raw + b"\0" * (-len(raw) % 8)


def pack_out_header(length: int, error: int, unique: int) -> bytes:
    """``fuse_out_header``; ``error`` is 0 or a negative errno."""
    return OUT_HEADER.pack(length, error, unique)


def split_cstring(body: bytes | bytearray | memoryview) -> bytes:
    """The NUL-terminated name at the start of a request body."""
    raw = bytes(body)
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]
