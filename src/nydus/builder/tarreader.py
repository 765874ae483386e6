"""A strict, streaming reader of tar archives as OCI layers use them.

Why not :mod:`tarfile`: in stream mode it keeps every member in memory and cannot read
sparse members. This reader keeps only the current entry, reads each header once, and
understands every dialect layers use:

- ustar (``prefix``/``name``), old V7, GNU (``././@LongLink`` names and link targets of type
  ``L``/``K``, base-256 numbers, old GNU sparse files of type ``S`` with extension blocks);
- PAX extended (``x``) and global (``g``) headers: ``path``, ``linkpath``, ``size``, ``uid``,
  ``gid``, ``mtime`` (nanoseconds kept), ``SCHILY.xattr.*``, ``LIBARCHIVE.xattr.*``
  (URL-encoded name, base64 value), ``SCHILY.acl.access``/``default`` (text ACLs, turned into
  the binary ``system.posix_acl_*`` xattrs), ``SCHILY.devmajor``/``devminor``, and the GNU PAX
  sparse formats 0.0, 0.1 and 1.0.

Every header checksum is verified; numbers, PAX records and sparse maps are validated; sizes
of metadata held in memory (PAX and long-name data, sparse maps) are capped by
:class:`TarLimits`. Anything malformed is a :class:`~nydus.errors.FormatError` naming the
byte offset. Names are returned raw (bytes); :mod:`.tarsource` normalises them.

Single-threaded: a reader and its stream belong to one build.
"""

from __future__ import annotations

import base64
import binascii
import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import FormatError, UnsupportedError
from .tarstream import LayerStream

__all__ = ["TarEntry", "TarLimits", "TarReader", "acl_from_text"]

log = logging.getLogger(__name__)

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)

# entry kinds
REG, HARDLINK, SYMLINK, CHR, BLK, DIR, FIFO = (
    "reg",
    "hardlink",
    "symlink",
    "chr",
    "blk",
    "dir",
    "fifo",
)
_KINDS = {
    b"0": REG,
    b"\0": REG,
    b"7": REG,
    b"S": REG,
    b"1": HARDLINK,
    b"2": SYMLINK,
    b"3": CHR,
    b"4": BLK,
    b"5": DIR,
    b"D": DIR,
    b"6": FIFO,
}


@dataclass
class TarLimits:
    """Bounds that keep a hostile layer from costing unbounded memory or time."""

    max_entries: int = 2_000_000  # entries per layer (about 1.2 KiB of memory each at peak)
    max_path: int = 4096  # bytes in a path or hardlink target (Linux PATH_MAX)
    max_meta: int = 1 << 20  # bytes of one PAX header or GNU long name kept in memory
    max_trailing: int = 16 << 20  # bytes after the end-of-archive marker
    max_sparse_segments: int = 1 << 20  # data segments of one sparse file
    max_sparse_chunks: int = 1 << 22  # chunk slots a sparse file's apparent size may need
    max_xattr_bytes: int = 64 << 10  # xattr names + values of one entry
    # bytes of file data the entries of one layer carry (checked at each header, before any of
    # them is read); None: no bound (an image layer's files are as large as they are)
    max_file_bytes: int | None = None


@dataclass(slots=True)
class TarEntry:
    """One file-system entry of the archive, extended headers applied."""

    name: bytes
    kind: str  # REG, HARDLINK, SYMLINK, CHR, BLK, DIR or FIFO
    mode: int  # permission bits, 0o7777
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    size: int  # file size (apparent size of a sparse file); 0 for non-files
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    sparse: list[tuple[int, int]] | None = None  # (offset, length) data segments
    offset: int = 0  # archive offset of the header, for messages


# --------------------------------------------------------------------------- numbers


