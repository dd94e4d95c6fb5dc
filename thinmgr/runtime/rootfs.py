"""The container's file system, built by its PID 1 inside its own (private) mount namespace.

The order follows runtime-and-images.md §2 and runc's rootfs_linux.go:

1. ``/`` made rprivate, so nothing mounted here propagates to the host (and back);
2. the ext4 root mounted on a staging directory (read-only with ``read_only``, plus a /tmp tmpfs);
   with ``userns`` it is already there, idmapped (userns.py), and only copied on top of itself;
3. /dev (tmpfs + mknod, or binds of the host's nodes with ``userns``, + devpts/shm/mqueue),
   /proc and /sys mounted under it, masked and read-only paths applied: all *before*
   pivot_root, while the host's /proc/self/fd exists;
4. the caller joins the devices cgroup (``before_pivot``): after the ext4 mount, which the
   devices allow-list would refuse (the ordering trap of §2);
5. ``pivot_root(".", ".")`` + ``umount2(".", MNT_DETACH)``: the host's tree is gone.

Every mount target inside the image is opened component by component with
O_PATH|O_NOFOLLOW from the root's file descriptor and mounted through /proc/self/fd/N, so a
symlink in the image (``dev -> /``) cannot redirect a mount onto the host (runc CVE-2021-30465
and its securejoin fix).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from thinmgr.errors import ThinmgrError
from thinmgr.kernel import idmap
from thinmgr.kernel.mount import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    MS_STRICTATIME,
    mount,
    umount,
)
from thinmgr.kernel.namespaces import pivot_root


class RootfsError(ThinmgrError):
    """The image cannot be set up as a root (a symlinked mount point, a missing directory)."""


# The device nodes of Docker/runc's default /dev: (name, major, minor); all 0666 (runc
# libcontainer/specconv DefaultAllowedDevices).
DEVICE_NODES: tuple[tuple[str, int, int], ...] = (
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
)
DEV_SYMLINKS: tuple[tuple[str, str], ...] = (
    ("ptmx", "pts/ptmx"),
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
)
TTY_GID = 5  # the conventional "tty" group that devpts gives the slaves (runc: gid=5)

# runc's spec defaults (libcontainer/specconv/example.go), which Docker uses too: masked paths
# get /dev/null (files) or an empty read-only tmpfs (directories) on top, read-only paths a
# read-only bind of themselves.
MASKED_PATHS = (
    "proc/acpi",
    "proc/asound",
    "proc/kcore",
    "proc/keys",
    "proc/latency_stats",
    "proc/timer_list",
    "proc/timer_stats",
    "proc/sched_debug",
    "proc/scsi",
    "sys/firmware",
)
READONLY_PATHS = ("proc/bus", "proc/fs", "proc/irq", "proc/sys", "proc/sysrq-trigger")

_PROC_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC


@dataclass(frozen=True)
class RootfsPlan:
    device: str  # the block device with the container's file system
    fstype: str
    staging: str  # an empty host directory; the mount exists only in the container's namespace
    read_only: bool
    nodev: bool = False  # where no devices cgroup filters access (cgroup v2, no cgroups)
    # --userns: the (idmapped) root is already on staging, mounted from the initial user
    # namespace by the intermediate (userns.py); device nodes are bind mounts of the host's.
    userns: bool = False


def fd_path(fd: int) -> str:
    """The magic link naming exactly the object ``fd`` was opened on."""
    return f"/proc/self/fd/{fd}"


def _refuse(relative: str, why: str) -> RootfsError:
    return RootfsError(
        f"cannot use /{relative} of the image as a mount point: {why}",
        hint="The image's /dev, /proc, /sys and /tmp must be plain directories (not symlinks).",
    )


def open_beneath(
    root_fd: int, relative: str, *, directory: bool = True, create: bool = False
) -> int:
    """An O_PATH descriptor of ``relative`` under ``root_fd``, never leaving it: ``..`` is
    refused and no component may be a symlink. ``create`` makes a missing last component as a
    directory. Raises FileNotFoundError when a component is missing."""
    parts = [p for p in relative.split("/") if p and p != "."]
    if not parts or ".." in parts:
        raise _refuse(relative, "not a plain relative path")
    fd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)
    try:
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
            if not last or directory:
                flags |= os.O_DIRECTORY
            try:
                child = os.open(part, flags, dir_fd=fd)
            except FileNotFoundError:
                if not (last and create):
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                child = os.open(part, flags, dir_fd=fd)
            except NotADirectoryError:
                kind = os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode
                why = "symlink" if stat.S_ISLNK(kind) else "not a directory"
                raise _refuse(relative, why) from None
            os.close(fd)
            fd = child
            if stat.S_ISLNK(os.fstat(fd).st_mode):  # O_PATH|O_NOFOLLOW opened the link itself
                raise _refuse(relative, "symlink")
        return fd
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def _beneath(
    root_fd: int, relative: str, *, directory: bool = True, create: bool = False
) -> Iterator[str]:
    fd = open_beneath(root_fd, relative, directory=directory, create=create)
    try:
        yield fd_path(fd)
    finally:
        os.close(fd)


def _mount_at(
    root_fd: int,
    relative: str,
    source: str,
    fstype: str,
    flags: int,
    data: str = "",
    *,
    create: bool = True,
) -> None:
    with _beneath(root_fd, relative, create=create) as target:
        mount(source, target, fstype, flags, data)


def make_root_private() -> None:
    """First act in a new mount namespace: nothing propagates to or from the host from now on."""
    mount("none", "/", "", MS_REC | MS_PRIVATE)


def mount_root(plan: RootfsPlan) -> int:
    """Mounts the image on the staging directory; returns an O_PATH descriptor of its root."""
    flags = (MS_RDONLY if plan.read_only else 0) | (MS_NODEV if plan.nodev else 0)
    mount(plan.device, plan.staging, plan.fstype, flags)
    return os.open(plan.staging, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def bind_root() -> int:
    """--userns: the root mount, copied from a more privileged mount namespace, is locked and
    pivot_root refuses it; a copy of it mounted on top is not (runc's prepareRoot binds the
    root onto itself for the same reason). Returns an O_PATH descriptor of the copy's root.

    The staging directory is the working directory (entered by the intermediate while still
    host root): the container's root may not search the host's path to it (a 0700 directory of
    host root's), a descriptor opened before the mount namespace was copied would name a mount
    of the old namespace (EINVAL), whereas unshare(CLONE_NEWNS) carries the working directory
    over to the copy. open_tree's descriptor names the copy without any path lookup."""
    copy = idmap.clone_tree(".", recursive=True)
    try:
        idmap.attach(copy, ".")
    except BaseException:
        os.close(copy)
        raise
    return copy


def _bind_host_nodes(dev: int) -> None:
    """In a user namespace mknod is refused (and a node on its tmpfs would not open): bind the
    host's nodes onto empty files instead, as runc does for user-namespaced containers."""
    for name, _major, _minor in DEVICE_NODES:
        os.close(
            os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666, dir_fd=dev)
        )
        target = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dev)
        try:
            mount(f"/dev/{name}", fd_path(target), "", MS_BIND)
        finally:
            os.close(target)


