"""Checks on the devices a pool is made on: they exist, are free, and hold nothing.

A device given to ``pool create --data DEV --metadata DEV`` must be a block device (regular
files are allowed too, for tests and for pools on files you manage yourself), not mounted,
not held by another device (a dm table, an md array: ``/sys/class/block/X/holders``, or an
O_EXCL open failing with EBUSY), and carry no known signature: formatting over a filesystem
or someone's pool is the one mistake that cannot be undone. ``--force`` skips the last
check only after the user has seen what was found.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from thinmgr.errors import BusyError, ConflictError, NotFoundError, PermissionDenied, UsageError
from thinmgr.format.constants import THIN_MAGIC
from thinmgr.kernel.freeze import mounts_of

# (offset, magic, what): the well-known signatures, as blkid(8) finds them.
SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (1080, struct.pack("<H", 0xEF53), "an ext2/3/4 filesystem"),
    (0, b"XFSB", "an XFS filesystem"),
    (65600, b"_BHRfS_M", "a btrfs filesystem"),
    (4086, b"SWAPSPACE2", "swap space"),
    (4086, b"SWAP-SPACE", "swap space"),
    (0, b"LUKS\xba\xbe", "a LUKS volume"),
    (3, b"NTFS    ", "an NTFS filesystem"),
    (82, b"FAT32   ", "a FAT32 filesystem"),
    (54, b"FAT16   ", "a FAT filesystem"),
    (0x218, b"LVM2 001", "an LVM physical volume"),
    (32, struct.pack("<Q", THIN_MAGIC), "dm-thin pool metadata"),
)
_READ = 65600 + 8


@dataclass(frozen=True)
class DeviceInfo:
    path: Path
    size: int
    is_block: bool


def inspect_device(path: Path, role: str) -> DeviceInfo:
    """Existence, kind and size of a device given by path."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFoundError(f"{role} device {path} does not exist") from None
    except PermissionError:
        raise PermissionDenied(f"cannot look at {role} device {path}") from None
    if stat.S_ISBLK(st.st_mode):
        return DeviceInfo(path, _block_size(path), True)
    if stat.S_ISREG(st.st_mode):
        return DeviceInfo(path, st.st_size, False)
    raise UsageError(
        f"{role} device {path} is neither a block device nor a regular file",
        hint="Give a block device (e.g. /dev/sdb1) or a file.",
    )


def _block_size(path: Path) -> int:
    fd = _open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except PermissionError:
        raise PermissionDenied(f"cannot open {path}") from None
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise BusyError(
                f"{path} is in use (an exclusive open failed: mounted, or held by "
                "another device or program)",
                hint="Unmount it or stop what holds it.",
            ) from None
        raise NotFoundError(f"cannot open {path}: {exc.strerror}") from None


def holders(path: Path) -> list[str]:
    """Block devices stacked on ``path`` (sysfs ``holders``)."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    if not stat.S_ISBLK(st.st_mode):
        return []
    sysdir = Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/holders")
    try:
        return sorted(p.name for p in sysdir.iterdir())
    except OSError:
        return []


def signature_of(path: Path) -> str | None:
    """What ``path`` holds, when it starts with a known signature."""
    fd = _open(path, os.O_RDONLY)
    try:
        head = os.pread(fd, _READ, 0)
    finally:
        os.close(fd)
    for offset, magic, what in SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return what
    return None


def check_free(info: DeviceInfo, role: str, *, force: bool) -> None:
    """Refuse a device that is mounted, held or (unless ``force``) holds a signature."""
    mounted = mounts_of(info.path)
    if mounted:
        raise BusyError(
            f"{role} device {info.path} is mounted on {mounted[0].mount_point}",
            hint="Unmount it first; thinmgr never formats a mounted device.",
        )
    held = holders(info.path)
    if held:
        raise BusyError(
            f"{role} device {info.path} is held by {', '.join(held)}",
            hint="Remove the device-mapper table or md array that uses it first.",
        )
    if info.is_block:
        os.close(_open(info.path, os.O_RDONLY | os.O_EXCL))
    if force:
        return
    found = signature_of(info.path)
    if found:
        raise ConflictError(
            f"{role} device {info.path} holds {found}",
            hint="Everything on it would be lost. Wipe it (wipefs -a) or pass --force if "
            "you are sure.",
        )
