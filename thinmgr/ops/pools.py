"""Pool use cases: create, list, status, extend, activate, deactivate, destroy, check, dump."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from thinmgr.catalog.fastread import PoolRow, row_of
from thinmgr.catalog.models import (
    Container,
    Device,
    DeviceState,
    Image,
    Layer,
    Pool,
    PoolEngine,
    PoolState,
    Step,
)
from thinmgr.catalog.models import NoSpacePolicy as CatalogNoSpace
from thinmgr.engine.base import NoSpacePolicy, PoolSpec, PoolStatus
from thinmgr.errors import BusyError, ConflictError, ThinmgrError, UsageError
from thinmgr.format.constants import (
    BLOCK_SIZE,
    MAX_DATA_BLOCK,
    MAX_DATA_BLOCK_SECTORS,
    MAX_METADATA_BLOCKS,
    MIN_DATA_BLOCK_SECTORS,
    SECTOR_SIZE,
)
from thinmgr.ops import listings
from thinmgr.ops.blockdevs import check_free, inspect_device
from thinmgr.ops.engines import resolve_engine_name
from thinmgr.ops.listings import DATA_WARN_PERCENT as DATA_WARN_PERCENT  # noqa: PLC0414
from thinmgr.ops.listings import METADATA_WARN_PERCENT as METADATA_WARN_PERCENT  # noqa: PLC0414
from thinmgr.ops.listings import POOL_MARKER as POOL_MARKER  # noqa: PLC0414
from thinmgr.ops.listings import PoolInfo as PoolInfo  # noqa: PLC0414
from thinmgr.ops.listings import PoolReport as PoolReport  # noqa: PLC0414
from thinmgr.ops.listings import served_state as served_state  # noqa: PLC0414
from thinmgr.ops.listings import warnings_of
from thinmgr.ops.manager import Manager, PoolHandle, get_pool
from thinmgr.ops.naming import check_name
from thinmgr.ops.units import format_size

if TYPE_CHECKING:
    from thinmgr.format.check import CheckReport
    from thinmgr.format.metadata import ThinMetadata

# "48 * $data_dev_size / $data_block_size, rounded up to 2MB" (the kernel's
# Documentation/admin-guide/device-mapper/thin-provisioning.rst), doubled as headroom for
# snapshots sharing mappings (prior-art.md section 6, item 4).
METADATA_BYTES_PER_BLOCK = 48
METADATA_HEADROOM = 2
# Each thin device needs at least one mapping-tree leaf of its own (4 KiB) plus its share of the
# details and top-level trees, which the per-data-block rule does not count: room for this
# many devices is added, as thin_metadata_size's max_thins term does (format section 10).
# File-backed metadata is sparse, so the allowance costs nothing until it is used.
METADATA_DEVICE_ALLOWANCE = 4096
MIN_METADATA_BYTES = 2 << 20
MAX_METADATA_BYTES = MAX_METADATA_BLOCKS * BLOCK_SIZE  # about 15.9 GiB (format section 6)
DEFAULT_BLOCK_BYTES = 64 << 10

Stage = Callable[[str], AbstractContextManager[object]]


def _no_stage(_description: str) -> AbstractContextManager[object]:
    return nullcontext()


def metadata_size_for(nr_data_blocks: int) -> int:
    """Metadata bytes for a pool of ``nr_data_blocks``, by the kernel's rule with headroom."""
    wanted = nr_data_blocks * METADATA_BYTES_PER_BLOCK * METADATA_HEADROOM
    wanted += METADATA_DEVICE_ALLOWANCE * BLOCK_SIZE
    mib = 1 << 20
    rounded = -(-wanted // mib) * mib
    return min(max(rounded, MIN_METADATA_BYTES), MAX_METADATA_BYTES)


def block_sectors_of(block_size: int) -> int:
    """Sectors per data block; dm-thin takes 64 KiB .. 1 GiB in 64 KiB steps (format s. 2)."""
    step = MIN_DATA_BLOCK_SECTORS * SECTOR_SIZE
    low, high = step, MAX_DATA_BLOCK_SECTORS * SECTOR_SIZE
    if block_size < low or block_size > high or block_size % step:
        raise UsageError(
            f"block size {block_size} bytes is out of range",
            hint="dm-thin data blocks are 64K to 1G, in multiples of 64K (e.g. 64K, 128K, 1M).",
        )
    return block_size // SECTOR_SIZE


@dataclass
class CreatePool:
    name: str
    engine: str = "auto"
    size: int | None = None
    directory: Path | None = None
    data: Path | None = None
    metadata: Path | None = None
    block_size: int = DEFAULT_BLOCK_BYTES
    metadata_size: int | None = None
    low_water_mark: int = 0
    no_space: NoSpacePolicy = NoSpacePolicy.ERROR
    force: bool = False


def pool_info(pool: Pool, volumes: int) -> PoolInfo:
    return listings.pool_info(row_of(PoolRow, pool), volumes)


# --- create --------------------------------------------------------------------------------


@dataclass
class _Made:
    """What ``create_pool`` made so far, so that a failure removes exactly that."""

    directory: Path | None = None
    files: list[Path] = field(default_factory=list)

    def undo(self) -> None:
        for path in self.files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if self.directory is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / POOL_MARKER).unlink()
            with contextlib.suppress(OSError):
                self.directory.rmdir()


