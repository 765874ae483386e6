"""Talking to containerd: the generated API messages (:mod:`.proto`, made by :mod:`.protogen`),
typed gRPC plumbing (:mod:`.rpc`), the one client of containerd's own services (:mod:`.client`)
and the errors with containerd's status codes (:mod:`.errdefs`).

Imports nothing, so ``python -m nydus.snapshotter.containerd.protogen`` runs before any
generated code exists.
"""
