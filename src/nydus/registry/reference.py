"""Image references: ``[host[:port]/]repo[:tag][@digest]`` with Docker's defaults.

Owns the parsing and printing of references as docker/containerd understand them:

- a first path component is a registry host if it contains ``.`` or ``:``, is ``localhost``,
  or has upper-case letters (a repository name cannot); otherwise the registry is
  ``docker.io`` and a one-component repository gets the ``library/`` prefix;
- ``index.docker.io`` is spelled ``docker.io``; the API endpoint of ``docker.io`` is
  ``registry-1.docker.io`` (:func:`registry_api_host`);
- no tag and no digest means the tag ``latest``; a tag and a digest may both be given, and then
  the digest is what is fetched.

Pure values, safe from any thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nydus.errors import ConfigError, FormatError
from nydus.format.oci import parse_digest

__all__ = [
    "DEFAULT_REGISTRY",
    "DEFAULT_TAG",
    "Reference",
    "parse_reference",
    "registry_api_host",
    "normalize_registry",
]

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
_DOCKER_HUB_ALIASES = (
    "docker.io",
    "index.docker.io",
    "registry-1.docker.io",
    "registry.hub.docker.com",
)

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_HOST_RE = re.compile(
    r"^(?:\[[0-9a-fA-F:.]+\]|[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*)(?::[0-9]+)?$"
)


def normalize_registry(host: str) -> str:
    """``index.docker.io`` and friends → ``docker.io``; other hosts lower-cased as given."""
    h = host.lower()
    return DEFAULT_REGISTRY if h in _DOCKER_HUB_ALIASES else h


def registry_api_host(host: str) -> str:
    """The host that serves ``/v2/`` for a registry name (``docker.io`` → registry-1)."""
    return "registry-1.docker.io" if normalize_registry(host) == DEFAULT_REGISTRY else host


@dataclass(frozen=True)
class Reference:
    """A parsed image reference. ``registry`` is normalized (``docker.io`` for Docker Hub)."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def ref(self) -> str:
        """What to put after ``/manifests/``: the digest if any, else the tag (or latest)."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def api_host(self) -> str:
        """The ``host[:port]`` to connect to (see :func:`registry_api_host`)."""
        return registry_api_host(self.registry)

    def with_tag(self, tag: str) -> Reference:
        """The same repository at another tag (no digest)."""
        if not _TAG_RE.match(tag):
            raise ConfigError(f"invalid tag {tag!r}")
        return Reference(self.registry, self.repository, tag, None)

    def with_digest(self, digest: str) -> Reference:
        """The same repository pinned to ``digest`` (tag kept for display)."""
        try:
            parse_digest(digest)
        except FormatError as e:
            raise ConfigError(str(e)) from None
        return Reference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        s = f"{self.registry}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def parse_reference(text: str, *, default_registry: str = DEFAULT_REGISTRY) -> Reference:
    """Parse ``text`` into a :class:`Reference`; raises :class:`ConfigError` when malformed.

    A ``docker://`` prefix (skopeo style) is accepted and dropped. ``default_registry`` is used
    when the reference names none (``library/`` is only added for Docker Hub).
    """
    s = text.strip()
    if s.startswith("docker://"):
        s = s[len("docker://") :]
    if not s:
        raise ConfigError("empty image reference")
    digest: str | None = None
    if "@" in s:
        s, digest = s.split("@", 1)
        try:
            parse_digest(digest)
        except FormatError as e:
            raise ConfigError(f"invalid image reference {text!r}: {e}") from None
    registry, rest = _split_registry(s, default_registry)
    tag: str | None = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise ConfigError(f"invalid tag {tag!r} in image reference {text!r}")
    if not _REPO_RE.match(rest):
        raise ConfigError(f"invalid repository name {rest!r} in image reference {text!r}")
    if len(rest) > 255:
        raise ConfigError(f"repository name too long in image reference {text!r}")
    if registry == DEFAULT_REGISTRY and "/" not in rest:
        rest = "library/" + rest
    return Reference(registry, rest, tag, digest)


def _split_registry(s: str, default_registry: str) -> tuple[str, str]:
    first, sep, rest = s.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.lower() != first):
        if not _HOST_RE.match(first):
            raise ConfigError(f"invalid registry host {first!r} in image reference {s!r}")
        return normalize_registry(first), rest
    return normalize_registry(default_registry), s
