"""nydus-image's commands that read an image (bootstrap and blobs): check, inspect, unpack."""