def create_pool(mgr: Manager, req: CreatePool, stage: Stage = _no_stage) -> PoolInfo:
    """Make a pool: files or devices checked, metadata formatted, pool served, then recorded.

    The catalog row is written last, when the pool is fully made; any failure before that
    removes what this call created (files, directory) and leaves devices as they were.
    """
    name = check_name("pool", req.name)
    engine_name = resolve_engine_name(req.engine)
    block_sectors = block_sectors_of(req.block_size)
    block_bytes = block_sectors * SECTOR_SIZE
    if req.low_water_mark < 0:
        raise UsageError("--low-water-mark must not be negative")
    by_files = req.size is not None
    if by_files == (req.data is not None or req.metadata is not None):
        raise UsageError(
            "give either --size (a file-backed pool) or both --data and --metadata (devices)"
        )
    if not by_files and (req.data is None or req.metadata is None):
        raise UsageError("a pool on devices needs both --data DEV and --metadata DEV")
    if not by_files and (req.metadata_size is not None or req.directory is not None):
        raise UsageError("--metadata-size and --dir are for file-backed pools (--size)")
    engine = mgr.engine(engine_name)
    with mgr.locked(name):
        with mgr.catalog.read() as session:
            if session.scalars(select(Pool.id).where(Pool.name == name)).first() is not None:
                raise ConflictError(f"a pool named {name!r} exists", hint="Choose another name.")
        made = _Made()
        try:
            if by_files:
                assert req.size is not None
                nr_blocks, data, metadata = _make_files(mgr, req, name, req.size, block_bytes, made)
            else:
                assert req.data is not None and req.metadata is not None
                nr_blocks, data, metadata = _check_devices(
                    req.data, req.metadata, block_bytes, req.force
                )
            if req.low_water_mark >= nr_blocks:
                raise UsageError(
                    f"--low-water-mark {req.low_water_mark} is not below the pool's "
                    f"{nr_blocks} data blocks"
                )
            spec = PoolSpec(
                name=name,
                metadata=metadata,
                data=data,
                run_dir=mgr.run_dir(name),
                data_block_sectors=block_sectors,
                low_water_mark=req.low_water_mark,
                no_space=req.no_space,
            )
            spec.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            with stage("Formatting metadata"):
                engine.format_pool(spec, nr_data_blocks=nr_blocks)
            try:
                with stage("Activating the pool"):
                    engine.activate_pool(spec)
                status = engine.pool_status(spec)
                with mgr.catalog.write() as session:
                    pool = Pool(
                        name=name,
                        engine=PoolEngine(engine_name),
                        data_path=str(data),
                        metadata_path=str(metadata),
                        data_block_sectors=block_sectors,
                        low_water_blocks=req.low_water_mark,
                        no_space_policy=CatalogNoSpace(req.no_space.value),
                        state=PoolState.ACTIVE,
                        transaction_id=status.transaction_id,
                        next_device_id=0,
                    )
                    session.add(pool)
                    session.flush()
                    info = pool_info(pool, 0)
            except BaseException:
                with contextlib.suppress(ThinmgrError):
                    engine.deactivate_pool(spec)
                raise
        except BaseException:
            made.undo()
            raise
    return info


