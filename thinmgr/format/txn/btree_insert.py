"""Btree insertion exactly as the kernel does it (``dm-btree.c``: ``insert``,
``btree_insert_raw``, ``btree_split_beneath``, ``rebalance_or_split``,
``split_one_into_two``, ``split_two_into_three``, ``rebalance_left/right``), format §3.4.

The path from the root is shadowed top-down; a full node is dealt with on the way down, so a
parent always has room for the entry a split adds. A full root splits beneath itself and
keeps its block number. A full non-root node first tries to give entries to an unshared
sibling with at least ``SPACE_THRESHOLD`` free slots, else splits one node into two (at the
edges of its parent, or when a sibling is shared) or two into three.
"""

from __future__ import annotations

from collections.abc import Sequence

from thinmgr.format.constants import INTERNAL_NODE, max_entries_for
from thinmgr.format.txn.btree_common import (
    BtreeInfo,
    Spine,
    ValueType,
    empty_tree,
    lower_bound,
    pack_u64,
    shadow_child,
    u64,
)
from thinmgr.format.txn.node import BNode

SPACE_THRESHOLD = 8  # dm-btree.c: a sibling needs this many free slots to take entries


def insert(info: BtreeInfo, root: int, keys: Sequence[int], value: bytes) -> tuple[int, bool]:
    """``dm_btree_insert_notify``: (new root, whether the key was new).

    Upper levels hold le64 block references; a missing key there gets an empty tree below it.
    Overwriting a value runs the value type's ``dec`` on the old one unless ``equal`` says it
    is the same; a new value is *not* incremented (the caller owns that reference).
    """
    spine = Spine(info.tm)
    le64 = info.le64_type
    index = 0
    block = root
    for level in range(info.levels - 1):
        index = _insert_raw(spine, block, le64, keys[level], index)
        node = _current(spine)
        if index >= node.nr_entries or node.keys[index] != keys[level]:
            new_tree = empty_tree(info.tm, info.value_type.size)
            node.keys.insert(index, keys[level])
            node.values.insert(index, pack_u64(new_tree))
        block = u64(node.values[index])
    vt = info.value_type
    index = _insert_raw(spine, block, vt, keys[-1], index)
    node = _current(spine)
    inserted = index >= node.nr_entries or node.keys[index] != keys[-1]
    if inserted:
        node.keys.insert(index, keys[-1])
        node.values.insert(index, value)
    else:
        old = node.values[index]
        if vt.dec is not None and (vt.equal is None or not vt.equal(old, value)):
            vt.dec([old])
        node.values[index] = value
    assert spine.root is not None
    return spine.root, inserted


def _current(spine: Spine) -> BNode:
    assert spine.current is not None
    return spine.current


def _parent(spine: Spine) -> BNode:
    assert spine.parent is not None
    return spine.parent


def _insert_raw(spine: Spine, root: int, vt: ValueType, key: int, index: int) -> int:
    """``btree_insert_raw``: shadow down to the leaf for ``key``; the slot to use there."""
    top = True
    i = index
    while True:
        node = spine.step(root, vt)
        # "We have to patch up the parent node, ugly": the parent (possibly the upper
        # level's leaf) must point at the shadow.
        if spine.parent is not None and i >= 0:
            spine.parent.values[i] = pack_u64(node.blocknr)
        if node.nr_entries == node.max_entries:
            if top:
                _split_beneath(spine)
            else:
                _rebalance_or_split(spine, vt, i, key)
            node = _current(spine)
        i = lower_bound(node.keys, key)
        if node.is_leaf:
            break
        if i < 0:
            # Change the bounds on the lowest key.
            node.keys[0] = key
            i = 0
        root = u64(node.values[i])
        top = False
    if i < 0 or node.keys[i] != key:
        i += 1
    return i


def _split_beneath(spine: Spine) -> None:
    """``btree_split_beneath``: the full root moves its entries into two new children and
    becomes an internal node over them, keeping its block number."""
    tm = spine.tm
    parent = _current(spine)
    nr_left = parent.nr_entries // 2
    left = tm.new_node(parent.flags, parent.value_size)
    left.keys = parent.keys[:nr_left]
    left.values = parent.values[:nr_left]
    right = tm.new_node(parent.flags, parent.value_size)
    right.keys = parent.keys[nr_left:]
    right.values = parent.values[nr_left:]
    parent.flags = INTERNAL_NODE
    parent.value_size = 8
    parent.max_entries = max_entries_for(8)
    parent.keys = [left.keys[0], right.keys[0]]
    parent.values = [pack_u64(left.blocknr), pack_u64(right.blocknr)]


