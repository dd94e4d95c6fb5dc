"""Corrupted, truncated and hostile metadata: a CorruptMetadataError naming the block and the
structure (exit code 7, one line, no traceback), never anything else, never slow.

Three layers of evidence:

* targeted corruptions of real thin_restore images, one per way metadata can be wrong, each
  checked for the exact error class, block and structure, through the API and the CLI;
* random bit flips in the live blocks of real images (resealed in half of the trials so that
  the structure checks, not only the checksums, are exercised), seeded and reproducible;
* hypothesis-generated btree nodes placed as roots or children in a minimal valid image.
"""

from __future__ import annotations

import random
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import run_tool
from tests.support.xmlgen import Device, Pool, random_pool
from thinmgr.cli.app import run
from thinmgr.errors import CorruptMetadataError
from thinmgr.format.blocks import MemoryBlocks
from thinmgr.format.checksum import seal
from thinmgr.format.constants import (
    BITMAP_CSUM_XOR,
    BTREE_CSUM_XOR,
    INDEX_CSUM_XOR,
    SUPERBLOCK_CSUM_XOR,
    max_entries_for,
)
from thinmgr.format.dump import dump_human, dump_json, dump_xml
from thinmgr.format.metadata import ThinMetadata
from thinmgr.format.spacemap import data_index, metadata_index, read_counts
from thinmgr.format.superblock import Superblock

BLOCK = 4096
_HEADER = struct.Struct("<IIQIII")  # csum, flags, blocknr, nr_entries, max_entries, value_size
INTERNAL, LEAF = 1, 2
U64_MAX = (1 << 64) - 1


# --------------------------------------------------------------------------------------------
# Images and raw patching (struct only: the reader under test is not used to build faults)


@dataclass
class RawNode:
    flags: int
    nr: int
    max_entries: int
    value_size: int
    keys: list[int]
    values_at: int  # offset of the value array inside the block


