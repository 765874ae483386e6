"""Our own FUSE layer over ``/dev/fuse`` (no libfuse): protocol codec, session, fd handoff.

``Operations`` is what a file system implements; ``FuseSession`` mounts and serves it with a pool
of worker threads (``handlers`` decodes and encodes each request, ``protocol`` holds the wire
structs, ``kernel`` the system calls); ``fdpass`` moves the device fd between processes.
"""

from . import operations
from .operations import *  # noqa: F403  (the names of operations.__all__)
from .protocol import AttrFields
from .session import FuseSession, SessionOptions, SessionState

__all__ = ["AttrFields", "FuseSession", "SessionOptions", "SessionState"]
__all__ += operations.__all__