def build_dev(root_fd: int, *, bind_nodes: bool = False) -> None:
    """runc's default /dev: a small tmpfs with six nodes, a private devpts, shm and mqueue
    (``bind_nodes``: the host's nodes bound onto files, for a user namespace)."""
    _mount_at(
        root_fd,
        "dev",
        "tmpfs",
        "tmpfs",
        MS_NOSUID | MS_NOEXEC | MS_STRICTATIME,
        "mode=755,size=64k",
    )
    dev = open_beneath(root_fd, "dev")
    try:
        old_umask = os.umask(0)
        try:
            if bind_nodes:
                _bind_host_nodes(dev)
            else:
                for name, major, minor in DEVICE_NODES:
                    os.mknod(name, stat.S_IFCHR | 0o666, os.makedev(major, minor), dir_fd=dev)
            for name, mode in (("pts", 0o755), ("shm", 0o1777), ("mqueue", 0o1777)):
                os.mkdir(name, mode, dir_fd=dev)
            for name, target in DEV_SYMLINKS:
                os.symlink(target, name, dir_fd=dev)
        finally:
            os.umask(old_umask)
    finally:
        os.close(dev)
    # newinstance: the container's ptys are its own, not the host's (runc: ptmxmode=0666,
    # mode=0620,gid=5).
    _mount_at(
        root_fd,
        "dev/pts",
        "devpts",
        "devpts",
        MS_NOSUID | MS_NOEXEC,
        f"newinstance,ptmxmode=0666,mode=0620,gid={TTY_GID}",
    )
    _mount_at(
        root_fd,
        "dev/shm",
        "shm",
        "tmpfs",
        MS_NOSUID | MS_NODEV | MS_NOEXEC,
        "mode=1777,size=65536k",
    )
    _mount_at(root_fd, "dev/mqueue", "mqueue", "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def mount_tmp(root_fd: int) -> None:
    """The writable /tmp of a read-only root (absent /tmp in a read-only image: nothing to do)."""
    with contextlib.suppress(FileNotFoundError):
        _mount_at(root_fd, "tmp", "tmpfs", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777", create=False)


def mount_proc_and_sys(root_fd: int, *, read_only_root: bool) -> None:
    """/proc of the container's pid namespace (mounted by its PID 1), /sys read-only."""
    create = not read_only_root
    _mount_at(root_fd, "proc", "proc", "proc", _PROC_FLAGS, create=create)
    _mount_at(root_fd, "sys", "sysfs", "sysfs", MS_RDONLY | _PROC_FLAGS, create=create)


def _masked(root_fd: int, relative: str, null_path: str) -> None:
    try:
        fd = open_beneath(root_fd, relative, directory=False)
    except FileNotFoundError:
        return  # not in this kernel (e.g. /proc/timer_stats): nothing to hide
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            mount("tmpfs", fd_path(fd), "tmpfs", MS_RDONLY | _PROC_FLAGS, "size=0")
        else:
            mount(null_path, fd_path(fd), "", MS_BIND)
    finally:
        os.close(fd)


def _read_only(root_fd: int, relative: str) -> None:
    try:
        fd = open_beneath(root_fd, relative, directory=False)
    except FileNotFoundError:
        return
    try:
        target = fd_path(fd)
        mount(target, target, "", MS_BIND | MS_REC)
    finally:
        os.close(fd)
    # Re-open: the descriptor above names the directory *under* the new bind mount.
    fd = open_beneath(root_fd, relative, directory=False)
    try:
        mount("", fd_path(fd), "", MS_BIND | MS_REMOUNT | MS_RDONLY | _PROC_FLAGS)
    finally:
        os.close(fd)


def mask_paths(root_fd: int) -> None:
    null = open_beneath(root_fd, "dev/null", directory=False)
    try:
        for relative in MASKED_PATHS:
            _masked(root_fd, relative, fd_path(null))
    finally:
        os.close(null)
    for relative in READONLY_PATHS:
        _read_only(root_fd, relative)


def enter_root(root_fd: int) -> None:
    """pivot_root into the image and drop the host's tree (runc's pivotRoot)."""
    os.fchdir(root_fd)
    pivot_root(".", ".")
    umount(".", MNT_DETACH)
    os.chdir("/")


def prepare(plan: RootfsPlan, *, before_pivot: Callable[[], None]) -> None:
    """Every step of the module docstring, in order; raises ThinmgrError or OSError."""
    make_root_private()
    root_fd = bind_root() if plan.userns else mount_root(plan)
    try:
        build_dev(root_fd, bind_nodes=plan.userns)
        if plan.read_only:
            mount_tmp(root_fd)
        mount_proc_and_sys(root_fd, read_only_root=plan.read_only)
        mask_paths(root_fd)
        before_pivot()
        enter_root(root_fd)
    finally:
        os.close(root_fd)


def describe_os_error(exc: OSError) -> str:
    """A one-line reason for a failed step (the path is in the exception when Python knew it)."""
    name = errno.errorcode.get(exc.errno or 0, "")
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}" + (f" [{name}]" if name else "")
