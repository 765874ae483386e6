"""OCI distribution client (registry/): auth, ranges, redirects, push, manifests and indexes.

Public surface, re-exported here:

- :class:`RegistryClient` (``client.py``): one registry host; ping, manifests, blob ranges
  and streams, uploads, cross-repo mounts, tags. Thread-safe. :class:`RegistryOptions` says
  how it connects.
- :class:`RegistryHTTPError`, :class:`ClientStats`.
- :func:`parse_reference`, :class:`Reference` (``reference.py``).
- :class:`Credentials`, :func:`docker_config_credentials` (``auth.py``).
- From :mod:`nydus.http`, the transport seam: :class:`MockTransport`, :class:`Request`,
  :class:`Response`, :class:`TransportError`, :class:`TLSError`.

Dependencies point down: client → session → auth, upload → nydus.http → errors, format.oci.
"""

from nydus.http import MockTransport, Request, Response, TLSError, Transport, TransportError
from nydus.registry.auth import Credentials, docker_config_credentials
from nydus.registry.client import ClientStats, RegistryClient, RegistryHTTPError, RegistryOptions
from nydus.registry.reference import Reference, parse_reference

__all__ = [
    "RegistryClient",
    "RegistryOptions",
    "RegistryHTTPError",
    "ClientStats",
    "Reference",
    "parse_reference",
    "Credentials",
    "docker_config_credentials",
    "Transport",
    "MockTransport",
    "Request",
    "Response",
    "TransportError",
    "TLSError",
]
