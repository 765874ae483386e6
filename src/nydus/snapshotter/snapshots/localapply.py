"""Apply a Nydus bootstrap layer from the snapshotter's own content store (our extension).

With ``--content-store`` containerd keeps its content in this snapshotter, so by the time
containerd unpacks a Nydus image the bootstrap layer (the small tar holding
``image/image.boot``) is a file here. Without this module containerd would read it back
through the Content proxy (32 KiB ``Read`` calls) and apply it itself; instead, the
snapshotter applies it in ``Prepare`` of the layer's snapshot, commits the snapshot under the
layer's chain ID and answers ALREADY_EXISTS, the way remote snapshotters make containerd skip a
layer. Upstream's snapshotter cannot do this: it never holds the layer's bytes.

The checks, all before the snapshot is committed (the files go into a fresh directory that is
removed on any refusal; nothing outside it is written):

- the blob's bytes hash to the layer descriptor's digest (read once, hashed while applied);
- the tar is applied by the project's safe extractor (:func:`~nydus.builder.extract.extract_layer`:
  strict reader with :class:`~nydus.builder.tarreader.TarLimits`, every path resolved inside
  the root) and may hold only directories and regular files: no links, no device nodes;
- the diff ID hashed while applying, chained on the parent's chain ID, is the chain ID the
  snapshot is prepared for (``containerd.io/snapshot.ref``): what is committed is exactly the
  layer containerd asked for, whoever named the blob.

A refusal is never the pull's failure: the caller falls back to containerd's own apply.

:class:`LayerBlobs` is the seam to the content side (implemented by
:class:`~..content.remotelayers.LocalLayers`, wired by the CLI): which blob a chain ID is,
and the blob's bytes.

Threading: :func:`apply_bootstrap_blob` is one call per thread; a ``LayerBlobs`` may be shared.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO, Protocol

from ...builder.extract import ExtractResult, extract_layer
from ...builder.tarreader import DIR, REG, TarLimits
from ...errors import FormatError, IntegrityError
from .imageref import chain_ids
from .labels import CRI_LAYER_DIGEST

__all__ = ["BOOTSTRAP_KINDS", "LayerBlobs", "apply_bootstrap_blob", "layer_digest_for"]

#: What a Nydus bootstrap layer may hold (``image/`` and ``image/image.boot``; nothing else is
#: read from it).
BOOTSTRAP_KINDS = frozenset({DIR, REG})
_BOOTSTRAP_LIMITS = TarLimits(max_entries=4096, max_trailing=1 << 20, max_file_bytes=1 << 30)
_PIECE = 1 << 20


class LayerBlobs(Protocol):
    def layer_digest(self, chain_id: str, parent: str) -> str | None:
        """The descriptor digest of the layer whose chain ID is ``chain_id`` on parent chain
        ``parent`` ("" for none), as recorded from an image's manifest; None if unknown."""
        ...

    def open_blob(self, digest: str) -> BinaryIO | None:
        """The stored bytes of blob ``digest`` (the caller closes it); None if not stored."""
        ...


def layer_digest_for(
    blobs: LayerBlobs, chain_id: str, parent: str, labels: Mapping[str, str]
) -> str | None:
    """The layer's blob digest: the CRI ``cri.layer-digest`` label when there is one, else
    what the content side recorded for ``chain_id``."""
    return labels.get(CRI_LAYER_DIGEST) or blobs.layer_digest(chain_id, parent)


class _Hashing:
    """A read-only stream that hashes what passes through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.hash.update(data)
        return data

    def drain(self) -> None:
        while data := self.read(_PIECE):
            del data


def apply_bootstrap_blob(
    blob: BinaryIO, digest: str, fs: str | os.PathLike[str], parent_chain: str, target: str
) -> ExtractResult:
    """Apply bootstrap layer ``blob`` (descriptor digest ``digest``) onto the empty directory
    ``fs`` and check it is the layer of chain ID ``target`` on ``parent_chain`` (see the module
    docstring). Raises FormatError or IntegrityError when refused; the caller then discards
    ``fs``."""
    alg, _, hexpart = digest.partition(":")
    if alg != "sha256" or len(hexpart) != 64:
        raise FormatError(f"layer digest {digest[:80]!r} is not a sha256 digest")
    src = _Hashing(blob)
    result = extract_layer(
        src,  # type: ignore[arg-type]  # reads only
        Path(fs),
        limits=_BOOTSTRAP_LIMITS,
        kinds=BOOTSTRAP_KINDS,
    )
    src.drain()
    got = "sha256:" + src.hash.hexdigest()
    if got != digest:
        raise IntegrityError(f"the stored blob hashes to {got}, the layer descriptor says {digest}")
    chain = chain_ids([parent_chain, result.diff_id])[-1] if parent_chain else result.diff_id
    if chain != target:
        raise IntegrityError(
            f"diff ID {result.diff_id} on parent {parent_chain or '(none)'} makes chain ID "
            f"{chain}, the snapshot is prepared for {target}"
        )
    return result
