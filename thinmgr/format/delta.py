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
from thinmgr.format.constants import MAPPING_VALUE_SIZE, MAX_BTREE_DEPTH
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


@dataclass
class _Pending:
    """A subtree not yet expanded: its block, the lower bound of its keys, its depth."""

    blocknr: int
    low_key: int
    depth: int


class _Side:
    """One device's tree as a frontier of unexpanded subtrees, in key order."""

    def __init__(self, walk: _JointWalk, dev: int, root: int) -> None:
        self.walk = walk
        self.structure = f"mapping tree of device {dev}"
        self.stack = [_Pending(root, 0, 0)]  # the head is the last element
        self.keys: list[U64] = []
        self.values: list[U64] = []
        self.seen: set[int] = set()
        self.leaf_depth: int | None = None
        self.last_key: int | None = None

    @property
    def head(self) -> _Pending:
        return self.stack[-1]

    def head_node(self) -> Node:
        return self.walk.node(self.head.blocknr, self.structure)

    def advance(self) -> None:
        """Expand the head if it is an internal node, or take its mappings if a leaf."""
        pending = self.stack.pop()
        node = self.walk.node(pending.blocknr, self.structure)
        self._check(node, pending)
        if node.is_leaf:
            self._note_leaf_depth(pending.depth, node.blocknr)
            self._take(node.keys, node.values_u64(), node.blocknr)
            return
        children = [
            _Pending(child, key, pending.depth + 1)
            for key, child in zip(node.key_list(), node.child_list(), strict=True)
        ]
        self.stack.extend(reversed(children))

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

    def _check(self, node: Node, pending: _Pending) -> None:
        # The checks of TreeWalk (format section 3.5), applied node by node.
        if pending.depth > MAX_BTREE_DEPTH:
            self._fault("btree deeper than any valid tree (cycle between nodes?)", node)
        if node.blocknr in self.seen:
            self._fault("node reached twice within one tree (cycle or cross-link)", node)
        self.seen.add(node.blocknr)
        keys = node.keys
        if pending.depth > 0 and node.nr_entries == 0:
            self._fault("empty non-root node", node)
        if node.nr_entries > 1 and not bool(np.all(keys[1:] > keys[:-1])):
            self._fault("keys are not strictly increasing", node)
        if node.nr_entries and pending.depth > 0 and int(keys[0]) < pending.low_key:
            self._fault(
                f"first key {int(keys[0])} is below its parent's key {pending.low_key}", node
            )

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


class _JointWalk:
    """Walks two block trees in step, yielding segments in key order.

    Heads are compared by block number first: the same block on both sides is a shared
    subtree. Otherwise the side whose head starts at the lower key moves on (an internal
    node is expanded, a leaf taken); on a tie internal nodes are expanded first, so that
    shared nodes further down come to both heads together.
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

    def segments(self) -> Iterator[_Segment]:
        left, right = self.left, self.right
        while left.stack and right.stack:
            lhead, rhead = left.head, right.head
            if lhead.blocknr == rhead.blocknr:
                left.stack.pop()
                right.stack.pop()
                yield from self._flush()
                yield from self._shared(lhead, rhead)
            elif lhead.low_key < rhead.low_key:
                left.advance()
            elif rhead.low_key < lhead.low_key:
                right.advance()
            else:
                lnode, rnode = left.head_node(), right.head_node()
                if lnode.is_leaf and rnode.is_leaf:
                    left.advance()
                    right.advance()
                else:
                    if not lnode.is_leaf:
                        left.advance()
                    if not rnode.is_leaf:
                        right.advance()
        while left.stack:
            left.advance()
        while right.stack:
            right.advance()
        yield from self._flush()

    def _flush(self) -> Iterator[_Segment]:
        lk, lv = self.left.drain()
        rk, rv = self.right.drain()
        if len(lk) or len(rk):
            yield _Segment(lk, lv, rk, rv, shared=False)

    def _shared(self, lhead: _Pending, rhead: _Pending) -> Iterator[_Segment]:
        self.shared_subtrees += 1
        if not self.read_shared:
            self.left.skip_shared()
            self.right.skip_shared()
            return
        self.shared_subtrees_read += 1
        walk = TreeWalk(self.source, lhead.blocknr, MAPPING_VALUE_SIZE, self.left.structure)
        keys_list, values_list = [], []
        for leaf in walk.leaves():
            self.nodes_read += 1
            if leaf.nr_entries:
                keys_list.append(leaf.keys)
                values_list.append(leaf.values_u64())
        keys = np.concatenate(keys_list) if keys_list else _EMPTY
        values = np.concatenate(values_list) if values_list else _EMPTY
        if len(keys) and lhead.depth > 0 and int(keys[0]) < lhead.low_key:
            raise CorruptMetadataError(
                f"first key {int(keys[0])} is below its parent's key {lhead.low_key}",
                block=lhead.blocknr,
                structure=self.left.structure,
            )
        self.left.take_shared(keys, values, lhead.depth, walk.leaf_depth, lhead.blocknr)
        self.right.take_shared(keys, values, rhead.depth, walk.leaf_depth, rhead.blocknr)
        self.left.drain()
        self.right.drain()
        yield _Segment(keys, values, keys, values, shared=True)


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
    parts = [_classify(segment) for segment in walk.segments()]
    runs = _runs(_join(parts), verbose=verbose, changed_only=changed_only)
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