def _num(field_: bytes, what: str, at: int, signed: bool = False) -> int:
    """A numeric header field: octal text, or GNU base-256 when the top bit is set."""
    if field_ and field_[0] & 0x80:
        if field_[0] == 0xFF:
            v = int.from_bytes(field_, "big", signed=True)
            if v < 0 and not signed:
                raise FormatError(f"tar header at {at}: negative {what}")
            return v
        return int.from_bytes(bytes([field_[0] & 0x7F]) + field_[1:], "big")
    text = field_.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if text.strip(b"01234567"):
        raise FormatError(f"tar header at {at}: {what} field {field_!r} is not octal")
    return int(text, 8)


def _decimal(value: bytes, what: str, at: int) -> int:
    if not value or not value.isdigit() or len(value) > 30:
        raise FormatError(f"tar entry at {at}: PAX {what} {value[:40]!r} is not a number")
    return int(value)


def _pax_time(value: bytes, at: int) -> tuple[int, int]:
    """(seconds, nanoseconds) of a PAX time like ``1700000000.123456789`` or ``-1.5``."""
    neg = value.startswith(b"-")
    body = value[1:] if neg else value
    sec_s, dot, frac_s = body.partition(b".")
    if not sec_s.isdigit() or len(sec_s) > 20 or (dot and frac_s and not frac_s.isdigit()):
        raise FormatError(f"tar entry at {at}: PAX time {value[:40]!r} is malformed")
    sec = int(sec_s)
    nsec = int((frac_s + b"000000000")[:9]) if frac_s else 0
    if neg:
        sec, nsec = -sec, -nsec
        if nsec:
            sec, nsec = sec - 1, nsec + 1_000_000_000
    return sec, nsec


# --------------------------------------------------------------------------- PAX


def _pax_records(data: bytes, at: int) -> list[tuple[bytes, bytes]]:
    """``"%d %s=%s\\n"`` records in order (keys may repeat: GNU sparse 0.0)."""
    out: list[tuple[bytes, bytes]] = []
    pos = 0
    n = len(data)
    while pos < n:
        if data[pos] == 0:  # NUL padding some writers leave at the end
            if data.count(0, pos) != n - pos:
                raise FormatError(f"tar entry at {at}: garbage after PAX records")
            break
        sp = data.find(b" ", pos, pos + 21)
        if sp < 0 or not data[pos:sp].isdigit():
            raise FormatError(f"tar entry at {at}: malformed PAX record length")
        length = int(data[pos:sp])
        end = pos + length
        if length < sp - pos + 3 or end > n or data[end - 1] != 0x0A:
            raise FormatError(f"tar entry at {at}: PAX record length {length} is wrong")
        key, eq, value = data[sp + 1 : end - 1].partition(b"=")
        if not eq or not key:
            raise FormatError(f"tar entry at {at}: PAX record without key=value")
        out.append((key, value))
        pos = end
    return out


def _url_unquote(name: bytes, at: int) -> bytes:
    out = bytearray()
    i = 0
    while i < len(name):
        c = name[i]
        if c == 0x25:  # %
            try:
                out.append(int(name[i + 1 : i + 3], 16))
            except ValueError:
                raise FormatError(f"tar entry at {at}: bad %-escape in xattr name") from None
            i += 3
        else:
            out.append(c)
            i += 1
    return bytes(out)


# --------------------------------------------------------------------------- ACLs

_ACL_TAGS = {
    b"user": 0x01,
    b"u": 0x01,
    b"group": 0x04,
    b"g": 0x04,
    b"mask": 0x10,
    b"m": 0x10,
    b"other": 0x20,
    b"o": 0x20,
}
_ACL_UNDEFINED = 0xFFFFFFFF


