"""FUSE wire structs: sizes and layouts as in include/uapi/linux/fuse.h (7.45)."""

from __future__ import annotations

import struct

from nydus.fuse import protocol as p


def test_struct_sizes_match_the_kernel() -> None:
    sizes = {
        "IN_HEADER": 40,
        "OUT_HEADER": 16,
        "INIT_IN": 64,
        "INIT_OUT": 64,
        "ATTR": 88,
        "OPEN_OUT": 16,
        "READ_IN": 40,
        "RELEASE_IN": 24,
        "KSTATFS": 80,
        "DIRENT_HEAD": 24,
        "BATCH_FORGET_IN": 8,
        "FORGET_ONE": 16,
        "GETXATTR_IN": 8,
        "LSEEK_IN": 24,
    }
    for name, size in sizes.items():
        assert getattr(p, name).size == size, name
    assert p.ENTRY_OUT_SIZE == 128 and p.ATTR_OUT_SIZE == 104


def test_ioctl_numbers() -> None:
    # _IOR(229, 0, uint32_t), _IOW(229, 1, struct fuse_backing_map), _IOW(229, 2, uint32_t)
    def ioc(direction: int, nr: int, size: int) -> int:
        return (direction << 30) | (size << 16) | (229 << 8) | nr

    assert ioc(2, 0, 4) == p.FUSE_DEV_IOC_CLONE
    assert ioc(1, 1, 16) == p.FUSE_DEV_IOC_BACKING_OPEN
    assert ioc(1, 2, 4) == p.FUSE_DEV_IOC_BACKING_CLOSE


def test_init_in_merges_flags2_only_with_init_ext() -> None:
    body = struct.pack("<IIIII44x", 7, 45, 131072, p.InitFlags.INIT_EXT | 1, 1 << 5)
    ii = p.InitIn.unpack(body)
    assert (ii.major, ii.minor, ii.max_readahead) == (7, 45, 131072)
    assert ii.flags & p.InitFlags.PASSTHROUGH and ii.flags & p.InitFlags.ASYNC_READ
    no_ext = p.InitIn.unpack(struct.pack("<IIIII44x", 7, 45, 0, 1, 1 << 5))
    assert not no_ext.flags & p.InitFlags.PASSTHROUGH
    old = p.InitIn.unpack(struct.pack("<IIII", 7, 31, 0, 3))
    assert (old.minor, old.flags) == (31, 3)


def test_init_out_field_offsets() -> None:
    raw = p.INIT_OUT.pack(7, 45, 1, 2, 3, 4, 5, 6, 256, 0, 1 << 5, 1, 0)
    assert struct.unpack_from("<H", raw, 28)[0] == 256  # max_pages
    assert struct.unpack_from("<I", raw, 32)[0] == 1 << 5  # flags2
    assert struct.unpack_from("<I", raw, 36)[0] == 1  # max_stack_depth


def test_dirents_are_8_byte_aligned() -> None:
    d = p.pack_dirent(5, 3, 8, b"abc")
    assert len(d) == p.dirent_size(3) == 32
    ino, off, namelen, typ = p.DIRENT_HEAD.unpack_from(d)
    assert (ino, off, namelen, typ) == (5, 3, 3, 8)
    assert d[24:27] == b"abc" and d[27:] == b"\0" * 5
    attr = p.pack_attr(p.AttrFields(5, 1, 1, 0, 0, 0, 0, 0, 0, 0o100644, 1, 0, 0, 0))
    e = p.pack_entry_out(5, 0, 1.5, 2.0, attr)
    assert len(e) == 128
    nodeid, _gen, ev, av, evn, avn = p.ENTRY_OUT_HEAD.unpack_from(e)
    assert (nodeid, ev, av, evn, avn) == (5, 1, 2, 500_000_000, 0)
    dp = p.pack_direntplus(e, 5, 3, 8, b"x" * 9)
    assert len(dp) == p.direntplus_size(9) == 128 + 24 + 16


def test_helpers() -> None:
    assert p.split_cstring(b"name\0junk") == b"name"
    assert p.split_cstring(b"noterm") == b"noterm"
    assert p.opcode_name(15) == "READ" and p.opcode_name(999) == "OP_999"
    assert p.pack_out_header(16, -2, 9) == struct.pack("<IiQ", 16, -2, 9)
