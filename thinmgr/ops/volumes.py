"""Volume use cases: create, list, show, resize, activate, deactivate, remove."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from thinmgr.catalog.fastread import DeviceRow, row_of
from thinmgr.catalog.models import (
    Container,
    Device,
    DeviceKind,
    DeviceState,
    Layer,
    Pool,
)
from thinmgr.engine.base import VolumeStatus
from thinmgr.errors import (
    BusyError,
    ConflictError,
    NoSpaceError,
    ThinmgrError,
    UnsupportedError,
    UsageError,
)
from thinmgr.format.constants import MAX_DATA_BLOCK, MAX_DEV_ID, SECTOR_SIZE
from thinmgr.ops import journal, listings
from thinmgr.ops.listings import VolumeInfo as VolumeInfo  # noqa: PLC0414
from thinmgr.ops.manager import Manager, PoolHandle, get_device, get_pool
from thinmgr.ops.naming import check_name
from thinmgr.ops.units import format_size


def volume_info(pool: Pool, device: Device, origin: str | None) -> VolumeInfo:
    return listings.volume_info(pool.name, row_of(DeviceRow, device), origin)


def round_volume_size(size: int, block_bytes: int) -> int:
    """Sizes round up to whole data blocks, as LVM rounds to extents."""
    if size <= 0:
        raise UsageError("a volume size must be greater than zero")
    rounded = -(-size // block_bytes) * block_bytes
    if rounded // block_bytes > MAX_DATA_BLOCK + 1:
        raise UsageError(f"volume size {format_size(size)} does not fit dm-thin's 2^40 blocks")
    return rounded


def allocate(session: Session, pool: Pool, name: str) -> int:
    """The next device id, advanced before use so that a crash burns it, never reuses it."""
    taken = session.scalars(
        select(Device.id).where(Device.pool_id == pool.id, Device.name == name)
    ).first()
    if taken is not None:
        raise ConflictError(
            f"pool {pool.name!r} already has a volume named {name!r}",
            hint="Choose another name.",
        )
    dev_id = pool.next_device_id
    if dev_id > MAX_DEV_ID:
        raise NoSpaceError(f"pool {pool.name!r} has used all 2^24 thin device ids")
    pool.next_device_id = dev_id + 1
    return dev_id


def create_volume(mgr: Manager, pool_name: str, name: str, size: int) -> VolumeInfo:
    check_name("volume", name)
    with mgr.writing(pool_name) as h:
        block_bytes = h.spec.data_block_sectors * SECTOR_SIZE
        size = round_volume_size(size, block_bytes)

        def prepare(session: Session, pool: Pool) -> dict[str, Any]:
            dev_id = allocate(session, pool, name)
            device = Device(
                pool_id=pool.id,
                thin_id=dev_id,
                name=name,
                kind=DeviceKind.VOLUME,
                virtual_size_bytes=size,
                state=DeviceState.CREATING,
            )
            session.add(device)
            session.flush()
            return {"dev_id": dev_id, "device": device.id, "name": name}

        def apply(payload: dict[str, Any]) -> None:
            h.engine.create_thin(h.spec, int(payload["dev_id"]))

        journal.execute(mgr, h, journal.CREATE_THIN, prepare, apply)
    return show_volume(mgr, pool_name, name, engine=False)


def list_volumes(mgr: Manager, pool_name: str | None = None) -> list[VolumeInfo]:
    """Volumes from the catalog alone: one query, fast with thousands of volumes."""
    with mgr.catalog.read() as session:
        query = select(Pool)
        if pool_name is not None:
            query = query.where(Pool.id == get_pool(session, pool_name).id)
        pools = {p.id: p for p in session.scalars(query)}
        devices = session.scalars(
            select(Device).where(Device.pool_id.in_(pools)).order_by(Device.pool_id, Device.name)
        ).all()
        names = {d.id: d.name for d in devices}
        return [
            volume_info(pools[d.pool_id], d, names.get(d.origin_id) if d.origin_id else None)
            for d in sorted(devices, key=lambda d: (pools[d.pool_id].name, d.name))
        ]


def show_volume(mgr: Manager, pool_name: str, name: str, *, engine: bool = True) -> VolumeInfo:
    with mgr.catalog.read() as session:
        pool = get_pool(session, pool_name)
        device = get_device(session, pool, name)
        origin = device.origin.name if device.origin is not None else None
        info = volume_info(pool, device, origin)
        h = mgr.handle(pool)
    if engine:
        status = h.engine.volume_status(h.spec, info.dev_id)
        _add_status(info, status, h.spec.data_block_sectors * SECTOR_SIZE)
        if status.active:
            info.path = stable_path(h, name, status.device)
    return info


def stable_path(h: PoolHandle, name: str, device: Path | None) -> str | None:
    """The path an active volume is known by: the engine's stable link when it has one
    (the user engine's ``/dev/thinmgr/POOL/NAME``), else the device node."""
    link = h.engine.link_path(h.spec, name)
    if link is not None:
        return str(link)
    return None if device is None else str(device)


def _add_status(info: VolumeInfo, status: VolumeStatus, block_bytes: int) -> None:
    info.mapped_blocks = status.mapped_blocks
    info.mapped_bytes = status.mapped_blocks * block_bytes
    info.device = str(status.device) if status.device is not None else None
    info.open_count = status.open_count


def _usable(session: Session, pool: Pool, name: str) -> Device:
    device = get_device(session, pool, name)
    if device.state in (DeviceState.DELETING, DeviceState.CREATING, DeviceState.FAILED):
        raise ConflictError(
            f"volume {name!r} is {device.state.value}",
            hint="`thinmgr doctor --fix` finishes a removal that was deferred.",
        )
    return device


def resize_volume(mgr: Manager, pool_name: str, name: str, size: int) -> VolumeInfo:
    """Grow a volume (its virtual size); thin devices are never shrunk here."""
    with mgr.writing(pool_name) as h:
        block_bytes = h.spec.data_block_sectors * SECTOR_SIZE
        size = round_volume_size(size, block_bytes)
        with mgr.catalog.write() as session:
            device = _usable(session, session.get_one(Pool, h.id), name)
            old, dev_id = device.virtual_size_bytes, device.thin_id
            if size < old:
                raise UsageError(
                    f"volume {name!r} has {format_size(old)}; shrinking is not supported",
                    hint="Shrinking a volume under a filesystem loses data; give a larger size.",
                )
            # Recorded first: a crash leaves the catalog bigger, and the next activation
            # gives the volume the size asked for.
            device.virtual_size_bytes = size
        if size != old and h.engine.volume_device(h.spec, dev_id) is not None:
            try:
                h.engine.resize_volume(h.spec, dev_id, size_bytes=size)
            except BaseException as exc:
                with mgr.catalog.write() as session:
                    session.get_one(Device, device.id).virtual_size_bytes = old
                if isinstance(exc, UnsupportedError):
                    raise UnsupportedError(
                        f"volume {name!r} is active and its engine cannot grow it while "
                        f"active ({exc.message}); its size stays {format_size(old)}",
                        hint=f"Run `thinmgr volume deactivate {pool_name} {name}`, resize, "
                        f"then `thinmgr volume activate {pool_name} {name}`.",
                    ) from exc
                raise
    return show_volume(mgr, pool_name, name)


def activate_volume(mgr: Manager, pool_name: str, name: str) -> VolumeInfo:
    with mgr.writing(pool_name) as h:
        with mgr.catalog.read() as session:
            device = _usable(session, session.get_one(Pool, h.id), name)
            row, dev_id = device.id, device.thin_id
            size, read_only = device.virtual_size_bytes, device.read_only
        path = h.engine.activate_volume(
            h.spec, dev_id, name=name, size_bytes=size, read_only=read_only
        )
        with mgr.catalog.write() as session:
            session.get_one(Device, row).state = DeviceState.ACTIVE
    info = show_volume(mgr, pool_name, name)
    info.path = str(path)  # what the engine returned: the stable path, not /dev/loopN
    return info


def deactivate_volume(mgr: Manager, pool_name: str, name: str, *, force: bool = False) -> None:
    with mgr.writing(pool_name) as h:
        with mgr.catalog.read() as session:
            device = _usable(session, session.get_one(Pool, h.id), name)
            row, dev_id = device.id, device.thin_id
        if force:  # openers are not asked about: no need to count them
            active = h.engine.volume_device(h.spec, dev_id) is not None
        else:
            status = h.engine.volume_status(h.spec, dev_id)
            if status.active and status.open_count > 0:
                raise _open_error(name, status)
            active = status.active
        if active:
            journal.deactivate_with_retries(h, dev_id, force=force)
        with mgr.catalog.write() as session:
            session.get_one(Device, row).state = DeviceState.INACTIVE


def _open_error(name: str, status: VolumeStatus) -> ThinmgrError:
    return BusyError(
        f"volume {name!r} is open ({status.open_count} holder(s) of {status.device})",
        hint="Unmount it and stop the programs using it (`fuser -vm DEVICE`), or pass --force.",
    )


@dataclass
class RemoveResult:
    pool: str
    name: str
    removed: bool
    deferred: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def remove_volume(mgr: Manager, pool_name: str, name: str, *, force: bool = False) -> RemoveResult:
    """Delete a volume and its row; busy after retries -> deferred, finished later."""
    with mgr.writing(pool_name) as h:
        with mgr.catalog.read() as session:
            device = get_device(session, session.get_one(Pool, h.id), name)
            row, dev_id = device.id, device.thin_id
            if session.scalars(select(Layer.id).where(Layer.device_id == row)).first():
                raise ConflictError(f"volume {name!r} holds an image layer; remove the image")
            if session.scalars(select(Container.id).where(Container.device_id == row)).first():
                raise ConflictError(f"volume {name!r} is a container's disk; remove the container")
        if not force:
            status = h.engine.volume_status(h.spec, dev_id)
            if status.active and status.open_count > 0:
                raise _open_error(name, status)
        removed = journal.remove_device(mgr, h, row, force=force)
    return RemoveResult(pool_name, name, removed, not removed)


def reactivate(mgr: Manager, h: PoolHandle) -> list[str]:
    """Activate again the volumes the catalog has active but the engine does not serve."""
    with mgr.catalog.read() as session:
        devices = session.scalars(
            select(Device).where(Device.pool_id == h.id, Device.state == DeviceState.ACTIVE)
        ).all()
    notes = []
    for device in devices:
        if h.engine.volume_device(h.spec, device.thin_id) is not None:
            continue
        try:
            h.engine.activate_volume(
                h.spec,
                device.thin_id,
                name=device.name,
                size_bytes=device.virtual_size_bytes,
                read_only=device.read_only,
            )
            notes.append(f"reactivated volume {device.name!r}")
        except ThinmgrError as exc:
            notes.append(f"could not reactivate volume {device.name!r}: {exc}")
            with mgr.catalog.write() as session:
                session.get_one(Device, device.id).state = DeviceState.INACTIVE
    return notes