def acl_from_text(text: bytes) -> bytes:
    """Text POSIX ACL (``user::rw-,user:1000:r--,...``, as tar stores it) to the binary
    ``system.posix_acl_*`` xattr value (version 2, entries sorted as the kernel wants).
    Raises ValueError for malformed text and for user or group names (numeric ids only)."""
    entries: list[tuple[int, int, int]] = []
    for raw in text.replace(b"\n", b",").split(b","):
        item = raw.split(b"#", 1)[0].strip()
        if not item:
            continue
        parts = item.split(b":")
        if len(parts) != 3:
            raise ValueError(f"ACL entry {item!r} is not tag:qualifier:perms")
        tag_s, qual, perms = parts
        tag = _ACL_TAGS.get(tag_s)
        if tag is None:
            raise ValueError(f"unknown ACL tag {tag_s!r}")
        if len(perms) != 3 or any(c not in b"rwx-" for c in perms):
            raise ValueError(f"bad ACL permissions {perms!r}")
        perm = sum(b for c, b in zip(perms, (4, 2, 1), strict=True) if c != ord("-"))
        if qual:
            if tag not in (0x01, 0x04):
                raise ValueError(f"ACL entry {item!r} cannot have a qualifier")
            if not qual.isdigit() or int(qual) >= _ACL_UNDEFINED:
                raise ValueError(f"ACL qualifier {qual!r} is not a numeric id")
            tag <<= 1  # ACL_USER 0x02, ACL_GROUP 0x08
            qid = int(qual)
        else:
            qid = _ACL_UNDEFINED
        entries.append((tag, qid, perm))
    entries.sort()
    tags = [t for t, _q, _p in entries]
    if any(tags.count(t) != 1 for t in (0x01, 0x04, 0x20)) or tags.count(0x10) > 1:
        raise ValueError("ACL needs exactly one user::, group:: and other:: entry")
    if (0x02 in tags or 0x08 in tags) and 0x10 not in tags:
        raise ValueError("ACL with named entries needs a mask:: entry")
    if len(set(entries)) != len(entries) or len({(t, q) for t, q, _ in entries}) != len(entries):
        raise ValueError("ACL lists an entry twice")
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, q) for t, q, p in entries)


# --------------------------------------------------------------------------- reader


@dataclass
class _Header:
    at: int
    name: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    typeflag: bytes
    linkname: bytes
    devmajor: int
    devminor: int
    gnu: bool
    block: bytes


