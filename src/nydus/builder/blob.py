"""Write a native Nydus data blob as a stream, deduplicating chunks.

:class:`BlobWriter` cuts regular files into ``chunk_size`` pieces, hashes each
(blake3/sha256 over the uncompressed bytes), looks the digest up in a
:class:`ChunkDict` (chunks of this build, of the parent image and of a chunk
dictionary image), and appends only new chunks, each compressed on its own
(or raw when that is not smaller), at 4 KiB-aligned uncompressed offsets. On
:meth:`BlobWriter.finish` it appends the ci array and header, the chunk digest
array and the ToC, each framed by a trailing tar header, exactly as upstream.

The blob id is computed the upstream way: sha256 over every byte written
except the chunk digest array's payload (its tar header is included).

Chunks go to a thread pool in batches of about 1 MiB (at most 32 files), so one
round trip covers many small files. For a directory (:meth:`BlobWriter.add_files`,
:meth:`BlobWriter.add_source`) the workers also open and read the files (a bare fd,
one ``pread`` per chunk into a new bytes object that is also a raw chunk's payload, a
``WILLNEED`` hint per batch); they digest each chunk and compress the ones not yet
known (the codecs release the GIL). The caller's thread places results in
submission order and hands the blob bytes, in ~1 MiB writes, to a writer thread
that writes them and hashes the blob id. Chunk order, and so the output bytes, do
not depend on scheduling. The writer object is used from one thread; the pool
only runs :meth:`BlobWriter._process`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from .. import codec
from ..errors import FormatError
from ..format import blob_meta as bm
from ..format import rafs_v6 as v6
from ..metadata.model import ChunkInfo
from .tree import Node, PathData

__all__ = ["BlobWriter", "ChunkDict", "BlobResult"]

BLOCK = 4096


class _Sink(Protocol):
    def write(self, b: bytes, /) -> int: ...


class ChunkDict:
    """digest -> ChunkInfo for every chunk a build may reference instead of storing."""

    def __init__(self) -> None:
        self._map: dict[bytes, ChunkInfo] = {}

    def get(self, digest: bytes) -> ChunkInfo | None:
        return self._map.get(digest)

    def add(self, ref: ChunkInfo) -> None:
        self._map.setdefault(ref.digest, ref)

    def __len__(self) -> int:
        return len(self._map)


@dataclass
class BlobResult:
    entry: v6.BlobEntry
    new_chunks: int
    deduped_chunks: int
    data_size: int


def _data_extents(fd: int, size: int, start: int, end: int) -> list[tuple[int, int]] | None:
    """Data ranges in [start, end) of a sparse regular file, or None when not sparse/unknown."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    if st.st_blocks * 512 >= size:
        return None
    out: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        if len(out) >= 100_000:
            return None  # too fragmented to be worth it: read it all
        try:
            pos = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break  # ENXIO: no more data
        hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        out.append((pos, hole))
        pos = hole
    return out


def _in_hole(extents: list[tuple[int, int]] | None, off: int, end: int) -> bool:
    if extents is None:
        return False
    return all(e <= off or s >= end for s, e in extents)


_DEFERRED = -2  # blob index of a chunk reference in the deferred region until finish()
_BATCH_BYTES = 1 << 20  # one pool task: chunks of this many bytes in all, or
_BATCH_FILES = 32  # this many files (a worker opens them together)
_WRITE_BYTES = 1 << 20  # blob bytes handed to the writer thread at once

# a chunk done on the pool: (file offset, size, digest, payload or None when known, compressed)
_Chunk = tuple[int, int, bytes, bytes | None, bool]


@dataclass(eq=False, slots=True)
class _Piece:
    """A chunk's bytes, or (``data`` None) a range of a file that a worker reads itself."""

    node: Node
    offset: int
    size: int
    data: bytes | None
    deferred: bool


@dataclass(eq=False)
class _Batch:
    pieces: list[_Piece] = field(default_factory=list)
    files: int = 0
    size: int = 0
    future: Future[list[list[_Chunk]]] | None = None


