"""Capabilities and process attributes through prctl(2) and capset(2) (ctypes).

The launcher calls these in the forked container child, before execve. Python 3.11 has no
wrappers for prctl or capset, so they are reached through libc here, at the kernel boundary.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterable

from thinmgr.errors import UsageError
from thinmgr.kernel.errno_map import kernel_error

# linux/capability.h (uapi): capability numbers
CAP_CHOWN = 0
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_FOWNER = 3
CAP_FSETID = 4
CAP_KILL = 5
CAP_SETGID = 6
CAP_SETUID = 7
CAP_SETPCAP = 8
CAP_LINUX_IMMUTABLE = 9
CAP_NET_BIND_SERVICE = 10
CAP_NET_BROADCAST = 11
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_IPC_LOCK = 14
CAP_IPC_OWNER = 15
CAP_SYS_MODULE = 16
CAP_SYS_RAWIO = 17
CAP_SYS_CHROOT = 18
CAP_SYS_PTRACE = 19
CAP_SYS_PACCT = 20
CAP_SYS_ADMIN = 21
CAP_SYS_BOOT = 22
CAP_SYS_NICE = 23
CAP_SYS_RESOURCE = 24
CAP_SYS_TIME = 25
CAP_SYS_TTY_CONFIG = 26
CAP_MKNOD = 27
CAP_LEASE = 28
CAP_AUDIT_WRITE = 29
CAP_AUDIT_CONTROL = 30
CAP_SETFCAP = 31
CAP_MAC_OVERRIDE = 32
CAP_MAC_ADMIN = 33
CAP_SYSLOG = 34
CAP_WAKE_ALARM = 35
CAP_BLOCK_SUSPEND = 36
CAP_AUDIT_READ = 37
CAP_PERFMON = 38
CAP_BPF = 39
CAP_CHECKPOINT_RESTORE = 40
CAP_LAST_CAP = CAP_CHECKPOINT_RESTORE  # of the headers this was written against
# linux/capability.h: capset/capget header version with two 32-bit data words
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# linux/prctl.h (uapi)
PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

CAP_NAMES: dict[str, int] = {
    name.removeprefix("CAP_"): value
    for name, value in globals().items()
    if name.startswith("CAP_") and name not in ("CAP_LAST_CAP", "CAP_NAMES")
}

# Docker's default bounding set (moby oci/caps/defaults.go), mask 0xa80425fb.
DOCKER_DEFAULT_CAPS: frozenset[int] = frozenset(
    {
        CAP_CHOWN,
        CAP_DAC_OVERRIDE,
        CAP_FSETID,
        CAP_FOWNER,
        CAP_MKNOD,
        CAP_NET_RAW,
        CAP_SETGID,
        CAP_SETUID,
        CAP_SETFCAP,
        CAP_SETPCAP,
        CAP_NET_BIND_SERVICE,
        CAP_SYS_CHROOT,
        CAP_KILL,
        CAP_AUDIT_WRITE,
    }
)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


class _CapHeader(ctypes.Structure):
    # struct __user_cap_header_struct (linux/capability.h)
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    # struct __user_cap_data_struct (linux/capability.h); version 3 uses two of them
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_CapDataPair = _CapData * 2
_libc.capget.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
_libc.capget.restype = ctypes.c_int
_libc.capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
_libc.capset.restype = ctypes.c_int


def _check(rc: int, what: str) -> int:
    if rc < 0:
        code = ctypes.get_errno()
        raise kernel_error(what, OSError(code, os.strerror(code)))
    return rc


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """Raw prctl(2); raises the matching ThinmgrError on failure."""
    return _check(_prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


def last_cap() -> int:
    """The highest capability number the running kernel knows (may exceed our table)."""
    try:
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return CAP_LAST_CAP


def capability_mask(caps: Iterable[int]) -> int:
    """The bit mask /proc/PID/status shows for a set of capabilities (CapBnd, CapEff...)."""
    mask = 0
    for cap in caps:
        mask |= 1 << cap
    return mask


def parse_cap_names(names: Iterable[str]) -> frozenset[int]:
    """`CAP_NET_ADMIN`, `net_admin` or `NET_ADMIN` to numbers; `ALL` means every capability."""
    caps: set[int] = set()
    for raw in names:
        name = raw.strip().upper().removeprefix("CAP_")
        if name == "ALL":
            caps.update(range(last_cap() + 1))
        elif name in CAP_NAMES:
            caps.add(CAP_NAMES[name])
        else:
            raise UsageError(
                f"unknown capability {raw!r}",
                hint="Use names from capabilities(7), e.g. NET_ADMIN or CAP_SYS_TIME.",
            )
    return frozenset(caps)


def in_bounding_set(cap: int) -> bool:
    return _check(_prctl(PR_CAPBSET_READ, cap, 0, 0, 0), f"read capability {cap}") == 1


def drop_bounding_set(keep: frozenset[int]) -> None:
    """Drop every capability not in ``keep`` from the bounding set (needs CAP_SETPCAP).

    A uid-0 process that then executes a file gets permitted = bounding set (with the
    inheritable set cleared), which is how runc applies a container's capabilities to root.
    """
    for cap in range(last_cap() + 1):
        if cap not in keep:
            _check(_prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")


def clear_inheritable_and_ambient() -> None:
    """Empty the inheritable set (capset) and the ambient set (PR_CAP_AMBIENT_CLEAR_ALL)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = _CapDataPair()
    _check(_libc.capget(ctypes.byref(header), data), "read the capability sets")
    for word in data:
        word.inheritable = 0
    _check(_libc.capset(ctypes.byref(header), data), "clear the inheritable capabilities")
    # Ambient capabilities exist since Linux 4.3; EINVAL before that means there are none.
    if _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0:
        code = ctypes.get_errno()
        if code != 22:  # EINVAL
            raise kernel_error("clear the ambient capabilities", OSError(code, os.strerror(code)))


def set_no_new_privs() -> None:
    """execve can no longer grant privileges (setuid bits, file caps); needed for seccomp."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def no_new_privs() -> bool:
    return prctl(PR_GET_NO_NEW_PRIVS) == 1


def set_dumpable(flag: bool) -> None:
    """PR_SET_DUMPABLE: 0 while joining a container (exec), so that the container's processes
    cannot ptrace or open /proc/PID/fd of the joining process (runc CVE-2016-9962)."""
    prctl(PR_SET_DUMPABLE, 1 if flag else 0)


def is_dumpable() -> bool:
    return prctl(PR_GET_DUMPABLE) == 1


def set_pdeathsig(sig: int) -> None:
    """Deliver ``sig`` to this process when its parent (thread) dies."""
    prctl(PR_SET_PDEATHSIG, sig)


def set_child_subreaper() -> None:
    """Orphaned descendants are reparented to this process instead of the init process."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)
