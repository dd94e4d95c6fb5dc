"""Real dm-thin in the kernel lab: the kernel and thinmgr share one on-disk format.

1. Metadata written by the kernel (thin device, writes, snapshot, held metadata snapshot):
   `thinmgr metadata dump -m` is byte-identical to `thin_dump -m`, and after deactivation the
   whole metadata dumps identically and checks clean with both tools.
2. Metadata written by `thinmgr metadata restore` is activated by the kernel as a pool: its
   transaction id and used data blocks are the XML's, and every thin device reads back the data
   blocks its mappings name.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab.dm import SECTOR, devnum, dm_devnum, message, pool_status, sh, stack
from tests.support.xmlgen import Device, Pool

pytestmark = pytest.mark.lab

BLOCK_SECTORS = 128  # 64 KiB data blocks
BLOCK = BLOCK_SECTORS * SECTOR
DATA_BLOCKS = 1024  # 64 MiB data device (sparse on the guest's tmpfs overlay)
META_SIZE = 8 << 20


def thinmgr(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(
        [sys.executable, "-m", "thinmgr", *map(str, args)], capture_output=True, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"thinmgr {args} exit {proc.returncode}: {proc.stderr.decode()}")
    return proc


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def pool_table(meta_dev: str, data_dev: str) -> str:
    return (
        f"0 {DATA_BLOCKS * BLOCK_SECTORS} thin-pool {devnum(meta_dev)} {devnum(data_dev)} "
        f"{BLOCK_SECTORS} 0"
    )


def dd_write(device: str, first_block: int, blocks: int) -> None:
    sh(
        "dd", "if=/dev/urandom", f"of={device}", f"bs={BLOCK}", f"seek={first_block}",
        f"count={blocks}", "conv=fsync,notrunc", "status=none",
    )  # fmt: skip


def test_kernel_metadata_dumps_identically(tmp_path: Path) -> None:
    meta = sparse_file(tmp_path / "meta", META_SIZE)
    data = sparse_file(tmp_path / "data", DATA_BLOCKS * BLOCK)
    with stack() as devices:
        meta_dev = devices.loop(meta)
        data_dev = devices.loop(data)
        devices.dm_create("lpool", pool_table(meta_dev, data_dev))
        pool = dm_devnum("lpool")
        message("lpool", "create_thin 0")
        thin = devices.dm_create("lthin0", f"0 {256 * BLOCK_SECTORS} thin {pool} 0")
        dd_write(thin, 0, 12)
        dd_write(thin, 100, 3)
        # A snapshot of an active origin: suspend it first (dm-thin's rule).
        sh("dmsetup", "suspend", "lthin0")
        message("lpool", "create_snap 1 0")
        sh("dmsetup", "resume", "lthin0")
        dd_write(thin, 4, 2)  # breaks sharing: the origin gets new data blocks
        message("lpool", "create_thin 2")
        message("lpool", "reserve_metadata_snap")
        held = pool_status("lpool")[3]
        assert held != "-", f"no held metadata root in the pool status: {held}"

        oracle = subprocess.run(["thin_dump", "-m", meta_dev], capture_output=True, check=True)
        ours = thinmgr("metadata", "dump", "-m", meta_dev)
        assert ours.stdout == oracle.stdout
        assert oracle.stdout.count(b"<device ") == 3

        message("lpool", "release_metadata_snap")
        devices.dm_remove("lthin0")
        devices.dm_remove("lpool")

        live = subprocess.run(["thin_dump", meta_dev], capture_output=True, check=True).stdout
        assert thinmgr("metadata", "dump", meta_dev).stdout == live
        assert b'data_block="' in live or b"data_begin=" in live
        sh("thin_check", "-q", meta_dev)
        assert thinmgr("metadata", "check", "-q", meta_dev, check=False).returncode == 0


def block_pattern(data_block: int) -> bytes:
    """Distinct, recognisable contents for each data block."""
    return struct.pack("<QQ", 0x7468696E6D677221, data_block) * (BLOCK // 16)


def test_restored_metadata_activates_in_kernel(tmp_path: Path) -> None:
    origin = Device(0, transaction=1, runs=[(0, 10, 16, 0), (40, 2, 1, 0), (200, 300, 8, 1)])
    # The snapshot shares data blocks 10..25 with its origin, and has blocks of its own.
    snap = Device(1, transaction=1, creation_time=1, snap_time=1,
                  runs=[(0, 10, 16, 0), (16, 600, 4, 1)])  # fmt: skip
    spec = Pool([origin, snap], nr_data_blocks=DATA_BLOCKS, time=2, transaction=5)
    xml = tmp_path / "pool.xml"
    xml.write_text(spec.xml())
    meta = tmp_path / "meta"
    thinmgr("metadata", "restore", "-i", xml, "-o", meta, "--size", str(META_SIZE))
    data = sparse_file(tmp_path / "data", DATA_BLOCKS * BLOCK)
    used = sorted({b + i for d in spec.devices for _, b, n, _ in d.runs for i in range(n)})
    with open(data, "r+b") as f:
        for block in used:
            f.seek(block * BLOCK)
            f.write(block_pattern(block))

    with stack() as devices:
        meta_dev = devices.loop(meta)
        data_dev = devices.loop(data)
        devices.dm_create("rpool", pool_table(meta_dev, data_dev))
        status = pool_status("rpool")
        assert status[0] == "5", f"transaction id: {status}"
        assert status[2] == f"{len(used)}/{DATA_BLOCKS}", f"used data blocks: {status}"
        pool = dm_devnum("rpool")
        for device in spec.devices:
            name = f"rthin{device.dev_id}"
            path = devices.dm_create(name, f"0 {512 * BLOCK_SECTORS} thin {pool} {device.dev_id}")
            with open(path, "rb") as thin:
                for virt, data_block, length, _ in device.runs:
                    thin.seek(virt * BLOCK)
                    for i in range(length):
                        assert thin.read(BLOCK) == block_pattern(data_block + i), (
                            f"device {device.dev_id} block {virt + i}"
                        )
                thin.seek(50 * BLOCK)  # unmapped: reads as zeros
                assert thin.read(BLOCK) == bytes(BLOCK)
            devices.dm_remove(name)
        devices.dm_remove("rpool")
        sh("thin_check", "-q", meta_dev)
    assert thinmgr("metadata", "check", "-q", meta, check=False).returncode == 0
