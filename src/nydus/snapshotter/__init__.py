"""containerd remote snapshotter (``containerd-nydus-grpc``).

Modules, dependencies pointing down:

- :mod:`.service`  the containerd Snapshots gRPC service and its unix-socket server: requests in,
  :class:`~.core.Snapshotter` calls, status codes out; with ``--content-store`` also
  :mod:`.contentservice`, containerd's Content service over :mod:`.contentstore` (blobs,
  ingests, lazy entries), with the Nydus hooks of :mod:`.nydusblobs` (data blobs recorded as
  lazy entries, never downloaded) and :mod:`.remotelayers` (blob layers registered with
  containerd before stock ``ctr image pull`` unpacks)
- :mod:`.core`     snapshot semantics: overlayfs exactly like containerd's overlay snapshotter,
  plus the Nydus remote-snapshot rules (skip ``nydus-blob`` layers, mount the bootstrap's image)
- :mod:`.mounter`  the :class:`~.mounter.NydusMounter` interface, :func:`~.mounter.default_mounter`
- :mod:`.manager`  the nydusd daemon manager (dedicated/shared daemons, supervision, recovery,
  release, GC); :mod:`.daemon` one nydusd process; :mod:`.supervisor` the failover fd keeper;
  :mod:`.imageconfig` per-image nydusd configs and credentials; :mod:`.cachegc` the blob cache
  directory; :mod:`.metrics` the Prometheus endpoint
- :mod:`.imageref` which image and layer a chain ID belongs to (CRI label, or containerd's API)
- :mod:`.unpack`   a client-side pull/unpack with snapshot labels, as containerd's unpacker does
  (containerd 1.6's ``ctr image pull`` passes none); the ``nydus-pull`` command, the way to pull
  Nydus images lazily without the content store
- :mod:`.store`    snapshot metadata in sqlite (transactional, schema versioned)
- :mod:`.filters`  containerd's filter syntax for List; :mod:`.fsutil` du, mount table, removal
- :mod:`.config`, :mod:`.labels`, :mod:`.errdefs`  settings, label keys, errors and their codes
- :mod:`.rpc`, :mod:`.api`, :mod:`.protogen`  gRPC plumbing over message modules generated at
  set-up time from Debian's containerd ``.proto`` files

This package's ``__init__`` imports nothing, so ``python -m nydus.snapshotter.protogen`` runs
before any generated code exists.
"""
