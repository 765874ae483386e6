"""containerd's ``containerd.services.content.v1.Content`` gRPC service over a content store.

Served on the snapshotter's socket next to the Snapshots service when ``--content-store`` is on.
containerd then uses it as its content store when its config says::

    version = 2
    disabled_plugins = ["io.containerd.content.v1.content"]
    [proxy_plugins.nydus-content]
      type = "content"
      address = "/run/containerd-nydus/containerd-nydus-grpc.sock"

(containerd's metadata layer takes the first content plugin it finds, and always registers its
local one; disabling it makes ours the only one. Version 2 matters: a version-1 config disables
plugins by ID, and ``content`` is also the ID of containerd's content gRPC service.)

containerd's metadata layer keeps namespaces, labels and leases itself and calls us as its
backend: ``Info`` (also to ask whether a blob it is about to download is already here: then it
is not downloaded), ``Write`` sessions under refs ``<namespace>/<n>/<ref>``, ``Read``, and
``List``/``Delete``/``ListStatuses``/``Abort`` from its garbage collector. The semantics follow
containerd's own content server (``services/content/contentserver``) over its local store; what
the store does is in :mod:`.store`.

:class:`ContentHooks` lets the Nydus side (:mod:`.nydusblobs`) see commits (to record lazy
entries for the data blobs a manifest lists), act before a blob is read (to register remote
snapshots before containerd's unpack looks for them) and provide the bytes of a lazy entry.
Hooks never fail a request: their errors are logged.

Threading: grpcio runs each call on a worker thread; the store is thread-safe.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

from google.protobuf import empty_pb2
from grpc import ServicerContext as Ctx

from ..containerd.errdefs import (
    SnapshotExists,
    SnapshotInvalidArgument,
    SnapshotPreconditionFailed,
)
from ..containerd.proto import CONTENT_SERVICE
from ..containerd.proto import content_pb2 as pb
from ..containerd.rpc import (
    Servicer,
    abort_with_status,
    batches,
    handled,
    timestamp,
    update_paths,
)
from ..snapshots.filters import Filter, label_field, parse_all
from .store import ContentInfo, ContentStore, IngestStatus, IngestWriter, LazyEntry

__all__ = ["ContentHooks", "ContentService"]

log = logging.getLogger(__name__)


class ContentHooks(Protocol):
    def committed(self, digest: str, ref: str) -> None:
        """A blob was committed through ``Write`` under ``ref``."""
        ...

    def deleted(self, digest: str) -> None:
        """A blob (or lazy entry) was deleted."""
        ...

    def before_read(self, digest: str) -> None:
        """``Read`` of blob ``digest`` is about to be served (may block briefly)."""
        ...

    def lazy_source(self, entry: LazyEntry) -> Iterable[bytes]:
        """The bytes of a lazy entry (checked by the store), or raise a clear error."""
        ...


def info_to_pb(info: ContentInfo) -> pb.Info:
    return pb.Info(
        digest=info.digest,
        size=info.size,
        created_at=timestamp(info.created_ns),
        updated_at=timestamp(info.updated_ns),
        labels=dict(info.labels),
    )


def status_to_pb(st: IngestStatus) -> pb.Status:
    return pb.Status(
        ref=st.ref,
        offset=st.offset,
        total=st.total,
        expected=st.expected,
        started_at=timestamp(st.started_ns),
        updated_at=timestamp(st.updated_ns),
    )


def _content_field(info: ContentInfo, path: Sequence[str]) -> tuple[str, bool]:
    if not path:
        return "", False
    if path[0] == "digest":
        return info.digest, True
    if path[0] == "size":
        return str(info.size), True
    if path[0] == "labels":
        return label_field(info.labels, path)
    return "", False


def _status_field(st: IngestStatus, path: Sequence[str]) -> tuple[str, bool]:
    if path and path[0] == "ref":
        return st.ref, True
    return "", False


class ContentService(Servicer):
    """The Content service methods (names as in content.proto)."""

    service = CONTENT_SERVICE
    log_prefix = "content "

    def __init__(self, store: ContentStore, hooks: ContentHooks | None = None) -> None:
        super().__init__()
        self.store = store
        self.hooks = hooks

    def _hook(self, fn: Callable[..., None], *args: str) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("content hook %s%r failed (ignored)", fn.__name__, args)

    # -- unary ----------------------------------------------------------------------------

    @handled
    def Info(self, req: pb.InfoRequest, ctx: Ctx) -> pb.InfoResponse:
        return pb.InfoResponse(info=info_to_pb(self.store.info(req.digest)))

    @handled
    def Update(self, req: pb.UpdateRequest, ctx: Ctx) -> pb.UpdateResponse:
        info = self.store.update(req.info.digest, dict(req.info.labels), update_paths(req))
        return pb.UpdateResponse(info=info_to_pb(info))

    @handled
    def Delete(self, req: pb.DeleteContentRequest, ctx: Ctx) -> empty_pb2.Empty:
        self.store.delete(req.digest)
        log.debug("deleted content %s", req.digest)
        if self.hooks is not None:
            self._hook(self.hooks.deleted, req.digest)
        return empty_pb2.Empty()

    @handled
    def Status(self, req: pb.StatusRequest, ctx: Ctx) -> pb.StatusResponse:
        return pb.StatusResponse(status=status_to_pb(self.store.status(req.ref)))

    @handled
    def ListStatuses(self, req: pb.ListStatusesRequest, ctx: Ctx) -> pb.ListStatusesResponse:
        f = parse_all(list(req.filters))
        sts = self.store.list_statuses()
        sts = [s for s in sts if f.match(functools.partial(_status_field, s))]
        return pb.ListStatusesResponse(statuses=[status_to_pb(s) for s in sts])

    @handled
    def Abort(self, req: pb.AbortRequest, ctx: Ctx) -> empty_pb2.Empty:
        self.store.abort(req.ref)
        return empty_pb2.Empty()

    # -- server streaming -----------------------------------------------------------------

    @handled
    def List(self, req: pb.ListContentRequest, ctx: Ctx) -> Iterator[pb.ListContentResponse]:
        f: Filter = parse_all(list(req.filters))
        infos = [i for i in self.store.walk() if f.match(functools.partial(_content_field, i))]
        return (
            pb.ListContentResponse(info=[info_to_pb(x) for x in chunk]) for chunk in batches(infos)
        )

    def _materialize(self, entry: LazyEntry) -> None:
        if self.hooks is None:
            raise SnapshotPreconditionFailed(
                f"content {entry.digest} is a lazy entry (its bytes stay in the registry) and "
                "this content store has no way to fetch it"
            )
        log.info("fetching lazy blob %s (%d bytes) for a read", entry.digest, entry.size)
        self.store.materialize(entry.digest, self.hooks.lazy_source(entry))

    @handled
    def Read(self, req: pb.ReadContentRequest, ctx: Ctx) -> Iterator[pb.ReadContentResponse]:
        if self.hooks is not None:
            self._hook(self.hooks.before_read, req.digest)
        if not self.store.has_blob(req.digest):
            entry = self.store.lazy(req.digest)
            if entry is not None:
                self._materialize(entry)
        chunks = self.store.read(req.digest, req.offset, req.size)
        start = max(req.offset, 0)

        def responses() -> Iterator[pb.ReadContentResponse]:
            offset = start
            try:
                for piece in chunks:
                    yield pb.ReadContentResponse(offset=offset, data=piece)
                    offset += len(piece)
            except Exception as e:
                abort_with_status(ctx, "content Read", e)

        return responses()

    # -- bidirectional --------------------------------------------------------------------

    def Write(
        self, requests: Iterator[pb.WriteContentRequest], ctx: Ctx
    ) -> Iterator[pb.WriteContentResponse]:
        """A write session: the first message names the ref; STAT, WRITE and COMMIT follow
        (containerd's content server semantics: see the module docstring)."""
        with self.inflight:
            try:
                yield from self._write(requests)
            except Exception as e:
                abort_with_status(ctx, "content Write", e)

    def _write(
        self, requests: Iterator[pb.WriteContentRequest]
    ) -> Iterator[pb.WriteContentResponse]:
        req = next(requests, None)
        if req is None:
            return
        if not req.ref:
            raise SnapshotInvalidArgument("first message must have a reference")
        ref, total, expected = req.ref, req.total, req.expected
        w: IngestWriter = self.store.writer(ref, total, expected)
        try:
            while True:
                resp = pb.WriteContentResponse(action=req.action)
                resp.offset = w.offset
                if req.expected:
                    expected = req.expected
                    if self.store.has_blob(expected):
                        w.close()
                        self.store.abort_quiet(ref)
                        raise SnapshotExists(f"blob with expected digest {expected} exists")
                if req.total > 0:
                    total = req.total
                    w.set_total(total)
                if req.action == pb.STAT:
                    st = w.status()
                    resp.digest = w.digest()
                    resp.started_at.CopyFrom(timestamp(st.started_ns))
                    resp.updated_at.CopyFrom(timestamp(st.updated_ns))
                    resp.total = total
                elif req.action in (pb.WRITE, pb.COMMIT):
                    resp.offset = w.write_at(req.offset, req.data)
                    if req.action == pb.COMMIT:
                        digest = w.commit(total, expected, dict(req.labels))
                        resp.digest = digest
                        log.debug("committed %s (%d bytes) from ref %s", digest, resp.offset, ref)
                        if self.hooks is not None:
                            self._hook(self.hooks.committed, digest, ref)
                        yield resp
                        return
                    resp.digest = w.digest()
                yield resp
                req = next(requests, None)
                if req is None:
                    return
        finally:
            w.close()
