"""Test images in OCI layout, built here byte for byte (deterministic), for nydusify tests.

- :class:`T` entries and :func:`tar_layer` make a layer tar (PAX, so xattrs and long names
  work) with files, directories, symlinks, hardlinks, devices, fifos, OCI whiteouts
  (``.wh.name``) and opaque markers (``.wh..wh..opq``); compressed with gzip (mtime 0), zstd,
  or left plain.
- :func:`write_layout` writes an OCI image layout directory (``oci-layout``, ``index.json``,
  ``blobs/sha256``) with a correct config (``rootfs.diff_ids`` are the uncompressed digests);
  :func:`write_index_layout` one with a multi-platform index.
- :func:`skopeo_push` copies a layout into a registry with ``skopeo copy --preserve-digests``.
- :func:`sample_layers` is the standard multi-layer image (deletions, opaque directories,
  hardlinks, xattrs, a device, a fifo, a large layer); ``version=2`` changes one file of the
  large layer.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from nydus.format import oci

MTIME = 1_700_000_000


@dataclass
class T:
    """One tar member: kind is file, dir, symlink, link (hardlink), chr, blk, fifo,
    whiteout (of ``path``) or opaque (for directory ``path``)."""

    kind: str
    path: str
    data: bytes = b""
    target: str = ""
    mode: int = -1
    uid: int = 0
    gid: int = 0
    mtime: int = MTIME
    xattrs: dict[str, bytes] = field(default_factory=dict)
    dev: tuple[int, int] = (0, 0)


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "link": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def tar_layer(entries: list[T]) -> bytes:
    """The uncompressed tar of ``entries`` (PAX format, in the given order)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            kind, path = e.kind, e.path
            if kind == "whiteout":
                d, _, name = path.rpartition("/")
                kind, path = "file", (f"{d}/" if d else "") + ".wh." + name
            elif kind == "opaque":
                kind, path = "file", path.rstrip("/") + "/.wh..wh..opq"
            ti = tarfile.TarInfo(path)
            ti.type = _TYPES[kind]
            default_mode = 0o755 if kind == "dir" else 0o777 if kind == "symlink" else 0o644
            ti.mode = default_mode if e.mode < 0 else e.mode
            ti.uid, ti.gid, ti.mtime = e.uid, e.gid, e.mtime
            ti.uname = ti.gname = ""
            if kind in ("symlink", "link"):
                ti.linkname = e.target
            if kind in ("chr", "blk"):
                ti.devmajor, ti.devminor = e.dev
            if e.xattrs:
                ti.pax_headers = {
                    f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                    for k, v in e.xattrs.items()
                }
            if kind == "file":
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def compress(tar: bytes, how: str) -> tuple[bytes, str]:
    """``(blob, media type)`` for ``how`` in gzip, zstd, none."""
    if how == "gzip":
        return gzip.compress(tar, compresslevel=6, mtime=0), oci.MEDIA_TYPE_OCI_LAYER_GZIP
    if how == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(tar), oci.MEDIA_TYPE_OCI_LAYER_ZSTD
    return tar, oci.MEDIA_TYPE_OCI_LAYER


@dataclass
class Layer:
    tar: bytes
    blob: bytes
    media_type: str

    @property
    def digest(self) -> str:
        return oci.sha256_digest(self.blob)

    @property
    def diff_id(self) -> str:
        return oci.sha256_digest(self.tar)


def layer(entries: list[T], how: str = "gzip") -> Layer:
    tar = tar_layer(entries)
    blob, mt = compress(tar, how)
    return Layer(tar, blob, mt)


def config_for(
    layers: list[Layer], *, arch: str = "amd64", os_: str = "linux", variant: str = ""
) -> bytes:
    doc: dict[str, Any] = {
        "architecture": arch,
        "os": os_,
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [ly.diff_id for ly in layers]},
        "history": [
            {"created": "2023-11-14T22:13:20Z", "created_by": f"layer {i}"}
            for i in range(len(layers))
        ],
    }
    if variant:
        doc["variant"] = variant
    return json.dumps(doc, sort_keys=True).encode()


def _put(blobs: Path, data: bytes) -> str:
    blobs.mkdir(parents=True, exist_ok=True)
    digest = oci.sha256_digest(data)
    (blobs / digest[7:]).write_bytes(data)
    return digest


