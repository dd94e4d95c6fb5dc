"""Image layers as thin devices: create, fill, commit and forget them, under a held pool lock.

containerd's devmapper snapshotter is the model (runtime-and-images.md section 4.2): the
bottom layer is a new thin device with a fresh ext4; every later layer is a snapshot of its
parent layer's device; a layer is filled while its device is active and mounted on a private
directory, then unmounted and deactivated ("committed") and never written again: its
``Device`` row is read-only and its ``Layer`` row names it by chain id, so that image stacks
that share a bottom share the devices too.

Everything here runs inside ``Manager.writing(pool)`` (the caller holds the pool lock for the
whole import or commit, so two imports of the same chain cannot race) and goes through the
write-ahead journal like every other device change.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from thinmgr.catalog.models import Device, DeviceKind, DeviceState, Layer, Pool
from thinmgr.errors import ConflictError, IOFailure, ThinmgrError
from thinmgr.kernel.mount import MNT_DETACH, MS_NODEV, MS_NOSUID, mount, umount
from thinmgr.ops import journal
from thinmgr.ops.manager import Manager, PoolHandle
from thinmgr.ops.volumes import allocate

DEFAULT_LAYER_SIZE = 8 << 30  # bytes; thin: only what the layers write takes space

# mkfs.ext4 for a base layer. containerd's devmapper snapshotter passes
# `-E nodiscard,lazy_itable_init=0,lazy_journal_init=0` so that no ext4lazyinit thread keeps
# writing behind a mounted snapshot. mke2fs (1.47) zeroes the inode tables and the journal
# with fallocate(FALLOC_FL_ZERO_RANGE)/BLKZEROOUT: on the user engine the loop -> FUSE path
# turns that into unmaps, so all variants take about 0.02 s for 8 GiB and map 5 MiB
# (measured; docs/images.md, "Base layers"). On dm-thin, which has no WRITE_ZEROES, the
# kernel falls back to writing zero pages: about 200 MB of *provisioned* blocks per base
# layer for nothing, since unprovisioned thin blocks already read as zeros. So mke2fs is told
# the tables and journal are clean (lazy_*_init=1; `nodiscard` as containerd: a fresh thin
# device has nothing to discard), and every mount passes `noinit_itable` so that no
# ext4lazyinit thread zeroes them later either (that would provision the same blocks, in
# every layer and container that mounts the file system).
MKFS_EXT4 = (
    "mkfs.ext4",
    "-q",
    "-E",
    "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
)
MOUNT_OPTIONS = "noinit_itable"
LAYER_PREFIX = "layer-"


def layer_device_name(chain_id: str) -> str:
    """``layer-<first 12 hex digits of the chain id>``, as short as docker's image ids."""
    return LAYER_PREFIX + chain_id.partition(":")[2][:12]


@dataclass(frozen=True)
class LayerDevice:
    """A layer's thin device, as the catalog knows it."""

    row: int  # Device.id
    thin_id: int
    name: str
    size: int


def device_of(device: Device) -> LayerDevice:
    return LayerDevice(device.id, device.thin_id, device.name, device.virtual_size_bytes)


def find_layer(session: Session, pool_id: int, chain_id: str) -> Layer | None:
    return session.scalars(
        select(Layer).where(Layer.pool_id == pool_id, Layer.chain_id == chain_id)
    ).one_or_none()


def _check_free_name(session: Session, pool: Pool, name: str) -> None:
    taken = session.scalars(
        select(Device).where(Device.pool_id == pool.id, Device.name == name)
    ).one_or_none()
    if taken is not None:
        raise ConflictError(
            f"pool {pool.name!r} already has a device named {name!r} that holds no layer "
            "(left by an interrupted import?)",
            hint=f"Remove it with `thinmgr volume remove {pool.name} {name}` and try again.",
        )


def create_base(mgr: Manager, h: PoolHandle, name: str, size: int) -> LayerDevice:
    """A new, empty thin device for a bottom layer (the caller makes its file system)."""

    def prepare(session: Session, pool: Pool) -> dict[str, Any]:
        _check_free_name(session, pool, name)
        dev_id = allocate(session, pool, name)
        device = Device(
            pool_id=pool.id,
            thin_id=dev_id,
            name=name,
            kind=DeviceKind.LAYER,
            virtual_size_bytes=size,
            read_only=True,
            state=DeviceState.CREATING,
        )
        session.add(device)
        session.flush()
        return {"dev_id": dev_id, "device": device.id, "name": name}

    payload = journal.execute(
        mgr,
        h,
        journal.CREATE_THIN,
        prepare,
        lambda p: h.engine.create_thin(h.spec, int(p["dev_id"])),
    )
    return LayerDevice(int(payload["device"]), int(payload["dev_id"]), name, size)


