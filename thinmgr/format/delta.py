"""Changed ranges between two thin devices: thin_delta 0.9.0's semantics (format section 9.2).

The two devices' block trees are walked together, a merge over key ranges. Where both trees
point at the same node, the subtree below is identical (snapshots share subtrees until they
are written to), so it is never compared: it contributes ``same`` runs, read as plain arrays,
or with ``changed_only`` it is not read at all, which makes the cost follow what changed
rather than the size of the devices.

The output is thin_delta's, run for run. thin_delta (0.9.0, ``thin_delta.cc``) first folds each
device's mappings into ranges that are contiguous in both virtual and data block, then merges
the two range lists; every piece it hands to its emitter ends where either side's range ends.
So a piece boundary falls between virtual blocks ``k-1`` and ``k`` exactly when
* ``k`` does not follow ``k-1`` in the union of both devices' keys (a gap), or
* the kind (left only, right only, different, same) changes, or
* a side maps both blocks but not to consecutive data blocks.
The verbose XML prints every piece; the compact XML joins consecutive pieces of one kind that
touch. Mapping times are ignored, as in thin_delta.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import NoReturn

import numpy as np
import numpy.typing as npt

from thinmgr.errors import CorruptMetadataError, NotFoundError
from thinmgr.format.blocks import BlockSource
from thinmgr.format.btree import Node, TreeWalk, lookup, read_node
from thinmgr.format.constants import MAPPING_VALUE_SIZE, MAX_BTREE_DEPTH, NODE_HEADER_SIZE
from thinmgr.format.metadata import ThinMetadata

U64 = npt.NDArray[np.uint64]
U8 = npt.NDArray[np.uint8]
Bools = npt.NDArray[np.bool_]

_EMPTY = np.zeros(0, dtype=np.uint64)


class DeltaKind(IntEnum):
    """What two devices hold at a virtual block; the names are thin_delta's element names."""

    LEFT_ONLY = 0
    RIGHT_ONLY = 1
    DIFFERENT = 2
    SAME = 3

    @property
    def xml_name(self) -> str:
        return _XML_NAMES[self]


_XML_NAMES = {
    DeltaKind.LEFT_ONLY: "left_only",
    DeltaKind.RIGHT_ONLY: "right_only",
    DeltaKind.DIFFERENT: "different",
    DeltaKind.SAME: "same",
}


@dataclass(frozen=True)
class DeltaRun:
    """One run: ``length`` virtual blocks from ``begin``, all of one kind.

    ``left_data``/``right_data`` are the data blocks the run starts at on each side (None
    where that side does not map it). In verbose granularity they continue consecutively
    over the run; compact runs may join pieces whose data blocks do not.
    """

    kind: DeltaKind
    begin: int
    length: int
    left_data: int | None
    right_data: int | None


@dataclass(frozen=True)
class DeltaRuns:
    """Runs as parallel arrays (the emitters format them without a Python object per run)."""

    kind: U8
    begin: U64
    length: U64
    left_data: U64
    right_data: U64

    def __len__(self) -> int:
        return len(self.kind)

    def __iter__(self) -> Iterator[DeltaRun]:
        for k, b, n, ld, rd in zip(
            self.kind.tolist(),
            self.begin.tolist(),
            self.length.tolist(),
            self.left_data.tolist(),
            self.right_data.tolist(),
            strict=True,
        ):
            kind = DeltaKind(k)
            yield DeltaRun(
                kind,
                b,
                n,
                None if kind == DeltaKind.RIGHT_ONLY else ld,
                None if kind == DeltaKind.LEFT_ONLY else rd,
            )


@dataclass(frozen=True)
class DeltaStats:
    """How much of the trees the walk read, and how much it skipped as shared."""

    nodes_read: int
    shared_subtrees: int
    shared_subtrees_read: int


@dataclass(frozen=True)
class Delta:
    left: int
    right: int
    runs: DeltaRuns
    verbose: bool
    changed_only: bool
    stats: DeltaStats


# --------------------------------------------------------------------------- tree lookup


