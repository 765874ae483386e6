"""EROFS on-disk structures used by RAFS v6: superblock, inodes, dirents, xattrs.

Pure bytes in and bytes out; no I/O. Layouts follow erofs-format.md §3 and
nydus-reference.md §2.1 (all little-endian). Decoders validate sizes and raise
:class:`FormatError`; encoders assume sane inputs from the builder.
Stateless and thread-safe.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass

from ..errors import FormatError

EROFS_MAGIC = 0xE0F5E1E2
EROFS_SUPER_OFFSET = 1024
EROFS_SB_SIZE = 128

FEATURE_COMPAT_SB_CHKSUM = 0x1
FEATURE_COMPAT_MTIME = 0x2
FEATURE_COMPAT_RAFS_V6 = 0x4000_0000
FEATURE_INCOMPAT_CHUNKED_FILE = 0x4
FEATURE_INCOMPAT_DEVICE_TABLE = 0x8

INODE_COMPACT_SIZE = 32
INODE_EXTENDED_SIZE = 64
ISLOT = 32

LAYOUT_FLAT_PLAIN = 0
LAYOUT_FLAT_INLINE = 2
LAYOUT_CHUNK_BASED = 4

CHUNK_FORMAT_BLKBITS_MASK = 0x1F
CHUNK_FORMAT_INDEXES = 0x20
CHUNK_INDEX_SIZE = 8
NULL_ADDR = 0xFFFFFFFF

DIRENT_SIZE = 12
XATTR_HEADER_SIZE = 12

# dirent file types
FT_UNKNOWN, FT_REG, FT_DIR, FT_CHR, FT_BLK, FT_FIFO, FT_SOCK, FT_SYMLINK = range(8)

XATTR_PREFIXES: dict[int, bytes] = {
    1: b"user.",
    2: b"system.posix_acl_access",
    3: b"system.posix_acl_default",
    4: b"trusted.",
    5: b"lustre.",
    6: b"security.",
}


# the dirent file type of each file kind (``S_IFMT`` bits); the kinds a RAFS inode may have
FILE_TYPES: dict[int, int] = {
    stat.S_IFREG: FT_REG,
    stat.S_IFDIR: FT_DIR,
    stat.S_IFCHR: FT_CHR,
    stat.S_IFBLK: FT_BLK,
    stat.S_IFIFO: FT_FIFO,
    stat.S_IFSOCK: FT_SOCK,
    stat.S_IFLNK: FT_SYMLINK,
}


def file_type_of(mode: int) -> int:
    return FILE_TYPES.get(stat.S_IFMT(mode), FT_UNKNOWN)


# --------------------------------------------------------------------------- superblock


@dataclass
class SuperBlock:
    feature_compat: int
    blkszbits: int
    root_nid: int
    inos: int
    build_time: int
    build_time_nsec: int
    blocks: int
    meta_blkaddr: int
    xattr_blkaddr: int
    uuid: bytes
    volume_name: bytes
    feature_incompat: int
    extra_devices: int
    devt_slotoff: int
    checksum: int = 0
    extslots: int = 0
    dirblkbits: int = 0
    packed_nid: int = 0

    def pack(self) -> bytes:
        body = struct.pack(
            "<IIIBBHQQIIII16s16sIHHHBBIQ",
            EROFS_MAGIC,
            self.checksum,
            self.feature_compat,
            self.blkszbits,
            self.extslots,
            self.root_nid,
            self.inos,
            self.build_time,
            self.build_time_nsec,
            self.blocks,
            self.meta_blkaddr,
            self.xattr_blkaddr,
            self.uuid.ljust(16, b"\0")[:16],
            self.volume_name.ljust(16, b"\0")[:16],
            self.feature_incompat,
            0,
            self.extra_devices,
            self.devt_slotoff,
            self.dirblkbits,
            0,
            0,
            self.packed_nid,
        )
        return body.ljust(EROFS_SB_SIZE, b"\0")

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> SuperBlock:
        if len(buf) < EROFS_SB_SIZE:
            raise FormatError("EROFS superblock truncated")
        (
            magic,
            checksum,
            compat,
            blkszbits,
            extslots,
            root_nid,
            inos,
            btime,
            bnsec,
            blocks,
            meta_blkaddr,
            xattr_blkaddr,
            uuid,
            vname,
            incompat,
            _u1,
            extra_devices,
            devt_slotoff,
        ) = struct.unpack_from("<IIIBBHQQIIII16s16sIHHH", buf, 0)
        if magic != EROFS_MAGIC:
            raise FormatError(f"bad EROFS magic {magic:#x}")
        dirblkbits = buf[90]
        packed_nid = struct.unpack_from("<Q", buf, 96)[0]
        return cls(
            feature_compat=compat,
            blkszbits=blkszbits,
            root_nid=root_nid,
            inos=inos,
            build_time=btime,
            build_time_nsec=bnsec,
            blocks=blocks,
            meta_blkaddr=meta_blkaddr,
            xattr_blkaddr=xattr_blkaddr,
            uuid=bytes(uuid),
            volume_name=bytes(vname),
            feature_incompat=incompat,
            extra_devices=extra_devices,
            devt_slotoff=devt_slotoff,
            checksum=checksum,
            extslots=extslots,
            dirblkbits=dirblkbits,
            packed_nid=packed_nid,
        )


# --------------------------------------------------------------------------- device slot

DEVICE_SLOT_SIZE = 128


def pack_device_slot(tag: bytes, blocks: int, mapped_blkaddr: int) -> bytes:
    return struct.pack("<64sII56x", tag[:64].ljust(64, b"\0"), blocks, mapped_blkaddr)


def unpack_device_slot(buf: bytes | memoryview, off: int) -> tuple[bytes, int, int]:
    if off + DEVICE_SLOT_SIZE > len(buf):
        raise FormatError("device table truncated")
    tag, blocks, mapped = struct.unpack_from("<64sII", buf, off)
    return bytes(tag).rstrip(b"\0"), blocks, mapped


# --------------------------------------------------------------------------- inodes

_COMPACT = struct.Struct("<HHHHIIIIHHI")
_EXTENDED = struct.Struct("<HHHHQIIIIQII16x")


@dataclass
class DiskInode:
    """An EROFS inode as stored (compact or extended)."""

    extended: bool
    layout: int
    xattr_icount: int
    mode: int
    nlink: int
    size: int
    i_u: int
    ino: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int

    @property
    def size_on_disk(self) -> int:
        return INODE_EXTENDED_SIZE if self.extended else INODE_COMPACT_SIZE

    @property
    def xattr_size(self) -> int:
        return xattr_ibody_size(self.xattr_icount)

    def pack(self) -> bytes:
        fmt = (1 if self.extended else 0) | (self.layout << 1)
        if self.extended:
            return _EXTENDED.pack(
                fmt,
                self.xattr_icount,
                self.mode & 0xFFFF,
                0,
                self.size,
                self.i_u,
                self.ino & 0xFFFFFFFF,
                self.uid,
                self.gid,
                self.mtime,
                self.mtime_nsec,
                self.nlink,
            )
        return _COMPACT.pack(
            fmt,
            self.xattr_icount,
            self.mode & 0xFFFF,
            self.nlink,
            self.size,
            self.mtime,
            self.i_u,
            self.ino & 0xFFFFFFFF,
            self.uid,
            self.gid,
            0,
        )

    @classmethod
    def unpack(cls, buf: bytes | memoryview, off: int) -> DiskInode:
        if off < 0 or off + INODE_COMPACT_SIZE > len(buf):
            raise FormatError(f"inode at byte {off} is outside the bootstrap")
        i_format = struct.unpack_from("<H", buf, off)[0]
        if i_format & ~0x1F:
            raise FormatError(f"inode at byte {off}: unknown format bits {i_format:#x}")
        extended = bool(i_format & 1)
        layout = (i_format >> 1) & 0x7
        if extended:
            if off + INODE_EXTENDED_SIZE > len(buf):
                raise FormatError(f"extended inode at byte {off} truncated")
            (_f, icount, mode, _r, size, i_u, ino, uid, gid, mtime, nsec, nlink) = (
                _EXTENDED.unpack_from(buf, off)
            )
        else:
            (_f, icount, mode, nlink, size, mtime, i_u, ino, uid, gid, _r2) = _COMPACT.unpack_from(
                buf, off
            )
            nsec = 0
        return cls(extended, layout, icount, mode, nlink, size, i_u, ino, uid, gid, mtime, nsec)


def xattr_ibody_size(icount: int) -> int:
    return 0 if icount == 0 else XATTR_HEADER_SIZE + 4 * (icount - 1)


def encode_rdev(rdev: int) -> int:
    """Linux 'new' device encoding as the kernel's new_encode_dev()."""
    import os

    major, minor = os.major(rdev), os.minor(rdev)
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def decode_rdev(v: int) -> int:
    import os

    major = (v & 0xFFF00) >> 8
    minor = (v & 0xFF) | ((v >> 12) & 0xFFF00)
    return os.makedev(major, minor)


