"""Apply one layer's tree on top of a lower tree, with overlay whiteouts.

Whiteout specs (as upstream ``--whiteout-spec``):

- ``oci``: ``.wh.NAME`` removes NAME from the lower layers; ``.wh..wh..opq``
  in a directory hides every lower entry of that directory.
- ``overlayfs``: a character device 0:0 removes the entry of that name; a
  directory with ``trusted.overlay.opaque=y`` hides the lower directory.
- ``none``: whiteout-looking entries are ordinary files.

Whiteout markers never appear in the result. The lower tree is modified in
place and returned. A directory of the upper layer that its tar only implied
(:attr:`Node.implicit`) leaves the attributes of a lower directory alone.
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
    """Put ``upper`` on top of ``lower`` (both directory trees); returns ``lower``, changed.

    Iterative, so trees of any depth work. Non-directory nodes of ``upper`` are moved into
    the result as they are (hardlink groups stay groups); directories are merged.
    """
    stack = [(lower, upper)]
    while stack:
        lo, up = stack.pop()
        stack.extend(_merge_dir(lo, up, spec))
    return lower


def _merge_dir(lower: Node, upper: Node, spec: str) -> list[tuple[Node, Node]]:
    """Merge one directory level; returns the child directory pairs still to merge."""
    assert lower.children is not None and upper.children is not None
    entries = upper.children
    opaque = False
    if spec == "oci" and OCI_OPAQUE in entries:
        opaque = True
    if spec == "overlayfs" and upper.xattrs.get(OVERLAY_OPAQUE) == b"y":
        opaque = True
    # The directory's own attributes come from the upper layer, unless the upper layer only
    # implied the directory (a tar with entries below it but none for it): then the lower
    # directory stays as it was, as when containerd applies such a layer.
    if not upper.implicit or lower.implicit:
        lower.mode, lower.uid, lower.gid = upper.mode, upper.uid, upper.gid
        lower.mtime, lower.mtime_nsec = upper.mtime, upper.mtime_nsec
        lower.xattrs = {
            k: v
            for k, v in upper.xattrs.items()
            if not (spec == "overlayfs" and k == OVERLAY_OPAQUE)
        }
        lower.implicit = upper.implicit
    if opaque:
        lower.children = {}
    kids = lower.children
    assert kids is not None
    # Removals first, so a layer may delete and re-create a name.
    for name, node in entries.items():
        if spec == "oci" and name.startswith(OCI_WHITEOUT):
            if name != OCI_OPAQUE:
                kids.pop(name[len(OCI_WHITEOUT) :], None)
        elif spec == "overlayfs" and _is_overlay_whiteout(node):
            kids.pop(name, None)
    todo: list[tuple[Node, Node]] = []
    for name, node in entries.items():
        if spec == "oci" and name.startswith(OCI_WHITEOUT):
            continue
        if spec == "overlayfs" and _is_overlay_whiteout(node):
            continue
        old = kids.get(name)
        if node.is_dir:
            if old is not None and old.is_dir:
                todo.append((old, node))
                continue
            fresh = Node(mode=node.mode, implicit=True)
            fresh.children = {}
            kids[name] = fresh
            todo.append((fresh, node))
        else:
            kids[name] = node
    return todo
