"""KernelEngine against a real dm-thin in the lab guest (tier ``lab``).

Each test formats its own file-backed pool (loop devices under the hood), drives it only
through ``KernelEngine`` and checks what the kernel really did: data read back with
pread/pwrite (O_DIRECT, so nothing comes from the page cache), status lines, metadata dumps
against ``thin_dump -m``, ENOSPC, and that teardown leaves no dm device and no loop device.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from thinmgr.engine.base import NoSpacePolicy, PoolMode, PoolSpec
from thinmgr.engine.kernel.engine import KernelEngine, pool_uuid
from thinmgr.errors import BusyError, ConflictError, NotFoundError, ThinmgrError
from thinmgr.kernel.dm import DMControl

pytestmark = pytest.mark.lab

BLOCK_SECTORS = 128
BLOCK = BLOCK_SECTORS * 512  # 64 KiB
META_SIZE = 4 << 20
TEST_TIMEOUT = 120  # seconds per test; a passing one takes a few under TCG
TOOL_TIMEOUT = 60


def _spec(tmp_path: Path, *, nr_blocks: int, no_space: NoSpacePolicy) -> PoolSpec:
    metadata, data = tmp_path / "meta", tmp_path / "data"
    with open(metadata, "wb") as f:
        f.truncate(META_SIZE)
    with open(data, "wb") as f:
        f.truncate(nr_blocks * BLOCK)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    name = f"t{os.getpid()}-{tmp_path.name[-24:]}"
    return PoolSpec(name, metadata, data, run_dir, BLOCK_SECTORS, 0, no_space)


@pytest.fixture(autouse=True)
def _bounded_time() -> Iterator[None]:
    """Fail a test that runs away instead of letting it eat the whole guest's time limit
    (SIGALRM interrupts Python code and interruptible waits; the guest timeout remains the
    last resort for a task stuck in the kernel)."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"lab test still running after {TEST_TIMEOUT} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _metadata_device(engine: KernelEngine, spec: PoolSpec) -> str:
    """The metadata device in the active pool's table (the loop device over spec.metadata)."""
    info = engine.dm.info(uuid=pool_uuid(spec))
    params = engine.dm.table(info.name)[0].params.split()
    target = os.readlink(f"/sys/dev/block/{params[0]}")
    return f"/dev/{os.path.basename(target)}"


def _our_devices(dm: DMControl, spec: PoolSpec) -> list[str]:
    names = []
    for listed in dm.list_devices():
        info = dm.find(listed.name)
        if info is not None and spec.name in info.uuid:
            names.append(listed.name)
    return names


def _bound_loops(*backing: Path) -> list[str]:
    out = subprocess.run(
        ["losetup", "-a"], capture_output=True, text=True, check=False, timeout=TOOL_TIMEOUT
    ).stdout
    return [line for line in out.splitlines() if any(str(b) in line for b in backing)]


@contextlib.contextmanager
def _pool(
    tmp_path: Path, *, nr_blocks: int = 256, no_space: NoSpacePolicy = NoSpacePolicy.ERROR
) -> Iterator[tuple[KernelEngine, PoolSpec]]:
    engine = KernelEngine()
    spec = _spec(tmp_path, nr_blocks=nr_blocks, no_space=no_space)
    engine.format_pool(spec, nr_data_blocks=nr_blocks)
    engine.activate_pool(spec)
    try:
        yield engine, spec
    finally:
        # tear down what the test left, then prove nothing is left
        for name in _our_devices(engine.dm, spec):
            if not name.endswith("-tpool"):
                with contextlib.suppress(ThinmgrError):
                    engine.dm.remove(name)
        with contextlib.suppress(ThinmgrError):
            engine.deactivate_pool(spec)
        left = _our_devices(engine.dm, spec)
        engine.close()
        assert left == [], f"dm devices left behind: {left}"
        assert _bound_loops(spec.metadata, spec.data) == []


def _aligned(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, max(len(data), mmap.PAGESIZE))
    buf[: len(data)] = data
    return buf