def _make_files(
    mgr: Manager, req: CreatePool, name: str, size: int, block_bytes: int, made: _Made
) -> tuple[int, Path, Path]:
    nr_blocks = size // block_bytes
    if nr_blocks < 1:
        raise UsageError(
            f"pool size {size} bytes is smaller than one data block ({format_size(block_bytes)})"
        )
    if nr_blocks > MAX_DATA_BLOCK + 1:
        raise UsageError(f"pool size {format_size(size)} does not fit dm-thin's 2^40 data blocks")
    md_size = metadata_size_for(nr_blocks) if req.metadata_size is None else req.metadata_size
    if not MIN_METADATA_BYTES <= md_size <= MAX_METADATA_BYTES:
        raise UsageError(
            f"metadata size {format_size(md_size)} is out of range",
            hint=f"Give {format_size(MIN_METADATA_BYTES)} to {format_size(MAX_METADATA_BYTES)}.",
        )
    md_size -= md_size % BLOCK_SIZE
    directory = (req.directory or mgr.pools_dir()) / name
    if directory.exists():
        if not (directory / POOL_MARKER).exists():
            raise ConflictError(
                f"{directory} exists and is not a pool directory of thinmgr's",
                hint="Choose another --dir or pool name, or move it away.",
            )
        # A create that crashed before recording the pool (we hold the name's lock and the
        # catalog has no such pool): start afresh.
        _remove_pool_files(directory)
    try:
        directory.mkdir(parents=True, mode=0o700)
        made.directory = directory
        (directory / POOL_MARKER).write_text(name + "\n")
        metadata, data = directory / "metadata", directory / "data"
        for path, length in ((metadata, md_size), (data, nr_blocks * block_bytes)):
            with open(path, "xb") as handle:
                made.files.append(path)
                handle.truncate(length)  # sparse: space is used as the pool fills
    except OSError as exc:
        raise _file_error(exc, directory) from exc
    return nr_blocks, data, metadata


def _file_error(exc: OSError, where: Path) -> ThinmgrError:
    from thinmgr.kernel.errno_map import kernel_error

    return kernel_error(f"create the pool files in {where}", exc)


def _remove_pool_files(directory: Path) -> None:
    for entry in ("metadata", "data", POOL_MARKER):
        with contextlib.suppress(FileNotFoundError):
            (directory / entry).unlink()
    with contextlib.suppress(OSError):
        directory.rmdir()


def _check_devices(
    data: Path, metadata: Path, block_bytes: int, force: bool
) -> tuple[int, Path, Path]:
    data_info = inspect_device(data, "data")
    md_info = inspect_device(metadata, "metadata")
    if os.path.realpath(data) == os.path.realpath(metadata):
        raise UsageError("--data and --metadata are the same device")
    check_free(data_info, "data", force=force)
    check_free(md_info, "metadata", force=force)
    nr_blocks = data_info.size // block_bytes
    if nr_blocks < 1:
        raise UsageError(f"data device {data} is smaller than one data block")
    if md_info.size < MIN_METADATA_BYTES:
        raise UsageError(
            f"metadata device {metadata} has {format_size(md_info.size)}; at least "
            f"{format_size(MIN_METADATA_BYTES)} is needed"
        )
    return nr_blocks, data, metadata


# --- read-only views ------------------------------------------------------------------------


def list_pools(mgr: Manager) -> list[PoolInfo]:
    with mgr.catalog.read() as session:
        grouped = session.execute(select(Device.pool_id, func.count()).group_by(Device.pool_id))
        counts: dict[int, int] = {pool_id: count for pool_id, count in grouped}
        pools = session.scalars(select(Pool).order_by(Pool.name)).all()
        return [pool_info(p, counts.get(p.id, 0)) for p in pools]


