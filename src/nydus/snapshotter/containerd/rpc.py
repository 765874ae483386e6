"""Typed gRPC plumbing built from service descriptors (instead of generated ``*_pb2_grpc``).

The generated message modules (:mod:`.proto`) carry full service descriptors: method names,
request/response types and streaming flags. :func:`generic_handler` turns a descriptor plus a
mapping of Python callables into a server-side handler, and :class:`ServiceClient` calls a
service's methods with the descriptor checking each name and response type. Both use only
grpcio's public generic API (``method_handlers_generic_handler``, ``Channel.unary_unary``), so
the wire behaviour is exactly that of generated stubs, with types mypy can follow.

:class:`Servicer` is the base of the services we serve, and :func:`handled` wraps their
methods: the call is counted in flight (so a stop can wait for it), logged, and any exception
becomes the status code containerd expects (:func:`~.errdefs.grpc_code_of`).

Stateless apart from the channel a client holds and the in-flight counts; grpcio channels are
thread-safe.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from .errdefs import SnapshotExists, SnapshotInvalidArgument, SnapshotNotFound, grpc_code_of

__all__ = [
    "InFlight",
    "ServiceClient",
    "Servicer",
    "abort_with_status",
    "batches",
    "generic_handler",
    "handled",
    "method_path",
    "rpc_code",
    "rpc_error_text",
    "timestamp",
    "unix_target",
    "updated_labels",
]

M = TypeVar("M", bound=Message)
R = TypeVar("R")
T = TypeVar("T")

_LIST_BATCH = 100  # entries per message of a streamed List answer

log = logging.getLogger(__name__)


class InFlight:
    """Counts calls being handled, so that a stop can wait for them to finish."""

    def __init__(self) -> None:
        self._n = 0
        self._cond = threading.Condition()

    def __enter__(self) -> None:
        with self._cond:
            self._n += 1

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._n -= 1
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._n == 0, timeout)


class Servicer:
    """Base of a gRPC service we serve: its calls in flight, a hook for each request. Each
    method of ``service`` is the servicer's method of the same name."""

    service: ClassVar[ServiceDescriptor]
    #: How its calls are named in the log ("content " for the Content service).
    log_prefix = ""

    def __init__(self) -> None:
        self.inflight = InFlight()

    def seen(self, request: Message) -> None:
        """Called with each request before it is handled (default: nothing)."""

    def handler(self) -> grpc.GenericRpcHandler:
        return generic_handler(
            self.service, {m.name: getattr(self, m.name) for m in self.service.methods}
        )


def abort_with_status(ctx: grpc.ServicerContext, name: str, e: BaseException) -> None:
    """Log ``e`` (quietly for "not found" and "exists") and abort the call with its status."""
    code = grpc_code_of(e)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("%s failed unexpectedly", name)
    else:
        quiet = isinstance(e, SnapshotExists | SnapshotNotFound)
        log.log(logging.DEBUG if quiet else logging.WARNING, "%s: %s", name, e)
    ctx.abort(code, str(e))


def handled(fn: Callable[..., R]) -> Callable[..., R]:
    """Wrap a :class:`Servicer` method named as the RPC: count, log and time the call; errors
    of a unary call (or of the eager part of a streaming one) become statuses
    (:func:`abort_with_status`)."""

    @functools.wraps(fn)
    def call(self: Servicer, req: Message, ctx: grpc.ServicerContext) -> R:
        what = self.log_prefix + fn.__name__
        t0 = time.monotonic()
        try:
            with self.inflight:
                self.seen(req)
                out = fn(self, req, ctx)
        except Exception as e:
            abort_with_status(ctx, what, e)
            raise  # not reached: abort raises
        log.debug("%s done in %.3fs", what, time.monotonic() - t0)
        return out

    return call


def timestamp(ns: int) -> Timestamp:
    """A protobuf timestamp of nanoseconds since the epoch."""
    return Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def update_paths(req: Message) -> list[str]:
    """The fields an ``Update`` request's ``update_mask`` names (none: replace them all)."""
    return list(req.update_mask.paths) if req.HasField("update_mask") else []  # type: ignore[attr-defined]


def updated_labels(
    current: Mapping[str, str], labels: Mapping[str, str], fieldpaths: Sequence[str], what: str
) -> dict[str, str]:
    """The labels after containerd's ``Update`` of an object (``what``, for the error) that has
    ``current``: no field paths, or ``labels``, replace them all with ``labels``;
    ``labels.<key>`` sets that key from ``labels``, or removes it if ``labels`` has none. Only
    labels are mutable: any other path is a SnapshotInvalidArgument."""
    if not fieldpaths:
        return dict(labels)
    updated = dict(current)
    for path in fieldpaths:
        if path == "labels":
            updated = dict(labels)
        elif path.startswith("labels."):
            key = path[len("labels.") :]
            if key in labels:
                updated[key] = labels[key]
            else:
                updated.pop(key, None)
        else:
            raise SnapshotInvalidArgument(f"cannot update {path!r} field on {what}")
    return updated


