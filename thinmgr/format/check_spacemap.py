"""Checking both space maps against the counts recomputed from the trees (sections 5.1, 6).

Loading a space map counts the metadata references of its own structures (index block or
index tree, bitmaps, ref-count tree); comparing then goes one bitmap at a time, so memory
stays proportional to one bitmap plus the referenced blocks, whatever ``nr_blocks`` says.

Severities: metadata counts above the expected value are leaks (non-fatal), below it fatal
(thin_check 0.9.0). Data counts: expected 0 but allocated is a leak (non-fatal), anything
else fatal (thin_check 1.x; 0.9.0 does not compare data counts at all). Summary fields
(``nr_allocated``, ``nr_free``, ``none_free_before``) are hints the kernel tolerates being
off, and thin_restore 0.9.0 leaves them one block off (section 13.4 item 2): warnings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from thinmgr.errors import CorruptMetadataError
from thinmgr.format.blocks import BlockSource
from thinmgr.format.btree import TreeWalk
from thinmgr.format.check_refs import (
    DATA_BITMAP,
    DATA_INDEX_TREE,
    DATA_REFCOUNT_TREE,
    METADATA_BITMAP,
    METADATA_INDEX,
    METADATA_REFCOUNT_TREE,
    MetadataRefs,
)
from thinmgr.format.check_report import Problems, Severity
from thinmgr.format.constants import (
    ENTRIES_PER_BITMAP,
    INDEX_VALUE_SIZE,
    MAX_METADATA_BITMAPS,
    REFCOUNT_VALUE_SIZE,
)
from thinmgr.format.spacemap import (
    IndexEntry,
    decode_bitmap,
    metadata_index,
    nr_bitmaps,
    read_bitmap,
)
from thinmgr.format.superblock import SpaceMapRoot

U64 = npt.NDArray[np.uint64]
U32 = npt.NDArray[np.uint32]

LISTED_PER_KIND = 20
METADATA_SM = "metadata space map"
DATA_SM = "data space map"


@dataclass
class LoadedSpaceMap:
    name: str
    root: SpaceMapRoot
    entries: list[IndexEntry | None]  # per bitmap; None where the bitmap is unusable
    overflow_keys: U64
    overflow_values: U32


def load_metadata_space_map(
    source: BlockSource, root: SpaceMapRoot, refs: MetadataRefs, problems: Problems
) -> LoadedSpaceMap | None:
    count = nr_bitmaps(root.nr_blocks)
    if count == 0 or count > MAX_METADATA_BITMAPS:
        return None  # reported with the superblock
    if not refs.reference(root.bitmap_root, METADATA_INDEX):
        return None
    try:
        index = metadata_index(source, root)
    except CorruptMetadataError as error:
        problems.from_error(error)
        return None
    entries = _load_bitmaps(
        source, index, kind=METADATA_BITMAP, sm_name=METADATA_SM, refs=refs, problems=problems
    )
    keys, values = _load_overflow(source, root, METADATA_REFCOUNT_TREE, refs, problems)
    return LoadedSpaceMap(METADATA_SM, root, entries, keys, values)


def load_data_space_map(
    source: BlockSource, root: SpaceMapRoot, refs: MetadataRefs, problems: Problems
) -> LoadedSpaceMap | None:
    count = nr_bitmaps(root.nr_blocks)
    if count > source.nr_blocks:
        # Every bitmap is a metadata block of its own: this many cannot exist.
        problems.fatal(
            DATA_SM,
            f"{root.nr_blocks} data blocks need {count} bitmaps, more "
            f"than the metadata device's {source.nr_blocks} blocks",
            0,
        )
        return None
    by_key: dict[int, IndexEntry] = {}
    walk = TreeWalk(
        source,
        root.bitmap_root,
        INDEX_VALUE_SIZE,
        DATA_INDEX_TREE,
        report=problems.reporter,
        check_occupancy=True,
        enter=refs.enter(DATA_INDEX_TREE),
    )
    for leaf in walk.leaves():
        for i, key in enumerate(leaf.key_list()):
            if key >= count:
                problems.fatal(
                    DATA_INDEX_TREE,
                    f"index entry for bitmap {key}, but "
                    f"{root.nr_blocks} blocks need only {count} bitmaps",
                    leaf.blocknr,
                )
                continue
            by_key[key] = IndexEntry.unpack(leaf.block, leaf.values_offset + 16 * i)
    index: list[IndexEntry | None] = [by_key.get(i) for i in range(count)]
    missing = [i for i, entry in enumerate(index) if entry is None]
    if missing:
        problems.fatal(
            DATA_INDEX_TREE,
            f"no index entry for {len(missing)} bitmap(s), the first is bitmap {missing[0]}",
            root.bitmap_root,
        )
    entries = _load_bitmaps(
        source, index, kind=DATA_BITMAP, sm_name=DATA_SM, refs=refs, problems=problems
    )
    keys, values = _load_overflow(source, root, DATA_REFCOUNT_TREE, refs, problems)
    return LoadedSpaceMap(DATA_SM, root, entries, keys, values)


def _load_bitmaps(
    source: BlockSource,
    index: list[IndexEntry] | list[IndexEntry | None],
    *,
    kind: str,
    sm_name: str,
    refs: MetadataRefs,
    problems: Problems,
) -> list[IndexEntry | None]:
    entries: list[IndexEntry | None] = []
    for i, entry in enumerate(index):
        if entry is None:
            entries.append(None)
            continue
        first = refs.reference(entry.blocknr, kind)
        if not first and refs.kinds.get(entry.blocknr) != kind:
            entries.append(None)  # cross-linked: reported by refs
            continue
        try:
            read_bitmap(source, entry.blocknr, f"{sm_name} bitmap {i}")
        except CorruptMetadataError as error:
            problems.from_error(error)
            entries.append(None)
            continue
        entries.append(entry)
    return entries


def _load_overflow(
    source: BlockSource, root: SpaceMapRoot, kind: str, refs: MetadataRefs, problems: Problems
) -> tuple[U64, U32]:
    keys: list[U64] = []
    values: list[U32] = []
    walk = TreeWalk(
        source,
        root.ref_count_root,
        REFCOUNT_VALUE_SIZE,
        kind,
        report=problems.reporter,
        check_occupancy=True,
        enter=refs.enter(kind),
    )
    for leaf in walk.leaves():
        keys.append(leaf.keys.copy())
        values.append(leaf.values_u32().copy())
    if not keys:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint32)
    # The walk has checked that keys increase across leaves, so the result is sorted.
    return np.concatenate(keys), np.concatenate(values)


@dataclass(frozen=True)
class CountRules:
    """How differences between expected and stored counts are judged and named."""

    metadata: bool  # metadata: actual > expected is a leak; data: only expected 0 is
    refs: MetadataRefs | None = None  # names what a metadata block is
    # Some mapping-tree nodes could not be read: their mappings are missing from the
    # expected data counts, so a stored count above the expected one is no finding of its
    # own. Those are summed up in one warning instead of drowning the real cause.
    mappings_damaged: bool = False


def compare_counts(
    source: BlockSource,
    sm: LoadedSpaceMap,
    expected_blocks: U64,
    expected_counts: U32,
    *,
    rules: CountRules,
    problems: Problems,
) -> None:
    """Compare the stored counts with the expected ones, bitmap by bitmap."""
    nr_blocks = sm.root.nr_blocks
    lister = _Lister(problems)
    allocated = 0
    complete = True
    for i, entry in enumerate(sm.entries):
        if entry is None:
            complete = False
            continue
        base = i * ENTRIES_PER_BITMAP
        valid = min(ENTRIES_PER_BITMAP, nr_blocks - base)
        structure = f"{sm.name} bitmap {i}"
        bits = decode_bitmap(source.read_block(entry.blocknr))
        _check_bitmap_summary(bits, valid, entry, structure, problems)
        allocated += int(np.count_nonzero(bits[:valid]))
        actual, comparable = _apply_overflow(
            sm,
            bits[:valid],
            base,
            structure=structure,
            bitmap_block=entry.blocknr,
            lister=lister,
        )
        lo, hi = np.searchsorted(expected_blocks, _bounds(base, base + valid)).tolist()
        expected = np.zeros(valid, dtype=np.uint32)
        expected[(expected_blocks[lo:hi] - np.uint64(base)).astype(np.intp)] = expected_counts[
            lo:hi
        ]
        _report_differences(
            actual,
            expected,
            comparable,
            base=base,
            structure=structure,
            bitmap_block=entry.blocknr,
            rules=rules,
            lister=lister,
        )
    if rules.metadata:
        beyond = np.flatnonzero(expected_blocks >= np.uint64(nr_blocks))
        for j in beyond.tolist():
            block = int(expected_blocks[j])
            kind = rules.refs.kind_of(block) if rules.refs else "block"
            lister.add(
                "beyond",
                Severity.FATAL,
                sm.name,
                f"block {block} ({kind}) is "
                f"referenced but lies beyond the space map's {nr_blocks} blocks",
                block,
            )
    lister.finish()
    if complete and allocated != sm.root.nr_allocated:
        problems.warning(
            sm.name,
            f"nr_allocated is {sm.root.nr_allocated} but the bitmaps "
            f"hold {allocated} allocated blocks",
            0,
        )


def _bounds(low: int, high: int) -> U64:
    # Searching a uint64 array with Python ints would convert the whole array to float.
    return np.array([low, high], dtype=np.uint64)


def _check_bitmap_summary(
    bits: npt.NDArray[np.uint8], valid: int, entry: IndexEntry, structure: str, problems: Problems
) -> None:
    used_valid = int(np.count_nonzero(bits[:valid]))
    used_all = int(np.count_nonzero(bits))
    if used_all != used_valid:
        problems.warning(
            structure,
            f"{used_all - used_valid} entries beyond the end of the space map are not free",
            entry.blocknr,
        )
    # The kernel counts nr_free against all 16320 entries, thin_restore 0.9.0 against the
    # entries below nr_blocks (section 6.3); both work, as the kernel only tests for 0.
    if entry.nr_free not in (ENTRIES_PER_BITMAP - used_all, valid - used_valid):
        problems.warning(
            structure,
            f"index entry says {entry.nr_free} free entries, the bitmap has {valid - used_valid}",
            entry.blocknr,
        )
    free = np.flatnonzero(bits[:valid] == 0)
    first_free = int(free[0]) if len(free) else valid
    if entry.none_free_before > first_free:
        problems.warning(
            structure,
            f"none_free_before is {entry.none_free_before} but entry "
            f"{first_free} is free (hidden from the allocator)",
            entry.blocknr,
        )


def _apply_overflow(
    sm: LoadedSpaceMap,
    bits: npt.NDArray[np.uint8],
    base: int,
    *,
    structure: str,
    bitmap_block: int,
    lister: _Lister,
) -> tuple[U32, npt.NDArray[np.bool_]]:
    """True counts of one bitmap's blocks, and which of them can be compared.

    An overflow entry exists iff the bitmap holds 3, and it holds the count, >= 3 (6.6).
    """
    actual = bits.astype(np.uint32)
    comparable = np.ones(len(bits), dtype=bool)
    lo, hi = np.searchsorted(sm.overflow_keys, _bounds(base, base + len(bits))).tolist()
    offsets = (sm.overflow_keys[lo:hi] - np.uint64(base)).astype(np.intp)
    counts = sm.overflow_values[lo:hi]
    tree = f"{sm.name} ref-count tree"
    has_entry = np.zeros(len(bits), dtype=bool)
    has_entry[offsets] = True
    for j in np.flatnonzero(bits[offsets] != 3).tolist():
        block = base + int(offsets[j])
        lister.add(
            "orphan",
            Severity.NON_FATAL,
            tree,
            f"overflow entry for block {block} "
            f"(count {int(counts[j])}) but its bitmap count is "
            f"{int(bits[offsets[j]])}",
            bitmap_block,
        )
    for j in np.flatnonzero((bits[offsets] == 3) & (counts < 3)).tolist():
        block = base + int(offsets[j])
        lister.add(
            "small",
            Severity.FATAL,
            tree,
            f"overflow count {int(counts[j])} of block {block} is below 3",
            bitmap_block,
        )
        comparable[offsets[j]] = False
    use = bits[offsets] == 3
    actual[offsets[use]] = counts[use]
    for off in np.flatnonzero((bits == 3) & ~has_entry).tolist():
        lister.add(
            "no-overflow",
            Severity.FATAL,
            structure,
            f"block {base + off} has bitmap count 3 but no entry in the ref-count tree",
            bitmap_block,
        )
        comparable[off] = False
    return actual, comparable


def _report_differences(
    actual: U32,
    expected: U32,
    comparable: npt.NDArray[np.bool_],
    *,
    base: int,
    structure: str,
    bitmap_block: int,
    rules: CountRules,
    lister: _Lister,
) -> None:
    differ = np.flatnonzero((actual != expected) & comparable)
    for off in differ.tolist():
        got, want, block = int(actual[off]), int(expected[off]), base + off
        if rules.metadata:
            kind = rules.refs.kind_of(block) if rules.refs else "block"
            severity = Severity.NON_FATAL if got > want else Severity.FATAL
            lister.add(
                f"meta-{severity.value}",
                severity,
                METADATA_SM,
                f"metadata reference counts differ for block {block} ({kind}): "
                f"expected {want}, but got {got}",
                block,
            )
        elif rules.mappings_damaged and got > want:
            lister.tally_unexplained(structure)
        else:
            severity = Severity.NON_FATAL if want == 0 else Severity.FATAL
            lister.add(
                f"data-{severity.value}",
                severity,
                structure,
                f"data reference counts differ for data block {block}: expected "
                f"{want}, but got {got}",
                bitmap_block,
            )


class _Lister:
    """Lists the first problems of each kind and counts the rest (bounded output)."""

    def __init__(self, problems: Problems) -> None:
        self.problems = problems
        self.seen: dict[str, tuple[int, Severity, str]] = {}
        self.unexplained = 0
        self.unexplained_structure = ""

    def tally_unexplained(self, structure: str) -> None:
        self.unexplained += 1
        self.unexplained_structure = self.unexplained_structure or structure

    def add(
        self, kind: str, severity: Severity, structure: str, message: str, block: int | None
    ) -> None:
        count, _, _ = self.seen.get(kind, (0, severity, structure))
        self.seen[kind] = (count + 1, severity, structure)
        if count < LISTED_PER_KIND:
            self.problems.add(severity, structure, message, block)

    def finish(self) -> None:
        for count, severity, structure in self.seen.values():
            if count > LISTED_PER_KIND:
                # Counted once more: each unlisted problem still decides the verdict.
                self.problems.add(
                    severity, structure, f"... and {count - LISTED_PER_KIND} more like the above"
                )
        if self.unexplained:
            self.problems.warning(
                self.unexplained_structure,
                f"{self.unexplained} data blocks have higher counts than the readable mappings "
                "explain: expected, given the unreadable mapping-tree nodes reported above",
            )
