"""The read-only views of the manager -- `pool list`, `pool status`, `volume list` -- fast.

These commands must answer in well under 300 ms with thousands of volumes, which rules out
importing SQLAlchemy (~300 ms) and, for an idle user-engine pool, opening the pool (numpy
and every space-map bitmap). So the catalog is read through ``catalog.fastread`` (stdlib
``sqlite3``) and a user-engine pool's status through ``engine.user.quickstatus`` (its
superblock). Whenever one of them cannot answer -- no catalog yet, a schema to migrate, an
SQLite error, an unusual pool, a kernel-engine pool, an injected test engine -- the normal
path runs (``ops.pools``/``ops.volumes`` over the ORM and the engine), which migrates,
reports errors and gives the same result. The result types are defined here and used by
both paths, so their output is the same by construction; a test compares the two.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from thinmgr.catalog.fastread import CatalogReader, DeviceRow, PoolRow, read_or_none
from thinmgr.engine.base import PoolStatus
from thinmgr.errors import NotFoundError
from thinmgr.format.constants import SECTOR_SIZE
from thinmgr.ops.engines import FACTORY_ENV
from thinmgr.ops.poolspec import spec_of

_USER_ENGINE = "user"  # models.PoolEngine.USER, whose module imports SQLAlchemy

# Warnings past these fill levels, as LVM's thin_pool_autoextend_threshold defaults suggest.
DATA_WARN_PERCENT = 80.0
METADATA_WARN_PERCENT = 75.0
POOL_MARKER = "thinmgr-pool"  # in a file-backed pool's directory: thinmgr made it


@dataclass
class PoolInfo:
    name: str
    engine: str
    state: str
    data_path: str
    metadata_path: str
    file_backed: bool
    block_size: int
    low_water_mark: int
    no_space: str
    transaction_id: int
    volumes: int
    next_device_id: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PoolReport:
    """``pool status``: the catalog's view and the engine's, with warnings."""

    pool: PoolInfo
    status: PoolStatus | None
    active_volumes: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def data_percent(self) -> float | None:
        s = self.status
        return None if s is None else _percent(s.used_data_blocks, s.total_data_blocks)

    @property
    def metadata_percent(self) -> float | None:
        s = self.status
        return None if s is None else _percent(s.used_metadata_blocks, s.total_metadata_blocks)

    def as_dict(self) -> dict[str, Any]:
        data = self.pool.as_dict()
        s = self.status
        data.update(
            active_volumes=self.active_volumes,
            warnings=list(self.warnings),
            data_used_percent=self.data_percent,
            metadata_used_percent=self.metadata_percent,
            data_size=None if s is None else s.total_data_blocks * self.pool.block_size,
            used_data_blocks=None if s is None else s.used_data_blocks,
            total_data_blocks=None if s is None else s.total_data_blocks,
            used_metadata_blocks=None if s is None else s.used_metadata_blocks,
            total_metadata_blocks=None if s is None else s.total_metadata_blocks,
            pool_transaction_id=None if s is None else s.transaction_id,
            mode=None if s is None else s.mode.value,
            needs_check=None if s is None else s.needs_check,
            held_metadata_root=None if s is None else s.held_metadata_root,
            active=None if s is None else s.active,
            served=None if s is None else served_state(self.pool.engine, s.active),
        )
        return data


def served_state(engine: str, active: bool) -> str:
    """How the engine serves a pool, in words (``pool status``; docs/manager.md, "States").

        A user-engine pool has no standing kernel object: commands open its files on demand
        ("idle") and a server process runs while one of its volumes is active, and a few seconds
    after the last one went ("serving").
        A kernel-engine pool is a device-mapper thin-pool that is loaded or not.
    """
    if engine == _USER_ENGINE:
        return "serving" if active else "idle"
    return "loaded" if active else "not loaded"


def _percent(used: int, total: int) -> float:
    return round(100.0 * used / total, 2) if total else 0.0


def warnings_of(report: PoolReport, pending: int | None, deleting: int) -> list[str]:
    s = report.status
    assert s is not None
    out = []
    data, meta = report.data_percent or 0.0, report.metadata_percent or 0.0
    if data >= DATA_WARN_PERCENT:
        out.append(
            f"data space is {data:.1f}% used (warning at {DATA_WARN_PERCENT:g}%): "
            "extend the pool (`thinmgr pool extend`) or remove volumes"
        )
    if meta >= METADATA_WARN_PERCENT:
        out.append(f"metadata space is {meta:.1f}% used (warning at {METADATA_WARN_PERCENT:g}%)")
    if s.mode.value != "rw":
        out.append(f"the pool is in mode {s.mode.value!r}")
    if s.needs_check:
        out.append("the metadata is flagged NEEDS_CHECK: run `thinmgr pool check`")
    if s.held_metadata_root is not None:
        out.append(
            f"a metadata snapshot is held (block {s.held_metadata_root}); `thinmgr doctor "
            "--fix` releases one left behind"
        )
    if s.transaction_id not in (report.pool.transaction_id, pending):
        out.append(
            f"the pool's transaction id is {s.transaction_id}, the catalog expects "
            f"{report.pool.transaction_id}: another tool changed the pool (`thinmgr doctor`)"
        )
    elif pending is not None:
        out.append("a step is unfinished; the next command or `thinmgr doctor --fix` settles it")
    if deleting:
        out.append(f"{deleting} removal(s) deferred while busy; `thinmgr doctor --fix` retries")
    return out


def pool_info(row: PoolRow, volumes: int) -> PoolInfo:
    return PoolInfo(
        name=row.name,
        engine=row.engine,
        state=row.state,
        data_path=row.data_path,
        metadata_path=row.metadata_path,
        file_backed=(Path(row.data_path).parent / POOL_MARKER).exists(),
        block_size=row.data_block_sectors * SECTOR_SIZE,
        low_water_mark=row.low_water_blocks,
        no_space=row.no_space_policy,
        transaction_id=row.transaction_id,
        volumes=volumes,
        next_device_id=row.next_device_id,
    )


@dataclass
class VolumeInfo:
    pool: str
    name: str
    dev_id: int
    kind: str
    origin: str | None
    size: int
    read_only: bool
    state: str
    created_at: str
    # From the engine (``volume show``); None in listings, which read only the catalog.
    mapped_blocks: int | None = None
    mapped_bytes: int | None = None
    device: str | None = None  # the block device node (e.g. /dev/loop3) while active
    open_count: int | None = None
    path: str | None = None  # the stable path (e.g. /dev/thinmgr/POOL/NAME) while active

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def volume_info(pool: str, device: DeviceRow, origin: str | None) -> VolumeInfo:
    return VolumeInfo(
        pool=pool,
        name=device.name,
        dev_id=device.thin_id,
        kind=device.kind,
        origin=origin,
        size=device.virtual_size_bytes,
        read_only=device.read_only,
        state=device.state,
        created_at=device.created_at.isoformat(timespec="seconds"),
    )


def _no_pool(name: str) -> NotFoundError:
    # The same error as ops.manager.get_pool.
    return NotFoundError(f"no pool named {name!r}", hint="See `thinmgr pool list`.")


# --- the fast paths ---------------------------------------------------------------------------


def _volumes(reader: CatalogReader, pool_name: str | None) -> list[VolumeInfo]:
    if pool_name is None:
        pools = {p.id: p.name for p in reader.pools()}
        devices = reader.devices()
    else:
        row = reader.pool(pool_name)
        if row is None:
            raise _no_pool(pool_name)
        pools = {row.id: row.name}
        devices = reader.devices(row.id)
    names = reader.device_names({d.origin_id for d in devices if d.origin_id is not None})
    ordered = sorted(devices, key=lambda d: (pools[d.pool_id], d.name))
    return [
        volume_info(pools[d.pool_id], d, names.get(d.origin_id) if d.origin_id else None)
        for d in ordered
    ]


def list_volumes(home: Path, pool_name: str | None = None) -> list[VolumeInfo]:
    """Volumes from the catalog alone (``ops.volumes.list_volumes``), without SQLAlchemy."""
    found = read_or_none(home, lambda reader: _volumes(reader, pool_name))
    if found is not None:
        return found
    from thinmgr.ops.manager import open_manager
    from thinmgr.ops.volumes import list_volumes as list_by_orm

    with open_manager(home) as mgr:
        return list_by_orm(mgr, pool_name)


def _pools(reader: CatalogReader) -> list[PoolInfo]:
    counts = reader.device_counts()
    return [pool_info(p, counts.get(p.id, 0)) for p in reader.pools()]


def list_pools(home: Path) -> list[PoolInfo]:
    """Pools from the catalog (``ops.pools.list_pools``), without SQLAlchemy."""
    found = read_or_none(home, _pools)
    if found is not None:
        return found
    from thinmgr.ops.manager import open_manager
    from thinmgr.ops.pools import list_pools as list_by_orm

    with open_manager(home) as mgr:
        return list_by_orm(mgr)


@dataclass(frozen=True)
class _PoolRecord:
    row: PoolRow
    states: list[str]


def _pool_record(reader: CatalogReader, name: str) -> _PoolRecord:
    row = reader.pool(name)
    if row is None:
        raise _no_pool(name)
    return _PoolRecord(row, reader.device_states(row.id))


def _quick_status(home: Path, row: PoolRow) -> PoolStatus | None:
    """The engine's status of the pool without loading the engine, or None: ask it."""
    if row.engine != _USER_ENGINE or os.environ.get(FACTORY_ENV):
        return None  # a kernel pool, or an engine injected by tests: only it can answer
    from thinmgr.engine.user.quickstatus import quick_pool_status

    return quick_pool_status(spec_of(home, row))


def pool_status(home: Path, name: str) -> PoolReport:
    """``ops.pools.pool_status`` without SQLAlchemy nor, mostly, the engine; takes no lock."""
    record = read_or_none(home, lambda reader: _pool_record(reader, name))
    status = None if record is None else _quick_status(home, record.row)
    if record is None or status is None:
        from thinmgr.ops.manager import open_manager
        from thinmgr.ops.pools import pool_status as status_by_engine

        with open_manager(home) as mgr:
            return status_by_engine(mgr, name)
    states = record.states  # the text values of models.DeviceState
    report = PoolReport(
        pool_info(record.row, len(states)), status, active_volumes=states.count("active")
    )
    pending = record.row.pending_transaction_id
    report.warnings.extend(warnings_of(report, pending, states.count("deleting")))
    return report
