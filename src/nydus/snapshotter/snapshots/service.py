"""containerd's ``containerd.services.snapshots.v1.Snapshots`` gRPC service.

:class:`SnapshotsService` turns requests into :class:`~.core.Snapshotter` calls and errors into
the status codes containerd expects (:func:`~..containerd.errdefs.grpc_code_of`); it holds no
logic of its own. :class:`~nydus.snapshotter.server.SnapshotterServer` serves it.

containerd calls us as a proxy plugin (``[proxy_plugins.NAME] type = "snapshot"``); the
``snapshotter`` field of each request is that plugin name: it is remembered
(:attr:`SnapshotsService.plugin_name`, default ``nydus``) for the calls the snapshotter makes to
containerd's own Snapshots service (:mod:`~..content.remotelayers`). containerd 1.6 sends no
``containerd-namespace`` metadata to proxy plugins (seen in the end-to-end tests); the namespace
is the first part of the keys its metadata layer gives us (``<ns>/<n>/<key>``), and the header
is only a fallback for other callers.

Threading: grpcio runs each call on a worker thread of the server's pool; the snapshotter is
thread-safe (see :mod:`.core`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from google.protobuf import empty_pb2
from google.protobuf.message import Message
from grpc import ServicerContext as Ctx

from ...credentials import redact_labels
from ..containerd.proto import NAMESPACE_HEADER, SNAPSHOTS_SERVICE, mount_pb2
from ..containerd.proto import snapshots_pb2 as pb
from ..containerd.rpc import Servicer, batches, handled, timestamp, update_paths
from .core import Mount, Snapshotter
from .store import Info

__all__ = ["SnapshotsService", "info_to_pb"]

log = logging.getLogger(__name__)


def info_to_pb(info: Info) -> pb.Info:
    return pb.Info(
        name=info.name,
        parent=info.parent,
        kind=int(info.kind),  # type: ignore[arg-type]  # same numbering as the proto enum
        created_at=timestamp(info.created_ns),
        updated_at=timestamp(info.updated_ns),
        labels=dict(info.labels),
    )


def _mounts_to_pb(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [
        mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))
        for m in mounts
    ]


def _namespace(ctx: Ctx) -> str | None:
    for k, v in ctx.invocation_metadata() or ():
        if k == NAMESPACE_HEADER and isinstance(v, str):
            return v
    return None


class SnapshotsService(Servicer):
    """The Snapshots service methods (names as in snapshots.proto)."""

    service = SNAPSHOTS_SERVICE

    #: The proxy plugin name containerd uses for us until a request says otherwise.
    DEFAULT_PLUGIN_NAME = "nydus"

    def __init__(self, snapshotter: Snapshotter) -> None:
        super().__init__()
        self.sn = snapshotter
        self.plugin_name = self.DEFAULT_PLUGIN_NAME

    def seen(self, req: Message) -> None:
        name = getattr(req, "snapshotter", "")
        if name and name != self.plugin_name:
            log.info("containerd calls this snapshotter %r", name)
            self.plugin_name = name

    @handled
    def Prepare(self, req: pb.PrepareSnapshotRequest, ctx: Ctx) -> pb.PrepareSnapshotResponse:
        ns = _namespace(ctx)
        log.debug(
            "Prepare key=%s parent=%s labels=%s namespace=%s",
            req.key,
            req.parent,
            redact_labels(req.labels),
            ns,
        )
        mounts = self.sn.prepare(req.key, req.parent, dict(req.labels), ns)
        return pb.PrepareSnapshotResponse(mounts=_mounts_to_pb(mounts))

    @handled
    def View(self, req: pb.ViewSnapshotRequest, ctx: Ctx) -> pb.ViewSnapshotResponse:
        log.debug("View key=%s parent=%s", req.key, req.parent)
        mounts = self.sn.view(req.key, req.parent, dict(req.labels), _namespace(ctx))
        return pb.ViewSnapshotResponse(mounts=_mounts_to_pb(mounts))

    @handled
    def Mounts(self, req: pb.MountsRequest, ctx: Ctx) -> pb.MountsResponse:
        return pb.MountsResponse(mounts=_mounts_to_pb(self.sn.mounts(req.key)))

    @handled
    def Commit(self, req: pb.CommitSnapshotRequest, ctx: Ctx) -> empty_pb2.Empty:
        log.debug("Commit name=%s key=%s", req.name, req.key)
        self.sn.commit(req.name, req.key, dict(req.labels))
        return empty_pb2.Empty()

    @handled
    def Remove(self, req: pb.RemoveSnapshotRequest, ctx: Ctx) -> empty_pb2.Empty:
        log.debug("Remove key=%s", req.key)
        self.sn.remove(req.key)
        return empty_pb2.Empty()

    @handled
    def Stat(self, req: pb.StatSnapshotRequest, ctx: Ctx) -> pb.StatSnapshotResponse:
        return pb.StatSnapshotResponse(info=info_to_pb(self.sn.stat(req.key)))

    @handled
    def Update(self, req: pb.UpdateSnapshotRequest, ctx: Ctx) -> pb.UpdateSnapshotResponse:
        info = self.sn.update(req.info.name, dict(req.info.labels), update_paths(req))
        return pb.UpdateSnapshotResponse(info=info_to_pb(info))

    @handled
    def List(self, req: pb.ListSnapshotsRequest, ctx: Ctx) -> Iterator[pb.ListSnapshotsResponse]:
        infos = self.sn.walk(list(req.filters))  # evaluated now, so errors become a status
        return (
            pb.ListSnapshotsResponse(info=[info_to_pb(x) for x in chunk])
            for chunk in batches(infos)
        )

    @handled
    def Usage(self, req: pb.UsageRequest, ctx: Ctx) -> pb.UsageResponse:
        u = self.sn.usage(req.key)
        return pb.UsageResponse(size=u.size, inodes=u.inodes)

    @handled
    def Cleanup(self, req: pb.CleanupRequest, ctx: Ctx) -> empty_pb2.Empty:
        self.sn.cleanup()
        return empty_pb2.Empty()
