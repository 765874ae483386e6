"""Our own FUSE layer over ``/dev/fuse`` (no libfuse): protocol codec, session, fd handoff.

``Operations`` is what a file system implements; ``FuseSession`` mounts and serves it with a pool
of worker threads (``handlers`` decodes and encodes each request, ``protocol`` holds the wire
structs, ``kernel`` the system calls); ``fdpass`` moves the device fd between processes.
"""

from .operations import (
    ROOT_ID,
    AttrReply,
    ConnInfo,
    DirEntry,
    Entry,
    FuseError,
    NodeId,
    OpenReply,
    Operations,
    RequestContext,
    StatFs,
)
from .protocol import AttrFields
from .session import FuseSession, SessionOptions, SessionState

__all__ = [
    "ROOT_ID",
    "NodeId",
    "AttrFields",
    "AttrReply",
    "ConnInfo",
    "DirEntry",
    "Entry",
    "FuseError",
    "FuseSession",
    "OpenReply",
    "Operations",
    "RequestContext",
    "SessionOptions",
    "SessionState",
    "StatFs",
]
