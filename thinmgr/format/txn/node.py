"""Mutable, decoded btree nodes as a transaction holds them (format section 3).

A node touched by a transaction stays decoded (Python lists of keys and packed values) until
the transaction flushes it: a run of inserts into one leaf then costs list operations, not a
decode and re-encode of 4 KiB per insert. Encoding reuses ``node_writer.encode_node``.
"""

from __future__ import annotations

import numpy as np

from thinmgr.format.btree import parse_node
from thinmgr.format.constants import INTERNAL_NODE, LEAF_NODE, max_entries_for
from thinmgr.format.node_writer import encode_node


class BNode:
    """One btree node: header fields plus parallel ``keys`` and ``values`` (packed bytes)."""

    __slots__ = ("blocknr", "flags", "keys", "max_entries", "value_size", "values")

    def __init__(
        self, blocknr: int, flags: int, value_size: int, keys: list[int], values: list[bytes]
    ) -> None:
        self.blocknr = blocknr
        self.flags = flags
        self.value_size = value_size
        # Writers use the section 3.3 capacity; a node read with a smaller on-disk capacity
        # is rewritten with the standard one, which every reader accepts.
        self.max_entries = max_entries_for(value_size)
        self.keys = keys
        self.values = values

    @property
    def is_leaf(self) -> bool:
        return self.flags == LEAF_NODE

    @property
    def nr_entries(self) -> int:
        return len(self.keys)

    def copy_to(self, blocknr: int) -> BNode:
        return BNode(blocknr, self.flags, self.value_size, list(self.keys), list(self.values))

    def become(self, other: BNode) -> None:
        """Take over ``other``'s header and entries, keeping this node's block number."""
        self.flags = other.flags
        self.value_size = other.value_size
        self.max_entries = other.max_entries
        self.keys = list(other.keys)
        self.values = list(other.values)

    def encode(self) -> bytearray:
        keys = np.array(self.keys, dtype=np.uint64)
        return encode_node(self.blocknr, self.flags, keys, b"".join(self.values), self.value_size)


def empty_leaf(blocknr: int, value_size: int) -> BNode:
    return BNode(blocknr, LEAF_NODE, value_size, [], [])


def internal_node(blocknr: int) -> BNode:
    return BNode(blocknr, INTERNAL_NODE, 8, [], [])


def decode_node(
    block: bytes | memoryview, blocknr: int, leaf_value_size: int, structure: str
) -> BNode:
    """Validate (``parse_node``) and decode a node into its mutable form."""
    node = parse_node(block, blocknr, leaf_value_size, structure)
    size = node.value_size
    start = node.values_offset
    raw = bytes(block[start : start + node.nr_entries * size])
    values = [raw[i : i + size] for i in range(0, len(raw), size)]
    return BNode(blocknr, node.flags, size, node.key_list(), values)
