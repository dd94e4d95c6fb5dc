"""Where ext4 keeps its inodes: the superblock and group descriptors, parsed from bytes.

Enough of the on-disk format to say at which byte of the device inode N lies, and which
byte ranges hold inode tables, so that a block diff can be turned into "these inodes may
have changed" (``thinmgr diff --files``, docs/file-diff.md). Nothing here does I/O: callers
hand in the bytes, or a ``read(offset, length)`` function.

Layout reference: the kernel's Documentation/filesystems/ext4/ (``super.rst`` for the
superblock fields and feature flags, ``group_descr.rst`` for the descriptors,
``blockgroup.rst`` for meta_bg and flex_bg, ``inodes.rst`` for the inode-number arithmetic),
and fs/ext4/super.c (``descriptor_loc``, ``ext4_bg_has_super``) for where meta_bg puts the
descriptors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from thinmgr.errors import CorruptMetadataError, UnsupportedError

SUPERBLOCK_OFFSET = 1024  # super.rst: the primary superblock starts at byte 1024
SUPERBLOCK_SIZE = 1024
EXT4_MAGIC = 0xEF53

# super.rst, "s_feature_compat" / "s_feature_incompat" / "s_feature_ro_compat"
COMPAT_SPARSE_SUPER2 = 0x200
INCOMPAT_META_BG = 0x10
INCOMPAT_EXTENTS = 0x40
INCOMPAT_64BIT = 0x80
INCOMPAT_FLEX_BG = 0x200
INCOMPAT_INLINE_DATA = 0x8000
RO_COMPAT_SPARSE_SUPER = 0x1

GOOD_OLD_INODE_SIZE = 128  # s_rev_level 0: fixed 128-byte inodes
MIN_DESC_SIZE = 32  # group_descr.rst: 32 bytes without the 64bit feature
MIN_DESC_SIZE_64BIT = 64


def _u16(raw: bytes, offset: int) -> int:
    return int.from_bytes(raw[offset : offset + 2], "little")


def _u32(raw: bytes, offset: int) -> int:
    return int.from_bytes(raw[offset : offset + 4], "little")


@dataclass(frozen=True)
class Superblock:
    inodes_count: int
    blocks_count: int
    first_data_block: int
    block_size: int
    blocks_per_group: int
    inodes_per_group: int
    inode_size: int
    desc_size: int
    feature_compat: int
    feature_incompat: int
    feature_ro_compat: int
    first_meta_bg: int
    log_groups_per_flex: int
    backup_bgs: tuple[int, int]

    @property
    def group_count(self) -> int:
        span = self.blocks_count - self.first_data_block
        return -(-span // self.blocks_per_group)

    @property
    def descs_per_block(self) -> int:
        return self.block_size // self.desc_size

    def has(self, incompat: int) -> bool:
        return bool(self.feature_incompat & incompat)

    @property
    def inline_data(self) -> bool:
        return self.has(INCOMPAT_INLINE_DATA)

    def group_first_block(self, group: int) -> int:
        return group * self.blocks_per_group + self.first_data_block

    def has_super(self, group: int) -> bool:
        """Whether block group ``group`` starts with a superblock copy (``ext4_bg_has_super``)."""
        if group == 0:
            return True
        if self.feature_compat & COMPAT_SPARSE_SUPER2:
            return group in self.backup_bgs
        if group <= 1 or not self.feature_ro_compat & RO_COMPAT_SPARSE_SUPER:
            return True
        if group % 2 == 0:
            return False
        return any(_is_power_of(group, base) for base in (3, 5, 7))


def _is_power_of(n: int, base: int) -> bool:
    while n % base == 0:
        n //= base
    return n == 1


def parse_superblock(raw: bytes) -> Superblock:
    """The fields of the 1024-byte superblock (read from byte 1024 of the device)."""
    if len(raw) < SUPERBLOCK_SIZE or _u16(raw, 0x38) != EXT4_MAGIC:
        raise UnsupportedError(
            "not an ext2/3/4 file system (no superblock magic 0xEF53 at byte 1024)",
            hint="File-level diffs read ext4 volumes only; use the block diff for others.",
        )
    log_block = _u32(raw, 0x18)
    if log_block > 6:  # super.rst: block size 2^(10 + s_log_block_size), 1 KiB .. 64 KiB
        raise CorruptMetadataError(f"ext4 superblock: impossible s_log_block_size {log_block}")
    incompat = _u32(raw, 0x60)
    blocks = _u32(raw, 0x4)
    desc_size = MIN_DESC_SIZE
    if incompat & INCOMPAT_64BIT:
        blocks |= _u32(raw, 0x150) << 32
        desc_size = _u16(raw, 0xFE) or MIN_DESC_SIZE_64BIT
    rev_level = _u32(raw, 0x4C)
    sb = Superblock(
        inodes_count=_u32(raw, 0x0),
        blocks_count=blocks,
        first_data_block=_u32(raw, 0x14),
        block_size=1024 << log_block,
        blocks_per_group=_u32(raw, 0x20),
        inodes_per_group=_u32(raw, 0x28),
        inode_size=_u16(raw, 0x58) if rev_level >= 1 else GOOD_OLD_INODE_SIZE,
        desc_size=desc_size,
        feature_compat=_u32(raw, 0x5C),
        feature_incompat=incompat,
        feature_ro_compat=_u32(raw, 0x64),
        first_meta_bg=_u32(raw, 0x104),
        log_groups_per_flex=raw[0x174],
        backup_bgs=(_u32(raw, 0x24C), _u32(raw, 0x250)),
    )
    _check(sb)
    return sb


def _check(sb: Superblock) -> None:
    problems = []
    if sb.blocks_per_group == 0 or sb.inodes_per_group == 0:
        problems.append("zero blocks or inodes per group")
    if sb.inode_size < GOOD_OLD_INODE_SIZE or sb.inode_size > sb.block_size:
        problems.append(f"inode size {sb.inode_size}")
    if sb.inode_size & (sb.inode_size - 1):
        problems.append(f"inode size {sb.inode_size} is not a power of two")
    if sb.desc_size < MIN_DESC_SIZE or sb.desc_size > sb.block_size:
        problems.append(f"group descriptor size {sb.desc_size}")
    if sb.blocks_count <= sb.first_data_block:
        problems.append(f"{sb.blocks_count} blocks")
    elif sb.inodes_count > sb.group_count * sb.inodes_per_group:
        problems.append(f"{sb.inodes_count} inodes in {sb.group_count} groups")
    if problems:
        raise CorruptMetadataError("ext4 superblock: " + ", ".join(problems))


def descriptor_blocks(sb: Superblock) -> list[int]:
    """The device blocks holding the group descriptors, in group order (blockgroup.rst).

    Without meta_bg they follow the superblock's block; with it, descriptors of meta group
    ``m`` (``descs_per_block`` groups each) from ``s_first_meta_bg`` on sit in the first block of
    group ``m * descs_per_block``, after its superblock copy if it has one (``descriptor_loc``).
    """
    per_block = sb.descs_per_block
    count = -(-sb.group_count // per_block)
    first = sb.first_data_block + 1
    if not sb.has(INCOMPAT_META_BG):
        return [first + i for i in range(count)]
    blocks = []
    for meta_group in range(count):
        if meta_group < sb.first_meta_bg:
            blocks.append(first + meta_group)
            continue
        group = meta_group * per_block
        blocks.append(sb.group_first_block(group) + (1 if sb.has_super(group) else 0))
    return blocks


@dataclass(frozen=True)
class InodeTable:
    """One group's inode table: inodes ``first_ino ..`` at bytes ``start ..`` of the device."""

    group: int
    first_ino: int
    start: int  # byte offset of the table on the device
    end: int  # byte offset past the last inode of the group


