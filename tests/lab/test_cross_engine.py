"""One pool, two engines: what the user engine writes the kernel reads, and back (tier ``lab``).

The user engine is used in-process (``UserPool`` and ``ThinVolume.write``), the kernel engine
through ``KernelEngine``. Each device's expected contents are kept as an in-memory image and
compared whole. ``thin_check`` runs at every hand-over, on a read-only loop device over the
metadata file (thin_check 0.9.0 opens its input O_DIRECT, which the guest's overlayfs-on-tmpfs
root refuses for the file itself).

Also here: ``thinmgr metadata delta`` on a kernel metadata snapshot against ``thin_delta -m``.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.conformance import BLOCK, BLOCK_SECTORS, META_SIZE, read_at, write_at
from thinmgr.engine.base import PoolSpec
from thinmgr.engine.kernel.engine import KernelEngine, pool_uuid
from thinmgr.engine.user.pool import UserPool

pytestmark = pytest.mark.lab

VOLUME_BLOCKS = 24
VOLUME_BYTES = VOLUME_BLOCKS * BLOCK
NR_DATA_BLOCKS = 256
TOOL_TIMEOUT = 60
CHUNK = 4096  # writes are 4 KiB-aligned: the kernel side uses O_DIRECT


def run(*args: str | Path) -> str:
    proc = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, check=False, timeout=TOOL_TIMEOUT
    )
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}): {proc.stderr}{proc.stdout}"
    return proc.stdout


@contextlib.contextmanager
def loop_of(path: Path) -> Iterator[str]:
    device = run("losetup", "-f", "--show", "-r", path).strip()
    try:
        yield device
    finally:
        run("losetup", "-d", device)


def thin_check(metadata: Path) -> None:
    with loop_of(metadata) as device:
        run("thin_check", device)


def make_spec(tmp_path: Path, name: str) -> PoolSpec:
    metadata, data, run_dir = tmp_path / "meta", tmp_path / "data", tmp_path / "run"
    with open(metadata, "wb") as f:
        f.truncate(META_SIZE)
    with open(data, "wb") as f:
        f.truncate(NR_DATA_BLOCKS * BLOCK)
    run_dir.mkdir()
    return PoolSpec(f"{name}{os.getpid()}", metadata, data, run_dir, BLOCK_SECTORS)


class Images:
    """What each thin device should hold, and random 4 KiB-aligned writes to apply to it."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.devices: dict[int, bytearray] = {}

    def new(self, dev: int) -> None:
        self.devices[dev] = bytearray(VOLUME_BYTES)

    def snapshot(self, dev: int, origin: int) -> None:
        self.devices[dev] = bytearray(self.devices[origin])

    def writes(self, dev: int, count: int) -> list[tuple[int, bytes]]:
        """``count`` random writes (1-20 KiB each, some across block edges), applied to the
        image; the caller applies them to the device."""
        done = []
        for _ in range(count):
            length = self.rng.randrange(1, 6) * CHUNK
            offset = self.rng.randrange(0, (VOLUME_BYTES - length) // CHUNK + 1) * CHUNK
            data = self.rng.randbytes(length)
            self.devices[dev][offset : offset + length] = data
            done.append((offset, data))
        return done


def user_write(pool: UserPool, images: Images, dev: int, count: int) -> None:
    with pool.volume(dev, VOLUME_BYTES) as volume:
        for offset, data in images.writes(dev, count):
            volume.write(offset, data)
        volume.flush()


def user_verify(pool: UserPool, images: Images) -> None:
    for dev, image in images.devices.items():
        with pool.volume(dev, VOLUME_BYTES, read_only=True) as volume:
            assert volume.read(0, VOLUME_BYTES) == image, f"device {dev} differs (user engine)"


def kernel_volume(engine: KernelEngine, spec: PoolSpec, dev: int, *, ro: bool = False) -> Path:
    return engine.activate_volume(
        spec, dev, name=f"{spec.name}-v{dev}", size_bytes=VOLUME_BYTES, read_only=ro
    )


def kernel_verify(engine: KernelEngine, spec: PoolSpec, images: Images) -> None:
    for dev, image in images.devices.items():
        device = kernel_volume(engine, spec, dev, ro=True)
        try:
            assert read_at(device, 0, VOLUME_BYTES) == image, f"device {dev} differs (kernel)"
        finally:
            engine.deactivate_volume(spec, dev)


def kernel_write(engine: KernelEngine, spec: PoolSpec, images: Images, dev: int, n: int) -> None:
    device = kernel_volume(engine, spec, dev)
    try:
        for offset, data in images.writes(dev, n):
            write_at(device, offset, data)
    finally:
        engine.deactivate_volume(spec, dev)


@contextlib.contextmanager
def kernel(spec: PoolSpec) -> Iterator[KernelEngine]:
    """The kernel engine with the pool active; always deactivated, devices removed."""
    engine = KernelEngine()
    try:
        engine.activate_pool(spec)
        try:
            yield engine
        finally:
            for dev in range(8):
                with contextlib.suppress(Exception):
                    engine.deactivate_volume(spec, dev, force=True)
            engine.deactivate_pool(spec)
        assert engine.dm.find(uuid=pool_uuid(spec)) is None
    finally:
        engine.close()


def test_user_pool_activated_by_the_kernel(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, "xu")
    images = Images(seed=1)
    with UserPool.create(spec.metadata, spec.data, data_block_sectors=BLOCK_SECTORS) as pool:
        pool.create_thin(0)
        images.new(0)
        user_write(pool, images, 0, 30)
        pool.create_snap(1, 0)
        images.snapshot(1, 0)
        user_write(pool, images, 0, 10)  # breaks sharing with the snapshot
        user_write(pool, images, 1, 10)
        pool.create_thin(2)
        images.new(2)
        user_write(pool, images, 2, 5)
        pool.set_transaction_id(0, 3)
    thin_check(spec.metadata)

    with kernel(spec) as engine:
        assert engine.pool_status(spec).transaction_id == 3
        assert engine.thin_ids(spec) == {0, 1, 2}
        kernel_verify(engine, spec, images)
    thin_check(spec.metadata)


def test_kernel_pool_continued_by_the_user_engine(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, "xk")
    images = Images(seed=2)
    engine = KernelEngine()
    try:
        engine.format_pool(spec, nr_data_blocks=NR_DATA_BLOCKS)
    finally:
        engine.close()
    with kernel(spec) as engine:
        engine.create_thin(spec, 0)
        images.new(0)
        kernel_write(engine, spec, images, 0, 20)
        engine.create_snapshot(spec, 1, 0)
        images.snapshot(1, 0)
        kernel_write(engine, spec, images, 0, 8)
    thin_check(spec.metadata)

    with UserPool.open(spec.metadata, spec.data) as pool:
        user_verify(pool, images)
        user_write(pool, images, 0, 8)  # new data on a kernel-written device
        pool.create_snap(2, 0)
        images.snapshot(2, 0)
        user_write(pool, images, 2, 6)
        user_write(pool, images, 1, 6)
        pool.delete(1)
        del images.devices[1]
    thin_check(spec.metadata)

    with kernel(spec) as engine:
        assert engine.thin_ids(spec) == {0, 2}
        kernel_verify(engine, spec, images)
        kernel_write(engine, spec, images, 2, 4)  # the kernel keeps writing after the user
        kernel_verify(engine, spec, images)
    thin_check(spec.metadata)


def _metadata_device(engine: KernelEngine, spec: PoolSpec) -> str:
    """The loop device in the active pool's table (tests/lab/test_kernel_engine.py)."""
    info = engine.dm.info(uuid=pool_uuid(spec))
    params = engine.dm.table(info.name)[0].params.split()
    target = os.readlink(f"/sys/dev/block/{params[0]}")
    return f"/dev/{os.path.basename(target)}"


def test_metadata_delta_on_a_kernel_metadata_snapshot(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, "xd")
    images = Images(seed=3)
    engine = KernelEngine()
    try:
        engine.format_pool(spec, nr_data_blocks=NR_DATA_BLOCKS)
    finally:
        engine.close()
    with kernel(spec) as engine:
        engine.create_thin(spec, 0)
        images.new(0)
        kernel_write(engine, spec, images, 0, 25)
        engine.create_snapshot(spec, 1, 0)
        images.snapshot(1, 0)
        kernel_write(engine, spec, images, 0, 6)  # changes on the origin...
        kernel_write(engine, spec, images, 1, 6)  # ...and on the snapshot
        pool_name = engine.dm.info(uuid=pool_uuid(spec)).name
        # held by hand, as an outside tool would: `dmsetup message POOL 0 reserve_metadata_snap`
        engine.dm.message(pool_name, "reserve_metadata_snap")
        try:
            assert engine.pool_status(spec).held_metadata_root is not None
            device = _metadata_device(engine, spec)
            for verbose in ([], ["--verbose"]):
                ours = run(
                    sys.executable, "-m", "thinmgr", "metadata", "delta", "--metadata-snap",
                    "--snap1", "0", "--snap2", "1", *verbose, spec.metadata,
                )  # fmt: skip
                theirs = run("thin_delta", "-m", "--snap1", "0", "--snap2", "1", *verbose, device)
                assert ours == theirs
                assert "<different " in theirs or "<diff " in theirs
        finally:
            engine.release_metadata_snapshot(spec)
        assert engine.pool_status(spec).held_metadata_root is None
