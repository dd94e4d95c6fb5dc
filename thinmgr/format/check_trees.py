"""Checking the device details tree and both levels of the mapping tree (sections 3.5, 4).

Walks use ``TreeWalk`` with a collecting reporter, so that a bad subtree is reported and
skipped while the rest is still checked, and with a ``MetadataRefs`` enter hook, so that a
node shared between devices (snapshots) or with the held metadata snapshot is counted once
per reference and descended once. Per-mapping work (data block counts, range and time
checks) is done on concatenated numpy arrays, once per distinct leaf.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from thinmgr.errors import CorruptMetadataError
from thinmgr.format.blocks import BlockSource
from thinmgr.format.btree import TreeWalk, read_node
from thinmgr.format.check_refs import (
    BOTTOM_MAPPING_TREE,
    DETAILS_TREE,
    TOP_MAPPING_TREE,
    MetadataRefs,
)
from thinmgr.format.check_report import Problems, Severity
from thinmgr.format.constants import DETAILS_VALUE_SIZE, MAPPING_VALUE_SIZE, MAX_BTREE_DEPTH
from thinmgr.format.metadata import DeviceDetails

U64 = npt.NDArray[np.uint64]

# How many individual mappings a problem kind lists before it summarises the rest.
LISTED_PER_KIND = 10


@dataclass
class DetailsEntry:
    details: DeviceDetails
    leaf: int  # the details leaf holding it, named in problems


def check_details_tree(
    source: BlockSource, root: int, label: str, refs: MetadataRefs, problems: Problems
) -> dict[int, DetailsEntry]:
    """Walk one device details tree; device id -> details."""
    devices: dict[int, DetailsEntry] = {}
    walk = TreeWalk(
        source,
        root,
        DETAILS_VALUE_SIZE,
        f"{label}{DETAILS_TREE}",
        report=problems.reporter,
        check_occupancy=True,
        enter=refs.enter(DETAILS_TREE),
    )
    for leaf in walk.leaves():
        offset = leaf.values_offset
        for i, dev in enumerate(leaf.key_list()):
            details = DeviceDetails.unpack(leaf.block, offset + DETAILS_VALUE_SIZE * i)
            devices[dev] = DetailsEntry(details, leaf.blocknr)
    return devices


def check_top_level(
    source: BlockSource, root: int, label: str, refs: MetadataRefs, problems: Problems
) -> dict[int, int]:
    """Walk the top level of one mapping tree; device id -> root of its block tree."""
    roots: dict[int, int] = {}
    walk = TreeWalk(
        source,
        root,
        MAPPING_VALUE_SIZE,
        f"{label}{TOP_MAPPING_TREE}",
        report=problems.reporter,
        check_occupancy=True,
        enter=refs.enter(TOP_MAPPING_TREE),
    )
    for leaf in walk.leaves():
        roots.update(zip(leaf.key_list(), leaf.child_list(), strict=True))
    return roots


def cross_check_devices(
    details: dict[int, DetailsEntry],
    roots: dict[int, int],
    label: str,
    *,
    details_root: int,
    mapping_root: int,
    problems: Problems,
) -> None:
    """Every device must be in both trees (thin_check: "missing devices", fatal)."""
    for dev in sorted(roots.keys() - details.keys()):
        problems.fatal(
            f"{label}{TOP_MAPPING_TREE}",
            f"mappings present for device {dev}, but it isn't present in the device details tree",
            mapping_root,
        )
    for dev in sorted(details.keys() - roots.keys()):
        problems.fatal(
            f"{label}{DETAILS_TREE}", f"device {dev} has details but no mapping tree", details_root
        )


@dataclass
class MappingScan:
    """The bottom level of every mapping tree walked so far, each leaf once."""

    source: BlockSource
    refs: MetadataRefs
    problems: Problems
    leaf_entries: dict[int, int] = field(default_factory=dict)
    _values: list[U64] = field(default_factory=list)
    _leaf_ids: list[int] = field(default_factory=list)
    _mapped_memo: dict[int, int] = field(default_factory=dict)

    def walk_device(self, dev: int, root: int, label: str) -> None:
        walk = TreeWalk(
            self.source,
            root,
            MAPPING_VALUE_SIZE,
            f"{label}mapping tree of device {dev}",
            report=self.problems.reporter,
            check_occupancy=True,
            enter=self.refs.enter(BOTTOM_MAPPING_TREE),
        )
        for leaf in walk.leaves():
            self.leaf_entries[leaf.blocknr] = leaf.nr_entries
            if leaf.nr_entries:
                # A copy, so that no view of the device outlives the check.
                self._values.append(leaf.values_u64().copy())
                self._leaf_ids.append(leaf.blocknr)

    def mapped_under(self, blocknr: int) -> int:
        """Number of mappings in the subtree at ``blocknr`` (shared subtrees included)."""
        return self._mapped(blocknr, 0, set())

    def _mapped(self, blocknr: int, depth: int, path: set[int]) -> int:
        known = self._mapped_memo.get(blocknr)
        if known is not None:
            return known
        entries = self.leaf_entries.get(blocknr)
        if entries is not None:
            return entries
        if depth > MAX_BTREE_DEPTH or blocknr in path:
            return 0  # a cycle: already reported by the walk
        try:
            node = read_node(self.source, blocknr, MAPPING_VALUE_SIZE, BOTTOM_MAPPING_TREE)
        except CorruptMetadataError:
            return 0  # already reported by the walk
        if node.is_leaf:
            total = node.nr_entries
        else:
            path.add(blocknr)
            total = sum(self._mapped(child, depth + 1, path) for child in node.child_list())
            path.discard(blocknr)
        self._mapped_memo[blocknr] = total
        return total

    def arrays(self) -> tuple[U64, LeafLocator]:
        """The values of every distinct leaf walked, and how to find the leaf of each."""
        if not self._values:
            return np.zeros(0, dtype=np.uint64), LeafLocator([], [])
        sizes = [len(v) for v in self._values]
        return np.concatenate(self._values), LeafLocator(self._leaf_ids, sizes)


class LeafLocator:
    """Which leaf holds the i-th value of ``MappingScan.arrays``; only needed for problems,
    so no per-value array is built."""

    def __init__(self, leaf_ids: list[int], sizes: list[int]) -> None:
        self.leaf_ids = leaf_ids
        self.ends = np.cumsum(np.asarray(sizes, dtype=np.int64))

    def __call__(self, index: int) -> int:
        return self.leaf_ids[int(np.searchsorted(self.ends, index, side="right"))]


def check_mapped_blocks(
    details: dict[int, DetailsEntry],
    roots: dict[int, int],
    label: str,
    scan: MappingScan,
    problems: Problems,
) -> int:
    """Compare each device's ``mapped_blocks`` with its tree (fatal, as in thin_check 1.x).

    Returns the number of mappings of the devices present in both trees.
    """
    total = 0
    for dev in sorted(details.keys() & roots.keys()):
        counted = scan.mapped_under(roots[dev])
        total += counted
        entry = details[dev]
        if entry.details.mapped_blocks != counted:
            problems.fatal(
                f"{label}{DETAILS_TREE}",
                f"device {dev}: mapped_blocks is {entry.details.mapped_blocks} but "
                f"its mapping tree holds {counted} mappings",
                entry.leaf,
            )
    return total


def check_mapping_values(
    values: U64,
    leaf_of: LeafLocator,
    nr_data_blocks: int | None,
    superblock_time: int,
    problems: Problems,
) -> U64:
    """Range and time checks of every mapping; returns the in-range data block numbers.

    ``nr_data_blocks`` None means the data device size is unknown (a metadata snapshot).
    """
    data = values >> np.uint64(24)
    if nr_data_blocks is not None:
        beyond = data >= np.uint64(nr_data_blocks)
        _report_each(
            beyond,
            data,
            leaf_of,
            problems,
            severity=Severity.FATAL,
            describe=lambda d: (
                f"mapping to data block {d}, beyond the data device ({nr_data_blocks} blocks)"
            ),
        )
        if beyond.any():
            data = data[~beyond]
    times = values & np.uint64(0xFFFFFF)
    late = times > np.uint64(superblock_time)
    _report_each(
        late,
        times,
        leaf_of,
        problems,
        severity=Severity.WARNING,
        describe=lambda t: f"mapping time {t} is later than the superblock time {superblock_time}",
    )
    return data


def _report_each(
    mask: npt.NDArray[np.bool_],
    shown: U64,
    leaf_of: LeafLocator,
    problems: Problems,
    *,
    severity: Severity,
    describe: Callable[[int], str],
) -> None:
    hits = np.flatnonzero(mask)
    for i in hits[:LISTED_PER_KIND].tolist():
        problems.add(severity, BOTTOM_MAPPING_TREE, describe(int(shown[i])), leaf_of(i))
    if len(hits) > LISTED_PER_KIND:
        problems.add(
            severity,
            BOTTOM_MAPPING_TREE,
            f"... and {len(hits) - LISTED_PER_KIND} more mappings like the above",
        )