def device_root(md: ThinMetadata, dev: int) -> int:
    """Root of ``dev``'s block tree, looked up in the top level as thin_delta does."""
    found = lookup(
        md.source, md.view.data_mapping_root, dev, MAPPING_VALUE_SIZE, "mapping tree (top level)"
    )
    if found is None:
        raise NotFoundError(
            f"thin device {dev} does not exist in this metadata (the mapping tree has no "
            "entry for it)",
            hint="List the devices with `thinmgr metadata ls SOURCE`.",
        )
    node, index = found
    return int(node.values_u64()[index])


# --------------------------------------------------------------------------- the joint walk

# A subtree not yet expanded: its block, the lower bound of its keys (its parent's key), its
# depth, and whether the key order check restarts before it (a shared subtree that was
# skipped lies just before it). Plain tuples: the walk makes one per child pointer.
_Pending = tuple[int, int, int, bool]


class _Side:
    """One device's tree as a frontier of unexpanded subtrees, in key order."""

    def __init__(self, walk: _JointWalk, dev: int, root: int) -> None:
        self.walk = walk
        self.structure = f"mapping tree of device {dev}"
        self.stack: list[_Pending] = [(root, 0, 0, False)]  # the head is the last element
        self.keys: list[U64] = []
        self.values: list[U64] = []
        self.seen: set[int] = set()
        self.leaf_depth: int | None = None
        self.last_key: int | None = None

    def head_node(self) -> Node:
        return self.walk.node(self.stack[-1][0], self.structure)

    def pop_head(self) -> _Pending:
        """Take the head off the frontier (its node is then checked by the caller)."""
        pending = self.stack.pop()
        if pending[3]:
            self.skip_shared()
        return pending

    def advance(self) -> None:
        """Expand the head if it is an internal node, or take its mappings if a leaf."""
        pending = self.pop_head()
        node = self.walk.node(pending[0], self.structure)
        self.check(node, pending)
        if node.is_leaf:
            self._note_leaf_depth(pending[2], node.blocknr)
            self._take(node.keys, node.values_u64(), node.blocknr)
            return
        depth = pending[2] + 1
        self.stack.extend(
            [
                (child, key, depth, False)
                for key, child in zip(
                    reversed(node.key_list()), reversed(node.child_list()), strict=True
                )
            ]
        )

    def note_leaf(self, node: Node, depth: int) -> None:
        """The checks of a leaf about to be taken: its depth, and its keys following the
        previous leaf's (the mappings are then taken, or compared in place)."""
        self._note_leaf_depth(depth, node.blocknr)
        if not node.nr_entries:
            return
        keys = node.keys
        if self.last_key is not None and int(keys[0]) <= self.last_key:
            raise CorruptMetadataError(
                f"first key {int(keys[0])} does not follow the previous leaf's last key "
                f"{self.last_key}",
                block=node.blocknr,
                structure=self.structure,
            )
        self.last_key = int(keys[-1])

    def take_shared(
        self, keys: U64, values: U64, depth: int, leaf_depth: int | None, blocknr: int
    ) -> None:
        if leaf_depth is not None:
            self._note_leaf_depth(depth + leaf_depth, blocknr)
        self._take(keys, values, blocknr)

    def skip_shared(self) -> None:
        # Nothing is known about the skipped keys but that they are the same on both sides,
        # so the order check restarts after them.
        self.last_key = None

    def skip_shared_after(self) -> None:
        """Restart the order check before the next subtree on the frontier (a shared subtree
        that is skipped without being put on the frontier comes before it)."""
        if self.stack:
            blocknr, low_key, depth, _ = self.stack[-1]
            self.stack[-1] = (blocknr, low_key, depth, True)
        else:
            self.skip_shared()

    def _take(self, keys: U64, values: U64, blocknr: int) -> None:
        if not len(keys):
            return
        if self.last_key is not None and int(keys[0]) <= self.last_key:
            raise CorruptMetadataError(
                f"first key {int(keys[0])} does not follow the previous leaf's last key "
                f"{self.last_key}",
                block=blocknr,
                structure=self.structure,
            )
        self.last_key = int(keys[-1])
        self.keys.append(keys)
        self.values.append(values)

    def drain(self) -> tuple[U64, U64]:
        """The mappings taken since the last call, as two arrays."""
        if not self.keys:
            return _EMPTY, _EMPTY
        keys, values = np.concatenate(self.keys), np.concatenate(self.values)
        self.keys.clear()
        self.values.clear()
        return keys, values

    def check(self, node: Node, pending: _Pending, *, keys_checked: bool = False) -> None:
        """The checks of TreeWalk (format section 3.5), applied node by node.

        ``keys_checked``: the key order was checked on a node with byte-identical keys.
        """
        depth = pending[2]
        if depth > MAX_BTREE_DEPTH:
            self._fault("btree deeper than any valid tree (cycle between nodes?)", node)
        if node.blocknr in self.seen:
            self._fault("node reached twice within one tree (cycle or cross-link)", node)
        self.seen.add(node.blocknr)
        keys = node.keys
        nr_entries = node.nr_entries
        if depth > 0 and nr_entries == 0:
            self._fault("empty non-root node", node)
        if nr_entries > 1 and not keys_checked and (keys[1:] <= keys[:-1]).any():
            self._fault("keys are not strictly increasing", node)
        if nr_entries and depth > 0 and int(keys[0]) < pending[1]:
            self._fault(f"first key {int(keys[0])} is below its parent's key {pending[1]}", node)

    def _fault(self, message: str, node: Node) -> NoReturn:
        raise CorruptMetadataError(message, block=node.blocknr, structure=self.structure)

    def _note_leaf_depth(self, depth: int, blocknr: int) -> None:
        if self.leaf_depth is None:
            self.leaf_depth = depth
        elif self.leaf_depth != depth:
            raise CorruptMetadataError(
                f"leaf at depth {depth}, other leaves at {self.leaf_depth}",
                block=blocknr,
                structure=self.structure,
            )