def create_snapshot(
    mgr: Manager,
    h: PoolHandle,
    name: str,
    origin: LayerDevice,
    *,
    freeze_at: str | None = None,
) -> LayerDevice:
    """A read-only layer device: an O(1) snapshot of ``origin``.

    An active origin is suspended around the snapshot (containerd: suspend, create_snap,
    resume), and its file system frozen first when ``freeze_at`` names a directory on it.
    """
    from thinmgr.ops.snapshots import frozen

    def prepare(session: Session, pool: Pool) -> dict[str, Any]:
        _check_free_name(session, pool, name)
        dev_id = allocate(session, pool, name)
        device = Device(
            pool_id=pool.id,
            thin_id=dev_id,
            name=name,
            kind=DeviceKind.LAYER,
            origin_id=origin.row,
            virtual_size_bytes=origin.size,
            read_only=True,
            state=DeviceState.CREATING,
        )
        session.add(device)
        session.flush()
        return {"dev_id": dev_id, "device": device.id, "origin_dev_id": origin.thin_id}

    def apply(payload: dict[str, Any]) -> None:
        dev_id = int(payload["dev_id"])
        if h.engine.volume_device(h.spec, origin.thin_id) is None:
            h.engine.create_snapshot(h.spec, dev_id, origin.thin_id)
            return
        with frozen(freeze_at), h.engine.suspended(h.spec, origin.thin_id):
            h.engine.create_snapshot(h.spec, dev_id, origin.thin_id)

    payload = journal.execute(mgr, h, journal.CREATE_SNAPSHOT, prepare, apply)
    return LayerDevice(int(payload["device"]), int(payload["dev_id"]), name, origin.size)


def activate(mgr: Manager, h: PoolHandle, device: LayerDevice) -> Path:
    """The device's block device, writable (a layer is written only while it is filled)."""
    path = h.engine.activate_volume(
        h.spec, device.thin_id, name=device.name, size_bytes=device.size, read_only=False
    )
    with mgr.catalog.write() as session:
        session.get_one(Device, device.row).state = DeviceState.ACTIVE
    return path


def deactivate(mgr: Manager, h: PoolHandle, device: LayerDevice) -> None:
    """Commit: the engine flushes and hides the device (containerd: suspend, resume,
    deactivate)."""
    if h.engine.volume_device(h.spec, device.thin_id) is not None:
        journal.deactivate_with_retries(h, device.thin_id, force=False)
    with mgr.catalog.write() as session:
        session.get_one(Device, device.row).state = DeviceState.INACTIVE


def make_filesystem(path: Path) -> None:
    try:
        result = subprocess.run(
            [*MKFS_EXT4, str(path)], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise IOFailure(
            "mkfs.ext4 is not installed", hint="Install e2fsprogs (apt-get install e2fsprogs)."
        ) from None
    if result.returncode != 0:
        raise IOFailure(f"mkfs.ext4 {path} failed: {result.stderr.strip() or result.returncode}")


@contextlib.contextmanager
def mounted(device: Path, run_dir: Path) -> Iterator[Path]:
    """``device``'s ext4 mounted on a new 0700 directory under ``run_dir``; unmounted (which
    writes back every dirty page) and the directory removed on exit."""
    point = Path(tempfile.mkdtemp(prefix="layer-", dir=run_dir))
    try:
        mount(str(device), str(point), "ext4", MS_NOSUID | MS_NODEV, MOUNT_OPTIONS)
    except BaseException:
        point.rmdir()
        raise
    try:
        yield point
    finally:
        try:
            umount(str(point))
        except ThinmgrError:
            # Still busy (an interrupted applier not yet reaped): detach it, the device's
            # removal then waits for the last user, as `volume rm` does.
            umount(str(point), MNT_DETACH)
        point.rmdir()


def flush_device(path: Path) -> None:
    """fsync the block device: what the unmount wrote reaches the pool before the device is
    snapshotted (a layer above it) while it is still active."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise IOFailure(f"cannot flush {path}: {exc.strerror}") from None


def remove_empty_lost_found(root: Path) -> None:
    """containerd removes the fresh file system's empty ``lost+found`` from a base layer:
    the image decides its root's content."""
    try:
        (root / "lost+found").rmdir()
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
            raise IOFailure(f"cannot remove {root}/lost+found: {exc.strerror}") from None


def record_layer(
    mgr: Manager,
    h: PoolHandle,
    device: LayerDevice,
    *,
    digest: str,
    diff_id: str,
    chain_id: str,
    parent: int | None,
    size_bytes: int,
) -> int:
    """The ``Layer`` row for a filled, committed device; returns its id."""
    with mgr.catalog.write() as session:
        layer = Layer(
            pool_id=h.id,
            digest=digest,
            diff_id=diff_id,
            chain_id=chain_id,
            parent_id=parent,
            device_id=device.row,
            size_bytes=size_bytes,
        )
        session.add(layer)
        session.flush()
        return layer.id


def forget(mgr: Manager, h: PoolHandle, layers: list[int], devices: list[int]) -> list[str]:
    """Remove ``layers`` (rows, top first) and then ``devices`` (top first): the undo of a
    failed import or commit. Best effort, each step on its own; returns what failed."""
    problems: list[str] = []
    for layer_row in layers:
        try:
            with mgr.catalog.write() as session:
                layer = session.get(Layer, layer_row)
                if layer is not None:
                    session.delete(layer)
        except ThinmgrError as exc:
            problems.append(f"layer row {layer_row}: {exc}")
    for device_row in devices:
        try:
            with mgr.catalog.read() as session:
                present = session.get(Device, device_row) is not None
            if present:
                journal.remove_device(mgr, h, device_row, force=True)
        except ThinmgrError as exc:
            problems.append(f"device row {device_row}: {exc}")
    return problems
