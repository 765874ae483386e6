"""Replay the fuzz corpus and saved crash inputs without atheris.

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
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from nydus.errors import FormatError

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


@pytest.mark.parametrize("path", _files("regressions"), ids=lambda p: p.name)
def test_regression_input(path: Path) -> None:
    err = FUZZ.replay(path.read_bytes())
    if path.name.startswith(("hang-", "crash-", "timeout-", "oom-")):
        # These are all malformed on purpose; the fix makes them a clean FormatError.
        assert isinstance(err, FormatError), f"{path.name}: {err!r}"
