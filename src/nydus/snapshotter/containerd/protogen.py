"""Build-time generation of the containerd gRPC message modules (never committed, never edited).

Owns the package ``nydus.snapshotter.containerd._api``: Python protobuf modules (``*_pb2.py``)
and their typed stubs (``*_pb2.pyi``) compiled with ``grpcio-tools`` from the ``.proto`` files
that Debian ships in ``golang-github-containerd-containerd-dev`` and
``golang-github-gogo-protobuf-dev``.

Why generated here and not committed: ``protoc``'s Python output pins the protobuf runtime it
was made for (``ValidateProtobufRuntimeVersion``), so code made on one machine can refuse to load
on another. Generating on the machine, with the installed ``grpcio-tools`` and ``protobuf``, keeps
the pair consistent. ``scripts/setup.sh`` runs ``python -m nydus.snapshotter.containerd.protogen``
and :func:`ensure_generated` (called on import of :mod:`.proto`) regenerates when the stamp is
missing or stale, so a fresh checkout works either way. The output directory carries its
own ``.gitignore`` (``*``), so git, ruff and friends never see it.

The ``.proto`` files are staged unchanged except for their ``import`` lines: the Go import paths
(``github.com/containerd/containerd/api/...``, ``gogoproto/...``) are moved under
``nydus/snapshotter/containerd/_api/`` so the generated modules import each other inside our
package instead of creating top-level ``github`` and ``gogoproto`` packages. Package names,
messages and service names (what goes on the wire) are untouched. Service glue is not
generated: :mod:`.rpc` builds typed servers and clients from the service descriptors in these
modules.

Threading/process contract: generation takes an exclusive ``flock`` on the package directory and
swaps the output in with ``rename``, so concurrent processes (the test runner, a snapshotter it
started) never see a half-written package.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib
import importlib.metadata
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ...errors import ConfigError

__all__ = [
    "GOCODE",
    "OUTPUT_DIR",
    "PROTOS",
    "ProtoSource",
    "ensure_generated",
    "generate",
    "main",
    "stamp_of",
]

#: Where Debian's golang-*-dev packages put Go sources (and with them the .proto files).
GOCODE = Path("/usr/share/gocode/src")

#: Bump when the staging rules or the output layout change: forces a regeneration.
GENERATOR_VERSION = "1"

_PKG_DIR = Path(__file__).resolve().parent
OUTPUT_DIR = _PKG_DIR / "_api"
_STAMP = "STAMP"
_PY_PREFIX = "nydus/snapshotter/containerd/_api"


@dataclass(frozen=True)
class ProtoSource:
    """One input: its Go import path (as other protos import it) and where we stage it."""

    go_path: str  # e.g. github.com/containerd/containerd/api/types/mount.proto
    staged: str  # relative to _api/, e.g. containerd/types/mount.proto
    package: str  # Debian package that ships it


_CONTAINERD = "github.com/containerd/containerd/api/"
_CONTAINERD_PKG = "golang-github-containerd-containerd-dev"
_GOGO_PKG = "golang-github-gogo-protobuf-dev"

PROTOS: tuple[ProtoSource, ...] = (
    ProtoSource("github.com/gogo/protobuf/gogoproto/gogo.proto", "gogoproto/gogo.proto", _GOGO_PKG),
    *(
        ProtoSource(_CONTAINERD + p, "containerd/" + p, _CONTAINERD_PKG)
        for p in (
            "types/mount.proto",
            "types/descriptor.proto",
            "services/snapshots/v1/snapshots.proto",
            "services/images/v1/images.proto",
            "services/content/v1/content.proto",
            "services/leases/v1/leases.proto",
            "services/namespaces/v1/namespace.proto",
        )
    ),
)

# Import paths as the .proto files spell them -> staged path. google/protobuf/* stays as is
# (grpcio-tools ships those).
_IMPORT_MAP: dict[str, str] = {"gogoproto/gogo.proto": "gogoproto/gogo.proto"}
_IMPORT_MAP.update({p.go_path: p.staged for p in PROTOS if p.go_path.startswith(_CONTAINERD)})

_IMPORT_RE = re.compile(rb'^(\s*import\s+(?:weak\s+|public\s+)?)"([^"]+)"(\s*;.*)$', re.M)


def _read_sources(gocode: Path) -> dict[str, bytes]:
    """Staged path -> staged .proto text; a clear error naming the Debian package if missing."""
    missing: dict[str, list[str]] = {}
    out: dict[str, bytes] = {}
    for src in PROTOS:
        path = gocode / src.go_path
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            missing.setdefault(src.package, []).append(str(path))
            continue
        out[src.staged] = _rewrite_imports(text, src.go_path)
    if missing:
        pkgs = " ".join(sorted(missing))
        files = ", ".join(f for fs in missing.values() for f in fs)
        raise ConfigError(
            f"containerd .proto files not found ({files}): install the Debian packages "
            f"`apt-get install {pkgs}` (scripts/setup.sh does)"
        )
    return out


def _rewrite_imports(text: bytes, what: str) -> bytes:
    def repl(m: re.Match[bytes]) -> bytes:
        target = m.group(2).decode()
        if target.startswith("google/protobuf/"):
            return m.group(0)
        staged = _IMPORT_MAP.get(target)
        if staged is None:
            raise ConfigError(f"{what}: imports {target!r}, which protogen does not stage")
        return m.group(1) + f'"{_PY_PREFIX}/{staged}"'.encode() + m.group(3)

    return _IMPORT_RE.sub(repl, text)


def _tool_versions() -> str:
    parts = []
    for dist in ("grpcio-tools", "protobuf"):
        try:
            parts.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist}=missing")
    return ",".join(parts)


def stamp_of(sources: dict[str, bytes]) -> str:
    """The stamp that output generated from ``sources`` with the installed tools carries."""
    h = hashlib.sha256(f"protogen {GENERATOR_VERSION} {_tool_versions()}\n".encode())
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + hashlib.sha256(sources[name]).digest())
    return h.hexdigest()


def _current_stamp(out: Path) -> str | None:
    try:
        return (out / _STAMP).read_text().strip()
    except OSError:
        return None


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _run_protoc(run: Callable[[list[str]], int], args: list[str], log: Path) -> tuple[int, str]:
    """Run protoc in-process with its C-level stderr (unused-import warnings) sent to ``log``."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(log, "wb") as f:
            os.dup2(f.fileno(), 2)
            try:
                rc = run(args)
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)
    return rc, log.read_text(errors="replace")


