"""Atheris fuzz target: bytes -> ``open_bootstrap`` -> a full traversal of the tree.

The contract under test: a malformed bootstrap (RAFS v5 or v6) raises a
:class:`nydus.errors.NydusError` subclass and nothing else; it never hangs and
never allocates without bound. Any other exception, including the
``AssertionError`` of a consistency check in :func:`traverse`, is a crash.

Run (from the repository root; the seed corpus is made by ``fuzz/make_corpus.py``)::

    PYTHONPATH=src .venv/bin/python fuzz/fuzz_bootstrap.py fuzz/corpus \\
        -max_total_time=180 -timeout=10 -rss_limit_mb=2048 -artifact_prefix=fuzz/regressions/

Crash inputs saved under ``fuzz/regressions/`` are replayed, together with the
corpus, by ``tests/unit/test_fuzz_corpus.py`` through :func:`replay` (the same
check with a SIGALRM time limit instead of libFuzzer's); imported as a module this
file needs no atheris. Single-threaded (``time_limit`` uses signals: main thread only).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzzlib

fuzzlib.add_src_to_path()  # run from a checkout without install

if __name__ == "__main__":
    import atheris

    # Instrument every nydus module the traversal can reach, including the ones
    # open_bootstrap imports lazily (v5/v6 readers), so coverage guides the fuzzer.
    with atheris.instrument_imports(include=["nydus"]):
        import nydus.format.erofs
        import nydus.format.rafs_v5
        import nydus.format.rafs_v6
        import nydus.metadata.v5
        import nydus.metadata.v6  # noqa: F401
        from nydus.errors import NydusError
        from nydus.metadata import RafsMetadata, open_bootstrap
else:
    from nydus.errors import NydusError
    from nydus.metadata import RafsMetadata, open_bootstrap

__all__ = [
    "NydusError",
    "TestOneInput",
    "TraversalTimeout",
    "replay",
    "time_limit",
    "traverse",
    "traverse_metadata",
]

REPLAY_SECONDS = 2.0  # a small bootstrap is traversed in milliseconds


# the shared SIGALRM limit (fuzz/fuzzlib.py); the names this module always exported
TraversalTimeout = fuzzlib.FuzzTimeout
time_limit = fuzzlib.time_limit


def traverse_metadata(md: RafsMetadata) -> int:
    """Touch every node of an opened bootstrap through the public API; returns the node count.

    Beyond "no foreign exception", it checks the API's own promises: entries are sorted,
    valid names (no '/', NUL, '.' or '..'), ``lookup`` and ``resolve`` agree with
    ``readdir`` and ``walk``, chunks lie inside their file and refer to a known blob.
    """
    _ = (md.version, md.flags, md.chunk_size, md.compressor, md.digester, md.root_nid)
    nblobs = len(md.blobs)
    for b in md.blobs:
        assert b.blob_id and "/" not in b.blob_id, b
    nodes = 0
    for path, nid in md.walk():
        nodes += 1
        attr = md.getattr(nid)
        md.xattrs(nid)
        if path != b"/":
            assert md.resolve(path) == nid, (path, nid)
        if attr.is_dir:
            prev = b""
            for ent in md.readdir(nid):
                name = ent.name
                assert name and b"/" not in name and b"\0" not in name, name
                assert name not in (b".", b".."), name
                assert name > prev, (prev, name)
                prev = name
                assert md.lookup(nid, name) == ent.nid, (path, name)
        elif attr.is_symlink:
            md.readlink(nid)
        elif attr.is_reg:
            for c in md.chunks(nid):
                assert 0 <= c.blob_index < nblobs, c
                assert 0 <= c.file_offset < max(attr.size, 1), (attr.size, c)
    for nid in md.prefetch_nids():
        md.getattr(nid)
    return nodes


def traverse(data: bytes) -> int:
    """``open_bootstrap(data)`` and :func:`traverse_metadata`; returns the node count."""
    with open_bootstrap(data) as md:
        return traverse_metadata(md)


def replay(data: bytes, seconds: float = REPLAY_SECONDS) -> NydusError | None:
    """The fuzz contract without libFuzzer: None if ``data`` is a good bootstrap, else the
    NydusError (with a message) it was rejected with. Anything else propagates, including
    TraversalTimeout after ``seconds``."""
    with time_limit(seconds):
        try:
            traverse(data)
        except NydusError as e:
            assert str(e).strip(), f"{type(e).__name__} without a message"
            return e
    return None


def TestOneInput(data: bytes) -> None:
    with contextlib.suppress(NydusError):  # the documented way to reject a bad bootstrap
        traverse(data)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
