"""Space maps: bitmaps, the metadata index block, the data index btree and the overflow
reference-count trees (format section 6).

Counts are decoded into numpy arrays: a 16 GiB metadata device has four million entries and
a large data device many more, which Python integers per entry would make slow.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from thinmgr.errors import CorruptMetadataError
from thinmgr.format.blocks import BlockSource, read_checked
from thinmgr.format.btree import Reporter, TreeWalk, _raise
from thinmgr.format.checksum import checksum_ok, seal
from thinmgr.format.constants import (
    BITMAP_CSUM_XOR,
    BITMAP_HEADER_SIZE,
    BLOCK_SIZE,
    ENTRIES_PER_BITMAP,
    INDEX_CSUM_XOR,
    INDEX_VALUE_SIZE,
    MAX_METADATA_BITMAPS,
    REFCOUNT_VALUE_SIZE,
)
from thinmgr.format.superblock import SpaceMapRoot

Counts = npt.NDArray[np.uint32]

_INDEX_ENTRY = struct.Struct("<QII")
_BLOCK_HEADER = struct.Struct("<IIQ")
_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)


@dataclass(frozen=True)
class IndexEntry:
    """``disk_index_entry``: where a bitmap lives and its free-space summary (section 6.3)."""

    blocknr: int
    nr_free: int
    none_free_before: int

    @classmethod
    def unpack(cls, raw: bytes | memoryview, offset: int = 0) -> IndexEntry:
        return cls(*_INDEX_ENTRY.unpack_from(raw, offset))

    def pack(self) -> bytes:
        return _INDEX_ENTRY.pack(self.blocknr, self.nr_free, self.none_free_before)


def nr_bitmaps(nr_blocks: int) -> int:
    return -(-nr_blocks // ENTRIES_PER_BITMAP)


def check_bitmaps_fit(source: BlockSource, root: SpaceMapRoot, structure: str) -> int:
    """The number of bitmaps ``root`` needs, refused if the metadata device cannot hold them.

    Every bitmap is a metadata block of its own, so a space map claiming more blocks than
    ``16320 x metadata device blocks`` is corrupt. This bounds everything sized by
    ``nr_blocks`` (the index, the count array) by the size of the device, whatever a
    hostile superblock says (e.g. nr_blocks = 2^63).
    """
    count = nr_bitmaps(root.nr_blocks)
    if count > source.nr_blocks:
        raise CorruptMetadataError(
            f"{root.nr_blocks} blocks need {count} bitmaps, more than the "
            f"{source.nr_blocks} blocks of the metadata device",
            block=root.bitmap_root,
            structure=structure,
        )
    return count


def _check_self(block: bytes | memoryview, blocknr: int, salt: int, structure: str) -> None:
    if not checksum_ok(block, salt):
        raise CorruptMetadataError("bad checksum", block=blocknr, structure=structure)
    self_nr = _BLOCK_HEADER.unpack_from(block, 0)[2]
    if self_nr != blocknr:
        raise CorruptMetadataError(
            f"bad block nr (says {self_nr})", block=blocknr, structure=structure
        )


def metadata_index(source: BlockSource, root: SpaceMapRoot) -> list[IndexEntry]:
    """The entries of the metadata space map's single index block (section 6.4)."""
    structure = "metadata space map index"
    count = check_bitmaps_fit(source, root, structure)
    if count > MAX_METADATA_BITMAPS:
        raise CorruptMetadataError(
            f"{root.nr_blocks} metadata blocks need {count} bitmaps, the index holds 255",
            block=root.bitmap_root,
            structure=structure,
        )
    block = read_checked(source, root.bitmap_root, structure)
    _check_self(block, root.bitmap_root, INDEX_CSUM_XOR, structure)
    return [IndexEntry.unpack(block, 16 + 16 * i) for i in range(count)]


def data_index(
    source: BlockSource, root: SpaceMapRoot, *, report: Reporter = _raise
) -> list[IndexEntry]:
    """The entries of the data space map's index btree (section 6.5): keys 0..n-1, dense."""
    structure = "data space map index"
    expected = check_bitmaps_fit(source, root, structure)
    entries: list[IndexEntry] = []
    walk = TreeWalk(source, root.bitmap_root, INDEX_VALUE_SIZE, structure, report=report)
    for leaf in walk.leaves():
        for i, key in enumerate(leaf.key_list()):
            if key != len(entries) or key >= expected:
                raise CorruptMetadataError(
                    f"index key {key}, expected {len(entries)} (of {expected} bitmaps)",
                    block=leaf.blocknr,
                    structure=structure,
                )
            entries.append(IndexEntry.unpack(leaf.block, leaf.values_offset + 16 * i))
    if len(entries) != expected:
        raise CorruptMetadataError(
            f"{len(entries)} bitmaps for {root.nr_blocks} blocks, expected {expected}",
            block=root.bitmap_root,
            structure=structure,
        )
    return entries


