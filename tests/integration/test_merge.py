"""``nydus-image merge`` and layered ``--parent-bootstrap`` builds from layer tars.

The acceptance test builds three layers (deletions, opaque directories, replaced files and
types, hardlinks across layers, xattrs), unpacks them with GNU tar into overlayfs lower
directories (OCI whiteouts turned into overlayfs ones, as a snapshotter does) and mounts them
with the kernel's overlayfs; the merged bootstrap and the --parent-bootstrap chain, mounted by
kernel EROFS, must show exactly the same tree. The other tests pin the blob-table rules that
upstream's merge applies (nydusify relies on them) and the flags' errors.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nydus.kernel_mount import mount_erofs, umount
from nydus.metadata import open_bootstrap
from treecmp import compare_trees

T0 = 1_700_000_000


@dataclass
class E:
    """One tar entry of a test layer."""

    name: str
    kind: str = "file"  # file, dir, link (hard), sym, chr, fifo
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime_ns: int = T0 * 10**9 + 123456789
    xattrs: dict[str, str] = field(default_factory=dict)
    target: str = ""
    dev: tuple[int, int] = (0, 0)


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "link": tarfile.LNKTYPE,
    "sym": tarfile.SYMTYPE,
    "chr": tarfile.CHRTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def make_tar(path: Path, entries: list[E]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.type = _TYPES[e.kind]
            ti.mode = e.mode if e.mode is not None else (0o755 if e.kind == "dir" else 0o644)
            ti.uid, ti.gid = e.uid, e.gid
            ti.mtime = e.mtime_ns // 10**9
            pax = {"mtime": f"{e.mtime_ns // 10**9}.{e.mtime_ns % 10**9:09d}"}
            pax.update({f"SCHILY.xattr.{k}": v for k, v in e.xattrs.items()})
            ti.pax_headers = pax
            ti.linkname = e.target
            ti.devmajor, ti.devminor = e.dev
            fileobj = None
            if e.kind == "file":
                ti.size = len(e.data)
                fileobj = io.BytesIO(e.data)
            tf.addfile(ti, fileobj)
    return path


def _rand(n: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def to_overlayfs(layer: list[E]) -> list[E]:
    """The same layer with overlayfs whiteouts: a 0:0 character device removes a name, the
    ``trusted.overlay.opaque=y`` xattr makes a directory opaque."""
    out: list[E] = []
    for e in layer:
        base = os.path.basename(e.name)
        parent = os.path.dirname(e.name)
        if base == ".wh..wh..opq":
            d = next(x for x in out if x.kind == "dir" and x.name.rstrip("/") == parent)
            d.xattrs = {**d.xattrs, "trusted.overlay.opaque": "y"}
        elif base.startswith(".wh."):
            out.append(E(os.path.join(parent, base[4:]), "chr", dev=(0, 0)))
        else:
            out.append(e)
    return out


def three_layers(tmp: Path, spec: str = "oci") -> list[Path]:
    d = lambda n, **kw: E(n, "dir", **kw)  # noqa: E731
    tool1, tool2 = _rand(1_500_000, 1), _rand(1_200_000, 2)
    l1 = [
        d("./", mtime_ns=T0 * 10**9),
        d("etc"),
        E("etc/passwd", data=b"root:x:0:0\n"),
        E("etc/gone", data=b"bye"),
        d("etc/conf.d"),
        E("etc/conf.d/a.conf", data=b"a=1"),
        d("usr"),
        d("usr/bin"),
        E("usr/bin/tool", data=tool1, mode=0o755),
        E("usr/bin/a", data=b"shared inode", xattrs={"user.x": "1", "trusted.t": "t"}),
        E("usr/bin/a-link", "link", target="usr/bin/a"),
        E("usr/bin/sh", "sym", target="tool"),
        d("var"),
        d("var/lib"),
        d("var/lib/app"),
        E("var/lib/app/db", data=_rand(300_000, 3)),
        d("var/cache"),
        E("var/cache/x", data=b"cached"),
        d("opq"),
        E("opq/old1", data=b"o1"),
        d("opq/sub"),
        E("opq/sub/old2", data=b"o2"),
        d("dev"),
        E("dev/null", "chr", dev=(1, 3), mode=0o666),
        E("dev/fifo", "fifo"),
        E("repl-file", data=b"will be a dir"),
        d("repl-dir"),
        E("repl-dir/inner", data=b"i"),
        d("xdir", mode=0o700, uid=1000, gid=1000, xattrs={"user.dir": "1"}),
        E("xdir/f", data=b"x", uid=3_000_000_000, gid=2_500_000),
    ]
    l2 = [
        d("./", mtime_ns=(T0 + 10) * 10**9),
        d("etc", mode=0o750),
        E("etc/.wh.gone"),
        E("etc/new", data=b"new"),
        d("opq"),
        E("opq/.wh..wh..opq"),
        E("opq/fresh", data=b"fresh"),
        d("usr"),
        d("usr/bin"),
        E("usr/bin/tool", data=tool2, mode=0o755),
        E("usr/bin/a", data=b"shared inode", xattrs={"user.x": "2"}),
        E("usr/bin/a2", "link", target="usr/bin/a"),
        d("repl-file"),
        E("repl-file/in", data=b"now inside"),
        E("repl-dir", data=b"a file now"),
        d("var"),
        E("var/.wh.cache"),
        d("xdir", mode=0o750, uid=1000, gid=1000, xattrs={"user.dir": "2"}),
    ]
    l3 = [
        d("./", mtime_ns=(T0 + 20) * 10**9),
        d("usr"),
        d("usr/bin"),
        E("usr/bin/.wh.a"),
        d("opq"),
        d("opq/sub"),
        E("opq/sub/again", data=b"again"),
        d("etc", mode=0o750),
        E("etc/gone", data=b"back again", mode=0o600),
        d("var"),
        d("var/cache"),
        E("var/cache/y", data=tool1[:5000]),
        E(".wh.repl-dir"),
        E("added", data=tool2),  # data already in layer 2: deduplicated
    ]
    layers = (l1, l2, l3) if spec == "oci" else tuple(to_overlayfs(x) for x in (l1, l2, l3))
    return [make_tar(tmp / f"l{i + 1}.tar", layer) for i, layer in enumerate(layers)]


def build(nydus_image, tar: Path, boot: Path, blobs: Path, *extra: str | Path) -> dict:  # type: ignore[no-untyped-def]
    j = boot.with_suffix(".json")
    nydus_image(
        "create",
        "-t",
        "tar-rafs",
        "--compressor",
        "none",
        "-B",
        boot,
        "-D",
        blobs,
        "-J",
        j,
        *extra,
        tar,
    )
    return json.loads(j.read_text())


def blob_devices(boot: Path, blobs: Path) -> list[str]:
    with open_bootstrap(boot) as md:
        return [str(blobs / b.blob_id) for b in md.blobs]


def unpack_for_overlay(tar: Path, dest: Path) -> None:
    """GNU tar extraction, then OCI whiteouts -> overlayfs whiteouts (as containerd does)."""
    dest.mkdir()
    subprocess.run(
        [
            "tar",
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "-xpf",
            str(tar),
            "-C",
            str(dest),
        ],
        check=True,
        capture_output=True,
    )
    for dirpath, _dirs, files in os.walk(dest):
        for name in files:
            if not name.startswith(".wh."):
                continue
            st = os.stat(dirpath)
            os.unlink(os.path.join(dirpath, name))
            if name == ".wh..wh..opq":
                os.setxattr(dirpath, "trusted.overlay.opaque", b"y")
            else:
                os.mknod(os.path.join(dirpath, name[4:]), 0o600 | 0o020000, os.makedev(0, 0))
            os.utime(dirpath, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.kernel
@pytest.mark.parametrize("spec", ["oci", "overlayfs"])
def test_merged_and_layered_images_equal_kernel_overlayfs(
    tmp_path: Path,
    nydus_image,  # type: ignore[no-untyped-def]
    spec: str,
) -> None:
    tars = three_layers(tmp_path, spec)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    ws = ("--whiteout-spec", spec)
    # per-layer bootstraps, merged
    boots, ids = [], []
    for i, tar in enumerate(tars):
        j = build(nydus_image, tar, tmp_path / f"layer{i + 1}.boot", blobs, *ws)
        boots.append(tmp_path / f"layer{i + 1}.boot")
        ids.append(j["blob"])
    merged = tmp_path / "merged.boot"
    nydus_image(
        "merge",
        "-B",
        merged,
        "--original-blob-ids",
        ",".join(ids),
        "-J",
        tmp_path / "merge.json",
        *ws,
        *boots,
    )
    mj = json.loads((tmp_path / "merge.json").read_text())
    assert mj["blobs"] == ids
    # the --parent-bootstrap chain
    chain = boots[0]
    for i, tar in enumerate(tars[1:], start=2):
        nxt = tmp_path / f"chain{i}.boot"
        j = build(nydus_image, tar, nxt, blobs, "--parent-bootstrap", chain, *ws)
        chain = nxt
    assert j["deduped_chunks"] == 2 and j["new_chunks"] == 3  # "added" reuses layer 2 data
    nydus_image("check", merged, "-D", blobs)
    nydus_image("check", chain, "-D", blobs)
    # the reference: kernel overlayfs over the unpacked layers
    lowers = []
    for i, tar in enumerate(tars):
        lowers.append(tmp_path / f"lower{i + 1}")
        unpack_for_overlay(tar, lowers[-1])
    ovl, m1, m2 = tmp_path / "ovl", tmp_path / "merged", tmp_path / "chain"
    for m in (ovl, m1, m2):
        m.mkdir()
    lowerdir = ":".join(str(p) for p in reversed(lowers))  # uppermost first
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lowerdir}", str(ovl)],
        check=True,
        capture_output=True,
    )
    try:
        mount_erofs(merged, m1, blob_devices(merged, blobs))
        try:
            mount_erofs(chain, m2, blob_devices(chain, blobs))
            try:
                assert compare_trees(ovl, m1) == []
                assert compare_trees(ovl, m2) == []
                # spot checks that the layers did what they say
                assert sorted(os.listdir(ovl / "opq")) == ["fresh", "sub"]
                assert not (ovl / "usr/bin/a").exists() and (ovl / "usr/bin/a2").exists()
                assert os.stat(ovl / "usr/bin/a-link").st_ino != os.stat(ovl / "usr/bin/a2").st_ino
            finally:
                umount(m2)
        finally:
            umount(m1)
    finally:
        umount(ovl)


def _layers_with_blobs(tmp_path: Path, nydus_image) -> tuple[list[Path], list[dict], Path]:  # type: ignore[no-untyped-def]
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    boots, js = [], []
    for i in range(3):
        tar = make_tar(
            tmp_path / f"t{i}.tar",
            [E(f"f{i}", data=_rand(50_000, 10 + i))] + ([E(".wh.f0")] if i == 2 else []),
        )
        boot = tmp_path / f"b{i}.boot"
        js.append(build(nydus_image, tar, boot, blobs))
        boots.append(boot)
    return boots, js, blobs


def test_blob_ids_default_to_bootstrap_file_names(tmp_path: Path, nydus_image) -> None:  # type: ignore[no-untyped-def]
    """As upstream: without --original-blob-ids a layer's blob is named after its bootstrap
    file (nydusify names each layer bootstrap by its blob digest)."""
    boots, js, blobs = _layers_with_blobs(tmp_path, nydus_image)
    named = []
    for b, j in zip(boots, js, strict=True):
        named.append(tmp_path / f"{j['blob']}.boot")
        os.link(b, named[-1])
    out = tmp_path / "m.boot"
    nydus_image("merge", "-B", out, *named)
    with open_bootstrap(out) as md:
        assert [b.blob_id for b in md.blobs] == [j["blob"] for j in js]
        assert sorted(p for p, _n in md.walk()) == [b"/", b"/f1", b"/f2"]
    nydus_image("check", out, "-D", blobs)
    nydus_image("merge", "-B", out, *boots)
    with open_bootstrap(out) as md:
        assert [b.blob_id for b in md.blobs] == ["b0", "b1", "b2"]


def test_blob_table_rewrites(tmp_path: Path, nydus_image) -> None:  # type: ignore[no-untyped-def]
    """--blob-digests/--blob-sizes/--blob-toc-* rewrite each layer's own blob entry: the
    converter names blobs by the sha256 of the blob file, which is not the blob id."""
    boots, js, blobs = _layers_with_blobs(tmp_path, nydus_image)
    files = [blobs / j["blob"] for j in js]
    digests = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    sizes = [str(f.stat().st_size) for f in files]
    fake_tocs = [hashlib.sha256(f"toc{i}".encode()).hexdigest() for i in range(3)]
    out = tmp_path / "m.boot"
    r = nydus_image(
        "merge",
        "-B",
        out,
        "--blob-digests",
        ",".join(digests),
        "--blob-sizes",
        ",".join(sizes),
        "--blob-toc-digests",
        ",".join(fake_tocs),
        "--blob-toc-sizes",
        "1,2,3",
        "-J",
        tmp_path / "m.json",
        *boots,
    )
    assert "bootstrap:" in r.stdout
    j = json.loads((tmp_path / "m.json").read_text())
    assert j["blobs"] == digests
    with open_bootstrap(out) as md:
        assert [b.blob_id for b in md.blobs] == digests
        assert [b.compressed_size for b in md.blobs] == [int(s) for s in sizes]
        assert [b.toc_digest.hex() for b in md.blobs] == fake_tocs
        assert [b.toc_size for b in md.blobs] == [1, 2, 3]
    # with the real ToC values, and each blob file under its digest, the image checks out
    tocs, toc_sizes = [], []
    for b in boots:
        with open_bootstrap(b) as md:
            tocs.append(md.blobs[0].toc_digest.hex())
            toc_sizes.append(str(md.blobs[0].toc_size))
    nydus_image(
        "merge",
        "-B",
        out,
        "--blob-digests",
        ",".join(digests),
        "--blob-sizes",
        ",".join(sizes),
        "--blob-toc-digests",
        ",".join(tocs),
        "--blob-toc-sizes",
        ",".join(toc_sizes),
        *boots,
    )
    for f, dgst in zip(files, digests, strict=True):
        os.link(f, blobs / dgst)
    nydus_image("check", out, "-D", blobs)


@pytest.mark.parametrize(
    "args,match",
    [
        (["--blob-digests", "aa,bb"], "has 2 entries for 3"),
        (["--blob-digests", "zz,zz,zz"], "not a sha256 hex digest"),
        (["--blob-sizes", "1,x,3"], "not a comma-separated list"),
        (["--original-blob-ids", "a,b"], "has 2 entries"),
    ],
)
def test_merge_flag_errors(tmp_path: Path, nydus_image, args: list[str], match: str) -> None:  # type: ignore[no-untyped-def]
    boots, _js, _blobs = _layers_with_blobs(tmp_path, nydus_image)
    r = nydus_image("merge", "-B", tmp_path / "m", *args, *boots, check=False)
    assert r.returncode == 2 and match in r.stderr, r.stderr


def test_merge_rejects_layered_bootstraps(tmp_path: Path, nydus_image) -> None:  # type: ignore[no-untyped-def]
    boots, _js, blobs = _layers_with_blobs(tmp_path, nydus_image)
    tar = make_tar(tmp_path / "x.tar", [E("x", data=_rand(10_000, 99))])
    build(nydus_image, tar, tmp_path / "layered.boot", blobs, "--parent-bootstrap", boots[0])
    r = nydus_image("merge", "-B", tmp_path / "m", boots[0], tmp_path / "layered.boot", check=False)
    assert r.returncode == 3 and "more than one data blob" in r.stderr


def test_merge_with_parent_chunk_dict_and_prefetch(tmp_path: Path, nydus_image) -> None:  # type: ignore[no-untyped-def]
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    common = _rand(1 << 20, 5)
    dict_tar = make_tar(tmp_path / "dict.tar", [E("common", data=common)])
    dj = build(nydus_image, dict_tar, tmp_path / "dict.boot", blobs)
    cd = f"bootstrap={tmp_path / 'dict.boot'}"
    base = make_tar(tmp_path / "base.tar", [E("base", data=b"base")])
    bj = build(nydus_image, base, tmp_path / "parent.boot", blobs)
    layers, ids = [], []
    for i in range(2):
        tar = make_tar(
            tmp_path / f"l{i}.tar",
            [
                E(f"d{i}", "dir"),
                E(f"d{i}/c", data=common),
                E(f"d{i}/own", data=_rand(5000, 20 + i)),
            ],
        )
        j = build(nydus_image, tar, tmp_path / f"l{i}.boot", blobs, "--chunk-dict", cd)
        assert j["deduped_chunks"] == 1 and j["blobs"][0] == dj["blob"]
        layers.append(tmp_path / f"l{i}.boot")
        ids.append(j["blob"])
    out = tmp_path / "m.boot"
    cmd = nydus_image.command(
        "merge",
        "-B",
        out,
        "--parent-bootstrap",
        tmp_path / "parent.boot",
        "--chunk-dict",
        cd,
        "--original-blob-ids",
        ",".join(ids),
        "--prefetch-policy",
        "fs",
        *layers,
    )
    subprocess.run(cmd, input="/d1\n/base\n", text=True, check=True, capture_output=True)
    with open_bootstrap(out) as md:
        # parent's blob first, then the dictionary blob once, then each layer's own
        assert [b.blob_id for b in md.blobs] == [bj["blob"], dj["blob"], *ids]
        assert sorted(p for p, _n in md.walk()) == [
            b"/",
            b"/base",
            b"/d0",
            b"/d0/c",
            b"/d0/own",
            b"/d1",
            b"/d1/c",
            b"/d1/own",
        ]
        assert md.prefetch_nids() == [md.resolve("/d1"), md.resolve("/base")]
    nydus_image("check", out, "-D", blobs)


def test_upstream_bootstrap_as_parent_and_merge_source(
    fixtures_dir: Path,
    tmp_path: Path,  # type: ignore[no-untyped-def]
    nydus_image,
) -> None:
    """A bootstrap written by upstream nydus-image works as the lowest layer of both."""
    up = fixtures_dir / "v6" / "rafs-v6-2.2.boot"
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for b in (fixtures_dir / "v6" / "blobs").iterdir():
        (blobs / b.name).write_bytes(b.read_bytes())
    with open_bootstrap(up) as md:
        up_id = md.blobs[0].blob_id
        up_paths = {p for p, _n in md.walk()}
    tar = make_tar(tmp_path / "l.tar", [E("added", data=_rand(3000, 7))])
    chain = tmp_path / "chain.boot"
    j = build(nydus_image, tar, chain, blobs, "--parent-bootstrap", up)
    top = tmp_path / "top.boot"
    build(nydus_image, tar, top, blobs)
    merged = tmp_path / "m.boot"
    nydus_image("merge", "-B", merged, "--original-blob-ids", f"{up_id},{j['blob']}", up, top)
    for boot in (chain, merged):
        nydus_image("check", boot, "-D", blobs)
        with open_bootstrap(boot) as md:
            assert {p for p, _n in md.walk()} == up_paths | {b"/added"}
            assert [b.blob_id for b in md.blobs] == [up_id, j["blob"]]
