"""containerd's Snapshots service: snapshot semantics (:mod:`.core`), their sqlite metadata
(:mod:`.store`), the gRPC servicer (:mod:`.service`), filters, labels, the image a layer
belongs to (:mod:`.imageref`) and the :class:`~.mounter.NydusMounter` seam to the daemons."""
