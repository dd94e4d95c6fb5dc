"""The metadata file or device of a user-engine pool as a ``BlockStore``.

This is the only place the user engine reads and writes metadata: ``os.pread``/``os.pwrite``
of whole 4 KiB blocks and ``os.fdatasync`` as the cache flush that orders a commit (format
section 8: everything but the superblock is flushed before the superblock is written).
"""

from __future__ import annotations

import errno
import os
import stat

from thinmgr.errors import IOFailure, NotFoundError, PermissionDenied, ThinmgrError, UsageError
from thinmgr.format.constants import BLOCK_SIZE


def open_error(path: str, exc: OSError, what: str) -> ThinmgrError:
    """An ``OSError`` from opening ``path`` as the matching ``ThinmgrError``."""
    if exc.errno == errno.ENOENT:
        return NotFoundError(f"{what} {path}: no such file or device")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionDenied(f"{what} {path}: permission denied")
    return IOFailure(f"{what} {path}: {exc.strerror}")


def device_size(fd: int) -> int:
    """Size in bytes of a regular file or a block device (lseek to the end works for both)."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return os.fstat(fd).st_size
    if stat.S_ISBLK(mode):
        return os.lseek(fd, 0, os.SEEK_END)
    raise UsageError("not a regular file or a block device")


class FileBlockStore:
    """A ``BlockStore`` over a metadata file or block device (positional I/O, no mmap).

    ``read_only`` opens with O_RDONLY; writes then fail with ``PermissionDenied``.
    """

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False) -> None:
        self.path = os.fspath(path)
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self._fd = os.open(self.path, flags)
        except OSError as exc:
            raise open_error(self.path, exc, "metadata") from exc
        try:
            self._nr_blocks = device_size(self._fd) // BLOCK_SIZE
        except (OSError, UsageError) as exc:
            os.close(self._fd)
            raise UsageError(f"metadata {self.path} is not a regular file or block device") from exc

    @property
    def nr_blocks(self) -> int:
        return self._nr_blocks

    @property
    def fd(self) -> int:
        return self._fd

    def read_block(self, blocknr: int) -> bytes:
        try:
            data = os.pread(self._fd, BLOCK_SIZE, blocknr * BLOCK_SIZE)
        except OSError as exc:
            raise IOFailure(f"reading metadata block {blocknr} of {self.path}: {exc}") from exc
        if len(data) != BLOCK_SIZE:
            raise IOFailure(
                f"short read of metadata block {blocknr} of {self.path} ({len(data)} bytes): "
                "the file shrank?"
            )
        return data

    def write_block(self, blocknr: int, data: bytes | bytearray) -> None:
        if self.read_only:
            raise PermissionDenied(f"metadata {self.path} is open read-only")
        if len(data) != BLOCK_SIZE or not 0 <= blocknr < self._nr_blocks:
            raise UsageError(
                f"bad block write: block {blocknr}, {len(data)} bytes "
                f"(device has {self._nr_blocks} blocks)"
            )
        try:
            done = os.pwrite(self._fd, data, blocknr * BLOCK_SIZE)
        except OSError as exc:
            raise IOFailure(f"writing metadata block {blocknr} of {self.path}: {exc}") from exc
        if done != BLOCK_SIZE:
            raise IOFailure(f"short write of metadata block {blocknr} of {self.path}")

    def flush(self) -> None:
        if self.read_only:
            return
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise IOFailure(f"flushing metadata {self.path}: {exc}") from exc

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileBlockStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