class _SinkThread:
    """Writes (and hashes) blob bytes on a thread of its own, in order.

    The output write and the sha256 of the blob id are the serial part of a build;
    done here they overlap with reading, hashing and compressing chunks. The queue is
    bounded, so memory stays a few writes. An error surfaces at the next put or sync.
    """

    def __init__(self, out: _Sink, hasher: hashlib._Hash) -> None:
        self._out = out
        self._hasher = hasher
        self._q: queue.Queue[tuple[bytes, bool] | None] = queue.Queue(maxsize=8)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="blob-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    b, hashed = item
                    self._out.write(b)
                    if hashed:
                        self._hasher.update(b)
            except BaseException as e:  # reported to the producer
                self._error = e
            finally:
                self._q.task_done()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, b: bytes, hashed: bool) -> None:
        self._check()
        self._q.put((b, hashed))

    def sync(self) -> None:
        self._q.join()
        self._check()

    def stop(self) -> None:
        self._q.put(None)
        self._thread.join()


class BlobWriter:
    """Streams chunks into one blob; use as a context manager (it owns a thread pool).

    :meth:`add_file` takes a node and its data as ``(file offset, bytes)`` pieces, one per
    non-hole chunk in file order; :meth:`add_files` opens directory files itself and lets the
    pool read them. Chunks are placed strictly in submission order through a bounded window of
    batches shared by all files (so memory stays at a few MiB whatever the file sizes).

    ``deferred=True`` puts a file's new chunks behind every non-deferred chunk of the blob
    (``--prefetch-policy fs`` for a stream, whose prefetch files may come last): their payloads
    wait in a temporary spool file, and their references are renumbered by :meth:`finish`.
    """

    def __init__(
        self,
        out: _Sink,
        *,
        blob_index: int,
        chunk_size: int,
        compressor: codec.Compressor,
        digester: codec.Digester,
        chunk_dict: ChunkDict,
        workers: int | None = None,
        spool_dir: str | None = None,
        on_chunk: Callable[[int, bool], None] | None = None,
    ) -> None:
        self.out = out
        self._on_chunk = on_chunk  # (uncompressed size, deduplicated) per chunk placed
        self.blob_index = blob_index
        self.chunk_size = chunk_size
        self.compressor = compressor
        self.digester = digester
        self.dict = chunk_dict
        self._hash = hashlib.sha256()
        self._writer: _SinkThread | None = None
        self._wbuf: list[bytes] = []  # hashed bytes not yet handed to the writer
        self._wlen = 0
        self._pos = 0  # compressed offset (bytes written so far)
        self._upos = 0  # next uncompressed offset (4 KiB aligned)
        self._ci: list[bm.CiEntry] = []
        self._digests: list[bytes] = []
        self.deduped = 0
        self.bytes_in = 0
        self._workers = workers or min(4, os.cpu_count() or 1)
        self._aligned = compressor.is_none
        self._pool: ThreadPoolExecutor | None = None
        self._batch = _Batch()  # being filled
        self._window: deque[_Batch] = deque()  # submitted, placed in this order
        self._limit = self._workers * 3
        # the deferred region (see the class docstring)
        self._spool_dir = spool_dir
        self._spool: BinaryIO | None = None
        self._dpos = 0
        self._dupos = 0
        self._dci: list[bm.CiEntry] = []
        self._ddigests: list[bytes] = []
        self._dnodes: dict[int, Node] = {}

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            for b in self._window:
                if b.future is not None:
                    b.future.cancel()
            self._window.clear()
            self._batch = _Batch()
        self.close()

    def close_pool(self) -> None:
        """Place every chunk in flight, then stop the pool."""
        try:
            self.flush()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None

    def close(self) -> None:
        """Stop the pool (pending chunks are placed first) and drop the spool."""
        try:
            self.close_pool()
            self._sync()
        finally:
            if self._writer is not None:
                self._writer.stop()
                self._writer = None
            if self._spool is not None:
                self._spool.close()
                self._spool = None

    def flush(self) -> None:
        """Place every chunk still in flight."""
        self._submit()
        while self._window:
            self._place_batch(self._window.popleft())

    # ------------------------------------------------------------------ writing

    def _write(self, b: bytes, hashed: bool = True) -> None:
        self._pos += len(b)
        if not hashed:
            self._send()
            self._sink().put(b, False)
            return
        self._wbuf.append(b)
        self._wlen += len(b)
        if self._wlen >= _WRITE_BYTES:
            self._send()

    def _sink(self) -> _SinkThread:
        if self._writer is None:
            self._writer = _SinkThread(self.out, self._hash)
        return self._writer

    def _send(self) -> None:
        """Hand the buffered bytes to the writer thread in one piece."""
        if self._wbuf:
            data = self._wbuf[0] if len(self._wbuf) == 1 else b"".join(self._wbuf)
            self._wbuf, self._wlen = [], 0
            self._sink().put(data, True)

    def _sync(self) -> None:
        """Every byte so far written to ``out`` and hashed."""
        self._send()
        if self._writer is not None:
            self._writer.sync()

    def _blob_hash(self) -> hashlib._Hash:
        """The blob-id hash so far (waits for queued writes)."""
        self._sync()
        return self._hash

    def _process(self, pieces: list[_Piece]) -> list[list[_Chunk]]:
        """On the pool: read (file ranges), digest, and compress the chunks not yet known."""
        handles: list[int | BinaryIO | None] = []
        try:
            for p in pieces:  # open them all first: the kernel reads ahead meanwhile
                handles.append(None if p.data is not None else _open_range(p))
            out: list[list[_Chunk]] = []
            for p, h in zip(pieces, handles, strict=True):
                if h is None:
                    out.append([self._chunk(p.offset, p.data or b"")])
                elif isinstance(h, int):
                    out.append(self._read_range(p, None, h))
                else:
                    out.append(self._read_range(p, h, _fileno(h)))
            return out
        finally:
            for h in handles:
                if isinstance(h, int):
                    os.close(h)
                elif h is not None:
                    h.close()

    def _chunk(self, offset: int, data: bytes | memoryview) -> _Chunk:
        digest = self.digester.digest(data)
        if self.dict.get(digest) is not None:
            return offset, len(data), digest, None, False  # known: no need to compress it
        payload, compressed = codec.compress(self.compressor, data)
        return offset, len(data), digest, payload, compressed

    def _read_range(self, p: _Piece, f: BinaryIO | None, fd: int) -> list[_Chunk]:
        """The chunks of a file range, holes skipped; the file must end where its node says.

        ``fd`` is -1 for a file object without one (then ``f`` is read), ``f`` None for a
        file the worker opened itself. One ``pread`` per chunk into a new bytes object,
        which is also the payload of a chunk stored raw (no copy); the last chunk of the
        file asks for one byte more, and a short read is the end of the file.
        """
        node, cs, end = p.node, self.chunk_size, p.offset + p.size
        src = node.open_data
        sparse = not isinstance(src, PathData) or src.maybe_sparse
        extents = _data_extents(fd, node.size, p.offset, end) if fd >= 0 and sparse else None
        out: list[_Chunk] = []
        last = -1
        for off in range(p.offset, end, cs):
            n = min(cs, end - off)
            if extents is not None and _in_hole(extents, off, off + n):
                continue
            want = n + (off + n == node.size)  # one byte more at the end: did it grow?
            data = _read_at(f, fd, off, want)
            if 0 < len(data) < n:  # a short read before the end: read on
                parts = [data]
                got = len(data)
                while got < n and (more := _read_at(f, fd, off + got, want - got)):
                    parts.append(more)
                    got += len(more)
                data = b"".join(parts)
            if len(data) < n:
                raise FormatError(
                    f"{node.path!r} shrank while it was being read ({len(data)} of {n} bytes)"
                )
            if len(data) > n:
                raise FormatError(f"{node.path!r} grew while it was being read")
            out.append(self._chunk(off, data))
            last = off + n
        if end == node.size and last != end and _read_at(f, fd, end, 1):
            raise FormatError(f"{node.path!r} grew while it was being read")
        return out

    def _queue(self, p: _Piece) -> None:
        b = self._batch
        if not b.pieces or b.pieces[-1].node is not p.node:
            b.files += 1
        b.pieces.append(p)
        b.size += p.size
        if b.size >= _BATCH_BYTES or b.files >= _BATCH_FILES:
            self._submit()

    def _submit(self) -> None:
        b = self._batch
        if not b.pieces:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="chunk")
        b.future = self._pool.submit(self._process, b.pieces)
        self._window.append(b)
        self._batch = _Batch()
        while len(self._window) > self._limit:
            self._place_batch(self._window.popleft())

    def add_files(self, nodes: Iterable[Node]) -> int:
        """Chunk every node's data (opened through ``open_data`` on the pool), in order; sets
        ``node.chunks`` once placed. Returns the bytes read (holes are not read)."""
        before = self.bytes_in
        for node in nodes:
            self._add_source(node)
        self.flush()
        return self.bytes_in - before

    def _add_source(self, node: Node) -> int:
        """Queue a file in ranges of about a batch; the pool opens and reads them."""
        if node.open_data is None:
            raise FormatError(f"no data source for {node.path!r}")
        node.chunks = []
        step = max(self.chunk_size, _BATCH_BYTES)
        for off in range(0, node.size or 1, step):  # an empty file: checked it is still empty
            self._queue(_Piece(node, off, min(step, node.size - off), None, False))
        return node.size

    def add_file(
        self,
        node: Node,
        pieces: Iterable[tuple[int, bytes]],
        *,
        deferred: bool = False,
    ) -> int:
        """Queue a file's chunks; ``node.chunks`` is complete after :meth:`flush`.

        ``pieces`` are (file offset, data) for every chunk that is not a hole, in file order,
        each ``chunk_size`` bytes at a multiple of it (the last may be shorter). The data is
        digested later on the pool: it must not change once yielded. Returns the bytes read.
        """
        node.chunks = []
        total = 0
        for off, data in pieces:
            total += len(data)
            self._queue(_Piece(node, off, len(data), data, deferred))
        return total

    def _place_batch(self, b: _Batch) -> None:
        assert b.future is not None
        for p, chunks in zip(b.pieces, b.future.result(), strict=True):
            for c in chunks:
                self._place(p.node, p.deferred, c)

    def _place(self, node: Node, deferred: bool, c: _Chunk) -> None:
        foff, size, digest, payload, compressed = c
        assert node.chunks is not None
        self.bytes_in += size
        hit = self.dict.get(digest)
        if self._on_chunk is not None:
            self._on_chunk(size, hit is not None and hit.uncompressed_size == size)
        if hit is not None and hit.uncompressed_size == size:
            self.deduped += 1
            node.chunks.append(_at(hit, foff))
            if hit.blob_index == _DEFERRED:
                self._dnodes[id(node)] = node
            return
        if payload is None:  # only when a digest collides with a chunk of another size
            raise FormatError(f"chunk digest {digest.hex()} names chunks of two sizes")
        if len(self._ci) + len(self._dci) >= v6.MAX_CHUNKS_PER_BLOB:
            raise FormatError("blob would hold more than 2^24 chunks; raise --chunk-size")
        pad = b"\0" * (-len(payload) % BLOCK) if self._aligned else b""
        # Uncompressed blobs keep chunks at their uncompressed offsets (the padding above),
        # so the blob file itself is a valid EROFS blob device.
        if deferred:
            if self._spool is None:
                self._spool = tempfile.TemporaryFile(  # noqa: SIM115 - closed in close()
                    prefix="nydus-spool-", dir=self._spool_dir
                )
            blob_index, cis, digests = _DEFERRED, self._dci, self._ddigests
            coff, uoff = self._dpos, self._dupos
            self._spool.write(payload)
            self._spool.write(pad)
            self._dpos += len(payload) + len(pad)
            self._dupos += size + (-size % BLOCK)
            self._dnodes[id(node)] = node
        else:
            blob_index, cis, digests = self.blob_index, self._ci, self._digests
            coff, uoff = self._pos, self._upos
            self._write(payload)
            if pad:
                self._write(pad)
            self._upos += size + (-size % BLOCK)
        ref = ChunkInfo(
            digest, blob_index, len(cis), foff, coff, len(payload), uoff, size, compressed
        )
        cis.append(bm.CiEntry(coff, len(payload), uoff, size, compressed))
        digests.append(digest)
        self.dict.add(ref)
        node.chunks.append(ref)

    def _merge_deferred(self) -> None:
        """Append the spooled region after the direct one and renumber its references."""
        if self._spool is None:
            return
        base_i, base_c, base_u = len(self._ci), self._pos, self._upos
        self._spool.seek(0)
        while piece := self._spool.read(1 << 20):
            self._write(piece)
        self._spool.close()
        self._spool = None
        for e in self._dci:
            self._ci.append(
                bm.CiEntry(
                    e.compressed_offset + base_c,
                    e.compressed_size,
                    e.uncompressed_offset + base_u,
                    e.uncompressed_size,
                    e.compressed,
                )
            )
        self._digests.extend(self._ddigests)
        self._upos += self._dupos
        bi = self.blob_index
        for node in self._dnodes.values():
            assert node.chunks is not None
            node.chunks = [
                ChunkInfo(
                    c.digest,
                    bi,
                    c.index + base_i,
                    c.file_offset,
                    c.compressed_offset + base_c,
                    c.compressed_size,
                    c.uncompressed_offset + base_u,
                    c.uncompressed_size,
                    c.compressed,
                    c.crc32,
                )
                if c.blob_index == _DEFERRED
                else c
                for c in node.chunks
            ]
        self._dci, self._ddigests, self._dnodes = [], [], {}

    # ------------------------------------------------------------------ trailer

    @property
    def chunk_count(self) -> int:
        return len(self._ci) + len(self._dci)

    def finish(
        self, inline_bootstrap: Callable[[v6.BlobEntry], bytes] | None = None
    ) -> BlobResult | None:
        """Write the blob trailer; None (and nothing written) when no chunk is new.

        With ``inline_bootstrap`` the bootstrap (built by that function from this
        blob's final table entry) is stored in the blob as ``image.boot``. Places pending
        chunks first; stops the pool.
        """
        self.close_pool()
        self._merge_deferred()
        if not self._ci:
            return None
        toc: list[bm.TocEntry] = []
        data_size = self._pos
        self._write(bm.tar_header(bm.TOC_ENTRY_BLOB_RAW, data_size))
        toc.append(
            bm.TocEntry(
                bm.TOC_FLAG_COMPRESSION_NONE,
                bm.TOC_ENTRY_BLOB_RAW,
                self._blob_hash().copy().digest(),
                data_size,
                data_size,
                self._upos,
            )
        )

        ci_raw = b"".join(bm.pack_ci_v1(e) for e in self._ci)
        ci_data, ci_compressed = codec.compress(self.compressor, ci_raw)
        ci_comp = self.compressor if ci_compressed else codec.compressor_by_name("none")
        features = (
            v6.BLOB_FEATURE_ALIGNED
            | v6.BLOB_FEATURE_INLINED_CHUNK_DIGEST
            | v6.BLOB_FEATURE_HAS_TAR_HEADER
            | v6.BLOB_FEATURE_HAS_TOC
            | v6.BLOB_FEATURE_CAP_TAR_TOC
            | (v6.BLOB_FEATURE_INLINED_FS_META if inline_bootstrap else 0)
        )
        ci_off = self._pos
        header = bm.CiHeader(
            features, ci_comp.id, len(self._ci), ci_off, len(ci_data), len(ci_raw)
        ).pack()
        self._write(ci_data)
        self._write(header)
        self._write(bm.tar_header(bm.TOC_ENTRY_BLOB_META, len(ci_data) + len(header)))
        toc.append(
            bm.TocEntry(
                bm.TOC_COMPRESSION.get(ci_comp.name, 1),
                bm.TOC_ENTRY_BLOB_META,
                hashlib.sha256(ci_raw).digest(),
                ci_off,
                len(ci_data),
                len(ci_raw),
            )
        )
        toc.append(
            bm.TocEntry(
                bm.TOC_FLAG_COMPRESSION_NONE,
                bm.TOC_ENTRY_BLOB_META_HEADER,
                hashlib.sha256(header).digest(),
                ci_off + len(ci_data),
                len(header),
                len(header),
            )
        )

        # upstream leaves the digest array out of the blob id
        self._raw_section(toc, bm.TOC_ENTRY_BLOB_DIGEST, b"".join(self._digests), hashed=False)

        entry = v6.BlobEntry(
            blob_id=self._blob_hash().hexdigest(),
            blob_index=self.blob_index,
            chunk_size=self.chunk_size,
            chunk_count=len(self._ci),
            compression_algo=self.compressor.id,
            digest_algo=self.digester.id,
            features=features,
            compressed_size=0,
            uncompressed_size=self._upos,
            ci_compressor=ci_comp.id,
            ci_offset=ci_off,
            ci_compressed_size=len(ci_data),
            ci_uncompressed_size=len(ci_raw),
        )
        if inline_bootstrap is not None:
            # The blob id covers everything before the bootstrap; the ToC digest stays
            # zero because the bootstrap inside the blob cannot hold its own hash.
            toc_len = (len(toc) + 1) * bm.TOC_ENTRY_SIZE + bm.TAR_BLOCK
            entry.blob_toc_size = toc_len
            boot_len = len(inline_bootstrap(entry))
            entry.compressed_size = self._pos + boot_len + bm.TAR_BLOCK + toc_len
            boot = inline_bootstrap(entry)
            assert len(boot) == boot_len
            self._raw_section(toc, bm.TOC_ENTRY_BOOTSTRAP, boot)
        toc_bytes = b"".join(e.pack() for e in toc)
        toc_hdr = bm.tar_header(bm.TOC_ENTRY_BLOB_TOC, len(toc_bytes))
        self._write(toc_bytes)
        self._write(toc_hdr)
        if inline_bootstrap is None:
            entry.blob_id = self._blob_hash().hexdigest()
            entry.compressed_size = self._pos
            entry.blob_toc_size = len(toc_bytes) + len(toc_hdr)
            entry.blob_toc_digest = hashlib.sha256(toc_bytes + toc_hdr).digest()
        assert entry.compressed_size == self._pos
        self._sync()  # every byte is in ``out`` before the caller closes it
        return BlobResult(entry, len(self._ci), self.deduped, data_size)

    def _raw_section(
        self, toc: list[bm.TocEntry], name: str, data: bytes, hashed: bool = True
    ) -> None:
        """Append ``data`` uncompressed with its tar header and list it in ``toc``."""
        off = self._pos
        self._write(data, hashed)
        self._write(bm.tar_header(name, len(data)))
        digest = hashlib.sha256(data).digest()
        toc.append(
            bm.TocEntry(bm.TOC_FLAG_COMPRESSION_NONE, name, digest, off, len(data), len(data))
        )