# --------------------------------------------------------------------------- xattrs


def split_xattr_name(name: bytes) -> tuple[int, bytes] | None:
    """(name_index, suffix) for a full xattr name, or None if not storable."""
    if name == b"system.posix_acl_access":
        return 2, b""
    if name == b"system.posix_acl_default":
        return 3, b""
    for idx, prefix in ((1, b"user."), (4, b"trusted."), (6, b"security."), (5, b"lustre.")):
        if name.startswith(prefix) and len(name) > len(prefix):
            return idx, name[len(prefix) :]
    return None


def encode_xattrs(xattrs: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    """Encode inline xattrs; returns (i_xattr_icount, ibody bytes). Sorted input expected."""
    if not xattrs:
        return 0, b""
    parts = [b"\0" * XATTR_HEADER_SIZE]
    for name, value in xattrs:
        split = split_xattr_name(name)
        if split is None:
            raise FormatError(f"xattr {name!r} cannot be stored in EROFS")
        idx, suffix = split
        if len(suffix) > 255 or len(value) > 0xFFFF:
            raise FormatError(f"xattr {name!r} too large")
        ent = struct.pack("<BBH", len(suffix), idx, len(value)) + suffix + value
        parts.append(ent + b"\0" * (-len(ent) % 4))
    body = b"".join(parts)
    icount = (len(body) - XATTR_HEADER_SIZE) // 4 + 1
    return icount, body


def decode_xattrs(buf: bytes | memoryview, off: int, icount: int) -> dict[bytes, bytes]:
    size = xattr_ibody_size(icount)
    if size == 0:
        return {}
    end = off + size
    if end > len(buf):
        raise FormatError("inline xattrs run past the end of the bootstrap")
    shared = buf[off + 4]
    if shared:
        raise FormatError("shared xattrs are not used by RAFS v6")
    pos = off + XATTR_HEADER_SIZE
    out: dict[bytes, bytes] = {}
    while pos + 4 <= end:
        nlen, idx, vlen = struct.unpack_from("<BBH", buf, pos)
        if nlen == 0 and idx == 0 and vlen == 0:
            break
        ent_end = pos + 4 + nlen + vlen
        if ent_end > end:
            raise FormatError("xattr entry runs past its inode's xattr area")
        prefix = XATTR_PREFIXES.get(idx)
        if prefix is None:
            raise FormatError(f"unknown xattr name index {idx}")
        suffix = bytes(buf[pos + 4 : pos + 4 + nlen])
        out[prefix + suffix] = bytes(buf[pos + 4 + nlen : ent_end])
        pos = ent_end + (-(4 + nlen + vlen) % 4)
    return out


# --------------------------------------------------------------------------- dirents


def pack_dir_blocks(entries: list[tuple[bytes, int, int]], blksize: int) -> tuple[bytes, int]:
    """Pack sorted (name, nid, file_type) dirents into blocks.

    Returns (data, i_size): every block but the last is zero-padded to the
    block size; i_size counts only the used bytes of the last block.
    """
    blocks: list[bytes] = []
    cur: list[tuple[bytes, int, int]] = []
    used = 0
    for ent in entries:
        need = DIRENT_SIZE + len(ent[0])
        if cur and used + need > blksize:
            blocks.append(_pack_one_dir_block(cur))
            cur, used = [], 0
        cur.append(ent)
        used += need
    if cur:
        blocks.append(_pack_one_dir_block(cur))
    if not blocks:
        return b"", 0
    data = b"".join(b.ljust(blksize, b"\0") for b in blocks[:-1]) + blocks[-1]
    return data, len(data)


def _pack_one_dir_block(ents: list[tuple[bytes, int, int]]) -> bytes:
    nameoff = DIRENT_SIZE * len(ents)
    heads = []
    for name, nid, ft in ents:
        heads.append(struct.pack("<QHBB", nid, nameoff, ft, 0))
        nameoff += len(name)
    return b"".join(heads) + b"".join(e[0] for e in ents)


def unpack_dir_block(block: bytes | memoryview, limit: int) -> list[tuple[bytes, int, int]]:
    """Parse one directory block whose meaningful length is ``limit`` bytes."""
    if limit < DIRENT_SIZE:
        raise FormatError("directory block too small")
    nameoff0 = struct.unpack_from("<H", block, 8)[0]
    if nameoff0 < DIRENT_SIZE or nameoff0 % DIRENT_SIZE or nameoff0 > limit:
        raise FormatError(f"bad first dirent name offset {nameoff0}")
    n = nameoff0 // DIRENT_SIZE
    out = []
    for i in range(n):
        nid, nameoff, ft, _ = struct.unpack_from("<QHBB", block, i * DIRENT_SIZE)
        if i + 1 < n:
            end = struct.unpack_from("<H", block, (i + 1) * DIRENT_SIZE + 8)[0]
        else:
            end = limit
            z = bytes(block[nameoff:limit]).find(b"\0")
            if z >= 0:
                end = nameoff + z
        if not (nameoff0 <= nameoff < end <= limit) or end - nameoff > 255:
            raise FormatError(f"bad dirent name bounds {nameoff}..{end}")
        out.append((bytes(block[nameoff:end]), nid, ft))
    return out
