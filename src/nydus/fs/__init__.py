"""The read-only RAFS file system over metadata + storage, independent of FUSE."""

from .metrics import FsIoStats, StatsFop
from .rafs import (
    DEFAULT_TIMEOUT,
    ROOT_INO,
    Attr,
    ChunkSource,
    FsDirEntry,
    FsOptions,
    FsStat,
    Ino,
    RafsFs,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "ROOT_INO",
    "Attr",
    "ChunkSource",
    "FsDirEntry",
    "FsIoStats",
    "FsOptions",
    "FsStat",
    "Ino",
    "RafsFs",
    "StatsFop",
]
