"""Apply one layer's tree on top of a lower tree, with overlay whiteouts.

Whiteout specs (as upstream ``--whiteout-spec``):

- ``oci``: ``.wh.NAME`` removes NAME from the lower layers; ``.wh..wh..opq``
  in a directory hides every lower entry of that directory.
- ``overlayfs``: a character device 0:0 removes the entry of that name; a
  directory with ``trusted.overlay.opaque=y`` hides the lower directory.
- ``none``: whiteout-looking entries are ordinary files.

Whiteout markers never appear in the result. The lower tree is modified in
place and returned.
Single-threaded.
"""

from __future__ import annotations

import stat

from .tree import Node

__all__ = ["apply_layer"]

OCI_WHITEOUT = b".wh."
OCI_OPAQUE = b".wh..wh..opq"
OVERLAY_OPAQUE = b"trusted.overlay.opaque"


def _is_overlay_whiteout(n: Node) -> bool:
    return stat.S_ISCHR(n.mode) and n.rdev == 0


def apply_layer(lower: Node, upper: Node, spec: str) -> Node:
    _merge_dir(lower, upper, spec)
    return lower


def _merge_dir(lower: Node, upper: Node, spec: str) -> None:
    assert lower.children is not None and upper.children is not None
    entries = upper.children
    opaque = False
    if spec == "oci" and OCI_OPAQUE in entries:
        opaque = True
    if spec == "overlayfs" and upper.xattrs.get(OVERLAY_OPAQUE) == b"y":
        opaque = True
    # The directory's own attributes come from the upper layer.
    lower.mode, lower.uid, lower.gid = upper.mode, upper.uid, upper.gid
    lower.mtime, lower.mtime_nsec = upper.mtime, upper.mtime_nsec
    lower.xattrs = {k: v for k, v in upper.xattrs.items()
                    if not (spec == "overlayfs" and k == OVERLAY_OPAQUE)}
    if opaque:
        lower.children = {}
    kids = lower.children
    assert kids is not None
    # Removals first, so a layer may delete and re-create a name.
    for name, node in entries.items():
        if spec == "oci" and name.startswith(OCI_WHITEOUT):
            if name != OCI_OPAQUE:
                kids.pop(name[len(OCI_WHITEOUT):], None)
        elif spec == "overlayfs" and _is_overlay_whiteout(node):
            kids.pop(name, None)
    for name, node in sorted(entries.items()):
        if spec == "oci" and name.startswith(OCI_WHITEOUT):
            continue
        if spec == "overlayfs" and _is_overlay_whiteout(node):
            continue
        old = kids.get(name)
        if node.is_dir:
            if old is not None and old.is_dir:
                _merge_dir(old, node, spec)
                continue
            fresh = Node(mode=node.mode)
            fresh.children = {}
            _merge_dir(fresh, node, spec)
            kids[name] = fresh
        else:
            kids[name] = node
