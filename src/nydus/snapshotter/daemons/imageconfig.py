"""The nydusd config of one image: the snapshotter's template plus what the image says.

``--config-path`` names a nydusd JSON config without the per-image keys (the seed article's
``/etc/nydus/config.json`` has a registry backend with ``scheme``, timeouts and an empty
``auth``, but no ``host`` or ``repo``). For each image the daemon manager fills in:

- ``device.backend.config.host`` and ``repo`` from the image reference (Docker Hub names go to
  ``registry-1.docker.io``), for a ``registry`` backend; other backends are used as written;
- credentials, first found wins (upstream's keychain order, narrowed to what applies here):
  1. the snapshot labels ``containerd.io/snapshot/pullusername`` + ``pullsecret`` (what a
     caller passes for one image);
  2. the template's own ``auth`` / ``registry_token`` when not empty (the article: replace the
     config's content if the docker login is not wanted);
  3. ``~/.docker/config.json`` (or ``$DOCKER_CONFIG``) entries for the registry host;
- ``device.cache.config.work_dir`` = the snapshotter's cache dir (every daemon shares it, so
  shared blobs are fetched once and GC sees one directory), with a ``blobcache`` cache when the
  template names no cache type (an explicit ``dummycache`` is kept).

Without ``--config-path`` the template is :data:`DEFAULT_TEMPLATE`. The result is checked by
:meth:`nydus.config.DaemonConfig.from_json` (strict), so a template that cannot work for an image
fails the mount with the config error, not a dead daemon.

Pure functions over dicts; thread-safe.
"""

from __future__ import annotations

import base64
import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...config import DaemonConfig
from ...errors import ConfigError, NydusError
from ...registry.auth import docker_config_credentials
from ...registry.reference import parse_reference

__all__ = [
    "DEFAULT_TEMPLATE",
    "PULL_SECRET",
    "PULL_USERNAME",
    "check_template",
    "image_config",
]

log = logging.getLogger(__name__)

PULL_USERNAME = "containerd.io/snapshot/pullusername"
PULL_SECRET = "containerd.io/snapshot/pullsecret"

#: Used when ``--config-path`` is not given: registry backend (scheme auto-detected), blob cache.
DEFAULT_TEMPLATE: dict[str, Any] = {
    "device": {
        "backend": {
            "type": "registry",
            "config": {"scheme": "", "timeout": 5, "connect_timeout": 5, "retry_limit": 2},
        },
        "cache": {"type": "blobcache", "config": {"work_dir": "cache"}},
    },
    "mode": "direct",
    "digest_validate": False,
    "enable_xattr": True,
    "fs_prefetch": {"enable": False},
}


def check_template(template: Mapping[str, Any]) -> DaemonConfig:
    """Validate the snapshotter's template (per-image keys may be missing)."""
    try:
        return DaemonConfig.from_json(dict(template), template=True, environ={})
    except ConfigError as e:
        raise ConfigError(f"--config-path: {e}") from None


def _basic(user: str, secret: str) -> str:
    return base64.b64encode(f"{user}:{secret}".encode()).decode("ascii")


def _credentials(
    host: str,
    labels: Mapping[str, str],
    backend: dict[str, Any],
    docker_config: Path | None,
) -> tuple[str, dict[str, str]]:
    """``(source, keys to set)`` for the backend's credentials."""
    user, secret = labels.get(PULL_USERNAME, ""), labels.get(PULL_SECRET, "")
    if secret:
        if user:
            return "labels", {"auth": _basic(user, secret)}
        return "labels", {"registry_token": secret}
    if backend.get("auth") or backend.get("registry_token"):
        return "config", {}
    if docker_config is not None:
        try:
            creds = docker_config_credentials(host, docker_config)
        except NydusError as e:
            log.warning("docker config %s: %s (continuing without credentials)", docker_config, e)
            creds = None
        if creds is not None:
            if creds.username:
                return "docker config", {"auth": _basic(creds.username, creds.password)}
            if creds.registry_token:
                return "docker config", {"registry_token": creds.registry_token}
            if creds.identity_token:
                log.warning(
                    "docker config has only an identity token for %s; nydusd cannot use it", host
                )
    return "none", {}


def image_config(
    template: Mapping[str, Any],
    image_ref: str | None,
    labels: Mapping[str, str],
    cache_dir: Path,
    docker_config: Path | None = None,
) -> tuple[dict[str, Any], str]:
    """``(nydusd config, where the credentials came from)`` for one image.

    Raises :class:`ConfigError` when a registry backend has no host/repo and the image
    reference is unknown, or the result is not a valid nydusd config.
    """
    cfg = copy.deepcopy(dict(template))
    device = cfg.setdefault("device", {})
    backend = device.setdefault("backend", {"type": "registry", "config": {}})
    bconf = backend.setdefault("config", {})
    source = "n/a"
    if backend.get("type") == "registry":
        if image_ref:
            ref = parse_reference(image_ref)
            bconf["host"] = ref.api_host
            bconf["repo"] = ref.repository
        elif not (bconf.get("host") and bconf.get("repo")):
            raise ConfigError(
                "the image reference of this Nydus image is unknown (no CRI label, and "
                "containerd has no image with this bootstrap layer), so the registry its blobs "
                "come from is unknown; pull it with nydus-pull, or set device.backend.config."
                "host and repo in --config-path"
            )
        source, keys = _credentials(str(bconf["host"]), labels, bconf, docker_config)
        bconf.update(keys)
    cache = device.setdefault("cache", {})
    if not cache.get("type"):
        cache["type"] = "blobcache"
    cache.setdefault("config", {})["work_dir"] = str(cache_dir)
    try:
        DaemonConfig.from_json(cfg, environ={})
    except ConfigError as e:
        raise ConfigError(f"nydusd config for {image_ref or 'this image'}: {e}") from None
    return cfg, source
