"""The user engine's pool and data path (thinmgr.engine.user.pool / volume), in-process.

Every scenario ends in ``verify``: thin_check 0.9.0 passes on the metadata file, thin_dump
shows exactly the mappings the pool reports, and every block read through a volume equals
the data file at the mapped block (zeros where unmapped).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tests.support.txn_oracle import dump_model, thin_check, thin_dump
from thinmgr.engine.base import PoolMode
from thinmgr.engine.user.backend import BlockBackend
from thinmgr.engine.user.pool import OutOfDataSpaceError, UserPool
from thinmgr.engine.user.store import FileBlockStore
from thinmgr.errors import (
    BusyError,
    ConflictError,
    NoSpaceError,
    NotFoundError,
    PermissionDenied,
    UsageError,
)
from thinmgr.format.constants import NEEDS_CHECK_FLAG
from thinmgr.format.metadata import ThinMetadata
from thinmgr.format.superblock import parse_superblock

BB = 64 * 1024  # 128-sector data blocks
META_BYTES = 4 << 20


def make_files(tmp: Path, data_blocks: int, *, bb: int = BB) -> tuple[Path, Path]:
    meta, data = tmp / "meta", tmp / "data"
    with open(meta, "wb") as f:
        f.truncate(META_BYTES)
    with open(data, "wb") as f:
        f.truncate(data_blocks * bb)
    return meta, data


def new_pool(tmp: Path, data_blocks: int = 256) -> UserPool:
    meta, data = make_files(tmp, data_blocks)
    return UserPool.create(meta, data)


def verify(pool: UserPool, meta: Path, data: Path, sizes: dict[int, int] | None = None) -> None:
    """Commit, then hold the pool to the oracle (see the module docstring)."""
    pool.commit()
    thin_check(meta)
    reported = {dev: pool.mappings(dev) for dev in pool.thin_ids()}
    assert dump_model(thin_dump(meta)) == reported
    bb = pool.block_bytes
    with open(data, "rb") as f:
        raw = f.read()
    for dev, mappings in reported.items():
        size = (sizes or {}).get(dev) or (max(mappings, default=0) + 1) * bb
        with pool.volume(dev, size, read_only=True) as volume:
            for vblock in range(size // bb):
                got = volume.read(vblock * bb, bb)
                if vblock in mappings:
                    db = mappings[vblock]
                    assert got == raw[db * bb : (db + 1) * bb], (dev, vblock)
                else:
                    assert got == bytes(bb), (dev, vblock)


def pattern(length: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(length % 251 or 1)) * (
        length // (length % 251 or 1)
    ) + bytes(length % (length % 251 or 1))


def test_create_validates_block_size_and_reopen_refuses_another(tmp_path: Path) -> None:
    meta, data = make_files(tmp_path, 64)
    for bad in (64, 100, 192, 4194304):
        with pytest.raises(UsageError):
            UserPool.create(meta, data, data_block_sectors=bad)
    with UserPool.create(meta, data, data_block_sectors=256) as pool:
        assert pool.nr_data_blocks == 32  # 4 MiB data file / 128 KiB
        assert pool.status().total_metadata_blocks == META_BYTES // 4096
    with pytest.raises(UsageError, match="changing the data block size"):
        UserPool.open(meta, data, data_block_sectors=128)
    with UserPool.open(meta, data, data_block_sectors=256) as pool:
        assert pool.status().data_block_sectors == 256
    with pytest.raises(NotFoundError):
        UserPool.open(tmp_path / "nope", data)


def test_open_refuses_needs_check(tmp_path: Path) -> None:
    meta, data = make_files(tmp_path, 64)
    UserPool.create(meta, data).close()
    # What dm_pool_metadata_set_needs_check leaves behind (format section 8).
    sb = parse_superblock(meta.read_bytes()[:4096], 0)
    with open(meta, "r+b") as f:
        f.write(bytes(replace(sb, flags=sb.flags | NEEDS_CHECK_FLAG).pack()))
    with pytest.raises(UsageError, match="NEEDS_CHECK"):
        UserPool.open(meta, data)


def test_reads_writes_across_blocks_and_partial_zeroing(tmp_path: Path) -> None:
    meta, data = make_files(tmp_path, 64)
    # Stale bytes in the data file must never show through a newly provisioned block.
    with open(data, "r+b") as f:
        f.write(b"\xee" * (64 * BB))
    pool = UserPool.create(meta, data)
    pool.create_thin(1)
    volume = pool.volume(1, 16 * BB)
    assert isinstance(volume, BlockBackend)
    assert volume.read(0, 16 * BB) == bytes(16 * BB)
    payload = pattern(3 * BB, 1)
    volume.write(BB // 2, payload)  # half of block 0, all of 1 and 2, half of 3
    expect = bytearray(16 * BB)
    expect[BB // 2 : BB // 2 + 3 * BB] = payload
    assert volume.read(0, 16 * BB) == expect
    assert sorted(pool.mappings(1)) == [0, 1, 2, 3]
    volume.write(5 * BB + 10, b"xyz")  # a small write into a fresh block
    expect[5 * BB + 10 : 5 * BB + 13] = b"xyz"
    assert volume.read(5 * BB, BB) == expect[5 * BB : 6 * BB]
    volume.write(BB - 2, b"abcd")  # in place, across a boundary
    expect[BB - 2 : BB + 2] = b"abcd"
    assert volume.read(0, 16 * BB) == expect
    assert pool.thin_status(1) == (5, 5)
    volume.close()
    verify(pool, meta, data, {1: 16 * BB})
    pool.close()
    with UserPool.open(meta, data) as pool, pool.volume(1, 16 * BB) as volume:
        assert volume.read(0, 16 * BB) == expect


def test_snapshot_breaks_sharing_and_keeps_both_views(tmp_path: Path) -> None:
    meta, data = make_files(tmp_path, 64)
    pool = UserPool.create(meta, data)
    pool.create_thin(1)
    origin = pool.volume(1, 8 * BB)
    base = pattern(8 * BB, 3)
    origin.write(0, base)
    pool.create_snap(2, 1)
    pool.create_snap(3, 2)  # a snapshot of a snapshot
    snap = pool.volume(2, 8 * BB)
    used = pool.status().used_data_blocks
    origin.write(10, b"origin")  # partial: copy then write, in a new block
    snap.write(BB, pattern(BB, 9))  # whole block: no copy
    assert pool.status().used_data_blocks == used + 2
    want_origin = bytearray(base)
    want_origin[10:16] = b"origin"
    want_snap = bytearray(base)
    want_snap[BB : 2 * BB] = pattern(BB, 9)
    assert origin.read(0, 8 * BB) == want_origin
    assert snap.read(0, 8 * BB) == want_snap
    with pool.volume(3, 8 * BB) as grandchild:
        assert grandchild.read(0, 8 * BB) == base
    # A second write to the now private block goes in place (section 5.3).
    before = pool.mappings(1)[0]
    origin.write(20, b"again")
    assert pool.mappings(1)[0] == before
    origin.close()
    snap.close()
    verify(pool, meta, data, {1: 8 * BB, 2: 8 * BB, 3: 8 * BB})
    with pytest.raises(BusyError), pool.volume(3, BB):
        pool.delete(3)
    pool.delete(3)
    pool.delete(2)
    verify(pool, meta, data)
    with pytest.raises(ConflictError):
        pool.create_thin(1)
    with pytest.raises(NotFoundError):
        pool.volume(9, BB)
    pool.close()


def test_discard_unmaps_whole_blocks_and_zeroes_partial_ones(tmp_path: Path) -> None:
    meta, data = make_files(tmp_path, 64)
    pool = UserPool.create(meta, data)
    pool.create_thin(1)
    volume = pool.volume(1, 8 * BB)
    volume.write(0, b"\x55" * (6 * BB))
    pool.create_snap(2, 1)
    volume.discard(BB // 2, 3 * BB)  # half of 0 zeroed (shared: copied), 1-2 unmapped
    assert sorted(pool.mappings(1)) == [0, 3, 4, 5]
    want = bytearray(b"\x55" * (6 * BB) + bytes(2 * BB))
    want[BB // 2 : BB // 2 + 3 * BB] = bytes(3 * BB)
    assert volume.read(0, 8 * BB) == want
    with pool.volume(2, 8 * BB) as snap:
        assert snap.read(0, 6 * BB) == b"\x55" * (6 * BB)  # the snapshot is untouched
    pool.delete(2)
    used = pool.status().used_data_blocks
    volume.discard(0, 8 * BB)
    assert pool.mappings(1) == {}
    assert volume.read(0, 8 * BB) == bytes(8 * BB)
    pool.commit()
    assert pool.status().used_data_blocks == used - 4
    volume.close()
    verify(pool, meta, data, {1: 8 * BB})
    pool.close()


def test_read_only_volume_refuses_writes(tmp_path: Path) -> None:
    pool = new_pool(tmp_path)
    pool.create_thin(0)
    with pool.volume(0, BB, read_only=True) as volume:
        with pytest.raises(PermissionDenied, match="EROFS"):
            volume.write(0, b"x")
        with pytest.raises(PermissionDenied):
            volume.discard(0, BB)
        with pytest.raises(UsageError):
            volume.read(BB - 1, 2)
    pool.close()


def test_out_of_data_space_then_extend(tmp_path: Path) -> None:
    meta, data = make_files(tmp_path, 4)
    pool = UserPool.create(meta, data)
    pool.create_thin(1)
    volume = pool.volume(1, 16 * BB)
    volume.write(0, b"\x01" * (3 * BB))
    with pytest.raises(NoSpaceError, match="ENOSPC") as caught:
        volume.write(3 * BB, b"\x02" * (2 * BB))  # block 3 fits, block 4 does not
    assert isinstance(caught.value, OutOfDataSpaceError)
    assert pool.status().mode is PoolMode.OUT_OF_DATA_SPACE
    assert sorted(pool.mappings(1)) == [0, 1, 2, 3]
    assert volume.read(3 * BB, BB) == b"\x02" * BB  # the block that fit was written
    volume.write(0, b"\x03" * BB)  # in place: no allocation needed, still works
    assert volume.read(0, 4 * BB) == b"\x03" * BB + b"\x01" * (2 * BB) + b"\x02" * BB
    verify(pool, meta, data, {1: 16 * BB})
    with open(data, "r+b") as f:
        f.truncate(8 * BB)
    pool.extend_data(8)
    assert pool.status().mode is PoolMode.READ_WRITE
    volume.write(4 * BB, b"\x04" * (4 * BB))
    assert pool.status().used_data_blocks == 8
    with pytest.raises(UsageError):
        pool.extend_data(16)  # the file is not that big
    with pytest.raises(UsageError):
        pool.extend_data(2)
    volume.close()
    verify(pool, meta, data, {1: 16 * BB})
    pool.close()


def test_freed_blocks_are_reused_after_commit_when_full(tmp_path: Path) -> None:
    meta, data = make_files(tmp_path, 4)
    pool = UserPool.create(meta, data)
    pool.create_thin(1)
    with pool.volume(1, 8 * BB) as volume:
        volume.write(0, b"\x01" * (4 * BB))
        volume.discard(0, 2 * BB)  # freed in this transaction: not reusable yet...
        volume.write(4 * BB, b"\x02" * (2 * BB))  # ...so the pool commits and retries
        assert pool.status().mode is PoolMode.READ_WRITE
        assert volume.read(4 * BB, 2 * BB) == b"\x02" * (2 * BB)
    verify(pool, meta, data, {1: 8 * BB})
    pool.close()


def test_messages_are_durable_and_status_reports(tmp_path: Path) -> None:
    meta, data = make_files(tmp_path, 64)
    pool = UserPool.create(meta, data)
    pool.create_thin(5)
    pool.set_transaction_id(0, 7)
    with pytest.raises(ConflictError):
        pool.set_transaction_id(0, 8)
    with pool.volume(5, 4 * BB) as volume:
        volume.write(0, b"a" * BB)
    held = pool.reserve_metadata_snap()
    with pool.volume(5, 4 * BB) as volume:
        volume.write(BB, b"b" * BB)
    status = pool.status()
    assert status.held_metadata_root == held and status.transaction_id == 7
    assert status.used_data_blocks == 2 and status.active and not status.needs_check
    pool.commit()
    assert dump_model(thin_dump(meta, snap=True)) == {5: {0: 0}}
    source = pool.committed_source()
    assert isinstance(source, FileBlockStore)
    assert ThinMetadata(source).superblock.trans_id == 7
    source.close()
    pool.release_metadata_snap()
    pool.close(commit=False)  # a crash: everything the messages did is there
    reopened = UserPool.open(meta, data)
    assert reopened.thin_ids() == {5}
    assert reopened.status().transaction_id == 7
    assert reopened.status().held_metadata_root is None
    verify(reopened, meta, data)
    reopened.close()