def _write(device: Path, offset: int, data: bytes) -> None:
    fd = os.open(device, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
    try:
        buf = _aligned(data)
        assert os.pwrite(fd, memoryview(buf)[: len(data)], offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(device: Path, offset: int, length: int) -> bytes:
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        buf = mmap.mmap(-1, max(length, mmap.PAGESIZE))
        got = os.preadv(fd, [memoryview(buf)[:length]], offset)
        assert got == length
        return bytes(buf[:length])
    finally:
        os.close(fd)


def _pattern(tag: int, length: int = BLOCK) -> bytes:
    return bytes([tag]) * length


def test_available_in_the_lab() -> None:
    verdict = KernelEngine.available()
    assert verdict, verdict.reason
    assert "thin-pool" in verdict.reason


def test_format_activate_status(tmp_path: Path) -> None:
    with _pool(tmp_path) as (engine, spec):
        status = engine.pool_status(spec)
        assert status.active and status.mode is PoolMode.READ_WRITE
        assert status.transaction_id == 0
        assert (status.used_data_blocks, status.total_data_blocks) == (0, 256)
        assert status.data_block_sectors == BLOCK_SECTORS
        assert status.held_metadata_root is None and not status.needs_check
        engine.activate_pool(spec)  # idempotent
        engine.set_transaction_id(spec, 0, 5)
        with pytest.raises(ConflictError):
            engine.set_transaction_id(spec, 0, 6)
        engine.deactivate_pool(spec)
        inactive = engine.pool_status(spec)
        assert not inactive.active
        assert inactive.transaction_id == 5 and inactive.total_data_blocks == 256
        engine.activate_pool(spec)
        assert engine.pool_status(spec).transaction_id == 5


def test_thin_volumes_and_snapshot_of_active_origin(tmp_path: Path) -> None:
    with _pool(tmp_path) as (engine, spec):
        engine.create_thin(spec, 0)
        with pytest.raises(ConflictError):
            engine.create_thin(spec, 0)
        origin = engine.activate_volume(
            spec, 0, name=f"{spec.name}-v0", size_bytes=8 << 20, read_only=False
        )
        assert origin == Path("/dev/mapper") / f"thinmgr-{spec.name}-{spec.name}-v0"
        assert origin.is_block_device()
        _write(origin, 0, _pattern(1))
        _write(origin, 5 * BLOCK, _pattern(2))
        status = engine.volume_status(spec, 0)
        assert status.active and status.mapped_blocks == 2 and status.highest_mapped_block == 5
        # snapshot of the active origin: the engine suspends it around the message
        engine.create_snapshot(spec, 1, 0)
        _write(origin, 0, _pattern(3))
        snap = engine.activate_volume(
            spec, 1, name=f"{spec.name}-v1", size_bytes=8 << 20, read_only=True
        )
        assert _read(snap, 0, BLOCK) == _pattern(1)
        assert _read(snap, 5 * BLOCK, BLOCK) == _pattern(2)
        assert _read(origin, 0, BLOCK) == _pattern(3)
        assert engine.thin_ids(spec) == {0, 1}
        with pytest.raises(BusyError):
            engine.delete_thin(spec, 1)
        # open volumes refuse a plain deactivation
        fd = os.open(snap, os.O_RDONLY)
        try:
            with pytest.raises(BusyError):
                engine.deactivate_volume(spec, 1)
        finally:
            os.close(fd)
        engine.deactivate_volume(spec, 1)
        assert not snap.exists()
        inactive = engine.volume_status(spec, 1)
        assert not inactive.active and inactive.mapped_blocks == 2
        assert inactive.highest_mapped_block == 5
        engine.delete_thin(spec, 1)
        assert engine.thin_ids(spec) == {0}
        with pytest.raises(NotFoundError):
            engine.delete_thin(spec, 1)
        with pytest.raises(BusyError):
            engine.deactivate_pool(spec)
        engine.deactivate_volume(spec, 0)
        engine.deactivate_volume(spec, 0)  # idempotent


def test_missing_thin_device_leaves_nothing(tmp_path: Path) -> None:
    with _pool(tmp_path) as (engine, spec):
        with pytest.raises(NotFoundError):
            engine.activate_volume(
                spec, 7, name=f"{spec.name}-v7", size_bytes=1 << 20, read_only=False
            )
        assert _our_devices(engine.dm, spec) == [f"thinmgr-{spec.name}-tpool"]
        with pytest.raises(NotFoundError):
            engine.create_snapshot(spec, 2, 9)


def test_metadata_snapshot_dump_matches_thin_dump(tmp_path: Path) -> None:
    with _pool(tmp_path) as (engine, spec):
        engine.create_thin(spec, 0)
        vol = engine.activate_volume(
            spec, 0, name=f"{spec.name}-v0", size_bytes=4 << 20, read_only=False
        )
        for i in range(0, 40, 3):
            _write(vol, i * BLOCK, _pattern(i + 1))
        engine.create_snapshot(spec, 1, 0)
        _write(vol, BLOCK, _pattern(99))
        with engine.metadata_view(spec) as view:
            assert view.snap
            held = engine.pool_status(spec).held_metadata_root
            assert held is not None
            ours = subprocess.run(
                [sys.executable, "-m", "thinmgr", "metadata", "dump", "-m", str(spec.metadata)],
                capture_output=True,
                text=True,
                check=True,
                timeout=TOOL_TIMEOUT,
            ).stdout
            # thin_dump 0.9.0 opens with O_DIRECT, which the guest's overlayfs-on-tmpfs
            # refuses (EINVAL) for the file itself: read the device the pool really uses.
            theirs = subprocess.run(
                ["thin_dump", "-m", _metadata_device(engine, spec)],
                capture_output=True,
                text=True,
                check=True,
                timeout=TOOL_TIMEOUT,
            ).stdout
            assert ours == theirs
            assert theirs.count("<device ") == 2
        assert engine.pool_status(spec).held_metadata_root is None  # always released
        with pytest.raises(RuntimeError), engine.metadata_view(spec):
            raise RuntimeError("the reader failed")
        assert engine.pool_status(spec).held_metadata_root is None
        engine.deactivate_volume(spec, 0)


def test_extend_pool(tmp_path: Path) -> None:
    with _pool(tmp_path, nr_blocks=64) as (engine, spec):
        with open(spec.data, "r+b") as f:
            f.truncate(128 * BLOCK)
        engine.extend_pool(spec, nr_data_blocks=128)
        assert engine.pool_status(spec).total_data_blocks == 128
        engine.deactivate_pool(spec)
        engine.activate_pool(spec)
        assert engine.pool_status(spec).total_data_blocks == 128


def test_enospc_with_error_if_no_space_then_extend(tmp_path: Path) -> None:
    with _pool(tmp_path, nr_blocks=16) as (engine, spec):
        engine.create_thin(spec, 0)
        vol = engine.activate_volume(
            spec, 0, name=f"{spec.name}-v0", size_bytes=64 * BLOCK, read_only=False
        )
        for i in range(16):
            _write(vol, i * BLOCK, _pattern(i + 1))
        with pytest.raises(OSError) as failed:
            _write(vol, 16 * BLOCK, _pattern(17))
        assert failed.value.errno in (errno.ENOSPC, errno.EIO)
        status = engine.pool_status(spec)
        assert status.mode is PoolMode.OUT_OF_DATA_SPACE
        assert status.used_data_blocks == status.total_data_blocks == 16
        with open(spec.data, "r+b") as f:
            f.truncate(32 * BLOCK)
        engine.extend_pool(spec, nr_data_blocks=32)
        _write(vol, 16 * BLOCK, _pattern(17))
        assert _read(vol, 16 * BLOCK, BLOCK) == _pattern(17)
        status = engine.pool_status(spec)
        assert status.mode is PoolMode.READ_WRITE and status.used_data_blocks == 17
        engine.deactivate_volume(spec, 0)


def test_resize_and_force_deactivate(tmp_path: Path) -> None:
    with _pool(tmp_path) as (engine, spec):
        engine.create_thin(spec, 0)
        vol = engine.activate_volume(
            spec, 0, name=f"{spec.name}-v0", size_bytes=1 << 20, read_only=False
        )
        engine.resize_volume(spec, 0, size_bytes=2 << 20)
        fd = os.open(vol, os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_END) == 2 << 20
            engine.deactivate_volume(spec, 0, force=True)  # deferred: goes when fd closes
        finally:
            os.close(fd)
        assert engine.dm.find(uuid=pool_uuid(spec)) is not None
        assert not any(n.endswith("-v0") for n in _our_devices(engine.dm, spec))
