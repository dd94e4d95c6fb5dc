"""Kernel-style metadata transactions (thinmgr.format.txn) against thin_check/thin_dump 0.9.0.

Every scenario ends in the oracle: thin_check exits 0 and thin_dump shows exactly the
mappings of a plain dict model; an independent recount of every metadata and data
reference (tests/support/txn_oracle.recount) checks what 0.9.0 leaves out.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.support.txn_oracle import (
    Model,
    device_root,
    oracle,
    recount,
    tree_height,
    write_block,
)
from thinmgr.errors import (
    BusyError,
    ConflictError,
    NoSpaceError,
    NotFoundError,
    UsageError,
)
from thinmgr.format.blocks import MemoryBlocks
from thinmgr.format.constants import ENTRIES_PER_BITMAP
from thinmgr.format.metadata import ThinMetadata
from thinmgr.format.spacemap import overflow_counts
from thinmgr.format.superblock import parse_superblock
from thinmgr.format.txn import MemoryBlockStore, PoolMetadata, format_metadata


def check(
    pool: PoolMetadata, tmp_path: Path, model: Model, *, snap_model: Model | None = None
) -> bytes:
    image = pool.store.image()
    oracle(image, tmp_path, model, snap_model=snap_model)
    recount(image)
    return image


def fill(pool: PoolMetadata, model: Model, dev: int, vblocks: list[int]) -> None:
    for vblock in vblocks:
        block = pool.alloc_data_block()
        pool.insert_mapping(dev, vblock, block)
        model[dev][vblock] = block


def test_format_matches_the_kernel_layout(tmp_path: Path) -> None:
    pool = format_metadata(30000, 256, 0)
    image = check(pool, tmp_path, {})
    sb = parse_superblock(image[:4096], 0)
    assert (sb.version, sb.time, sb.trans_id, sb.held_root) == (2, 0, 0, 0)
    assert sb.data_block_size == 256 and sb.metadata_nr_blocks == 30000
    # 0 = superblock, 1 = index, 2 = metadata ref-count root, 3/4 = bitmaps, then the data
    # space map's index and ref-count roots, the mapping and the details roots (section 6.7).
    assert (sb.metadata_sm.bitmap_root, sb.metadata_sm.ref_count_root) == (1, 2)
    assert (sb.data_sm.bitmap_root, sb.data_sm.ref_count_root) == (5, 6)
    assert (sb.data_mapping_root, sb.device_details_root) == (7, 8)
    assert sb.metadata_sm.nr_allocated == 9 and sb.data_sm.nr_blocks == 0
    # The pool's first resume sizes the data device: one more commit, new bitmaps.
    pool.resize_data_dev(50000)
    pool.commit()
    image = check(pool, tmp_path, {})
    sb = parse_superblock(image[:4096], 0)
    assert sb.metadata_sm.nr_blocks == 30000 and sb.data_sm.nr_blocks == 50000
    assert sb.metadata_sm.bitmap_root != 1  # the index block moves at every commit
    assert pool.free_data_blocks == 50000


def test_thousands_of_sequential_inserts_reach_height_three(tmp_path: Path) -> None:
    pool = format_metadata(4096, 128, 70000)
    model: Model = {0: {}}
    pool.create_thin(0)
    fill(pool, model, 0, list(range(300)))
    pool.commit()
    image = check(pool, tmp_path, model)
    assert tree_height(image, device_root(image, 0)) == 2
    fill(pool, model, 0, list(range(300, 66000)))
    pool.commit()
    image = check(pool, tmp_path, model)
    assert tree_height(image, device_root(image, 0)) == 3
    assert pool.device_details(0).mapped_blocks == 66000


def test_random_order_inserts_and_overwrites(tmp_path: Path) -> None:
    rng = random.Random(7)
    pool = format_metadata(4096, 128, 40000)
    model: Model = {0: {}, 5: {}}
    pool.create_thin(0)
    pool.create_thin(5)
    keys = rng.sample(range(1 << 40), 12000)
    for i, chunk in enumerate((keys[:3000], keys[3000:])):
        fill(pool, model, i * 5, chunk)
        pool.commit()
        check(pool, tmp_path, model)
    # Overwrites release the old data block (its count drops to 0) unless it is the same.
    for vblock in rng.sample(keys[:3000], 500):
        old = model[0][vblock]
        assert not pool.insert_mapping(0, vblock, old)
        assert pool.data_block_count(old) == 1
        fill(pool, model, 0, [vblock])
        assert pool.data_block_count(old) == 0
    pool.commit()
    check(pool, tmp_path, model)
    assert pool.free_data_blocks == 40000 - 12000


def test_removes_merge_nodes_and_collapse_the_root(tmp_path: Path) -> None:
    rng = random.Random(3)
    pool = format_metadata(4096, 128, 70000)
    model: Model = {0: {}}
    pool.create_thin(0)
    fill(pool, model, 0, rng.sample(range(1000000), 60000))
    pool.commit()
    image = check(pool, tmp_path, model)
    assert tree_height(image, device_root(image, 0)) == 3
    free_metadata = pool.free_metadata_blocks
    for remaining in (20000, 2000, 100, 0):
        for vblock in rng.sample(sorted(model[0]), len(model[0]) - remaining):
            pool.remove_mapping(0, vblock)
            del model[0][vblock]
        pool.commit()
        image = check(pool, tmp_path, model)
    # All gone: the device's tree is a single empty leaf again, every block given back.
    assert tree_height(image, device_root(image, 0)) == 1
    assert pool.free_data_blocks == 70000
    assert pool.free_metadata_blocks > free_metadata
    with pytest.raises(NotFoundError):
        pool.remove_mapping(0, 5)


def test_snapshot_shares_the_tree_then_copies_on_write(tmp_path: Path) -> None:
    pool = format_metadata(4096, 128, 20000)
    model: Model = {0: {}}
    pool.create_thin(0)
    fill(pool, model, 0, list(range(5000)))
    pool.commit()
    before = pool.store.image()
    origin_root = device_root(before, 0)
    pool.create_snap(1, 0)
    model[1] = dict(model[0])
    pool.commit()
    image = check(pool, tmp_path, model)
    # O(1): both devices point at the same subtree root, counted twice; data counts stay 1.
    assert device_root(image, 1) == device_root(image, 0) == origin_root
    assert pool.metadata_block_count(origin_root) == 2
    assert {pool.data_block_count(b) for b in model[0].values()} == {1}
    assert pool.time == 1
    details = ThinMetadata(MemoryBlocks(image)).device_details()
    assert (details[1].creation_time, details[1].snapshotted_time) == (1, 1)
    assert details[0].snapshotted_time == 1 and details[1].mapped_blocks == 5000
    # Writes to both: shared leaves are copied, their data blocks reach count 2, and the
    # written vblocks get new blocks.
    for vblock in (0, 1, 2500, 4999):
        write_block(pool, model, 0, vblock)
        write_block(pool, model, 1, vblock)
    pool.commit()
    image = check(pool, tmp_path, model)
    counts = {pool.data_block_count(b) for b in model[0].values()}
    assert counts == {1, 2}
    # A second write to the same block in the same device is in place (time is not older).
    block = model[0][0]
    assert write_block(pool, model, 0, 0) == block


def test_snapshots_of_snapshots_overflow_counts_and_deletes(tmp_path: Path) -> None:
    rng = random.Random(11)
    pool = format_metadata(4096, 128, 30000)
    model: Model = {0: {}}
    pool.create_thin(0)
    fill(pool, model, 0, list(range(3000)))
    pool.commit()
    for dev, origin in ((1, 0), (2, 1), (3, 1), (4, 2)):
        pool.create_snap(dev, origin)
        model[dev] = dict(model[origin])
    pool.commit()
    image = check(pool, tmp_path, model)
    root = device_root(image, 0)
    assert pool.metadata_block_count(root) == 5
    sb = parse_superblock(image[:4096], 0)
    assert overflow_counts(MemoryBlocks(image), sb.metadata_sm.ref_count_root, "t") == {root: 5}
    for dev in range(5):
        for vblock in rng.sample(range(3000), 200):
            write_block(pool, model, dev, vblock)
    pool.commit()
    image = check(pool, tmp_path, model)
    sb = parse_superblock(image[:4096], 0)
    data_overflow = overflow_counts(MemoryBlocks(image), sb.data_sm.ref_count_root, "t")
    assert data_overflow and max(data_overflow.values()) >= 3
    for dev in (1, 4, 0, 2):
        pool.delete(dev)
        del model[dev]
        pool.commit()
        check(pool, tmp_path, model)
    pool.delete(3)
    del model[3]
    pool.commit()
    check(pool, tmp_path, {})
    assert pool.free_data_blocks == 30000
    with pytest.raises(NotFoundError):
        pool.delete(3)


def test_metadata_snapshot_keeps_the_reserved_state(tmp_path: Path) -> None:
    rng = random.Random(5)
    pool = format_metadata(4096, 128, 30000)
    model: Model = {0: {}}
    pool.create_thin(0)
    fill(pool, model, 0, list(range(4000)))
    pool.create_snap(1, 0)
    model[1] = dict(model[0])
    held = pool.reserve_metadata_snap()  # commits first
    reserved = {dev: dict(m) for dev, m in model.items()}
    with pytest.raises(BusyError):
        pool.reserve_metadata_snap()
    pool.commit()
    check(pool, tmp_path, model, snap_model=reserved)
    for vblock in rng.sample(range(4000), 600):
        write_block(pool, model, 0, vblock)
        write_block(pool, model, 1, vblock)
    for vblock in rng.sample(range(4000), 300):
        if vblock in model[1]:
            pool.remove_mapping(1, vblock)
            del model[1][vblock]
    pool.create_thin(9)
    model[9] = {}
    fill(pool, model, 9, [1, 2, 3])
    pool.delete(0)
    del model[0]
    pool.commit()
    image = check(pool, tmp_path, model, snap_model=reserved)
    assert parse_superblock(image[:4096], 0).held_root == held
    pool.release_metadata_snap()
    pool.commit()
    image = check(pool, tmp_path, model)
    assert parse_superblock(image[:4096], 0).held_root == 0
    used = {b for m in model.values() for b in m.values()}
    assert pool.free_data_blocks == 30000 - len(used)
    with pytest.raises(NotFoundError):
        pool.release_metadata_snap()


class RecordingStore(MemoryBlockStore):
    """Records every write so that a crash can keep any prefix of them."""

    def __init__(self, nr_blocks: int) -> None:
        super().__init__(nr_blocks)
        self.writes: list[tuple[int, bytes]] = []

    def write_block(self, blocknr: int, data: bytes | bytearray) -> None:
        super().write_block(blocknr, data)
        self.writes.append((blocknr, bytes(data)))


def test_crash_before_the_superblock_leaves_the_last_commit(tmp_path: Path) -> None:
    rng = random.Random(9)
    store = RecordingStore(4096)
    pool = format_metadata(4096, 128, 20000, store=store)
    model: Model = {0: {}}
    pool.create_thin(0)
    fill(pool, model, 0, rng.sample(range(50000), 3000))
    pool.commit()
    committed_image = store.image()
    committed_model = {dev: dict(m) for dev, m in model.items()}
    committed_xml = oracle(committed_image, tmp_path, committed_model)
    # A transaction touching everything: snapshot, CoW writes, removes, reserve.
    store.writes.clear()
    pool.create_snap(1, 0)
    model[1] = dict(model[0])
    for vblock in rng.sample(sorted(model[0]), 400):
        write_block(pool, model, 1, vblock)
        pool.remove_mapping(0, vblock)
        del model[0][vblock]
    fill(pool, model, 0, rng.sample(range(50000, 60000), 500))
    # Uncommitted work is invisible: nothing has been written yet.
    assert store.writes == [] and store.image() == committed_image
    pool.commit()
    writes = store.writes
    assert writes[-1][0] == 0 and all(b != 0 for b, _ in writes[:-1])
    oracle(store.image(), tmp_path, model)
    # Crash after any prefix of the writes that precede the superblock.
    for cut in (1, len(writes) // 2, len(writes) - 1):
        crashed = bytearray(committed_image)
        for blocknr, data in writes[:cut]:
            crashed[blocknr * 4096 : (blocknr + 1) * 4096] = data
        assert oracle(bytes(crashed), tmp_path, committed_model) == committed_xml
        recount(bytes(crashed))
    # And the reverted image can be opened and carries on.
    crashed_store = MemoryBlockStore(image=bytes(crashed))
    again = PoolMetadata.open(crashed_store)
    again.create_thin(7)
    again.commit()
    oracle(crashed_store.image(), tmp_path, {**committed_model, 7: {}})


def test_open_a_thin_restore_image_and_continue(tmp_path: Path, restore_xml: object) -> None:
    xml = (
        '<superblock uuid="" time="3" transaction="5" flags="0" version="2" '
        'data_block_size="128" nr_data_blocks="2000">\n'
        '  <device dev_id="1" mapped_blocks="600" transaction="0" creation_time="0" '
        'snap_time="3">\n'
        '    <range_mapping origin_begin="0" data_begin="100" length="600" time="0"/>\n'
        "  </device>\n"
        '  <device dev_id="2" mapped_blocks="600" transaction="0" creation_time="3" '
        'snap_time="3">\n'
        '    <range_mapping origin_begin="0" data_begin="100" length="600" time="0"/>\n'
        "  </device>\n"
        "</superblock>\n"
    )
    path = restore_xml(xml)  # type: ignore[operator]
    store = MemoryBlockStore(image=Path(path).read_bytes())
    pool = PoolMetadata.open(store)
    assert pool.time == 3 and pool.transaction_id == 5
    model: Model = {dev: {v: 100 + v for v in range(600)} for dev in (1, 2)}
    assert pool.data_block_count(100) == 2  # two leaves (thin_restore shares no nodes)
    for vblock in range(0, 600, 7):
        write_block(pool, model, 2, vblock)
    pool.set_transaction_id(5, 6)
    pool.create_snap(3, 2)
    model[3] = dict(model[2])
    pool.commit()
    check(pool, tmp_path, model)
    assert parse_superblock(store.image()[:4096], 0).trans_id == 6


def test_errors_are_thinmgr_errors(tmp_path: Path) -> None:
    pool = format_metadata(64, 128, 10)
    pool.create_thin(1)
    with pytest.raises(ConflictError):
        pool.create_thin(1)
    with pytest.raises(ConflictError):
        pool.create_snap(1, 1)
    with pytest.raises(NotFoundError):
        pool.create_snap(2, 5)
    with pytest.raises(UsageError):
        pool.create_thin(1 << 24)
    with pytest.raises(ConflictError):
        pool.set_transaction_id(3, 4)
    with pytest.raises(UsageError):
        pool.insert_mapping(1, 0, 10)
    with pytest.raises(NotFoundError):
        pool.lookup(4, 0)
    with pytest.raises(UsageError):
        pool.resize_data_dev(5)
    with pytest.raises(UsageError):
        format_metadata(10, 128, 10)
    with pytest.raises(UsageError):
        format_metadata(64, 100, 10)
    for vblock in range(10):
        pool.insert_mapping(1, vblock, pool.alloc_data_block())
    with pytest.raises(NoSpaceError):
        pool.alloc_data_block()
    pool.commit()
    # A block freed in this transaction comes back only after the commit: allocation wants
    # blocks free in the committed map too (section 5.2).
    freed = pool.lookup(1, 3)
    assert freed is not None
    pool.remove_mapping(1, 3)
    with pytest.raises(NoSpaceError):
        pool.alloc_data_block()
    pool.commit()
    assert pool.alloc_data_block() == freed[0]
    pool.insert_mapping(1, 3, freed[0])
    pool.commit()
    oracle(pool.store.image(), tmp_path, {1: {v: b for v, b, _ in pool.mappings(1)}})


def test_resize_grows_the_data_space_map(tmp_path: Path) -> None:
    pool = format_metadata(4096, 128, 100)
    model: Model = {0: {}}
    pool.create_thin(0)
    fill(pool, model, 0, list(range(100)))
    pool.resize_data_dev(3 * ENTRIES_PER_BITMAP + 5)
    fill(pool, model, 0, list(range(100, 300)))
    pool.commit()
    image = check(pool, tmp_path, model)
    assert parse_superblock(image[:4096], 0).data_sm.nr_blocks == 3 * ENTRIES_PER_BITMAP + 5
    assert pool.free_data_blocks == 3 * ENTRIES_PER_BITMAP + 5 - 300
