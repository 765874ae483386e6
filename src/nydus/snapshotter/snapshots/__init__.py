"""containerd's Snapshots service: snapshot semantics, metadata, the mounter seam."""
