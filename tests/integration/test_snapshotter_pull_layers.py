"""``nydus-pull`` of a plain OCI image whose layers need containerd's applier, end to end.

The unpacker applies every layer that is not a Nydus blob itself, with the one layer
extractor, into the snapshot's mounts (a bind mount for the first layer, an overlay over the
parents after). A later layer deletes a lower file (``.wh.``), makes a directory opaque,
hard-links a lower file and tries two tar-slips at a sentinel directory on the host (a file
written below a symlink to it, a symlink to one of its files then overwritten): the
container sees the OCI result, the slips land inside the snapshot, and the host sentinel is
left identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_snapshotter_containerd import HELLO, Stack, _pull

import oci_images as oi
from containerd import busybox_layers, skopeo_push, write_oci_layout
from hostile_tars import make_sentinel, tree_state
from registry import RegistryServer, registry_plain  # noqa: F401 (fixture)

T = oi.T


@pytest.mark.slow
def test_nydus_pull_applies_whiteouts_and_keeps_slips_inside(
    tmp_path: Path,
    registry_plain: RegistryServer,  # noqa: F811
) -> None:
    outside = tmp_path / "host-sentinel"
    make_sentinel(str(outside))
    lower = oi.layer(
        [
            T("dir", "data"),
            T("file", "data/old", b"old"),
            T("dir", "data/sub"),
            T("file", "data/sub/x", b"x"),
            T("file", "gone", b"g"),
            T("file", "orig", b"original\n"),
        ]
    )
    upper = oi.layer(
        [
            T("whiteout", "gone"),
            T("dir", "data"),
            T("opaque", "data"),
            T("file", "data/new", b"new\n"),
            T("link", "hard", target="orig"),
            T("symlink", "esc", target=str(outside)),
            T("file", "esc/slip", b"pwned\n"),
            T("symlink", "pw", target=str(outside / "passwd")),
            T("file", "pw", b"pwned\n", mode=0o4777, uid=4242),
        ]
    )
    layout = tmp_path / "layout"
    write_oci_layout(
        layout,
        "1",
        [*busybox_layers(HELLO), (lower.blob, lower.diff_id), (upper.blob, upper.diff_id)],
    )
    ref = f"{registry_plain.host}/plain-whiteouts:1"
    skopeo_push(layout, "1", ref)
    before = tree_state(str(outside))

    s = Stack(tmp_path).start()
    try:
        res = _pull(s, ref, registry_plain.host, cri_labels=False)
        assert len(res.applied) == 4 and not res.skipped, res
        script = (
            "ls -A /data; cat /data/new /hard; test ! -e /gone && echo gone; "
            f"cat {outside}/slip; ls -l /pw; cat /pw"
        )
        r = s.ctr(
            "run", "--rm", "--snapshotter", "nydus", ref, "pl1", "/bin/busybox", "sh", "-c", script
        )
        out = r.check().stdout.splitlines()
        assert out[:5] == ["new", "new", "original", "gone", "pwned"], (out, s.diagnostics())
        assert out[5].startswith("-rwsrwxrwx") and " 4242 " in out[5], out
        assert out[6] == "pwned"
    finally:
        assert s.stop() == 0
    assert tree_state(str(outside)) == before, "the host sentinel changed"
    assert not (outside / "slip").exists()