@dataclass(frozen=True)
class _Segment:
    """Consecutive key range of the merge: mappings of both sides, or a shared subtree."""

    left_keys: U64
    left_values: U64
    right_keys: U64
    right_values: U64
    shared: bool


def _key_bytes(node: Node) -> bytes:
    return bytes(node.block[NODE_HEADER_SIZE : NODE_HEADER_SIZE + 8 * node.nr_entries])


def _value_view(node: Node) -> bytes | memoryview:
    # No copy here: the batch's join copies once.
    start = node.values_offset
    return node.block[start : start + 8 * node.nr_entries]


class _LeafPairs:
    """Pairs of leaves with the same keys (a snapshot's leaf and its written copy), compared
    all at once: a copy differs from its original in a few entries, and one numpy pass over
    every pair costs less than a few array operations per pair."""

    def __init__(self) -> None:
        self.keys: list[bytes] = []
        self.left_values: list[bytes | memoryview] = []
        self.right_values: list[bytes | memoryview] = []

    def add(self, keys: bytes, left: Node, right: Node) -> None:
        self.keys.append(keys)
        self.left_values.append(_value_view(left))
        self.right_values.append(_value_view(right))

    def blocks(self, *, changed_only: bool) -> _Blocks | None:
        """The blocks of the pairs added since the last call; None if there were none."""
        if not self.keys:
            return None
        keys: U64 = np.frombuffer(b"".join(self.keys), dtype="<u8")
        shift = np.uint64(24)  # the data block is above the 24-bit time (section 5.2)
        ldata = np.frombuffer(b"".join(self.left_values), dtype="<u8") >> shift
        rdata = np.frombuffer(b"".join(self.right_values), dtype="<u8") >> shift
        self.keys.clear()
        self.left_values.clear()
        self.right_values.clear()
        different = ldata != rdata
        if changed_only:
            # Dropping "same" blocks before the runs are cut changes no run of another kind:
            # a run only joins blocks whose keys follow each other, so never across a gap.
            return _Blocks(
                keys[different],
                np.full(int(np.count_nonzero(different)), DeltaKind.DIFFERENT, dtype=np.uint8),
                ldata[different],
                rdata[different],
            )
        kind = np.where(different, np.uint8(DeltaKind.DIFFERENT), np.uint8(DeltaKind.SAME))
        return _Blocks(keys, kind.astype(np.uint8), ldata, rdata)


