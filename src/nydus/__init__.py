"""nydus-py: a Python implementation of the Nydus image acceleration system."""

__version__ = "0.1.0"
