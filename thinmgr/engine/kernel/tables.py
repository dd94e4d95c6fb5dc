"""Table lines for the kernel's ``thin-pool`` and ``thin`` targets, built and read back.

Formats as in Documentation/admin-guide/device-mapper/thin-provisioning.rst and dm-thin.c
(Linux 6.1; ``pool_ctr``/``thin_ctr`` read them, ``pool_status``/``thin_status`` with
STATUSTYPE_TABLE print them back)::

    thin-pool <metadata dev> <data dev> <data block size (sectors)> <low water mark (blocks)>
              [<number of feature args> [<arg>]*]
    thin <pool dev> <dev id> [<external origin dev>]

Devices are always written as ``major:minor``: the kernel resolves a path with lookup_bdev,
which fails without a node (kernel-lab.md §9, pitfall 2).
"""

from __future__ import annotations

from dataclasses import dataclass

from thinmgr.errors import IOFailure, UsageError
from thinmgr.kernel.dm import Target

SECTOR_SIZE = 512
MIN_BLOCK_SECTORS = 128  # 64 KiB (DATA_DEV_BLOCK_SIZE_MIN_SECTORS)
MAX_BLOCK_SECTORS = 2097152  # 1 GiB (DATA_DEV_BLOCK_SIZE_MAX_SECTORS)
MAX_DEV_ID = (1 << 24) - 1  # dm-thin's MAX_DEV_ID
# The order in which the kernel prints the features back (dm-thin.c emit_flags).
_FEATURE_ORDER = (
    "skip_block_zeroing",
    "ignore_discard",
    "no_discard_passdown",
    "read_only",
    "error_if_no_space",
)

DevNo = tuple[int, int]


@dataclass(frozen=True)
class PoolFeatures:
    skip_block_zeroing: bool = False
    ignore_discard: bool = False
    no_discard_passdown: bool = False
    read_only: bool = False
    error_if_no_space: bool = False

    def args(self) -> list[str]:
        return [name for name in _FEATURE_ORDER if getattr(self, name)]


@dataclass(frozen=True)
class PoolTable:
    length: int  # sectors: the kernel sizes the data space from this (data blocks * block size)
    metadata_dev: DevNo
    data_dev: DevNo
    block_sectors: int
    low_water_mark: int
    features: PoolFeatures

    @property
    def nr_data_blocks(self) -> int:
        return self.length // self.block_sectors

    def target(self) -> Target:
        args = self.features.args()
        params = (
            f"{devno(self.metadata_dev)} {devno(self.data_dev)} {self.block_sectors} "
            f"{self.low_water_mark} {len(args)}"
        )
        return Target(0, self.length, "thin-pool", " ".join([params, *args]))


@dataclass(frozen=True)
class ThinTable:
    length: int
    pool_dev: DevNo
    dev_id: int
    external_origin: DevNo | None = None

    def target(self) -> Target:
        params = f"{devno(self.pool_dev)} {self.dev_id}"
        if self.external_origin is not None:
            params += f" {devno(self.external_origin)}"
        return Target(0, self.length, "thin", params)


def devno(dev: DevNo) -> str:
    return f"{dev[0]}:{dev[1]}"


def check_block_sectors(block_sectors: int) -> None:
    if not (
        MIN_BLOCK_SECTORS <= block_sectors <= MAX_BLOCK_SECTORS
        and block_sectors % MIN_BLOCK_SECTORS == 0
    ):
        raise UsageError(
            f"data block size {block_sectors} sectors is not allowed by dm-thin",
            hint="Use a multiple of 128 sectors (64 KiB) between 64 KiB and 1 GiB.",
        )


def check_dev_id(dev_id: int) -> None:
    if not 0 <= dev_id <= MAX_DEV_ID:
        raise UsageError(f"thin device id {dev_id} is outside dm-thin's 24-bit range")


def pool_table(
    *,
    metadata_dev: DevNo,
    data_dev: DevNo,
    nr_data_blocks: int,
    block_sectors: int,
    low_water_mark: int = 0,
    features: PoolFeatures | None = None,
) -> PoolTable:
    check_block_sectors(block_sectors)
    if nr_data_blocks <= 0:
        raise UsageError("a thin pool needs at least one data block")
    if low_water_mark < 0:
        raise UsageError(f"low-water mark {low_water_mark} is negative")
    return PoolTable(
        length=nr_data_blocks * block_sectors,
        metadata_dev=metadata_dev,
        data_dev=data_dev,
        block_sectors=block_sectors,
        low_water_mark=low_water_mark,
        features=features or PoolFeatures(),
    )


def thin_table(*, pool_dev: DevNo, dev_id: int, size_bytes: int) -> ThinTable:
    check_dev_id(dev_id)
    if size_bytes <= 0 or size_bytes % SECTOR_SIZE:
        raise UsageError(f"volume size {size_bytes} is not a positive multiple of 512 bytes")
    return ThinTable(length=size_bytes // SECTOR_SIZE, pool_dev=pool_dev, dev_id=dev_id)


def _parse_devno(text: str, line: str) -> DevNo:
    major, colon, minor = text.partition(":")
    if not (colon and major.isdigit() and minor.isdigit()):
        raise IOFailure(f"table line names device {text!r}, not major:minor: {line!r}")
    return int(major), int(minor)


def _int(text: str, line: str, what: str) -> int:
    if not text.isdigit():
        raise IOFailure(f"table line has {what} {text!r}, not a number: {line!r}")
    return int(text)


def parse_pool_table(target: Target) -> PoolTable:
    """A thin-pool target as DM_TABLE_STATUS (with the table flag) gives it back."""
    line = target.line()
    if target.target_type != "thin-pool":
        raise IOFailure(f"expected a thin-pool target, found {target.target_type!r}: {line!r}")
    fields = target.params.split()
    if len(fields) < 4:
        raise IOFailure(f"thin-pool table with {len(fields)} parameters: {line!r}")
    flags: dict[str, bool] = {}
    if len(fields) > 4:
        count = _int(fields[4], line, "feature count")
        args = fields[5 : 5 + count]
        unknown = [a for a in args if a not in _FEATURE_ORDER]
        if len(args) != count or unknown:
            raise IOFailure(f"thin-pool table has unexpected features: {line!r}")
        flags = dict.fromkeys(args, True)
    return PoolTable(
        length=target.length,
        metadata_dev=_parse_devno(fields[0], line),
        data_dev=_parse_devno(fields[1], line),
        block_sectors=_int(fields[2], line, "block size"),
        low_water_mark=_int(fields[3], line, "low-water mark"),
        features=PoolFeatures(**flags),
    )


def parse_thin_table(target: Target) -> ThinTable:
    line = target.line()
    if target.target_type != "thin":
        raise IOFailure(f"expected a thin target, found {target.target_type!r}: {line!r}")
    fields = target.params.split()
    if len(fields) not in (2, 3):
        raise IOFailure(f"thin table with {len(fields)} parameters: {line!r}")
    origin = _parse_devno(fields[2], line) if len(fields) == 3 else None
    return ThinTable(
        length=target.length,
        pool_dev=_parse_devno(fields[0], line),
        dev_id=_int(fields[1], line, "device id"),
        external_origin=origin,
    )
