"""containerd remote snapshotter (``containerd-nydus-grpc``).

Sub-packages, dependencies pointing down (the CLI, :mod:`nydus.cli.snapshotter`, wires them):

- :mod:`.server`      the gRPC server: the Snapshots (and, with ``--content-store``, Content)
  service on one unix socket; :mod:`.config` the settings of one instance
- :mod:`.daemons`     nydusd for the images: the daemon manager (the mounter the snapshots use),
  one nydusd process, the failover fd keeper, per-image configs, the blob cache and its GC, the
  Prometheus endpoint
- :mod:`.content`     containerd's Content service over our own store, the Nydus hooks (lazy data
  blobs, blob layers registered before an unpack), and the labelled pull of ``nydus-pull``
- :mod:`.snapshots`   the Snapshots service: overlayfs snapshots plus the Nydus remote-snapshot
  rules, sqlite metadata, filters, labels, the image a layer belongs to, the mounter seam
- :mod:`.containerd`  talking to containerd: generated API messages, typed gRPC plumbing, one
  client of containerd's services, errors and their status codes

This package's ``__init__`` (like those below it) imports nothing, so
``python -m nydus.snapshotter.containerd.protogen`` runs before any generated code exists.
"""
