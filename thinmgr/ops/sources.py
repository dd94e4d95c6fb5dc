"""Opening metadata files and devices as block sources for the format code."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
from types import TracebackType

from thinmgr.errors import IOFailure, NotFoundError, PermissionDenied, ThinmgrError
from thinmgr.format.constants import BLOCK_SIZE


def _open_error(path: str, exc: OSError) -> ThinmgrError:
    if exc.errno == errno.ENOENT:
        return NotFoundError(
            f"{path}: no such file or device", hint="Check the path of the metadata file or device."
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionDenied(f"{path}: permission denied")
    if exc.errno == errno.EISDIR:
        return IOFailure(f"{path}: is a directory", hint="Give the metadata file or device itself.")
    return IOFailure(f"{path}: {exc.strerror}")


class MetadataFile:
    """A metadata file or block device, memory-mapped read-only (or read-write for writers).

    Memory mapping lets the format code take zero-copy views of blocks; the kernel's page
    cache does the reading.
    """

    def __init__(self, path: str, *, writable: bool = False) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        except OSError as exc:
            raise _open_error(path, exc) from exc
        try:
            st = os.fstat(self._fd)
            if stat.S_ISBLK(st.st_mode):
                size = os.lseek(self._fd, 0, os.SEEK_END)
            elif stat.S_ISREG(st.st_mode):
                size = st.st_size
            else:
                raise IOFailure(f"{path}: not a regular file or block device")
            self.size = size
            self._nr = size // BLOCK_SIZE
            self._map: mmap.mmap | None = None
            if self._nr:
                prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
                self._map = mmap.mmap(self._fd, self._nr * BLOCK_SIZE, mmap.MAP_SHARED, prot)
            self._view = memoryview(self._map) if self._map is not None else memoryview(b"")
        except OSError as exc:
            os.close(self._fd)
            raise _open_error(path, exc) from exc
        except ThinmgrError:
            os.close(self._fd)
            raise

    @property
    def nr_blocks(self) -> int:
        return self._nr

    def read_block(self, blocknr: int) -> memoryview:
        start = blocknr * BLOCK_SIZE
        return self._view[start : start + BLOCK_SIZE]

    def close(self) -> None:
        self._view.release()
        if self._map is not None:
            # numpy views of blocks may still be alive; the mapping then goes with them.
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> MetadataFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
