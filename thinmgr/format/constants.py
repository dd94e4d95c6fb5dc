"""Constants of the dm-thin on-disk metadata format.

Values are the kernel's (drivers/md/dm-thin-metadata.c, drivers/md/persistent-data/*) as
verified byte for byte in shared/design/dm-thin-format.md; section numbers below refer to it.
"""

from typing import Final

BLOCK_SIZE: Final = 4096  # metadata block size, fixed (section 1)
SECTOR_SIZE: Final = 512
METADATA_BLOCK_SECTORS: Final = 8

THIN_MAGIC: Final = 27022010  # 0x019C52BA, superblock magic (section 2)
THIN_VERSION: Final = 2  # what current kernels write
THIN_SUPERBLOCK_LOCATION: Final = 0
NEEDS_CHECK_FLAG: Final = 1

# Checksum salts XORed into the crc32c of bytes 4..4095 (section 1.1).
SUPERBLOCK_CSUM_XOR: Final = 160774
BTREE_CSUM_XOR: Final = 121107
BITMAP_CSUM_XOR: Final = 240779
INDEX_CSUM_XOR: Final = 160478

# B-tree node header (section 3.1).
NODE_HEADER_SIZE: Final = 32
INTERNAL_NODE: Final = 1
LEAF_NODE: Final = 2

# Value sizes of every tree's leaves (section 3.3).
MAPPING_VALUE_SIZE: Final = 8
DETAILS_VALUE_SIZE: Final = 24
INDEX_VALUE_SIZE: Final = 16
REFCOUNT_VALUE_SIZE: Final = 4

# Space maps (section 6).
ENTRIES_PER_BITMAP: Final = (BLOCK_SIZE - 16) * 4  # 16320
BITMAP_HEADER_SIZE: Final = 16
MAX_METADATA_BITMAPS: Final = 255
MAX_METADATA_BLOCKS: Final = MAX_METADATA_BITMAPS * ENTRIES_PER_BITMAP  # 4161600
SM_ROOT_SIZE: Final = 32
SM_ROOT_SLOT: Final = 128

# Limits (section 10).
MAX_DEV_ID: Final = (1 << 24) - 1
MAX_TIME: Final = (1 << 24) - 1  # mapping time field is 24 bits
MAX_DATA_BLOCK: Final = (1 << 40) - 1  # data block field of block_time is 40 bits
MIN_DATA_BLOCK_SECTORS: Final = 128  # 64 KiB
MAX_DATA_BLOCK_SECTORS: Final = 2097152  # 1 GiB

# A btree of 4 KiB nodes holding u64 keys cannot be deeper than this: 252^8 > 2^64, and the
# narrowest fan-out the invariants allow (max/3 = 84 for internal nodes) gives 84^10 > 2^64.
# Walking deeper than this means a cycle or a corrupted pointer.
MAX_BTREE_DEPTH: Final = 12


def max_entries_for(value_size: int) -> int:
    """Node capacity for a value size: a multiple of 3 so that 2->3 splits work (section 3.3)."""
    return ((BLOCK_SIZE - NODE_HEADER_SIZE) // (8 + value_size)) // 3 * 3
