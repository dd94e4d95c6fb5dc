"""Per-device usage: mapped, exclusive and shared blocks, as thin_ls 0.9.0 reports them.

thin_ls (0.9.0, ``thin_ls.cc``) marks every data block once per mapping of every device, so a
block is *shared* when more than one mapping refers to it (two devices, or one device twice)
and *exclusive* when exactly one does; a device's EXCLUSIVE is the number of its mappings to
exclusive blocks, and SHARED is its stored ``mapped_blocks`` minus that (format section 5.1:
these figures come from the mappings, not from the data space map). Here the same counts come
from numpy: all devices' data blocks concatenated, ``np.unique`` counts, one lookup per device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from thinmgr.errors import UsageError
from thinmgr.format.constants import SECTOR_SIZE
from thinmgr.format.dump import leaf_arrays
from thinmgr.format.metadata import ThinMetadata

U64 = npt.NDArray[np.uint64]

# thin_ls 0.9.0's field names, in its --help order; the header of a column is its name.
LS_FIELDS = (
    "DEV", "MAPPED_BLOCKS", "EXCLUSIVE_BLOCKS", "SHARED_BLOCKS",
    "MAPPED_SECTORS", "EXCLUSIVE_SECTORS", "SHARED_SECTORS",
    "MAPPED_BYTES", "EXCLUSIVE_BYTES", "SHARED_BYTES",
    "MAPPED", "EXCLUSIVE", "SHARED",
    "TRANSACTION", "CREATE_TIME", "SNAP_TIME",
)  # fmt: skip
DEFAULT_FIELDS = ("DEV", "MAPPED", "CREATE_TIME", "SNAP_TIME")  # thin_ls 0.9.0 without -o
SHARING_FIELDS = frozenset(f for f in LS_FIELDS if "EXCLUSIVE" in f or "SHARED" in f)

_U64_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class DeviceUsage:
    dev: int
    mapped_blocks: int  # the details tree's count, which thin_ls prints
    exclusive_blocks: int
    transaction: int
    creation_time: int
    snap_time: int

    @property
    def shared_blocks(self) -> int:
        # thin_ls computes mapped - exclusive in uint64; a stored count below the walked
        # exclusive count (corrupt details) wraps there too.
        return (self.mapped_blocks - self.exclusive_blocks) & _U64_MASK


# Below this many distinct data block numbers a dense bincount (linear, no sort) is cheaper
# than np.unique; above it (a huge or hostile data device) sorting bounds the memory.
_DENSE_COUNT_LIMIT = 1 << 26


def _mapping_counts(per_device: list[U64]) -> Callable[[U64], npt.NDArray[np.intp]]:
    """How many mappings (of all devices) point at each data block, as a lookup function."""
    if not per_device:
        return lambda data: np.zeros(len(data), dtype=np.intp)
    everything = np.concatenate(per_device)
    if len(everything) and int(everything.max()) < _DENSE_COUNT_LIMIT:
        dense = np.bincount(everything.astype(np.intp))
        return lambda data: dense[data.astype(np.intp)]
    blocks, counts = np.unique(everything, return_counts=True)
    return lambda data: counts[np.searchsorted(blocks, data)]


def device_usage(md: ThinMetadata, *, sharing: bool = True) -> list[DeviceUsage]:
    """Usage of every device, in device-id order.

    Without ``sharing`` only the details tree is read (exclusive counts are then 0): the
    columns thin_ls prints by default need nothing else, and it does not read more either.
    """
    devices = md.devices()
    data_by_root: dict[int, U64] = {}
    per_device: list[U64] = []
    if sharing:
        for dev, (_, root) in devices.items():
            # Devices whose whole tree is shared (a fresh snapshot) are read once.
            if root not in data_by_root:
                _, values = leaf_arrays(md.mapping_leaves(dev, root))
                data_by_root[root] = values >> np.uint64(24)
            per_device.append(data_by_root[root])
    count_of = _mapping_counts(per_device)
    usage = []
    for index, (dev, (details, _)) in enumerate(devices.items()):
        exclusive = 0
        if sharing and len(per_device[index]):
            exclusive = int(np.count_nonzero(count_of(per_device[index]) == 1))
        usage.append(
            DeviceUsage(
                dev,
                details.mapped_blocks,
                exclusive,
                details.transaction_id,
                details.creation_time,
                details.snapshotted_time,
            )
        )
    return usage


def human_size(nr_bytes: int) -> str:
    """A size the way thin_ls 0.9.0 prints MAPPED/EXCLUSIVE/SHARED ("64KiB", "63MiB", "0").

    Worked out from its output (no source of this version was at hand): the unit grows while
    the whole count in the current unit exceeds 8192; the last division rounds half up when
    the result is below 1024 and truncates otherwise (e.g. 62.5 MiB -> "63MiB",
    1024.5 MiB -> "1024MiB", 8192.5 MiB -> "8192MiB", 8.5 GiB -> "9GiB").
    """
    units = ("", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    value, unit = nr_bytes, 0
    previous = value
    while value > 8192 and unit < len(units) - 1:
        previous, value = value, value // 1024
        unit += 1
    if unit and value < 1024 and previous % 1024 >= 512:
        value += 1
    return f"{value}{units[unit]}"


def _getter(field: str, data_block_size: int) -> Callable[[DeviceUsage], int | str]:
    sectors = data_block_size
    nbytes = data_block_size * SECTOR_SIZE
    getters: dict[str, Callable[[DeviceUsage], int | str]] = {
        "DEV": lambda u: u.dev,
        "MAPPED_BLOCKS": lambda u: u.mapped_blocks,
        "EXCLUSIVE_BLOCKS": lambda u: u.exclusive_blocks,
        "SHARED_BLOCKS": lambda u: u.shared_blocks,
        "MAPPED_SECTORS": lambda u: u.mapped_blocks * sectors,
        "EXCLUSIVE_SECTORS": lambda u: u.exclusive_blocks * sectors,
        "SHARED_SECTORS": lambda u: u.shared_blocks * sectors,
        "MAPPED_BYTES": lambda u: u.mapped_blocks * nbytes,
        "EXCLUSIVE_BYTES": lambda u: u.exclusive_blocks * nbytes,
        "SHARED_BYTES": lambda u: u.shared_blocks * nbytes,
        "MAPPED": lambda u: human_size(u.mapped_blocks * nbytes),
        "EXCLUSIVE": lambda u: human_size(u.exclusive_blocks * nbytes),
        "SHARED": lambda u: human_size(u.shared_blocks * nbytes),
        "TRANSACTION": lambda u: u.transaction,
        "CREATE_TIME": lambda u: u.creation_time,
        "SNAP_TIME": lambda u: u.snap_time,
    }
    return getters[field]


def parse_fields(text: str) -> list[str]:
    """A comma-separated field list, as thin_ls -o takes it (names are case-sensitive)."""
    fields = text.split(",")
    unknown = [f for f in fields if f not in LS_FIELDS]
    if unknown or not text:
        shown = ", ".join(repr(f) for f in unknown) or "an empty list"
        raise UsageError(
            f"unknown field {shown} in --format", hint=f"Fields: {','.join(LS_FIELDS)}."
        )
    return fields


def ls_rows(
    usage: Iterable[DeviceUsage], fields: Sequence[str], data_block_size: int
) -> list[list[int | str]]:
    getters = [_getter(f, data_block_size) for f in fields]
    return [[get(u) for get in getters] for u in usage]


def ls_text(
    rows: Sequence[Sequence[int | str]], fields: Sequence[str], *, headers: bool = True
) -> str:
    """thin_ls's grid: every column right-aligned to its widest cell, each cell followed by
    one space (so lines end in a space), and the header row counted only when printed."""
    grid = [list(fields)] if headers else []
    grid += [[str(cell) for cell in row] for row in rows]
    if not grid:
        return ""
    widths = [max(len(row[i]) for row in grid) for i in range(len(fields))]
    return "".join(
        "".join(cell.rjust(w) + " " for cell, w in zip(row, widths, strict=True)) + "\n"
        for row in grid
    )


def ls_json(usage: Iterable[DeviceUsage], data_block_size: int) -> list[dict[str, int]]:
    """Every figure of every device, numbers only (the human sizes are for people)."""
    nbytes = data_block_size * SECTOR_SIZE
    return [
        {
            "dev": u.dev,
            "mapped_blocks": u.mapped_blocks,
            "exclusive_blocks": u.exclusive_blocks,
            "shared_blocks": u.shared_blocks,
            "mapped_bytes": u.mapped_blocks * nbytes,
            "exclusive_bytes": u.exclusive_blocks * nbytes,
            "shared_bytes": u.shared_blocks * nbytes,
            "transaction": u.transaction,
            "creation_time": u.creation_time,
            "snap_time": u.snap_time,
        }
        for u in usage
    ]
