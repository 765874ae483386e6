"""Exporting a recorded access pattern: from nydusd's API to a prefetch list file.

A daemon started with ``"access_pattern": true`` in its config records which files its image's
readers read, in first-access order, with the ranges read (FUSE RAFS mode: file reads; kernel
EROFS mode: blob-device reads mapped back to files, :mod:`nydus.fs.chunkmap`); ``GET
/api/v1/metrics/pattern`` returns it. This module collects it

* from one daemon (its API socket, and optionally the image's mount path inside it), or
* from a snapshotter root: every live daemon in ``<root>/daemons/state.json`` that serves
  the image (all images, or those whose reference is ``image_ref``),

and writes it as upstream's prefetch list (one absolute path a line: ``nydusify optimize
--prefetch-files``, ``nydusify convert --prefetch-patterns``, ``nydus-image --prefetch-policy
fs``) and, optionally, as the JSON of the entries themselves (ranges included).

Stateless functions; each call opens its own API connections.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..config import read_input_file
from ..daemon.client import NydusdClient
from ..errors import ConfigError, NotFoundError, NydusError
from ..format.safejson import parse_json_object

__all__ = ["daemon_pattern", "snapshotter_patterns", "prefetch_paths", "write_pattern"]


def daemon_pattern(apisock: str, fs_id: str | None = None) -> list[dict[str, Any]]:
    """The access pattern of one image of one daemon (``fs_id``: its mount path)."""
    client = NydusdClient(apisock, timeout=30.0)
    doc = client.metrics("pattern", fs_id)
    if not isinstance(doc, list):
        raise NydusError(f"{apisock}: the pattern is not a list")
    return [e for e in doc if isinstance(e, dict)]


def snapshotter_patterns(root: str, image_ref: str | None = None) -> list[dict[str, Any]]:
    """Patterns of the images a snapshotter's daemons serve, merged in first-access order
    (a file read by several images keeps its earliest access)."""
    state = Path(root) / "daemons" / "state.json"
    if not state.exists():
        raise NotFoundError(f"{state}: no such file (is {root} a snapshotter's --root?)")
    doc = parse_json_object(
        read_input_file(state, "daemon state", 64 << 20), str(state), error=ConfigError
    )
    daemons = {d.get("id"): d for d in doc.get("daemons", []) if isinstance(d, dict)}
    images = [i for i in doc.get("images", []) if isinstance(i, dict)]
    if image_ref is not None:
        images = [i for i in images if i.get("image_ref") == image_ref]
        if not images:
            raise NotFoundError(f"no image {image_ref} in {state}")
    best: dict[str, dict[str, Any]] = {}
    for img in images:
        d = daemons.get(img.get("daemon_id"))
        if d is None or not os.path.exists(str(d.get("apisock", ""))):
            continue
        fs_id = "/" if img.get("daemon_id") == img.get("id") else f"/{img.get('id')}"
        for ent in daemon_pattern(str(d["apisock"]), fs_id):
            path = str(ent.get("file_path") or "")
            if not path:
                continue
            old = best.get(path)
            if old is None or _when(ent) < _when(old):
                best[path] = ent
    return sorted(best.values(), key=_when)


def _when(e: dict[str, Any]) -> tuple[int, int]:
    return int(e.get("first_access_time_secs", 0)), int(e.get("first_access_time_nanos", 0))


def prefetch_paths(entries: list[dict[str, Any]]) -> list[str]:
    """File paths in first-access order, each once (entries without a path are left out:
    a FUSE read of an inode the daemon never saw looked up)."""
    seen: set[str] = set()
    out = []
    for e in sorted(entries, key=_when):
        p = str(e.get("file_path") or "")
        if p and p not in seen:
            seen.add(p)
            out.append(p)
    return out


def write_pattern(
    entries: list[dict[str, Any]], list_path: str, json_path: str | None = None
) -> int:
    """Write the prefetch list (and the entries as JSON); returns the number of paths."""
    paths = prefetch_paths(entries)
    for bad in (p for p in paths if "\n" in p):
        raise ConfigError(f"path {bad!r} has a newline: it cannot go in a prefetch list")
    tmp = f"{list_path}.tmp"
    with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.writelines(p + "\n" for p in paths)
    os.replace(tmp, list_path)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(entries, f, indent=1)
            f.write("\n")
    return len(paths)
