"""The engine conformance suite: one set of checks that every ``Engine`` must pass.

Each check is a plain function ``check_X(engine, make_spec)``: ``make_spec(nr_data_blocks)``
returns a fresh ``PoolSpec`` whose metadata and data files exist and are big enough (the data
file holds exactly ``nr_data_blocks`` blocks of ``BLOCK_SECTORS``). The checks format the pool
themselves, drive it only through the Engine protocol, and tear down what they activated even
when they fail. The root tier runs them on the user engine
(``tests/root/test_conformance_user.py``), the lab tier on the kernel engine
(``tests/lab/test_conformance_kernel.py``).

Volume I/O is O_DIRECT pread/pwrite on the device path (page-aligned buffers and sizes: the
user engine's device is a loop device over FUSE), so that nothing is served from a page cache
and a full pool fails the write itself, not a later writeback.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from thinmgr.engine.base import Engine, PoolMode, PoolSpec
from thinmgr.errors import ConflictError, NotFoundError, ThinmgrError
from thinmgr.format.metadata import ThinMetadata

BLOCK_SECTORS = 128
BLOCK = BLOCK_SECTORS * 512  # 64 KiB data blocks
META_SIZE = 4 << 20

SpecFactory = Callable[[int], PoolSpec]


def make_spec_factory(root: Path, name: str) -> SpecFactory:
    """A ``SpecFactory`` that puts each pool's files in a new directory under ``root``."""
    counter = iter(range(1_000_000))

    def make(nr_data_blocks: int) -> PoolSpec:
        index = next(counter)
        where = root / f"pool{index}"
        where.mkdir(parents=True)
        metadata, data, run_dir = where / "meta", where / "data", where / "run"
        with open(metadata, "wb") as f:
            f.truncate(META_SIZE)
        with open(data, "wb") as f:
            f.truncate(nr_data_blocks * BLOCK)
        run_dir.mkdir()
        return PoolSpec(f"{name}{index}", metadata, data, run_dir, BLOCK_SECTORS)

    return make