class _JointWalk:
    """Walks two block trees in step, producing the classified blocks in key order.

    Heads are compared by block number first: the same block on both sides is a shared
    subtree. Otherwise the side whose head starts at the lower key moves on (an internal
    node is expanded, a leaf taken); on a tie internal nodes are expanded first, so that
    shared nodes further down come to both heads together.

    Two fast paths for a snapshot against its origin, where most nodes at a tie are a node
    and its copy with the same keys: two internal nodes with the same keys are expanded
    together, their children compared as arrays and the shared ones skipped at once (with
    ``changed_only``); two leaves with the same keys are compared in a batch.
    """

    def __init__(
        self,
        source: BlockSource,
        left: tuple[int, int],
        right: tuple[int, int],
        *,
        read_shared: bool,
    ) -> None:
        self.source = source
        self.read_shared = read_shared
        self.nodes_read = 0
        self.shared_subtrees = 0
        self.shared_subtrees_read = 0
        self._cache: dict[int, Node] = {}
        self.left = _Side(self, *left)
        self.right = _Side(self, *right)
        self._pairs = _LeafPairs()
        self._parts: list[_Blocks] = []

    def node(self, blocknr: int, structure: str) -> Node:
        node = self._cache.get(blocknr)
        if node is None:
            node = read_node(self.source, blocknr, MAPPING_VALUE_SIZE, structure)
            self.nodes_read += 1
            # Only the nodes at the two heads are ever looked at twice.
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[blocknr] = node
        return node

    def blocks(self) -> list[_Blocks]:
        """Every block either side maps (with ``changed_only``, at least every changed one),
        in key order, as consecutive parts."""
        left, right = self.left, self.right
        lstack, rstack = left.stack, right.stack
        while lstack and rstack:
            lhead, rhead = lstack[-1], rstack[-1]
            if lhead[0] == rhead[0]:
                lstack.pop()
                rstack.pop()
                self._flush()
                self._shared(lhead, rhead)
            elif lhead[1] < rhead[1]:
                left.advance()
            elif rhead[1] < lhead[1]:
                right.advance()
            else:
                self._tie()
        while lstack:
            left.advance()
        while rstack:
            right.advance()
        self._flush()
        self._flush_pairs()
        return self._parts

    def _tie(self) -> None:
        left, right = self.left, self.right
        lnode, rnode = left.head_node(), right.head_node()
        if lnode.is_leaf and rnode.is_leaf:
            if not left.keys and not right.keys:
                self._leaf_pair(lnode, rnode)
            else:
                left.advance()
                right.advance()
        elif lnode.is_leaf or rnode.is_leaf:
            if not lnode.is_leaf:
                left.advance()
            if not rnode.is_leaf:
                right.advance()
        elif not self.read_shared and _key_bytes(lnode) == _key_bytes(rnode):
            self._internal_pair(lnode, rnode)
        else:
            left.advance()
            right.advance()

    def _leaf_pair(self, lnode: Node, rnode: Node) -> None:
        """The two head leaves, at the same key with nothing taken before them on either
        side."""
        left, right = self.left, self.right
        lpending = left.pop_head()
        left.check(lnode, lpending)
        left.note_leaf(lnode, lpending[2])
        keys = _key_bytes(lnode)
        rpending = right.pop_head()
        same_keys = _key_bytes(rnode) == keys
        right.check(rnode, rpending, keys_checked=same_keys)
        right.note_leaf(rnode, rpending[2])
        if same_keys:
            self._pairs.add(keys, lnode, rnode)
            return
        # Different keys: later leaves of one side may interleave with this leaf of the
        # other, so both are taken into the current segment, as in the generic walk.
        for side, node in ((left, lnode), (right, rnode)):
            if node.nr_entries:
                side.keys.append(node.keys)
                side.values.append(node.values_u64())

    def _internal_pair(self, lnode: Node, rnode: Node) -> None:
        """The two head nodes, internal with the same keys: shared children are skipped,
        the others put on both frontiers in step (only with ``changed_only``)."""
        left, right = self.left, self.right
        lpending = left.pop_head()
        left.check(lnode, lpending)
        rpending = right.pop_head()
        right.check(rnode, rpending, keys_checked=True)
        lchildren, rchildren = lnode.values_u64(), rnode.values_u64()
        changed = np.flatnonzero(lchildren != rchildren).tolist()
        count = len(lchildren)
        self.shared_subtrees += count - len(changed)
        if count and (not changed or changed[-1] != count - 1):
            # Shared children after the last changed one: the order check restarts after
            # this node's subtree, as in the generic walk.
            left.skip_shared_after()
            right.skip_shared_after()
        keys = lnode.key_list()
        lchild, rchild = lchildren.tolist(), rchildren.tolist()
        ldepth, rdepth = lpending[2] + 1, rpending[2] + 1
        previous = -1
        lpushed: list[_Pending] = []
        rpushed: list[_Pending] = []
        for index in changed:
            # The generic walk restarts the order check at every shared subtree it skips.
            reset = index != previous + 1
            lpushed.append((lchild[index], keys[index], ldepth, reset))
            rpushed.append((rchild[index], keys[index], rdepth, reset))
            previous = index
        left.stack.extend(reversed(lpushed))
        right.stack.extend(reversed(rpushed))

    def _flush_pairs(self) -> None:
        blocks = self._pairs.blocks(changed_only=not self.read_shared)
        if blocks is not None:
            self._parts.append(blocks)

    def _flush(self) -> None:
        lk, lv = self.left.drain()
        rk, rv = self.right.drain()
        if len(lk) or len(rk):
            self._flush_pairs()
            self._parts.append(_classify(_Segment(lk, lv, rk, rv, shared=False)))

    def _shared(self, lhead: _Pending, rhead: _Pending) -> None:
        self.shared_subtrees += 1
        if not self.read_shared:
            self.left.skip_shared()
            self.right.skip_shared()
            return
        self.shared_subtrees_read += 1
        walk = TreeWalk(self.source, lhead[0], MAPPING_VALUE_SIZE, self.left.structure)
        keys_list, values_list = [], []
        for leaf in walk.leaves():
            self.nodes_read += 1
            if leaf.nr_entries:
                keys_list.append(leaf.keys)
                values_list.append(leaf.values_u64())
        keys = np.concatenate(keys_list) if keys_list else _EMPTY
        values = np.concatenate(values_list) if values_list else _EMPTY
        if len(keys) and lhead[2] > 0 and int(keys[0]) < lhead[1]:
            raise CorruptMetadataError(
                f"first key {int(keys[0])} is below its parent's key {lhead[1]}",
                block=lhead[0],
                structure=self.left.structure,
            )
        self.left.take_shared(keys, values, lhead[2], walk.leaf_depth, lhead[0])
        self.right.take_shared(keys, values, rhead[2], walk.leaf_depth, rhead[0])
        self.left.drain()
        self.right.drain()
        self._flush_pairs()
        self._parts.append(_classify(_Segment(keys, values, keys, values, shared=True)))


