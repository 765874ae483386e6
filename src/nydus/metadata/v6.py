"""Read-only RAFS v6 (EROFS) bootstrap reader.

Owns parsing and validating a v6 bootstrap held in memory. Node ids are EROFS
nids. Every offset read from the image is bounds-checked before use and every
loop is bounded by the image size, so a hostile bootstrap yields FormatError,
never a crash, hang or huge allocation. Immutable after construction apart
from small internal caches guarded by a lock; safe to share between threads.
"""

from __future__ import annotations

import bisect
import itertools
import stat
import struct
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterator

from .. import codec
from ..errors import FormatError, NotFoundError, NydusError
from ..format import erofs
from ..format import rafs_v6 as v6
from .model import BlobInfo, ChunkInfo, DirEntry, Inode, Nid, RafsMetadata

__all__ = ["RafsV6Metadata"]

_DIR_CACHE = 1024


_CHUNK_KEY = struct.Struct("<32xI36xI4x")  # blob_index and index of an 80-byte chunk record


class _ChunkTable:
    """The legacy chunk table: (blob index, chunk index) -> record, each unpacked when asked
    for (a 1.3 GB image has 40k of them: unpacking all at open took 0.17 s of nydusd's start).
    The keys are kept sorted in an array (12 bytes a record; a dict of tuples took 150), and
    of two records with one key the later wins."""

    def __init__(self, table: bytes | memoryview, nblobs: int) -> None:
        self._table = table
        keys = [b << 32 | i for b, i in _CHUNK_KEY.iter_unpack(table)]
        order = sorted(range(len(keys)), key=keys.__getitem__)  # stable: table order kept
        self._keys = array("Q", [keys[p] for p in order])
        self._records = array("I", order)
        bad = self._keys[-1] >> 32 if self._keys else -1
        if bad >= nblobs:
            raise FormatError(f"chunk record refers to blob {bad}")

    def get(self, key: tuple[int, int]) -> v6.ChunkRecord | None:
        blob, index = key
        if not (0 <= blob < 1 << 32 and 0 <= index < 1 << 32):
            return None
        k = blob << 32 | index
        j = bisect.bisect_right(self._keys, k) - 1
        if j < 0 or self._keys[j] != k:
            return None
        return v6.ChunkRecord.unpack(self._table, self._records[j] * v6.CHUNK_INFO_SIZE)

    def __bool__(self) -> bool:
        return bool(self._keys)


