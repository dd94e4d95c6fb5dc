"""The space maps' common low level (kernel ``dm-space-map-common.c``, ``ll_disk``) and the
data space map (``dm-space-map-disk.c``), format section 6.

Counts live in memory while a transaction runs: one ``uint8`` array of 2-bit values per
bitmap (0, 1, 2, or 3 = "see the overflow tree") plus a dict of overflow counts. Before the
first change to a bitmap in a transaction its committed state is kept aside, which is
exactly what the kernel's ``old_ll`` reads (the old bitmap blocks are never overwritten
within a transaction), so "free in the last committed space map" is a lookup.

The on-disk structures (bitmaps, index, overflow tree) are brought up to date at commit.
The kernel shadows a bitmap at its first change and updates the overflow tree on every
change; writing them once at commit produces the same kind of result (every changed bitmap
moved once per transaction, overflow entries for exactly the counts above 2) with fewer
tree operations.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from thinmgr.errors import CorruptMetadataError, NoSpaceError, UsageError
from thinmgr.format.blocks import BlockSource
from thinmgr.format.constants import (
    ENTRIES_PER_BITMAP,
    INDEX_VALUE_SIZE,
    REFCOUNT_VALUE_SIZE,
)
from thinmgr.format.spacemap import (
    IndexEntry,
    data_index,
    decode_bitmap,
    encode_bitmap,
    nr_bitmaps,
    overflow_counts,
    read_bitmap,
)
from thinmgr.format.superblock import SpaceMapRoot
from thinmgr.format.txn.btree_common import BtreeInfo, ValueType, empty_tree
from thinmgr.format.txn.btree_insert import insert
from thinmgr.format.txn.btree_remove import remove

if TYPE_CHECKING:
    from thinmgr.format.txn.tm import TransactionManager

Bitmap = npt.NDArray[np.uint8]
_U32 = struct.Struct("<I")
_E = ENTRIES_PER_BITMAP


class MutableIndexEntry:
    """``disk_index_entry`` while a transaction changes it (section 6.3)."""

    __slots__ = ("blocknr", "none_free_before", "nr_free")

    def __init__(self, blocknr: int, nr_free: int, none_free_before: int) -> None:
        self.blocknr = blocknr
        self.nr_free = nr_free
        self.none_free_before = none_free_before

    def frozen(self) -> IndexEntry:
        return IndexEntry(self.blocknr, self.nr_free, self.none_free_before)


class SpaceMapCounts:
    """``struct ll_disk``: counts, index entries and the transaction's committed view."""

    def __init__(
        self,
        nr_blocks: int,
        entries: list[MutableIndexEntry],
        bitmaps: list[Bitmap],
        overflow: dict[int, int],
    ) -> None:
        self.nr_blocks = nr_blocks
        self.entries = entries
        self.bitmaps = bitmaps
        self.overflow = overflow
        self.overflow_on_disk: set[int] = set(overflow)
        self.nr_allocated = sum(int(np.count_nonzero(b)) for b in bitmaps)
        self.changes = 0  # bumped by every count change; commit loops until it is stable
        self._committed: dict[int, Bitmap] = {}
        self._committed_nr_blocks = nr_blocks
        self.dirty_bitmaps: set[int] = set()
        self.dirty_overflow: set[int] = set()
        self._recompute_summaries()

    @classmethod
    def load(
        cls, source: BlockSource, root: SpaceMapRoot, index: list[IndexEntry], structure: str
    ) -> SpaceMapCounts:
        bitmaps = [
            decode_bitmap(read_bitmap(source, e.blocknr, f"{structure} bitmap {i}")).copy()
            for i, e in enumerate(index)
        ]
        entries = [MutableIndexEntry(e.blocknr, e.nr_free, e.none_free_before) for e in index]
        overflow = overflow_counts(source, root.ref_count_root, f"{structure} ref-count tree")
        counts = cls(root.nr_blocks, entries, bitmaps, overflow)
        for blocknr in overflow:
            if counts.value_of(blocknr) != 3:
                raise CorruptMetadataError(
                    f"ref-count tree holds block {blocknr} whose bitmap entry is not 3",
                    block=root.ref_count_root,
                    structure=f"{structure} ref-count tree",
                )
        return counts

    def _recompute_summaries(self) -> None:
        """nr_free (kernel-style, against all 16320 entries) and none_free_before per bitmap.

        thin_restore 0.9.0 counts nr_free against the device end and can leave the summary
        one block off (format section 13.4 item 2); the kernel's rule is restored here so
        that the allocator's hints are right from the first transaction.
        """
        for i, bitmap in enumerate(self.bitmaps):
            used = int(np.count_nonzero(bitmap))
            free_at = np.flatnonzero(bitmap == 0)
            entry = self.entries[i]
            entry.nr_free = _E - used
            entry.none_free_before = int(free_at[0]) if len(free_at) else _E

    # -- reading -------------------------------------------------------------------------

    def value_of(self, blocknr: int) -> int:
        return int(self.bitmaps[blocknr // _E][blocknr % _E])

    def count(self, blocknr: int) -> int:
        self._check_range(blocknr)
        value = int(self.bitmaps[blocknr // _E][blocknr % _E])
        return self.overflow[blocknr] if value == 3 else value

    def _check_range(self, blocknr: int) -> None:
        if not 0 <= blocknr < self.nr_blocks:
            raise CorruptMetadataError(
                f"reference to block {blocknr}, beyond the {self.nr_blocks} blocks the space "
                "map manages",
                block=blocknr,
                structure="space map",
            )

    # -- changing (sm_ll_mutate) ---------------------------------------------------------

    def set_count(self, blocknr: int, new: int) -> None:
        """Set a count, keeping nr_allocated and the index summaries the kernel's way.

        ``sm_ll_mutate``/``sm_ll_insert``: count 0 -> n takes one from nr_free and moves
        none_free_before past the block if it pointed at it; n -> 0 gives it back and pulls
        the hint down to the block.
        """
        self._check_range(blocknr)
        index, bit = divmod(blocknr, _E)
        bitmap = self.bitmaps[index]
        old_value = int(bitmap[bit])
        old = self.overflow[blocknr] if old_value == 3 else old_value
        if index not in self._committed:
            self._committed[index] = bitmap.copy()
        bitmap[bit] = min(new, 3)
        if new > 2:
            self.overflow[blocknr] = new
            self.dirty_overflow.add(blocknr)
        elif old > 2:
            del self.overflow[blocknr]
            self.dirty_overflow.add(blocknr)
        entry = self.entries[index]
        if new and not old:
            self.nr_allocated += 1
            entry.nr_free -= 1
            if entry.none_free_before == bit:
                entry.none_free_before = bit + 1
        elif old and not new:
            self.nr_allocated -= 1
            entry.nr_free += 1
            entry.none_free_before = min(entry.none_free_before, bit)
        self.dirty_bitmaps.add(index)
        self.changes += 1

    def inc(self, blocknr: int) -> None:
        self.set_count(blocknr, self.count(blocknr) + 1)

    def dec(self, blocknr: int) -> None:
        current = self.count(blocknr)
        if current == 0:
            raise CorruptMetadataError(
                f"reference count of block {blocknr} would drop below 0",
                block=blocknr,
                structure="space map",
            )
        self.set_count(blocknr, current - 1)

    # -- allocation ----------------------------------------------------------------------

    def find_common_free(self, begin: int, end: int) -> int | None:
        """``sm_ll_find_common_free_block``: the first block in [begin, end) that is free
        now and was free at the last commit, searching from each bitmap's none_free_before
        and skipping bitmaps whose nr_free is 0 (``sm_ll_find_free_block``)."""
        end = min(end, self.nr_blocks)
        if begin >= end:
            return None
        for index in range(begin // _E, nr_bitmaps(end)):
            entry = self.entries[index]
            if entry.nr_free == 0:
                continue
            base = index * _E
            lo = max(begin - base, entry.none_free_before, 0)
            hi = min(_E, end - base)
            if lo >= hi:
                continue
            free = self.bitmaps[index][lo:hi] == 0
            committed = self._committed.get(index)
            if committed is not None:
                free &= committed[lo:hi] == 0
            hit = int(np.argmax(free))
            if free[hit]:
                return base + lo + hit
        return None

    def committed_count_nonzero(self, blocknr: int) -> bool:
        committed = self._committed.get(blocknr // _E)
        bitmap = committed if committed is not None else self.bitmaps[blocknr // _E]
        return blocknr < self._committed_nr_blocks and bool(bitmap[blocknr % _E])

    # -- growing and committing ----------------------------------------------------------

    def extend(self, extra: int, new_bitmap_block: list[int]) -> None:
        """``sm_ll_extend``: more blocks, one new zeroed bitmap per 16320 (locations given,
        allocated by the caller through the transaction manager), nr_free = 16320."""
        self.nr_blocks += extra
        for blocknr in new_bitmap_block:
            self.entries.append(MutableIndexEntry(blocknr, _E, 0))
            self.bitmaps.append(np.zeros(_E, dtype=np.uint8))
            self.dirty_bitmaps.add(len(self.bitmaps) - 1)
        self.changes += 1

    def bitmaps_needed(self, nr_blocks: int) -> int:
        return nr_bitmaps(nr_blocks) - len(self.bitmaps)

    def end_transaction(self) -> None:
        """``memcpy(old_ll, ll)``: the current state becomes the committed one."""
        self._committed.clear()
        self._committed_nr_blocks = self.nr_blocks
        self.dirty_bitmaps.clear()
        self.dirty_overflow.clear()

    def encoded_bitmap(self, index: int) -> bytearray:
        return encode_bitmap(self.bitmaps[index], self.entries[index].blocknr)


REFCOUNT_TYPE = ValueType(REFCOUNT_VALUE_SIZE)
INDEX_TYPE = ValueType(INDEX_VALUE_SIZE)


def sync_overflow_tree(tm: TransactionManager, counts: SpaceMapCounts, root: int) -> int:
    """Bring a ref-count tree (section 6.6) up to date with the counts above 2."""
    info = BtreeInfo(tm, 1, REFCOUNT_TYPE)
    while counts.dirty_overflow:
        pending = sorted(counts.dirty_overflow)
        counts.dirty_overflow.clear()
        for blocknr in pending:
            count = counts.overflow.get(blocknr)
            if count is not None:
                root, _ = insert(info, root, [blocknr], _U32.pack(count))
                counts.overflow_on_disk.add(blocknr)
            elif blocknr in counts.overflow_on_disk:
                root = remove(info, root, [blocknr])
                counts.overflow_on_disk.discard(blocknr)
    return root


class CountedSpaceMap:
    """What both space maps answer from their in-memory counts (``dm_space_map`` ops)."""

    counts: SpaceMapCounts

    @property
    def nr_blocks(self) -> int:
        return self.counts.nr_blocks

    @property
    def nr_free(self) -> int:
        return self.counts.nr_blocks - self.counts.nr_allocated

    def count(self, blocknr: int) -> int:
        return self.counts.count(blocknr)

    def inc(self, blocknr: int) -> None:
        self.counts.inc(blocknr)

    def dec(self, blocknr: int) -> None:
        self.counts.dec(blocknr)


class DataSpaceMap(CountedSpaceMap):
    """The data space map: index entries in a btree (section 6.5), ``dm-space-map-disk.c``."""

    def __init__(self, counts: SpaceMapCounts, index_root: int, ref_count_root: int) -> None:
        self.counts = counts
        self.index_root = index_root
        self.ref_count_root = ref_count_root
        self._begin = 0
        self._index_dirty: set[int] = set(range(len(counts.entries)))

    @classmethod
    def create(cls, tm: TransactionManager) -> DataSpaceMap:
        """``sm_ll_new_disk``: an empty index btree and an empty ref-count tree, 0 blocks."""
        index_root = empty_tree(tm, INDEX_VALUE_SIZE)
        ref_root = empty_tree(tm, REFCOUNT_VALUE_SIZE)
        return cls(SpaceMapCounts(0, [], [], {}), index_root, ref_root)

    @classmethod
    def open(cls, source: BlockSource, root: SpaceMapRoot) -> DataSpaceMap:
        index = data_index(source, root)
        counts = SpaceMapCounts.load(source, root, index, "data space map")
        smap = cls(counts, root.bitmap_root, root.ref_count_root)
        changed = {i for i, e in enumerate(counts.entries) if e.frozen() != index[i]}
        smap._index_dirty = changed
        return smap

    def new_block(self) -> int:
        """``sm_disk_new_block``: free in both the committed and the current map, searching
        from the cursor and then from 0 (a block freed earlier may be behind it)."""
        found = self.counts.find_common_free(self._begin, self.counts.nr_blocks)
        if found is None:
            found = self.counts.find_common_free(0, self._begin)
        if found is None:
            raise NoSpaceError(
                f"the data device is full: all {self.counts.nr_blocks} data blocks are in use "
                "or freed in this transaction",
                hint="Commit to reuse freed blocks, or grow the data device.",
            )
        self._begin = found + 1
        self.counts.inc(found)
        return found

    def extend(self, tm: TransactionManager, new_nr_blocks: int) -> None:
        """``sm_ll_extend`` for ``dm_sm_extend``: growing only, as the kernel allows."""
        old = self.counts.nr_blocks
        if new_nr_blocks < old:
            raise UsageError(
                f"cannot shrink the data space map from {old} to {new_nr_blocks} "
                "blocks (the kernel refuses it too)"
            )
        if new_nr_blocks == old:
            return
        first_new = len(self.counts.entries)
        blocks = [tm.new_raw_block() for _ in range(self.counts.bitmaps_needed(new_nr_blocks))]
        self.counts.extend(new_nr_blocks - old, blocks)
        self._index_dirty.update(range(first_new, len(self.counts.entries)))

    def commit(self, tm: TransactionManager) -> None:
        """``sm_disk_commit``: write changed bitmaps (shadowed once per transaction), their
        index entries into the index btree (``disk_ll_commit`` of the ie_cache), and the
        overflow tree."""
        counts = self.counts
        info = BtreeInfo(tm, 1, INDEX_TYPE)
        for index in sorted(counts.dirty_bitmaps):
            entry = counts.entries[index]
            entry.blocknr = tm.shadow_raw(entry.blocknr)
            tm.write_raw(entry.blocknr, counts.encoded_bitmap(index))
            self._index_dirty.add(index)
        for index in sorted(self._index_dirty):
            self.index_root, _ = insert(
                info, self.index_root, [index], counts.entries[index].frozen().pack()
            )
        self._index_dirty.clear()
        self.ref_count_root = sync_overflow_tree(tm, counts, self.ref_count_root)
        counts.end_transaction()

    def root(self) -> SpaceMapRoot:
        return SpaceMapRoot(
            self.counts.nr_blocks, self.counts.nr_allocated, self.index_root, self.ref_count_root
        )