# --------------------------------------------------------------------------- classification


@dataclass(frozen=True)
class _Blocks:
    """Every virtual block mapped by either side, with its kind and both data blocks."""

    keys: U64
    kind: U8
    left_data: U64
    right_data: U64


def _side_lookup(keys: U64, union: U64) -> tuple[Bools, npt.NDArray[np.intp]]:
    if not len(keys):
        return np.zeros(len(union), dtype=bool), np.zeros(len(union), dtype=np.intp)
    index = np.minimum(np.searchsorted(keys, union), len(keys) - 1)
    return keys[index] == union, index


def _classify(segment: _Segment) -> _Blocks:
    if segment.shared:
        # Identical subtrees: every block is "same" without looking at it twice.
        data = segment.left_values >> np.uint64(24)
        return _Blocks(
            segment.left_keys, np.full(len(data), DeltaKind.SAME, dtype=np.uint8), data, data
        )
    lk, rk = segment.left_keys, segment.right_keys
    # Both are sorted, so the stable sort of the concatenation is a linear merge (timsort).
    union = np.concatenate((lk, rk))
    union.sort(kind="stable")
    if len(union) > 1:
        union = union[np.concatenate(([True], union[1:] != union[:-1]))]
    in_left, li = _side_lookup(lk, union)
    in_right, ri = _side_lookup(rk, union)
    zero = np.uint64(0)
    ldata = (
        np.where(in_left, segment.left_values[li] >> np.uint64(24), zero)
        if len(lk)
        else np.zeros(len(union), dtype=np.uint64)
    )
    rdata = (
        np.where(in_right, segment.right_values[ri] >> np.uint64(24), zero)
        if len(rk)
        else np.zeros(len(union), dtype=np.uint64)
    )
    both = in_left & in_right
    kind = np.where(in_left, DeltaKind.LEFT_ONLY, DeltaKind.RIGHT_ONLY).astype(np.uint8)
    kind[both] = np.where(ldata[both] == rdata[both], DeltaKind.SAME, DeltaKind.DIFFERENT)
    return _Blocks(union, kind, ldata.astype(np.uint64), rdata.astype(np.uint64))