def generate(out: Path = OUTPUT_DIR, gocode: Path = GOCODE) -> Path:
    """Regenerate ``out`` from the .proto files under ``gocode`` (always; see ensure_generated)."""
    sources = _read_sources(gocode)
    try:
        protoc = importlib.import_module("grpc_tools.protoc")  # untyped: keep it at arm's length
    except ImportError as e:
        raise ConfigError("grpcio-tools is not installed (pip install grpcio-tools)") from e
    protoc_main: Callable[[list[str]], int] = protoc.main
    include = Path(str(protoc.__file__)).resolve().parent / "_proto"

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".protogen-", dir=out.parent) as tmp_s:
        tmp = Path(tmp_s)
        stage, build = tmp / "stage", tmp / "build"
        for name, text in sources.items():
            dst = stage / _PY_PREFIX / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(text)
        build.mkdir()
        args = [
            "grpc_tools.protoc",
            f"-I{stage}",
            f"-I{include}",
            f"--python_out={build}",
            f"--pyi_out={build}",
            *(f"{_PY_PREFIX}/{name}" for name in sorted(sources)),
        ]
        rc, messages = _run_protoc(protoc_main, args, tmp / "protoc.log")
        if rc != 0:
            raise ConfigError(
                f"grpc_tools.protoc failed with status {rc}: {' '.join(args)}\n{messages}"
            )
        result = build / _PY_PREFIX
        for f in [*result.rglob("*.py"), *result.rglob("*.pyi")]:
            # protoc's stubs are not mypy --strict clean (bare Mapping etc.): silence them
            # without hiding their types from the code that imports them.
            f.write_bytes(b"# mypy: ignore-errors\n" + f.read_bytes())
        for d in [result, *(p for p in result.rglob("*") if p.is_dir())]:
            (d / "__init__.py").touch()
        (result / "__init__.py").write_text(
            '"""Generated by nydus.snapshotter.containerd.protogen from Debian\'s containerd '
            '.proto files. Do not edit."""\n'
        )
        (result / ".gitignore").write_text("*\n")
        (result / _STAMP).write_text(stamp_of(sources) + "\n")
        old = tmp / "old"
        if out.exists():
            out.rename(old)
        result.rename(out)
    return out


def ensure_generated(out: Path = OUTPUT_DIR, gocode: Path = GOCODE) -> Path:
    """Generate ``out`` unless its stamp matches the current sources and tools; return it.

    When the .proto files are not installed but generated output exists, the output is used as
    is (a machine that generated once and later lost the -dev packages keeps working).
    """
    try:
        sources = _read_sources(gocode)
    except ConfigError:
        if _current_stamp(out) is not None:
            return out
        raise
    want = stamp_of(sources)
    if _current_stamp(out) == want:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out.parent):
        if _current_stamp(out) == want:  # another process did it while we waited
            return out
        return generate(out, gocode)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m nydus.snapshotter.containerd.protogen",
        description="Generate nydus.snapshotter.containerd._api from Debian's containerd .protos.",
    )
    p.add_argument("--force", action="store_true", help="regenerate even if up to date")
    p.add_argument("--check", action="store_true", help="exit 1 if generation is needed")
    p.add_argument("--gocode", type=Path, default=GOCODE, help="root of the Go sources")
    a = p.parse_args(argv)
    try:
        if a.check:
            stale = _current_stamp(OUTPUT_DIR) != stamp_of(_read_sources(a.gocode))
            print("stale" if stale else "up to date")
            return 1 if stale else 0
        if a.force:
            with _locked(OUTPUT_DIR.parent):
                generate(OUTPUT_DIR, a.gocode)
        else:
            ensure_generated(OUTPUT_DIR, a.gocode)
    except ConfigError as e:
        print(f"protogen: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
