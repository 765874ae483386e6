"""The containerd API messages and service descriptors the snapshotter speaks.

Importing this module makes sure the generated package ``._api`` exists and
is current (:func:`.protogen.ensure_generated`), then re-exports what the rest of the package
uses under short names. Nothing here is hand-written protocol: the messages and descriptors all
come from containerd's own ``.proto`` files.
"""

from __future__ import annotations

from google.protobuf.descriptor import ServiceDescriptor

from .protogen import ensure_generated

ensure_generated()

# ruff: noqa: E402  (the imports below need the generated package to exist)
from ._api.containerd.services.content.v1 import content_pb2
from ._api.containerd.services.images.v1 import images_pb2
from ._api.containerd.services.leases.v1 import leases_pb2
from ._api.containerd.services.namespaces.v1 import namespace_pb2
from ._api.containerd.services.snapshots.v1 import snapshots_pb2
from ._api.containerd.types import descriptor_pb2, mount_pb2

__all__ = [
    "CONTENT_SERVICE",
    "NAMESPACE_HEADER",
    "IMAGES_SERVICE",
    "LEASE_HEADER",
    "LEASES_SERVICE",
    "NAMESPACES_SERVICE",
    "SNAPSHOTS_SERVICE",
    "content_pb2",
    "descriptor_pb2",
    "images_pb2",
    "leases_pb2",
    "mount_pb2",
    "namespace_pb2",
    "snapshots_pb2",
]

SNAPSHOTS_SERVICE: ServiceDescriptor = snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"]
IMAGES_SERVICE: ServiceDescriptor = images_pb2.DESCRIPTOR.services_by_name["Images"]
CONTENT_SERVICE: ServiceDescriptor = content_pb2.DESCRIPTOR.services_by_name["Content"]
LEASES_SERVICE: ServiceDescriptor = leases_pb2.DESCRIPTOR.services_by_name["Leases"]
NAMESPACES_SERVICE: ServiceDescriptor = namespace_pb2.DESCRIPTOR.services_by_name["Namespaces"]

#: gRPC metadata key containerd reads the namespace from.
NAMESPACE_HEADER = "containerd-namespace"
#: gRPC metadata key naming the lease that protects what a call creates from containerd's GC.
LEASE_HEADER = "containerd-lease"
