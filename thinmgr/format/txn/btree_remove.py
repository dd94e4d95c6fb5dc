"""Btree removal exactly as the kernel does it (``dm-btree-remove.c``: ``dm_btree_remove``,
``remove_raw``, ``rebalance_children``, ``rebalance2``/``__rebalance2``, ``rebalance3``/
``__rebalance3``, ``delete_center_node``, ``redistribute3``), format §3.4.

On the way down every internal node first makes sure that the child the key lies in holds
more than ``max_entries / 3`` entries, by merging it with or borrowing from its siblings,
so that the final delete never leaves a non-root node under the thin_check minimum. An
internal root left with a single child is collapsed into that child on the next removal
that passes through it.
"""

from __future__ import annotations

from collections.abc import Sequence

from thinmgr.errors import CorruptMetadataError, NotFoundError
from thinmgr.format.txn.btree_common import (
    BtreeInfo,
    Spine,
    ValueType,
    inc_children,
    lower_bound,
    pack_u64,
    shadow_child,
    u64,
)
from thinmgr.format.txn.node import BNode


def remove(info: BtreeInfo, root: int, keys: Sequence[int]) -> int:
    """``dm_btree_remove``: delete ``keys`` from the tree; the new root.

    The value type's ``dec`` runs on the removed value. The key must exist: callers look it
    up first, because the kernel shadows (and rebalances) the path before it finds out.
    """
    spine = Spine(info.tm)
    le64 = info.le64_type
    last_level = info.levels - 1
    index = 0
    block = root
    for level in range(info.levels):
        vt = info.value_type if level == last_level else le64
        index = _remove_raw(spine, vt, block, keys[level], index)
        node = spine.current
        assert node is not None
        if not (0 <= index < node.nr_entries) or node.keys[index] != keys[level]:
            raise NotFoundError(f"key {keys[level]} is not in the btree (level {level})")
        if level != last_level:
            block = u64(node.values[index])
            continue
        if vt.dec is not None:
            vt.dec([node.values[index]])
        del node.keys[index]
        del node.values[index]
    assert spine.root is not None
    return spine.root


def _remove_raw(spine: Spine, vt: ValueType, root: int, key: int, index: int) -> int:
    """``remove_raw``: shadow down to the leaf, rebalancing each child on the path."""
    i = index
    while True:
        node = spine.step(root, vt)
        if spine.parent is not None:
            spine.parent.values[i] = pack_u64(node.blocknr)
        if node.is_leaf:
            return lower_bound(node.keys, key)
        _rebalance_children(spine, vt, key)
        rebalanced = spine.current
        assert rebalanced is not None
        node = rebalanced
        if node.is_leaf:
            return lower_bound(node.keys, key)
        i = lower_bound(node.keys, key)
        root = u64(node.values[i])


def _rebalance_children(spine: Spine, vt: ValueType, key: int) -> None:
    tm = spine.tm
    node = spine.current
    assert node is not None
    if node.nr_entries == 1:
        # Collapse: the node takes over its only child's contents and block references.
        child_block = u64(node.values[0])
        child = tm.read_node(child_block, vt.size)
        node.become(child)
        if tm.is_shared(child_block):
            # The kernel memcpys and decrements the child only. When the child is shared
            # (its count was raised by inc_children when this node was copied from a shared
            # one), the copy adds references to the grandchildren that must be counted.
            inc_children(tm, node, vt)
        tm.dec(child_block)
        return
    i = lower_bound(node.keys, key)
    if i < 0:
        raise NotFoundError(f"key {key} is below every key of the btree")
    has_left = i > 0
    has_right = i < node.nr_entries - 1
    if not has_left:
        _rebalance2(spine, vt, i)
    elif not has_right:
        _rebalance2(spine, vt, i - 1)
    else:
        _rebalance3(spine, vt, i - 1)


def _merge_threshold(node: BNode) -> int:
    return node.max_entries // 3


