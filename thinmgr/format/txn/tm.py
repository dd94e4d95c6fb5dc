"""The transaction manager (kernel ``dm-transaction-manager.c``), format sections 5.2 and 8.

Every block a transaction changes is first *shadowed*: if it was allocated or shadowed
earlier in this transaction and nothing else references it, it is changed in place;
otherwise it is copied to a newly allocated block and the original loses one reference.
When the original was shared the caller must run ``inc_children`` on the copy (the second
element of ``shadow_node``'s result), because the copy now references everything the
original does. New blocks come from the metadata space map, which only hands out blocks
that were free at the last commit, so nothing the committed superblock reaches is ever
overwritten before the next commit point.

Changed nodes stay decoded in memory until ``pre_commit`` writes them; the superblock is
written last by ``commit``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from thinmgr.errors import CorruptMetadataError
from thinmgr.format.constants import BLOCK_SIZE, LEAF_NODE, THIN_SUPERBLOCK_LOCATION
from thinmgr.format.txn.blockstore import BlockStore
from thinmgr.format.txn.node import BNode, decode_node

if TYPE_CHECKING:
    from thinmgr.format.txn.sm_metadata import MetadataSpaceMap

_CLEAN_CACHE_LIMIT = 4096  # decoded clean nodes kept between operations (bounded memory)


class TransactionManager:
    """Shadowing, allocation and write-back of metadata blocks for one pool."""

    def __init__(self, store: BlockStore, sm: MetadataSpaceMap) -> None:
        self.store = store
        self.sm = sm
        self._shadows: set[int] = set()  # blocks allocated or shadowed in this transaction
        self._nodes: dict[int, BNode] = {}  # changed nodes, written at pre_commit
        self._raw: dict[int, bytearray] = {}  # changed non-node blocks (bitmaps, index, ...)
        self._clean: dict[int, BNode] = {}  # decoded copies of unchanged on-disk nodes

    # -- reference counts (dm_tm_inc / dm_tm_dec / dm_tm_ref) ----------------------------

    def inc(self, blocknr: int) -> None:
        self.sm.inc(blocknr)

    def dec(self, blocknr: int) -> None:
        self.sm.dec(blocknr)

    def ref(self, blocknr: int) -> int:
        return self.sm.count(blocknr)

    def is_shared(self, blocknr: int) -> bool:
        """``dm_tm_block_is_shared``: count above one."""
        return self.sm.count(blocknr) > 1

    # -- nodes ---------------------------------------------------------------------------

    def read_node(self, blocknr: int, leaf_value_size: int) -> BNode:
        """A node for reading only (the object may be shared with the cache)."""
        node = self._nodes.get(blocknr)
        if node is not None:
            return node
        node = self._clean.get(blocknr)
        if node is not None:
            return node
        if not 0 <= blocknr < self.store.nr_blocks:
            raise CorruptMetadataError(
                f"btree pointer to block {blocknr}, beyond the "
                f"{self.store.nr_blocks}-block metadata device",
                block=blocknr,
                structure="btree",
            )
        node = decode_node(self.store.read_block(blocknr), blocknr, leaf_value_size, "btree")
        if len(self._clean) >= _CLEAN_CACHE_LIMIT:
            self._clean.clear()
        self._clean[blocknr] = node
        return node

    def new_node(self, flags: int, value_size: int) -> BNode:
        """``dm_tm_new_block`` for a btree node: zeroed, counted 1, a shadow already."""
        blocknr = self._allocate()
        node = BNode(blocknr, flags, value_size, [], [])
        self._nodes[blocknr] = node
        return node

    def new_leaf(self, value_size: int) -> BNode:
        return self.new_node(LEAF_NODE, value_size)

    def adopt_node(self, node: BNode) -> None:
        """Register a node placed by a bootstrap allocator (formatting) as new."""
        self._shadows.add(node.blocknr)
        self._nodes[node.blocknr] = node

    def shadow_node(self, blocknr: int, leaf_value_size: int) -> tuple[BNode, bool]:
        """``dm_tm_shadow_block`` for a node: (writable node, whether it was shared)."""
        shared = self.sm.count(blocknr) > 1
        if blocknr in self._shadows and not shared:
            node = self._nodes.get(blocknr)
            if node is not None:
                return node, False
        # __shadow_block: allocate, drop the original's reference, copy.
        new = self._allocate()
        self.sm.dec(blocknr)
        original = self.read_node(blocknr, leaf_value_size)
        node = original.copy_to(new)
        self._nodes[new] = node
        return node, shared

    # -- raw blocks (bitmaps, the metadata index, superblock copies) ---------------------

    def new_raw_block(self) -> int:
        blocknr = self._allocate()
        self._raw[blocknr] = bytearray(BLOCK_SIZE)
        return blocknr

    def adopt_raw(self, blocknr: int) -> None:
        self._shadows.add(blocknr)
        self._raw[blocknr] = bytearray(BLOCK_SIZE)

    def read_raw(self, blocknr: int) -> bytes | bytearray:
        raw = self._raw.get(blocknr)
        if raw is not None:
            return raw
        return bytes(self.store.read_block(blocknr))

    def shadow_raw(self, blocknr: int, *, copy: bool = False) -> int:
        """``dm_tm_shadow_block`` for a block that is not a node; its new location.

        Bitmaps and index blocks are re-encoded whole, so ``copy`` is only needed when
        the caller patches the old contents (the superblock copy of a metadata snapshot).
        """
        shared = self.sm.count(blocknr) > 1
        if blocknr in self._shadows and not shared:
            return blocknr
        new = self._allocate()
        self.sm.dec(blocknr)
        self._raw[new] = bytearray(self.read_raw(blocknr)) if copy else bytearray(BLOCK_SIZE)
        return new

    def write_raw(self, blocknr: int, data: bytes | bytearray) -> None:
        self._raw[blocknr] = bytearray(data)

    def _allocate(self) -> int:
        blocknr = self.sm.new_block()
        self._shadows.add(blocknr)
        self._clean.pop(blocknr, None)
        return blocknr

    # -- commit (section 8) --------------------------------------------------------------

    def pre_commit(self) -> None:
        """``dm_tm_pre_commit``: commit the metadata space map, then write every changed
        block except the superblock and flush. Blocks freed again within the transaction
        are not written: nothing references them."""
        self.sm.commit(self)
        for blocknr, node in self._nodes.items():
            if self.sm.count(blocknr):
                self.store.write_block(blocknr, node.encode())
        for blocknr, raw in self._raw.items():
            if blocknr != THIN_SUPERBLOCK_LOCATION and self.sm.count(blocknr):
                self.store.write_block(blocknr, raw)
        self.store.flush()

    def commit(self, superblock: bytes | bytearray) -> None:
        """``dm_tm_commit``: write the superblock (the commit point), flush, and start a new
        transaction with an empty shadow table."""
        self.store.write_block(THIN_SUPERBLOCK_LOCATION, superblock)
        self.store.flush()
        for blocknr, node in self._nodes.items():
            if len(self._clean) < _CLEAN_CACHE_LIMIT and self.sm.count(blocknr):
                self._clean[blocknr] = node
        self._nodes.clear()
        self._raw.clear()
        self._shadows.clear()

    def abort(self) -> None:
        """Forget every change since the last commit (the store holds the committed state
        only where nothing was flushed; callers re-open the metadata after this)."""
        self._nodes.clear()
        self._raw.clear()
        self._shadows.clear()
        self._clean.clear()
