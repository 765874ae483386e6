"""Write the seed corpus of ``fuzz_bootstrap.py`` into ``fuzz/corpus/``.

Three seeds: the two real upstream bootstraps from the shared fixtures (a RAFS v6
image written by nydus-image 2.2 and a RAFS v5 one), copied byte for byte, and a
v6 bootstrap made by our own builder from a small tree holding directories,
regular files (empty, one chunk, several chunks, a duplicate), symlinks, a
hardlink and user xattrs. Content and timestamps are fixed, so re-running gives
the same builder bootstrap for the same uid/gid.

Usage, from the repository root: ``PYTHONPATH=src .venv/bin/python fuzz/make_corpus.py``.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FIXTURES = REPO.parent / "shared" / "fixtures" / "nydus"
UPSTREAM = {
    "upstream-rafs-v6-2.2.boot": FIXTURES / "v6" / "rafs-v6-2.2.boot",
    "upstream-v5-blake3-nocompress.boot": FIXTURES / "v5" / "blake3-nocompress.boot",
}
BUILT_NAME = "builder-small-tree.boot"

if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))


def make_small_tree(root: Path) -> None:
    """A tiny tree with every node kind the fuzzer should start from."""
    root.mkdir()
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "sub" / "deep.txt").write_bytes(b"deep\n" * 100)
    (root / "empty").write_bytes(b"")
    (root / "small.txt").write_bytes(b"hello nydus\n")
    (root / "multi.bin").write_bytes(bytes(range(256)) * 40)  # 10 KiB: 3 chunks of 4 KiB
    (root / "dup.bin").write_bytes(bytes(range(256)) * 40)  # deduplicated against multi.bin
    os.symlink("dir/sub/deep.txt", root / "link")
    os.symlink("t" * 200, root / "long-link")
    os.link(root / "small.txt", root / "dir" / "hardlink")
    try:
        os.setxattr(root / "small.txt", "user.nydus.test", b"value")
        os.setxattr(root / "dir", "user.dirattr", b"x" * 40)
    except OSError:
        pass  # no user xattrs on this file system: the seed is still useful
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(
                os.path.join(dirpath, name),
                ns=(1, 1_600_000_000_123_456_789),
                follow_symlinks=False,
            )
    os.utime(root, ns=(1, 1_600_000_000_123_456_789))


def build_small_bootstrap(workdir: Path) -> bytes:
    """The builder's v6 bootstrap of :func:`make_small_tree` (4 KiB chunks, zstd)."""
    from nydus.builder.build import BuildOptions, build_image
    from nydus.builder.dirsource import load_directory

    tree = workdir / "tree"
    make_small_tree(tree)
    res = build_image(
        load_directory(tree), io.BytesIO(), BuildOptions(compressor="zstd", chunk_size=0x1000)
    )
    return res.bootstrap


def main() -> int:
    out = HERE / "corpus"
    out.mkdir(exist_ok=True)
    for name, src in UPSTREAM.items():
        if not src.is_file():
            print(f"missing fixture {src}", file=sys.stderr)
            return 1
        shutil.copyfile(src, out / name)
    with tempfile.TemporaryDirectory() as td:
        (out / BUILT_NAME).write_bytes(build_small_bootstrap(Path(td)))
    for p in sorted(out.iterdir()):
        print(f"{p.stat().st_size:8d}  {p.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
