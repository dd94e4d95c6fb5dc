"""`thinmgr diff --files`: the files that changed between two ext4 volumes of a pool.

The block diff (``ops.diff.diff_volumes``, from the pool metadata) gives the changed byte
ranges; each volume is then mounted read-only and ``layers.filediff`` walks the trees,
looking closely only at what lies in those ranges (docs/file-diff.md).

Volumes that were inactive are activated for the comparison and deactivated afterwards.
A volume already mounted on the host at its root is read through that mount (a second mount
of the same device would share its superblock anyway, and a read-only one is refused while
it is mounted read-write); the file systems are synced first so that the pool metadata and
the extent maps describe the same, flushed state. Otherwise the volume is mounted
``ro,noload`` (no journal replay: nothing is written to it) on a private directory under the
pool's run directory, and unmounted at the end, whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from thinmgr.errors import ConflictError, ThinmgrError, UnsupportedError
from thinmgr.kernel.errno_map import kernel_error
from thinmgr.kernel.freeze import mounts_of
from thinmgr.kernel.mount import MNT_DETACH, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY
from thinmgr.kernel.mount import mount as kernel_mount
from thinmgr.kernel.mount import umount as kernel_umount
from thinmgr.layers.ext4_layout import Ext4Layout, read_layout
from thinmgr.layers.filediff import FileDiff, IntervalSet, diff_trees
from thinmgr.ops.diff import VolumeDiff, diff_volumes
from thinmgr.ops.manager import Manager
from thinmgr.ops.volumes import activate_volume, deactivate_volume, show_volume

EXT4_ROOT_INO = 2  # ext4's root directory is always inode 2 (inodes.rst, "special inodes")
MOUNT_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
MOUNT_OPTIONS = "noload"  # ext4: do not replay the journal (a read-only mount writes nothing)


@dataclass
class FileDiffResult:
    blocks: VolumeDiff
    files: FileDiff
    changed_bytes: int


@dataclass
class _Side:
    name: str
    device: str  # the block device path (the engine's stable link)
    root: str  # where its file system is mounted
    live: bool  # mounted by someone else (may be written to while we read)


def changed_ranges(blocks: VolumeDiff) -> IntervalSet:
    """The block diff as device byte ranges (every kind: left only, right only, different)."""
    bs = blocks.block_size
    return IntervalSet([(r.begin * bs, (r.begin + r.length) * bs) for r in blocks.delta.runs])


def device_layout(device: str) -> Ext4Layout:
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise kernel_error(f"open {device}", exc) from exc
    try:

        def read(offset: int, length: int) -> bytes:
            return os.pread(fd, length, offset)

        return read_layout(read)
    except OSError as exc:
        raise kernel_error(f"read the ext4 superblock of {device}", exc) from exc
    finally:
        os.close(fd)


def diff_files(mgr: Manager, pool_name: str, left: str, right: str) -> FileDiffResult:
    """The paths that differ between volumes ``left`` (older) and ``right`` (newer)."""
    with contextlib.ExitStack() as stack:
        sides = []
        work: Path | None = None
        for name in (left, right):
            device = stack.enter_context(_active(mgr, pool_name, name))
            existing = _root_mount(device)
            if existing is not None:
                sides.append(_Side(name, device, existing, live=True))
                continue
            if work is None:
                work = _work_dir(mgr, pool_name)
                stack.callback(_remove_dir, work)
            point = work / ("older" if name == left else "newer")
            stack.enter_context(_mounted(device, point, name))
            sides.append(_Side(name, device, str(point), live=False))
        for side in sides:
            if side.live:
                os.sync()  # flush a live mount so the pool metadata has its latest blocks
                break
        blocks = diff_volumes(mgr, pool_name, left, right)
        layouts = [device_layout(side.device) for side in sides]
        _check_lineage(layouts, left, right)
        changed = changed_ranges(blocks)
        live = any(side.live for side in sides)
        files = diff_trees(sides[0].root, sides[1].root, changed, layouts, sync=live)
    return FileDiffResult(blocks, files, changed.total())


def _check_lineage(layouts: list[Ext4Layout], left: str, right: str) -> None:
    a, b = (layout.sb for layout in layouts)
    same = (a.block_size, a.inodes_per_group, a.inode_size) == (
        b.block_size,
        b.inodes_per_group,
        b.inode_size,
    )
    if (
        not same
        or layouts[0].tables[: len(layouts[1].tables)]
        != layouts[1].tables[: len(layouts[0].tables)]
    ):
        raise UnsupportedError(
            f"volumes {left!r} and {right!r} do not hold the same ext4 file system "
            "(different geometry or inode tables)",
            hint="File-level diffs compare a volume with its snapshot (or layer with child); "
            "compare unrelated file systems with `diff -r` on mounted copies.",
        )


@contextlib.contextmanager
def _active(mgr: Manager, pool_name: str, name: str) -> Iterator[str]:
    """The volume's device path; activated for the block and deactivated after if it was not."""
    info = show_volume(mgr, pool_name, name)
    if info.path is not None:
        yield info.path
        return
    path = activate_volume(mgr, pool_name, name).path
    if path is None:  # pragma: no cover - an engine that activates returns the path
        raise ThinmgrError(f"volume {name!r} has no device path after activation")
    try:
        yield path
    finally:
        deactivate_volume(mgr, pool_name, name)


def _root_mount(device: str) -> str | None:
    """A mount point showing the whole ext4 file system on ``device`` (not a bind mount of a
    subdirectory), or None when it is not mounted. Mounted elsewhere only in part: refused."""
    mounts = mounts_of(device)
    for m in mounts:
        with contextlib.suppress(OSError):
            if m.fs_type == "ext4" and os.stat(m.mount_point).st_ino == EXT4_ROOT_INO:
                return m.mount_point
    if mounts:
        raise ConflictError(
            f"{device} is mounted, but not as a whole ext4 file system "
            f"({', '.join(f'{m.fs_type} at {m.mount_point}' for m in mounts)})",
            hint="Unmount it, or mount its root somewhere, and run the diff again.",
        )
    return None


def _work_dir(mgr: Manager, pool_name: str) -> Path:
    run_dir = mgr.run_dir(pool_name)
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return Path(tempfile.mkdtemp(prefix="filediff-", dir=run_dir))


def _remove_dir(work: Path) -> None:
    for child in work.iterdir():
        with contextlib.suppress(OSError):
            child.rmdir()  # only empty mount points: never removes a still-mounted tree
    with contextlib.suppress(OSError):
        work.rmdir()


@contextlib.contextmanager
def _mounted(device: str, point: Path, name: str) -> Iterator[None]:
    point.mkdir(mode=0o700)
    st = os.stat(device)
    if not stat.S_ISBLK(st.st_mode):
        raise ThinmgrError(f"{device} (volume {name!r}) is not a block device")
    try:
        kernel_mount(device, str(point), "ext4", MOUNT_FLAGS, MOUNT_OPTIONS)
    except ThinmgrError as exc:
        raise UnsupportedError(
            f"cannot mount volume {name!r} read-only as ext4: {exc.message}",
            hint="File-level diffs need ext4 volumes; use the block diff (without --files) "
            "for others, or check the file system with `fsck.ext4 -n`.",
        ) from exc
    try:
        yield
    finally:
        try:
            kernel_umount(str(point))
        except ThinmgrError:
            kernel_umount(str(point), MNT_DETACH)  # busy (someone cd'ed in): detach lazily
