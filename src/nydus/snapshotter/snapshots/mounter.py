"""The seam between the snapshotter and the nydusd daemon manager: :class:`NydusMounter`.

When containerd prepares a container's writable snapshot on top of a Nydus image (one whose
layers include the ``nydus-bootstrap`` layer), the snapshotter calls
``mounter.mount(MountRequest(snapshot_id, bootstrap_path, image_ref, labels))`` and returns an
overlay mount whose ``lowerdir`` is the directory that call returns. When the snapshot is
removed (or ``Cleanup`` finds a mount whose snapshot is gone) it calls
``mounter.umount(snapshot_id)``.

The implementation that starts ``nydusd`` (dedicated mode: one daemon per image) or asks a
shared daemon to mount (``POST /api/v1/mount?mountpoint=/<id>``), waits for ``RUNNING`` and
supervises it is the daemon manager, :class:`~..daemons.manager.DaemonManager`. With
``--daemon-mode none`` there is no daemon: :class:`DaemonManagerMissing`
refuses to mount with an error that says so (containerd reports it to the user), and never
pretends that an image is mounted.

After ``Remove`` and ``Cleanup`` the snapshotter calls ``collect_garbage`` with the bootstraps
of every Nydus image it still has; the daemon manager deletes the cache files of other blobs.

Contract for implementations:

- ``mount`` is idempotent per ``snapshot_id``: asked again (e.g. after a snapshotter restart,
  see :meth:`NydusMounter.recover`), it returns the same directory without mounting twice.
- The returned directory is ready: reads of the image's files work when ``mount`` returns.
- ``image_ref`` is a full image reference (``host[:port]/repo[:tag|@digest]``) naming the image
  whose blobs the bootstrap refers to, or ``None`` when it could not be determined (a backend
  that needs no registry, such as ``localfs``, can do without it).
- ``labels`` are the bootstrap snapshot's labels updated with the request's (CRI labels,
  ``containerd.io/snapshot/pullsecret``, ...).
- ``bootstrap_digest`` (``sha256:HEX``) is the digest the snapshotter recorded for the
  bootstrap when its layer was committed, or ``None`` for snapshots made before digests were
  recorded; a mounter passes it on to nydusd (``--bootstrap-digest`` / the API's
  ``bootstrap_digest``), which refuses a bootstrap with other bytes.
- ``umount`` of an id that is not mounted is not an error.
- Methods may be called concurrently from several threads for different snapshot ids.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..containerd.errdefs import NydusUnavailable

__all__ = ["DaemonManagerMissing", "MountRequest", "NydusMounter", "RecoveredMount"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MountRequest:
    """The image of ``bootstrap_path`` for snapshot ``snapshot_id`` (see the module docstring)."""

    snapshot_id: str
    bootstrap_path: Path
    image_ref: str | None
    labels: Mapping[str, str] = field(default_factory=dict)
    bootstrap_digest: str | None = None


@dataclass(frozen=True)
class RecoveredMount:
    """What the snapshotter knows about a mount it asked for before it restarted."""

    snapshot_id: str
    bootstrap_path: Path
    image_ref: str | None
    lower_dir: Path
    bootstrap_digest: str | None = None


class NydusMounter(abc.ABC):
    """Serves a Nydus image for a snapshot (see the module docstring for the contract)."""

    @abc.abstractmethod
    def mount(self, request: MountRequest) -> Path:
        """Serve the image of ``request.bootstrap_path`` for its snapshot; return its root dir."""

    @abc.abstractmethod
    def umount(self, snapshot_id: str) -> None:
        """Release ``snapshot_id``'s mount (and its dedicated daemon); no-op if not mounted."""

    def recover(self, mounts: Sequence[RecoveredMount]) -> None:  # noqa: B027 (optional hook)
        """Called once at start-up with the mounts recorded before a restart.

        A daemon manager re-attaches to the daemons still running (or restarts them, per its
        recover policy) so that the recorded lower dirs stay valid. The default does nothing.
        """

    def collect_garbage(self, live_bootstraps: Sequence[Path]) -> None:  # noqa: B027
        """Delete cached data no image in ``live_bootstraps`` uses (optional; default none)."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Called at snapshotter shutdown. Daemons must keep running (containers use them)."""


class DaemonManagerMissing(NydusMounter):
    """No daemon manager (``--daemon-mode none``): refuses to mount, honestly."""

    def mount(self, request: MountRequest) -> Path:
        image_ref = request.image_ref or "(image reference unknown)"
        raise NydusUnavailable(
            f"cannot mount Nydus image {image_ref} for snapshot {request.snapshot_id} "
            f"(bootstrap {request.bootstrap_path}): this snapshotter runs no nydusd "
            f"daemon manager (daemon mode none), so Nydus images cannot run; plain OCI "
            f"images work"
        )

    def umount(self, snapshot_id: str) -> None:
        # Nothing was ever mounted by this stand-in, so there is nothing to release.
        log.debug("umount %s: nothing mounted (no daemon manager)", snapshot_id)
