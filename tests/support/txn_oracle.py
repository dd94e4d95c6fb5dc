"""Helpers for the transaction tests: the oracle (thin_check/thin_dump 0.9.0) and an
independent recount of every reference (format section 5.1) straight from the image."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np

from thinmgr.format.blocks import MemoryBlocks
from thinmgr.format.btree import TreeWalk, read_node
from thinmgr.format.constants import (
    DETAILS_VALUE_SIZE,
    ENTRIES_PER_BITMAP,
    INDEX_VALUE_SIZE,
    MAPPING_VALUE_SIZE,
    REFCOUNT_VALUE_SIZE,
)
from thinmgr.format.metadata import ThinMetadata
from thinmgr.format.spacemap import data_index, metadata_index, read_counts
from thinmgr.format.superblock import parse_superblock
from thinmgr.format.txn import PoolMetadata

Model = dict[int, dict[int, int]]


def write_image(image: bytes, path: Path) -> Path:
    path.write_bytes(image)
    return path


def thin_check(path: Path) -> None:
    result = subprocess.run(["thin_check", str(path)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def thin_dump(path: Path, *, snap: bool = False) -> str:
    args = ["thin_dump", str(path)] + (["-m"] if snap else [])
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def dump_model(xml: str) -> Model:
    """Device -> vblock -> data block, from thin_dump XML."""
    got: Model = {}
    for device in ET.fromstring(xml):
        mappings: dict[int, int] = {}
        for e in device:
            if e.tag == "single_mapping":
                mappings[int(e.get("origin_block", ""))] = int(e.get("data_block", ""))
            else:
                ob, db = int(e.get("origin_begin", "")), int(e.get("data_begin", ""))
                for i in range(int(e.get("length", ""))):
                    mappings[ob + i] = db + i
        got[int(device.get("dev_id", ""))] = mappings
    return got


def oracle(image: bytes, tmp: Path, model: Model, *, snap_model: Model | None = None) -> str:
    """thin_check exits 0, thin_dump (and -m) show exactly the model; the dump text."""
    path = write_image(image, tmp / "meta.bin")
    thin_check(path)
    xml = thin_dump(path)
    assert dump_model(xml) == model
    if snap_model is not None:
        assert dump_model(thin_dump(path, snap=True)) == snap_model
    return xml


def recount(image: bytes) -> None:
    """Recompute every metadata and data count and compare with the space maps; check node
    occupancy, mapped_blocks and the space-map summaries (what 0.9.0 does not check)."""
    source = MemoryBlocks(image)
    sb = parse_superblock(source.read_block(0), 0)
    meta: Counter[int] = Counter()
    data: Counter[int] = Counter()
    visited: set[int] = set()

    def walk(root: int, vsize: int, *, leaf_children: str | None = None) -> None:
        """Count one reference to ``root``; descend it once only."""
        meta[root] += 1
        if root in visited:
            return
        visited.add(root)
        node = read_node(source, root, vsize, "test")
        if not node.is_leaf:
            for child in node.child_list():
                walk(child, vsize, leaf_children=leaf_children)
        elif leaf_children == "subtrees":
            for sub in node.child_list():
                walk(sub, MAPPING_VALUE_SIZE, leaf_children="data")
        elif leaf_children == "data":
            for value in node.child_list():
                data[value >> 24] += 1

    def occupancy(root: int, vsize: int) -> list[int]:
        walk_ = TreeWalk(source, root, vsize, "test", check_occupancy=True)
        return [leaf.nr_entries for leaf in walk_.leaves()]

    meta[0] += 1
    views = [sb]
    if sb.held_root:
        meta[sb.held_root] += 1
        views.append(parse_superblock(source.read_block(sb.held_root), sb.held_root))
    for view in views:
        walk(view.device_details_root, DETAILS_VALUE_SIZE)
        walk(view.data_mapping_root, MAPPING_VALUE_SIZE, leaf_children="subtrees")
    meta[sb.metadata_sm.bitmap_root] += 1
    for entry in metadata_index(source, sb.metadata_sm):
        meta[entry.blocknr] += 1
    walk(sb.metadata_sm.ref_count_root, REFCOUNT_VALUE_SIZE)
    walk(sb.data_sm.bitmap_root, INDEX_VALUE_SIZE)
    for entry in data_index(source, sb.data_sm):
        meta[entry.blocknr] += 1
    walk(sb.data_sm.ref_count_root, REFCOUNT_VALUE_SIZE)

    for root, expected in ((sb.metadata_sm, meta), (sb.data_sm, data)):
        index = metadata_index(source, root) if root is sb.metadata_sm else data_index(source, root)
        counts = read_counts(source, root, index, "test")
        want = np.zeros(root.nr_blocks, dtype=np.uint32)
        for blocknr, count in expected.items():
            want[blocknr] = count
        diff = np.flatnonzero(want != counts.counts)
        assert not len(diff), [(int(b), int(want[b]), int(counts.counts[b])) for b in diff[:10]]
        assert root.nr_allocated == int(np.count_nonzero(want))
        for i, entry in enumerate(index):
            chunk = want[i * ENTRIES_PER_BITMAP : (i + 1) * ENTRIES_PER_BITMAP]
            assert entry.nr_free == ENTRIES_PER_BITMAP - int(np.count_nonzero(chunk))
            free = np.flatnonzero(chunk == 0)
            if len(free):
                assert entry.none_free_before <= int(free[0])
        assert set(counts.overflow) == {b for b, c in expected.items() if c > 2}

    for view in views:
        occupancy(view.device_details_root, DETAILS_VALUE_SIZE)
        occupancy(view.data_mapping_root, MAPPING_VALUE_SIZE)
    reader = ThinMetadata(source)
    for dev, (details, root) in reader.devices().items():
        assert details.mapped_blocks == sum(occupancy(root, MAPPING_VALUE_SIZE)), dev


def tree_height(image: bytes, root: int) -> int:
    source = MemoryBlocks(image)
    height = 1
    node = read_node(source, root, MAPPING_VALUE_SIZE, "test")
    while not node.is_leaf:
        height += 1
        node = read_node(source, node.child_list()[0], MAPPING_VALUE_SIZE, "test")
    return height


def device_root(image: bytes, dev: int) -> int:
    return ThinMetadata(MemoryBlocks(image)).mapping_roots()[dev]


def write_block(pool: PoolMetadata, model: Model, dev: int, vblock: int) -> int:
    """A data write as dm-thin provisions it (section 5.3): a new block when unmapped or
    shared (snapshotted after the mapping's time), otherwise in place."""
    found = pool.lookup(dev, vblock)
    if found is None or pool.device_details(dev).snapshotted_time > found[1]:
        block = pool.alloc_data_block()
        pool.insert_mapping(dev, vblock, block)
        model[dev][vblock] = block
        return block
    return found[0]
