"""OCI distribution client (registry/): auth, ranges, redirects, push, manifests and indexes.

Public surface, re-exported here:

- :class:`RegistryClient` (``client.py``): one registry host; ping, manifests, blob ranges
  and streams, uploads, cross-repo mounts, tags. Thread-safe.
- :class:`ProxySettings`, :class:`RegistryHTTPError`, :class:`ClientStats`.
- :func:`parse_reference`, :class:`Reference` (``reference.py``).
- :class:`Credentials`, :func:`docker_config_credentials` (``auth.py``).
- The transport seam (``transport.py``): :class:`Transport`, :class:`HTTPTransport`,
  :class:`MockTransport`, :class:`Request`, :class:`Response`, :class:`TransportError`,
  :class:`TLSError`.

Dependencies point down: client → auth, upload, transport → errors, format.oci.
"""

from nydus.registry.auth import Credentials, docker_config_credentials
from nydus.registry.client import ClientStats, ProxySettings, RegistryClient, RegistryHTTPError
from nydus.registry.reference import Reference, parse_reference
from nydus.registry.transport import (
    FallbackProxyTransport,
    Headers,
    HTTPTransport,
    MockTransport,
    Request,
    Response,
    TLSError,
    Transport,
    TransportError,
)

__all__ = [
    "RegistryClient",
    "ProxySettings",
    "RegistryHTTPError",
    "ClientStats",
    "Reference",
    "parse_reference",
    "Credentials",
    "docker_config_credentials",
    "Transport",
    "HTTPTransport",
    "FallbackProxyTransport",
    "MockTransport",
    "Request",
    "Response",
    "Headers",
    "TransportError",
    "TLSError",
]