def _join(parts: list[_Blocks]) -> _Blocks:
    if not parts:
        return _Blocks(_EMPTY, np.zeros(0, dtype=np.uint8), _EMPTY, _EMPTY)
    if len(parts) == 1:
        return parts[0]
    return _Blocks(
        np.concatenate([p.keys for p in parts]),
        np.concatenate([p.kind for p in parts]),
        np.concatenate([p.left_data for p in parts]),
        np.concatenate([p.right_data for p in parts]),
    )


def _runs(blocks: _Blocks, *, verbose: bool, changed_only: bool) -> DeltaRuns:
    n = len(blocks.keys)
    if n == 0:
        return DeltaRuns(np.zeros(0, dtype=np.uint8), _EMPTY, _EMPTY, _EMPTY, _EMPTY)
    one = np.uint64(1)
    kind = blocks.kind
    # uint64 subtraction wraps, so "follows" is tested as a difference of exactly one.
    breaks = (np.diff(blocks.keys) != one) | (kind[1:] != kind[:-1])
    if verbose:
        in_left = kind != DeltaKind.RIGHT_ONLY
        in_right = kind != DeltaKind.LEFT_ONLY
        breaks |= in_left[1:] & in_left[:-1] & (np.diff(blocks.left_data) != one)
        breaks |= in_right[1:] & in_right[:-1] & (np.diff(blocks.right_data) != one)
    starts = np.flatnonzero(np.concatenate(([True], breaks)))
    lengths = np.diff(np.append(starts, n)).astype(np.uint64)
    runs = DeltaRuns(
        kind[starts],
        blocks.keys[starts],
        lengths,
        blocks.left_data[starts],
        blocks.right_data[starts],
    )
    if changed_only:
        keep = runs.kind != DeltaKind.SAME
        runs = DeltaRuns(
            runs.kind[keep],
            runs.begin[keep],
            runs.length[keep],
            runs.left_data[keep],
            runs.right_data[keep],
        )
    return runs


def compute_delta(
    md: ThinMetadata, left: int, right: int, *, verbose: bool = False, changed_only: bool = False
) -> Delta:
    """The runs between devices ``left`` and ``right``, at thin_delta's granularity.

    ``verbose`` splits runs where either side's data blocks stop being consecutive (thin_delta
    --verbose); ``changed_only`` leaves out ``same`` runs and never reads shared subtrees.
    """
    left_root = device_root(md, left)
    right_root = device_root(md, right)
    walk = _JointWalk(
        md.source, (left, left_root), (right, right_root), read_shared=not changed_only
    )
    runs = _runs(_join(walk.blocks()), verbose=verbose, changed_only=changed_only)
    stats = DeltaStats(walk.nodes_read, walk.shared_subtrees, walk.shared_subtrees_read)
    return Delta(left, right, runs, verbose, changed_only, stats)


# --------------------------------------------------------------------------- emitters

_BATCH = 20000


def _superblock_xml(md: ThinMetadata) -> str:
    sb = md.view
    # thin_delta 0.9.0 prints metadata_snap when the superblock it reads holds one: the live
    # superblock of a pool with a held snapshot, never the snapshot's own copy (whose
    # held_root is 0). A snapshot has no space maps, so nr_data_blocks is 0 with -m.
    snap = f' metadata_snap="{sb.held_root}"' if sb.held_root else ""
    return (
        f'<superblock uuid="" time="{sb.time}" transaction="{sb.trans_id}" '
        f'data_block_size="{sb.data_block_size}" '
        f'nr_data_blocks="{md.nr_data_blocks}"{snap}>\n'
    )


