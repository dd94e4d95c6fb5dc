"""Kernel-style metadata transactions: the writer of the user engine (format §5, §6, §8, §12).

``format_metadata`` makes a fresh pool, ``PoolMetadata.open`` opens committed metadata in a
``BlockStore``; operations change it copy-on-write and ``commit`` publishes them.
"""

from thinmgr.format.txn.blockstore import BlockStore, MemoryBlockStore
from thinmgr.format.txn.pool_metadata import PoolMetadata, format_metadata

__all__ = ["BlockStore", "MemoryBlockStore", "PoolMetadata", "format_metadata"]
