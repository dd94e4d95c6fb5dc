"""thin_dump-compatible output (format section 9.1).

The XML is byte-identical to thin-provisioning-tools 0.9.0's ``thin_dump``: two-space
indentation, attributes in its order, ``flags`` always printed, ``uuid`` always empty, and
its run-length rule (a mapping extends a run iff virtual block, data block and time all
continue it). The emitters yield text chunks; writing them is the caller's business.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from thinmgr.format.btree import Node
from thinmgr.format.metadata import DeviceDetails, ThinMetadata

U64 = npt.NDArray[np.uint64]


@dataclass(frozen=True)
class Runs:
    """Maximal runs of one device's mappings: parallel lists of equal length."""

    vbegin: list[int]
    dbegin: list[int]
    length: list[int]
    time: list[int]


def leaf_arrays(leaves: Iterator[Node]) -> tuple[U64, U64]:
    """All keys and all values of a sequence of leaves, concatenated."""
    keys: list[U64] = []
    values: list[U64] = []
    for leaf in leaves:
        if leaf.nr_entries:
            keys.append(leaf.keys)
            values.append(leaf.values_u64())
    if not keys:
        empty = np.zeros(0, dtype=np.uint64)
        return empty, empty
    return np.concatenate(keys), np.concatenate(values)


def runs_of(keys: U64, values: U64) -> Runs:
    """Split mappings into thin_dump's runs, vectorised."""
    if len(keys) == 0:
        return Runs([], [], [], [])
    data = values >> np.uint64(24)
    time = values & np.uint64(0xFFFFFF)
    # uint64 wraps on subtraction, so "next == previous + 1" is tested as a difference of 1.
    one = np.uint64(1)
    breaks = (np.diff(keys) != one) | (np.diff(data) != one) | (np.diff(time) != 0)
    starts = np.flatnonzero(np.concatenate(([True], breaks)))
    lengths = np.diff(np.append(starts, len(keys)))
    return Runs(
        keys[starts].tolist(), data[starts].tolist(), lengths.tolist(), time[starts].tolist()
    )


def _superblock_xml(md: ThinMetadata) -> str:
    # thin_dump 0.9.0 never prints metadata_snap, even with -m (section 9.1); only
    # thin_delta does (section 9.2).
    sb = md.view
    return (
        f'<superblock uuid="" time="{sb.time}" transaction="{sb.trans_id}" '
        f'flags="{sb.flags}" version="{sb.version}" '
        f'data_block_size="{sb.data_block_size}" '
        f'nr_data_blocks="{md.nr_data_blocks}">\n'
    )


def _device_xml(dev: int, details: DeviceDetails, mapped: int) -> str:
    return (
        f'  <device dev_id="{dev}" mapped_blocks="{mapped}" '
        f'transaction="{details.transaction_id}" '
        f'creation_time="{details.creation_time}" '
        f'snap_time="{details.snapshotted_time}">\n'
    )


def _runs_xml(runs: Runs) -> str:
    lines: list[str] = []
    append = lines.append
    for v, d, n, t in zip(runs.vbegin, runs.dbegin, runs.length, runs.time, strict=True):
        if n == 1:
            append(f'    <single_mapping origin_block="{v}" data_block="{d}" time="{t}"/>\n')
        else:
            append(
                f'    <range_mapping origin_begin="{v}" data_begin="{d}" '
                f'length="{n}" time="{t}"/>\n'
            )
    return "".join(lines)


@dataclass(frozen=True)
class DumpOptions:
    dev_ids: frozenset[int] | None = None  # only these devices (thin_dump --dev-id)
    skip_mappings: bool = False


def _selected(md: ThinMetadata, options: DumpOptions) -> Iterator[tuple[int, DeviceDetails, int]]:
    for dev, (details, root) in md.devices().items():
        if options.dev_ids is None or dev in options.dev_ids:
            yield dev, details, root


def dump_xml(md: ThinMetadata, options: DumpOptions = DumpOptions()) -> Iterator[str]:
    """thin_dump's XML, as chunks (one per device)."""
    yield _superblock_xml(md)
    for dev, details, root in _selected(md, options):
        if options.skip_mappings:
            # thin_dump prints the stored count when it does not walk the mappings.
            yield _device_xml(dev, details, details.mapped_blocks) + "  </device>\n"
            continue
        keys, values = leaf_arrays(md.mapping_leaves(dev, root))
        # thin_dump prints the number of mappings it walked, not the stored count.
        yield (
            _device_xml(dev, details, len(keys))
            + _runs_xml(runs_of(keys, values))
            + "  </device>\n"
        )
    yield "</superblock>\n"


def dump_json(md: ThinMetadata, options: DumpOptions = DumpOptions()) -> Iterator[str]:
    """The same content as the XML, as one JSON document streamed device by device.

    Runs are arrays ``[origin_begin, data_begin, length, time]`` to keep large dumps small.
    """
    sb = md.view
    head = {
        "time": sb.time,
        "transaction": sb.trans_id,
        "flags": sb.flags,
        "version": sb.version,
        "data_block_size": sb.data_block_size,
        "nr_data_blocks": md.nr_data_blocks,
        "metadata_snap": md.snap_location,
    }
    yield json.dumps(head)[:-1] + ', "devices": ['
    first = True
    for dev, details, root in _selected(md, options):
        if options.skip_mappings:
            runs, mapped = Runs([], [], [], []), details.mapped_blocks
        else:
            keys, values = leaf_arrays(md.mapping_leaves(dev, root))
            runs, mapped = runs_of(keys, values), len(keys)
        device = {
            "dev_id": dev,
            "mapped_blocks": mapped,
            "transaction": details.transaction_id,
            "creation_time": details.creation_time,
            "snap_time": details.snapshotted_time,
            "mappings": [
                list(r) for r in zip(runs.vbegin, runs.dbegin, runs.length, runs.time, strict=True)
            ],
        }
        yield ("" if first else ", ") + json.dumps(device, separators=(",", ":"))
        first = False
    yield "]}\n"


def dump_human(md: ThinMetadata, options: DumpOptions = DumpOptions()) -> Iterator[str]:
    """thin_dump -f human_readable."""
    sb = md.view
    yield (
        f'begin superblock: "", {sb.time}, {sb.trans_id}, {sb.flags}, {sb.version}, '
        f"{sb.data_block_size}, {md.nr_data_blocks}\n"
    )
    for dev, details, root in _selected(md, options):
        if options.skip_mappings:
            runs, mapped = Runs([], [], [], []), details.mapped_blocks
        else:
            keys, values = leaf_arrays(md.mapping_leaves(dev, root))
            runs, mapped = runs_of(keys, values), len(keys)
        lines = [
            f"device: {dev}\nmapped_blocks: {mapped}\n"
            f"transaction: {details.transaction_id}\n"
            f"creation time: {details.creation_time}\n"
            f"snap time: {details.snapshotted_time}\n"
        ]
        for v, d, n, t in zip(runs.vbegin, runs.dbegin, runs.length, runs.time, strict=True):
            if n == 1:
                lines.append(f"    {v} -> {d}, {t}\n")
            else:
                lines.append(f"    ({v}..{v + n - 1}) -> ({d}..{d + n - 1}), {t}\n")
        lines.append("\n")
        yield "".join(lines)
    yield "end superblock\n"
