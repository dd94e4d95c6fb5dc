"""The metadata reader against the oracle (thin-provisioning-tools 0.9.0).

Every image is made by the real ``thin_restore`` from generated or hand-written XML (or is
such an image with one hand-patched block). On each, ``thinmgr metadata dump`` must print
exactly what ``thin_dump`` prints (XML, human-readable, ``--dev-id``, ``--skip-mappings``,
``-m``), the JSON dump must carry the same mappings, and the space-map counts read by
``thinmgr.format.spacemap.read_counts`` must equal an independent recomputation from the trees
(section 5.1 of dm-thin-format.md). The recomputation below uses nothing of
``thinmgr.format`` but the checksum function, so that it cannot share a bug with the reader.
"""

from __future__ import annotations

import json
import struct
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import RestoreFn, run_tool
from tests.support.xmlgen import Device, Pool, random_pool
from thinmgr.cli.app import run
from thinmgr.format.blocks import MemoryBlocks
from thinmgr.format.checksum import seal
from thinmgr.format.constants import BTREE_CSUM_XOR, SUPERBLOCK_CSUM_XOR
from thinmgr.format.metadata import ThinMetadata
from thinmgr.format.spacemap import data_index, metadata_index, read_counts
from thinmgr.format.superblock import Superblock

BLOCK = 4096
_HEADER = struct.Struct("<IIQIII")  # csum, flags, blocknr, nr_entries, max_entries, value_size
_INTERNAL = 1


# --------------------------------------------------------------------------------------------
# Running both tools


def thinmgr_out(capsys: pytest.CaptureFixture[str], *args: str | Path) -> str:
    """stdout of ``thinmgr ARGS`` run in-process; the command must succeed."""
    capsys.readouterr()
    try:
        code = run([str(a) for a in args])
    except SystemExit as done:  # click's standalone mode exits on success
        code = int(done.code or 0)
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def thin_dump(*args: str | Path) -> str:
    return run_tool("thin_dump", *args).stdout


def assert_dumps_match(capsys: pytest.CaptureFixture[str], path: Path, *opts: str) -> str:
    """XML and human-readable output of both tools, with the same options, byte for byte."""
    ours = thinmgr_out(capsys, "metadata", "dump", *opts, path)
    theirs = thin_dump(*opts, path)
    assert ours == theirs
    ours_h = thinmgr_out(capsys, "metadata", "dump", "-f", "human_readable", *opts, path)
    assert ours_h == thin_dump("-f", "human_readable", *opts, path)
    return theirs


# --------------------------------------------------------------------------------------------
# An independent reader: struct only, for the oracle comparisons that thin_dump cannot make


@dataclass
class RawNode:
    flags: int
    keys: list[int]
    values_at: int  # byte offset of the value array in the image
    value_size: int


def raw_node(image: bytes | bytearray, blocknr: int) -> RawNode:
    base = blocknr * BLOCK
    _, flags, self_nr, nr, max_entries, vsize = _HEADER.unpack_from(image, base)
    assert self_nr == blocknr
    keys = list(struct.unpack_from(f"<{nr}Q", image, base + 32))
    return RawNode(flags, keys, base + 32 + 8 * max_entries, vsize)


def raw_u64s(image: bytes | bytearray, node: RawNode, stride: int = 8) -> list[int]:
    return [
        struct.unpack_from("<Q", image, node.values_at + stride * i)[0]
        for i in range(len(node.keys))
    ]


@dataclass
class RawSuperblock:
    data_sm: tuple[int, int, int, int]  # nr_blocks, nr_allocated, bitmap_root, ref_count_root
    meta_sm: tuple[int, int, int, int]
    mapping_root: int
    details_root: int


def raw_superblock(image: bytes | bytearray, at: int = 0) -> RawSuperblock:
    base = at * BLOCK
    return RawSuperblock(
        struct.unpack_from("<4Q", image, base + 64),
        struct.unpack_from("<4Q", image, base + 192),
        *struct.unpack_from("<QQ", image, base + 320),
    )


