"""Tell containerd about an image's Nydus data-blob layers before its unpack looks for them.

Why: containerd 1.6's ``ctr image pull`` unpacks each layer with ``rootfs.ApplyLayerWithOpts``:
``Stat(chainID)``, and only if that says NOT_FOUND, ``Prepare`` + apply + ``Commit``. The
``Stat`` is answered by containerd's metadata layer from its own database; it never reaches a
proxy snapshotter. A Nydus data blob cannot be applied (containerd has no stream processor for
its media type), so its chain ID must already be in containerd's database when the unpack gets
there. Nothing in stock ``ctr`` puts it there; this module does, on containerd's own API, the
way containerd's unpacker does for remote snapshotters:

``Snapshots.Prepare(key, parent chainID, labels = layer annotations + snapshot.ref)`` reaches
this snapshotter, which records the remote snapshot and answers ALREADY_EXISTS
(:meth:`~..snapshots.core.Snapshotter.prepare`); containerd then finds it by its labels and
records the chain ID as committed. The calls run under a short lease; afterwards the image's
config gets the label ``containerd.io/gc.ref.snapshot.<snapshotter>/nydus-blobs = <top blob
chainID>``, so containerd's garbage collector keeps the snapshots exactly as long as the image.

When: the content store (:mod:`.nydusblobs`) calls :meth:`RemoteLayerRegistrar.ensure` before
it serves a ``Read`` of a manifest that lists Nydus blobs. ``ctr image pull`` reads the image's
manifest at the start of its unpack, after it created the image record, and waits for the
answer: so the registration is done, synchronously, just before the unpack's first ``Stat``.
The request carries no namespace, so every namespace is checked for images whose target is this
manifest (or an index listing it); for the layers already known there, one ``Stat`` each.

The image's bootstrap layer (``nydus-bootstrap``, directly above that run), when its blob is
already in this content store (``ctr image pull`` fetched it before unpacking), is registered
the same way and in the same lease: :class:`LocalLayers` records which blob its chain ID is,
and the snapshotter's ``Prepare`` applies it from the store, commits it and answers
ALREADY_EXISTS (:mod:`~..snapshots.localapply`); containerd's unpack then finds the chain ID
and neither reads the blob back (about a hundred 32 KiB ``Read`` calls for a 3 MiB layer) nor
applies it. If the snapshotter refused it (it logs why), the active snapshot it made is
removed and containerd applies the layer itself, as before; the registration is not failed
for that.

Manifests, indexes and configs are read with ``read_blob`` (the snapshotter's content store:
containerd uses it as its own, so no call goes back into containerd for them). Only the bottom
run of ``nydus-blob`` layers is registered (their parents are blob layers too); Nydus images put
their bootstrap layer last.

Threading: :meth:`ensure` may be called from any number of threads; calls for the same manifest
are serialized, and results are remembered per (namespace, image, update time, manifest).
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import BinaryIO

import grpc
from google.protobuf import empty_pb2

from ...errors import BackendError, NydusError
from ...format.oci import is_index
from ...format.safejson import parse_json_object_or_none
from ..containerd.client import ContainerdClient, snapshot_exists
from ..containerd.proto import SNAPSHOTS_SERVICE, descriptor_pb2, snapshots_pb2
from ..containerd.rpc import ServiceClient, rpc_code, rpc_error_text
from ..snapshots.imageref import chain_ids
from ..snapshots.labels import is_nydus_blob, is_nydus_bootstrap, unpack_labels
from .store import ContentStore

__all__ = ["LocalLayers", "RemoteLayerRegistrar", "image_uses"]

log = logging.getLogger(__name__)

_MAX_JSON = 4 << 20
_CACHE_SIZE = 1024


def image_uses(
    read_blob: Callable[[str], bytes | None], target: descriptor_pb2.Descriptor, manifest: str
) -> bool:
    """Whether an image whose target is ``target`` uses ``manifest`` (itself, or an index
    listing it; the index is read with ``read_blob``)."""
    if target.digest == manifest:
        return True
    doc = parse_json_object_or_none(read_blob(target.digest), _MAX_JSON)
    if doc is None:
        return False
    if not is_index(target.media_type) and "manifests" not in doc:
        return False
    entries = doc.get("manifests")
    return isinstance(entries, list) and any(
        isinstance(m, dict) and m.get("digest") == manifest for m in entries
    )


@dataclass(frozen=True)
class _Layer:
    chain_id: str
    parent: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class _Plan:
    config: str
    layers: tuple[_Layer, ...]  # the bottom run of Nydus blob layers
    bootstrap: _Layer | None = None  # the bootstrap layer right above them
    bootstrap_digest: str = ""  # its descriptor digest


class LocalLayers:
    """Which blob of ``store`` a layer is, by chain ID (the snapshotter's
    :class:`~..snapshots.localapply.LayerBlobs`): recorded from the manifests of Nydus images
    as the registrar reads them; bounded, oldest forgotten first. Thread-safe."""

    def __init__(self, store: ContentStore, size: int = _CACHE_SIZE):
        self.store = store
        self._size = size
        self._layers: OrderedDict[str, tuple[str, str]] = OrderedDict()  # chain -> parent, blob
        self._lock = threading.Lock()

    def record(self, chain_id: str, parent: str, digest: str) -> None:
        with self._lock:
            self._layers[chain_id] = (parent, digest)
            self._layers.move_to_end(chain_id)
            while len(self._layers) > self._size:
                self._layers.popitem(last=False)

    def layer_digest(self, chain_id: str, parent: str) -> str | None:
        with self._lock:
            hit = self._layers.get(chain_id)
        return hit[1] if hit is not None and hit[0] == parent else None

    def open_blob(self, digest: str) -> BinaryIO | None:
        try:
            return open(self.store.blob_path(digest), "rb")  # the caller closes it
        except FileNotFoundError:
            return None

    def has_blob(self, digest: str) -> bool:
        return self.store.has_blob(digest)


class RemoteLayerRegistrar:
    """See the module docstring."""

    def __init__(
        self,
        containerd_address: str,
        read_blob: Callable[[str], bytes | None],
        plugin_name: Callable[[], str],
        timeout: float = 30.0,
        local: LocalLayers | None = None,
    ) -> None:
        self.address = containerd_address
        self.read_blob = read_blob
        self.plugin_name = plugin_name
        self.timeout = timeout
        self.local = local
        self._plans: OrderedDict[str, _Plan] = OrderedDict()
        self._done: OrderedDict[tuple[str, str, int, str], None] = OrderedDict()
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    # -- what to register -------------------------------------------------------------------

    def plan(self, manifest: str) -> _Plan | None:
        """The Nydus blob layers of ``manifest`` (None if it has none, or its config is absent)."""
        with self._lock:
            hit = self._plans.get(manifest)
        if hit is None:
            hit = self._make_plan(manifest)
        if hit is not None and hit.bootstrap is not None and self.local is not None:
            self.local.record(hit.bootstrap.chain_id, hit.bootstrap.parent, hit.bootstrap_digest)
        return hit

    def _make_plan(self, manifest: str) -> _Plan | None:
        doc = parse_json_object_or_none(self.read_blob(manifest), _MAX_JSON)
        if doc is None:
            return None
        layers = doc.get("layers")
        cfg_digest = (doc.get("config") or {}).get("digest")
        if not isinstance(layers, list) or not isinstance(cfg_digest, str):
            return None
        cfg = parse_json_object_or_none(self.read_blob(cfg_digest), _MAX_JSON)
        if cfg is None:
            return None  # not fetched yet: ask again later
        diff_ids = (cfg.get("rootfs") or {}).get("diff_ids")
        if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
            return None
        chains = chain_ids([str(d) for d in diff_ids])
        out: list[_Layer] = []
        boot, boot_digest = None, ""
        for i, layer in enumerate(layers):
            ann = layer.get("annotations") if isinstance(layer, dict) else None
            labels = unpack_labels(ann if isinstance(ann, dict) else {}, chains[i])
            this = _Layer(chains[i], chains[i - 1] if i else "", labels)
            if is_nydus_blob(labels):
                out.append(this)
                continue
            digest = layer.get("digest") if isinstance(layer, dict) else None
            if is_nydus_bootstrap(labels) and isinstance(digest, str):
                boot, boot_digest = this, digest
            break
        plan = _Plan(cfg_digest, tuple(out), boot, boot_digest)
        with self._lock:
            self._plans[manifest] = plan
            while len(self._plans) > _CACHE_SIZE:
                self._plans.popitem(last=False)
        return plan

    # -- registering ------------------------------------------------------------------------

    def _manifest_lock(self, manifest: str) -> threading.Lock:
        with self._lock:
            if len(self._locks) > _CACHE_SIZE:
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            return self._locks.setdefault(manifest, threading.Lock())

    def ensure(self, manifest: str) -> list[tuple[str, str]]:
        """Register ``manifest``'s Nydus blob layers in every namespace with an image that uses
        it; returns the (namespace, chain ID) pairs registered now."""
        plan = self.plan(manifest)
        if plan is None or not (plan.layers or self._local_bootstrap(plan)):
            return []
        with self._manifest_lock(manifest):
            try:
                return self._ensure(manifest, plan)
            except (grpc.RpcError, NydusError) as e:
                text = rpc_error_text(e) if isinstance(e, grpc.RpcError) else str(e)
                log.warning(
                    "cannot register the Nydus layers of %s with containerd at %s: %s",
                    manifest,
                    self.address,
                    text,
                )
                return []

    def _ensure(self, manifest: str, plan: _Plan) -> list[tuple[str, str]]:
        done: list[tuple[str, str]] = []
        with ContainerdClient(self.address, self.timeout) as ctd:
            for ns in ctd.namespaces():
                users = []
                for img in ctd.images(ns):
                    key = (ns, img.name, img.updated_at.ToNanoseconds(), manifest)
                    with self._lock:
                        if key in self._done:
                            continue
                    if image_uses(self.read_blob, img.target, manifest):
                        users.append((key, img.name))
                if users:
                    done += self._register(ctd, ns, manifest, plan, [n for _, n in users])
                    with self._lock:
                        for key, _ in users:
                            self._done[key] = None
                        while len(self._done) > _CACHE_SIZE:
                            self._done.popitem(last=False)
        return done

    def _register(
        self, ctd: ContainerdClient, ns: str, manifest: str, plan: _Plan, image_names: list[str]
    ) -> list[tuple[str, str]]:
        sn = self.plugin_name()
        snaps = ctd.service(SNAPSHOTS_SERVICE, ns)
        missing = [ly for ly in plan.layers if not snapshot_exists(snaps, sn, ly.chain_id)]
        boot = self._local_bootstrap(plan)
        if boot is not None and snapshot_exists(snaps, sn, boot.chain_id):
            boot = None
        if not missing and boot is None:
            return []
        done: list[tuple[str, str]] = []
        top = plan.layers[-1].chain_id if plan.layers else ""
        # on failure the lease stays (it expires): until the image's config references the
        # snapshots, it is what keeps them
        with ctd.lease(ns, "nydus-register-", keep_on_error=True) as lease_id:
            leased = ctd.service(SNAPSHOTS_SERVICE, ns, lease_id)
            for ly in plan.layers:
                if ly not in missing:
                    continue
                self._prepare_remote(leased, sn, ly)
                done.append((ns, ly.chain_id))
            if boot is not None and self._prepare_bootstrap(leased, sn, boot):
                done.append((ns, boot.chain_id))
                top = boot.chain_id
            if top:
                label = f"containerd.io/gc.ref.snapshot.{sn}/nydus-blobs"
                ctd.set_labels(ns, plan.config, {label: top})
        log.info(
            "registered %d Nydus layer(s) of %s (%s) with containerd's %r snapshotter in "
            "namespace %s",
            len(done),
            ", ".join(image_names),
            manifest,
            sn,
            ns,
        )
        return done

    def _local_bootstrap(self, plan: _Plan) -> _Layer | None:
        """The plan's bootstrap layer if its blob is stored here (else containerd applies it)."""
        if plan.bootstrap is None or self.local is None:
            return None
        try:
            stored = self.local.has_blob(plan.bootstrap_digest)
        except (NydusError, OSError) as e:
            log.debug("bootstrap layer blob %s: %s", plan.bootstrap_digest, e)
            return None
        return plan.bootstrap if stored else None

    def _prepare_bootstrap(self, snaps: ServiceClient, sn: str, layer: _Layer) -> bool:
        """Let the snapshotter apply the bootstrap layer from the content store (True), or
        leave it to containerd's unpack (False: the snapshotter logged why)."""
        try:
            self._prepare_remote(snaps, sn, layer)
        except BackendError:
            log.info("bootstrap layer %s left to containerd's unpack", layer.chain_id)
            return False
        except grpc.RpcError as e:
            log.warning(
                "bootstrap layer %s left to containerd's unpack: %s",
                layer.chain_id,
                rpc_error_text(e),
            )
            return False
        return True

    def _prepare_remote(self, snaps: ServiceClient, sn: str, layer: _Layer) -> None:
        key = f"nydus-register-{secrets.token_hex(6)} {layer.chain_id}"
        try:
            snaps.unary(
                "Prepare",
                snapshots_pb2.PrepareSnapshotRequest(
                    snapshotter=sn, key=key, parent=layer.parent, labels=dict(layer.labels)
                ),
                snapshots_pb2.PrepareSnapshotResponse,
                timeout=self.timeout,
            )
        except grpc.RpcError as e:
            if rpc_code(e) == grpc.StatusCode.ALREADY_EXISTS:
                return  # the snapshotter took it: containerd recorded the chain ID
            raise
        # An active snapshot was made: the snapshotter did not take the layer as remote.
        snaps.unary(
            "Remove",
            snapshots_pb2.RemoveSnapshotRequest(snapshotter=sn, key=key),
            empty_pb2.Empty,
            timeout=self.timeout,
        )
        raise BackendError(f"snapshotter {sn!r} did not take {layer.chain_id} as a remote layer")
