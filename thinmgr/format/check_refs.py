"""The expected metadata reference counts, recomputed from the structures (format section 5.1).

Every pointer to a metadata block found while walking from the superblock counts one
reference: the superblock itself, the held snapshot copy, each tree root per superblock or
top-level leaf entry naming it, each non-root node per parent entry, the metadata index
block, each bitmap per index entry, every node of the space-map trees. A node met a second
time (a subtree shared by snapshots) is counted again but not descended again, which is
exactly what thin_check 0.9.0 compares with the metadata space map.

Each block also remembers what it was first met as. A block reached as two different kinds
of structure (a details node that is also a mapping node, a bitmap that is also a tree node)
is cross-linked, and is reported instead of being parsed a second way.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from thinmgr.format.check_report import Problems

SUPERBLOCK = "superblock"
SNAPSHOT_SUPERBLOCK = "metadata snapshot superblock"
DETAILS_TREE = "device details tree"
TOP_MAPPING_TREE = "mapping tree (top level)"
BOTTOM_MAPPING_TREE = "mapping tree (bottom level)"
METADATA_INDEX = "metadata space map index"
METADATA_BITMAP = "metadata space map bitmap"
METADATA_REFCOUNT_TREE = "metadata space map ref-count tree"
DATA_INDEX_TREE = "data space map index"
DATA_BITMAP = "data space map bitmap"
DATA_REFCOUNT_TREE = "data space map ref-count tree"


class MetadataRefs:
    """Reference counts per metadata block, and what each block is."""

    def __init__(self, problems: Problems) -> None:
        self.problems = problems
        self.counts: dict[int, int] = {}
        self.kinds: dict[int, str] = {}

    def reference(self, blocknr: int, kind: str) -> bool:
        """Count one reference to ``blocknr``; True if it is met for the first time.

        Out-of-range block numbers are counted too (the read that follows reports them) so
        that a space-map comparison can say that a referenced block lies beyond the map.
        """
        self.counts[blocknr] = self.counts.get(blocknr, 0) + 1
        known = self.kinds.get(blocknr)
        if known is None:
            self.kinds[blocknr] = kind
            return True
        if known != kind:
            self.problems.fatal(kind, f"block is also used as {known} (cross-linked)", blocknr)
        return False

    def enter(self, kind: str) -> Callable[[int], bool]:
        """A ``TreeWalk`` enter hook counting every node reference of one kind of tree."""
        return lambda blocknr: self.reference(blocknr, kind)

    def kind_of(self, blocknr: int) -> str:
        return self.kinds.get(blocknr, "unreferenced block")

    def as_arrays(self) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint32]]:
        """(blocks ascending, counts) of every referenced block."""
        blocks = np.fromiter(self.counts.keys(), dtype=np.uint64, count=len(self.counts))
        counts = np.fromiter(self.counts.values(), dtype=np.uint32, count=len(self.counts))
        order = np.argsort(blocks)
        return blocks[order], counts[order]