@dataclass(frozen=True)
class Ext4Layout:
    sb: Superblock
    tables: tuple[InodeTable, ...]  # in group order

    def inode_offset(self, ino: int) -> int:
        """Byte offset of inode ``ino`` on the device (inodes.rst: numbers start at 1)."""
        if not 1 <= ino <= self.sb.inodes_count:
            raise ValueError(f"inode {ino} outside 1..{self.sb.inodes_count}")
        group, index = divmod(ino - 1, self.sb.inodes_per_group)
        return self.tables[group].start + index * self.sb.inode_size

    def inode_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """The inode numbers ``[first, past)`` whose on-disk inodes overlap bytes [start, end)."""
        size = self.sb.inode_size
        found = []
        for table in self.tables:
            lo, hi = max(start, table.start), min(end, table.end)
            if lo >= hi:
                continue
            first = table.first_ino + (lo - table.start) // size
            past = table.first_ino + -(-(hi - table.start) // size)
            found.append((first, past))
        return found


def parse_layout(sb: Superblock, descriptors: list[bytes]) -> Ext4Layout:
    """The inode tables, from the blocks ``descriptor_blocks(sb)`` named, in that order."""
    raw = b"".join(descriptors)
    size, tables = sb.desc_size, []
    if len(raw) < sb.group_count * size:
        raise CorruptMetadataError(
            f"ext4: {len(raw)} bytes of group descriptors for {sb.group_count} groups"
        )
    table_bytes = sb.inodes_per_group * sb.inode_size
    device_bytes = sb.blocks_count * sb.block_size
    for group in range(sb.group_count):
        desc = raw[group * size : (group + 1) * size]
        block = _u32(desc, 0x8)  # bg_inode_table_lo
        if size >= MIN_DESC_SIZE_64BIT:
            block |= _u32(desc, 0x28) << 32  # bg_inode_table_hi
        start = block * sb.block_size
        if block == 0 or start + table_bytes > device_bytes:
            raise CorruptMetadataError(f"ext4: group {group}'s inode table at block {block}")
        first_ino = group * sb.inodes_per_group + 1
        tables.append(InodeTable(group, first_ino, start, start + table_bytes))
    return Ext4Layout(sb, tuple(tables))


def read_layout(read: Callable[[int, int], bytes]) -> Ext4Layout:
    """Superblock and descriptors through ``read(byte_offset, length)`` (a device reader)."""
    sb = parse_superblock(read(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE))
    blocks = descriptor_blocks(sb)
    descriptors = [read(block * sb.block_size, sb.block_size) for block in blocks]
    return parse_layout(sb, descriptors)