class TarReader:
    """Iterate a layer's entries; read a regular file's data with :meth:`chunks`.

    The data of an entry that is not read (or not read to the end) is skipped when the next
    entry is asked for. After the iteration, :attr:`entries` counts headers and the stream is
    drained to its end (its ``diff_id`` is then complete).
    """

    def __init__(self, stream: LayerStream, limits: TarLimits | None = None) -> None:
        self.s = stream
        self.limits = limits or TarLimits()
        self._left = 0  # archive data bytes of the current entry not consumed yet
        self._pad = 0
        self._global: list[tuple[bytes, bytes]] = []
        self.entries = 0
        self.file_bytes = 0  # file data bytes declared by the headers so far
        self._warned: set[str] = set()

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", msg)

    # ------------------------------------------------------------------ headers

    def _finish_entry(self) -> None:
        if self._left or self._pad:
            self.s.skip(self._left + self._pad, "file data")
            self._left = self._pad = 0

    def _header(self, block: bytes, at: int) -> _Header:
        stored = _num(block[148:156], "checksum", at)
        unsigned = sum(block[:148]) + 256 + sum(block[156:])
        if stored != unsigned:
            signed = unsigned - 256 * (
                sum(1 for b in block[:148] if b & 0x80) + sum(1 for b in block[156:] if b & 0x80)
            )
            if stored != signed:
                raise FormatError(f"tar header at {at}: checksum mismatch (corrupt or not a tar)")
        magic = block[257:263]
        gnu = magic == b"ustar " and block[263:265] == b" \0"
        posix = magic == b"ustar\0"
        if not (gnu or posix or magic == b"\0" * 6):
            raise FormatError(f"tar header at {at}: unknown format magic {magic!r}")
        name = block[0:100].split(b"\0", 1)[0]
        if posix and block[345] != 0:
            name = block[345:500].split(b"\0", 1)[0] + b"/" + name
        size = _num(block[124:136], "size", at)
        return _Header(
            at=at,
            name=name,
            mode=_num(block[100:108], "mode", at) & 0o7777,
            uid=_num(block[108:116], "uid", at),
            gid=_num(block[116:124], "gid", at),
            size=size,
            mtime=_num(block[136:148], "mtime", at, signed=True),
            typeflag=block[156:157],
            linkname=block[157:257].split(b"\0", 1)[0],
            devmajor=_num(block[329:337], "devmajor", at) if (gnu or posix) else 0,
            devminor=_num(block[337:345], "devminor", at) if (gnu or posix) else 0,
            gnu=gnu,
            block=block,
        )

    def _meta(self, h: _Header, what: str) -> bytes:
        if h.size > self.limits.max_meta:
            raise FormatError(
                f"tar entry at {h.at}: {what} of {h.size} bytes exceeds {self.limits.max_meta}"
            )
        data = self.s.read_exact(h.size, what)
        self.s.skip(-h.size % BLOCK, what)
        return data

    def __iter__(self) -> Iterator[TarEntry]:
        local: list[tuple[bytes, bytes]] = []
        longname: bytes | None = None
        longlink: bytes | None = None
        while True:
            self._finish_entry()
            at = self.s.pos
            block = self.s.read(BLOCK)
            if not block:
                if local or longname is not None or longlink is not None:
                    raise FormatError(f"tar stream ends after an extended header (at {at})")
                break  # no end-of-archive marker: accepted, as GNU tar does
            if len(block) < BLOCK:
                raise FormatError(f"tar stream truncated in a header (at {at})")
            if block == ZERO_BLOCK:
                break
            h = self._header(block, at)
            tf = h.typeflag
            if tf == b"x":
                local += _pax_records(self._meta(h, "PAX header"), at)
                continue
            if tf == b"g":
                self._global += _pax_records(self._meta(h, "PAX global header"), at)
                continue
            if tf == b"L":
                longname = self._meta(h, "GNU long name").split(b"\0", 1)[0]
                continue
            if tf == b"K":
                longlink = self._meta(h, "GNU long link name").split(b"\0", 1)[0]
                continue
            if tf == b"V":  # GNU volume label: no file
                self._left, self._pad = h.size, -h.size % BLOCK
                continue
            if tf in (b"M", b"N"):
                raise UnsupportedError(
                    f"tar entry at {at}: GNU {'multi-volume' if tf == b'M' else 'old long-name'}"
                    f" entries are not supported"
                )
            self.entries += 1
            if self.entries > self.limits.max_entries:
                raise FormatError(f"tar layer has more than {self.limits.max_entries} entries")
            entry = self._entry(h, self._global + local, longname, longlink)
            local, longname, longlink = [], None, None
            self.file_bytes += self._left
            cap = self.limits.max_file_bytes
            if cap is not None and self.file_bytes > cap:
                raise FormatError(
                    f"tar entry at {at}: the layer's files hold more than {cap} bytes of data"
                )
            yield entry
        self._finish_entry()
        self.s.drain(self.limits.max_trailing)
        if self.s.trailing_nonzero:
            self._warn_once("trailing", "data after the tar end-of-archive marker is ignored")

    # ------------------------------------------------------------------ entries

    def _entry(
        self,
        h: _Header,
        pax: list[tuple[bytes, bytes]],
        longname: bytes | None,
        longlink: bytes | None,
    ) -> TarEntry:
        at = h.at
        kind = _KINDS.get(h.typeflag)
        if kind is None:
            self._warn_once(
                f"type{h.typeflag!r}",
                f"tar entry type {h.typeflag!r} is unknown: read as a regular file "
                f"(as GNU tar does)",
            )
            kind = REG
        name = longname if longname is not None else h.name
        linkname = longlink if longlink is not None else h.linkname
        stored = h.size
        uid, gid, mtime, nsec = h.uid, h.gid, h.mtime, 0
        devmajor, devminor = h.devmajor, h.devminor
        xattrs: dict[bytes, bytes] = {}
        acls: dict[bytes, bytes] = {}
        sp_size: int | None = None
        sp_major: int | None = None
        sp_name: bytes | None = None
        sp_map: list[int] = []
        for key, value in pax:
            if key == b"path":
                name = value
            elif key == b"linkpath":
                linkname = value
            elif key == b"size":
                stored = _decimal(value, "size", at)
            elif key == b"uid":
                uid = _decimal(value, "uid", at)
            elif key == b"gid":
                gid = _decimal(value, "gid", at)
            elif key == b"mtime":
                mtime, nsec = _pax_time(value, at)
            elif key.startswith(b"SCHILY.xattr."):
                xattrs[key[13:]] = value
            elif key.startswith(b"LIBARCHIVE.xattr."):
                try:
                    padded = value + b"=" * (-len(value) % 4)  # libarchive omits the padding
                    xattrs[_url_unquote(key[17:], at)] = base64.b64decode(padded, validate=True)
                except binascii.Error:
                    raise FormatError(f"tar entry at {at}: bad base64 in {key!r}") from None
            elif key in (b"SCHILY.acl.access", b"SCHILY.acl.default"):
                acls[b"system.posix_acl_" + key[11:]] = value
            elif key == b"SCHILY.devmajor":
                devmajor = _decimal(value, "devmajor", at)
            elif key == b"SCHILY.devminor":
                devminor = _decimal(value, "devminor", at)
            elif key in (b"GNU.sparse.size", b"GNU.sparse.realsize"):
                sp_size = _decimal(value, "sparse size", at)
            elif key == b"GNU.sparse.major":
                sp_major = _decimal(value, "sparse major", at)
            elif key == b"GNU.sparse.name":
                sp_name = value
            elif key == b"GNU.sparse.map":
                sp_map = [_decimal(v, "sparse map", at) for v in value.split(b",")] if value else []
                self._sparse_cap(len(sp_map) // 2, at)
            elif key in (b"GNU.sparse.offset", b"GNU.sparse.numbytes"):
                sp_map.append(_decimal(value, "sparse map", at))
                self._sparse_cap(len(sp_map) // 2, at)
        for acl_key, text in acls.items():
            if acl_key in xattrs:
                continue  # the binary form came too (GNU tar --xattrs --acls)
            try:
                xattrs[acl_key] = acl_from_text(text)
            except ValueError as e:
                self._warn_once(f"acl{at}", f"tar entry at {at}: ACL dropped: {e}")
        if uid > 0xFFFFFFFF or gid > 0xFFFFFFFF or uid < 0 or gid < 0:
            raise FormatError(f"tar entry at {at}: uid/gid {uid}/{gid} does not fit 32 bits")
        if mtime < 0:
            self._warn_once("mtime", "negative mtimes (before 1970) are stored as 0")
            mtime, nsec = 0, 0
        elif mtime >= 1 << 64:
            raise FormatError(f"tar entry at {at}: mtime {mtime} does not fit 64 bits")
        if sp_name is not None:
            name = sp_name
        if h.typeflag == b"\0" and name.endswith(b"/"):
            kind = DIR  # old archives mark directories by a trailing slash only
        self._left, self._pad = stored, -stored % BLOCK
        size = stored if kind == REG else 0
        sparse = None
        if kind == REG and h.typeflag == b"S":
            size, sparse = self._old_gnu_sparse(h)
        elif kind == REG and (sp_map or sp_size is not None or sp_major is not None):
            if sp_size is None:
                raise FormatError(f"tar entry at {at}: GNU sparse file without its size")
            if sp_major == 1:
                sp_map = self._sparse_map_in_data(at)
            size = sp_size
            sparse = [(sp_map[i], sp_map[i + 1]) for i in range(0, len(sp_map) - 1, 2)]
            if len(sp_map) % 2:
                raise FormatError(f"tar entry at {at}: odd number of sparse map values")
        if sparse is not None:
            self._check_sparse(sparse, size, at)
        return TarEntry(
            name=name,
            kind=kind,
            mode=h.mode,
            uid=uid,
            gid=gid,
            mtime=mtime,
            mtime_nsec=nsec,
            size=size,
            linkname=linkname,
            devmajor=devmajor,
            devminor=devminor,
            xattrs=xattrs,
            sparse=sparse,
            offset=at,
        )

    # ------------------------------------------------------------------ sparse files

    def _sparse_cap(self, n: int, at: int) -> None:
        if n > self.limits.max_sparse_segments:
            raise FormatError(
                f"tar entry at {at}: sparse map has more than "
                f"{self.limits.max_sparse_segments} segments"
            )

    def _old_gnu_sparse(self, h: _Header) -> tuple[int, list[tuple[int, int]]]:
        """(real size, segments) of a GNU ``S`` entry: 4 segments in the header, then
        21 per extension block while the "isextended" flag is set."""
        at, blk = h.at, h.block
        segs: list[tuple[int, int]] = []

        def take(buf: bytes, start: int, count: int) -> None:
            for i in range(count):
                o = start + 24 * i
                if buf[o] == 0:
                    return
                segs.append(
                    (
                        _num(buf[o : o + 12], "sparse offset", at),
                        _num(buf[o + 12 : o + 24], "sparse length", at),
                    )
                )
            self._sparse_cap(len(segs), at)

        take(blk, 386, 4)
        real = _num(blk[483:495], "sparse real size", at)
        extended = blk[482]
        while extended:
            ext = self.s.read_exact(BLOCK, "sparse header extension")
            take(ext, 0, 21)
            extended = ext[504]
        return real, segs

    def _sparse_map_in_data(self, at: int) -> list[int]:
        """GNU PAX sparse 1.0: the map is decimal lines at the start of the data, padded to
        a block: count, then offset and length per segment."""
        numbers: list[int] = []
        want: int | None = None
        buf = b""
        used = 0
        while want is None or len(numbers) < want:
            while b"\n" not in buf:
                if len(buf) > 64:
                    raise FormatError(f"tar entry at {at}: malformed sparse map")
                if self._left < BLOCK:
                    raise FormatError(f"tar entry at {at}: sparse map runs past the data")
                buf += self.s.read_exact(BLOCK, "sparse map")
                self._left -= BLOCK
                used += BLOCK
            line, _, buf = buf.partition(b"\n")
            value = _decimal(line, "sparse map", at)
            if want is None:
                self._sparse_cap(value, at)
                want = 1 + 2 * value
            numbers.append(value)
        return numbers[1:]

    def _check_sparse(self, segs: list[tuple[int, int]], size: int, at: int) -> None:
        end = 0
        total = 0
        for off, ln in segs:
            if off < end or off + ln > size:
                raise FormatError(f"tar entry at {at}: sparse segments overlap or exceed the size")
            end = off + ln
            total += ln
        if total != self._left:
            raise FormatError(
                f"tar entry at {at}: sparse segments hold {total} bytes, the archive {self._left}"
            )

    # ------------------------------------------------------------------ data

    def chunks(self, entry: TarEntry, chunk_size: int) -> Iterator[tuple[int, bytes]]:
        """(file offset, bytes) of every chunk of a regular file that is not all hole."""
        s = self.s
        if entry.sparse is None:
            off = 0
            while off < entry.size:
                n = min(chunk_size, entry.size - off)
                data = s.read_exact(n, "file data")
                self._left -= n
                yield off, data
                off += n
            return
        win = -1
        buf = bytearray()
        for seg_off, seg_len in entry.sparse:
            pos, left = seg_off, seg_len
            while left:
                k = pos // chunk_size
                if k != win:
                    if win >= 0:
                        yield win * chunk_size, bytes(buf)
                    win = k
                    buf = bytearray(min(chunk_size, entry.size - k * chunk_size))
                take = min(left, (k + 1) * chunk_size - pos)
                rel = pos - k * chunk_size
                buf[rel : rel + take] = s.read_exact(take, "sparse file data")
                self._left -= take
                pos += take
                left -= take
        if win >= 0:
            yield win * chunk_size, bytes(buf)