class Image:
    """A metadata image that tests patch block by block, resealing with the right salt."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)

    def copy(self) -> Image:
        return Image(bytes(self.data))

    @property
    def nr_blocks(self) -> int:
        return len(self.data) // BLOCK

    def block(self, n: int) -> bytearray:
        return self.data[n * BLOCK : (n + 1) * BLOCK]

    def put(self, n: int, block: bytearray, salt: int | None) -> None:
        if salt is not None:
            seal(block, salt)
        self.data[n * BLOCK : (n + 1) * BLOCK] = block

    def patch(self, n: int, offset: int, fmt: str, value: int, salt: int | None) -> None:
        block = self.block(n)
        struct.pack_into(fmt, block, offset, value)
        self.put(n, block, salt)

    # superblock ------------------------------------------------------------------------
    def sb_u64(self, offset: int) -> int:
        return int(struct.unpack_from("<Q", self.data, offset)[0])

    @property
    def mapping_root(self) -> int:
        return self.sb_u64(320)

    @property
    def details_root(self) -> int:
        return self.sb_u64(328)

    def set_sb_u64(self, offset: int, value: int) -> None:
        self.patch(0, offset, "<Q", value, SUPERBLOCK_CSUM_XOR)

    # btree nodes -----------------------------------------------------------------------
    def node(self, n: int) -> RawNode:
        _, flags, _, nr, max_entries, vsize = _HEADER.unpack_from(self.data, n * BLOCK)
        keys = list(struct.unpack_from(f"<{nr}Q", self.data, n * BLOCK + 32))
        return RawNode(flags, nr, max_entries, vsize, keys, 32 + 8 * max_entries)

    def u64_values(self, n: int, stride: int = 8) -> list[int]:
        node = self.node(n)
        return [self.sb_u64(n * BLOCK + node.values_at + stride * i) for i in range(node.nr)]

    def set_header(self, n: int, field: str, value: int, *, reseal: bool = True) -> None:
        offset, fmt = {
            "csum": (0, "<I"),
            "flags": (4, "<I"),
            "blocknr": (8, "<Q"),
            "nr_entries": (16, "<I"),
            "max_entries": (20, "<I"),
            "value_size": (24, "<I"),
        }[field]
        self.patch(n, offset, fmt, value, BTREE_CSUM_XOR if reseal else None)

    def set_key(self, n: int, i: int, key: int) -> None:
        self.patch(n, 32 + 8 * i, "<Q", key, BTREE_CSUM_XOR)

    def set_child(self, n: int, i: int, child: int) -> None:
        self.patch(n, self.node(n).values_at + 8 * i, "<Q", child, BTREE_CSUM_XOR)

    def write_node(
        self,
        n: int,
        flags: int,
        keys: list[int],
        values: list[int],
        *,
        value_size: int = 8,
        max_entries: int | None = None,
    ) -> None:
        """A fresh sealed node (values are u64s, zero padded to value_size)."""
        max_entries = max_entries or ((4096 - 32) // (8 + value_size)) // 3 * 3
        block = bytearray(BLOCK)
        _HEADER.pack_into(block, 0, 0, flags, n, len(keys), max_entries, value_size)
        for i, key in enumerate(keys):
            struct.pack_into("<Q", block, 32 + 8 * i, key)
        for i, value in enumerate(values):
            struct.pack_into("<Q", block, 32 + 8 * max_entries + value_size * i, value)
        self.put(n, block, BTREE_CSUM_XOR)

    def free_block(self, k: int = 0) -> int:
        """A block no tree uses: thin_restore allocates from the start of the device."""
        return self.nr_blocks - 1 - k

    # the thin trees (in the small images the top level and details root are leaves) ----
    def subtree_root(self, dev_index: int) -> int:
        return self.u64_values(self.mapping_root)[dev_index]

    def dev_id(self, dev_index: int) -> int:
        return self.node(self.mapping_root).keys[dev_index]

    def first_leaf(self, root: int) -> int:
        while self.node(root).flags == INTERNAL:
            root = self.u64_values(root)[0]
        return root

    def live_blocks(self) -> list[tuple[int, int]]:
        """(block, checksum salt) of every block reachable from the superblock."""
        live: dict[int, int] = {0: SUPERBLOCK_CSUM_XOR}

        def tree(root: int, on_leaf: Callable[[int], None]) -> None:
            if root in live:
                return
            live[root] = BTREE_CSUM_XOR
            if self.node(root).flags == INTERNAL:
                for child in self.u64_values(root):
                    tree(child, on_leaf)
            else:
                on_leaf(root)

        nr_meta, _, meta_index, meta_refs = struct.unpack_from("<4Q", self.data, 192)
        live[meta_index] = INDEX_CSUM_XOR
        for k in range(-(-nr_meta // 16320)):
            live[self.sb_u64(meta_index * BLOCK + 16 + 16 * k)] = BITMAP_CSUM_XOR
        tree(meta_refs, lambda _n: None)
        _, _, data_index_root, data_refs = struct.unpack_from("<4Q", self.data, 64)

        def bitmaps(leaf: int) -> None:
            for bitmap in self.u64_values(leaf, stride=16):
                live[bitmap] = BITMAP_CSUM_XOR

        tree(data_index_root, bitmaps)
        tree(data_refs, lambda _n: None)
        tree(self.details_root, lambda _n: None)

        def top_leaf(leaf: int) -> None:
            for sub_root in self.u64_values(leaf):
                tree(sub_root, lambda _n: None)

        tree(self.mapping_root, top_leaf)
        held = self.sb_u64(56)
        if held:
            # The snapshot shares the live trees here; its own block is live too.
            live[held] = SUPERBLOCK_CSUM_XOR
        return sorted(live.items())


def restored(tmp: Path, name: str, pool: Pool, size: int = 2 << 20) -> Image:
    xml = tmp / f"{name}.xml"
    xml.write_text(pool.xml())
    out = tmp / f"{name}.bin"
    with open(out, "wb") as f:
        f.truncate(size)
    run_tool("thin_restore", "-i", xml, "-o", out)
    return Image(out.read_bytes())


@dataclass
class Images:
    small: Image  # 3 devices, leaves only
    deep: Image  # 2 devices whose subtrees have internal roots
    many: Image  # 300 devices: details and top-level trees with internal roots
    shared: Image  # 6 devices sharing data: overflow ref-count tree, 2 data bitmaps
    held: Image  # deep, plus a held metadata snapshot (section 7.1) in its last block
    tmp: Path


def with_held_snapshot(img: Image) -> Image:
    """The superblock copy reserve_metadata_snap writes, held by the live superblock."""
    held = img.copy()
    spot = held.free_block()
    copy = Superblock.unpack(held.block(0)).snapshot_copy(spot).pack()
    held.put(spot, copy, None)
    held.set_sb_u64(56, spot)
    return held


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    tmp = tmp_path_factory.mktemp("fuzz")
    runs = [(0, 0, 300, 0), (1000, 20000, 200, 1)]
    shared = Pool(
        devices=[Device(d, runs=list(runs)) for d in range(6)], nr_data_blocks=20400, time=1
    )
    deep = restored(tmp, "deep", random_pool(22, 2, 2500))
    return Images(
        small=restored(tmp, "small", random_pool(21, 3, 60)),
        deep=deep,
        many=restored(tmp, "many", random_pool(23, 300, 2)),
        shared=restored(tmp, "shared", shared),
        held=with_held_snapshot(deep),
        tmp=tmp,
    )


# --------------------------------------------------------------------------------------------
# Running the reader and the CLI


def read_everything(data: bytes | bytearray, *, snap: bool = False) -> None:
    """What `metadata dump` does (all three formats), then the space maps' counts."""
    source = MemoryBlocks(bytes(data))
    md = ThinMetadata(source, snap=snap)
    for emit in (dump_xml, dump_json, dump_human):
        for _ in emit(md):
            pass
    if snap:
        return
    sb = md.superblock
    read_counts(source, sb.metadata_sm, metadata_index(source, sb.metadata_sm), "metadata sm")
    read_counts(source, sb.data_sm, data_index(source, sb.data_sm), "data sm")


