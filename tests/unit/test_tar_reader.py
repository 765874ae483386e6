"""The streaming tar reader: every dialect layers use, exact values, strict failures."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from hostile_tars import end, entry, gnu_long, header, pax
from nydus.builder.tarreader import TarEntry, TarLimits, TarReader, acl_from_text
from nydus.builder.tarstream import LayerStream
from nydus.errors import FormatError


def read_all(data: bytes, limits: TarLimits | None = None) -> list[tuple[TarEntry, bytes]]:
    """Every entry with its file data reassembled (holes as zeros)."""
    with LayerStream(io.BytesIO(data)) as s:
        r = TarReader(s, limits)
        out = []
        for e in r:
            buf = bytearray(e.size)
            if e.kind == "reg":
                for off, chunk in r.chunks(e, 4096):
                    buf[off : off + len(chunk)] = chunk
            out.append((e, bytes(buf)))
    return out


def one(data: bytes) -> TarEntry:
    got = read_all(data)
    assert len(got) == 1
    return got[0][0]


def test_ustar_prefix_and_fields() -> None:
    e = one(
        entry(
            b"name.txt",
            b"abc",
            prefix=b"some/long/prefix",
            mode=0o4755,
            uid=1000,
            gid=2000,
            mtime=1234567890,
        )
        + end()
    )
    assert e.name == b"some/long/prefix/name.txt"
    assert (e.kind, e.mode, e.uid, e.gid, e.mtime, e.mtime_nsec, e.size) == (
        "reg",
        0o4755,
        1000,
        2000,
        1234567890,
        0,
        3,
    )


def test_gnu_prefix_field_is_not_a_prefix() -> None:
    # GNU headers keep atime/ctime where ustar has the prefix
    e = one(entry(b"n", fmt="gnu", patch={345: b"12345670123\0"}) + end())
    assert e.name == b"n"


def test_v7_and_old_directory_convention() -> None:
    got = read_all(entry(b"dir/", typeflag=b"\0", fmt="v7") + entry(b"f", b"x", fmt="v7") + end())
    assert [(e.name, e.kind) for e, _ in got] == [(b"dir/", "dir"), (b"f", "reg")]


def test_gnu_long_name_and_link() -> None:
    name = b"d/" + b"n" * 300
    target = b"t/" + b"x" * 400
    got = read_all(
        gnu_long(name)
        + entry(b"short", b"data", fmt="gnu")
        + gnu_long(target, b"K")
        + entry(b"ln", typeflag=b"2", fmt="gnu")
        + end()
    )
    assert got[0][0].name == name and got[0][1] == b"data"
    assert got[1][0].linkname == target and got[1][0].kind == "symlink"


def test_base256_numbers() -> None:
    e = one(entry(b"big", uid=3_000_000_000, gid=2**21 + 5, mtime=2**36, fmt="gnu") + end())
    assert (e.uid, e.gid, e.mtime) == (3_000_000_000, 2**21 + 5, 2**36)


def test_pax_overrides_and_xattrs() -> None:
    recs = [
        (b"path", b"p/" + b"q" * 200),
        (b"uid", b"4000000000"),
        (b"gid", b"3000000"),
        (b"mtime", b"1700000000.123456789"),
        (b"size", b"5"),
        (b"SCHILY.xattr.user.bin", b"\x00\xff\n=x"),
        (b"LIBARCHIVE.xattr.user.%41b", b"dmFsdWU"),  # url-encoded name, unpadded base64
        (b"SCHILY.xattr.security.capability", b"\x01\x00\x00\x02" + bytes(16)),
        (b"atime", b"1.5"),
        (b"comment", b"ignored"),
    ]
    got = read_all(pax(recs) + entry(b"short", b"12345", size=999999) + end())
    e, data = got[0]
    assert e.name == b"p/" + b"q" * 200 and data == b"12345"
    assert (e.uid, e.gid, e.mtime, e.mtime_nsec) == (4000000000, 3000000, 1700000000, 123456789)
    assert e.xattrs == {
        b"user.bin": b"\x00\xff\n=x",
        b"user.Ab": b"value",
        b"security.capability": b"\x01\x00\x00\x02" + bytes(16),
    }


def test_pax_global_header_applies_to_later_entries() -> None:
    got = read_all(pax([(b"mtime", b"42.5")], typeflag=b"g") + entry(b"a") + entry(b"b") + end())
    assert [(e.mtime, e.mtime_nsec) for e, _ in got] == [(42, 500000000)] * 2


@pytest.mark.parametrize(
    "value,expect",
    [
        (b"-1.5", (-2, 500000000)),
        (b"0.000000001", (0, 1)),
        (b"5", (5, 0)),
        (b"7.1234567891234", (7, 123456789)),
    ],
)
def test_pax_time_parsing(value: bytes, expect: tuple[int, int]) -> None:
    from nydus.builder.tarreader import _pax_time

    assert _pax_time(value, 0) == expect


def test_negative_mtime_is_clamped() -> None:
    assert one(pax([(b"mtime", b"-100")]) + entry(b"a") + end()).mtime == 0


def test_devices_and_fifo() -> None:
    got = read_all(
        entry(b"c", typeflag=b"3", devmajor=4095, devminor=1048575)
        + entry(b"b", typeflag=b"4", devmajor=8, devminor=1)
        + entry(b"p", typeflag=b"6")
        + pax([(b"SCHILY.devmajor", b"7")])
        + entry(b"c2", typeflag=b"3")
        + end()
    )
    assert [(e.kind, e.devmajor, e.devminor) for e, _ in got] == [
        ("chr", 4095, 1048575),
        ("blk", 8, 1),
        ("fifo", 0, 0),
        ("chr", 7, 0),
    ]


def test_hardlink_with_data_is_skipped_and_next_entry_read() -> None:
    got = read_all(
        entry(b"a", b"x")
        + entry(b"l", b"junk" * 300, typeflag=b"1", linkname=b"a")
        + entry(b"b", b"y")
        + end()
    )
    assert [(e.name, e.kind, d) for e, d in got] == [
        (b"a", "reg", b"x"),
        (b"l", "hardlink", b""),
        (b"b", "reg", b"y"),
    ]


def test_unread_data_is_skipped() -> None:
    r = TarReader(
        LayerStream(io.BytesIO(entry(b"a", os.urandom(10000)) + entry(b"b", b"z") + end()))
    )
    names = [e.name for e in r]  # never reads the data
    assert names == [b"a", b"b"]


def test_unknown_type_is_a_regular_file() -> None:
    e = one(entry(b"x", b"data", typeflag=b"Z") + end())
    assert e.kind == "reg" and e.size == 4


def test_signed_checksum_accepted() -> None:
    h = bytearray(header(b"\xe9t\xe9", size=0))
    signed = (
        sum(b - 256 if b & 0x80 else b for b in h[:148])
        + 256
        + sum(b - 256 if b & 0x80 else b for b in h[156:])
    )
    h[148:156] = b"%06o\0 " % signed
    assert one(bytes(h) + end()).name == b"\xe9t\xe9"


@pytest.mark.parametrize(
    "data,match",
    [
        (header(b"a", checksum=1) + end(), "checksum mismatch"),
        (header(b"a", size=100) + b"x" * 50, "truncated"),
        (header(b"a")[:300], "truncated in a header"),
        (header(b"a", patch={100: b"0x77\0"}) + end(), "not octal"),
        (pax([(b"size", b"12a")]) + entry(b"a") + end(), "not a number"),
        (pax([(b"mtime", b"1.2.3")]) + entry(b"a") + end(), "malformed"),
        (
            header(b"p", typeflag=b"x", size=10) + b"5 a=b\n".ljust(512, b"\0") + end(),
            "PAX record length",
        ),
        (
            header(b"p", typeflag=b"x", size=8) + b"8 ab=c\nX".ljust(512, b"\0") + end(),
            "garbage|PAX record",
        ),
        (pax([(b"LIBARCHIVE.xattr.user.x", b"!!!")]) + entry(b"a") + end(), "base64"),
        (entry(b"a", typeflag=b"N") + end(), "not supported"),
    ],
)
def test_malformed_is_format_error(data: bytes, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        read_all(data)


def test_limits() -> None:
    data = b"".join(entry(b"f%d" % i) for i in range(20)) + end()
    with pytest.raises(FormatError, match="more than 10 entries"):
        read_all(data, TarLimits(max_entries=10))
    with pytest.raises(FormatError, match="exceeds"):
        read_all(gnu_long(b"n" * 2000) + entry(b"x") + end(), TarLimits(max_meta=1000))
    with pytest.raises(FormatError, match="after the tar end-of-archive"):
        read_all(entry(b"x") + end() + bytes(5000), TarLimits(max_trailing=4096))


def test_max_file_bytes_is_checked_at_the_header_before_any_data() -> None:
    two = entry(b"a", b"x" * 600) + entry(b"b", b"y" * 600) + end()
    assert len(read_all(two, TarLimits(max_file_bytes=1200))) == 2
    with pytest.raises(FormatError, match="more than 1000 bytes of data"):
        read_all(two, TarLimits(max_file_bytes=1000))
    # a header that declares 2 GiB and carries none of it is refused for its size, not read
    bomb = entry(b"ok", b"z" * 10) + header(b"huge", size=2 << 30)
    with pytest.raises(FormatError, match="more than 1073741824 bytes of data"):
        read_all(bomb, TarLimits(max_file_bytes=1 << 30))
    with pytest.raises(FormatError, match="truncated"):
        read_all(bomb)  # unbounded by default: it fails only when the data is missing


def test_diff_id_covers_the_whole_uncompressed_stream() -> None:
    raw = entry(b"a", b"x" * 1000) + end() + bytes(9 * 512)  # padded to a 10 KiB record
    for blob in (raw, gzip.compress(raw), zstandard.ZstdCompressor().compress(raw)):
        s = LayerStream(io.BytesIO(blob))
        r = TarReader(s)
        list(r)
        assert s.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
        assert s.pos == len(raw)


def test_python_tarfile_pax_and_gnu_archives() -> None:
    """Archives written by another implementation (CPython's tarfile) read back exactly."""
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        buf = io.BytesIO()
        files = {
            f"dir/{'n' * (90 if fmt == tarfile.USTAR_FORMAT else 150)}{i}": os.urandom(i * 999)
            for i in range(5)
        }
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            for name, data in files.items():
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                ti.mtime = 1_600_000_000
                tf.addfile(ti, io.BytesIO(data))
        got = {e.name.decode(): d for e, d in read_all(buf.getvalue())}
        assert got == files


# --------------------------------------------------------------------------- sparse files


def _sparse_file(path: Path) -> bytes:
    """A sparse file: data at 0, 70 KiB and 3 MiB, size 5 MiB; returns its content."""
    size = 5 << 20
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in ((0, 1000), (70 << 10, 10000), (3 << 20, 5000)):
            data = os.urandom(n)
            f.seek(off)
            f.write(data)
            content[off : off + n] = data
    return bytes(content)


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar needed")
@pytest.mark.parametrize(
    "fmt,version", [("gnu", None), ("posix", "0.0"), ("posix", "0.1"), ("posix", "1.0")]
)
def test_gnu_tar_sparse_formats(tmp_path: Path, fmt: str, version: str | None) -> None:
    src = tmp_path / "src"
    src.mkdir()
    content = _sparse_file(src / "sp")
    (src / "after").write_bytes(b"next entry")
    args = ["tar", "-C", str(src), f"--format={fmt}", "--sparse", "-cf", "-", "sp", "after"]
    if version:
        args.insert(3, f"--sparse-version={version}")
    data = subprocess.run(args, check=True, capture_output=True).stdout
    r = TarReader(LayerStream(io.BytesIO(data)))
    entries = []
    for e in r:
        chunks = list(r.chunks(e, 1 << 20)) if e.kind == "reg" else []
        entries.append((e, chunks))
    (sp, chunks), (after, _) = entries
    assert sp.name == b"sp" and sp.size == len(content) and sp.sparse
    # only chunks holding data are produced: 0 (two segments) and 3 MiB
    assert [off for off, _c in chunks] == [0, 3 << 20]
    rebuilt = bytearray(len(content))
    for off, c in chunks:
        rebuilt[off : off + len(c)] = c
    assert bytes(rebuilt) == content
    assert after.name == b"after"


# --------------------------------------------------------------------------- ACLs


def test_acl_from_text_sorts_and_encodes() -> None:
    raw = acl_from_text(b"user::rw-\ngroup::r--\nother::---\nuser:1000:rwx\nmask::rwx")
    assert raw == bytes.fromhex(
        "0200000001000600ffffffff02000700e803000004000400ffffffff10000700ffffffff20000000ffffffff"
    )


@pytest.mark.parametrize(
    "text",
    [
        b"user::rw-",
        b"user:bob:rw-,user::rw-,group::r--,other::r--",
        b"user::rwz,group::r--,other::r--",
        b"user::rw-,user:5:r--,group::r--,other::r--",
    ],
)
def test_acl_from_text_rejects(text: bytes) -> None:
    with pytest.raises(ValueError):
        acl_from_text(text)


def test_schily_acl_text_becomes_xattr() -> None:
    e = one(
        pax(
            [(b"SCHILY.acl.access", b"user::rw-\nuser:1234:rw-\ngroup::r--\nmask::rw-\nother::r--")]
        )
        + entry(b"f")
        + end()
    )
    assert e.xattrs[b"system.posix_acl_access"] == acl_from_text(
        b"user::rw-,user:1234:rw-,group::r--,mask::rw-,other::r--"
    )