def batches(items: Sequence[T]) -> Iterator[Sequence[T]]:
    """``items`` in slices of the size a streamed List answer sends per message."""
    for i in range(0, len(items), _LIST_BATCH):
        yield items[i : i + _LIST_BATCH]


def method_path(service: ServiceDescriptor, name: str) -> str:
    """``/package.Service/Method``, the HTTP/2 path of a gRPC method."""
    if name not in service.methods_by_name:
        raise KeyError(f"{service.full_name} has no method {name!r}")
    return f"/{service.full_name}/{name}"


def rpc_code(e: grpc.RpcError) -> grpc.StatusCode | None:
    """The status code of a failed call, if it has one."""
    code = getattr(e, "code", None)
    c = code() if callable(code) else None
    return c if isinstance(c, grpc.StatusCode) else None


def rpc_error_text(e: grpc.RpcError) -> str:
    """``CODE: details`` of a failed call (grpcio's errors are also ``grpc.Call`` objects)."""
    code = getattr(e, "code", None)
    details = getattr(e, "details", None)
    if callable(code) and callable(details):
        c = code()
        return f"{getattr(c, 'name', c)}: {details()}"
    return str(e)


def unix_target(path: str) -> str:
    """A grpcio target for a unix socket path (absolute or relative)."""
    return f"unix:{path}"


def generic_handler(
    service: ServiceDescriptor, methods: Mapping[str, Callable[..., Any]]
) -> grpc.GenericRpcHandler:
    """A handler serving ``service`` with ``methods[name](request, context)``.

    Unary methods return a response message; server-streaming ones return an iterator of them.
    Client-streaming methods get an iterator of requests instead of one request (bidirectional
    ones return an iterator of responses, as grpcio's ``stream_stream`` handlers do). Methods
    missing from ``methods`` answer UNIMPLEMENTED (grpcio's default).
    """
    unknown = set(methods) - set(service.methods_by_name)
    if unknown:
        raise KeyError(f"{service.full_name} has no methods {sorted(unknown)}")
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for m in service.methods:
        fn = methods.get(m.name)
        if fn is None:
            continue
        req_cls = message_factory.GetMessageClass(m.input_type)
        resp_cls = message_factory.GetMessageClass(m.output_type)
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(bool(m.client_streaming), bool(m.server_streaming))]
        handlers[m.name] = make(
            fn,
            request_deserializer=req_cls.FromString,
            response_serializer=resp_cls.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


class ServiceClient:
    """Calls the methods of one service over ``channel`` with fixed metadata (e.g. namespace)."""

    def __init__(
        self,
        channel: grpc.Channel,
        service: ServiceDescriptor,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
    ) -> None:
        self.channel = channel
        self.service = service
        self.metadata = tuple(metadata)
        self.timeout = timeout

    def _method(self, name: str, response_type: type[Message], streaming: bool) -> MethodDescriptor:
        m = self.service.methods_by_name.get(name)
        if m is None:
            raise KeyError(f"{self.service.full_name} has no method {name!r}")
        if response_type.DESCRIPTOR.full_name != m.output_type.full_name:
            raise TypeError(f"{m.full_name} returns {m.output_type.full_name}")
        if bool(m.server_streaming) != streaming:
            raise TypeError(f"{m.full_name}: server_streaming is {m.server_streaming}")
        return m

    def unary(
        self, name: str, request: Message, response_type: type[M], timeout: float | None = None
    ) -> M:
        """Call unary method ``name``; gRPC errors surface as ``grpc.RpcError``."""
        self._method(name, response_type, streaming=False)
        call: grpc.UnaryUnaryMultiCallable[Message, M] = self.channel.unary_unary(
            method_path(self.service, name),
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return call(request, timeout=timeout or self.timeout, metadata=self.metadata)

    def stream(
        self, name: str, request: Message, response_type: type[M], timeout: float | None = None
    ) -> Iterator[M]:
        """Call server-streaming method ``name`` and iterate its responses."""
        self._method(name, response_type, streaming=True)
        call: grpc.UnaryStreamMultiCallable[Message, M] = self.channel.unary_stream(
            method_path(self.service, name),
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return iter(call(request, timeout=timeout or self.timeout, metadata=self.metadata))

    def bidi(
        self,
        name: str,
        requests: Iterator[Message] | Sequence[Message],
        response_type: type[M],
        timeout: float | None = None,
    ) -> Iterator[M]:
        """Call bidirectional-streaming method ``name`` with ``requests``; iterate responses."""
        m = self._method(name, response_type, streaming=True)
        if not m.client_streaming:
            raise TypeError(f"{m.full_name} is not client-streaming")
        req_cls = message_factory.GetMessageClass(m.input_type)
        call: grpc.StreamStreamMultiCallable[Message, M] = self.channel.stream_stream(
            method_path(self.service, name),
            request_serializer=req_cls.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return iter(call(iter(requests), timeout=timeout or self.timeout, metadata=self.metadata))
