"""Namespaces and the root switch: unshare(2), setns(2), pivot_root(2), sethostname(2).

Python 3.11 has none of these (``os.unshare``/``os.setns`` arrived in 3.12, and are used when
present); libc's wrappers are called through ctypes, and pivot_root, which glibc does not wrap,
through syscall(2). Every call here needs a single-threaded caller for the mount namespace
(CLONE_NEWNS implies CLONE_FS, which the kernel refuses with EINVAL in a threaded process).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

from thinmgr.kernel.errno_map import kernel_error

# linux/sched.h (uapi): namespace flags of clone(2), unshare(2) and setns(2)
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# The entries of /proc/PID/ns/ for each flag, in the order `exec` joins them when it cannot use a
# pidfd: user first (it grants the rights for the rest), mnt last but one, pid last (it only
# applies to children anyway).
NS_FILES: tuple[tuple[str, int], ...] = (
    ("user", CLONE_NEWUSER),
    ("ipc", CLONE_NEWIPC),
    ("uts", CLONE_NEWUTS),
    ("net", CLONE_NEWNET),
    ("cgroup", CLONE_NEWCGROUP),
    ("mnt", CLONE_NEWNS),
    ("pid", CLONE_NEWPID),
)

# pivot_root(2) syscall numbers: arch/x86/entry/syscalls/syscall_64.tbl (155) and
# include/uapi/asm-generic/unistd.h (41, used by arm64 and riscv64).
_SYS_PIVOT_ROOT = {"x86_64": 155, "amd64": 155, "aarch64": 41, "arm64": 41, "riscv64": 41}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.unshare.restype = ctypes.c_int
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.sethostname.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long


def _last_error() -> OSError:
    code = ctypes.get_errno()
    return OSError(code, os.strerror(code))


def unshare(flags: int) -> None:
    """Moves the calling process into new namespaces of the kinds in ``flags``."""
    native = getattr(os, "unshare", None)
    try:
        if native is not None:  # Python 3.12+
            native(flags)
        elif _libc.unshare(flags) != 0:
            raise _last_error()
    except OSError as exc:
        raise kernel_error(f"unshare namespaces {flags:#x}", exc) from None


def setns(fd: int, nstype: int = 0) -> None:
    """Joins the namespace(s) of ``fd``: a /proc/PID/ns/* file, or a pidfd (Linux 5.8+) with the
    CLONE_NEW* flags of every namespace to join at once."""
    native = getattr(os, "setns", None)
    try:
        if native is not None:  # Python 3.12+
            native(fd, nstype)
        elif _libc.setns(fd, nstype) != 0:
            raise _last_error()
    except OSError as exc:
        raise kernel_error(f"join namespaces {nstype:#x}", exc) from None


def pivot_root_syscall_number(machine: str | None = None) -> int:
    arch = (machine or platform.machine()).lower()
    try:
        return _SYS_PIVOT_ROOT[arch]
    except KeyError:
        raise kernel_error(
            f"pivot_root on {arch}", OSError(38, "architecture not supported by thinmgr")
        ) from None


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2); with ``(".", ".")`` the old root ends up stacked under the new one, ready
    for ``umount2(".", MNT_DETACH)`` (the runc/lxc idiom, no put_old directory needed)."""
    number = pivot_root_syscall_number()
    if _libc.syscall(number, os.fsencode(new_root), os.fsencode(put_old)) != 0:
        raise kernel_error(f"pivot_root to {new_root}", _last_error())


def sethostname(name: str) -> None:
    raw = name.encode()
    if _libc.sethostname(raw, len(raw)) != 0:
        raise kernel_error(f"set the host name to {name!r}", _last_error())