def read_bitmap(source: BlockSource, blocknr: int, structure: str) -> bytes | memoryview:
    block = read_checked(source, blocknr, structure)
    _check_self(block, blocknr, BITMAP_CSUM_XOR, structure)
    return block


def decode_bitmap(block: bytes | memoryview) -> npt.NDArray[np.uint8]:
    """The 16320 two-bit counts of a bitmap block.

    The lower-numbered bit of each pair is the *high* bit of the count (section 6.2).
    """
    raw = np.frombuffer(block, dtype=np.uint8, offset=BITMAP_HEADER_SIZE)
    pairs = (raw[:, None] >> _SHIFTS) & 3
    counts = (((pairs & 1) << 1) | (pairs >> 1)).astype(np.uint8, copy=False)
    return counts.reshape(-1)


def encode_bitmap(counts: npt.NDArray[np.integer], blocknr: int) -> bytearray:
    """A sealed bitmap block for up to 16320 counts (values > 2 are stored as 3)."""
    entries = np.zeros(ENTRIES_PER_BITMAP, dtype=np.uint8)
    entries[: len(counts)] = np.minimum(counts, 3)
    swapped = ((entries & 1) << 1) | (entries >> 1)
    packed = (swapped.reshape(-1, 4) << _SHIFTS).sum(axis=1, dtype=np.uint8)
    block = bytearray(BLOCK_SIZE)
    _BLOCK_HEADER.pack_into(block, 0, 0, 0, blocknr)
    block[BITMAP_HEADER_SIZE:] = packed.tobytes()
    seal(block, BITMAP_CSUM_XOR)
    return block


def encode_metadata_index(entries: list[IndexEntry], blocknr: int) -> bytearray:
    block = bytearray(BLOCK_SIZE)
    _BLOCK_HEADER.pack_into(block, 0, 0, 0, blocknr)
    for i, entry in enumerate(entries):
        block[16 + 16 * i : 32 + 16 * i] = entry.pack()
    seal(block, INDEX_CSUM_XOR)
    return block


def overflow_counts(
    source: BlockSource, ref_count_root: int, structure: str, *, report: Reporter = _raise
) -> dict[int, int]:
    """The true counts of blocks whose bitmap entry is 3 (section 6.6)."""
    counts: dict[int, int] = {}
    walk = TreeWalk(source, ref_count_root, REFCOUNT_VALUE_SIZE, structure, report=report)
    for leaf in walk.leaves():
        counts.update(zip(leaf.key_list(), leaf.values_u32().tolist(), strict=True))
    return counts


@dataclass
class SpaceMapCounts:
    """The decoded reference counts of one space map, with where they came from."""

    counts: Counts
    index: list[IndexEntry]
    overflow: dict[int, int]


def read_counts(
    source: BlockSource,
    root: SpaceMapRoot,
    index: list[IndexEntry],
    structure: str,
    *,
    report: Reporter = _raise,
) -> SpaceMapCounts:
    """Every block's count: bitmaps first, then 3s replaced from the overflow tree.

    ``index`` must be the one ``metadata_index``/``data_index`` returned for ``root``: one
    entry per bitmap that ``root.nr_blocks`` needs, which bounds the count array.
    """
    needed = check_bitmaps_fit(source, root, structure)
    if len(index) != needed:
        raise CorruptMetadataError(
            f"{len(index)} index entries for {root.nr_blocks} blocks, expected {needed}",
            block=root.bitmap_root,
            structure=structure,
        )
    counts = np.zeros(len(index) * ENTRIES_PER_BITMAP, dtype=np.uint32)
    for i, entry in enumerate(index):
        block = read_bitmap(source, entry.blocknr, f"{structure} bitmap {i}")
        counts[i * ENTRIES_PER_BITMAP : (i + 1) * ENTRIES_PER_BITMAP] = decode_bitmap(block)
    overflow = overflow_counts(
        source, root.ref_count_root, f"{structure} ref-count tree", report=report
    )
    for blocknr, count in overflow.items():
        if blocknr < len(counts):
            counts[blocknr] = count
    return SpaceMapCounts(counts[: root.nr_blocks], index, overflow)