def pool_status(mgr: Manager, name: str) -> PoolReport:
    """Catalog and engine views of a pool; never takes the pool lock."""
    with mgr.catalog.read() as session:
        pool = get_pool(session, name)
        states = list(session.scalars(select(Device.state).where(Device.pool_id == pool.id)))
        info = pool_info(pool, len(states))
        pending = pool.pending_transaction_id
        h = mgr.handle(pool)
    report = PoolReport(info, None, active_volumes=states.count(DeviceState.ACTIVE))
    try:
        report.status = h.engine.pool_status(h.spec)
    except ThinmgrError as exc:
        report.warnings.append(f"the engine cannot report on the pool: {exc}")
        return report
    report.warnings.extend(warnings_of(report, pending, states.count(DeviceState.DELETING)))
    return report


# --- changes ---------------------------------------------------------------------------------


def extend_pool(mgr: Manager, name: str, size: int | None, stage: Stage = _no_stage) -> PoolReport:
    """Grow the data space: a file grows first (sparse), a device must be bigger already."""
    with mgr.writing(name) as h:
        status = h.engine.pool_status(h.spec)
        block_bytes = h.spec.data_block_sectors * SECTOR_SIZE
        data = h.spec.data
        info = inspect_device(data, "data")
        if size is None:
            if not info.is_block:
                raise UsageError("give the new size of a file-backed pool with --size")
            size = info.size
        nr_blocks = size // block_bytes
        current = status.total_data_blocks
        if nr_blocks <= current:
            raise UsageError(
                f"pool {name!r} already has {format_size(current * block_bytes)} of data "
                f"space; {format_size(size)} would not grow it",
                hint="Pools only grow; give a larger --size.",
            )
        if nr_blocks > MAX_DATA_BLOCK + 1:
            raise UsageError(f"{format_size(size)} does not fit dm-thin's 2^40 data blocks")
        grown_from = None
        if info.is_block:
            if info.size < nr_blocks * block_bytes:
                raise UsageError(
                    f"data device {data} has {format_size(info.size)}, less than "
                    f"{format_size(size)}",
                    hint="Grow the device first (lvextend, a bigger partition), then extend.",
                )
        elif info.size < nr_blocks * block_bytes:
            try:
                os.truncate(data, nr_blocks * block_bytes)
            except OSError as exc:
                raise _file_error(exc, data) from exc
            grown_from = info.size
        try:
            with stage("Extending the pool"):
                h.engine.extend_pool(h.spec, nr_data_blocks=nr_blocks)
        except BaseException:
            if grown_from is not None:
                with contextlib.suppress(OSError):
                    os.truncate(data, grown_from)
            raise
    return pool_status(mgr, name)


def activate_pool(mgr: Manager, name: str) -> list[str]:
    """Serve the pool and bring back the volumes the catalog has active (after a reboot)."""
    from thinmgr.ops.volumes import reactivate

    with mgr.writing(name) as h:
        return reactivate(mgr, h)


def deactivate_pool(mgr: Manager, name: str) -> None:
    with mgr.writing(name) as h:
        active = _active_volumes(mgr, h)
        if active:
            raise BusyError(
                f"pool {name!r} has active volumes: {', '.join(active[:10])}",
                hint="Deactivate them first (`thinmgr volume deactivate POOL NAME`).",
            )
        h.engine.deactivate_pool(h.spec)
        with mgr.catalog.write() as session:
            session.get_one(Pool, h.id).state = PoolState.INACTIVE


def _active_volumes(mgr: Manager, h: PoolHandle) -> list[str]:
    with mgr.catalog.read() as session:
        devices = session.execute(
            select(Device.name, Device.thin_id).where(Device.pool_id == h.id)
        ).all()
    return [n for n, dev_id in devices if h.engine.volume_device(h.spec, dev_id) is not None]


