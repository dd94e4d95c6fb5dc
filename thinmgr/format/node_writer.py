"""Writing btree nodes, and building whole btrees bottom-up (format sections 3, 12).

The builder is the "writer, from scratch" of section 12: leaves are filled evenly so that no
non-root node holds fewer than ``max_entries // 3`` entries (the occupancy rule thin_check
enforces, section 3.5 item 4), and each internal key equals the first key of its child, as
thin_restore writes them. Block numbers come from an allocator passed in and blocks leave
through a ``write`` callback, so the same code serves a restore into a file and, later, the
user engine's block store.

Keys and values are numpy arrays: a node is filled with two slice copies, so that building
the leaves of a million mappings costs milliseconds, not seconds.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from thinmgr.format.checksum import seal
from thinmgr.format.constants import (
    BLOCK_SIZE,
    BTREE_CSUM_XOR,
    INTERNAL_NODE,
    LEAF_NODE,
    NODE_HEADER_SIZE,
    max_entries_for,
)

_HEADER = struct.Struct("<IIQIII")
INTERNAL_VALUE_SIZE = 8

U64 = npt.NDArray[np.uint64]
WriteBlock = Callable[[int, bytes | bytearray], None]


class BlockAllocator(Protocol):
    """Hands out metadata block numbers for new nodes."""

    def allocate(self) -> int:
        """A fresh block number; raises when the device is full."""
        ...


def encode_node(
    blocknr: int, flags: int, keys: U64, values: bytes | memoryview, value_size: int
) -> bytearray:
    """One sealed node: header, keys, values at ``32 + 8 * max_entries``, zeroed unused slots.

    ``values`` holds exactly ``len(keys) * value_size`` bytes, packed little-endian.
    """
    max_entries = max_entries_for(value_size)
    count = len(keys)
    if count > max_entries:
        raise ValueError(f"{count} entries do not fit a node of {max_entries}")
    if len(values) != count * value_size:
        raise ValueError(f"{len(values)} value bytes for {count} entries of {value_size}")
    block = bytearray(BLOCK_SIZE)
    _HEADER.pack_into(block, 0, 0, flags, blocknr, count, max_entries, value_size)
    block[NODE_HEADER_SIZE : NODE_HEADER_SIZE + 8 * count] = keys.astype(
        "<u8", copy=False
    ).tobytes()
    start = NODE_HEADER_SIZE + 8 * max_entries
    block[start : start + len(values)] = values
    seal(block, BTREE_CSUM_XOR)
    return block


def node_sizes(count: int, max_entries: int) -> list[int]:
    """How many entries each node of one level gets: as few nodes as possible, filled evenly.

    With k = ceil(n / max) nodes of n // k or n // k + 1 entries, every node holds more than
    max / 2 entries whenever k > 1, so none falls under the max / 3 minimum, the last included.
    A single node (the root) may hold anything, including nothing (an empty tree, section 3.4).
    """
    if count <= max_entries:
        return [count]
    nodes = -(-count // max_entries)
    base, extra = divmod(count, nodes)
    return [base + 1] * extra + [base] * (nodes - extra)


def as_value_bytes(values: npt.NDArray[np.generic], count: int, value_size: int) -> memoryview:
    """The packed bytes of ``count`` values of ``value_size`` bytes each (little-endian dtype)."""
    raw = np.ascontiguousarray(values)
    if raw.nbytes != count * value_size:
        raise ValueError(f"values hold {raw.nbytes} bytes, expected {count} x {value_size}")
    return raw.data.cast("B")


@dataclass(frozen=True)
class NodeRef:
    """A written node as its parent sees it: first key and block number."""

    first_key: int
    blocknr: int


def write_nodes(
    keys: U64,
    values: bytes | memoryview,
    value_size: int,
    *,
    flags: int,
    sizes: Sequence[int],
    alloc: BlockAllocator,
    write: WriteBlock,
    last_block: int | None = None,
) -> list[NodeRef]:
    """Write one level: consecutive nodes of ``sizes`` entries each.

    ``last_block`` puts the final node at a block reserved in advance (a root whose location
    is fixed, such as the metadata ref-count root at block 2, section 6.7).
    """
    refs: list[NodeRef] = []
    start = 0
    for i, size in enumerate(sizes):
        end = start + size
        is_last = last_block is not None and i == len(sizes) - 1
        blocknr = last_block if is_last and last_block is not None else alloc.allocate()
        write(
            blocknr,
            encode_node(
                blocknr,
                flags,
                keys[start:end],
                values[start * value_size : end * value_size],
                value_size,
            ),
        )
        refs.append(NodeRef(int(keys[start]) if size else 0, blocknr))
        start = end
    return refs


def write_leaves(
    keys: U64, values: bytes | memoryview, value_size: int, alloc: BlockAllocator, write: WriteBlock
) -> list[NodeRef]:
    """The leaves of sorted ``keys``; an empty key array gives one empty leaf."""
    sizes = node_sizes(len(keys), max_entries_for(value_size))
    return write_nodes(
        keys, values, value_size, flags=LEAF_NODE, sizes=sizes, alloc=alloc, write=write
    )


def build_upper_levels(
    children: Sequence[NodeRef],
    alloc: BlockAllocator,
    write: WriteBlock,
    *,
    root_block: int | None = None,
) -> tuple[int, list[int]]:
    """Internal levels above ``children`` (leaves, possibly shared) up to a single root.

    Returns the root block and the internal nodes written. With a single child the child is
    the root; ``root_block`` then cannot apply (the caller placed that child already).
    """
    if not children:
        raise ValueError("a btree has at least one leaf")
    written: list[int] = []
    level = list(children)
    max_entries = max_entries_for(INTERNAL_VALUE_SIZE)
    while len(level) > 1:
        keys = np.fromiter((r.first_key for r in level), dtype=np.uint64, count=len(level))
        blocks = np.fromiter((r.blocknr for r in level), dtype="<u8", count=len(level))
        sizes = node_sizes(len(level), max_entries)
        last = root_block if len(sizes) == 1 else None
        level = write_nodes(
            keys,
            blocks.data.cast("B"),
            INTERNAL_VALUE_SIZE,
            flags=INTERNAL_NODE,
            sizes=sizes,
            alloc=alloc,
            write=write,
            last_block=last,
        )
        written.extend(r.blocknr for r in level)
    return level[0].blocknr, written


@dataclass(frozen=True)
class BuiltTree:
    """A tree written from scratch: its root and every node, each referenced exactly once."""

    root: int
    nodes: list[int]


def build_btree(
    keys: U64,
    values: npt.NDArray[np.generic],
    value_size: int,
    alloc: BlockAllocator,
    write: WriteBlock,
    *,
    root_block: int | None = None,
) -> BuiltTree:
    """A whole btree over sorted, distinct ``keys`` with their packed ``values``.

    ``values`` is any array whose bytes are the little-endian values back to back (u64 for
    mappings, u32 for ref counts, a structured dtype for details and index entries).
    Every node of the result has exactly one parent; the root's one reference belongs to
    whoever stores it, so a caller counting metadata references adds one per node.
    """
    count = len(keys)
    raw = as_value_bytes(values, count, value_size)
    sizes = node_sizes(count, max_entries_for(value_size))
    last = root_block if len(sizes) == 1 else None
    leaves = write_nodes(
        keys,
        raw,
        value_size,
        flags=LEAF_NODE,
        sizes=sizes,
        alloc=alloc,
        write=write,
        last_block=last,
    )
    root, internal = build_upper_levels(leaves, alloc, write, root_block=root_block)
    return BuiltTree(root, [r.blocknr for r in leaves] + internal)
