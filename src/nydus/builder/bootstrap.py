"""Serialise a built tree as a RAFS v6 bootstrap (an EROFS image).

Layout (4 KiB blocks)::

    0     zeros | EROFS sb @1024 | RAFS ext sb @1152 | device table @1408
    align blob table (256 B/blob) | prefetch table (u32 nids)
    align meta_blkaddr: nid 0 unused, then inodes in breadth-first order, each
          with inline xattrs and an inline tail or its chunk-index array
    align directory / symlink data blocks that do not fit inline
    align chunk-info table (80 B per chunk referenced) | align end

Inodes are always extended (64 B): exact ns mtimes, 32-bit ids, 64-bit sizes.
Nothing depends on time or on the order a file system lists entries, so the
same tree always gives the same bytes. Single-threaded, pure computation.
"""

from __future__ import annotations

import stat
from collections import deque
from dataclasses import dataclass

from ..errors import FormatError
from ..format import erofs
from ..format import rafs_v6 as v6
from ..metadata.model import ChunkInfo
from .tree import Node

__all__ = ["BootstrapOptions", "write_bootstrap"]

BS = 4096
BLKBITS = 12


@dataclass
class BootstrapOptions:
    chunk_size: int
    compressor: str
    digester: str
    blobs: list[v6.BlobEntry]
    prefetch: list[Node] | None = None


@dataclass(eq=False, slots=True)
class _Slot:
    node: Node
    parent: Node
    ino: int
    layout: int = erofs.LAYOUT_FLAT_PLAIN
    icount: int = 0
    xattr_body: bytes = b""
    data: bytes = b""  # dir/symlink bytes
    tail: bytes = b""  # inline part of data
    head_len: int = 0  # bytes in blocks
    head_blk: int = 0
    i_u: int = 0
    index: bytes = b""  # chunk indexes (regular files)
    size: int = 0
    pos: int = 0


def _align(v: int, a: int) -> int:
    return v + (-v % a)


def _order(root: Node) -> list[_Slot]:
    """Breadth-first, children by name; a hardlinked node appears once."""
    slots: list[_Slot] = []
    seen: dict[int, _Slot] = {}
    root.nlink = 0
    q: deque[tuple[Node, Node]] = deque([(root, root)])
    while q:
        node, parent = q.popleft()
        key = id(node)
        if key in seen:
            node.nlink += 1
            continue
        node.nlink = 1
        s = _Slot(node, parent, ino=len(slots) + 1)
        seen[key] = s
        slots.append(s)
        if node.children is not None:
            for name in sorted(node.children):
                q.append((node.children[name], node))
    for s in slots:
        if s.node.is_dir:
            assert s.node.children is not None
            s.node.nlink = 2 + sum(1 for c in s.node.children.values() if c.is_dir)
    return slots


_HOLE = b"\0\0\0\0" + erofs.NULL_ADDR.to_bytes(4, "little")  # the index of a hole


