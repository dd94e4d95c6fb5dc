"""What insert, remove and delete share (kernel ``dm-btree.c``, ``dm-btree-spine.c``).

``ValueType`` is ``struct dm_btree_value_type``: the value size and the inc/dec/equal
callbacks that make values reference counted (section 5.2). ``BtreeInfo`` is
``struct dm_btree_info``: a transaction manager, a number of levels, the leaf value type.
Values travel as packed little-endian bytes, as they sit in the node.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from thinmgr.format.constants import MAX_BTREE_DEPTH
from thinmgr.format.txn.node import BNode

if TYPE_CHECKING:
    from thinmgr.format.txn.tm import TransactionManager

_U64 = struct.Struct("<Q")
ValueOp = Callable[[Sequence[bytes]], None]


def pack_u64(value: int) -> bytes:
    return _U64.pack(value)


def u64(raw: bytes) -> int:
    return int.from_bytes(raw, "little")


@dataclass(frozen=True)
class ValueType:
    """``struct dm_btree_value_type``: size, and inc/dec/equal (None: not counted)."""

    size: int
    inc: ValueOp | None = None
    dec: ValueOp | None = None
    equal: Callable[[bytes, bytes], bool] | None = None


@dataclass(frozen=True)
class BtreeInfo:
    """``struct dm_btree_info``: ``levels`` nested trees whose last level holds ``value_type``."""

    tm: TransactionManager
    levels: int
    value_type: ValueType

    @property
    def le64_type(self) -> ValueType:
        """``init_le64_type``: values of the upper levels are metadata block references."""
        tm = self.tm

        def inc(values: Sequence[bytes]) -> None:
            for raw in values:
                tm.inc(u64(raw))

        def dec(values: Sequence[bytes]) -> None:
            for raw in values:
                tm.dec(u64(raw))

        return ValueType(8, inc, dec)


def lower_bound(keys: list[int], key: int) -> int:
    """The kernel's ``lower_bound``: the largest i with keys[i] <= key, or -1."""
    return bisect_right(keys, key) - 1


def inc_children(tm: TransactionManager, node: BNode, vt: ValueType) -> None:
    """``inc_children``: a copy of a shared node adds one reference to all it points at."""
    if not node.is_leaf:
        for raw in node.values:
            tm.inc(u64(raw))
    elif vt.inc is not None:
        vt.inc(node.values)


def empty_tree(tm: TransactionManager, value_size: int) -> int:
    """``dm_btree_empty``: a new root leaf with no entries."""
    return tm.new_leaf(value_size).blocknr


class Spine:
    """``struct shadow_spine``: the node being worked on and its parent, both shadowed."""

    def __init__(self, tm: TransactionManager) -> None:
        self.tm = tm
        self.parent: BNode | None = None
        self.current: BNode | None = None
        self.root: int | None = None
        self.steps = 0

    def step(self, blocknr: int, vt: ValueType) -> BNode:
        """``shadow_step``: shadow the next node down (``bn_shadow``, with inc_children)."""
        self.steps += 1
        if self.steps > 2 * (MAX_BTREE_DEPTH + 1):
            from thinmgr.errors import CorruptMetadataError

            raise CorruptMetadataError(
                "btree deeper than any valid tree (cycle between nodes?)",
                block=blocknr,
                structure="btree",
            )
        node, shared = self.tm.shadow_node(blocknr, vt.size)
        if shared:
            inc_children(self.tm, node, vt)
        if self.current is not None:
            self.parent = self.current
        self.current = node
        if self.root is None:
            self.root = node.blocknr
        return node


def shadow_child(tm: TransactionManager, vt: ValueType, parent: BNode, index: int) -> BNode:
    """``shadow_child``/``init_child``: shadow a child and point the parent at the copy."""
    node, shared = tm.shadow_node(u64(parent.values[index]), vt.size)
    if shared:
        inc_children(tm, node, vt)
    parent.values[index] = pack_u64(node.blocknr)
    return node


def lookup(info: BtreeInfo, root: int, keys: Sequence[int]) -> bytes | None:
    """``dm_btree_lookup``: exact match through every level, or None."""
    tm = info.tm
    block = root
    for level, key in enumerate(keys):
        last = level == info.levels - 1
        vsize = info.value_type.size if last else 8
        for _ in range(MAX_BTREE_DEPTH + 1):
            node = tm.read_node(block, vsize)
            i = lower_bound(node.keys, key)
            if node.is_leaf:
                if i < 0 or node.keys[i] != key:
                    return None
                if last:
                    return node.values[i]
                block = u64(node.values[i])
                break
            if i < 0:
                return None
            block = u64(node.values[i])
        else:
            from thinmgr.errors import CorruptMetadataError

            raise CorruptMetadataError(
                "btree deeper than any valid tree", block=root, structure="btree"
            )
    return None


def delete_tree(info: BtreeInfo, root: int) -> None:
    """``dm_btree_del``: drop one reference to a whole (multi-level) tree.

    A shared node (count > 1) is only decremented; its children are left alone. An unshared
    node is descended, its children released, then it is decremented itself. At the leaves
    of the last level the value type's ``dec`` runs (data blocks for mappings); the leaves
    of upper levels lead to the next level's roots.
    """
    tm = info.tm
    # Frames: (node, next child index, level); push_frame's shared test decides descent.
    stack: list[tuple[BNode, int, int]] = []

    def push(blocknr: int, level: int) -> None:
        if tm.ref(blocknr) > 1:
            tm.dec(blocknr)
            return
        if len(stack) > info.levels * (MAX_BTREE_DEPTH + 1):
            from thinmgr.errors import CorruptMetadataError

            raise CorruptMetadataError(
                "btree deeper than any valid tree", block=blocknr, structure="btree"
            )
        last = level == info.levels - 1
        node = tm.read_node(blocknr, info.value_type.size if last else 8)
        stack.append((node, 0, level))

    push(root, 0)
    while stack:
        node, child, level = stack[-1]
        if child >= node.nr_entries:
            stack.pop()
            tm.dec(node.blocknr)
            continue
        if not node.is_leaf:
            stack[-1] = (node, child + 1, level)
            push(u64(node.values[child]), level)
        elif level < info.levels - 1:
            stack[-1] = (node, child + 1, level)
            push(u64(node.values[child]), level + 1)
        else:
            if info.value_type.dec is not None:
                info.value_type.dec(node.values)
            stack[-1] = (node, node.nr_entries, level)
