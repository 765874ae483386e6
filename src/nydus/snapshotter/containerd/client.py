"""The one client of containerd's own gRPC services: namespaces, images, bounded content reads,
labels, leases, snapshot existence; each call in one namespace, under a lease if given. gRPC
errors surface as ``grpc.RpcError``. Threading: one channel per client (thread-safe); leaving
``with ContainerdClient(address) as c:`` closes it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence

import grpc
from google.protobuf import empty_pb2, field_mask_pb2
from google.protobuf.descriptor import ServiceDescriptor

from ...errors import FormatError
from .proto import (
    CONTENT_SERVICE,
    IMAGES_SERVICE,
    LEASE_HEADER,
    LEASES_SERVICE,
    NAMESPACE_HEADER,
    NAMESPACES_SERVICE,
    content_pb2,
    images_pb2,
    leases_pb2,
    namespace_pb2,
    snapshots_pb2,
)
from .rpc import ServiceClient, rpc_code, unix_target

__all__ = ["ContainerdClient", "snapshot_exists"]

_LEASE_HOURS = 1


class ContainerdClient:
    """containerd's services at ``address`` (see the module docstring)."""

    def __init__(self, address: str | os.PathLike[str], timeout: float | None = None) -> None:
        self.address = os.fspath(address)
        self.timeout = timeout
        self.channel = grpc.insecure_channel(unix_target(self.address))

    def __enter__(self) -> ContainerdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def service(
        self, service: ServiceDescriptor, namespace: str | None = None, lease: str | None = None
    ) -> ServiceClient:
        """A client of ``service`` whose calls go to ``namespace`` (under ``lease``)."""
        md = [(NAMESPACE_HEADER, namespace)] if namespace else []
        if lease:
            md.append((LEASE_HEADER, lease))
        return ServiceClient(self.channel, service, md, self.timeout)

    def namespaces(self) -> list[str]:
        """The names of containerd's namespaces."""
        resp = self.service(NAMESPACES_SERVICE).unary(
            "List", namespace_pb2.ListNamespacesRequest(), namespace_pb2.ListNamespacesResponse
        )
        return [ns.name for ns in resp.namespaces]

    def images(self, namespace: str) -> Sequence[images_pb2.Image]:
        """containerd's images in ``namespace``."""
        return (
            self.service(IMAGES_SERVICE, namespace)
            .unary("List", images_pb2.ListImagesRequest(), images_pb2.ListImagesResponse)
            .images
        )

    def read_content(self, namespace: str, digest: str, limit: int) -> bytes:
        """The bytes of blob ``digest``; a FormatError when it is larger than ``limit``."""
        chunks: list[bytes] = []
        total = 0
        req = content_pb2.ReadContentRequest(digest=digest)
        content = self.service(CONTENT_SERVICE, namespace)
        for part in content.stream("Read", req, content_pb2.ReadContentResponse):
            total += len(part.data)
            if total > limit:
                raise FormatError(f"content {digest} is larger than {limit} bytes")
            chunks.append(part.data)
        return b"".join(chunks)

    def set_labels(
        self, namespace: str, digest: str, labels: Mapping[str, str], lease: str | None = None
    ) -> None:
        """Set ``labels`` on blob ``digest`` (its other labels stay)."""
        self.service(CONTENT_SERVICE, namespace, lease).unary(
            "Update",
            content_pb2.UpdateRequest(
                info=content_pb2.Info(digest=digest, labels=dict(labels)),
                update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels]),
            ),
            content_pb2.UpdateResponse,
        )

    @contextlib.contextmanager
    def lease(self, namespace: str, prefix: str, *, keep_on_error: bool = False) -> Iterator[str]:
        """A lease ``<prefix><random>`` that expires in an hour, deleted when the block ends
        (with ``keep_on_error``, left to expire when the block raises)."""
        leases = self.service(LEASES_SERVICE, namespace)
        lease_id = f"{prefix}{secrets.token_hex(8)}"
        expire = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=_LEASE_HOURS)
        leases.unary(
            "Create",
            leases_pb2.CreateRequest(
                id=lease_id,
                labels={"containerd.io/gc.expire": expire.strftime("%Y-%m-%dT%H:%M:%SZ")},
            ),
            leases_pb2.CreateResponse,
        )
        failed = False
        try:
            yield lease_id
        except BaseException:
            failed = True
            raise
        finally:
            if not (failed and keep_on_error):
                leases.unary("Delete", leases_pb2.DeleteRequest(id=lease_id), empty_pb2.Empty)


def snapshot_exists(snaps: ServiceClient, snapshotter: str, key: str) -> bool:
    """Whether containerd's ``snapshotter`` has a snapshot ``key`` (``Stat``; NOT_FOUND is
    False, any other error is raised). ``snaps`` is a Snapshots service client."""
    try:
        snaps.unary(
            "Stat",
            snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=key),
            snapshots_pb2.StatSnapshotResponse,
        )
        return True
    except grpc.RpcError as e:
        if rpc_code(e) == grpc.StatusCode.NOT_FOUND:
            return False
        raise
