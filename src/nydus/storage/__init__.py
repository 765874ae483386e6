"""Storage: backends, the verified blob cache, chunk fetching and prefetch.

The file system and the daemon import only this package's top level::

    from nydus.storage import BlobDevice, open_device

``storage`` knows blobs, chunk ids and byte ranges, never inodes. Module map:
``backend`` (the interface, an in-memory fake), ``localfs``/``registry``/``objectstore``
(s3, oss)/``httpproxy`` (backends), ``http`` (the HTTP transport: pooling, TLS, unix sockets,
retries, the Dragonfly proxy), ``chunkmap``/``blobcache``/``metacache`` (cache files in
upstream's layout), ``fetcher`` (dedup, amplification, merging, validation), ``prefetch``,
``device`` (``open_device``), ``metrics``, and ``blobfile`` (reading a whole local blob, used
by ``nydus-image check``/``unpack``/``optimize``).
"""

from .backend import BlobBackend, MemoryBackend
from .device import BlobDevice, create_backend, open_device

__all__ = ["BlobDevice", "open_device", "BlobBackend", "MemoryBackend", "create_backend"]
