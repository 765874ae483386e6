"""containerd's Content service over our store, the Nydus hooks, the labelled pull."""
