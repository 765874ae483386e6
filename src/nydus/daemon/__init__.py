"""nydusd: serve RAFS images over FUSE, with upstream's HTTP API on a unix socket.

``Nydusd`` (nydusd) owns images, the state machine and the FUSE session; ``RafsVfs`` adapts one
or more ``nydus.fs.RafsFs`` to ``nydus.fuse.Operations`` (shared-daemon sub-mounts);
``ApiServer`` serves the API.
"""

from .api import ApiServer
from .nydusd import DaemonOptions, ImageMount, ImageSource, Nydusd
from .state import DaemonEvent, DaemonState, StateError
from .vfs import RafsVfs

__all__ = [
    "ApiServer",
    "DaemonEvent",
    "DaemonOptions",
    "DaemonState",
    "ImageMount",
    "ImageSource",
    "Nydusd",
    "RafsVfs",
    "StateError",
]