def _rebalance2(spine: Spine, vt: ValueType, left_index: int) -> None:
    parent = spine.current
    assert parent is not None
    left = shadow_child(spine.tm, vt, parent, left_index)
    right = shadow_child(spine.tm, vt, parent, left_index + 1)
    _do_rebalance2(spine, parent, left, right, left_index + 1)


def _do_rebalance2(
    spine: Spine, parent: BNode, left: BNode, right: BNode, right_index: int
) -> None:
    """``__rebalance2``: merge when both would not stay above max/3 + 1, else even out."""
    total = left.nr_entries + right.nr_entries
    # "Ensure the number of entries in each child will be greater than or equal to
    # (max_entries / 3 + 1), so no matter which child is used for removal, the number will
    # still be not less than (max_entries / 3)."
    threshold = 2 * (_merge_threshold(left) + 1)
    if total < threshold:
        left.keys.extend(right.keys)
        left.values.extend(right.values)
        del parent.keys[right_index]
        del parent.values[right_index]
        # Decrement the right block but not its children: left references them now.
        spine.tm.dec(right.blocknr)
    else:
        target_left = total // 2
        keys = left.keys + right.keys
        values = left.values + right.values
        left.keys, right.keys = keys[:target_left], keys[target_left:]
        left.values, right.values = values[:target_left], values[target_left:]
        parent.keys[right_index] = right.keys[0]


def _rebalance3(spine: Spine, vt: ValueType, left_index: int) -> None:
    parent = spine.current
    assert parent is not None
    left = shadow_child(spine.tm, vt, parent, left_index)
    center = shadow_child(spine.tm, vt, parent, left_index + 1)
    right = shadow_child(spine.tm, vt, parent, left_index + 2)
    if not left.max_entries == center.max_entries == right.max_entries:
        raise CorruptMetadataError(
            "bad btree metadata, max_entries differ", block=parent.blocknr, structure="btree"
        )
    total = left.nr_entries + center.nr_entries + right.nr_entries
    threshold = _merge_threshold(left) * 4 + 1
    if total < threshold:
        _delete_center_node(spine, parent, left, center, right, left_index)
    else:
        _redistribute3(parent, left, center, right, left_index)


def _delete_center_node(
    spine: Spine, parent: BNode, left: BNode, center: BNode, right: BNode, left_index: int
) -> None:
    """``delete_center_node``: left fills up from the center, the rest goes to the front of
    right, the center is dropped, then left and right are rebalanced as a pair."""
    shift = min(left.max_entries - left.nr_entries, center.nr_entries)
    left.keys.extend(center.keys[:shift])
    left.values.extend(center.values[:shift])
    if shift != center.nr_entries:
        right.keys[:0] = center.keys[shift:]
        right.values[:0] = center.values[shift:]
    center_index = left_index + 1
    right_index = left_index + 2
    parent.keys[right_index] = right.keys[0]
    del parent.keys[center_index]
    del parent.values[center_index]
    spine.tm.dec(center.blocknr)
    _do_rebalance2(spine, parent, left, right, right_index - 1)


def _redistribute3(
    parent: BNode, left: BNode, center: BNode, right: BNode, left_index: int
) -> None:
    """``redistribute3`` (remove side): right gets total/3, left that plus any remainder,
    center the rest; the shifts the kernel makes preserve the order of the entries."""
    keys = left.keys + center.keys + right.keys
    values = left.values + center.values + right.values
    total = len(keys)
    target_right = total // 3
    remainder = 1 if target_right * 3 != total else 0
    target_left = target_right + remainder
    cut = total - target_right
    left.keys, center.keys, right.keys = keys[:target_left], keys[target_left:cut], keys[cut:]
    left.values, center.values, right.values = (
        values[:target_left],
        values[target_left:cut],
        values[cut:],
    )
    parent.keys[left_index + 1] = center.keys[0]
    parent.keys[left_index + 2] = right.keys[0]