# --- I/O helpers ------------------------------------------------------------------------------
def pattern(tag: int, length: int = BLOCK) -> bytes:
    """A block that names its tag and differs from every other tag's block."""
    head = f"block-{tag:08d}|".encode()
    return (head * (length // len(head) + 1))[:length]


def write_at(device: Path, offset: int, data: bytes) -> None:
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        buf = mmap.mmap(-1, max(len(data), mmap.PAGESIZE))  # page-aligned for O_DIRECT
        try:
            buf[: len(data)] = data
            with memoryview(buf) as view:
                assert os.pwrite(fd, view[: len(data)], offset) == len(data)
        finally:
            buf.close()
        os.fsync(fd)
    finally:
        os.close(fd)


def read_at(device: Path, offset: int, length: int) -> bytes:
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        buf = mmap.mmap(-1, max(length, mmap.PAGESIZE))
        try:
            with memoryview(buf) as view:
                assert os.preadv(fd, [view[:length]], offset) == length
            return bytes(buf[:length])
        finally:
            buf.close()
    finally:
        os.close(fd)


@contextlib.contextmanager
def formatted(engine: Engine, make_spec: SpecFactory, nr_data_blocks: int) -> Iterator[PoolSpec]:
    """A formatted, active pool; its volumes (ids 0-15) and the pool stop on the way out."""
    spec = make_spec(nr_data_blocks)
    engine.format_pool(spec, nr_data_blocks=nr_data_blocks)
    engine.activate_pool(spec)
    try:
        yield spec
    finally:
        for dev_id in range(16):
            with contextlib.suppress(ThinmgrError):
                engine.deactivate_volume(spec, dev_id, force=True)
        engine.deactivate_pool(spec)


def _volume(engine: Engine, spec: PoolSpec, dev_id: int, blocks: int, *, ro: bool = False) -> Path:
    return engine.activate_volume(
        spec, dev_id, name=f"{spec.name}-v{dev_id}", size_bytes=blocks * BLOCK, read_only=ro
    )


# --- the checks -------------------------------------------------------------------------------
def check_thin_lifecycle(engine: Engine, make_spec: SpecFactory) -> None:
    """Format, create, write, read, status active and inactive, delete, deactivate."""
    with formatted(engine, make_spec, 64) as spec:
        status = engine.pool_status(spec)
        assert status.transaction_id == 0 and status.mode is PoolMode.READ_WRITE
        assert (status.used_data_blocks, status.total_data_blocks) == (0, 64)
        assert status.data_block_sectors == BLOCK_SECTORS
        assert status.held_metadata_root is None and not status.needs_check
        engine.activate_pool(spec)  # idempotent
        assert engine.thin_ids(spec) == set()

        engine.create_thin(spec, 1)
        with pytest.raises(ConflictError):
            engine.create_thin(spec, 1)
        device = _volume(engine, spec, 1, 16)
        assert _volume(engine, spec, 1, 16) == device  # idempotent
        assert read_at(device, 0, BLOCK) == bytes(BLOCK)  # unprovisioned reads zeroes
        write_at(device, 0, pattern(1))
        write_at(device, 3 * BLOCK, pattern(2))
        assert read_at(device, 0, BLOCK) == pattern(1)
        assert read_at(device, 3 * BLOCK, BLOCK) == pattern(2)
        active = engine.volume_status(spec, 1)
        assert active.active and active.device is not None
        assert (active.mapped_blocks, active.highest_mapped_block) == (2, 3)
        assert engine.volume_device(spec, 1) == active.device  # the cheap question
        assert engine.pool_status(spec).used_data_blocks == 2

        engine.deactivate_volume(spec, 1)
        engine.deactivate_volume(spec, 1)  # idempotent
        inactive = engine.volume_status(spec, 1)
        assert not inactive.active and inactive.device is None
        assert engine.volume_device(spec, 1) is None
        assert (inactive.mapped_blocks, inactive.highest_mapped_block) == (2, 3)

        device = _volume(engine, spec, 1, 16)  # the data survives a reactivation
        assert read_at(device, 3 * BLOCK, BLOCK) == pattern(2)
        engine.deactivate_volume(spec, 1)

        engine.create_thin(spec, 2)
        assert engine.thin_ids(spec) == {1, 2}
        engine.delete_thin(spec, 1)
        assert engine.thin_ids(spec) == {2}
        with pytest.raises(NotFoundError):
            engine.delete_thin(spec, 1)
        assert engine.pool_status(spec).used_data_blocks == 0  # the blocks went back
    inactive_pool = engine.pool_status(spec)
    assert not inactive_pool.active and inactive_pool.total_data_blocks == 64


def check_snapshot_isolation(engine: Engine, make_spec: SpecFactory) -> None:
    """A snapshot of an active origin keeps the origin's data; later writes to either side
    do not show on the other; a snapshot of a snapshot works the same way."""
    with formatted(engine, make_spec, 64) as spec:
        engine.create_thin(spec, 1)
        origin = _volume(engine, spec, 1, 16)
        write_at(origin, 0, pattern(10))
        write_at(origin, 2 * BLOCK, pattern(12))
        with engine.suspended(spec, 1):  # as the manager does around a live snapshot
            engine.create_snapshot(spec, 2, 1)
        with pytest.raises(ConflictError):
            engine.create_snapshot(spec, 2, 1)
        write_at(origin, 0, pattern(20))  # breaks sharing of block 0 only

        snap = _volume(engine, spec, 2, 16)
        assert read_at(snap, 0, BLOCK) == pattern(10)
        assert read_at(snap, 2 * BLOCK, BLOCK) == pattern(12)
        write_at(snap, 2 * BLOCK, pattern(32))
        write_at(snap, 5 * BLOCK, pattern(35))
        assert read_at(origin, 0, BLOCK) == pattern(20)
        assert read_at(origin, 2 * BLOCK, BLOCK) == pattern(12)
        assert read_at(origin, 5 * BLOCK, BLOCK) == bytes(BLOCK)
        assert read_at(snap, 2 * BLOCK, BLOCK) == pattern(32)

        engine.deactivate_volume(spec, 2)
        engine.create_snapshot(spec, 3, 2)  # inactive origin: no suspension needed
        snap_of_snap = _volume(engine, spec, 3, 16, ro=True)
        assert read_at(snap_of_snap, 0, BLOCK) == pattern(10)
        assert read_at(snap_of_snap, 5 * BLOCK, BLOCK) == pattern(35)
        # shared: 0 (origin's old), 2 (snap's own), 5 (snap's own); origin owns 0 and 2
        assert engine.pool_status(spec).used_data_blocks == 5
        engine.deactivate_volume(spec, 3)
        engine.deactivate_volume(spec, 1)
        assert engine.thin_ids(spec) == {1, 2, 3}
        assert engine.volume_status(spec, 3).mapped_blocks == 3
        with pytest.raises(NotFoundError):
            engine.create_snapshot(spec, 4, 9)


def check_transaction_id_cas(engine: Engine, make_spec: SpecFactory) -> None:
    """set_transaction_id is a compare-and-swap, and the id survives a deactivation."""
    with formatted(engine, make_spec, 16) as spec:
        engine.set_transaction_id(spec, 0, 5)
        with pytest.raises(ConflictError):
            engine.set_transaction_id(spec, 0, 6)
        assert engine.pool_status(spec).transaction_id == 5
        engine.set_transaction_id(spec, 5, 6)
        engine.deactivate_pool(spec)
        assert engine.pool_status(spec).transaction_id == 6
        engine.activate_pool(spec)
        assert engine.pool_status(spec).transaction_id == 6
        with pytest.raises(ConflictError):
            engine.set_transaction_id(spec, 5, 7)


def check_enospc_and_extend(engine: Engine, make_spec: SpecFactory) -> None:
    """With the ``error`` no-space policy a full pool fails the write at once (ENOSPC, or EIO
    from the loop layer); extending the pool makes the same write succeed."""
    with formatted(engine, make_spec, 16) as spec:
        engine.create_thin(spec, 1)
        device = _volume(engine, spec, 1, 64)
        for block in range(16):
            write_at(device, block * BLOCK, pattern(block))
        with pytest.raises(OSError) as failed:
            write_at(device, 16 * BLOCK, pattern(16))
        assert failed.value.errno in (errno.ENOSPC, errno.EIO)
        status = engine.pool_status(spec)
        assert status.used_data_blocks == status.total_data_blocks == 16
        assert status.mode in (PoolMode.OUT_OF_DATA_SPACE, PoolMode.READ_WRITE)
        assert read_at(device, 15 * BLOCK, BLOCK) == pattern(15)  # nothing written is lost

        os.truncate(spec.data, 32 * BLOCK)
        engine.extend_pool(spec, nr_data_blocks=32)
        write_at(device, 16 * BLOCK, pattern(16))
        assert read_at(device, 16 * BLOCK, BLOCK) == pattern(16)
        status = engine.pool_status(spec)
        assert status.mode is PoolMode.READ_WRITE
        assert (status.used_data_blocks, status.total_data_blocks) == (17, 32)
        engine.deactivate_volume(spec, 1)
    assert engine.pool_status(spec).total_data_blocks == 32


def check_metadata_view(engine: Engine, make_spec: SpecFactory) -> None:
    """The view shows the committed metadata of a live pool (mappings of every device), holds
    a metadata snapshot only while it lasts, and releases it when the reader fails."""
    with formatted(engine, make_spec, 64) as spec:
        engine.create_thin(spec, 1)
        origin = _volume(engine, spec, 1, 16)
        for block in (0, 4, 7):
            write_at(origin, block * BLOCK, pattern(block))
        with engine.suspended(spec, 1):
            engine.create_snapshot(spec, 2, 1)
        write_at(origin, 4 * BLOCK, pattern(44))
        write_at(origin, 9 * BLOCK, pattern(9))

        with engine.metadata_view(spec) as view:
            md = ThinMetadata(view.source, snap=view.snap)
            devices = md.devices()
            assert set(devices) == {1, 2}
            mapped = {
                dev: {vblock: data for vblock, data, _time in md.mappings(dev, root)}
                for dev, (_details, root) in devices.items()
            }
            assert sorted(mapped[1]) == [0, 4, 7, 9]
            assert sorted(mapped[2]) == [0, 4, 7]
            assert mapped[1][0] == mapped[2][0] and mapped[1][7] == mapped[2][7]
            assert mapped[1][4] != mapped[2][4]  # the overwrite broke sharing
            assert devices[1][0].mapped_blocks == 4 and devices[2][0].mapped_blocks == 3
            if view.snap:
                assert engine.pool_status(spec).held_metadata_root is not None
        assert engine.pool_status(spec).held_metadata_root is None
        with pytest.raises(RuntimeError), engine.metadata_view(spec):
            raise RuntimeError("the reader failed")
        assert engine.pool_status(spec).held_metadata_root is None
        engine.release_metadata_snapshot(spec)  # nothing held: a no-op
        engine.deactivate_volume(spec, 1)
        with engine.metadata_view(spec) as view:  # no volume active: still readable
            assert set(ThinMetadata(view.source, snap=view.snap).devices()) == {1, 2}


CHECKS: dict[str, Callable[[Engine, SpecFactory], None]] = {
    "thin_lifecycle": check_thin_lifecycle,
    "snapshot_isolation": check_snapshot_isolation,
    "transaction_id_cas": check_transaction_id_cas,
    "enospc_and_extend": check_enospc_and_extend,
    "metadata_view": check_metadata_view,
}