def image_manifest(
    blobs: Path, layers: list[Layer], config: bytes, *, docker: bool = False
) -> tuple[bytes, str]:
    _put(blobs, config)
    for ly in layers:
        _put(blobs, ly.blob)
    mt = oci.MEDIA_TYPE_DOCKER_MANIFEST if docker else oci.MEDIA_TYPE_OCI_MANIFEST
    cmt = oci.MEDIA_TYPE_DOCKER_CONFIG if docker else oci.MEDIA_TYPE_OCI_CONFIG
    doc = {
        "schemaVersion": 2,
        "mediaType": mt,
        "config": {"mediaType": cmt, "digest": oci.sha256_digest(config), "size": len(config)},
        "layers": [
            {
                "mediaType": (
                    oci.MEDIA_TYPE_DOCKER_LAYER_GZIP
                    if docker and ly.media_type == oci.MEDIA_TYPE_OCI_LAYER_GZIP
                    else ly.media_type
                ),
                "digest": ly.digest,
                "size": len(ly.blob),
            }
            for ly in layers
        ],
    }
    body = json.dumps(doc, indent=2).encode()
    _put(blobs, body)
    return body, mt


def _layout(directory: Path, tag: str, body: bytes, mt: str) -> str:
    digest = oci.sha256_digest(body)
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {
        "schemaVersion": 2,
        "mediaType": oci.MEDIA_TYPE_OCI_INDEX,
        "manifests": [
            {
                "mediaType": mt,
                "digest": digest,
                "size": len(body),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))
    return digest


def write_layout(
    directory: Path,
    tag: str,
    layers: list[Layer],
    *,
    docker: bool = False,
    config: bytes | None = None,
) -> str:
    """An OCI layout with one image; returns the manifest digest."""
    blobs = directory / "blobs" / "sha256"
    body, mt = image_manifest(blobs, layers, config or config_for(layers), docker=docker)
    return _layout(directory, tag, body, mt)


def write_index_layout(directory: Path, tag: str, images: dict[str, list[Layer]]) -> str:
    """An OCI layout whose ``tag`` is an index of one image per platform
    (``{"linux/amd64": layers, ...}``); returns the index digest."""
    blobs = directory / "blobs" / "sha256"
    entries = []
    for plat, layers in images.items():
        parts = plat.split("/")
        cfg = config_for(
            layers, os_=parts[0], arch=parts[1], variant=parts[2] if len(parts) > 2 else ""
        )
        body, mt = image_manifest(blobs, layers, cfg)
        p: dict[str, str] = {"os": parts[0], "architecture": parts[1]}
        if len(parts) > 2:
            p["variant"] = parts[2]
        entries.append(
            {"mediaType": mt, "digest": oci.sha256_digest(body), "size": len(body), "platform": p}
        )
    idx = json.dumps(
        {"schemaVersion": 2, "mediaType": oci.MEDIA_TYPE_OCI_INDEX, "manifests": entries}, indent=2
    ).encode()
    _put(blobs, idx)
    return _layout(directory, tag, idx, oci.MEDIA_TYPE_OCI_INDEX)


def skopeo_push(
    layout: Path, tag: str, dest: str, extra: list[str] | None = None, all_images: bool = False
) -> None:
    """``skopeo copy --preserve-digests oci:LAYOUT:TAG docker://DEST``."""
    cmd = ["skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false"]
    if all_images:
        cmd.append("--all")
    cmd += [*(extra or []), f"oci:{layout}:{tag}", f"docker://{dest}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"skopeo copy failed: {out.stderr}")


def skopeo_inspect(ref: str, raw: bool = False) -> Any:
    cmd = [
        "skopeo",
        "inspect",
        "--tls-verify=false",
        *(["--raw"] if raw else []),
        f"docker://{ref}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"skopeo inspect failed: {out.stderr}")
    return json.loads(out.stdout)


def rand(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def text(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    words = [
        bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(300)
    ]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
    return bytes(out[:size])


def sample_layers(version: int = 1, big: int = 24 << 20) -> list[Layer]:
    """The standard test image (see the module docstring). ``big`` is the size of the large
    layer's data; version 2 rewrites 64 KiB in the middle of one of its files."""
    base = [
        T("dir", "bin"),
        T("dir", "etc"),
        T("dir", "usr"),
        T("dir", "usr/lib"),
        T("dir", "var", mode=0o755),
        T("dir", "var/cache"),
        T("dir", "var/cache/apt"),
        T("dir", "opt", mode=0o750, uid=1000, gid=1000),
        T("dir", "opt/gone"),
        T("file", "opt/gone/a", b"gone a\n"),
        T("file", "opt/gone/b", b"gone b\n"),
        T("file", "etc/hosts", b"127.0.0.1 localhost\n"),
        T("file", "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", mode=0o644),
        T("file", "etc/old.conf", b"old\n"),
        T("file", "etc/shadow", b"root:*:19000::::::\n", mode=0o640, gid=42),
        T("file", "bin/sh", rand(200_000, 1), mode=0o755),
        T("symlink", "bin/ls", target="sh"),
        T("symlink", "etc/abs", target="/etc/hosts"),
        T("link", "bin/sh-hardlink", target="bin/sh"),
        T(
            "file",
            "usr/lib/libcap.so",
            rand(50_000, 2),
            mode=0o755,
            xattrs={
                "security.capability": b"\x01\x00\x00\x02" + b"\x00" * 16,
                "user.comment": b"a library",
            },
        ),
        T("file", "var/cache/apt/pkgcache.bin", text(300_000, 3)),
        T("file", "var/cache/apt/srcpkgcache.bin", text(100_000, 4)),
        T("file", "usr/lib/empty", b""),
        T("chr", "dev-null", dev=(1, 3), mode=0o666),
        T("fifo", "etc/initctl", mode=0o600),
        T("file", "etc/setuid", b"#!/bin/sh\n", mode=0o4755),
        T("dir", "tmp", mode=0o1777),
    ]
    l1 = layer(base, "gzip")
    l2 = layer(
        [
            T("whiteout", "etc/old.conf"),
            T("whiteout", "opt/gone"),
            T("dir", "var/cache/apt", mode=0o700),
            T("opaque", "var/cache/apt"),
            T("file", "var/cache/apt/fresh", b"fresh after opaque\n"),
            T("file", "etc/hosts", b"127.0.0.1 localhost\n::1 localhost6\n", mtime=MTIME + 60),
            T("dir", "usr/share", xattrs={"user.dirattr": b"yes"}),
            T("file", "usr/share/doc", text(10_000, 5)),
            T("link", "usr/share/doc-link1", target="usr/share/doc"),
            T("link", "usr/share/doc-link2", target="usr/share/doc"),
            T("file", "etc/owned", b"owned\n", uid=1234, gid=5678, mode=0o600),
        ],
        "gzip",
    )
    l3 = layer(
        [
            T("whiteout", "bin/ls"),
            T("dir", "bin/ls"),  # a symlink replaced by a directory
            T("file", "bin/ls/inner", b"inner\n"),
            T("whiteout", "etc/initctl"),
            T("file", "implicit/parent/dir/file", b"no parent entries\n"),
        ],
        "zstd",
    )
    files = []
    per = big // 4
    for k in range(4):
        data = rand(per // 2, 100 + k) + text(per - per // 2, 200 + k)
        if version >= 2 and k == 1:
            mid = len(data) // 2
            data = data[:mid] + rand(64 << 10, 999) + data[mid + (64 << 10) :]
        files.append(T("file", f"data/blob{k}.bin", data))
    l4 = layer([T("dir", "data"), *files], "gzip")
    l5 = layer([T("file", "etc/version", b"version 1\n")], "none")
    return [l1, l2, l3, l4, l5]


def push_with_client(
    client: Any, repo: str, tag: str, layers: list[Layer], *, docker: bool = False, scratch: Path
) -> str:
    """Push an image with our registry client (skopeo's ``oci:`` transport cannot hold
    Docker media types); returns the manifest digest."""
    config = config_for(layers)
    body, mt = image_manifest(scratch / "blobs", layers, config, docker=docker)
    for b in [config, *(ly.blob for ly in layers)]:
        client.push_blob(repo, oci.sha256_digest(b), b)
    return str(client.put_manifest(repo, tag, body, mt))


def run_measured(cmd: list[str], **kw: Any) -> tuple[int, int]:
    """Run ``cmd``; returns (exit status, peak RSS in bytes of that process).

    The peak is the child's own ``VmHWM``, polled from /proc while it runs: the rusage
    ``ru_maxrss`` of a child counts the parent's memory at fork time (Linux carries the
    high-water mark across exec), which is useless from a big test process.
    """
    import threading

    proc = subprocess.Popen(cmd, **kw)
    peak = [0]
    done = threading.Event()

    def poll() -> None:
        path = f"/proc/{proc.pid}/status"
        while not done.is_set():
            try:
                with open(path) as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            except OSError:
                return
            done.wait(0.02)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    rc = proc.wait()
    done.set()
    t.join()
    return rc, peak[0]