def _chunk_index(node: Node, chunk_size: int) -> tuple[int, bytes]:
    """(chunk format, index array) of a regular file."""
    cbits = chunk_size.bit_length() - 1
    size = node.size
    chunks = node.chunks or []
    if size == 0:
        return erofs.CHUNK_FORMAT_INDEXES | (cbits - BLKBITS), b""
    count = -(-size // chunk_size)
    if len(chunks) > 1 and len(chunks) == count:
        c0 = chunks[0]
        contiguous = all(
            c.blob_index == c0.blob_index
            and c.index == c0.index + k
            and c.uncompressed_offset == c0.uncompressed_offset + k * chunk_size
            and c.file_offset == k * chunk_size
            for k, c in enumerate(chunks)
        )
        if contiguous:
            bits = max(cbits, (size - 1).bit_length())
            if bits - BLKBITS <= erofs.CHUNK_FORMAT_BLKBITS_MASK:
                fmt = erofs.CHUNK_FORMAT_INDEXES | (bits - BLKBITS)
                return fmt, v6.pack_chunk_index(
                    c0.blob_index, c0.index, c0.uncompressed_offset // BS
                )
    if count == 1 and len(chunks) == 1:  # most files: one chunk, the index is its own
        c = chunks[0]
        if c.file_offset:
            raise FormatError(f"chunk at file offset {c.file_offset} of {node.path!r} misplaced")
        if c.uncompressed_offset % BS:
            raise FormatError("chunk uncompressed offset is not 4 KiB aligned")
        return erofs.CHUNK_FORMAT_INDEXES | (cbits - BLKBITS), v6.pack_chunk_index(
            c.blob_index, c.index, c.uncompressed_offset // BS
        )
    entries = [_HOLE] * count
    for c in chunks:
        k = c.file_offset // chunk_size
        if c.file_offset % chunk_size or k >= count:
            raise FormatError(f"chunk at file offset {c.file_offset} of {node.path!r} misplaced")
        if c.uncompressed_offset % BS:
            raise FormatError("chunk uncompressed offset is not 4 KiB aligned")
        entries[k] = v6.pack_chunk_index(c.blob_index, c.index, c.uncompressed_offset // BS)
    return erofs.CHUNK_FORMAT_INDEXES | (cbits - BLKBITS), b"".join(entries)


def write_bootstrap(root: Node, opts: BootstrapOptions) -> bytes:
    if not root.is_dir:
        raise FormatError("the root of an image must be a directory")
    nblobs = len(opts.blobs)
    if nblobs > v6.MAX_BLOBS:
        raise FormatError(f"{nblobs} blobs exceed the RAFS v6 limit of {v6.MAX_BLOBS}")
    slots = _order(root)

    # Fixed tables before the metadata area.
    devt_end = v6.DEVTABLE_OFFSET + nblobs * erofs.DEVICE_SLOT_SIZE
    blob_table_off = _align(devt_end, BS)
    blob_table_size = nblobs * v6.BLOB_ENTRY_SIZE
    prefetch = opts.prefetch or []
    prefetch_off = blob_table_off + blob_table_size
    meta_base = _align(prefetch_off + 4 * len(prefetch), BS)

    has_xattr = False
    # Per-node payloads (sizes do not depend on nids).
    for s in slots:
        n = s.node
        if n.xattrs:
            has_xattr = True
            s.icount, s.xattr_body = erofs.encode_xattrs(sorted(n.xattrs.items()))
        if n.is_reg:
            s.layout = erofs.LAYOUT_CHUNK_BASED
            s.i_u, s.index = _chunk_index(n, opts.chunk_size)
            s.size = n.size
        elif n.is_dir:
            assert n.children is not None
            names = [b".", b"..", *n.children]
            # placeholder nids: block packing depends only on names
            ents = [(nm, 0, 0) for nm in sorted(names)]
            s.data, s.size = erofs.pack_dir_blocks(ents, BS)
        elif n.is_symlink:
            s.data = n.symlink
            s.size = len(n.symlink)
        elif stat.S_ISCHR(n.mode) or stat.S_ISBLK(n.mode):
            s.i_u = erofs.encode_rdev(n.rdev)
        elif not (stat.S_ISFIFO(n.mode) or stat.S_ISSOCK(n.mode)):
            raise FormatError(f"unsupported file type {stat.S_IFMT(n.mode):#o}")

    # Place inodes.
    pos = meta_base + erofs.ISLOT  # nid 0 stays unused: a root nid of 0 confuses readers
    for s in slots:
        pos = _align(pos, erofs.ISLOT)
        fixed = erofs.INODE_EXTENDED_SIZE + len(s.xattr_body)
        if fixed <= BS and pos // BS != (pos + fixed - 1) // BS:
            pos = _align(pos, BS)
        if s.data:
            tail_len = len(s.data) % BS
            s.head_len = len(s.data) - tail_len
            s.layout = erofs.LAYOUT_FLAT_INLINE if tail_len else erofs.LAYOUT_FLAT_PLAIN
            if tail_len:
                start = pos + fixed
                if start // BS != (start + tail_len - 1) // BS:
                    if fixed + tail_len <= BS:
                        pos = _align(pos, BS)
                    else:
                        s.layout = erofs.LAYOUT_FLAT_PLAIN
                        s.head_len = len(s.data)
            if s.layout == erofs.LAYOUT_FLAT_INLINE:
                s.tail = s.data[s.head_len :]
            s.pos = pos
            pos += fixed + len(s.tail)
        elif s.index:
            s.pos = pos
            pos = _align(pos + fixed, erofs.CHUNK_INDEX_SIZE) + len(s.index)
        else:
            s.pos = pos
            pos += fixed
        s.node.nid = (s.pos - meta_base) // erofs.ISLOT

    # Data blocks for what does not fit inline.
    blk = _align(pos, BS) // BS
    for s in slots:
        if s.head_len:
            s.head_blk = blk
            blk += -(-s.head_len // BS)
            s.i_u = s.head_blk
        elif s.layout == erofs.LAYOUT_FLAT_INLINE:
            s.i_u = erofs.NULL_ADDR
    data_end = blk * BS

    # Legacy chunk table: one record per distinct chunk referenced, by (blob, index) (one
    # int key: blob indexes are < 256 and chunk indexes < 2^24). Packed into the image below.
    records: dict[int, ChunkInfo] = {}
    for s in slots:
        for c in s.node.chunks or ():
            records.setdefault(c.blob_index << 32 | c.index, c)
    chunk_table_off = data_end
    chunk_table_size = len(records) * v6.CHUNK_INFO_SIZE
    total = _align(chunk_table_off + chunk_table_size, BS)
    img = bytearray(total)

    # Inodes, xattrs, inline data, chunk indexes.
    for s in slots:
        n = s.node
        di = erofs.DiskInode(
            extended=True,
            layout=s.layout,
            xattr_icount=s.icount,
            mode=n.mode,
            nlink=n.nlink,
            size=s.size,
            i_u=s.i_u,
            ino=s.ino,
            uid=n.uid,
            gid=n.gid,
            mtime=n.mtime,
            mtime_nsec=n.mtime_nsec,
        )
        p = s.pos
        img[p : p + erofs.INODE_EXTENDED_SIZE] = di.pack()
        p += erofs.INODE_EXTENDED_SIZE
        img[p : p + len(s.xattr_body)] = s.xattr_body
        p += len(s.xattr_body)
        if n.is_dir:
            assert n.children is not None
            ents = [(b".", n.nid, erofs.FT_DIR), (b"..", s.parent.nid, erofs.FT_DIR)]
            ents += [(nm, c.nid, erofs.file_type_of(c.mode)) for nm, c in n.children.items()]
            ents.sort()
            data, _ = erofs.pack_dir_blocks(ents, BS)
            assert len(data) == len(s.data)
            s.data = data
            s.tail = data[s.head_len :] if s.layout == erofs.LAYOUT_FLAT_INLINE else b""
        if s.tail:
            img[p : p + len(s.tail)] = s.tail
        if s.index:
            p = _align(p, erofs.CHUNK_INDEX_SIZE)
            img[p : p + len(s.index)] = s.index
        if s.head_len:
            o = s.head_blk * BS
            img[o : o + s.head_len] = s.data[: s.head_len]

    inos = len(slots)
    del slots  # the per-inode records (the largest transient here) before the chunk table

    p = chunk_table_off
    for _k, c in sorted(records.items()):
        img[p : p + v6.CHUNK_INFO_SIZE] = v6.ChunkRecord(
            digest=c.digest,
            blob_index=c.blob_index,
            flags=v6.CHUNK_FLAG_COMPRESSED if c.compressed else 0,
            compressed_size=c.compressed_size,
            uncompressed_size=c.uncompressed_size,
            compressed_offset=c.compressed_offset,
            uncompressed_offset=c.uncompressed_offset,
            file_offset=c.file_offset,
            index=c.index,
            crc32=c.crc32,
        ).pack()
        p += v6.CHUNK_INFO_SIZE
    del records

    # Blob table, device table, prefetch table.
    blob_blocks = 0
    for i, b in enumerate(opts.blobs):
        if b.blob_index != i:
            raise FormatError("blob table entries out of order")
        off = blob_table_off + i * v6.BLOB_ENTRY_SIZE
        img[off : off + v6.BLOB_ENTRY_SIZE] = b.pack()
        blocks = -(-b.uncompressed_size // BS)
        blob_blocks += blocks
        doff = v6.DEVTABLE_OFFSET + i * erofs.DEVICE_SLOT_SIZE
        img[doff : doff + erofs.DEVICE_SLOT_SIZE] = erofs.pack_device_slot(
            b.blob_id.encode(), blocks, 0
        )
    for i, pn in enumerate(prefetch):
        nid = pn.nid  # placed above: the prefetch nodes are nodes of this tree
        img[prefetch_off + 4 * i : prefetch_off + 4 * i + 4] = nid.to_bytes(4, "little")

    flags = (
        v6.COMPRESSION_FLAGS[opts.compressor]
        | v6.DIGEST_FLAGS[opts.digester]
        | v6.FLAG_EXPLICIT_UID_GID
        | v6.FLAG_INLINED_CHUNK_DIGEST
        | (v6.FLAG_HAS_XATTR if has_xattr else 0)
    )
    ext = v6.ExtSuperBlock(
        flags=flags,
        blob_table_offset=blob_table_off,
        blob_table_size=blob_table_size,
        chunk_size=opts.chunk_size,
        chunk_table_offset=chunk_table_off,
        chunk_table_size=chunk_table_size,
        prefetch_table_offset=prefetch_off if prefetch else 0,
        prefetch_table_size=4 * len(prefetch),
    )
    img[v6.EXT_SB_OFFSET : v6.EXT_SB_OFFSET + v6.EXT_SB_SIZE] = ext.pack()
    root_nid = root.nid
    if root_nid > 0xFFFF:
        raise FormatError("root nid does not fit in 16 bits")
    sb = erofs.SuperBlock(
        feature_compat=erofs.FEATURE_COMPAT_RAFS_V6,
        blkszbits=BLKBITS,
        root_nid=root_nid,
        inos=inos,
        build_time=0,
        build_time_nsec=0,
        blocks=blob_blocks,
        meta_blkaddr=meta_base // BS,
        xattr_blkaddr=0,
        uuid=b"",
        volume_name=b"",
        feature_incompat=erofs.FEATURE_INCOMPAT_CHUNKED_FILE | erofs.FEATURE_INCOMPAT_DEVICE_TABLE,
        extra_devices=nblobs,
        devt_slotoff=v6.DEVT_SLOTOFF,
    )
    img[erofs.EROFS_SUPER_OFFSET : erofs.EROFS_SUPER_OFFSET + erofs.EROFS_SB_SIZE] = sb.pack()
    return bytes(img)
