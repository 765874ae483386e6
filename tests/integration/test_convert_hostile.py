"""The hostile-layer corpus (``tests/hostile_tars.py``) through nydusify's layer reader.

``nydusify check`` applies the source image's layers with :class:`nydus.convert.rootfs.
OciRootfs` (Python's tarfile over the builder's decompressing layer stream). Each case must
end within a time budget with a tree or a clear FormatError, never another exception; a case
the builder accepts must be read too, with the paths the case names.
"""

from __future__ import annotations

import io
import time

import pytest

from hostile_tars import Case, hostile_cases
from nydus.convert.rootfs import FileNode, OciRootfs
from nydus.errors import FormatError

TIME_BUDGET = 60.0


def _lookup(root: FileNode, path: str) -> FileNode | None:
    node: FileNode | None = root
    for name in path.encode().split(b"/"):
        if not name:
            continue
        if node is None or node.children is None:
            return None
        node = node.children.get(name)
    return node


@pytest.mark.parametrize("case", hostile_cases(), ids=lambda c: c.name)
def test_hostile_layer_rootfs(case: Case) -> None:
    data = case.make()
    tree = OciRootfs()
    t0 = time.monotonic()
    try:
        tree.apply(io.BytesIO(data))
        ok = True
    except FormatError as e:
        ok = False
        assert "\n" not in str(e)
        assert case.expect == "error", f"{case.name}: the builder reads it, nydusify: {e}"
    assert time.monotonic() - t0 < TIME_BUDGET
    if ok and case.expect == "ok":
        for path in case.paths:
            assert _lookup(tree.root, path) is not None, path
        for path in case.absent:
            assert _lookup(tree.root, path) is None, path