class RafsV6Metadata(RafsMetadata):
    version = 6

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._mv = memoryview(data)
        self.sb = erofs.SuperBlock.unpack(self._mv[erofs.EROFS_SUPER_OFFSET :])
        sb = self.sb
        if not sb.feature_compat & erofs.FEATURE_COMPAT_RAFS_V6:
            raise FormatError("EROFS image without the RAFS v6 compat bit")
        if sb.blkszbits not in (9, 12):
            raise FormatError(f"unsupported block size bits {sb.blkszbits}")
        known = erofs.FEATURE_INCOMPAT_CHUNKED_FILE | erofs.FEATURE_INCOMPAT_DEVICE_TABLE
        if sb.feature_incompat & ~known:
            raise FormatError(f"unknown EROFS incompat features {sb.feature_incompat:#x}")
        if sb.xattr_blkaddr != 0:
            raise FormatError("RAFS v6 does not use shared xattrs (xattr_blkaddr != 0)")
        self.blksize = 1 << sb.blkszbits
        self.meta_base = sb.meta_blkaddr * self.blksize
        if self.meta_base >= len(data) or self.meta_base < erofs.EROFS_SUPER_OFFSET:
            raise FormatError(f"meta_blkaddr {sb.meta_blkaddr} outside the bootstrap")
        self.root_nid = Nid(sb.root_nid)
        self.ext = v6.ExtSuperBlock.unpack(self._mv)
        self.flags = self.ext.flags
        self.compressor = v6.compressor_from_flags(self.flags)
        self.digester = v6.digester_from_flags(self.flags)
        cs = self.ext.chunk_size
        if cs < v6.MIN_CHUNK_SIZE or cs > v6.MAX_CHUNK_SIZE or cs & (cs - 1):
            raise FormatError(f"invalid chunk size {cs:#x}")
        self.chunk_size = cs
        self.blobs = self._read_blob_table()
        self._chunk_records = self._read_chunk_table()
        self._lock = threading.Lock()
        self._dirs: OrderedDict[int, list[tuple[bytes, Nid, int]]] = OrderedDict()
        root = self._inode(self.root_nid)
        if not stat.S_ISDIR(root.mode):
            raise FormatError("root inode is not a directory")

    # ------------------------------------------------------------------ tables

    def _range(self, off: int, size: int, what: str) -> memoryview:
        if off < 0 or size < 0 or off + size > len(self.data):
            raise FormatError(f"{what} [{off}, +{size}) lies outside the bootstrap")
        return self._mv[off : off + size]

    def _read_blob_table(self) -> list[BlobInfo]:
        ext, sb = self.ext, self.sb
        if ext.blob_table_size % v6.BLOB_ENTRY_SIZE:
            raise FormatError(f"blob table size {ext.blob_table_size} not a multiple of 256")
        n = ext.blob_table_size // v6.BLOB_ENTRY_SIZE
        if n > v6.MAX_BLOBS:
            raise FormatError(f"blob table lists {n} blobs (max {v6.MAX_BLOBS})")
        if n != sb.extra_devices:
            raise FormatError(f"blob table has {n} blobs, device table {sb.extra_devices}")
        slot_base = sb.devt_slotoff * erofs.DEVICE_SLOT_SIZE
        out = []
        for i, e in enumerate(self.blob_entries()):
            tag, _blocks, _mapped = erofs.unpack_device_slot(
                self._mv, slot_base + i * erofs.DEVICE_SLOT_SIZE
            )
            if tag and tag != e.blob_id.encode():
                raise FormatError(f"device slot {i} tag {tag!r} != blob id {e.blob_id}")
            if e.chunk_count > v6.MAX_CHUNKS_PER_BLOB:
                raise FormatError(f"blob {e.blob_id} has {e.chunk_count} chunks (too many)")
            try:
                comp = codec.compressor_by_id(e.compression_algo).name
                dig = codec.digester_by_id(e.digest_algo).name
                ci_comp = codec.compressor_by_id(e.ci_compressor).name
            except NydusError as ex:
                raise FormatError(f"blob {e.blob_id}: {ex}") from None
            out.append(
                BlobInfo(
                    index=i,
                    blob_id=e.blob_id,
                    chunk_size=e.chunk_size,
                    chunk_count=e.chunk_count,
                    compressor=comp,
                    digester=dig,
                    features=e.features,
                    compressed_size=e.compressed_size,
                    uncompressed_size=e.uncompressed_size,
                    ci_compressor=ci_comp,
                    ci_offset=e.ci_offset,
                    ci_compressed_size=e.ci_compressed_size,
                    ci_uncompressed_size=e.ci_uncompressed_size,
                    toc_size=e.blob_toc_size,
                    toc_digest=e.blob_toc_digest,
                    meta_features=e.features,
                    meta_blob_id=_meta_blob_id(e),
                    meta_blob_size=e.blob_meta_size,
                )
            )
        return out

    def blob_entries(self) -> list[v6.BlobEntry]:
        """The blob table's entries as stored, unpacked afresh on each call: the builder edits
        the ones it carries into a new bootstrap."""
        ext = self.ext
        table = self._range(ext.blob_table_offset, ext.blob_table_size, "blob table")
        return [
            v6.BlobEntry.unpack(table, off)
            for off in range(0, ext.blob_table_size, v6.BLOB_ENTRY_SIZE)
        ]

    def _read_chunk_table(self) -> _ChunkTable:
        ext = self.ext
        if ext.chunk_table_size == 0:
            return _ChunkTable(b"", 0)
        if ext.chunk_table_size % v6.CHUNK_INFO_SIZE:
            raise FormatError("chunk table size is not a multiple of 80")
        table = self._range(ext.chunk_table_offset, ext.chunk_table_size, "chunk table")
        return _ChunkTable(table, len(self.blobs))

    def prefetch_nids(self) -> list[Nid]:
        size = self.ext.prefetch_table_size
        if size == 0:
            return []
        if size % 4:
            raise FormatError("prefetch table size is not a multiple of 4")
        buf = self._range(self.ext.prefetch_table_offset, size, "prefetch table")
        return list(struct.unpack(f"<{size // 4}I", buf))

    # ------------------------------------------------------------------ inodes

    def _inode_off(self, nid: int) -> int:
        if nid < 0:
            raise FormatError(f"negative nid {nid}")
        return self.meta_base + nid * erofs.ISLOT

    def _inode(self, nid: int) -> erofs.DiskInode:
        return erofs.DiskInode.unpack(self._mv, self._inode_off(nid))

    def getattr(self, nid: Nid) -> Inode:
        di = self._inode(nid)
        if stat.S_IFMT(di.mode) == 0:
            raise FormatError(f"inode {nid} has no file type")
        rdev = 0
        if stat.S_ISCHR(di.mode) or stat.S_ISBLK(di.mode):
            rdev = erofs.decode_rdev(di.i_u)
        if di.extended:
            mtime, nsec = di.mtime, di.mtime_nsec
        else:
            mtime = self.sb.build_time
            if self.sb.feature_compat & erofs.FEATURE_COMPAT_MTIME:
                mtime += di.mtime
            nsec = self.sb.build_time_nsec
        return Inode(
            nid=nid,
            ino=di.ino or nid,
            mode=di.mode,
            nlink=di.nlink,
            uid=di.uid,
            gid=di.gid,
            size=di.size,
            rdev=rdev,
            mtime=mtime,
            mtime_nsec=nsec,
            blocks=(di.size + 511) // 512,
            xattr_count=di.xattr_icount,
        )

    def xattrs(self, nid: Nid) -> dict[bytes, bytes]:
        di = self._inode(nid)
        return erofs.decode_xattrs(
            self._mv, self._inode_off(nid) + di.size_on_disk, di.xattr_icount
        )

    def _data(self, nid: int, di: erofs.DiskInode) -> bytes:
        """Whole inline/plain data of a directory or symlink."""
        size = di.size
        if size > len(self.data):
            raise FormatError(f"inode {nid} size {size} exceeds the bootstrap")
        if di.layout == erofs.LAYOUT_FLAT_PLAIN:
            if size == 0:
                return b""
            return bytes(self._range(di.i_u * self.blksize, size, f"data of inode {nid}"))
        if di.layout == erofs.LAYOUT_FLAT_INLINE:
            full = size // self.blksize * self.blksize
            head = b""
            if full:
                head = bytes(self._range(di.i_u * self.blksize, full, f"data of inode {nid}"))
            tail_off = self._inode_off(nid) + di.size_on_disk + di.xattr_size
            tail_len = size - full
            if tail_len and tail_off // self.blksize != (tail_off + tail_len - 1) // self.blksize:
                raise FormatError(f"inline tail of inode {nid} crosses a block boundary")
            return head + bytes(self._range(tail_off, tail_len, f"inline data of inode {nid}"))
        raise FormatError(f"inode {nid} has unsupported data layout {di.layout}")

    def readlink(self, nid: Nid) -> bytes:
        di = self._inode(nid)
        if not stat.S_ISLNK(di.mode):
            raise FormatError(f"inode {nid} is not a symlink")
        if di.size > 4096:
            raise FormatError(f"symlink {nid} target longer than 4096 bytes")
        return self._data(nid, di)

    # ------------------------------------------------------------------ directories

    def _dir_entries(self, nid: int) -> list[tuple[bytes, Nid, int]]:
        with self._lock:
            hit = self._dirs.get(nid)
            if hit is not None:
                self._dirs.move_to_end(nid)
                return hit
        di = self._inode(nid)
        if not stat.S_ISDIR(di.mode):
            raise FormatError(f"inode {nid} is not a directory")
        data = self._data(nid, di)
        ents: list[tuple[bytes, int, int]] = []
        bs = self.blksize
        for boff in range(0, len(data), bs):
            limit = min(bs, len(data) - boff)
            ents.extend(erofs.unpack_dir_block(memoryview(data)[boff : boff + bs], limit))
        names = [e[0] for e in ents]
        if any(a >= b for a, b in itertools.pairwise(names)):
            raise FormatError(f"directory {nid} entries are not strictly sorted")
        out = []
        for name, cnid, ft in ents:
            if name in (b".", b".."):
                continue
            if not name or b"/" in name or b"\0" in name:
                raise FormatError(f"directory {nid} has invalid entry name {name!r}")
            out.append((name, Nid(cnid), ft))
        with self._lock:
            self._dirs[nid] = out
            if len(self._dirs) > _DIR_CACHE:
                self._dirs.popitem(last=False)
        return out

    def readdir(self, nid: Nid) -> Iterator[DirEntry]:
        for name, cnid, ft in self._dir_entries(nid):
            yield DirEntry(name, cnid, ft)

    def lookup(self, parent: Nid, name: bytes) -> Nid:
        ents = self._dir_entries(parent)
        lo, hi = 0, len(ents)
        while lo < hi:
            mid = (lo + hi) // 2
            if ents[mid][0] < name:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(ents) and ents[lo][0] == name:
            return ents[lo][1]
        raise NotFoundError(f"{name.decode(errors='replace')!r} not found")

    def walk(self, max_depth: int = 4096) -> Iterator[tuple[bytes, Nid]]:
        """As :meth:`RafsMetadata.walk`, and a directory reached twice is a FormatError.

        EROFS has no hardlinked directories; without this check a directory listed by two
        parents (a DAG, not a loop) makes the walk exponential in the tree depth.
        """
        seen: set[int] = set()
        for path, nid in super().walk(max_depth):
            if nid in seen and self.getattr(nid).is_dir:
                raise FormatError(
                    f"directory {nid} reached twice (at {path!r}): a directory loop or a "
                    f"hardlinked directory"
                )
            seen.add(nid)
            yield path, nid

    # ------------------------------------------------------------------ chunks

    def chunks(self, nid: Nid) -> list[ChunkInfo]:
        di = self._inode(nid)
        if not stat.S_ISREG(di.mode):
            raise FormatError(f"inode {nid} is not a regular file")
        if di.size == 0:
            return []
        if di.layout != erofs.LAYOUT_CHUNK_BASED:
            raise FormatError(f"regular file {nid} is not chunk based (layout {di.layout})")
        fmt = di.i_u & 0xFFFF
        if not fmt & erofs.CHUNK_FORMAT_INDEXES or fmt & ~0x3F:
            raise FormatError(f"file {nid}: unsupported chunk format {fmt:#x}")
        bits = self.sb.blkszbits + (fmt & erofs.CHUNK_FORMAT_BLKBITS_MASK)
        if bits > 40:
            raise FormatError(f"file {nid}: chunk size 2^{bits} is absurd")
        icsize = 1 << bits
        count = -(-di.size // icsize)
        base = self._inode_off(nid) + di.size_on_disk + di.xattr_size
        base += -base % erofs.CHUNK_INDEX_SIZE
        idx = self._range(base, count * erofs.CHUNK_INDEX_SIZE, f"chunk indexes of inode {nid}")
        real = self.chunk_size
        per_index = icsize // real if icsize > real else 1
        if per_index > 1 and -(-di.size // real) > sum(b.chunk_count for b in self.blobs):
            # One index then stands for a run of distinct chunks of one blob: they must all
            # exist, or a few bytes of bootstrap could claim billions of chunks.
            raise FormatError(
                f"file {nid}: {di.size} bytes in 2^{bits}-byte chunk indexes need more "
                f"chunks than the blobs hold"
            )
        out: list[ChunkInfo] = []
        for i in range(count):
            dev, ci, blkaddr = v6.unpack_chunk_index(idx, i * erofs.CHUNK_INDEX_SIZE)
            if blkaddr == erofs.NULL_ADDR:
                continue  # hole
            if dev == 0 or dev > len(self.blobs):
                raise FormatError(f"file {nid}: chunk {i} refers to device {dev}")
            blob = dev - 1
            for j in range(per_index):
                foff = i * icsize + j * real
                if foff >= di.size:
                    break
                out.append(self._chunk(nid, blob, ci + j, foff, blkaddr * self.blksize + j * real))
        return out

    def chunk_record(self, blob_index: int, index: int) -> ChunkInfo | None:
        rec = self._chunk_records.get((blob_index, index))
        return None if rec is None else ChunkInfo.of_record(rec, 0, rec.crc32)

    def _chunk(self, nid: int, blob: int, ci: int, foff: int, uoff: int) -> ChunkInfo:
        binfo = self.blobs[blob]
        if ci >= binfo.chunk_count and binfo.chunk_count:
            raise FormatError(f"file {nid}: chunk index {ci} >= blob chunk count")
        rec = self._chunk_records.get((blob, ci))
        if rec is None:
            if self._chunk_records:
                raise FormatError(f"file {nid}: no chunk record for blob {blob} index {ci}")
            # Bootstraps without the legacy chunk table: sizes come from blob meta.
            return ChunkInfo(b"", blob, ci, foff, -1, -1, uoff, -1, False)
        if rec.uncompressed_offset != uoff:
            raise FormatError(
                f"file {nid}: chunk {ci} uncompressed offset {rec.uncompressed_offset} "
                f"!= index address {uoff}"
            )
        if not 0 < rec.uncompressed_size <= v6.MAX_CHUNK_SIZE:
            raise FormatError(f"file {nid}: chunk {ci} has size {rec.uncompressed_size}")
        return ChunkInfo.of_record(rec, foff, rec.crc32)


def _meta_blob_id(e: v6.BlobEntry) -> str:
    """The id of a ``SEPARATE`` blob's meta blob (sha256 in ``blob_meta_digest``), else ""."""
    if not e.features & v6.BLOB_FEATURE_SEPARATE or not any(e.blob_meta_digest):
        return ""
    return e.blob_meta_digest.hex()
