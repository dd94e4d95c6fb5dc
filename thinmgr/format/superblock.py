"""The thin superblock (block 0) and the metadata-snapshot copy of it (format sections 2, 7)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

from thinmgr.errors import CorruptMetadataError
from thinmgr.format.checksum import checksum_ok, seal
from thinmgr.format.constants import (
    BLOCK_SIZE,
    METADATA_BLOCK_SECTORS,
    SM_ROOT_SLOT,
    SUPERBLOCK_CSUM_XOR,
    THIN_MAGIC,
    THIN_VERSION,
)

# Packed struct thin_disk_superblock, 364 bytes (dm-thin-metadata.c).
_SB = struct.Struct("<IIQ16sQIIQQ128s128sQQIIQIII")
_SM_ROOT = struct.Struct("<QQQQ")
assert _SB.size == 364


@dataclass(frozen=True)
class SpaceMapRoot:
    """``disk_sm_root``: the first 32 bytes of a 128-byte slot (section 6.1)."""

    nr_blocks: int = 0
    nr_allocated: int = 0
    bitmap_root: int = 0
    ref_count_root: int = 0

    @classmethod
    def unpack(cls, slot: bytes) -> SpaceMapRoot:
        return cls(*_SM_ROOT.unpack_from(slot, 0))

    def pack(self) -> bytes:
        raw = _SM_ROOT.pack(
            self.nr_blocks, self.nr_allocated, self.bitmap_root, self.ref_count_root
        )
        return raw.ljust(SM_ROOT_SLOT, b"\0")

    @property
    def is_zero(self) -> bool:
        return self == SpaceMapRoot()


@dataclass(frozen=True)
class Superblock:
    flags: int = 0
    blocknr: int = 0
    uuid: bytes = b"\0" * 16
    magic: int = THIN_MAGIC
    version: int = THIN_VERSION
    time: int = 0
    trans_id: int = 0
    held_root: int = 0
    data_sm: SpaceMapRoot = field(default_factory=SpaceMapRoot)
    metadata_sm: SpaceMapRoot = field(default_factory=SpaceMapRoot)
    data_mapping_root: int = 0
    device_details_root: int = 0
    data_block_size: int = 128
    metadata_block_size: int = METADATA_BLOCK_SECTORS
    metadata_nr_blocks: int = 0
    compat_flags: int = 0
    compat_ro_flags: int = 0
    incompat_flags: int = 0

    @classmethod
    def unpack(cls, block: bytes | bytearray | memoryview) -> Superblock:
        f = _SB.unpack_from(block, 0)
        return cls(
            flags=f[1],
            blocknr=f[2],
            uuid=f[3],
            magic=f[4],
            version=f[5],
            time=f[6],
            trans_id=f[7],
            held_root=f[8],
            data_sm=SpaceMapRoot.unpack(f[9]),
            metadata_sm=SpaceMapRoot.unpack(f[10]),
            data_mapping_root=f[11],
            device_details_root=f[12],
            data_block_size=f[13],
            metadata_block_size=f[14],
            metadata_nr_blocks=f[15],
            compat_flags=f[16],
            compat_ro_flags=f[17],
            incompat_flags=f[18],
        )

    def pack(self) -> bytearray:
        """The whole 4 KiB block, zero padded and checksummed."""
        block = bytearray(BLOCK_SIZE)
        _SB.pack_into(
            block,
            0,
            0,
            self.flags,
            self.blocknr,
            self.uuid,
            self.magic,
            self.version,
            self.time,
            self.trans_id,
            self.held_root,
            self.data_sm.pack(),
            self.metadata_sm.pack(),
            self.data_mapping_root,
            self.device_details_root,
            self.data_block_size,
            self.metadata_block_size,
            self.metadata_nr_blocks,
            self.compat_flags,
            self.compat_ro_flags,
            self.incompat_flags,
        )
        seal(block, SUPERBLOCK_CSUM_XOR)
        return block

    def snapshot_copy(self, location: int) -> Superblock:
        """The held copy ``reserve_metadata_snap`` writes: sm roots zeroed, blocknr = itself."""
        return replace(
            self, blocknr=location, data_sm=SpaceMapRoot(), metadata_sm=SpaceMapRoot(), held_root=0
        )


def _looks_like_xml(block: bytes | bytearray | memoryview) -> bool:
    head = bytes(block[:64]).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith((b"<?xml", b"<superblock"))


def _bad_superblock(
    block: bytes | bytearray | memoryview, location: int, structure: str
) -> CorruptMetadataError:
    """The error for a superblock whose checksum fails, saying what the block looks like.

    thin_check 0.9.0 likewise tells an XML file from damaged metadata (section 11.1).
    """
    if _looks_like_xml(block):
        return CorruptMetadataError(
            "bad checksum: this looks like XML (a dump), not binary metadata",
            block=location,
            structure=structure,
            hint="Turn a dump into metadata with `thinmgr metadata restore`.",
        )
    if not any(bytes(block)):
        return CorruptMetadataError(
            "bad checksum: the block is all zeroes (unformatted, or not thin-pool metadata)",
            block=location,
            structure=structure,
            hint="Is this the metadata device of a thin pool?",
        )
    return CorruptMetadataError("bad checksum", block=location, structure=structure)


def parse_superblock(
    block: bytes | bytearray | memoryview, location: int, *, structure: str = "superblock"
) -> Superblock:
    """Decode and validate a superblock read from ``location``.

    Checks what the kernel's ``sb_check`` checks (checksum, self block number, magic) and
    refuses feature bits no kernel defines; the tools check only the checksum (section 2).
    """
    if len(block) < BLOCK_SIZE:
        raise CorruptMetadataError("short block", block=location, structure=structure)
    if not checksum_ok(block, SUPERBLOCK_CSUM_XOR):
        raise _bad_superblock(block, location, structure)
    sb = Superblock.unpack(block)
    if sb.blocknr != location:
        raise CorruptMetadataError(
            f"block number field says {sb.blocknr}", block=location, structure=structure
        )
    if sb.magic != THIN_MAGIC:
        raise CorruptMetadataError(
            f"bad magic {sb.magic} (expected {THIN_MAGIC})", block=location, structure=structure
        )
    if sb.incompat_flags or sb.compat_flags:
        raise CorruptMetadataError(
            f"unsupported feature flags compat={sb.compat_flags:#x} "
            f"incompat={sb.incompat_flags:#x}",
            block=location,
            structure=structure,
        )
    if sb.metadata_block_size != METADATA_BLOCK_SECTORS:
        raise CorruptMetadataError(
            f"metadata block size {sb.metadata_block_size} sectors (must be 8)",
            block=location,
            structure=structure,
        )
    return sb
