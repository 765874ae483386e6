"""containerd remote snapshotter (``containerd-nydus-grpc``).

Modules, dependencies pointing down:

- :mod:`.service`   the containerd Snapshots gRPC service: requests in, store calls, errors out
- :mod:`.snapshotter` snapshot semantics: overlayfs like containerd's overlay snapshotter, plus
  the Nydus remote-snapshot rules (skip ``nydus-blob`` layers, mount the bootstrap's image)
- :mod:`.mounter`   the :class:`~.mounter.NydusMounter` interface the daemon manager implements
- :mod:`.imageref`  which image a bootstrap layer belongs to (CRI label, or containerd's API)
- :mod:`.store`     snapshot metadata in sqlite (transactional, schema versioned)
- :mod:`.fsutil`    disk usage, mount table, safe removal of snapshot directories
- :mod:`.filters`   containerd's filter syntax for List
- :mod:`.rpc`, :mod:`.api`, :mod:`.protogen`  gRPC plumbing over generated message modules

This package's ``__init__`` imports nothing, so ``python -m nydus.snapshotter.protogen`` runs
before any generated code exists.
"""
