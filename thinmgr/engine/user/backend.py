"""What the block-device export serves: a fixed-size array of bytes.

The user engine's thin volume implements ``BlockBackend``; ``FileBackend`` serves a plain file
and is the measuring stick for the export's overhead.
"""

from __future__ import annotations

import errno
import os
from typing import Protocol, TypeAlias, runtime_checkable

from thinmgr.errors import IOFailure, UsageError
from thinmgr.kernel.files import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

# What write() accepts: the export hands over a memoryview of its request buffer (no copy).
BytesLike: TypeAlias = bytes | bytearray | memoryview


@runtime_checkable
class BlockBackend(Protocol):
    """A block device's contents.

    Offsets and lengths are bytes and stay within ``size``; the export checks that. Calls may
    come from several threads at once, so implementations serialise what needs it.
    """

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes (unwritten or discarded ranges read as zeros)."""
        ...

    def write(self, offset: int, data: BytesLike) -> None: ...

    def flush(self) -> None:
        """Make every completed write durable (the export calls it on fsync and flush)."""
        ...

    def discard(self, offset: int, length: int) -> None:
        """Forget the range; it reads back as zeros afterwards."""
        ...


class FileBackend:
    """A ``BlockBackend`` over a regular file (sparse where the file system allows)."""

    def __init__(self, path: str | os.PathLike[str], *, size: int | None = None) -> None:
        """Open ``path``; with ``size``, create it or set its length first."""
        self.path = os.fspath(path)
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if size is not None else 0)
        try:
            self._fd = os.open(self.path, flags, 0o600)
            if size is not None:
                os.ftruncate(self._fd, size)
            self._size = os.fstat(self._fd).st_size
        except OSError as exc:
            raise IOFailure(f"cannot open backing file {self.path}: {exc.strerror}") from exc
        if self._size == 0:
            os.close(self._fd)
            raise UsageError(f"backing file {self.path} is empty: give it a size")

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) < length:  # the file shrank behind our back: the rest reads as zeros
            data += bytes(length - len(data))
        return data

    def write(self, offset: int, data: BytesLike) -> None:
        view = memoryview(data)
        while view:
            done = os.pwrite(self._fd, view, offset)
            view, offset = view[done:], offset + done

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def discard(self, offset: int, length: int) -> None:
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        try:
            fallocate(self._fd, mode, offset, length)
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
            self.write(offset, bytes(length))  # no hole punching here: zeros keep the contract

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