def destroy_pool(mgr: Manager, name: str, *, force: bool = False) -> None:
    """Remove a pool: refused while volumes are active, or hold anything unless ``force``.

    Marked ``deleting`` first, so that a crash half way is finished by running it again.
    Devices given by path are left as they are; files thinmgr made are removed.
    """
    with mgr.locked(name):
        h = mgr.find(name)
        with mgr.catalog.read() as session:
            devices = session.execute(
                select(Device.id, Device.name, Device.thin_id).where(Device.pool_id == h.id)
            ).all()
            rows = [d.id for d in devices]
            used = (
                session.scalars(select(Layer.id).where(Layer.device_id.in_(rows))).first()
                or session.scalars(
                    select(Container.id).where(Container.device_id.in_(rows))
                ).first()
            )
        status = _status_or_none(h)
        if status is not None and status.active:
            active = [
                d.name for d in devices if h.engine.volume_device(h.spec, d.thin_id) is not None
            ]
            if active:
                raise BusyError(
                    f"pool {name!r} has active volumes: {', '.join(active[:10])}",
                    hint="Deactivate them first (`thinmgr volume deactivate POOL NAME`).",
                )
        if used is not None and not force:
            raise ConflictError(
                f"pool {name!r} holds image layers or containers",
                hint="Remove the images and containers that use it first, or pass --force "
                "to destroy the pool with them.",
            )
        if devices and not force:
            raise ConflictError(
                f"pool {name!r} has {len(devices)} volume(s)",
                hint="Remove them first, or pass --force to destroy the pool with them.",
            )
        with mgr.catalog.write() as session:
            session.get_one(Pool, h.id).state = PoolState.DELETING
        if status is not None and status.active:
            h.engine.deactivate_pool(h.spec)
        directory = h.spec.data.parent
        if (directory / POOL_MARKER).exists():
            _remove_pool_files(directory)
        with mgr.catalog.write() as session:
            for step in session.scalars(select(Step).where(Step.pool_id == h.id)):
                session.delete(step)
            _forget_images_and_containers(session, h.id, rows)
            session.query(Device).filter(Device.pool_id == h.id).update({Device.origin_id: None})
            for device in session.scalars(select(Device).where(Device.pool_id == h.id)):
                session.delete(device)
            session.delete(session.get_one(Pool, h.id))
    _remove_link_dir(h)


def _forget_images_and_containers(session: Session, pool_id: int, devices: list[int]) -> None:
    """The catalog rows that name a destroyed pool's devices (``destroy --force``): its
    containers (none runs: their volumes would be active), images and layers."""
    session.query(Container).filter(Container.device_id.in_(devices)).delete()
    layers = select(Layer.id).where(Layer.pool_id == pool_id)
    session.query(Image).filter((Image.pool_id == pool_id) | Image.top_layer_id.in_(layers)).delete(
        synchronize_session=False
    )
    session.query(Layer).filter(Layer.pool_id == pool_id).update({Layer.parent_id: None})
    session.query(Layer).filter(Layer.pool_id == pool_id).delete()


def _remove_link_dir(h: PoolHandle) -> None:
    """The engine's directory of stable links for the pool (``/dev/thinmgr/POOL``), if empty."""
    link = h.engine.link_path(h.spec, "-")
    if link is not None:
        with contextlib.suppress(OSError):
            link.parent.rmdir()


def _status_or_none(h: PoolHandle) -> PoolStatus | None:
    try:
        return h.engine.pool_status(h.spec)
    except ThinmgrError:
        if not h.spec.metadata.exists():
            return None  # a destroy that crashed after removing the files
        raise


# --- metadata ------------------------------------------------------------------------------


def check_pool(mgr: Manager, name: str) -> CheckReport:
    """thin_check's checks (and more) on the pool's committed metadata."""
    from thinmgr.format.check import CheckOptions, check_metadata

    h = mgr.find(name)
    with h.engine.metadata_view(h.spec) as view:
        return check_metadata(view.source, CheckOptions(metadata_snap=view.snap))


@contextlib.contextmanager
def pool_metadata(mgr: Manager, name: str) -> Iterator[ThinMetadata]:
    """The pool's committed metadata, stable while the context lasts."""
    from thinmgr.format.metadata import ThinMetadata

    h = mgr.find(name)
    with h.engine.metadata_view(h.spec) as view:
        yield ThinMetadata(view.source, snap=view.snap)


def remove_leftover(directory: Path) -> None:
    """Remove the files of a pool whose create crashed before it was recorded."""
    if (directory / POOL_MARKER).exists():
        _remove_pool_files(directory)
