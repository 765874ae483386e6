"""``nydus-pull [-a SOCK] [-n NS] [--plain-http] REF``: a labelled pull for containerd 1.6
(:class:`~nydus.snapshotter.content.pull.RemoteUnpacker`); prints the chain IDs as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..config import docker_config_path
from ..daemon.logsetup import setup_logging
from ..errors import NydusError
from ..registry import RegistryClient, parse_reference
from ..snapshotter.content.pull import RegistrySource, RemoteUnpacker
from . import flag

__all__ = ["main"]


def main(argv: list[str] | None = None, prog: str = "nydus-pull") -> int:
    """``nydus-pull``: see the module docstring."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Pull REF into containerd for a remote snapshotter the way containerd's "
        "unpacker does (containerd 1.6's `ctr image pull` cannot): Nydus blob layers are never "
        "downloaded, only the small bootstrap layer. Then `ctr run --snapshotter nydus REF ID "
        "CMD` works. Registry credentials come from $DOCKER_CONFIG/config.json or "
        "~/.docker/config.json.",
    )
    p.add_argument(
        "-a",
        "--address",
        default="/run/containerd/containerd.sock",
        help="containerd's socket (/run/containerd/containerd.sock)",
    )
    p.add_argument("-n", "--namespace", default="default", help="containerd namespace (default)")
    p.add_argument("--snapshotter", default="nydus", help="the proxy snapshotter's name (nydus)")
    flag(p, "--plain-http", help="fetch over plain HTTP")
    flag(p, "--no-cri-labels", help="do not add cri.* labels")
    flag(p, "-q", "--quiet", help="log warnings only")
    p.add_argument("ref", help="image reference, e.g. localhost:5000/ubuntu-nydus:latest")
    a = p.parse_args(argv)
    setup_logging("warn" if a.quiet else "info")
    docker_config = docker_config_path()
    try:
        ref = parse_reference(a.ref)
        client = RegistryClient(
            ref.api_host, scheme="http" if a.plain_http else "https", docker_config=docker_config
        )
        source = RegistrySource(client, ref.repository)
        unpacker = RemoteUnpacker(
            a.address, a.namespace, a.snapshotter, cri_labels=not a.no_cri_labels
        )
        r = unpacker.pull(a.ref, ref.ref, source)
    except NydusError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps({"chain_id": r.chain_id, "skipped": r.skipped, "applied": r.applied,
                      "existing": r.existing}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
