"""FITRIM: discard the free space of a mounted file system (what fstrim(8) does).

Used before `thinmgr commit` of a live file system. ext4 never returns blocks of deleted or
rewritten files to a thin device by itself (containers mount without ``-o discard``), so a
snapshot of a container that rewrote a file a thousand times would map a thousand copies
and the new layer would carry them all. FITRIM sends discards for the free extents; the thin
device unmaps the whole blocks among them (dm-thin passdown; the user engine through loop
-> FUSE fallocate(PUNCH_HOLE)), so only live data is left mapped.

The mount point is opened directly, never resolved first: ``/proc/PID/root`` names a
container's root only as a magic link (util-linux fstrim canonicalises the path, and
``/proc/PID/root`` then becomes the host's ``/`` -- it trims the host file system instead).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from thinmgr.kernel.errno_map import kernel_error
from thinmgr.kernel.freeze import open_directory

# linux/fs.h: struct fstrim_range { __u64 start; __u64 len; __u64 minlen; };
# #define FITRIM _IOWR('X', 121, struct fstrim_range)
FSTRIM_RANGE = struct.Struct("=QQQ")
FITRIM = 0xC0185879
WHOLE = 2**64 - 1  # ULLONG_MAX: fstrim's default length, "to the end of the file system"


def trim_free_space(mount_point: str) -> int | None:
    """Discard the free space of the file system at ``mount_point``; bytes the kernel trimmed.

    None when the file system or its device cannot discard (EOPNOTSUPP, as fstrim reports
    "the discard operation is not supported"): nothing was done, which is not an error.
    """
    fd = open_directory(mount_point)
    try:
        # The kernel writes back the number of bytes trimmed into ``len``.
        result = fcntl.ioctl(fd, FITRIM, FSTRIM_RANGE.pack(0, WHOLE, 0))
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
            return None
        raise kernel_error(f"trim {mount_point}", exc) from exc
    finally:
        os.close(fd)
    return int(FSTRIM_RANGE.unpack(result)[1])
