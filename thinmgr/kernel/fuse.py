"""The FUSE kernel protocol: opcodes, flags and struct layouts, plus opening and mounting.

Layouts are those of ``include/uapi/linux/fuse.h`` at protocol 7.31 (all native-endian, no
implicit padding). A server reads one request per ``read`` on ``/dev/fuse`` and answers with one
``write`` of ``fuse_out_header`` + payload; the kernel matches them by ``unique``.
"""

from __future__ import annotations

import os
import struct

from thinmgr.kernel.errno_map import kernel_error
from thinmgr.kernel.mount import MS_NODEV, MS_NOSUID, mount

FUSE_DEVICE = "/dev/fuse"

FUSE_KERNEL_VERSION = 7
# The minor we answer with: 7.31 has everything used here (max_pages is 7.28) and the
# kernel sizes its replies by it.
FUSE_KERNEL_MINOR_VERSION = 31
FUSE_ROOT_ID = 1

# enum fuse_opcode
FUSE_LOOKUP = 1
FUSE_FORGET = 2
FUSE_GETATTR = 3
FUSE_SETATTR = 4
FUSE_OPEN = 14
FUSE_READ = 15
FUSE_WRITE = 16
FUSE_STATFS = 17
FUSE_RELEASE = 18
FUSE_FSYNC = 20
FUSE_GETXATTR = 22
FUSE_LISTXATTR = 23
FUSE_FLUSH = 25
FUSE_INIT = 26
FUSE_OPENDIR = 27
FUSE_READDIR = 28
FUSE_RELEASEDIR = 29
FUSE_FSYNCDIR = 30
FUSE_ACCESS = 34
FUSE_INTERRUPT = 36
FUSE_DESTROY = 38
FUSE_BATCH_FORGET = 42
FUSE_FALLOCATE = 43
FUSE_SYNCFS = 50

# fuse_init_in/out flags
FUSE_ASYNC_READ = 1 << 0
FUSE_BIG_WRITES = 1 << 5
FUSE_ASYNC_DIO = 1 << 15
FUSE_WRITEBACK_CACHE = 1 << 16
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_MAX_PAGES = 1 << 22

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1

# fuse_setattr_in.valid
FATTR_SIZE = 1 << 3

# fallocate(2) modes (linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# The kernel refuses a read buffer smaller than this (FUSE_MIN_READ_BUFFER in fs/fuse/fuse_i.h)
FUSE_MIN_READ_BUFFER = 8192

IN_HEADER = struct.Struct("=IIQQIIIHH")  # fuse_in_header, 40 bytes
OUT_HEADER = struct.Struct("=IiQ")  # fuse_out_header, 16 bytes
INIT_IN = struct.Struct("=IIII")  # major, minor, max_readahead, flags (first 16 bytes)
# fuse_init_out: major minor max_readahead flags max_background congestion_threshold max_write
# time_gran max_pages map_alignment flags2 unused[7]; 64 bytes
INIT_OUT = struct.Struct("=IIIIHHIIHHI28x")
# fuse_attr: ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink uid gid
# rdev blksize flags; 88 bytes
ATTR = struct.Struct("=QQQQQQIIIIIIIIII")
ATTR_OUT_HEAD = struct.Struct("=QII")  # fuse_attr_out before its fuse_attr, 16 bytes
ENTRY_OUT_HEAD = struct.Struct("=QQQQII")  # fuse_entry_out before its fuse_attr, 40 bytes
OPEN_OUT = struct.Struct("=QII")  # fuse_open_out, 16 bytes
READ_IN = struct.Struct("=QQII")  # fuse_read_in: fh offset size read_flags (first 24 of 40)
WRITE_IN = struct.Struct("=QQIIQII")  # fuse_write_in, 40 bytes
WRITE_OUT = struct.Struct("=II")  # fuse_write_out, 8 bytes
SETATTR_IN = struct.Struct("=IIQQ")  # fuse_setattr_in: valid padding fh size (first 24 of 88)
FALLOCATE_IN = struct.Struct("=QQQII")  # fuse_fallocate_in, 32 bytes
KSTATFS = struct.Struct("=QQQQQIIII24x")  # fuse_kstatfs, 80 bytes
DIRENT_HEAD = struct.Struct("=QQII")  # fuse_dirent before its name: ino off namelen type


def open_device() -> int:
    try:
        return os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise kernel_error(f"open {FUSE_DEVICE}", exc, hint="Is FUSE in the kernel?") from exc


def mount_fuse(
    mountpoint: str,
    fuse_fd: int,
    *,
    subtype: str,
    rootmode: int = 0o40000,
    allow_other: bool = True,
) -> None:
    """Mount a FUSE file system served on ``fuse_fd`` (what fusermount does, as root).

    The kernel sends FUSE_INIT asynchronously: requests wait until a server answers it.
    """
    options = f"fd={fuse_fd},rootmode={rootmode:o},user_id=0,group_id=0"
    if allow_other:
        options += ",allow_other,default_permissions"
    mount(subtype, mountpoint, f"fuse.{subtype}", MS_NOSUID | MS_NODEV, options)
