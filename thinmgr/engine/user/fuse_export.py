"""Serve one ``BlockBackend`` as one file in a FUSE mount, over the raw kernel protocol.

The mount holds a directory with a single regular file (``FuseExport.file_path``) whose
contents are the backend's. The server speaks the FUSE protocol on ``/dev/fuse`` itself, with
no libfuse: a few worker threads each read one request at a time into a preallocated buffer
(``os.readv``) and answer with one ``os.writev``; write payloads reach the backend as a
memoryview of that buffer, so the only copies are the kernel's. docs/fuse-binding.md has the
measurements that chose this over pyfuse3 and mfusepy.

Page-cache use: by default the file is opened with FOPEN_DIRECT_IO, so every read and write
reaches the backend and a flush or fsync has nothing cached in the kernel to push first; the
loop device above keeps its own page cache.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from thinmgr.engine.user.backend import BlockBackend
from thinmgr.errors import BusyError, IOFailure, NoSpaceError, ThinmgrError
from thinmgr.kernel import fuse as k
from thinmgr.kernel.mount import MNT_DETACH, is_mount_point, umount

log = logging.getLogger(__name__)

MAX_WRITE = 1 << 20  # bytes per WRITE request; needs FUSE_MAX_PAGES (256 pages of 4 KiB)
_REQUEST_ROOM = 4096  # headers in front of a WRITE payload (80 bytes used), page-rounded
_FILE_INO = 2
_ATTR_TTL = 3600  # seconds: size and mode change only through this server
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0
_KEPT_ERRORS = 100  # failures kept in ``errors``; the log has the count of the rest

Handler = Callable[[memoryview, int, int, int], None]


class FuseExport:
    """One FUSE mount serving ``backend`` as ``mountpoint/file_name``.

    ``start()`` mounts and starts the workers; ``stop()`` unmounts and joins them, and is safe
    to call again or after a failed start. Usable as a context manager.
    """

    def __init__(
        self,
        backend: BlockBackend,
        mountpoint: str | os.PathLike[str],
        *,
        file_name: str = "volume",
        threads: int = 2,
        direct_io: bool = True,
        writeback_cache: bool = False,
    ) -> None:
        self.backend = backend
        self.mountpoint = Path(mountpoint)
        self.file_name = file_name
        self.file_path = self.mountpoint / file_name
        self._name = os.fsencode(file_name)
        self._threads_wanted = max(1, threads)
        self._direct_io = direct_io
        self._writeback_cache = writeback_cache and not direct_io
        self._fd = -1
        self._mounted = False
        self._workers: list[threading.Thread] = []
        self._ready = threading.Event()
        self._stopping = False
        self._max_write = MAX_WRITE
        self.errors: list[str] = []  # backend failures answered with EIO, for the owner to see
        self._log_guard = threading.Lock()
        self._logged_at = -1.0e9  # monotonic time of the last failure logged
        self._unlogged = 0
        self._handlers: dict[int, Handler] = {
            k.FUSE_INIT: self._init,
            k.FUSE_LOOKUP: self._lookup,
            k.FUSE_GETATTR: self._getattr,
            k.FUSE_SETATTR: self._setattr,
            k.FUSE_OPEN: self._open,
            k.FUSE_OPENDIR: self._open,
            k.FUSE_READ: self._read,
            k.FUSE_WRITE: self._write,
            k.FUSE_FSYNC: self._fsync,
            k.FUSE_FLUSH: self._fsync,
            k.FUSE_SYNCFS: self._fsync,
            k.FUSE_FSYNCDIR: self._ok,
            k.FUSE_RELEASE: self._ok,
            k.FUSE_RELEASEDIR: self._ok,
            k.FUSE_ACCESS: self._ok,
            k.FUSE_FALLOCATE: self._fallocate,
            k.FUSE_STATFS: self._statfs,
            k.FUSE_READDIR: self._readdir,
            k.FUSE_DESTROY: self._ok,
        }

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._mounted:
            return
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self._fd = k.open_device()
        try:
            k.mount_fuse(str(self.mountpoint), self._fd, subtype="thinmgr")
            self._mounted = True
            for index in range(self._threads_wanted):
                worker = threading.Thread(
                    target=self._serve, name=f"thinmgr-fuse-{index}", daemon=True
                )
                worker.start()
                self._workers.append(worker)
            if not self._ready.wait(_START_TIMEOUT):
                raise IOFailure(f"FUSE mount {self.mountpoint} did not initialise")
        except BaseException:
            self.stop()
            raise

    def stop(self, *, force: bool = False) -> None:
        """Unmount and join the workers. BusyError while the file is open, unless ``force``.

        With ``force`` the mount is detached lazily and the connection aborted, so the
        workers end even while a holder keeps the file open (its I/O then fails).
        """
        if self._mounted:
            try:
                umount(str(self.mountpoint))
            except BusyError:
                if not force:
                    raise
                self._abort()
            except ThinmgrError:
                if is_mount_point(str(self.mountpoint)):
                    raise
            self._mounted = False
        self._stopping = True
        deadline = time.monotonic() + _STOP_TIMEOUT
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        alive = [w.name for w in self._workers if w.is_alive()]
        self._workers = [w for w in self._workers if w.is_alive()]
        if alive:
            raise IOFailure(f"FUSE workers {', '.join(alive)} did not stop")
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _abort(self) -> None:
        """Lazy unmount, then abort the connection (fusectl) so the workers see ENODEV."""
        conn = None
        with contextlib.suppress(OSError):
            conn = os.minor(os.stat(self.mountpoint).st_dev)
        umount(str(self.mountpoint), MNT_DETACH)
        if conn is not None:
            abort_connection(conn)

    def __enter__(self) -> FuseExport:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(force=True)

    # -- the request loop ------------------------------------------------------------------

    def _serve(self) -> None:
        buffer = bytearray(_REQUEST_ROOM + self._max_write)
        view = memoryview(buffer)
        header = k.IN_HEADER
        handlers = self._handlers
        fd = self._fd
        while True:
            try:
                length = os.readv(fd, [buffer])
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue  # interrupted, or the request was withdrawn before we read it
                if exc.errno != errno.ENODEV:  # ENODEV: unmounted or aborted, the normal end
                    self.errors.append(f"reading {k.FUSE_DEVICE}: {exc.strerror}")
                return
            _len, opcode, unique, nodeid, _uid, _gid, _pid, _ext, _pad = header.unpack_from(buffer)
            handler = handlers.get(opcode)
            if handler is None:
                if opcode not in (k.FUSE_FORGET, k.FUSE_BATCH_FORGET, k.FUSE_INTERRUPT):
                    self._reply_error(unique, errno.ENOSYS)  # no reply is expected for those
                continue
            try:
                handler(view[header.size : length], unique, nodeid, opcode)
            except NoSpaceError:  # the pool is full: the writer gets ENOSPC, as from dm-thin
                self._reply_error(unique, errno.ENOSPC)
            except ThinmgrError as exc:
                self._backend_failed(unique, str(exc))
            except OSError as exc:
                self._backend_failed(unique, f"{exc.strerror or exc}")
            except Exception as exc:  # a bug must fail the one request, not hang the mount
                log.exception("FUSE request %d failed", opcode)
                self._backend_failed(unique, repr(exc))

    def _backend_failed(self, unique: int, message: str) -> None:
        # Logged as well as kept: the reader sees only EIO (a mount fails with "Input/output
        # error"), so the pool server's log is where the cause must be found. At most one
        # line a second: a failing device can fail thousands of requests a second.
        now = time.monotonic()
        with self._log_guard:
            if now - self._logged_at >= 1.0:
                more = f" (and {self._unlogged} more since)" if self._unlogged else ""
                log.error("%s: request failed with EIO: %s%s", self.file_path, message, more)
                self._logged_at, self._unlogged = now, 0
            else:
                self._unlogged += 1
            if len(self.errors) < _KEPT_ERRORS:
                self.errors.append(message)
        self._reply_error(unique, errno.EIO)

    def _reply(self, unique: int, *payload: bytes | memoryview) -> None:
        size = k.OUT_HEADER.size + sum(len(p) for p in payload)
        head = k.OUT_HEADER.pack(size, 0, unique)
        self._send([head, *payload])

    def _reply_error(self, unique: int, code: int) -> None:
        self._send([k.OUT_HEADER.pack(k.OUT_HEADER.size, -code, unique)])

    def _send(self, parts: list[bytes | memoryview]) -> None:
        try:
            os.writev(self._fd, parts)
        except OSError as exc:
            # ENOENT: the request was interrupted and dropped; ENODEV: the mount went away
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                raise

    # -- attributes --------------------------------------------------------------------------

    def _attr(self, nodeid: int) -> bytes:
        now = int(time.time())
        if nodeid == k.FUSE_ROOT_ID:
            mode, size, nlink = stat.S_IFDIR | 0o755, 0, 2
        else:
            mode, size, nlink = stat.S_IFREG | 0o600, self.backend.size, 1
        blocks = (size + 511) // 512
        return k.ATTR.pack(
            nodeid, size, blocks, now, now, now, 0, 0, 0, mode, nlink, 0, 0, 0, 4096, 0
        )

    # -- handlers: (body after fuse_in_header, unique, nodeid, opcode) -----------------------

    def _init(self, body: memoryview, unique: int, _nodeid: int, _op: int) -> None:
        major, minor, max_readahead, kernel_flags = k.INIT_IN.unpack_from(body)
        if major != k.FUSE_KERNEL_VERSION or minor < 26:
            self._reply_error(unique, errno.EPROTO)
            self.errors.append(f"kernel FUSE protocol {major}.{minor} is too old (need 7.26)")
            return
        wanted = k.FUSE_ASYNC_READ | k.FUSE_BIG_WRITES | k.FUSE_ASYNC_DIO | k.FUSE_MAX_PAGES
        wanted |= k.FUSE_PARALLEL_DIROPS
        if self._writeback_cache:
            wanted |= k.FUSE_WRITEBACK_CACHE
        flags = wanted & kernel_flags
        if not flags & k.FUSE_MAX_PAGES:
            self._max_write = min(self._max_write, 32 * 4096)  # the kernel's old fixed limit
        max_pages = self._max_write // 4096
        out = k.INIT_OUT.pack(
            k.FUSE_KERNEL_VERSION,
            min(minor, k.FUSE_KERNEL_MINOR_VERSION),
            max_readahead,
            flags,
            16,
            12,
            self._max_write,
            1,
            max_pages,
            0,
            0,
        )
        self._reply(unique, out)
        self._ready.set()

    def _lookup(self, body: memoryview, unique: int, nodeid: int, _op: int) -> None:
        name = bytes(body).split(b"\0", 1)[0]
        if nodeid != k.FUSE_ROOT_ID or name != self._name:
            self._reply_error(unique, errno.ENOENT)
            return
        head = k.ENTRY_OUT_HEAD.pack(_FILE_INO, 0, _ATTR_TTL, _ATTR_TTL, 0, 0)
        self._reply(unique, head, self._attr(_FILE_INO))

    def _getattr(self, _body: memoryview, unique: int, nodeid: int, _op: int) -> None:
        self._reply(unique, k.ATTR_OUT_HEAD.pack(_ATTR_TTL, 0, 0), self._attr(nodeid))

    def _setattr(self, body: memoryview, unique: int, nodeid: int, _op: int) -> None:
        valid, _pad, _fh, size = k.SETATTR_IN.unpack_from(body)
        if valid & k.FATTR_SIZE and (nodeid != _FILE_INO or size != self.backend.size):
            self._reply_error(unique, errno.EPERM)  # the volume's size is the pool's business
            return
        self._getattr(body, unique, nodeid, _op)  # mode/owner/times: accepted, not stored

    def _open(self, _body: memoryview, unique: int, nodeid: int, op: int) -> None:
        flags = k.FOPEN_DIRECT_IO if (self._direct_io and op == k.FUSE_OPEN) else 0
        self._reply(unique, k.OPEN_OUT.pack(0, flags, 0))

    def _read(self, body: memoryview, unique: int, _nodeid: int, _op: int) -> None:
        _fh, offset, size, _flags = k.READ_IN.unpack_from(body)
        length = max(0, min(size, self.backend.size - offset))
        self._reply(unique, self.backend.read(offset, length) if length else b"")

    def _write(self, body: memoryview, unique: int, _nodeid: int, _op: int) -> None:
        _fh, offset, size, *_rest = k.WRITE_IN.unpack_from(body)
        if offset + size > self.backend.size:
            self._reply_error(unique, errno.ENOSPC)  # a block device does not grow on write
            return
        self.backend.write(offset, body[k.WRITE_IN.size : k.WRITE_IN.size + size])
        self._reply(unique, k.WRITE_OUT.pack(size, 0))

    def _fsync(self, _body: memoryview, unique: int, _nodeid: int, _op: int) -> None:
        self.backend.flush()
        self._reply(unique)

    def _ok(self, _body: memoryview, unique: int, _nodeid: int, op: int) -> None:
        if op == k.FUSE_DESTROY:
            self._stopping = True
        self._reply(unique)

    def _fallocate(self, body: memoryview, unique: int, _nodeid: int, _op: int) -> None:
        _fh, offset, length, mode, _pad = k.FALLOCATE_IN.unpack_from(body)
        end = min(offset + length, self.backend.size)
        punch = k.FALLOC_FL_PUNCH_HOLE | k.FALLOC_FL_KEEP_SIZE
        # The loop driver sends discards as PUNCH_HOLE|KEEP_SIZE and write-zeroes as
        # ZERO_RANGE|KEEP_SIZE or PUNCH_HOLE (drivers/block/loop.c lo_fallocate); the backend's
        # discard reads back as zeros, so it serves all of them.
        if mode in (punch, k.FALLOC_FL_ZERO_RANGE | k.FALLOC_FL_KEEP_SIZE, k.FALLOC_FL_ZERO_RANGE):
            if end > offset:
                self.backend.discard(offset, end - offset)
        elif mode != 0 or offset + length > self.backend.size:
            self._reply_error(unique, errno.EOPNOTSUPP)
            return
        self._reply(unique)  # mode 0 inside the file: every block already "exists"

    def _statfs(self, _body: memoryview, unique: int, _nodeid: int, _op: int) -> None:
        blocks = self.backend.size // 4096
        self._reply(unique, k.KSTATFS.pack(blocks, 0, 0, 2, 0, 4096, 255, 4096, 0))

    def _readdir(self, body: memoryview, unique: int, _nodeid: int, _op: int) -> None:
        _fh, offset, size, _flags = k.READ_IN.unpack_from(body)
        entries = [
            (k.FUSE_ROOT_ID, b".", stat.S_IFDIR),
            (k.FUSE_ROOT_ID, b"..", stat.S_IFDIR),
            (_FILE_INO, self._name, stat.S_IFREG),
        ]
        out = bytearray()
        for index in range(offset, len(entries)):
            ino, name, kind = entries[index]
            record = k.DIRENT_HEAD.pack(ino, index + 1, len(name), kind >> 12) + name
            record += bytes(-len(record) % 8)  # FUSE_DIRENT_ALIGN: 8-byte records
            if len(out) + len(record) > size:
                break
            out += record
        self._reply(unique, bytes(out))


def abort_connection(conn: int) -> None:
    """Abort FUSE connection ``conn`` through fusectl, mounting fusectl if it is not."""
    base = Path("/sys/fs/fuse/connections")
    abort = base / str(conn) / "abort"
    if not abort.exists():
        from thinmgr.kernel.mount import mount

        try:
            mount("fusectl", str(base), "fusectl")
        except ThinmgrError:
            return
    with contextlib.suppress(OSError):
        abort.write_text("1")