def _redistribute2(left: BNode, right: BNode) -> None:
    """``redistribute2``: left gets total/2 entries, right the rest, order kept."""
    keys = left.keys + right.keys
    values = left.values + right.values
    target_left = len(keys) // 2
    left.keys, right.keys = keys[:target_left], keys[target_left:]
    left.values, right.values = values[:target_left], values[target_left:]


def _redistribute3(left: BNode, middle: BNode, right: BNode) -> None:
    """``redistribute3`` (insert side, the middle node is new and empty)."""
    keys = left.keys + middle.keys + right.keys
    values = left.values + middle.values + right.values
    total = len(keys)
    target_left = total // 3
    target_middle = (total - target_left) // 2
    cut = target_left + target_middle
    left.keys, middle.keys, right.keys = keys[:target_left], keys[target_left:cut], keys[cut:]
    left.values, middle.values, right.values = (
        values[:target_left],
        values[target_left:cut],
        values[cut:],
    )


def _rebalance_or_split(spine: Spine, vt: ValueType, parent_index: int, key: int) -> None:
    """``rebalance_or_split``: siblings first, then 1->2 at the edges, else 2->3."""
    tm = spine.tm
    parent = _parent(spine)
    nr_parent = parent.nr_entries
    left_shared = right_shared = False
    if parent_index > 0:
        left_block = u64(parent.values[parent_index - 1])
        left_shared = tm.is_shared(left_block)
        if not left_shared and _free_space(spine, left_block, vt) >= SPACE_THRESHOLD:
            _rebalance_left(spine, vt, parent_index, key)
            return
    if parent_index < nr_parent - 1:
        right_block = u64(parent.values[parent_index + 1])
        right_shared = tm.is_shared(right_block)
        if not right_shared and _free_space(spine, right_block, vt) >= SPACE_THRESHOLD:
            _rebalance_right(spine, vt, parent_index, key)
            return
    # "When inserting a sequence that is either monotonically increasing or decreasing
    # it's better to split a single node into two."
    if (
        left_shared
        or right_shared
        or nr_parent <= 2
        or parent_index == 0
        or parent_index + 1 == nr_parent
    ):
        _split_one_into_two(spine, parent_index, key)
    else:
        _split_two_into_three(spine, vt, parent_index, key)


def _free_space(spine: Spine, blocknr: int, vt: ValueType) -> int:
    node = spine.tm.read_node(blocknr, vt.size)
    return node.max_entries - node.nr_entries


def _rebalance_left(spine: Spine, vt: ValueType, parent_index: int, key: int) -> None:
    parent = _parent(spine)
    left = shadow_child(spine.tm, vt, parent, parent_index - 1)
    right = _current(spine)
    _redistribute2(left, right)
    parent.keys[parent_index] = right.keys[0]
    if key < right.keys[0]:
        spine.current = left


def _rebalance_right(spine: Spine, vt: ValueType, parent_index: int, key: int) -> None:
    parent = _parent(spine)
    right = shadow_child(spine.tm, vt, parent, parent_index + 1)
    left = _current(spine)
    _redistribute2(left, right)
    parent.keys[parent_index + 1] = right.keys[0]
    if key >= right.keys[0]:
        spine.current = right


def _split_one_into_two(spine: Spine, parent_index: int, key: int) -> None:
    """``split_one_into_two``: a new right sibling takes half of the entries."""
    left = _current(spine)
    right = spine.tm.new_node(left.flags, left.value_size)
    _redistribute2(left, right)
    parent = _parent(spine)
    parent.keys.insert(parent_index + 1, right.keys[0])
    parent.values.insert(parent_index + 1, pack_u64(right.blocknr))
    spine.current = left if key < right.keys[0] else right


def _split_two_into_three(spine: Spine, vt: ValueType, parent_index: int, key: int) -> None:
    """``split_two_into_three``: the node and a sibling share their entries with a new
    middle node, a third each; fuller nodes than a 1->2 split."""
    parent = _parent(spine)
    if parent_index == 0:
        middle_index = 1
        left = _current(spine)
        right = shadow_child(spine.tm, vt, parent, parent_index + 1)
    else:
        middle_index = parent_index
        right = _current(spine)
        left = shadow_child(spine.tm, vt, parent, parent_index - 1)
    middle = spine.tm.new_node(left.flags, left.value_size)
    _redistribute3(left, middle, right)
    parent.keys[middle_index] = right.keys[0]
    parent.keys.insert(middle_index, middle.keys[0])
    parent.values.insert(middle_index, pack_u64(middle.blocknr))
    if key < middle.keys[0]:
        spine.current = left
    elif key < right.keys[0]:
        spine.current = middle
    else:
        spine.current = right
