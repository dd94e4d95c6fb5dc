"""The thin metadata as a whole: superblock, device details and mapping trees (sections 2, 4, 7).

``ThinMetadata`` reads the live view, or with ``snap`` the metadata snapshot the superblock
holds (as ``thin_dump -m`` does), through any ``BlockSource``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from thinmgr.errors import CorruptMetadataError, NotFoundError, UsageError
from thinmgr.format.blocks import BlockSource, read_checked
from thinmgr.format.btree import Node, Reporter, TreeWalk, _raise
from thinmgr.format.constants import (
    BLOCK_SIZE,
    DETAILS_VALUE_SIZE,
    MAPPING_VALUE_SIZE,
    THIN_SUPERBLOCK_LOCATION,
)
from thinmgr.format.superblock import parse_superblock

_DETAILS = struct.Struct("<QQII")


@dataclass(frozen=True)
class DeviceDetails:
    """``disk_device_details`` (section 4.1)."""

    mapped_blocks: int
    transaction_id: int
    creation_time: int
    snapshotted_time: int

    @classmethod
    def unpack(cls, raw: bytes | memoryview, offset: int = 0) -> DeviceDetails:
        return cls(*_DETAILS.unpack_from(raw, offset))

    def pack(self) -> bytes:
        return _DETAILS.pack(
            self.mapped_blocks, self.transaction_id, self.creation_time, self.snapshotted_time
        )


def unpack_block_time(value: int) -> tuple[int, int]:
    """(data block, time) of a mapping value: 40 bits of block, 24 of time (section 4.3)."""
    return value >> 24, value & 0xFFFFFF


def pack_block_time(data_block: int, time: int) -> int:
    return (data_block << 24) | time


class ThinMetadata:
    """Read access to one view (live or held snapshot) of a pool's metadata."""

    def __init__(
        self, source: BlockSource, *, snap: bool | int = False, report: Reporter = _raise
    ) -> None:
        if source.nr_blocks < 1:
            raise CorruptMetadataError(
                "metadata device too small: it holds no whole block, at least one "
                f"{BLOCK_SIZE}-byte block (the superblock) is needed",
                block=THIN_SUPERBLOCK_LOCATION,
                structure="superblock",
                hint="Is this the metadata device of a thin pool?",
            )
        self.source = source
        self.report = report
        block = read_checked(source, THIN_SUPERBLOCK_LOCATION, "superblock")
        self.superblock = parse_superblock(block, THIN_SUPERBLOCK_LOCATION)
        self.snap_location: int | None = None
        self.view = self.superblock
        if snap is not False:
            held = self.superblock.held_root
            if held == 0:
                raise NotFoundError(
                    "no metadata snapshot found: the superblock holds none",
                    hint="Reserve one first (`dmsetup message POOL 0 reserve_metadata_snap`), "
                    "or drop --metadata-snap.",
                )
            if snap is not True and snap != held:
                raise UsageError(
                    f"--metadata-snap={snap} does not match the held metadata snapshot "
                    f"at block {held}",
                    hint=f"Use --metadata-snap={held} or plain --metadata-snap.",
                )
            self.snap_location = held
            self.view = parse_superblock(
                read_checked(source, held, "metadata snapshot"),
                held,
                structure="metadata snapshot superblock",
            )

    @property
    def nr_data_blocks(self) -> int:
        """As thin_dump prints it: 0 for a metadata snapshot, which has no space maps."""
        return 0 if self.snap_location is not None else self.view.data_sm.nr_blocks

    def device_details(self) -> dict[int, DeviceDetails]:
        details: dict[int, DeviceDetails] = {}
        walk = TreeWalk(
            self.source,
            self.view.device_details_root,
            DETAILS_VALUE_SIZE,
            "device details tree",
            report=self.report,
        )
        for leaf in walk.leaves():
            offset = leaf.values_offset
            for i, dev in enumerate(leaf.key_list()):
                details[dev] = DeviceDetails.unpack(leaf.block, offset + DETAILS_VALUE_SIZE * i)
        return details

    def mapping_roots(self) -> dict[int, int]:
        """Top level of the mapping tree: device id -> root of its block tree."""
        roots: dict[int, int] = {}
        walk = TreeWalk(
            self.source,
            self.view.data_mapping_root,
            MAPPING_VALUE_SIZE,
            "mapping tree (top level)",
            report=self.report,
        )
        for leaf in walk.leaves():
            roots.update(zip(leaf.key_list(), leaf.child_list(), strict=True))
        return roots

    def devices(self) -> dict[int, tuple[DeviceDetails, int]]:
        """Each device's details and mapping root; both trees must name the same devices."""
        details = self.device_details()
        roots = self.mapping_roots()
        for dev in sorted(roots.keys() - details.keys()):
            self.report(
                CorruptMetadataError(
                    f"mappings present for device {dev}, but it isn't present in the device "
                    "details tree",
                    block=self.view.data_mapping_root,
                    structure="mapping tree",
                )
            )
        for dev in sorted(details.keys() - roots.keys()):
            self.report(
                CorruptMetadataError(
                    f"device {dev} has details but no mapping tree",
                    block=self.view.device_details_root,
                    structure="device details tree",
                )
            )
        return {dev: (details[dev], roots[dev]) for dev in sorted(details.keys() & roots.keys())}

    def mapping_leaves(
        self, dev: int, root: int, *, check_occupancy: bool = False
    ) -> Iterator[Node]:
        """The leaves of one device's block tree in virtual-block order."""
        walk = TreeWalk(
            self.source,
            root,
            MAPPING_VALUE_SIZE,
            f"mapping tree of device {dev}",
            report=self.report,
            check_occupancy=check_occupancy,
        )
        return walk.leaves()

    def mappings(self, dev: int, root: int) -> Iterator[tuple[int, int, int]]:
        """(virtual block, data block, time) of every mapping of a device, in order."""
        for leaf in self.mapping_leaves(dev, root):
            for vblock, value in zip(leaf.key_list(), leaf.child_list(), strict=True):
                yield vblock, value >> 24, value & 0xFFFFFF
