"""The metadata space map (kernel ``dm-space-map-metadata.c``), format sections 6.4, 6.8.

Its index is one block (255 entries, section 6.4), kept in memory and written to a new
location at every commit (``metadata_ll_commit`` shadows it). The kernel's difficulty is
recursion: recording a count may shadow a bitmap or change the ref-count tree, which needs
a new block from this very space map; it queues those operations ("bops") and applies them
when the recursion unwinds (``out()``). Here counts are plain memory during the
transaction, so there is no recursion until commit, and the commit writes the on-disk
structures in a loop that runs until a whole pass changes no count - the same fixpoint
``out()`` reaches by draining the queue - so the bitmaps written account for the index,
bitmap and ref-count-tree blocks themselves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from thinmgr.errors import NoSpaceError
from thinmgr.format.blocks import BlockSource
from thinmgr.format.constants import ENTRIES_PER_BITMAP, MAX_METADATA_BLOCKS
from thinmgr.format.spacemap import encode_metadata_index, metadata_index, nr_bitmaps
from thinmgr.format.superblock import SpaceMapRoot
from thinmgr.format.txn.sm_disk import (
    CountedSpaceMap,
    MutableIndexEntry,
    SpaceMapCounts,
    sync_overflow_tree,
)

if TYPE_CHECKING:
    from thinmgr.format.txn.tm import TransactionManager


class MetadataSpaceMap(CountedSpaceMap):
    """Counts of metadata blocks; allocation only from blocks free at the last commit."""

    def __init__(self, counts: SpaceMapCounts, index_block: int, ref_count_root: int) -> None:
        self.counts = counts
        self.index_block = index_block
        self.ref_count_root = ref_count_root
        self.begin = 0  # smm->begin: allocation cursor, reset at every commit

    @classmethod
    def open(cls, source: BlockSource, root: SpaceMapRoot) -> MetadataSpaceMap:
        index = metadata_index(source, root)
        counts = SpaceMapCounts.load(source, root, index, "metadata space map")
        return cls(counts, root.bitmap_root, root.ref_count_root)

    @classmethod
    def bootstrap(cls, nr_blocks: int) -> MetadataSpaceMap:
        """``dm_sm_metadata_create``'s layout: 0 = superblock, 1 = index block, 2 = empty
        ref-count root, 3... = one bitmap per 16320 blocks (section 6.7), all counted 1.

        The caller registers blocks 1..begin-1 with the transaction manager as new.
        """
        nr_blocks = min(nr_blocks, MAX_METADATA_BLOCKS)
        count = nr_bitmaps(nr_blocks)
        entries = [MutableIndexEntry(3 + i, ENTRIES_PER_BITMAP, 0) for i in range(count)]
        bitmaps = [np.zeros(ENTRIES_PER_BITMAP, dtype=np.uint8) for _ in range(count)]
        counts = SpaceMapCounts(nr_blocks, entries, bitmaps, {})
        counts.dirty_bitmaps.update(range(count))  # new zeroed bitmaps must be written
        smap = cls(counts, 1, 2)
        smap.begin = 3 + count
        for blocknr in range(smap.begin):  # sm_ll_inc(&smm->ll, superblock, smm->begin)
            counts.inc(blocknr)
        return smap

    def new_block(self) -> int:
        """``sm_metadata_new_block_``: free now and at the last commit, from the cursor,
        then from 0 for blocks freed before the cursor in earlier transactions."""
        found = self.counts.find_common_free(self.begin, self.counts.nr_blocks)
        if found is None:
            found = self.counts.find_common_free(0, self.begin)
        if found is None:
            raise NoSpaceError(
                f"the metadata device is full ({self.counts.nr_blocks} blocks, "
                f"{self.nr_free} free but freed in this transaction)",
                hint="Commit to reuse freed blocks, or grow the metadata device.",
            )
        self.begin = found + 1
        self.counts.inc(found)
        return found

    def commit(self, tm: TransactionManager) -> None:
        """``sm_metadata_commit``: overflow tree, shadowed bitmaps and a shadowed index
        block, repeated until stable, then encoded; the cursor goes back to 0."""
        counts = self.counts
        while True:
            before = counts.changes
            self.ref_count_root = sync_overflow_tree(tm, counts, self.ref_count_root)
            for index in sorted(counts.dirty_bitmaps):
                entry = counts.entries[index]
                entry.blocknr = tm.shadow_raw(entry.blocknr)
            self.index_block = tm.shadow_raw(self.index_block)
            if counts.changes == before:
                break
        for index in sorted(counts.dirty_bitmaps):
            tm.write_raw(counts.entries[index].blocknr, counts.encoded_bitmap(index))
        tm.write_raw(
            self.index_block,
            encode_metadata_index([entry.frozen() for entry in counts.entries], self.index_block),
        )
        counts.end_transaction()
        self.begin = 0

    def root(self) -> SpaceMapRoot:
        return SpaceMapRoot(
            self.counts.nr_blocks, self.counts.nr_allocated, self.index_block, self.ref_count_root
        )