class Recount:
    """Reference counts recomputed from the trees, as thin_check does (section 5.1).

    Metadata: one per reference (superblock, index -> bitmap, parent entry -> node), a node
    reached a second time (a shared subtree) is not descended again. Data: one per distinct
    bottom-level leaf holding a mapping to the block.
    """

    def __init__(self, image: bytes | bytearray) -> None:
        self.image = image
        self.meta: Counter[int] = Counter()
        self.data: Counter[int] = Counter()
        self._visited: set[int] = set()
        self.max_height = 0

    def tree(self, root: int, on_leaf: Callable[[RawNode], None], height: int = 1) -> None:
        self.meta[root] += 1
        if root in self._visited:
            return
        self._visited.add(root)
        node = raw_node(self.image, root)
        self.max_height = max(self.max_height, height)
        if node.flags == _INTERNAL:
            for child in raw_u64s(self.image, node):
                self.tree(child, on_leaf, height + 1)
        else:
            on_leaf(node)

    def count_all(self) -> None:
        image = self.image
        sb = raw_superblock(image)
        self.meta[0] += 1
        # Metadata space map: the index block, each bitmap it lists, its ref-count tree.
        nr_meta, _, meta_index, meta_refs = sb.meta_sm
        self.meta[meta_index] += 1
        for k in range(-(-nr_meta // 16320)):
            self.meta[struct.unpack_from("<Q", image, meta_index * BLOCK + 16 + 16 * k)[0]] += 1
        self.tree(meta_refs, lambda _leaf: None)
        # Data space map: the index btree (16-byte values, blocknr first), bitmaps, ref counts.
        _, _, data_index_root, data_refs = sb.data_sm

        def bitmaps(leaf: RawNode) -> None:
            for bitmap in raw_u64s(image, leaf, stride=16):
                self.meta[bitmap] += 1

        self.tree(data_index_root, bitmaps)
        self.tree(data_refs, lambda _leaf: None)
        self.tree(sb.details_root, lambda _leaf: None)

        def mapping_leaf(leaf: RawNode) -> None:
            for value in raw_u64s(image, leaf):
                self.data[value >> 24] += 1

        def top_leaf(leaf: RawNode) -> None:
            for sub_root in raw_u64s(image, leaf):
                self.tree(sub_root, mapping_leaf)

        self.tree(sb.mapping_root, top_leaf)

    @staticmethod
    def as_array(counter: Counter[int], size: int) -> np.ndarray:
        out = np.zeros(size, dtype=np.uint64)
        for block, count in counter.items():
            assert block < size, f"block {block} beyond the space map ({size})"
            out[block] = count
        return out


def subtree_height(image: bytes | bytearray, root: int) -> int:
    height = 1
    node = raw_node(image, root)
    while node.flags == _INTERNAL:
        node = raw_node(image, raw_u64s(image, node)[0])
        height += 1
    return height


def assert_space_maps_match(path: Path) -> Recount:
    image = path.read_bytes()
    recount = Recount(image)
    recount.count_all()
    source = MemoryBlocks(image)
    md = ThinMetadata(source)
    sb = md.superblock
    meta = read_counts(
        source, sb.metadata_sm, metadata_index(source, sb.metadata_sm), "metadata space map"
    )
    data = read_counts(source, sb.data_sm, data_index(source, sb.data_sm), "data space map")
    expected_meta = Recount.as_array(recount.meta, sb.metadata_sm.nr_blocks)
    expected_data = Recount.as_array(recount.data, sb.data_sm.nr_blocks)
    assert len(meta.counts) == sb.metadata_sm.nr_blocks
    assert len(data.counts) == sb.data_sm.nr_blocks
    diff = np.flatnonzero(meta.counts.astype(np.uint64) != expected_meta)
    assert diff.size == 0, f"metadata counts differ at {diff[:10].tolist()}"
    diff = np.flatnonzero(data.counts.astype(np.uint64) != expected_data)
    assert diff.size == 0, f"data counts differ at {diff[:10].tolist()}"
    # Data summary is exact. thin_restore 0.9.0 counts one freed template leaf in the
    # metadata nr_allocated although its bitmap entry is 0 (section 13.4 item 2).
    assert sb.data_sm.nr_allocated == int(np.count_nonzero(expected_data))
    live_meta = int(np.count_nonzero(expected_meta))
    assert sb.metadata_sm.nr_allocated in (live_meta, live_meta + 1)
    return recount


# --------------------------------------------------------------------------------------------
# Pools


def _xml_pool(time: int, devices: list[Device], nr_data: int = 1000, **kw: int) -> Pool:
    return Pool(devices=devices, nr_data_blocks=nr_data, time=time, **kw)


RANDOM_CASES: dict[str, Callable[[], Pool]] = {
    "1-device-1-mapping": lambda: random_pool(1, 1, 1),
    "2-devices": lambda: random_pool(2, 2, 40),
    "singles": lambda: random_pool(3, 3, 300, max_run=1),
    "mostly-shared": lambda: random_pool(4, 6, 600, share=0.8),
    "long-runs": lambda: random_pool(5, 4, 1500, max_run=30),
    "many-times": lambda: random_pool(6, 2, 3000, max_time=50),
    "unshared": lambda: random_pool(7, 9, 200, share=0.0),
    "short-runs-2-leaf-levels": lambda: random_pool(8, 5, 1000, max_run=2, max_time=1),
}


@pytest.mark.parametrize("case", RANDOM_CASES)
def test_random_pools_match_thin_dump(
    capsys: pytest.CaptureFixture[str], restore_xml: RestoreFn, case: str
) -> None:
    pool = RANDOM_CASES[case]()
    path = restore_xml(pool)
    xml = assert_dumps_match(capsys, path)
    dev_ids = sorted(d.dev_id for d in pool.devices)
    assert_dumps_match(capsys, path, "--skip-mappings")
    for dev in (dev_ids[0], dev_ids[-1]):
        assert_dumps_match(capsys, path, "--dev-id", str(dev))
    assert_json_matches(capsys, path, xml)
    assert_space_maps_match(path)


def mappings_of_xml(xml: str) -> dict[int, list[tuple[int, int, int]]]:
    """(vblock, data block, time) per device, expanded from thin_dump's runs."""
    out: dict[int, list[tuple[int, int, int]]] = {}
    for dev in ET.fromstring(xml).iter("device"):
        rows = out.setdefault(int(dev.get("dev_id", "")), [])
        for m in dev:
            a = {k: int(v) for k, v in m.attrib.items()}
            if m.tag == "single_mapping":
                rows.append((a["origin_block"], a["data_block"], a["time"]))
            else:
                rows.extend(
                    (a["origin_begin"] + i, a["data_begin"] + i, a["time"])
                    for i in range(a["length"])
                )
    return out


def assert_json_matches(capsys: pytest.CaptureFixture[str], path: Path, xml: str) -> None:
    doc = json.loads(thinmgr_out(capsys, "metadata", "dump", "-f", "json", path))
    root = ET.fromstring(xml)
    assert doc["time"] == int(root.get("time", ""))
    assert doc["transaction"] == int(root.get("transaction", ""))
    assert doc["nr_data_blocks"] == int(root.get("nr_data_blocks", ""))
    assert doc["data_block_size"] == int(root.get("data_block_size", ""))
    got: dict[int, list[tuple[int, int, int]]] = {}
    for device in doc["devices"]:
        rows = got.setdefault(device["dev_id"], [])
        for vbegin, dbegin, length, time in device["mappings"]:
            rows.extend((vbegin + i, dbegin + i, time) for i in range(length))
        assert device["mapped_blocks"] == len(rows)
    assert got == mappings_of_xml(xml)


def test_no_devices(capsys: pytest.CaptureFixture[str], restore_xml: RestoreFn) -> None:
    path = restore_xml(_xml_pool(0, [], nr_data=100))
    xml = assert_dumps_match(capsys, path)
    assert "<device" not in xml
    assert_json_matches(capsys, path, xml)
    assert_space_maps_match(path)


def test_empty_devices_and_extreme_ids(
    capsys: pytest.CaptureFixture[str], restore_xml: RestoreFn
) -> None:
    max_time = (1 << 24) - 1
    devices = [
        Device(0),
        Device(5, transaction=7, creation_time=3, snap_time=4),
        Device(
            (1 << 24) - 1,
            transaction=(1 << 63),
            creation_time=max_time,
            snap_time=max_time,
            runs=[(0, 0, 5, max_time), (10, 5, 1, 0), ((1 << 63), 6, 3, 17)],
        ),
    ]
    pool = _xml_pool(
        max_time,
        devices,
        nr_data=2000,
        transaction=(1 << 64) - 1,
        flags=1,
        version=1,
        data_block_size=2097152,
    )
    path = restore_xml(pool)
    xml = assert_dumps_match(capsys, path)
    assert f'dev_id="{(1 << 24) - 1}"' in xml and f'time="{max_time}"' in xml
    assert_dumps_match(capsys, path, "--skip-mappings")
    assert_dumps_match(capsys, path, "--dev-id", str((1 << 24) - 1))
    assert_dumps_match(capsys, path, "--dev-id", "5")
    assert_json_matches(capsys, path, xml)
    assert_space_maps_match(path)


def patch_last_mapping(path: Path, dev_index: int, key: int, value: int) -> None:
    """Rewrite the last entry of a device's last leaf (section 13.1, "Patched leaf")."""
    image = bytearray(path.read_bytes())
    sb = raw_superblock(image)
    top = raw_node(image, sb.mapping_root)
    assert top.flags != _INTERNAL
    node_at = raw_u64s(image, top)[dev_index]
    node = raw_node(image, node_at)
    while node.flags == _INTERNAL:
        node_at = raw_u64s(image, node)[-1]
        node = raw_node(image, node_at)
    last = len(node.keys) - 1
    struct.pack_into("<Q", image, node_at * BLOCK + 32 + 8 * last, key)
    struct.pack_into("<Q", image, node.values_at + 8 * last, value)
    block = bytearray(image[node_at * BLOCK : (node_at + 1) * BLOCK])
    seal(block, BTREE_CSUM_XOR)
    image[node_at * BLOCK : (node_at + 1) * BLOCK] = block
    path.write_bytes(image)


def test_huge_vblock_and_data_block(
    capsys: pytest.CaptureFixture[str], restore_xml: RestoreFn
) -> None:
    # vblock 2^64-2 -> data block 2^40-1 at time 2^24-1, beyond the data device: thin_dump
    # prints it as it is (section 4.3).
    path = restore_xml(random_pool(11, 2, 500))
    patch_last_mapping(path, 1, (1 << 64) - 2, (1 << 64) - 1)
    xml = assert_dumps_match(capsys, path)
    assert 'origin_block="18446744073709551614" data_block="1099511627775" time="16777215"' in xml
    assert_json_matches(capsys, path, xml)


def test_three_level_mapping_tree(
    capsys: pytest.CaptureFixture[str], restore_xml: RestoreFn
) -> None:
    pool = random_pool(12, 1, 205_000, max_run=1)
    path = restore_xml(pool, size=32 << 20)
    image = path.read_bytes()
    top = raw_node(image, raw_superblock(image).mapping_root)
    assert subtree_height(image, raw_u64s(image, top)[0]) == 3
    xml = assert_dumps_match(capsys, path)
    assert_json_matches(capsys, path, xml)
    recount = assert_space_maps_match(path)
    assert recount.max_height == 3


def test_many_devices_details_tree_with_internal_nodes(
    capsys: pytest.CaptureFixture[str], restore_xml: RestoreFn
) -> None:
    pool = random_pool(13, 300, 3, max_run=2)
    path = restore_xml(pool)
    image = path.read_bytes()
    sb = raw_superblock(image)
    assert raw_node(image, sb.details_root).flags == _INTERNAL
    assert raw_node(image, sb.mapping_root).flags == _INTERNAL
    xml = assert_dumps_match(capsys, path)
    assert xml.count("<device ") == 300
    assert_dumps_match(capsys, path, "--skip-mappings")
    assert_dumps_match(capsys, path, "--dev-id", str(pool.devices[200].dev_id))
    assert_json_matches(capsys, path, xml)
    assert_space_maps_match(path)


def test_data_device_with_several_bitmaps(
    capsys: pytest.CaptureFixture[str], restore_xml: RestoreFn
) -> None:
    nr_data = 3 * 16320 + 77
    devices = [
        Device(0, runs=[(v * 7, (v * 977) % nr_data, 1, v % 3) for v in range(2000)]),
        Device(1, runs=[(0, nr_data - 10, 10, 1), (100, 16319, 2, 0)]),
    ]
    path = restore_xml(_xml_pool(3, devices, nr_data=nr_data))
    xml = assert_dumps_match(capsys, path)
    assert_json_matches(capsys, path, xml)
    source = MemoryBlocks(path.read_bytes())
    assert len(data_index(source, ThinMetadata(source).superblock.data_sm)) == 4
    assert_space_maps_match(path)


def test_shared_data_blocks_overflow_counts(restore_xml: RestoreFn) -> None:
    # Six devices mapping the same data blocks: counts of 6 live in the ref-count tree.
    runs = [(0, 0, 400, 0), (1000, 400, 300, 1)]
    devices = [Device(d, runs=list(runs)) for d in range(6)]
    path = restore_xml(_xml_pool(1, devices, nr_data=1000))
    assert_space_maps_match(path)
    source = MemoryBlocks(path.read_bytes())
    sb = ThinMetadata(source).superblock
    counts = read_counts(source, sb.data_sm, data_index(source, sb.data_sm), "data space map")
    assert len(counts.overflow) == 700
    assert set(counts.overflow.values()) == {6}


def test_held_metadata_snapshot(capsys: pytest.CaptureFixture[str], restore_xml: RestoreFn) -> None:
    # thin_restore cannot reserve a metadata snapshot; write the copy the kernel writes
    # (section 7.1) into a free block at the end of the device and hold it.
    path = restore_xml(random_pool(14, 3, 400))
    image = bytearray(path.read_bytes())
    held = len(image) // BLOCK - 1
    live = Superblock.unpack(image[:BLOCK])
    image[held * BLOCK :] = live.snapshot_copy(held).pack()
    block = bytearray(image[:BLOCK])
    struct.pack_into("<Q", block, 56, held)
    seal(block, SUPERBLOCK_CSUM_XOR)
    image[:BLOCK] = block
    path.write_bytes(image)
    ours = thinmgr_out(capsys, "metadata", "dump", "-m", path)
    assert ours == thin_dump("-m", path)
    assert 'nr_data_blocks="0"' in ours
    assert thinmgr_out(capsys, "metadata", "dump", f"--metadata-snap={held}", path) == ours
    assert thinmgr_out(capsys, "metadata", "dump", "-m", "-f", "human_readable", path) == thin_dump(
        "-m", "-f", "human_readable", path
    )
    # The live view is unchanged.
    assert thinmgr_out(capsys, "metadata", "dump", path) == thin_dump(path)