def delta_xml(md: ThinMetadata, delta: Delta) -> Iterator[str]:
    """thin_delta 0.9.0's XML (compact or --verbose, as the delta was computed)."""
    yield _superblock_xml(md)
    yield f'  <diff left="{delta.left}" right="{delta.right}">\n'
    if delta.verbose:
        yield from _verbose_body(delta.runs)
    else:
        yield from _compact_body(delta.runs)
    yield "  </diff>\n</superblock>\n"


def _batches(
    runs: DeltaRuns,
) -> Iterator[tuple[list[int], list[int], list[int], list[int], list[int]]]:
    for start in range(0, len(runs), _BATCH):
        end = start + _BATCH
        yield (
            runs.kind[start:end].tolist(),
            runs.begin[start:end].tolist(),
            runs.length[start:end].tolist(),
            runs.left_data[start:end].tolist(),
            runs.right_data[start:end].tolist(),
        )


def _compact_body(runs: DeltaRuns) -> Iterator[str]:
    names = [_XML_NAMES[k] for k in DeltaKind]
    for kinds, begins, lengths, _, _ in _batches(runs):
        yield "".join(
            f'    <{names[k]} begin="{b}" length="{n}"/>\n'
            for k, b, n in zip(kinds, begins, lengths, strict=True)
        )


def _verbose_body(runs: DeltaRuns) -> Iterator[str]:
    # A container opens whenever the kind changes, whether or not the ranges touch.
    current: int | None = None
    for kinds, begins, lengths, ldata, rdata in _batches(runs):
        lines: list[str] = []
        append = lines.append
        for k, b, n, ld, rd in zip(kinds, begins, lengths, ldata, rdata, strict=True):
            if k != current:
                if current is not None:
                    append(f"    </{_XML_NAMES[DeltaKind(current)]}>\n")
                append(f"    <{_XML_NAMES[DeltaKind(k)]}>\n")
                current = k
            if k == DeltaKind.DIFFERENT:
                append(
                    f'      <range begin="{b}" left_data_begin="{ld}" '
                    f'right_data_begin="{rd}" length="{n}"/>\n'
                )
            else:
                data = rd if k == DeltaKind.RIGHT_ONLY else ld
                append(f'      <range begin="{b}" data_begin="{data}" length="{n}"/>\n')
        yield "".join(lines)
    if current is not None:
        yield f"    </{_XML_NAMES[DeltaKind(current)]}>\n"


def delta_json(md: ThinMetadata, delta: Delta) -> Iterator[str]:
    """The same runs as one JSON document, streamed.

    Runs are arrays ``[kind, begin, length, left_data_begin, right_data_begin]``; the data
    blocks are null where a side does not map the run, and in compact mode (where a run may
    join pieces with non-consecutive data blocks) null throughout.
    """
    sb = md.view
    head = {
        "superblock": {
            "time": sb.time,
            "transaction": sb.trans_id,
            "data_block_size": sb.data_block_size,
            "nr_data_blocks": md.nr_data_blocks,
            "metadata_snap": md.snap_location,
        },
        "left": delta.left,
        "right": delta.right,
        "verbose": delta.verbose,
        "changed_only": delta.changed_only,
    }
    yield json.dumps(head)[:-1] + ', "runs": ['
    first = True
    for kinds, begins, lengths, ldata, rdata in _batches(delta.runs):
        items = []
        for k, b, n, ld, rd in zip(kinds, begins, lengths, ldata, rdata, strict=True):
            kind = DeltaKind(k)
            left = ld if delta.verbose and kind != DeltaKind.RIGHT_ONLY else None
            right = rd if delta.verbose and kind != DeltaKind.LEFT_ONLY else None
            items.append(json.dumps([kind.xml_name, b, n, left, right], separators=(",", ":")))
        yield ("" if first else ",") + ",".join(items)
        first = False
    yield "]}\n"
