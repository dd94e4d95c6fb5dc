"""Idmapped mounts and mount copies: open_tree(2), mount_setattr(2) and move_mount(2).

They are called through syscall(2): glibc 2.36 (Debian 12) wraps none of them. An idmapped
mount shows the files of a file system mounted in the initial user namespace through the
uid/gid maps of another user namespace: with a map ``0 100000 65536`` an on-disk uid 0 appears
as host uid 100000 (so as 0 inside that namespace), and a file created by host uid 100000 is
written to disk as uid 0. The mount must be a detached copy (``OPEN_TREE_CLONE``) when the
idmap is set, and the file system must be mounted in the initial user namespace (ext4 cannot be
mounted from inside a user namespace at all).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

from thinmgr.kernel.errno_map import kernel_error

# include/uapi/asm-generic/unistd.h: the same numbers on every architecture since 5.2/5.12
# (x86_64's arch/x86/entry/syscalls/syscall_64.tbl uses the common numbers too).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
_SUPPORTED_MACHINES = ("x86_64", "amd64", "aarch64", "arm64", "riscv64")

# include/uapi/linux/mount.h
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x00000004
MOUNT_ATTR_IDMAP = 0x00100000
# include/uapi/linux/fcntl.h
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000


class MountAttr(ctypes.Structure):
    """struct mount_attr (include/uapi/linux/mount.h, MOUNT_ATTR_SIZE_VER0 = 32 bytes)."""

    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check_machine() -> None:
    machine = platform.machine().lower()
    if machine not in _SUPPORTED_MACHINES:
        raise kernel_error(
            f"make an idmapped mount on {machine}", OSError(38, "architecture not supported")
        )


def _last_error() -> OSError:
    code = ctypes.get_errno()
    return OSError(code, os.strerror(code))


def clone_tree(path: str, *, recursive: bool = False) -> int:
    """A detached copy of the mount at ``path`` (with ``recursive``, its submounts too), as a
    file descriptor naming the copy's root."""
    _check_machine()
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    fd = _libc.syscall(
        SYS_OPEN_TREE, ctypes.c_int(AT_FDCWD), os.fsencode(path), ctypes.c_uint(flags)
    )
    if fd < 0:
        raise kernel_error(f"clone the mount at {path}", _last_error())
    return int(fd)


def set_idmap(mount_fd: int, userns_fd: int) -> None:
    """Gives the detached mount ``mount_fd`` the uid/gid maps of the user namespace
    ``userns_fd`` (a /proc/PID/ns/user descriptor)."""
    attr = MountAttr(attr_set=MOUNT_ATTR_IDMAP, attr_clr=0, propagation=0, userns_fd=userns_fd)
    rc = _libc.syscall(
        SYS_MOUNT_SETATTR,
        ctypes.c_int(mount_fd),
        b"",
        ctypes.c_uint(AT_EMPTY_PATH),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if rc != 0:
        raise kernel_error(
            "idmap the container's root mount",
            _last_error(),
            hint="Idmapped mounts need Linux 5.12+ and a file system that supports them.",
        )


def attach(mount_fd: int, target: str) -> None:
    """Mounts the detached mount ``mount_fd`` on ``target``; ``mount_fd`` then names the root of
    the attached mount."""
    rc = _libc.syscall(
        SYS_MOVE_MOUNT,
        ctypes.c_int(mount_fd),
        b"",
        ctypes.c_int(AT_FDCWD),
        os.fsencode(target),
        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
    )
    if rc != 0:
        raise kernel_error(f"attach the idmapped mount on {target}", _last_error())
