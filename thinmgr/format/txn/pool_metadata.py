"""Pool metadata operations as the kernel performs them (``dm-thin-metadata.c``), format
sections 4, 5, 7 and 8.

``PoolMetadata`` is an open transaction over a pool's metadata in a ``BlockStore``: thin
devices, snapshots, mappings, data block allocation, the metadata snapshot, and ``commit``
in the kernel's order with the superblock written last. Nothing reaches the committed state
until ``commit``; a crash before it leaves the previous commit intact (section 8).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from thinmgr.errors import (
    BusyError,
    ConflictError,
    CorruptMetadataError,
    NoSpaceError,
    NotFoundError,
    UsageError,
)
from thinmgr.format.constants import (
    BLOCK_SIZE,
    DETAILS_VALUE_SIZE,
    MAPPING_VALUE_SIZE,
    MAX_BTREE_DEPTH,
    MAX_DATA_BLOCK,
    MAX_DATA_BLOCK_SECTORS,
    MAX_DEV_ID,
    MAX_METADATA_BLOCKS,
    MAX_TIME,
    MIN_DATA_BLOCK_SECTORS,
    NEEDS_CHECK_FLAG,
    REFCOUNT_VALUE_SIZE,
    THIN_SUPERBLOCK_LOCATION,
    THIN_VERSION,
)
from thinmgr.format.metadata import DeviceDetails, pack_block_time
from thinmgr.format.spacemap import nr_bitmaps
from thinmgr.format.superblock import Superblock, parse_superblock
from thinmgr.format.txn.blockstore import BlockStore, MemoryBlockStore
from thinmgr.format.txn.btree_common import (
    BtreeInfo,
    ValueType,
    delete_tree,
    empty_tree,
    lookup,
    pack_u64,
    u64,
)
from thinmgr.format.txn.btree_insert import insert
from thinmgr.format.txn.btree_remove import remove
from thinmgr.format.txn.node import empty_leaf
from thinmgr.format.txn.sm_disk import DataSpaceMap
from thinmgr.format.txn.sm_metadata import MetadataSpaceMap
from thinmgr.format.txn.tm import TransactionManager

_DETAILS = struct.Struct("<QQII")


@dataclass
class _Device:
    """``struct dm_thin_device``: details held in memory, written at commit if changed."""

    mapped_blocks: int
    transaction_id: int
    creation_time: int
    snapshotted_time: int
    changed: bool

    def details(self) -> DeviceDetails:
        return DeviceDetails(
            self.mapped_blocks, self.transaction_id, self.creation_time, self.snapshotted_time
        )


class PoolMetadata:
    """One pool's metadata, open for kernel-style transactions."""

    def __init__(
        self,
        store: BlockStore,
        tm: TransactionManager,
        data_sm: DataSpaceMap,
        superblock: Superblock,
    ) -> None:
        self.store = store
        self.tm = tm
        self.data_sm = data_sm
        self._sb = superblock
        self.time = superblock.time
        self.transaction_id = superblock.trans_id
        self.held_root = superblock.held_root
        self.mapping_root = superblock.data_mapping_root
        self.details_root = superblock.device_details_root
        self._devices: dict[int, _Device] = {}
        self._setup_btree_details()

    def _setup_btree_details(self) -> None:
        """``__setup_btree_details``: the value types of the pool's trees."""
        tm = self.tm
        data_sm = self.data_sm

        def data_inc(values: Sequence[bytes]) -> None:
            for raw in values:
                data_sm.inc(u64(raw) >> 24)

        def data_dec(values: Sequence[bytes]) -> None:
            for raw in values:
                data_sm.dec(u64(raw) >> 24)

        def data_equal(a: bytes, b: bytes) -> bool:
            return u64(a) >> 24 == u64(b) >> 24  # data_block_equal ignores the time

        data_type = ValueType(MAPPING_VALUE_SIZE, data_inc, data_dec, data_equal)
        self.info = BtreeInfo(tm, 2, data_type)  # pmd->info: dev -> vblock -> block_time
        self.bl_info = BtreeInfo(tm, 1, data_type)  # pmd->bl_info: one device's tree

        def subtree_inc(values: Sequence[bytes]) -> None:
            for raw in values:
                tm.inc(u64(raw))

        def subtree_dec(values: Sequence[bytes]) -> None:
            for raw in values:
                delete_tree(self.bl_info, u64(raw))

        self.tl_info = BtreeInfo(tm, 1, ValueType(8, subtree_inc, subtree_dec, lambda a, b: a == b))
        self.details_info = BtreeInfo(tm, 1, ValueType(DETAILS_VALUE_SIZE))

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, store: BlockStore) -> PoolMetadata:
        """Open committed metadata for writing (``dm_pool_metadata_open``)."""
        if store.nr_blocks < 1:
            raise CorruptMetadataError(
                "metadata device holds no whole 4 KiB block", structure="superblock"
            )
        sb = parse_superblock(store.read_block(THIN_SUPERBLOCK_LOCATION), THIN_SUPERBLOCK_LOCATION)
        if sb.flags & NEEDS_CHECK_FLAG:
            raise UsageError(
                "the metadata has the NEEDS_CHECK flag set; the kernel refuses to write it",
                hint="Run thin_check, thin_repair if needed, then "
                "thin_check --clear-needs-check-flag.",
            )
        if sb.compat_ro_flags:
            raise UsageError(
                f"unsupported compat_ro feature flags {sb.compat_ro_flags:#x}: "
                "the metadata can only be opened read-only"
            )
        if sb.metadata_sm.nr_blocks > store.nr_blocks:
            raise CorruptMetadataError(
                f"the metadata space map manages {sb.metadata_sm.nr_blocks} blocks but the "
                f"device has {store.nr_blocks}",
                block=0,
                structure="superblock",
            )
        metadata_sm = MetadataSpaceMap.open(store, sb.metadata_sm)
        tm = TransactionManager(store, metadata_sm)
        data_sm = DataSpaceMap.open(store, sb.data_sm)
        return cls(store, tm, data_sm, sb)

    # -- devices -------------------------------------------------------------------------

    def _stored_details(self, dev: int) -> DeviceDetails | None:
        raw = lookup(self.details_info, self.details_root, [dev])
        return None if raw is None else DeviceDetails(*_DETAILS.unpack(raw))

    def _device_exists(self, dev: int) -> bool:
        return dev in self._devices or self._stored_details(dev) is not None

    def _open_device(self, dev: int) -> _Device:
        """``__open_device`` without create: the in-memory details, read on first use."""
        device = self._devices.get(dev)
        if device is None:
            stored = self._stored_details(dev)
            if stored is None:
                raise NotFoundError(f"thin device {dev} does not exist")
            device = _Device(
                stored.mapped_blocks,
                stored.transaction_id,
                stored.creation_time,
                stored.snapshotted_time,
                False,
            )
            self._devices[dev] = device
        return device

    @staticmethod
    def _check_dev_id(dev: int) -> None:
        if not 0 <= dev <= MAX_DEV_ID:
            raise UsageError(
                f"thin device id {dev} is outside 0..{MAX_DEV_ID} (24 bits, as dm-thin enforces)"
            )

    def create_thin(self, dev: int) -> None:
        """``__create_thin``: an empty mapping tree under ``dev`` in the top-level tree;
        details {0, trans_id, time, time} written at commit."""
        self._check_dev_id(dev)
        if self._device_exists(dev):
            raise ConflictError(f"thin device {dev} already exists")
        dev_root = empty_tree(self.tm, MAPPING_VALUE_SIZE)
        self.mapping_root, _ = insert(self.tl_info, self.mapping_root, [dev], pack_u64(dev_root))
        self._devices[dev] = _Device(0, self.transaction_id, self.time, self.time, True)

    def create_snap(self, dev: int, origin: int) -> None:
        """``__create_snap`` (section 5.4): O(1). The origin's subtree root gains a
        reference and is inserted under ``dev``; nothing below it is touched. time += 1."""
        self._check_dev_id(dev)
        if self._device_exists(dev):
            raise ConflictError(f"thin device {dev} already exists")
        origin_device = self._open_device(origin)
        raw = lookup(self.tl_info, self.mapping_root, [origin])
        if raw is None:
            raise CorruptMetadataError(
                f"device {origin} has details but no mapping tree",
                block=self.mapping_root,
                structure="mapping tree",
            )
        if self.time >= MAX_TIME:
            raise NoSpaceError(
                f"the snapshot clock reached {self.time}: mapping times have "
                "24 bits (format section 4.3), no further snapshot is possible"
            )
        origin_root = u64(raw)
        self.tm.inc(origin_root)  # "clone the origin, an inc will do"
        self.mapping_root, _ = insert(self.tl_info, self.mapping_root, [dev], pack_u64(origin_root))
        self.time += 1
        # __set_snapshot_details
        self._devices[dev] = _Device(
            origin_device.mapped_blocks, self.transaction_id, self.time, self.time, True
        )
        origin_device.snapshotted_time = self.time
        origin_device.changed = True

    def delete(self, dev: int) -> None:
        """``__delete_device``: drop the details, then the top-level entry, whose value dec
        runs ``dm_btree_del`` on the device's tree (shared nodes are only decremented)."""
        self._open_device(dev)
        del self._devices[dev]
        if self._stored_details(dev) is not None:
            self.details_root = remove(self.details_info, self.details_root, [dev])
        self.mapping_root = remove(self.tl_info, self.mapping_root, [dev])

    def devices(self) -> list[int]:
        """Every device id, committed or created in this transaction, ascending."""
        ids = {int(dev) for dev in self._mapping_top_level()}
        return sorted(ids)

    def _mapping_top_level(self) -> Iterator[int]:
        for key, _ in _walk_leaf_entries(self.tm, self.mapping_root, 8):
            yield key

    def device_details(self, dev: int) -> DeviceDetails:
        return self._open_device(dev).details()

    # -- mappings ------------------------------------------------------------------------

    def insert_mapping(self, dev: int, vblock: int, data_block: int) -> bool:
        """``dm_thin_insert_block``: map ``vblock`` to ``data_block`` at the current time.

        The data block's reference comes from its allocation (``alloc_data_block``); an
        overwrite releases the old block unless it is the same one. True if newly mapped.
        """
        device = self._open_device(dev)
        if not 0 <= data_block < self.data_sm.nr_blocks or data_block > MAX_DATA_BLOCK:
            raise UsageError(
                f"data block {data_block} is outside the data device "
                f"({self.data_sm.nr_blocks} blocks)"
            )
        if not 0 <= vblock < 1 << 64:
            raise UsageError(f"virtual block {vblock} is not a u64")
        value = pack_u64(pack_block_time(data_block, self.time))
        self.mapping_root, inserted = insert(self.info, self.mapping_root, [dev, vblock], value)
        if inserted:
            device.mapped_blocks += 1
        device.changed = True
        return inserted

    def remove_mapping(self, dev: int, vblock: int) -> None:
        """``dm_thin_remove_block``: unmap; the data block loses this leaf's reference."""
        device = self._open_device(dev)
        if lookup(self.info, self.mapping_root, [dev, vblock]) is None:
            raise NotFoundError(f"virtual block {vblock} of device {dev} is not mapped")
        self.mapping_root = remove(self.info, self.mapping_root, [dev, vblock])
        device.mapped_blocks -= 1
        device.changed = True

    def lookup(self, dev: int, vblock: int) -> tuple[int, int] | None:
        """``dm_thin_find_block``: (data block, time) or None when unmapped."""
        self._open_device(dev)
        raw = lookup(self.info, self.mapping_root, [dev, vblock])
        if raw is None:
            return None
        value = u64(raw)
        return value >> 24, value & 0xFFFFFF

    def mappings(self, dev: int) -> Iterator[tuple[int, int, int]]:
        """(vblock, data block, time) of every mapping of ``dev`` in order."""
        self._open_device(dev)
        raw = lookup(self.tl_info, self.mapping_root, [dev])
        if raw is None:
            return
        for vblock, value in _walk_leaf_entries(self.tm, u64(raw), MAPPING_VALUE_SIZE):
            packed = u64(value)
            yield vblock, packed >> 24, packed & 0xFFFFFF

    def highest_mapped_block(self, dev: int) -> int | None:
        """The largest mapped virtual block of ``dev`` (the rightmost leaf entry), or None:
        ``dm_thin_get_highest_mapped_block``, one root-to-leaf walk."""
        self._open_device(dev)
        raw = lookup(self.tl_info, self.mapping_root, [dev])
        if raw is None:
            return None
        block = u64(raw)
        for _ in range(MAX_BTREE_DEPTH + 1):
            node = self.tm.read_node(block, MAPPING_VALUE_SIZE)
            if not node.keys:
                return None
            if node.is_leaf:
                return int(node.keys[-1])
            block = u64(node.values[-1])
        raise CorruptMetadataError(
            "btree deeper than any valid tree", block=block, structure="mapping tree"
        )

    def mapping_leaves(self, dev: int) -> Iterator[tuple[list[int], list[bytes]]]:
        """The (keys, packed block_time values) of every leaf of ``dev``'s mapping tree, in
        key order: a bulk view for callers that load all mappings (the user engine's
        per-volume mapping cache), without a tuple per mapping."""
        self._open_device(dev)
        raw = lookup(self.tl_info, self.mapping_root, [dev])
        if raw is None:
            return
        stack = [u64(raw)]
        while stack:
            node = self.tm.read_node(stack.pop(), MAPPING_VALUE_SIZE)
            if node.is_leaf:
                yield node.keys, node.values
            else:
                stack.extend(u64(value) for value in reversed(node.values))

    # -- data space ----------------------------------------------------------------------

    def alloc_data_block(self) -> int:
        """``dm_pool_alloc_data_block``: a data block with count 1, free now and at the
        last commit."""
        return self.data_sm.new_block()

    def data_block_count(self, data_block: int) -> int:
        return self.data_sm.count(data_block)

    def metadata_block_count(self, blocknr: int) -> int:
        return self.tm.ref(blocknr)

    @property
    def nr_data_blocks(self) -> int:
        return self.data_sm.nr_blocks

    @property
    def free_data_blocks(self) -> int:
        return self.data_sm.nr_free

    @property
    def free_metadata_blocks(self) -> int:
        return self.tm.sm.nr_free

    @property
    def data_block_size(self) -> int:
        return self._sb.data_block_size

    def resize_data_dev(self, new_nr_blocks: int) -> None:
        """``dm_pool_resize_data_dev``: grow the data space map (new zeroed bitmaps)."""
        if new_nr_blocks > MAX_DATA_BLOCK + 1:
            raise UsageError(
                f"{new_nr_blocks} data blocks exceed the 2^40 a mapping can "
                "address (format section 10)"
            )
        self.data_sm.extend(self.tm, new_nr_blocks)

    # -- transaction id, metadata snapshot -----------------------------------------------

    def set_transaction_id(self, current_id: int, new_id: int) -> None:
        """``dm_pool_set_metadata_transaction_id``: compare-and-swap, durable at commit."""
        if current_id != self.transaction_id:
            raise ConflictError(
                f"transaction id is {self.transaction_id}, not {current_id}",
                hint="Read the pool's current transaction id and retry.",
            )
        if not 0 <= new_id < 1 << 64:
            raise UsageError(f"transaction id {new_id} is not a u64")
        self.transaction_id = new_id

    def reserve_metadata_snap(self) -> int:
        """``__reserve_metadata_snap`` (section 7.1): commit, copy the committed superblock
        to a new block H by shadowing block 0 with its count raised to 2, zero the copy's
        space-map roots, and give its two tree roots one more reference. Returns H; the
        live superblock names it from the next commit on."""
        if self.held_root:
            raise BusyError(
                f"a metadata snapshot is already held at block {self.held_root}",
                hint="Release it before taking another.",
            )
        self.commit()
        tm = self.tm
        tm.inc(THIN_SUPERBLOCK_LOCATION)
        held = tm.shadow_raw(THIN_SUPERBLOCK_LOCATION, copy=True)
        copy = parse_superblock(tm.read_raw(held), THIN_SUPERBLOCK_LOCATION)
        tm.write_raw(held, copy.snapshot_copy(held).pack())
        tm.inc(copy.data_mapping_root)
        tm.inc(copy.device_details_root)
        self.held_root = held
        return held

    def release_metadata_snap(self) -> None:
        """``__release_metadata_snap`` (section 7.2): forget H, release its trees with
        ``dm_btree_del`` (data blocks dropped at unshared leaves) and H itself."""
        held = self.held_root
        if not held:
            raise NotFoundError("no metadata snapshot is held: nothing to release")
        self.held_root = 0
        copy = parse_superblock(
            self.tm.read_raw(held), held, structure="metadata snapshot superblock"
        )
        delete_tree(self.info, copy.data_mapping_root)
        delete_tree(self.details_info, copy.device_details_root)
        self.tm.dec(held)

    # -- commit (section 8) --------------------------------------------------------------

    def commit(self) -> None:
        """``__commit_transaction``: changed details into the details tree, the data space
        map, the metadata space map and every block but the superblock (flushed), then the
        superblock - the commit point - and a flush."""
        for dev in sorted(self._devices):
            device = self._devices[dev]
            if device.changed:  # __write_changed_details
                self.details_root, _ = insert(
                    self.details_info, self.details_root, [dev], device.details().pack()
                )
                device.changed = False
        self.data_sm.commit(self.tm)
        self.tm.pre_commit()
        superblock = replace(
            self._sb,
            blocknr=THIN_SUPERBLOCK_LOCATION,
            time=self.time,
            trans_id=self.transaction_id,
            held_root=self.held_root,
            data_sm=self.data_sm.root(),
            metadata_sm=self.tm.sm.root(),
            data_mapping_root=self.mapping_root,
            device_details_root=self.details_root,
        )
        self.tm.commit(superblock.pack())
        self._sb = superblock

    @property
    def committed_superblock(self) -> Superblock:
        return self._sb


