"""File syscalls the standard library lacks (fallocate(2) with a mode)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); raises OSError (callers translate it, they know the file's name)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


BLKFLSBUF = 0x1261  # linux/fs.h _IO(0x12, 97): write back and drop a block device's cache


def drop_block_cache(fd: int) -> None:
    """BLKFLSBUF on a block device; raises OSError (the caller knows the device's name)."""
    import fcntl

    fcntl.ioctl(fd, BLKFLSBUF, 0)
