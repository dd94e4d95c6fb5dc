"""Checking the superblock and the held metadata-snapshot copy (format sections 2, 7, 10).

thin_check (0.9.0 and 1.x) verifies only the superblock checksum. The kernel's ``sb_check``
also wants the self block number and the magic, and refuses unknown feature bits on open, so
those are fatal here too; the rest are the ranges the kernel and dm-thin enforce.
"""

from __future__ import annotations

from thinmgr.format.blocks import BlockSource
from thinmgr.format.check_report import Problems
from thinmgr.format.checksum import checksum_ok
from thinmgr.format.constants import (
    BLOCK_SIZE,
    MAX_DATA_BLOCK_SECTORS,
    MAX_METADATA_BLOCKS,
    MAX_TIME,
    METADATA_BLOCK_SECTORS,
    MIN_DATA_BLOCK_SECTORS,
    NEEDS_CHECK_FLAG,
    SUPERBLOCK_CSUM_XOR,
    THIN_MAGIC,
    THIN_VERSION,
)
from thinmgr.format.superblock import Superblock

STRUCTURE = "superblock"
SNAP_STRUCTURE = "metadata snapshot superblock"


def read_superblock_copy(
    source: BlockSource, location: int, structure: str, problems: Problems
) -> Superblock | None:
    """Decode a superblock (or its snapshot copy) if its checksum holds; report what is off.

    Returns None when nothing in it can be trusted (unreadable, bad checksum).
    """
    if not 0 <= location < source.nr_blocks:
        problems.fatal(
            structure,
            f"block number {location} is outside the metadata device ({source.nr_blocks} blocks)",
            location,
        )
        return None
    block = source.read_block(location)
    if not checksum_ok(block, SUPERBLOCK_CSUM_XOR):
        problems.fatal(structure, "bad checksum in superblock", location)
        return None
    sb = Superblock.unpack(block)
    if sb.blocknr != location:
        problems.fatal(structure, f"bad block nr: the block says {sb.blocknr}", location)
    if sb.magic != THIN_MAGIC:
        # The kernel refuses it (sb_check); thin_check does not look (section 2).
        problems.fatal(structure, f"bad magic {sb.magic} (expected {THIN_MAGIC})", location)
    return sb


def check_superblock(source: BlockSource, problems: Problems) -> Superblock | None:
    """Block 0: everything the kernel validates on open, and the sanity of the sm roots."""
    if source.nr_blocks < 1:
        problems.fatal(
            STRUCTURE, f"metadata device/file too small: less than {BLOCK_SIZE} bytes", 0
        )
        return None
    sb = read_superblock_copy(source, 0, STRUCTURE, problems)
    if sb is None:
        return None
    _check_fields(sb, problems)
    _check_metadata_size(sb, source.nr_blocks, problems)
    _check_sm_root_summary(sb, problems)
    return sb


def _check_fields(sb: Superblock, problems: Problems) -> None:
    if sb.flags & ~NEEDS_CHECK_FLAG:
        problems.non_fatal(STRUCTURE, f"unknown flag bits {sb.flags & ~NEEDS_CHECK_FLAG:#x}", 0)
    if sb.flags & NEEDS_CHECK_FLAG:
        problems.warning(
            STRUCTURE,
            "the NEEDS_CHECK flag is set (the kernel keeps the pool read-only until it is cleared)",
            0,
        )
    if sb.version == 0 or sb.version > THIN_VERSION:
        problems.non_fatal(
            STRUCTURE, f"unknown metadata version {sb.version} (kernels write 1 or 2)", 0
        )
    if sb.incompat_flags or sb.compat_flags:
        # Kernel: unknown incompat bits refuse every open (section 2).
        problems.fatal(
            STRUCTURE,
            f"unsupported feature flags compat={sb.compat_flags:#x} "
            f"incompat={sb.incompat_flags:#x}",
            0,
        )
    if sb.compat_ro_flags:
        problems.fatal(
            STRUCTURE,
            f"unsupported read-only-compatible feature flags "
            f"{sb.compat_ro_flags:#x} (no read-write open)",
            0,
        )
    if sb.metadata_block_size != METADATA_BLOCK_SECTORS:
        problems.fatal(
            STRUCTURE, f"metadata block size {sb.metadata_block_size} sectors (must be 8)", 0
        )
    dbs = sb.data_block_size
    if not MIN_DATA_BLOCK_SECTORS <= dbs <= MAX_DATA_BLOCK_SECTORS or dbs % MIN_DATA_BLOCK_SECTORS:
        # dm-thin.c: 64 KiB .. 1 GiB, a multiple of 64 KiB (section 10).
        problems.fatal(
            STRUCTURE,
            f"data block size {dbs} sectors is not a multiple of 128 between 128 and 2097152",
            0,
        )
    if sb.time > MAX_TIME:
        # Mappings hold 24 bits of time; the kernel does not mask it (section 4.3).
        problems.non_fatal(STRUCTURE, f"time {sb.time} does not fit the 24 bits mappings store", 0)


def _check_metadata_size(sb: Superblock, device_blocks: int, problems: Problems) -> None:
    nr = sb.metadata_sm.nr_blocks
    if nr == 0:
        problems.fatal(STRUCTURE, "metadata space map manages 0 blocks", 0)
    elif nr > MAX_METADATA_BLOCKS:
        problems.fatal(
            STRUCTURE,
            f"metadata space map manages {nr} blocks, more than the "
            f"format allows ({MAX_METADATA_BLOCKS})",
            0,
        )
    elif nr > device_blocks:
        problems.fatal(
            STRUCTURE,
            f"metadata space map manages {nr} blocks but the device "
            f"holds {device_blocks} (truncated file?)",
            0,
        )
    # metadata_nr_blocks is written at format time and never updated on a resize
    # (section 13.4 item 6), so only a value the device cannot hold is suspicious.
    if sb.metadata_nr_blocks > device_blocks:
        problems.warning(
            STRUCTURE,
            f"metadata_nr_blocks {sb.metadata_nr_blocks} exceeds the "
            f"device size ({device_blocks} blocks)",
            0,
        )
    if nr and sb.metadata_nr_blocks > nr:
        problems.warning(
            STRUCTURE,
            f"metadata_nr_blocks {sb.metadata_nr_blocks} exceeds the "
            f"metadata space map's {nr} blocks",
            0,
        )


def _check_sm_root_summary(sb: Superblock, problems: Problems) -> None:
    for name, root in (("metadata", sb.metadata_sm), ("data", sb.data_sm)):
        if root.nr_allocated > root.nr_blocks:
            problems.non_fatal(
                STRUCTURE,
                f"{name} space map: nr_allocated "
                f"{root.nr_allocated} exceeds nr_blocks "
                f"{root.nr_blocks}",
                0,
            )


def check_snapshot_copy(
    source: BlockSource, location: int, problems: Problems
) -> Superblock | None:
    """The held copy written by reserve_metadata_snap (section 7.1)."""
    sb = read_superblock_copy(source, location, SNAP_STRUCTURE, problems)
    if sb is None:
        return None
    if not (sb.data_sm.is_zero and sb.metadata_sm.is_zero):
        problems.warning(
            SNAP_STRUCTURE,
            "space map roots are not zeroed as reserve_metadata_snap leaves them",
            location,
        )
    if sb.held_root:
        problems.non_fatal(
            SNAP_STRUCTURE, f"holds a metadata snapshot itself (block {sb.held_root})", location
        )
    return sb
