"""FIFREEZE/FITHAW of a mounted filesystem, and finding where a block device is mounted.

Used around a snapshot of a live volume: freeze the filesystem (the kernel flushes it and
blocks new writes), suspend the thin device, snapshot, resume, thaw (ARCHITECTURE.md, main
flow 5; prior-art.md section 3, item 11).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from thinmgr.errors import ThinmgrError
from thinmgr.kernel.errno_map import kernel_error

# linux/fs.h: #define FIFREEZE _IOWR('X', 119, int), FITHAW _IOWR('X', 120, int)
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878

MOUNTINFO = Path("/proc/self/mountinfo")


@dataclass(frozen=True)
class Mount:
    device: str  # "major:minor" of the filesystem's device (st_dev), field 3 of mountinfo
    mount_point: str
    fs_type: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo (octal)
    out, i = [], 0
    while i < len(field):
        chunk = field[i + 1 : i + 4]
        if field[i] == "\\" and len(chunk) == 3 and all(c in "01234567" for c in chunk):
            out.append(chr(int(chunk, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts listed in a /proc/PID/mountinfo text (proc(5))."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        mounts.append(Mount(fields[2], _unescape(fields[4]), tail[0], _unescape(tail[1])))
    return mounts


def read_mounts(path: Path = MOUNTINFO) -> list[Mount]:
    try:
        return parse_mountinfo(path.read_text(encoding="utf-8", errors="surrogateescape"))
    except OSError as exc:
        raise kernel_error(f"read {path}", exc) from exc


def device_number(path: str | os.PathLike[str]) -> str | None:
    """ "major:minor" of a block device node, None when ``path`` is not one."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def mounts_of(device: str | os.PathLike[str], mounts: list[Mount] | None = None) -> list[Mount]:
    """Where the block device ``device`` is mounted (by major:minor), in this namespace."""
    number = device_number(device)
    if number is None:
        return []
    return [m for m in (read_mounts() if mounts is None else mounts) if m.device == number]


class HeldMount:
    """A directory of a mounted file system, held open by this process.

    ``path`` (``/proc/self/fd/N``) reaches the mount for as long as the holder is open, even
    when it was found through another process (``hold_mount``) that has exited since: a
    short-lived process of a container is often the first one a scan meets.
    """

    def __init__(self, fd: int, origin: str) -> None:
        self.fd = fd
        self.origin = origin  # the path it was opened by, for messages

    @property
    def path(self) -> str:
        return f"/proc/self/fd/{self.fd}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> HeldMount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_directory(path: str) -> int:
    """An O_RDONLY descriptor of a directory: what FIFREEZE, FITHAW and FITRIM are issued on."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise kernel_error(f"open {path}", exc) from exc


def hold_path(path: str) -> HeldMount:
    return HeldMount(open_directory(path), path)


def hold_mount(device: str | os.PathLike[str]) -> HeldMount | None:
    """A held mount of ``device`` in any mount namespace; None when it is mounted nowhere.

    A container's root file system is mounted only inside the container's own mount
    namespace, so it never shows in our mountinfo; a live snapshot must still freeze it. A
    process in that namespace exposes it as ``/proc/PID/root`` + its mount point (the magic
    link resolves in the process's namespace, mounts included). Each namespace is read once;
    a process that exits before its root is opened is passed over for the next one.
    """
    number = device_number(device)
    if number is None:
        return None
    here = [m for m in read_mounts() if m.device == number]
    if here:
        return hold_path(here[0].mount_point)
    seen: set[str] = set()
    with contextlib.suppress(OSError):
        seen.add(os.readlink("/proc/self/ns/mnt"))
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            namespace = os.readlink(f"/proc/{entry.name}/ns/mnt")
            if namespace in seen:
                continue
            text = Path(f"/proc/{entry.name}/mountinfo").read_text(
                encoding="utf-8", errors="surrogateescape"
            )
        except OSError:
            continue  # gone, or a kernel thread
        for mount in parse_mountinfo(text):
            if mount.device != number:
                continue
            try:
                return hold_path(f"/proc/{entry.name}/root{mount.mount_point.rstrip('/')}")
            except ThinmgrError:
                break  # the process went away: another one of its namespace may serve
        else:
            seen.add(namespace)
    return None


def freeze(mount_point: str) -> None:
    """FIFREEZE: flush the filesystem and block writes to it until ``thaw``."""
    fd = open_directory(mount_point)
    try:
        freeze_fd(fd, mount_point)
    finally:
        os.close(fd)


def freeze_fd(fd: int, what: str) -> None:
    """FIFREEZE on an open directory of the file system (``what`` names it in errors)."""
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
    except OSError as exc:
        raise kernel_error(f"freeze {what}", exc) from exc


def thaw(mount_point: str) -> bool:
    """FITHAW; False when it was not frozen (EINVAL), which is not an error here."""
    fd = open_directory(mount_point)
    try:
        return thaw_fd(fd, mount_point)
    finally:
        os.close(fd)


def thaw_fd(fd: int, what: str) -> bool:
    """FITHAW on an open directory; False when it was not frozen (EINVAL)."""
    try:
        fcntl.ioctl(fd, FITHAW, 0)
        return True
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise kernel_error(f"thaw {what}", exc) from exc
