"""Reading persistent-data btree nodes and walking trees (format section 3).

Every node read is validated: checksum with the btree salt, its own block number, flags
exactly INTERNAL or LEAF, a value size that matches the tree, a capacity that fits the
block, and an entry count within it. Walks also check key order across nodes, equal leaf
depth, and that no node is reached twice within one tree, so that corrupted or hostile
metadata can neither loop forever nor make the walk blow up.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

import numpy as np
import numpy.typing as npt

from thinmgr.errors import CorruptMetadataError
from thinmgr.format.blocks import BlockSource, read_checked
from thinmgr.format.checksum import checksum_ok
from thinmgr.format.constants import (
    BLOCK_SIZE,
    BTREE_CSUM_XOR,
    INTERNAL_NODE,
    LEAF_NODE,
    MAX_BTREE_DEPTH,
    NODE_HEADER_SIZE,
)

_HEADER = struct.Struct("<IIQIII")


class Node:
    """A validated btree node. Keys are decoded eagerly; values on demand."""

    __slots__ = ("block", "blocknr", "flags", "keys", "max_entries", "nr_entries", "value_size")

    def __init__(
        self,
        block: bytes | memoryview,
        blocknr: int,
        flags: int,
        nr_entries: int,
        max_entries: int,
        value_size: int,
    ) -> None:
        self.block = block
        self.blocknr = blocknr
        self.flags = flags
        self.nr_entries = nr_entries
        self.max_entries = max_entries
        self.value_size = value_size
        # A zero-copy view: a 1M-mapping dump touches 4,000 leaves, and numpy keeps the
        # per-entry work (order checks, run detection) out of Python loops.
        self.keys: npt.NDArray[np.uint64] = np.frombuffer(
            block, dtype="<u8", count=nr_entries, offset=NODE_HEADER_SIZE
        )

    @property
    def is_leaf(self) -> bool:
        return self.flags == LEAF_NODE

    @property
    def values_offset(self) -> int:
        # The on-disk max_entries decides where values start (section 3.3).
        return NODE_HEADER_SIZE + 8 * self.max_entries

    def values_u64(self) -> npt.NDArray[np.uint64]:
        return np.frombuffer(
            self.block, dtype="<u8", count=self.nr_entries, offset=self.values_offset
        )

    def values_u32(self) -> npt.NDArray[np.uint32]:
        return np.frombuffer(
            self.block, dtype="<u4", count=self.nr_entries, offset=self.values_offset
        )

    def key_list(self) -> list[int]:
        return self.keys.tolist()  # type: ignore[no-any-return]

    def child_list(self) -> list[int]:
        return self.values_u64().tolist()  # type: ignore[no-any-return]

    def value_bytes(self, index: int) -> bytes:
        start = self.values_offset + index * self.value_size
        return bytes(self.block[start : start + self.value_size])


def parse_node(
    block: bytes | memoryview, blocknr: int, leaf_value_size: int, structure: str
) -> Node:
    """Validate and decode one node read from ``blocknr``."""
    if not checksum_ok(block, BTREE_CSUM_XOR):
        raise CorruptMetadataError("bad checksum in btree node", block=blocknr, structure=structure)
    _, flags, self_nr, nr_entries, max_entries, value_size = _HEADER.unpack_from(block, 0)
    if self_nr != blocknr:
        raise CorruptMetadataError(
            f"bad block nr in btree node (says {self_nr})", block=blocknr, structure=structure
        )
    if flags not in (INTERNAL_NODE, LEAF_NODE):
        raise CorruptMetadataError(
            f"btree node flags {flags:#x} are neither internal nor leaf",
            block=blocknr,
            structure=structure,
        )
    expected_vsize = 8 if flags == INTERNAL_NODE else leaf_value_size
    if value_size != expected_vsize:
        kind = "internal node" if flags == INTERNAL_NODE else "leaf"
        raise CorruptMetadataError(
            f"{kind} value size {value_size}, expected {expected_vsize}",
            block=blocknr,
            structure=structure,
        )
    if (
        max_entries == 0
        or max_entries % 3
        or NODE_HEADER_SIZE + max_entries * (8 + value_size) > BLOCK_SIZE
    ):
        raise CorruptMetadataError(
            f"max_entries {max_entries} is impossible for value size {value_size}",
            block=blocknr,
            structure=structure,
        )
    if nr_entries > max_entries:
        raise CorruptMetadataError(
            f"nr_entries {nr_entries} exceeds max_entries {max_entries}",
            block=blocknr,
            structure=structure,
        )
    return Node(block, blocknr, flags, nr_entries, max_entries, value_size)


def read_node(source: BlockSource, blocknr: int, leaf_value_size: int, structure: str) -> Node:
    return parse_node(read_checked(source, blocknr, structure), blocknr, leaf_value_size, structure)


Reporter = Callable[[CorruptMetadataError], None]


def _raise(error: CorruptMetadataError) -> None:
    raise error


class TreeWalk:
    """Walks one btree in key order, yielding its leaves.

    ``report`` receives every problem found; the default raises, so a reader stops at the
    first fault. A checker passes a collecting reporter: the faulty subtree is then skipped
    and the walk goes on. ``check_occupancy`` adds the "too few entries" rule that
    thin_check applies to non-root nodes (section 3.5, item 4).

    ``enter(blocknr)`` is called for every internal node and leaf before it is read; return
    False to skip that subtree (a checker counting references descends shared nodes once).
    """

    def __init__(
        self,
        source: BlockSource,
        root: int,
        leaf_value_size: int,
        structure: str,
        *,
        report: Reporter = _raise,
        check_occupancy: bool = False,
        enter: Callable[[int], bool] | None = None,
    ) -> None:
        self.source = source
        self.root = root
        self.leaf_value_size = leaf_value_size
        self.structure = structure
        self.report = report
        self.check_occupancy = check_occupancy
        self.enter = enter
        self.leaf_depth: int | None = None
        self.last_key: int | None = None
        # Every node entered, so that none is walked twice: a cross-linked subtree (one node
        # under two parents of the same tree) could otherwise multiply the work by the
        # fan-out at every level (252^depth). The current root-to-node path tells a cycle
        # from a cross-link in the message.
        self._seen: set[int] = set()
        self._path: list[int] = []

    def leaves(self) -> Iterator[Node]:
        yield from self._walk(self.root, 0, None)

    def _problem(self, message: str, blocknr: int) -> None:
        self.report(CorruptMetadataError(message, block=blocknr, structure=self.structure))

    def _revisit_problem(self, blocknr: int) -> None:
        parent = self._path[-1] if self._path else None
        if blocknr == parent:
            self._problem("btree node lists itself as its own child (cycle)", blocknr)
        elif blocknr in self._path:
            self._problem(f"btree node {parent} points back to its ancestor (cycle)", blocknr)
        else:
            self._problem(
                f"btree node reached a second time, from node {parent}: two "
                "parents share it (cross-link)",
                blocknr,
            )

    def _walk(self, blocknr: int, depth: int, parent_key: int | None) -> Iterator[Node]:
        if depth > MAX_BTREE_DEPTH:
            self._problem("btree deeper than any valid tree (cycle between nodes?)", blocknr)
            return
        if blocknr in self._seen:
            self._revisit_problem(blocknr)
            return
        self._seen.add(blocknr)
        if self.enter is not None and not self.enter(blocknr):
            return
        try:
            node = read_node(self.source, blocknr, self.leaf_value_size, self.structure)
        except CorruptMetadataError as error:
            self.report(error)
            return
        if not self._node_ok(node, depth, parent_key):
            return
        if node.is_leaf:
            if self.leaf_depth is None:
                self.leaf_depth = depth
            elif self.leaf_depth != depth:
                self._problem(f"leaf at depth {depth}, other leaves at {self.leaf_depth}", blocknr)
                return
            if node.nr_entries:
                self.last_key = int(node.keys[-1])
            yield node
            return
        self._path.append(blocknr)
        try:
            for key, child in zip(node.key_list(), node.child_list(), strict=True):
                yield from self._walk(child, depth + 1, key)
        finally:
            self._path.pop()

    def _node_ok(self, node: Node, depth: int, parent_key: int | None) -> bool:
        keys = node.keys
        if depth > 0 and node.nr_entries == 0:
            self._problem("empty non-root node", node.blocknr)
            return False
        if node.nr_entries > 1 and not bool(np.all(keys[1:] > keys[:-1])):
            self._problem("keys are not strictly increasing", node.blocknr)
            return False
        if node.nr_entries:
            first = int(keys[0])
            if parent_key is not None and first < parent_key:
                self._problem(
                    f"first key {first} is below its parent's key {parent_key}", node.blocknr
                )
                return False
            if self.last_key is not None and first <= self.last_key:
                self._problem(
                    f"first key {first} does not follow the previous leaf's last "
                    f"key {self.last_key}",
                    node.blocknr,
                )
                return False
        if self.check_occupancy and depth > 0 and node.nr_entries < node.max_entries // 3:
            # Reported but the subtree is still walked: the data in it is readable.
            self._problem(
                f"too few entries in btree node ({node.nr_entries} < {node.max_entries // 3})",
                node.blocknr,
            )
        return True


def lookup(
    source: BlockSource, root: int, key: int, leaf_value_size: int, structure: str
) -> tuple[Node, int] | None:
    """Exact-match lookup: the leaf and index holding ``key``, or None."""
    blocknr = root
    probe = np.uint64(key)
    for _ in range(MAX_BTREE_DEPTH + 1):
        node = read_node(source, blocknr, leaf_value_size, structure)
        if node.is_leaf:
            i = int(np.searchsorted(node.keys, probe, side="left"))
            if i < node.nr_entries and int(node.keys[i]) == key:
                return node, i
            return None
        i = int(np.searchsorted(node.keys, probe, side="right")) - 1
        if i < 0:
            return None
        blocknr = int(node.values_u64()[i])
    raise CorruptMetadataError(
        "btree deeper than any valid tree (cycle between nodes?)", block=root, structure=structure
    )
