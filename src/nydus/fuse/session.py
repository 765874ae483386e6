"""A FUSE session over ``/dev/fuse``: mount, negotiate INIT, serve requests with a pool of
worker threads, unmount. Our own small libfuse replacement (design.md, "FUSE without libfuse").

Life cycle::

    s = FuseSession(ops, "/mnt", SessionOptions(threads=4))
    s.mount()        # open /dev/fuse, mount(2) with fd=N; the kernel queues INIT
    s.start()        # worker threads read requests (INIT first) and call ``ops``
    ...
    s.unmount()      # umount2 (lazy if busy); workers see ENODEV and end; ops.destroy()

or, for fd handoff (failover): ``s.stop(close=False)`` leaves the kernel connection alive and
``s.device_fd``/``s.export_state()`` can be sent to another process (:mod:`.fdpass`), which
serves it with ``FuseSession.resume(ops, fd, state)``.

Each worker owns a device fd (a FUSE_DEV_IOC_CLONE of the session fd when ``clone_fd``), reads
one request at a time into a preallocated buffer and writes the reply with one ``writev`` on
the same fd (the kernel matches replies on the fd that read the request). The fds are
blocking (the kernel wakes one reader per request); :meth:`FuseSession.stop` wakes them with
STATFS requests to our own mount.

Errors never escape the loop: FuseError/OSError give their errno, NydusError its ``errno``,
anything else EIO plus a logged traceback. INTERRUPT of a READ-like request replies EINTR at
once (the late reply is then discarded by the kernel); LOOKUP/READDIRPLUS run to completion so
lookup counts stay exact, and a reply the kernel refuses is undone with ``ops.forget``.

Threading contract: ``mount``/``start``/``unmount``/``stop`` from one controlling thread;
``notify_*``, ``inflight`` and ``stats`` from any thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import NydusError
from ..kernel_mount import umount_or_detach
from . import kernel
from . import protocol as proto
from .handlers import RequestHandlers, _Ctx
from .operations import ConnInfo, FuseError, NodeId, Operations
from .protocol import InitFlags, InitIn, Opcode, opcode_name

__all__ = ["FuseSession", "SessionOptions", "SessionState"]

log = logging.getLogger("nydus.fuse")

# Requests whose late reply is harmless to drop: replied EINTR as soon as they are interrupted.
_EARLY_EINTR = frozenset(
    {
        Opcode.READ,
        Opcode.READDIR,
        Opcode.GETXATTR,
        Opcode.LISTXATTR,
        Opcode.READLINK,
        Opcode.GETATTR,
        Opcode.STATFS,
        Opcode.ACCESS,
        Opcode.LSEEK,
    }
)
_MODIFY = frozenset(
    {
        Opcode.MKNOD,
        Opcode.MKDIR,
        Opcode.SYMLINK,
        Opcode.LINK,
        Opcode.UNLINK,
        Opcode.RMDIR,
        Opcode.RENAME,
        Opcode.RENAME2,
        Opcode.CREATE,
        Opcode.TMPFILE,
        Opcode.FALLOCATE,
        Opcode.COPY_FILE_RANGE,
        Opcode.COPY_FILE_RANGE_64,
    }
)


@dataclass
class SessionOptions:
    """Knobs of a session; the defaults suit an immutable image."""

    threads: int = 4
    fsname: str = "rafs"
    subtype: str = "rafs"
    readonly: bool = True
    allow_other: bool = True
    default_permissions: bool = True
    clone_fd: bool = True
    max_pages: int = 256  # 1 MiB requests
    max_write: int = 128 << 10
    max_background: int = 64
    readdirplus: str = "always"  # "auto", "always" or "never"
    posix_acl: bool = False
    passthrough: bool = False
    no_open: bool = False  # reply ENOSYS to OPEN: zero-message opens (no per-open metrics)
    readahead_kb: int = 0  # >0: raise the mount's readahead after mount (root)
    extra_options: str = ""


@dataclass
class SessionState:
    """What a process resuming this connection must know (see :meth:`FuseSession.resume`)."""

    mountpoint: str
    proto_minor: int
    flags: int
    max_pages: int
    max_write: int

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SessionState:
        return cls(
            str(d["mountpoint"]),
            int(d["proto_minor"]),
            int(d["flags"]),
            int(d["max_pages"]),
            int(d["max_write"]),
        )


@dataclass
class _Stats:
    requests: int = 0
    errors: int = 0
    interrupts: int = 0
    by_opcode: dict[str, int] = field(default_factory=dict)


class FuseSession(RequestHandlers):
    """One FUSE connection served by ``ops`` (see the module docstring)."""

    def __init__(
        self, ops: Operations, mountpoint: str, options: SessionOptions | None = None
    ) -> None:
        self.ops = ops
        self.mountpoint = os.path.abspath(mountpoint)
        self.opts = options or SessionOptions()
        if self.opts.threads < 1:
            raise ValueError("a session needs at least one worker thread")
        self._fd = -1
        self._fds: list[int] = []
        self._owned: list[int] = []  # fds we close on stop (clones and, unless kept, the main)
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._ended = threading.Event()
        self._mounted = False
        self._root_fd = -1
        self._initialized = threading.Event()
        self._lock = threading.Lock()
        self._inflight: dict[int, _Ctx] = {}
        self._early_interrupts: dict[int, float] = {}
        self._backing: dict[tuple[int, int], int] = {}  # (nodeid, fh) -> backing id
        self._running = 0
        self._destroyed = False
        self.proto_minor = 0
        self.flags = 0
        self.max_pages = self.opts.max_pages
        self.stats = _Stats()
        self._bufsize = max(self.opts.max_write + 4096, 1 << 17)
        self._handlers: dict[int, Callable[[_Ctx, memoryview], Any]] = {
            Opcode.INIT: self._do_init,
            Opcode.DESTROY: self._do_destroy,
            Opcode.LOOKUP: self._do_lookup,
            Opcode.GETATTR: self._do_getattr,
            Opcode.READLINK: self._do_readlink,
            Opcode.OPEN: self._do_open,
            Opcode.READ: self._do_read,
            Opcode.RELEASE: self._do_release,
            Opcode.FLUSH: self._do_flush,
            Opcode.FSYNC: self._do_fsync,
            Opcode.FSYNCDIR: self._do_fsync,
            Opcode.STATFS: self._do_statfs,
            Opcode.GETXATTR: self._do_getxattr,
            Opcode.LISTXATTR: self._do_listxattr,
            Opcode.OPENDIR: self._do_opendir,
            Opcode.READDIR: self._do_readdir,
            Opcode.READDIRPLUS: self._do_readdirplus,
            Opcode.RELEASEDIR: self._do_releasedir,
            Opcode.ACCESS: self._do_access,
            Opcode.LSEEK: self._do_lseek,
            Opcode.SETATTR: self._do_setattr,
            Opcode.SETXATTR: self._do_setxattr,
            Opcode.REMOVEXATTR: self._do_removexattr,
            Opcode.WRITE: self._do_write,
        }
        for op in _MODIFY:
            self._handlers[op] = self._do_modify

    # ------------------------------------------------------------------ life cycle

    @property
    def device_fd(self) -> int:
        """The session's ``/dev/fuse`` fd (-1 before mount/resume)."""
        return self._fd

    @property
    def mounted(self) -> bool:
        return self._mounted

    def mount(self) -> None:
        """Open /dev/fuse and mount(2) it on the mount point. Refuses a mount point in use."""
        if self._fd >= 0:
            raise RuntimeError("session already mounted")
        if not os.path.isdir(self.mountpoint):
            raise FuseError(errno.ENOTDIR, f"mount point {self.mountpoint} is not a directory")
        if kernel.is_mountpoint(self.mountpoint):
            raise FuseError(errno.EBUSY, f"mount point {self.mountpoint} is already in use")
        fd = kernel.open_device()
        try:
            opts = kernel.mount_options(
                fd,
                allow_other=self.opts.allow_other,
                default_permissions=self.opts.default_permissions,
                max_read=self.opts.max_pages * 4096,
                extra=self.opts.extra_options,
            )
            kernel.mount_fuse(
                self.mountpoint,
                fd,
                fsname=self.opts.fsname,
                subtype=self.opts.subtype,
                readonly=self.opts.readonly,
                options=opts,
            )
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._owned.append(fd)
        self._mounted = True
        log.info("mounted %s (fuse fd %d)", self.mountpoint, fd)

    @classmethod
    def resume(
        cls, ops: Operations, fd: int, state: SessionState, options: SessionOptions | None = None
    ) -> FuseSession:
        """Serve an already mounted and initialized connection received from another process.

        ``ops.init`` is called with the saved negotiation; no INIT is expected. The caller
        hands over ownership of ``fd``.
        """
        s = cls(ops, state.mountpoint, options)
        s._fd = fd
        s._owned.append(fd)
        s._mounted = True
        s.proto_minor, s.flags, s.max_pages = state.proto_minor, state.flags, state.max_pages
        ops.init(
            ConnInfo(
                proto.KERNEL_VERSION,
                state.proto_minor,
                state.flags,
                0,
                state.flags,
                state.max_write,
                state.max_pages,
            )
        )
        s._initialized.set()
        return s

    @classmethod
    def from_fd(
        cls, ops: Operations, fd: int, mountpoint: str = "/", options: SessionOptions | None = None
    ) -> FuseSession:
        """Serve ``fd`` from its first request (INIT included) without mounting anything.

        For a device fd mounted by someone else, or a SOCK_SEQPACKET socket in tests (one
        request per message, like /dev/fuse). The session owns ``fd`` afterwards.
        """
        s = cls(ops, mountpoint, options)
        s._fd = fd
        s._owned.append(fd)
        s.opts.clone_fd = False
        return s

    def export_state(self) -> SessionState:
        return SessionState(
            self.mountpoint, self.proto_minor, self.flags, self.max_pages, self.opts.max_write
        )

    def start(self) -> None:
        """Start the worker threads (INIT is served by whichever reads it first)."""
        if self._fd < 0:
            raise RuntimeError("mount() or resume() first")
        if self._threads:
            raise RuntimeError("session already started")
        # Blocking reads: the kernel wakes exactly one reader per request (an exclusive
        # wait), where poll(2) would wake every worker for every request.
        os.set_blocking(self._fd, True)
        fds = [self._fd]
        for _ in range(self.opts.threads - 1):
            if not self.opts.clone_fd:
                fds.append(self._fd)
                continue
            try:
                c = kernel.clone_device(self._fd)
            except OSError as e:
                log.warning("FUSE_DEV_IOC_CLONE failed (%s); workers share one fd", e)
                self.opts.clone_fd = False
                fds.append(self._fd)
                continue
            os.set_blocking(c, True)
            self._owned.append(c)
            fds.append(c)
        self._fds = fds
        for i, fd in enumerate(fds):
            t = threading.Thread(target=self._worker, args=(fd,), name=f"fuse-{i}", daemon=True)
            self._threads.append(t)
        with self._lock:
            self._running = len(self._threads)
        for t in self._threads:
            t.start()

    def wait_initialized(self, timeout: float | None = None) -> bool:
        return self._initialized.wait(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the session ends (unmounted, aborted or stopped); True if it did."""
        return self._ended.wait(timeout)

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def stop(self, close: bool = True, timeout: float = 5.0) -> None:
        """Stop the workers after their current request. ``close=False`` keeps the main
        device fd open (the connection survives, for handing it to another process).

        Workers blocked in read(2) are woken by STATFS requests sent to our own mount (one
        per wake-up; the kernel gives each to one reader, which then sees the stop flag).
        """
        self._stopping.set()
        me = threading.current_thread()
        others = [t for t in self._threads if t is not me]
        deadline = time.monotonic() + timeout
        while any(t.is_alive() for t in others) and time.monotonic() < deadline:
            self._nudge()
            for t in others:
                t.join(0.02)
        stuck = {
            fd
            for t, fd in zip(self._threads, self._fds, strict=False)
            if t is not me and t.is_alive()
        }
        if stuck:
            log.warning("%d FUSE workers did not stop; leaving their fds open", len(stuck))
        self._finish()
        for fd in self._owned:
            if (fd == self._fd and not close) or fd in stuck:
                continue
            with contextlib.suppress(OSError):
                os.close(fd)
        self._owned = [self._fd] if not close and self._fd >= 0 else []
        if close:
            self._fd = -1
        self._ended.set()

    def _nudge(self) -> None:
        if not self._initialized.is_set():
            return
        root_fd, mp, mounted = self._root_fd, self.mountpoint, self._mounted
        if root_fd < 0 and not mounted:
            return

        def statfs() -> None:
            with contextlib.suppress(OSError):
                if root_fd >= 0:
                    os.fstatvfs(root_fd)
                else:
                    os.statvfs(mp)

        threading.Thread(target=statfs, name="fuse-nudge", daemon=True).start()

    def _hold_root(self) -> None:
        """Keep a handle on the tree about to be detached: the only way left to wake workers."""
        with contextlib.suppress(OSError):
            self._root_fd = os.open(self.mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def unmount(self, timeout: float = 5.0) -> None:
        """Unmount (lazily if busy), let the workers drain and end, close the device."""
        if self._mounted:
            umount_or_detach(self.mountpoint, self._hold_root)
            self._mounted = False
            log.info("unmounted %s", self.mountpoint)
        if self._threads:
            self._ended.wait(timeout)
        try:
            self.stop(close=True)
        finally:
            if self._root_fd >= 0:
                os.close(self._root_fd)
                self._root_fd = -1

    def _finish(self) -> None:
        with self._lock:
            if self._destroyed:
                return
            self._destroyed = True
        try:
            self.ops.destroy()
        except Exception:
            log.exception("destroy failed")

    # ------------------------------------------------------------------ introspection

    def inflight(self) -> list[dict[str, Any]]:
        """Requests being served now (``/api/v1/metrics/inflight``)."""
        with self._lock:
            items = list(self._inflight.values())
        return [
            {
                "inode": c.nodeid,
                "opcode": c.opcode,
                "unique": c.unique,
                "timestamp_secs": int(c.started),
            }
            for c in items
        ]

    # ------------------------------------------------------------------ notifications

    def notify_inval_entry(self, parent: int, name: bytes) -> bool:
        """Ask the kernel to drop its cached dentry ``name`` in ``parent``."""
        body = proto.NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), 0) + name + b"\0"
        return self._notify(proto.NOTIFY_INVAL_ENTRY, body)

    def notify_inval_inode(self, nodeid: int, offset: int = 0, length: int = 0) -> bool:
        """Drop cached attributes and (``length`` 0: all) cached data of ``nodeid``."""
        return self._notify(
            proto.NOTIFY_INVAL_INODE, proto.NOTIFY_INVAL_INODE_OUT.pack(nodeid, offset, length)
        )

    def notify_resend(self) -> bool:
        """Ask the kernel (7.40+) to queue again every request a previous server read but
        never answered: after a takeover, nothing the old daemon dropped is lost."""
        if self.proto_minor < 40:
            return False
        return self._notify(proto.NOTIFY_RESEND, b"")

    def _notify(self, code: int, body: bytes) -> bool:
        if self._fd < 0 or not self._initialized.is_set():
            return False
        hdr = proto.OUT_HEADER.pack(proto.OUT_HEADER.size + len(body), code, 0)
        try:
            os.writev(self._fd, [hdr, body])
            return True
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                log.warning("notify %d failed: %s", code, e)
            return False

    # ------------------------------------------------------------------ the loop

    def _worker(self, fd: int) -> None:
        buf = bytearray(self._bufsize)
        mv = memoryview(buf)
        try:
            while not self._stopping.is_set():
                try:
                    n = os.readv(fd, [buf])
                except InterruptedError:
                    continue
                except BlockingIOError:  # someone made the fd non-blocking again
                    os.set_blocking(fd, True)
                    continue
                except OSError as e:
                    if e.errno == errno.ENOENT:  # the request was interrupted before we read it
                        continue
                    if e.errno != errno.ENODEV:
                        log.error("reading /dev/fuse: %s", e)
                    break
                if n < proto.IN_HEADER.size:
                    if n == 0:
                        break
                    log.error("short FUSE request (%d bytes)", n)
                    continue
                self._dispatch(fd, mv[:n])
        finally:
            with self._lock:
                self._running -= 1
                last = self._running == 0
            self._stopping.set()
            if last:
                self._finish()
                self._ended.set()

    def _dispatch(self, fd: int, msg: memoryview) -> None:
        ln, op, unique, nodeid, uid, gid, pid, _ext, _pad = proto.IN_HEADER.unpack_from(msg, 0)
        body = msg[proto.IN_HEADER.size : ln]
        st = self.stats
        st.requests += 1
        if op == Opcode.FORGET:
            self._forget([(nodeid, proto.FORGET_IN.unpack_from(body, 0)[0])])
            return
        if op == Opcode.BATCH_FORGET:
            self._batch_forget(body)
            return
        if op == Opcode.INTERRUPT:
            self._interrupt(proto.INTERRUPT_IN.unpack_from(body, 0)[0])
            return
        ctx = _Ctx(fd, unique, op, NodeId(nodeid), uid, gid, pid)
        with self._lock:
            self._inflight[unique] = ctx
            if self._early_interrupts.pop(unique, None) is not None:
                ctx.interrupted = True
        handler = self._handlers.get(op)
        try:
            if handler is None:
                raise FuseError(errno.ENOSYS)
            result = handler(ctx, body)
        except BaseException as e:
            err = _errno_of(e, op)
            if err != errno.ENOSYS and err != errno.ENOENT and err != errno.ENODATA:
                st.errors += 1
            self._reply_error(ctx, err)
        else:
            if result is not None:
                self._reply(ctx, result)
        finally:
            with self._lock:
                self._inflight.pop(unique, None)

    def _reply(self, ctx: _Ctx, payload: bytes | list[Any]) -> bool:
        bufs: list[Any] = (
            [payload] if isinstance(payload, (bytes, bytearray, memoryview)) else payload
        )
        total = proto.OUT_HEADER.size + sum(len(b) for b in bufs)
        with ctx.lock:
            if ctx.replied:
                return False
            ctx.replied = True
        try:
            os.writev(ctx.fd, [proto.OUT_HEADER.pack(total, 0, ctx.unique), *bufs])
            return True
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EPIPE):
                log.error("reply to %s #%d failed: %s", opcode_name(ctx.opcode), ctx.unique, e)
            return False

    def _reply_error(self, ctx: _Ctx, err: int) -> None:
        with ctx.lock:
            if ctx.replied:
                return
            ctx.replied = True
        try:
            os.write(ctx.fd, proto.OUT_HEADER.pack(proto.OUT_HEADER.size, -err, ctx.unique))
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EPIPE):
                log.error("error reply to #%d failed: %s", ctx.unique, e)

    def _interrupt(self, target: int) -> None:
        self.stats.interrupts += 1
        with self._lock:
            ctx = self._inflight.get(target)
            if ctx is None:
                now = time.monotonic()
                self._early_interrupts[target] = now
                if len(self._early_interrupts) > 1024:
                    for k, t in list(self._early_interrupts.items()):
                        if now - t > 10:
                            del self._early_interrupts[k]
                return
            ctx.interrupted = True
        if ctx.opcode in _EARLY_EINTR:
            self._reply_error(ctx, errno.EINTR)

    def _forget(self, items: list[tuple[int, int]]) -> None:
        try:
            self.ops.forget(items)
        except Exception:
            log.exception("forget failed")

    def _batch_forget(self, body: memoryview) -> None:
        count, _ = proto.BATCH_FORGET_IN.unpack_from(body, 0)
        count = min(count, (len(body) - proto.BATCH_FORGET_IN.size) // proto.FORGET_ONE.size)
        items = [
            proto.FORGET_ONE.unpack_from(
                body, proto.BATCH_FORGET_IN.size + i * proto.FORGET_ONE.size
            )
            for i in range(count)
        ]
        self._forget(items)

    # ------------------------------------------------------------------ handlers

    def _do_init(self, ctx: _Ctx, body: memoryview) -> bytes:
        ii = InitIn.unpack(body)
        if ii.major < proto.KERNEL_VERSION:
            raise FuseError(errno.EPROTO, f"kernel FUSE {ii.major}.{ii.minor} is too old")
        if ii.major > proto.KERNEL_VERSION:
            # Reply with our major only; the kernel sends INIT again with it.
            return proto.INIT_OUT.pack(
                proto.KERNEL_VERSION, proto.KERNEL_MINOR_VERSION, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
            )
        minor = min(ii.minor, proto.KERNEL_MINOR_VERSION)
        if minor < proto.MIN_MINOR_VERSION:
            raise FuseError(errno.EPROTO, f"kernel FUSE 7.{ii.minor} is older than 7.31")
        o = self.opts
        want = (
            InitFlags.ASYNC_READ
            | InitFlags.PARALLEL_DIROPS
            | InitFlags.MAX_PAGES
            | InitFlags.CACHE_SYMLINKS
            | InitFlags.INIT_EXT
            | InitFlags.ASYNC_DIO
            | InitFlags.NO_OPENDIR_SUPPORT
            | InitFlags.HAS_EXPIRE_ONLY
        )
        if o.readdirplus != "never":
            want |= InitFlags.DO_READDIRPLUS
            if o.readdirplus == "auto":
                want |= InitFlags.READDIRPLUS_AUTO
        if o.posix_acl:
            want |= InitFlags.POSIX_ACL
        if o.passthrough:
            want |= InitFlags.PASSTHROUGH
        if o.no_open:
            want |= InitFlags.NO_OPEN_SUPPORT
        want &= ii.flags
        conn = ConnInfo(ii.major, minor, ii.flags, ii.max_readahead, want, o.max_write, o.max_pages)
        self.ops.init(conn)
        want = conn.want & ii.flags
        self.proto_minor, self.flags = minor, want
        self.max_pages = max(1, min(conn.max_pages, 65535))
        stack = 1 if want & InitFlags.PASSTHROUGH else 0
        reply = proto.INIT_OUT.pack(
            proto.KERNEL_VERSION,
            minor,
            ii.max_readahead,
            want & 0xFFFFFFFF,
            o.max_background,
            o.max_background * 3 // 4,
            conn.max_write,
            1,
            self.max_pages,
            0,
            want >> 32,
            stack,
            0,
        )
        log.info(
            "FUSE %d.%d negotiated (kernel 7.%d), flags %#x, max_pages %d, readahead %d",
            proto.KERNEL_VERSION,
            minor,
            ii.minor,
            want,
            self.max_pages,
            ii.max_readahead,
        )
        self._reply(ctx, reply)
        self._initialized.set()
        if o.readahead_kb > 0 and self._mounted:
            threading.Thread(target=self._tune_readahead, daemon=True).start()
        return None  # type: ignore[return-value]  # already replied

    def _tune_readahead(self) -> None:
        if not kernel.set_readahead_kb(self.mountpoint, self.opts.readahead_kb):
            log.info("could not raise the readahead of %s", self.mountpoint)

    def _do_destroy(self, ctx: _Ctx, body: memoryview) -> bytes:
        self._finish()
        self._stopping.set()
        return b""


def _errno_of(e: BaseException, op: int) -> int:
    if isinstance(e, OSError) and e.errno:
        err = int(e.errno)
        if err == errno.ENOSYS or err == errno.ENOENT or err == errno.ENODATA:
            return err
        log.debug("%s: %s", opcode_name(op), e)
        return err
    if isinstance(e, NydusError):
        log.warning("%s: %s", opcode_name(op), e)
        return int(getattr(e, "errno", errno.EIO)) or errno.EIO
    if isinstance(e, (KeyboardInterrupt, SystemExit)):
        log.warning("%s interrupted by %s", opcode_name(op), type(e).__name__)
        return errno.EINTR
    log.error("%s failed with an unexpected error", opcode_name(op), exc_info=e)
    return errno.EIO
