"""``/dev/mapper/NAME`` nodes for device-mapper devices, with or without udev.

With udev running, its dm rules make the node after the resume uevent and we wait for it
(pyudev). Without udev (containers, the qemu lab, minimal hosts) we make and remove the nodes
ourselves from major:minor, as libdevmapper does when ``DM_DISABLE_UDEV=1`` is set. Nothing here
is needed for tables: those always name devices by ``major:minor``.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from pathlib import Path

from thinmgr.errors import ConflictError
from thinmgr.kernel.errno_map import kernel_error

MAPPER_DIR = Path("/dev/mapper")
UDEV_CONTROL = Path("/run/udev/control")
_UDEV_WAIT = 5.0  # seconds; udev normally answers in milliseconds


def udev_running() -> bool:
    """The test libudev's ``udev_queue_get_udev_is_active`` makes; ``DM_DISABLE_UDEV`` (the
    libdevmapper switch) says to manage nodes ourselves even so."""
    if os.environ.get("DM_DISABLE_UDEV"):
        return False
    return UDEV_CONTROL.exists()


def node_path(name: str, mapper_dir: Path = MAPPER_DIR) -> Path:
    return mapper_dir / name


def _is_node_of(path: Path, major: int, minor: int) -> bool:
    try:
        st = os.stat(path)  # follows udev's symlink to ../dm-N
    except OSError:
        return False
    return stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(major, minor)


def _wait_with_udev(path: Path, major: int, minor: int, timeout: float) -> bool:
    """Wait until udev has made ``path`` for major:minor; False on timeout."""
    if _is_node_of(path, major, minor):
        return True
    try:
        import pyudev
    except ImportError:  # pragma: no cover - pyudev is a dependency
        pyudev = None
    deadline = time.monotonic() + timeout
    if pyudev is None:
        while time.monotonic() < deadline:
            if _is_node_of(path, major, minor):
                return True
            time.sleep(0.01)
        return False
    context = pyudev.Context()
    monitor = pyudev.Monitor.from_netlink(context)
    monitor.filter_by("block")
    monitor.start()
    # The event may have come before the monitor started: look again after starting it.
    while not _is_node_of(path, major, minor):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        monitor.poll(timeout=min(left, 0.1))
    return True


def make_node(name: str, major: int, minor: int, *, mapper_dir: Path = MAPPER_DIR) -> Path:
    """Create (or correct) ``mapper_dir/name`` as a block node for major:minor."""
    path = node_path(name, mapper_dir)
    if _is_node_of(path, major, minor):
        return path
    try:
        mapper_dir.mkdir(parents=True, exist_ok=True)
        # made under a temporary name and renamed over a stale node: never a moment without
        tmp = mapper_dir / f".{name}.thinmgr-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.mknod(tmp, stat.S_IFBLK | 0o660, os.makedev(major, minor))
        os.replace(tmp, path)
    except IsADirectoryError as exc:
        raise ConflictError(f"cannot create {path}: a directory is in the way") from exc
    except OSError as exc:
        raise kernel_error(f"create the device node {path} ({major}:{minor})", exc) from exc
    return path


def ensure_node(
    name: str, major: int, minor: int, *, mapper_dir: Path = MAPPER_DIR, timeout: float = _UDEV_WAIT
) -> Path:
    """The node of a device that has just been resumed; waits for udev where it runs and
    makes the node itself when there is no udev or udev did not make one in time."""
    path = node_path(name, mapper_dir)
    if mapper_dir == MAPPER_DIR and udev_running() and _wait_with_udev(path, major, minor, timeout):
        return path
    return make_node(name, major, minor, mapper_dir=mapper_dir)


def remove_node(
    name: str, major: int, minor: int, *, mapper_dir: Path = MAPPER_DIR, timeout: float = 1.0
) -> None:
    """Drop the node of a removed device; a node that now names another device is left."""
    path = node_path(name, mapper_dir)
    if mapper_dir == MAPPER_DIR and udev_running():
        deadline = time.monotonic() + timeout
        while os.path.lexists(path) and time.monotonic() < deadline:
            time.sleep(0.01)  # udev's remove rule deletes the symlink
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise kernel_error(f"inspect {path}", exc) from exc
    stale = stat.S_ISLNK(st.st_mode) and not os.path.exists(path)
    ours = stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(major, minor)
    if ours or stale or (stat.S_ISLNK(st.st_mode) and _is_node_of(path, major, minor)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


__all__ = ["MAPPER_DIR", "ensure_node", "make_node", "node_path", "remove_node", "udev_running"]