_O_READ = os.O_RDONLY | os.O_CLOEXEC
_o_noatime = getattr(os, "O_NOATIME", 0)  # dropped after the first EPERM (not the owner)


def _open_range(p: _Piece) -> int | BinaryIO:
    """Open a piece's file (a bare fd for a :class:`PathData` file) with a hint to read its
    range ahead."""
    global _o_noatime
    src = p.node.open_data
    if src is None:
        raise FormatError(f"no data source for {p.node.path!r}")
    if isinstance(src, PathData):
        try:
            fd = os.open(src.path, _O_READ | _o_noatime)
        except PermissionError:
            if not _o_noatime:
                raise
            _o_noatime = 0
            fd = os.open(src.path, _O_READ)
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, p.offset, p.size, os.POSIX_FADV_WILLNEED)
        return fd
    f: BinaryIO = src()  # type: ignore[assignment]
    with contextlib.suppress(AttributeError, OSError, ValueError):
        os.posix_fadvise(f.fileno(), p.offset, p.size, os.POSIX_FADV_WILLNEED)
    return f


def _fileno(f: BinaryIO) -> int:
    try:
        return f.fileno()
    except (AttributeError, OSError, ValueError):
        return -1


def _read_at(f: BinaryIO | None, fd: int, off: int, n: int) -> bytes:
    if fd >= 0:
        return os.pread(fd, n, off)
    assert f is not None
    f.seek(off)
    return f.read(n) or b""


def _at(ref: ChunkInfo, foff: int) -> ChunkInfo:
    if ref.file_offset == foff:
        return ref
    return ChunkInfo(
        ref.digest,
        ref.blob_index,
        ref.index,
        foff,
        ref.compressed_offset,
        ref.compressed_size,
        ref.uncompressed_offset,
        ref.uncompressed_size,
        ref.compressed,
        ref.crc32,
    )