def dump_only(data: bytes | bytearray, *, snap: bool = False) -> None:
    md = ThinMetadata(MemoryBlocks(bytes(data)), snap=snap)
    for _ in dump_xml(md):
        pass


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = run([str(a) for a in args])
    except SystemExit as done:
        code = int(done.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_cli_corrupt(
    capsys: pytest.CaptureFixture[str], path: Path, *must: str, args: tuple[str, ...] = ()
) -> str:
    code, _, err = cli(capsys, "metadata", "dump", *args, path)
    assert code == 7, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert lines[0].startswith("thinmgr: error: ")
    assert len(lines) <= 2 and all(line.startswith("hint: ") for line in lines[1:]), err
    for text in must:
        assert text in lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------
# Targeted corruptions


@dataclass
class Fault:
    image: Image
    block: int | None
    structure: str  # a substring of the error's structure
    reason: str  # a substring of the error's message
    args: tuple[str, ...] = ()


def _flip(img: Image, n: int, offset: int) -> None:
    img.data[n * BLOCK + offset] ^= 0x10


def bad_csum_superblock(im: Images) -> Fault:
    img = im.small.copy()
    _flip(img, 0, 48)
    return Fault(img, 0, "superblock", "bad checksum")


def bad_csum_details_leaf(im: Images) -> Fault:
    img = im.small.copy()
    _flip(img, img.details_root, 40)
    return Fault(img, img.details_root, "device details tree", "bad checksum")


def bad_csum_mapping_leaf(im: Images) -> Fault:
    img = im.small.copy()
    leaf = img.subtree_root(1)
    _flip(img, leaf, 2100)
    return Fault(img, leaf, f"mapping tree of device {img.dev_id(1)}", "bad checksum")


def bad_csum_internal_node(im: Images) -> Fault:
    img = im.deep.copy()
    root = img.subtree_root(0)
    assert img.node(root).flags == INTERNAL
    _flip(img, root, 40)
    return Fault(img, root, f"mapping tree of device {img.dev_id(0)}", "bad checksum")


def bad_csum_top_level_internal(im: Images) -> Fault:
    img = im.many.copy()
    root = img.mapping_root
    assert img.node(root).flags == INTERNAL
    _flip(img, root, 2048)
    return Fault(img, root, "mapping tree (top level)", "bad checksum")


def wrong_blocknr(im: Images) -> Fault:
    img = im.small.copy()
    img.set_header(img.details_root, "blocknr", img.details_root + 1)
    return Fault(img, img.details_root, "device details tree", "bad block nr")


def wrong_blocknr_superblock(im: Images) -> Fault:
    img = im.small.copy()
    img.set_sb_u64(8, 1)
    return Fault(img, 0, "superblock", "block number field says 1")


def flags(value: int) -> Callable[[Images], Fault]:
    def make(im: Images) -> Fault:
        img = im.small.copy()
        leaf = img.subtree_root(0)
        img.set_header(leaf, "flags", value)
        return Fault(img, leaf, "mapping tree of device", f"flags {value:#x}")

    return make


def wrong_value_size(im: Images) -> Fault:
    img = im.small.copy()
    img.set_header(img.details_root, "value_size", 8)
    return Fault(img, img.details_root, "device details tree", "value size 8, expected 24")


def wrong_internal_value_size(im: Images) -> Fault:
    img = im.deep.copy()
    root = img.subtree_root(1)
    img.set_header(root, "value_size", 16)
    return Fault(img, root, "mapping tree of device", "internal node value size 16")


def max_entries(value: int) -> Callable[[Images], Fault]:
    def make(im: Images) -> Fault:
        img = im.small.copy()
        leaf = img.subtree_root(2)
        img.set_header(leaf, "max_entries", value)
        return Fault(img, leaf, "mapping tree of device", f"max_entries {value} is impossible")

    return make


def nr_entries_huge(im: Images) -> Fault:
    img = im.small.copy()
    img.set_header(img.mapping_root, "nr_entries", 2**32 - 1)
    return Fault(
        img,
        img.mapping_root,
        "mapping tree (top level)",
        "nr_entries 4294967295 exceeds max_entries 252",
    )


def child_beyond_device(value: int) -> Callable[[Images], Fault]:
    def make(im: Images) -> Fault:
        img = im.deep.copy()
        root = img.subtree_root(0)
        target = img.nr_blocks + value
        img.set_child(root, 1, target)
        return Fault(img, target, "mapping tree of device", "outside the metadata device")

    return make


def subtree_root_beyond_device(im: Images) -> Fault:
    img = im.small.copy()
    img.set_child(img.mapping_root, 1, U64_MAX)
    return Fault(
        img, U64_MAX, f"mapping tree of device {img.dev_id(1)}", "outside the metadata device"
    )


def details_root_beyond_device(im: Images) -> Fault:
    img = im.small.copy()
    img.set_sb_u64(328, 10**12)
    return Fault(img, 10**12, "device details tree", "outside the metadata device")


def child_is_itself(im: Images) -> Fault:
    img = im.deep.copy()
    root = img.subtree_root(0)
    img.set_child(root, 1, root)
    return Fault(img, root, "mapping tree of device", "its own child (cycle)")


def child_is_ancestor(im: Images) -> Fault:
    # root -> [leaf0, X, ...] where the new internal node X points back at root.
    img = im.deep.copy()
    root = img.subtree_root(0)
    x = img.free_block()
    img.write_node(x, INTERNAL, [img.node(root).keys[1]], [root])
    img.set_child(root, 1, x)
    return Fault(img, root, "mapping tree of device", f"node {x} points back to its ancestor")


def same_child_twice(im: Images) -> Fault:
    img = im.deep.copy()
    root = img.subtree_root(0)
    first = img.u64_values(root)[0]
    img.set_child(root, 1, first)
    return Fault(img, first, "mapping tree of device", "cross-link")


def cross_link_between_subtrees_of_details(im: Images) -> Fault:
    img = im.many.copy()
    root = img.details_root
    children = img.u64_values(root)
    img.set_child(root, len(children) - 1, children[0])
    return Fault(img, children[0], "device details tree", "cross-link")


def fan_out_bomb(im: Images) -> Fault:
    """252 children all naming one node, 4 levels deep: 252^4 leaves if walked naively."""
    img = im.small.copy()
    leaf, a, b, c, root = (img.free_block(k) for k in range(5))
    img.write_node(leaf, LEAF, [0, 1, 2], [1 << 24, 2 << 24, 3 << 24])
    keys = list(range(252))
    img.write_node(a, INTERNAL, keys, [leaf] * 252)
    img.write_node(b, INTERNAL, keys, [a] * 252)
    img.write_node(c, INTERNAL, keys, [b] * 252)
    img.write_node(root, INTERNAL, keys, [c] * 252)
    img.set_child(img.mapping_root, 0, root)
    return Fault(img, leaf, f"mapping tree of device {img.dev_id(0)}", "cross-link")


def keys_unsorted(im: Images) -> Fault:
    img = im.small.copy()
    leaf = img.subtree_root(1)
    keys = img.node(leaf).keys
    img.set_key(leaf, 3, keys[4])
    img.set_key(leaf, 4, keys[3])
    return Fault(img, leaf, "mapping tree of device", "keys are not strictly increasing")


def keys_duplicate_in_details(im: Images) -> Fault:
    img = im.small.copy()
    leaf = img.details_root
    img.set_key(leaf, 1, img.node(leaf).keys[0])
    return Fault(img, leaf, "device details tree", "keys are not strictly increasing")


def child_key_below_parent(im: Images) -> Fault:
    img = im.deep.copy()
    root = img.subtree_root(0)
    child = img.u64_values(root)[1]
    img.set_key(root, 1, img.node(child).keys[0] + 1)
    return Fault(img, child, "mapping tree of device", "below its parent's key")


def leaf_at_wrong_depth(im: Images) -> Fault:
    # The last child of an internal root becomes an internal node X over a new leaf.
    img = im.deep.copy()
    root = img.subtree_root(0)
    node = img.node(root)
    last_key = node.keys[-1]
    x, leaf = img.free_block(0), img.free_block(1)
    img.write_node(leaf, LEAF, [last_key, last_key + 1], [5 << 24, 6 << 24])
    img.write_node(x, INTERNAL, [last_key], [leaf])
    img.set_child(root, node.nr - 1, x)
    return Fault(img, leaf, "mapping tree of device", "leaf at depth 2, other leaves at 1")


def details_missing_device(im: Images) -> Fault:
    img = im.small.copy()
    leaf = img.details_root
    img.set_header(leaf, "nr_entries", img.node(leaf).nr - 1)
    dev = img.dev_id(2)
    return Fault(
        img,
        img.mapping_root,
        "mapping tree",
        f"mappings present for device {dev}, but it isn't present in the device details tree",
    )


def mapping_missing_device(im: Images) -> Fault:
    img = im.small.copy()
    dev = img.dev_id(2)
    img.set_header(img.mapping_root, "nr_entries", 2)
    return Fault(
        img,
        img.details_root,
        "device details tree",
        f"device {dev} has details but no mapping tree",
    )


def details_and_mapping_differ(im: Images) -> Fault:
    img = im.small.copy()
    leaf = img.details_root
    dev = img.node(leaf).keys[2]
    img.set_key(leaf, 2, dev + 1)
    return Fault(img, img.mapping_root, "mapping tree", f"present for device {dev},")


def zero_superblock(im: Images) -> Fault:
    img = im.small.copy()
    img.put(0, bytearray(BLOCK), None)
    return Fault(img, 0, "superblock", "all zeroes")


def bad_magic(im: Images) -> Fault:
    img = im.small.copy()
    img.set_sb_u64(32, 12345)
    return Fault(img, 0, "superblock", "bad magic 12345")


def incompat_flags(im: Images) -> Fault:
    img = im.small.copy()
    img.patch(0, 360, "<I", 4, SUPERBLOCK_CSUM_XOR)
    return Fault(img, 0, "superblock", "unsupported feature flags")


def held_root_beyond_device(im: Images) -> Fault:
    img = im.small.copy()
    img.set_sb_u64(56, img.nr_blocks + 3)
    return Fault(
        img, img.nr_blocks + 3, "metadata snapshot", "outside the metadata device", ("-m",)
    )


def held_root_not_superblock(im: Images) -> Fault:
    img = im.small.copy()
    img.set_sb_u64(56, img.details_root)
    return Fault(img, img.details_root, "metadata snapshot superblock", "bad checksum", ("-m",))


def held_root_stale_copy(im: Images) -> Fault:
    # A valid superblock checksum, but written for another location.
    img = im.small.copy()
    spot = img.free_block()
    img.put(spot, img.block(0), None)
    img.set_sb_u64(56, spot)
    return Fault(img, spot, "metadata snapshot superblock", "block number field says 0", ("-m",))


FAULTS: dict[str, Callable[[Images], Fault]] = {
    "csum-superblock": bad_csum_superblock,
    "csum-details-leaf": bad_csum_details_leaf,
    "csum-mapping-leaf": bad_csum_mapping_leaf,
    "csum-internal-node": bad_csum_internal_node,
    "csum-top-level-internal": bad_csum_top_level_internal,
    "blocknr-node": wrong_blocknr,
    "blocknr-superblock": wrong_blocknr_superblock,
    "flags-0": flags(0),
    "flags-3": flags(3),
    "flags-high": flags(0x80000002),
    "value-size-leaf": wrong_value_size,
    "value-size-internal": wrong_internal_value_size,
    "max-entries-251": max_entries(251),
    "max-entries-255": max_entries(255),
    "max-entries-0": max_entries(0),
    "max-entries-huge": max_entries(2**32 - 3),
    "nr-entries-huge": nr_entries_huge,
    "child-beyond-device": child_beyond_device(0),
    "child-far-beyond-device": child_beyond_device(2**63),
    "subtree-root-u64-max": subtree_root_beyond_device,
    "details-root-beyond": details_root_beyond_device,
    "child-is-itself": child_is_itself,
    "child-is-ancestor": child_is_ancestor,
    "same-child-twice": same_child_twice,
    "cross-link-details": cross_link_between_subtrees_of_details,
    "fan-out-bomb": fan_out_bomb,
    "keys-unsorted": keys_unsorted,
    "keys-duplicate": keys_duplicate_in_details,
    "child-key-below-parent": child_key_below_parent,
    "leaf-wrong-depth": leaf_at_wrong_depth,
    "details-missing-device": details_missing_device,
    "mapping-missing-device": mapping_missing_device,
    "trees-name-different-devices": details_and_mapping_differ,
    "superblock-zeroes": zero_superblock,
    "bad-magic": bad_magic,
    "incompat-flags": incompat_flags,
    "held-root-beyond": held_root_beyond_device,
    "held-root-not-superblock": held_root_not_superblock,
    "held-root-stale-copy": held_root_stale_copy,
}


@pytest.mark.parametrize("name", FAULTS)
def test_targeted_corruption(
    name: str, images: Images, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fault = FAULTS[name](images)
    started = time.perf_counter()
    with pytest.raises(CorruptMetadataError) as caught:
        dump_only(fault.image.data, snap="-m" in fault.args)
    assert time.perf_counter() - started < 1.0
    error = caught.value
    assert type(error) is CorruptMetadataError
    assert error.block == fault.block
    assert error.structure is not None and fault.structure in error.structure
    assert fault.reason in error.message
    assert f"block {fault.block}" in error.message and error.structure in error.message

    path = tmp_path / "meta.bin"
    path.write_bytes(fault.image.data)
    line = assert_cli_corrupt(capsys, path, f"block {fault.block}", fault.reason, args=fault.args)
    assert error.structure in line


def test_cli_subprocess_reports_one_line(images: Images, tmp_path: Path) -> None:
    path = tmp_path / "meta.bin"
    path.write_bytes(fan_out_bomb(images).image.data)
    proc = subprocess.run(
        [sys.executable, "-m", "thinmgr", "metadata", "dump", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 7
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[0].startswith("thinmgr: error: mapping tree of device ")


@pytest.mark.parametrize("size", [0, 100, 4095])
def test_too_small_file(size: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "meta.bin"
    path.write_bytes(b"\x01" * size)
    assert_cli_corrupt(capsys, path, "superblock, block 0", "too small")
    with pytest.raises(CorruptMetadataError, match="too small") as caught:
        dump_only(b"\x01" * size)
    assert caught.value.block == 0


def test_no_partial_output_file(
    images: Images, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The fault sits in the last device, after the first devices' XML has been produced.
    img = images.small.copy()
    leaf = img.subtree_root(2)
    _flip(img, leaf, 40)
    meta = tmp_path / "meta.bin"
    meta.write_bytes(img.data)
    out = tmp_path / "out" / "dump.xml"
    out.parent.mkdir()
    code, _, err = cli(capsys, "metadata", "dump", "-o", out, meta)
    assert code == 7, err
    assert f"block {leaf}" in err
    assert list(out.parent.iterdir()) == []


def test_xml_given_as_source(
    images: Images, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    meta = tmp_path / "meta.bin"
    meta.write_bytes(images.many.data)
    xml = tmp_path / "dump.xml"
    xml.write_text(run_tool("thin_dump", meta).stdout)
    assert xml.stat().st_size > BLOCK
    line = assert_cli_corrupt(capsys, xml, "superblock, block 0", "looks like XML")
    assert "bad checksum" in line
    _, _, err = cli(capsys, "metadata", "dump", xml)
    assert "metadata restore" in err  # the hint says what to do instead


def test_superblock_zeroes_with_tail_of_valid_blocks(images: Images) -> None:
    img = images.small.copy()
    img.put(0, bytearray(BLOCK), None)
    with pytest.raises(CorruptMetadataError, match="all zeroes") as caught:
        dump_only(img.data)
    assert caught.value.block == 0


HUGE_NR_BLOCKS = [2**63, 2**64 - 1, 16320 * 4096 + 1]


@pytest.mark.parametrize("nr_blocks", HUGE_NR_BLOCKS)
@pytest.mark.parametrize(
    ("offset", "reader", "structure"),
    [
        (64, data_index, "data space map index"),
        (192, metadata_index, "metadata space map index"),
    ],
)
def test_hostile_space_map_size_is_bounded(
    images: Images, nr_blocks: int, offset: int, reader: Callable[..., object], structure: str
) -> None:
    img = images.shared.copy()
    img.set_sb_u64(offset, nr_blocks)
    source = MemoryBlocks(bytes(img.data))
    md = ThinMetadata(source)
    if offset == 64:
        # The dump only prints nr_data_blocks (as thin_dump does).
        assert f'nr_data_blocks="{nr_blocks}"' in "".join(dump_xml(md))
    root = md.superblock.data_sm if offset == 64 else md.superblock.metadata_sm
    tracemalloc.start()
    try:
        with pytest.raises(CorruptMetadataError) as caught:
            reader(source, root)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
    assert caught.value.structure == structure
    assert caught.value.block == root.bitmap_root
    assert "bitmaps" in caught.value.reason


def test_read_counts_refuses_an_index_that_does_not_fit(images: Images) -> None:
    img = images.shared.copy()
    source = MemoryBlocks(bytes(img.data))
    sb = ThinMetadata(source).superblock
    index = data_index(source, sb.data_sm)
    assert len(index) == 2
    with pytest.raises(CorruptMetadataError, match="index entries"):
        read_counts(source, sb.data_sm, index[:1], "data space map")
    img.set_sb_u64(64, 2**63)
    hostile = ThinMetadata(MemoryBlocks(bytes(img.data))).superblock.data_sm
    with pytest.raises(CorruptMetadataError, match="bitmaps"):
        read_counts(source, hostile, index, "data space map")


def test_bitmap_and_index_corruption(images: Images) -> None:
    img = images.shared.copy()
    sb_bitmap_root = img.sb_u64(192 + 16)
    first_bitmap = img.sb_u64(sb_bitmap_root * BLOCK + 16)
    _flip(img, first_bitmap, 100)
    source = MemoryBlocks(bytes(img.data))
    root = ThinMetadata(source).superblock.metadata_sm
    index = metadata_index(source, root)
    with pytest.raises(CorruptMetadataError) as caught:
        read_counts(source, root, index, "metadata space map")
    assert caught.value.block == first_bitmap
    assert caught.value.structure == "metadata space map bitmap 0"
    img = images.shared.copy()
    _flip(img, sb_bitmap_root, 20)
    with pytest.raises(CorruptMetadataError) as caught:
        metadata_index(MemoryBlocks(bytes(img.data)), root)
    assert caught.value.block == sb_bitmap_root


# --------------------------------------------------------------------------------------------
# Random bit flips in live blocks


def _flip_random_bits(rng: random.Random, block: bytearray) -> None:
    for _ in range(rng.randint(1, 8)):
        # Most bytes of a block are unused slots; aim half of the flips at the headers and
        # first entries, where a flip changes what the reader sees.
        byte = rng.randrange(0, 80) if rng.random() < 0.5 else rng.randrange(0, BLOCK)
        block[byte] ^= 1 << rng.randrange(8)


def _trial(img: Image, live: list[tuple[int, int]], rng: random.Random) -> tuple[str, float]:
    mutant = img.copy()
    blocknr, salt = rng.choice(live)
    block = mutant.block(blocknr)
    _flip_random_bits(rng, block)
    reseal = rng.random() < 0.5
    mutant.put(blocknr, block, salt if reseal else None)
    started = time.perf_counter()
    try:
        if mutant.sb_u64(56):
            dump_only(mutant.data, snap=True)
        read_everything(mutant.data)
        outcome = "ok"
    except CorruptMetadataError as error:
        assert error.block is not None or error.structure is not None
        outcome = "corrupt"
    return outcome, time.perf_counter() - started


@pytest.mark.parametrize(
    ("which", "seed", "trials"),
    [
        ("small", 1, 300),
        ("deep", 2, 300),
        ("many", 3, 250),
        ("shared", 4, 250),
        ("held", 5, 200),
    ],
)
def test_random_bit_flips(images: Images, which: str, seed: int, trials: int) -> None:
    img: Image = getattr(images, which)
    read_everything(img.data)  # the unflipped image is fine
    live = img.live_blocks()
    assert len(live) > 6
    rng = random.Random(seed)
    outcomes: dict[str, int] = {"ok": 0, "corrupt": 0}
    for trial in range(trials):
        state = rng.getstate()
        try:
            outcome, took = _trial(img, live, rng)
        except CorruptMetadataError:
            raise
        except BaseException as error:  # anything else is a reader bug: say how to replay it
            rng.setstate(state)
            raise AssertionError(
                f"{which} trial {trial} (seed {seed}): {type(error).__name__}: {error}"
            ) from error
        assert took < 2.0, f"{which} trial {trial} (seed {seed}) took {took:.2f} s"
        outcomes[outcome] += 1
    # Both outcomes occur: the flips reach the structure checks, not only checksums.
    assert outcomes["corrupt"] > trials // 4
    assert outcomes["ok"] > 0


# --------------------------------------------------------------------------------------------
# Hypothesis-generated nodes


@pytest.fixture(scope="module")
def base(images: Images) -> Image:
    return images.small


U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, U64_MAX)


PLACES = ["details_root", "mapping_root", "subtree_root", "child"]
_LEAF_VALUE_SIZE = {"details_root": 24, "mapping_root": 8, "subtree_root": 8, "child": 8}


@st.composite
def node_specs(draw: st.DrawFn) -> dict[str, Any]:
    """A node that is valid for its place most of the time, with one field broken at times.

    Fully random headers stop at the first header check; a mostly valid one reaches the
    key-order, depth, cycle and cross-tree checks and the values' use.
    """
    place = draw(st.sampled_from(PLACES))
    flags = draw(st.sampled_from([LEAF, LEAF, INTERNAL]))
    value_size = 8 if flags == INTERNAL else _LEAF_VALUE_SIZE[place]
    capacity = max_entries_for(value_size)
    keys = draw(st.lists(st.integers(0, 300) | U64, max_size=min(capacity, 40)))
    if draw(st.integers(0, 3)):
        keys = sorted(set(keys))
    n = len(keys)
    spec: dict[str, Any] = {
        "place": place,
        "flags": flags,
        "value_size": value_size,
        "max_entries": capacity,
        "nr_entries": n,
        "blocknr_ok": True,
        "keys": keys,
        # Child pointers and values: live blocks (roots, leaves, the superblock), the node
        # itself, its generated parent, or anything at all.
        "values": draw(
            st.lists(
                st.sampled_from(["self", "parent", "leaf0", "leaf1"]) | st.integers(0, 40) | U64,
                min_size=n,
                max_size=n,
            )
        ),
    }
    broken = draw(
        st.sampled_from(
            [None, None, None, "flags", "value_size", "max_entries", "nr_entries", "blocknr_ok"]
        )
    )
    if broken == "flags":
        spec["flags"] = draw(st.sampled_from([0, 3]) | U32)
    elif broken == "value_size":
        spec["value_size"] = draw(st.sampled_from([4, 8, 16, 24]) | U32)
    elif broken == "max_entries":
        spec["max_entries"] = draw(st.sampled_from([252, 126, 168, 336, 3, 251, 255, 0]) | U32)
    elif broken == "nr_entries":
        spec["nr_entries"] = draw(st.sampled_from([n + 1, capacity, capacity + 1]) | U32)
    elif broken == "blocknr_ok":
        spec["blocknr_ok"] = False
    return spec


def build_hostile(base: Image, spec: dict[str, Any]) -> Image:
    img = base.copy()
    target, parent = img.free_block(0), img.free_block(1)
    keys: list[int] = spec["keys"]
    max_entries: int = spec["max_entries"]
    value_size: int = spec["value_size"]
    block = bytearray(BLOCK)
    _HEADER.pack_into(
        block,
        0,
        0,
        spec["flags"],
        target if spec["blocknr_ok"] else target + 1,
        spec["nr_entries"],
        max_entries,
        value_size,
    )
    for i, key in enumerate(keys):
        struct.pack_into("<Q", block, 32 + 8 * i, key)
    resolved = {
        "self": target,
        "parent": parent,
        "leaf0": img.subtree_root(0),
        "leaf1": img.subtree_root(1),
    }
    for i, value in enumerate(spec["values"]):
        at = 32 + 8 * max_entries + max(value_size, 8) * i
        if at + 8 <= BLOCK:
            struct.pack_into("<Q", block, at, resolved.get(value, value))
    img.put(target, block, BTREE_CSUM_XOR)
    place = spec["place"]
    if place == "details_root":
        img.set_sb_u64(328, target)
    elif place == "mapping_root":
        img.set_sb_u64(320, target)
    elif place == "subtree_root":
        img.set_child(img.mapping_root, 0, target)
    else:
        # A new internal root for device 0: [its real leaf, the generated node].
        leaf = img.subtree_root(0)
        first = img.node(leaf).keys[0]
        second = max(first + 1, keys[0] if keys else 0)
        img.write_node(parent, INTERNAL, [first, min(second, U64_MAX)], [leaf, target])
        img.set_child(img.mapping_root, 0, parent)
    return img


@settings(
    max_examples=400,
    deadline=2000,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=node_specs())
def test_generated_nodes(base: Image, spec: dict[str, object]) -> None:
    img = build_hostile(base, spec)
    source = MemoryBlocks(bytes(img.data))
    try:
        md = ThinMetadata(source)
        devices = md.devices()
        assert all(dev >= 0 for dev in devices)
    except CorruptMetadataError:
        pass
    try:
        read_everything(img.data)
    except CorruptMetadataError as error:
        assert error.block is not None