def _walk_leaf_entries(
    tm: TransactionManager, root: int, value_size: int
) -> Iterator[tuple[int, bytes]]:
    """(key, value) of a one-level tree in key order, through the transaction's view."""
    stack = [root]
    while stack:
        node = tm.read_node(stack.pop(), value_size)
        if node.is_leaf:
            yield from zip(node.keys, node.values, strict=True)
        else:
            stack.extend(u64(raw) for raw in reversed(node.values))


def format_metadata(
    nr_metadata_blocks: int,
    data_block_size: int,
    nr_data_blocks: int,
    *,
    store: BlockStore | None = None,
) -> PoolMetadata:
    """A fresh, empty pool as the kernel formats it (``__format_metadata``, section 6.7).

    Block 0 = superblock, 1 = metadata index, 2 = metadata ref-count root, 3... = metadata
    bitmaps, then the data space map's empty index and ref-count trees and the empty mapping
    and details roots; committed, then grown to ``nr_data_blocks`` and committed again, as
    the pool's first resume does (``dm_pool_resize_data_dev``). Without ``store`` the image
    is built in a ``MemoryBlockStore`` of ``nr_metadata_blocks`` blocks.
    """
    if (
        data_block_size % MIN_DATA_BLOCK_SECTORS
        or not MIN_DATA_BLOCK_SECTORS <= data_block_size <= MAX_DATA_BLOCK_SECTORS
    ):
        raise UsageError(
            f"data block size {data_block_size} sectors is not a multiple of "
            f"{MIN_DATA_BLOCK_SECTORS} in {MIN_DATA_BLOCK_SECTORS}.."
            f"{MAX_DATA_BLOCK_SECTORS}"
        )
    managed = min(nr_metadata_blocks, MAX_METADATA_BLOCKS)
    minimum = 3 + nr_bitmaps(managed) + 16
    if managed < minimum:
        raise UsageError(
            f"{nr_metadata_blocks} metadata blocks are too few: at least "
            f"{minimum} ({minimum * BLOCK_SIZE} bytes) are needed"
        )
    if store is None:
        store = MemoryBlockStore(nr_metadata_blocks)
    if store.nr_blocks < managed:
        raise UsageError(
            f"the metadata device has {store.nr_blocks} blocks, fewer than the {managed} to format"
        )
    metadata_sm = MetadataSpaceMap.bootstrap(managed)
    tm = TransactionManager(store, metadata_sm)
    tm.adopt_raw(metadata_sm.index_block)
    tm.adopt_node(empty_leaf(metadata_sm.ref_count_root, REFCOUNT_VALUE_SIZE))
    for entry in metadata_sm.counts.entries:
        tm.adopt_raw(entry.blocknr)
    data_sm = DataSpaceMap.create(tm)
    mapping_root = empty_tree(tm, MAPPING_VALUE_SIZE)
    details_root = empty_tree(tm, DETAILS_VALUE_SIZE)
    superblock = Superblock(
        version=THIN_VERSION,
        data_block_size=data_block_size,
        data_mapping_root=mapping_root,
        device_details_root=details_root,
        metadata_nr_blocks=managed,
    )
    pool = PoolMetadata(store, tm, data_sm, superblock)
    pool.commit()
    if nr_data_blocks:
        pool.resize_data_dev(nr_data_blocks)
        pool.commit()
    return pool
