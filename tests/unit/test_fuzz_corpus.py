"""Replay the fuzz corpora and saved crash inputs without atheris.

Bootstrap target (``fuzz/fuzz_bootstrap.py``):

Every file in ``fuzz/corpus/`` (seeds written by ``fuzz/make_corpus.py``) and in
``fuzz/regressions/`` (inputs that once crashed or hung a reader) goes through
the fuzz target's own contract check, ``fuzz_bootstrap.replay``: open it with
``open_bootstrap`` and traverse everything; only a NydusError with a message may
come out, within two seconds. The seeds must also be good bootstraps.

Regressions so far (both hung ``RafsV6Metadata`` before the fixes in
``src/nydus/metadata/v6.py``):

* ``hang-v6-directory-dag.boot``: 40 nested directories, each listing its child
  directory twice (under ``d`` and ``e``). No loop, but 2**40 paths for ``walk``.
* ``hang-v6-chunk-index-expansion.boot``: the upstream v6 fixture with no chunk
  table, a blob claiming 0 chunks, a 4 KiB chunk size and a 1 TiB file whose one
  chunk index covers 2**40 bytes: ``chunks()`` built 2**28 ChunkInfo objects.

The other targets (``fuzz/fuzz_tar.py``, ``fuzz_blobmeta.py``, ``fuzz_oci.py``,
``fuzz_config.py``, sharing ``fuzz/fuzzlib.py``) have their seeds in ``fuzz/corpus-<name>/``
(every seed must be accepted, except the few listed in ``REJECTED_SEEDS``) and their saved
inputs in ``fuzz/regressions/<name>-*``; a regression must be rejected with a NydusError
carrying a message, within two seconds. Regressions so far:

* ``oci-crash-nested-json.json``: a manifest nested 3000 levels deep; ``json.loads`` raised
  RecursionError through ``oci.manifest_media_type`` (fixed there and in
  ``convert.image._load``).
* ``config-crash-nested-json.json`` / ``config-crash-nested-toml.toml``: the same for the
  daemon config (JSON and TOML decoders, fixed in ``config._load``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from nydus.errors import FormatError, NydusError

FUZZ_DIR = Path(__file__).resolve().parents[2] / "fuzz"
SEEDS = {
    "builder-small-tree.boot",
    "upstream-rafs-v6-2.2.boot",
    "upstream-v5-blake3-nocompress.boot",
}


def _load_fuzz_target() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_bootstrap", FUZZ_DIR / "fuzz_bootstrap.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FUZZ = _load_fuzz_target()
TARGETS = ("tar", "blobmeta", "oci", "config")
REJECTED_SEEDS = {"nydus-manifest.json"}  # a Nydus manifest: "already a Nydus image"


def _load_target(name: str) -> ModuleType:
    import sys

    if str(FUZZ_DIR) not in sys.path:
        sys.path.insert(0, str(FUZZ_DIR))
    spec = importlib.util.spec_from_file_location(f"fuzz_{name}", FUZZ_DIR / f"fuzz_{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MODULES = {name: _load_target(name) for name in TARGETS}


def _files(sub: str) -> list[Path]:
    d = FUZZ_DIR / sub
    return sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else []


def test_corpus_holds_the_seeds() -> None:
    names = {p.name for p in _files("corpus")}
    assert names >= SEEDS, f"missing seeds {SEEDS - names}: run fuzz/make_corpus.py"


@pytest.mark.parametrize("path", _files("corpus"), ids=lambda p: p.name)
def test_corpus_input(path: Path) -> None:
    err = FUZZ.replay(path.read_bytes())
    if path.name in SEEDS:
        assert err is None, f"seed {path.name} is rejected: {err}"
        assert FUZZ.traverse(path.read_bytes()) > 1


def _target_of(path: Path) -> str | None:
    head = path.name.split("-", 1)[0]
    return head if head in TARGETS else None


@pytest.mark.parametrize(
    "path", [p for p in _files("regressions") if _target_of(p) is None], ids=lambda p: p.name
)
def test_regression_input(path: Path) -> None:
    err = FUZZ.replay(path.read_bytes())
    if path.name.startswith(("hang-", "crash-", "timeout-", "oom-")):
        # These are all malformed on purpose; the fix makes them a clean FormatError.
        assert isinstance(err, FormatError), f"{path.name}: {err!r}"


@pytest.mark.parametrize("name", TARGETS)
def test_target_has_seeds(name: str) -> None:
    assert _files(f"corpus-{name}"), f"no seeds in fuzz/corpus-{name}: run fuzz/make_corpus.py"


@pytest.mark.parametrize(
    "path",
    [p for t in TARGETS for p in _files(f"corpus-{t}")],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_target_seed(path: Path) -> None:
    mod = MODULES[path.parent.name.removeprefix("corpus-")]
    err = mod.replay(path.read_bytes())
    if path.name in REJECTED_SEEDS:
        assert isinstance(err, NydusError), err
    else:
        assert err is None, f"seed {path.name} is rejected: {err}"


@pytest.mark.parametrize(
    "path", [p for p in _files("regressions") if _target_of(p)], ids=lambda p: p.name
)
def test_target_regression(path: Path) -> None:
    target = _target_of(path)
    assert target is not None
    err = MODULES[target].replay(path.read_bytes())
    assert isinstance(err, NydusError), f"{path.name}: {err!r}"
