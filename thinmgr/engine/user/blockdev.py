"""A ``BlockBackend`` as a real block device: FUSE-served file + loop device + stable symlink.

    backend <- FuseExport (RUN_DIR/fuse/volume) <- /dev/loopN (autoclear) <- LINK -> /dev/loopN

The loop device is bound with autoclear and this process holds it open, so if the process
dies the kernel unbinds the device as soon as its last user lets go: a crash leaks no loop
device. docs/fuse-binding.md has the measurements behind the defaults (direct I/O on the FUSE
file, direct I/O on the loop device, 4 KiB logical blocks).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from thinmgr.engine.user.backend import BlockBackend
from thinmgr.engine.user.fuse_export import FuseExport
from thinmgr.errors import BusyError, ConflictError, IOFailure, ThinmgrError
from thinmgr.kernel import loop

FUSE_SUBDIR = "fuse"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportOptions:
    """How the device is served (the defaults are the measured best, docs/fuse-binding.md)."""

    threads: int = 2
    fuse_direct_io: bool = True  # FOPEN_DIRECT_IO: no second page cache under the loop device
    loop_direct_io: bool = True  # loop issues O_DIRECT AIO to the FUSE file
    block_size: int = 4096  # logical block size of the loop device


@dataclass
class BlockDevice:
    """An attached export. ``detach()`` is idempotent; ``device`` is ``/dev/loopN``."""

    backend: BlockBackend
    export: FuseExport
    link: Path
    device: str = ""
    loop_direct_io: bool = False
    _loop_fd: int = field(default=-1, repr=False)

    @property
    def attached(self) -> bool:
        return self._loop_fd >= 0 or self.export.file_path.exists()

    def flush(self) -> None:
        """Push the loop device's page cache through FUSE and make the backend durable."""
        if self._loop_fd >= 0:
            try:
                os.fsync(self._loop_fd)
            except OSError as exc:
                raise IOFailure(f"cannot flush {self.device}: {exc.strerror}") from exc
        self.backend.flush()

    def detach(self) -> None:
        """Flush, unbind the loop device, unmount FUSE, remove the link.

        BusyError (and nothing changed) while the device is mounted or held exclusively.
        """
        if self._loop_fd >= 0:
            self._refuse_if_busy()
            try:
                self.flush()
            except IOFailure as exc:
                # Writes that already failed (pool out of data space, a backend error) are
                # reported once by fsync and their pages left clean: no retry would write
                # them, so refusing to detach would save nothing. dm's remove does not fail
                # on earlier I/O errors either. The writers saw the error; the log keeps it.
                log.warning("detaching %s after failed writes: %s", self.link, exc)
            loop.detach(self._loop_fd, self.device)
            os.close(self._loop_fd)
            self._loop_fd = -1
            loop.wait_unbound(self.device)
        self.export.stop()
        self._remove_link()
        with contextlib.suppress(OSError):
            self.export.mountpoint.rmdir()

    def in_use(self) -> bool:
        """Whether a file system or a stacked device holds the device (detach would refuse)."""
        if self._loop_fd < 0:
            return False
        try:
            self._refuse_if_busy()
        except BusyError:
            return True
        return False

    def _refuse_if_busy(self) -> None:
        # An O_EXCL open of a block device fails with EBUSY while a file system (or anything
        # else) has claimed it; LOOP_CLR_FD itself would only defer (autoclear) and succeed.
        try:
            fd = loop.open_device(self.device, exclusive=True)
        except BusyError as exc:
            raise BusyError(
                f"cannot detach {self.link} ({self.device}): it is mounted or in use",
                hint=f"Unmount it first (see `findmnt {self.device}`).",
            ) from exc
        os.close(fd)
        if loop.holders(self.device):
            raise BusyError(
                f"cannot detach {self.link} ({self.device}): "
                f"{', '.join(loop.holders(self.device))} is stacked on it",
                hint="Remove the device-mapper table that uses it first.",
            )

    def _remove_link(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(self.link) == self.device:
                self.link.unlink()


def attach(
    backend: BlockBackend,
    *,
    run_dir: str | os.PathLike[str],
    link: str | os.PathLike[str],
    options: ExportOptions | None = None,
) -> BlockDevice:
    """Serve ``backend`` as a block device reachable at ``link``; on error nothing is left."""
    opts = options or ExportOptions()
    link_path = Path(link)
    _check_link_free(link_path)
    mountpoint = Path(run_dir) / FUSE_SUBDIR
    export = FuseExport(backend, mountpoint, threads=opts.threads, direct_io=opts.fuse_direct_io)
    block = BlockDevice(backend=backend, export=export, link=link_path)
    try:
        export.start()
        attached = loop.attach(
            export.file_path, direct_io=opts.loop_direct_io, block_size=opts.block_size
        )
        block.device, block._loop_fd = attached.device, attached.fd
        block.loop_direct_io = loop.status(block.device).direct_io
        _make_link(link_path, block.device)
    except BaseException:
        _undo_attach(block)
        raise
    return block


def _undo_attach(block: BlockDevice) -> None:
    """Best-effort rollback of a half-done attach; the original error is what the user sees."""
    with contextlib.suppress(ThinmgrError, OSError):
        if block._loop_fd >= 0:
            loop.detach(block._loop_fd, block.device)
            os.close(block._loop_fd)
            block._loop_fd = -1
            loop.wait_unbound(block.device)
    with contextlib.suppress(ThinmgrError, OSError):
        block.export.stop(force=True)
    with contextlib.suppress(OSError):
        block._remove_link()
    with contextlib.suppress(OSError):
        block.export.mountpoint.rmdir()


def _check_link_free(link: Path) -> None:
    if not os.path.lexists(link):
        return
    if not link.is_symlink():
        raise ConflictError(f"{link} exists and is not a symlink", hint="Choose another path.")
    target = os.readlink(link)
    if target.startswith("/dev/loop") and loop.is_bound(target):
        raise ConflictError(
            f"{link} already points to the attached device {target}",
            hint="Detach that volume first.",
        )


def _make_link(link: Path, device: str) -> None:
    """Atomically (re)point ``link`` at ``device``; a stale link from a crash is replaced."""
    link.parent.mkdir(parents=True, exist_ok=True)
    temporary = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    os.symlink(device, temporary)
    os.replace(temporary, link)
