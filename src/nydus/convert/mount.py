"""``nydusify mount``: serve a Nydus image from a registry (or a backend) with ``nydusd``.

Pulls the manifest and the bootstrap layer, writes ``image.boot`` and a nydusd config (v1
JSON: a ``registry`` backend for the target repository with the scheme in use and the
credentials the client found in the docker config, or the ``--backend-type`` config; a blob
cache under the work directory) and runs upstream's documented command line::

    nydusd --config CONFIG --mountpoint DIR --bootstrap BOOTSTRAP --log-level LEVEL

in the foreground. SIGINT/SIGTERM are passed on to nydusd, which unmounts and exits; the exit
status is nydusd's. The config holds credentials, so it is written 0600.

Single-threaded.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from types import FrameType
from typing import Any

from ..config import BackendConfig, DaemonConfig
from ..errors import ConfigError, FormatError
from ..format import oci
from ..registry.auth import docker_config_credentials
from . import image as im
from .remote import Remote

log = logging.getLogger(__name__)

__all__ = ["MountOptions", "prepare_mount", "mount", "nydusd_config"]


@dataclass
class MountOptions:
    mount_path: str
    work_dir: str = "./tmp"
    nydusd: str = "nydusd"
    backend: BackendConfig | None = None
    prefetch: bool = False
    platform: im.Platform | None = None
    log_level: str = "info"


def nydusd_config(target: Remote, opts: MountOptions, cache_dir: str) -> dict[str, Any]:
    """A nydusd v1 config for the image (checked by our config parser)."""
    if opts.backend is not None:
        backend = {"type": opts.backend.type, "config": asdict(opts.backend.config)}
    else:
        cfg: dict[str, Any] = {
            "scheme": target.client.scheme,
            "host": target.ref.api_host,
            "repo": target.repo,
            "timeout": 30,
            "connect_timeout": 10,
            "retry_limit": 2,
        }
        if target.opts.insecure:
            cfg["skip_verify"] = True
        creds = None
        if target.opts.docker_config:
            creds = docker_config_credentials(target.ref.api_host, target.opts.docker_config)
        if creds is not None and creds.username:
            cfg["auth"] = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
        elif creds is not None and creds.registry_token:
            cfg["registry_token"] = creds.registry_token
        backend = {"type": "registry", "config": cfg}
    doc: dict[str, Any] = {
        "device": {
            "backend": backend,
            "cache": {"type": "blobcache", "config": {"work_dir": cache_dir}},
        },
        "mode": "direct",
        "digest_validate": False,
        "enable_xattr": True,
        "fs_prefetch": {"enable": opts.prefetch, "threads_count": 4, "prefetch_all": True},
    }
    DaemonConfig.from_json(doc, environ={})  # fail here, not in nydusd, on a bad config
    return doc


def prepare_mount(target: Remote, opts: MountOptions) -> tuple[str, str]:
    """Fetch the bootstrap and write the config; returns ``(bootstrap, config)`` paths."""
    body, mt, digest = target.manifest()
    if oci.is_index(mt):
        _doc, entries = im.parse_index(body, digest)
        want = opts.platform or im.host_platform()
        cands = [
            e
            for e in entries
            if e.platform and want.matches(e.platform) and oci.is_manifest(e.descriptor.media_type)
        ]
        nydus = [
            e
            for e in cands
            if e.descriptor.artifact_type == oci.ARTIFACT_TYPE_NYDUS_MANIFEST
            or oci.PLATFORM_FEATURE_NYDUS in (e.raw.get("platform") or {}).get("os.features", [])
        ]
        pick = nydus or cands
        if not pick:
            raise ConfigError(f"{target.ref} has no {want} image")
        body, mt, digest = target.manifest(pick[0].descriptor.digest)
    sm = im.parse_manifest(body, mt, digest, for_conversion=False)
    if not sm.layers or sm.layers[-1].annotations.get(oci.ANNOTATION_NYDUS_BOOTSTRAP) != "true":
        raise FormatError(f"{target.ref} is not a Nydus image (no bootstrap layer)")
    gz = target.client.get_blob(target.repo, sm.layers[-1].digest, max_size=1 << 30)
    boot = im.read_bootstrap_layer(gz)
    d = os.path.join(os.path.abspath(opts.work_dir), "mount", digest[7:19])
    os.makedirs(d, exist_ok=True)
    boot_path = os.path.join(d, "image.boot")
    with open(boot_path, "wb") as f:
        f.write(boot)
    cfg = nydusd_config(target, opts, os.path.join(d, "cache"))
    cfg_path = os.path.join(d, "nydusd-config.json")
    fd = os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f, indent=2)
    return boot_path, cfg_path


def find_tool(name: str) -> str:
    """The executable for ``name``: a path as given; a bare name next to the running program
    first (the tools of one virtualenv find each other when called by path), then on PATH."""
    if os.sep in name:
        if os.access(name, os.X_OK) and os.path.isfile(name):
            return name
        raise ConfigError(f"--nydusd {name}: not found (no executable file there)")
    for d in dict.fromkeys(
        (os.path.dirname(os.path.abspath(sys.argv[0])), os.path.dirname(sys.executable))
    ):
        cand = os.path.join(d, name)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"--nydusd {name}: not found next to {sys.argv[0]} nor on PATH")
    return found


def mount(target: Remote, opts: MountOptions) -> int:
    """Run nydusd for the image until it exits; returns its exit status."""
    exe = find_tool(opts.nydusd)
    parent = os.path.dirname(os.path.abspath(opts.mount_path))
    if not os.path.isdir(opts.mount_path) and not os.path.isdir(parent):
        raise ConfigError(
            f"--mount-path {opts.mount_path}: neither it nor its parent {parent} "
            "exists (only the last component is created)"
        )
    boot, cfg = prepare_mount(target, opts)
    if not os.path.isdir(opts.mount_path):
        os.mkdir(opts.mount_path)
        log.info("created the mount point %s", opts.mount_path)
    level = {"warn": "warn", "trace": "trace"}.get(opts.log_level, opts.log_level)
    cmd = [
        exe,
        "--config",
        cfg,
        "--mountpoint",
        os.path.abspath(opts.mount_path),
        "--bootstrap",
        boot,
        "--log-level",
        level,
    ]
    proc = subprocess.Popen(cmd)

    def forward(signum: int, _frame: FrameType | None) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
