"""FS_IOC_FIEMAP: where a file's (or an ext4 directory's) bytes lie on its block device.

The structures and constants are those of ``include/uapi/linux/fiemap.h`` and the ioctl of
``include/uapi/linux/fs.h``; the protocol is the kernel's Documentation/filesystems/fiemap.rst:
the caller passes a range and room for N extents, the kernel fills in at most N and says how
many it mapped; the last extent of the file carries FIEMAP_EXTENT_LAST. A file with more
extents than fit is read in several calls, each starting where the previous one ended.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass

from thinmgr.kernel.errno_map import kernel_error

# include/uapi/linux/fs.h: #define FS_IOC_FIEMAP _IOWR('f', 11, struct fiemap)
FS_IOC_FIEMAP = 0xC020660B

# include/uapi/linux/fiemap.h
FIEMAP_MAX_OFFSET = (1 << 64) - 1
FIEMAP_FLAG_SYNC = 0x00000001  # sync the file before mapping it (flushes delayed allocation)
FIEMAP_EXTENT_LAST = 0x00000001  # the file's last extent
FIEMAP_EXTENT_UNKNOWN = 0x00000002  # data location unknown (fe_physical is not meaningful)
FIEMAP_EXTENT_DELALLOC = 0x00000004  # delayed allocation: no block yet (also sets UNKNOWN)
FIEMAP_EXTENT_ENCODED = 0x00000008  # compressed/encoded: on-disk bytes are not file bytes
FIEMAP_EXTENT_DATA_ENCRYPTED = 0x00000080
FIEMAP_EXTENT_NOT_ALIGNED = 0x00000100  # not block aligned (e.g. inline data)
FIEMAP_EXTENT_DATA_INLINE = 0x00000200  # data stored inside a metadata block (ext4: the inode)
FIEMAP_EXTENT_DATA_TAIL = 0x00000400
FIEMAP_EXTENT_UNWRITTEN = 0x00000800  # allocated but unwritten: reads as zeros
FIEMAP_EXTENT_MERGED = 0x00001000
FIEMAP_EXTENT_SHARED = 0x00002000

# struct fiemap { __u64 fm_start, fm_length; __u32 fm_flags, fm_mapped_extents,
#                 fm_extent_count, fm_reserved; struct fiemap_extent fm_extents[]; }
_HEADER = struct.Struct("=QQIIII")
# struct fiemap_extent { __u64 fe_logical, fe_physical, fe_length, fe_reserved64[2];
#                        __u32 fe_flags, fe_reserved[3]; }
_EXTENT = struct.Struct("=QQQQQIIII")
assert _HEADER.size == 32 and _EXTENT.size == 56

# Flags under which fe_physical does not name the file's bytes on the device, block for block.
NOT_ON_DEVICE = (
    FIEMAP_EXTENT_UNKNOWN
    | FIEMAP_EXTENT_DELALLOC
    | FIEMAP_EXTENT_ENCODED
    | FIEMAP_EXTENT_DATA_ENCRYPTED
    | FIEMAP_EXTENT_NOT_ALIGNED
    | FIEMAP_EXTENT_DATA_INLINE
    | FIEMAP_EXTENT_DATA_TAIL
)

BATCH = 128  # extents asked for per call: 32 + 128 * 56 bytes, one page and a bit


@dataclass(frozen=True)
class Extent:
    logical: int  # byte offset in the file
    physical: int  # byte offset on the block device
    length: int  # bytes
    flags: int

    @property
    def on_device(self) -> bool:
        """fe_physical holds exactly the file's bytes (neither inline, delayed nor encoded)."""
        return not self.flags & NOT_ON_DEVICE

    @property
    def unwritten(self) -> bool:
        return bool(self.flags & FIEMAP_EXTENT_UNWRITTEN)


def fiemap_fd(fd: int, *, sync: bool = False, what: str = "file") -> list[Extent]:
    """Every extent of the open file ``fd``, in logical order.

    ``sync`` (FIEMAP_FLAG_SYNC) writes the file's dirty pages first, so that extents under
    delayed allocation get their blocks; without it they come back DELALLOC (location unknown).
    """
    extents: list[Extent] = []
    start = 0
    buf = bytearray(_HEADER.size + BATCH * _EXTENT.size)
    flags = FIEMAP_FLAG_SYNC if sync else 0
    while True:
        _HEADER.pack_into(buf, 0, start, FIEMAP_MAX_OFFSET - start, flags, 0, BATCH, 0)
        buf[_HEADER.size :] = bytes(len(buf) - _HEADER.size)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        except OSError as exc:
            hint = "FIEMAP needs a file system that maps extents (ext4, xfs, btrfs)."
            if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP):
                raise kernel_error(f"map the extents of {what}", exc, hint=hint) from exc
            raise kernel_error(f"map the extents of {what}", exc) from exc
        mapped = _HEADER.unpack_from(buf, 0)[3]
        if mapped == 0:
            return extents
        last = None
        for i in range(mapped):
            fields = _EXTENT.unpack_from(buf, _HEADER.size + i * _EXTENT.size)
            last = Extent(fields[0], fields[1], fields[2], fields[5])
            extents.append(last)
        assert last is not None
        if last.flags & FIEMAP_EXTENT_LAST or last.length == 0:
            return extents
        start = last.logical + last.length


def fiemap_path(path: str, *, sync: bool = False) -> list[Extent]:
    """The extents of the file or directory at ``path`` (opened read-only, never read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise kernel_error(f"open {path}", exc) from exc
    try:
        return fiemap_fd(fd, sync=sync, what=path)
    finally:
        os.close(fd)
