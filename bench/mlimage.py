"""The ``ml`` image of the cold start benchmark (issue 17): three gzip OCI layers, built once and
cached under /var/tmp.

    layer 1  debootstrap --variant=minbase bookworm
    layer 2  apt-get install --no-install-recommends python3 python3-pip
    layer 3  pip install numpy pandas scipy scikit-learn matplotlib sympy
             (+ the CPU torch wheel from /opt/wheels when it is there)

Layers 2 and 3 are built in chroots over overlayfs (lower: the layers below), and each layer is
the overlay's upper directory as an OCI layer tar (whiteout devices become ``.wh.`` entries,
opaque directories get ``.wh..wh..opq``). Packages come from Debian's mirror and PyPI; the cache
(``/var/tmp/nydus-bench-ml``: ``layerN.tar``, ``layerN.tar.gz``, ``layers.json``) makes reruns
cheap: each layer is only rebuilt when it and the layers below are missing. ``python
bench/mlimage.py`` builds it alone; :func:`ml_layers` is what bench/coldstart.py calls.

Single-threaded; takes a flock on the cache so that two builds never interleave. Needs root
(debootstrap, chroot, mounts).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

CACHE = Path("/var/tmp/nydus-bench-ml")
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
APT_PACKAGES = ["python3", "python3-pip"]
PIP_PACKAGES = ["numpy", "pandas", "scipy", "scikit-learn", "matplotlib", "sympy"]
WHEELS = Path("/opt/wheels")
PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# what no reader needs and that changes every build
JUNK = ("var/cache/apt/archives", "var/lib/apt/lists", "var/log", "root/.cache", "tmp")


def _run(argv: list[str], timeout: float = 3600, **kw: object) -> None:
    p = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={
            "PATH": PATH_ENV,
            "LANG": "C.UTF-8",
            "DEBIAN_FRONTEND": "noninteractive",
            "HOME": "/root",
        },
        **kw,
    )  # type: ignore[call-overload]
    if p.returncode != 0:
        raise RuntimeError(
            f"{argv[:4]} failed ({p.returncode}): {p.stdout[-2000:]}{p.stderr[-3000:]}"
        )


def _wheels() -> list[Path]:
    return sorted(WHEELS.glob("torch-*.whl")) if WHEELS.is_dir() else []


@contextlib.contextmanager
def _overlay(lowers: list[Path], upper: Path, work: Path, merged: Path) -> Iterator[Path]:
    """Mount an overlay (``lowers`` top first) with /proc, /dev and /opt/wheels inside."""
    for d in (upper, work, merged):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    opts = f"lowerdir={':'.join(str(x) for x in lowers)},upperdir={upper},workdir={work}"
    _run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)])
    inner: list[Path] = []
    try:
        for src, dst, kind in (
            ("proc", merged / "proc", "proc"),
            ("/dev", merged / "dev", "bind"),
            (str(WHEELS), merged / "mnt", "bind"),
        ):
            if kind == "bind" and not Path(src).is_dir():
                continue
            args = (
                ["mount", "--bind", src, str(dst)]
                if kind == "bind"
                else ["mount", "-t", "proc", "proc", str(dst)]
            )
            _run(args)
            inner.append(dst)
        resolv = merged / "etc" / "resolv.conf"
        own_resolv = not resolv.exists() and not resolv.is_symlink()
        if own_resolv:  # only in the upper dir while the build runs: no whiteout after
            shutil.copyfile("/etc/resolv.conf", resolv)
        try:
            yield merged
        finally:
            if own_resolv:
                resolv.unlink(missing_ok=True)
    finally:
        for d in reversed(inner):
            subprocess.run(["umount", "-l", str(d)], check=False)
        subprocess.run(["umount", str(merged)], check=False)
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):
            merged.rmdir()  # only once unmounted and empty


def _strip(root: Path) -> None:
    for junk in JUNK:
        d = root / junk
        if d.is_dir():
            for child in d.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                elif child.name not in ("lock", "partial"):
                    child.unlink(missing_ok=True)


def upper_to_tar(upper: Path, out: Path) -> None:
    """An overlay upper directory as an OCI layer tar (whiteouts converted)."""
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(upper):
            dirnames.sort()
            base = Path(dirpath)
            rel = base.relative_to(upper)
            if rel != Path("."):
                tar.add(base, arcname=str(rel), recursive=False)
                try:
                    opaque = os.getxattr(base, "trusted.overlay.opaque")
                except OSError:
                    opaque = b""
                if opaque == b"y":
                    ti = tarfile.TarInfo(str(rel / ".wh..wh..opq"))
                    tar.addfile(ti)
            for name in sorted(filenames + [d for d in dirnames if (base / d).is_symlink()]):
                p = base / name
                st = p.lstat()
                arc = str((rel / name) if rel != Path(".") else Path(name))
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    tar.addfile(tarfile.TarInfo(str(Path(arc).parent / (".wh." + name))))
                else:
                    tar.add(p, arcname=arc, recursive=False)
    tmp.rename(out)


def _gzip(tar: Path) -> tuple[Path, str]:
    """``tar.gz`` beside ``tar`` (gzip -6 -n) and the tar's diff_id."""
    gz = tar.with_suffix(".tar.gz")
    if not gz.is_file() or gz.stat().st_mtime < tar.stat().st_mtime:
        tmp = gz.with_suffix(".gztmp")
        with open(tar, "rb") as src, open(tmp, "wb") as dst:
            subprocess.run(["gzip", "-6", "-n", "-c"], stdin=src, stdout=dst, check=True)
        tmp.rename(gz)
    h = hashlib.sha256()
    with open(tar, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return gz, "sha256:" + h.hexdigest()


def ml_layers(cache: Path = CACHE) -> list[tuple[Path, str]]:
    """``[(layer .tar.gz, diff_id)]`` of the ml image, bottom first (built when missing)."""
    cache.mkdir(parents=True, exist_ok=True)
    index = cache / "layers.json"
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if index.is_file():
            doc = json.loads(index.read_text())
            if all(Path(p).is_file() for p, _ in doc):
                return [(Path(p), d) for p, d in doc]
        base = cache / "l1"
        tars = [cache / f"layer{i}.tar" for i in (1, 2, 3)]
        if not tars[0].is_file() or not base.is_dir():
            print("ml image: debootstrap minbase ...", flush=True)
            shutil.rmtree(base, ignore_errors=True)
            _run(["debootstrap", "--variant=minbase", SUITE, str(base), MIRROR])
            _strip(base)
            tmp = tars[0].with_suffix(".tmp")
            _run(["tar", "--numeric-owner", "-C", str(base), "-cf", str(tmp), "."])
            tmp.rename(tars[0])
            tars[1].unlink(missing_ok=True)
        up2 = cache / "l2"
        if not tars[1].is_file() or not up2.is_dir():
            print("ml image: apt-get install python3 ...", flush=True)
            with _overlay([base], up2, cache / "w2", cache / "m2") as m:
                _run(["chroot", str(m), "apt-get", "update"])
                _run(
                    [
                        "chroot",
                        str(m),
                        "apt-get",
                        "install",
                        "-y",
                        "--no-install-recommends",
                        *APT_PACKAGES,
                    ]
                )
                _strip(m)
            upper_to_tar(up2, tars[1])
            tars[2].unlink(missing_ok=True)
        up3 = cache / "l3"
        if not tars[2].is_file():
            wheels = [f"/mnt/{w.name}" for w in _wheels()]
            print(
                f"ml image: pip install {' '.join(PIP_PACKAGES)} {' '.join(wheels)} ...", flush=True
            )
            with _overlay([up2, base], up3, cache / "w3", cache / "m3") as m:
                # this machine's CA bundle (a TLS-intercepting egress may sign PyPI's
                # certificate); /tmp is emptied before the layer is taken
                shutil.copyfile("/etc/ssl/certs/ca-certificates.crt", m / "tmp" / "ca.crt")
                _run(
                    [
                        "chroot",
                        str(m),
                        "python3",
                        "-m",
                        "pip",
                        "install",
                        "--no-cache-dir",
                        "--cert",
                        "/tmp/ca.crt",
                        "--break-system-packages",
                        "--root-user-action=ignore",
                        "--disable-pip-version-check",
                        *PIP_PACKAGES,
                        *wheels,
                    ]
                )
                _strip(m)
            upper_to_tar(up3, tars[2])
            shutil.rmtree(up3, ignore_errors=True)
        out = []
        for t in tars:
            print(f"ml image: gzip {t.name} ...", flush=True)
            out.append(_gzip(t))
        index.write_text(json.dumps([[str(p), d] for p, d in out]))
        return out


def entries_and_size(cache: Path = CACHE) -> tuple[int, int]:
    """(tar entries, bytes of file data) over the three layer tars."""
    n = size = 0
    for i in (1, 2, 3):
        with tarfile.open(cache / f"layer{i}.tar") as t:
            for m in t:
                n += 1
                size += m.size if m.isreg() else 0
    return n, size


if __name__ == "__main__":
    for path, diff_id in ml_layers():
        print(path, path.stat().st_size, diff_id)
    sys.exit(0)
