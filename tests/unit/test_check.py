"""`thinmgr metadata check` against thin_check 0.9.0 (format section 11).

Clean metadata made by thin_restore (and by our restore, for held metadata snapshots) must
pass both tools. Each corruption is made by patching one block of a real image and, where
the corruption is meant to get past the checksum, re-sealing it; the test then asserts our
verdict, that the problem names the right block and structure, and thin_check's verdict
wherever 0.9.0 detects the fault (and that it misses what the format document says it
misses).
"""

from __future__ import annotations

import json
import random
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import RestoreFn, run_tool
from tests.support.xmlgen import Device, Pool, random_pool
from thinmgr.cli.app import run
from thinmgr.format.blocks import MemoryBlocks
from thinmgr.format.btree import TreeWalk, read_node
from thinmgr.format.check import CheckOptions, CheckReport, Problem, Severity, check_metadata
from thinmgr.format.checksum import seal
from thinmgr.format.constants import (
    BITMAP_CSUM_XOR,
    BLOCK_SIZE,
    BTREE_CSUM_XOR,
    SUPERBLOCK_CSUM_XOR,
)
from thinmgr.format.metadata import ThinMetadata
from thinmgr.format.restore import restore_to_image
from thinmgr.format.spacemap import data_index, metadata_index
from thinmgr.format.superblock import Superblock

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
NODE_NR_ENTRIES = 16
NODE_MAX_ENTRIES = 20
NODE_VALUE_SIZE = 24
NODE_KEYS = 32

# --------------------------------------------------------------------------------------------
# Helpers: run both tools, locate structures, patch blocks


def ours(path: Path, *opts: str) -> CheckReport:
    from thinmgr.ops.check import check_file

    options = CheckOptions(
        super_block_only="--super-block-only" in opts,
        skip_mappings="--skip-mappings" in opts,
        metadata_snap="-m" in opts,
        ignore_non_fatal="--ignore-non-fatal-errors" in opts,
    )
    return check_file(str(path), options)


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = run(["metadata", "check", *(str(a) for a in args)])
    except SystemExit as done:  # click's standalone mode exits through SystemExit
        code = int(done.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def json_cli(
    capsys: pytest.CaptureFixture[str], *args: str | Path
) -> tuple[int, dict[str, object]]:
    capsys.readouterr()
    try:
        code = run(["--json", "metadata", "check", *(str(a) for a in args)])
    except SystemExit as done:
        code = int(done.code or 0)
    out, _ = capsys.readouterr()
    return code, json.loads(out)


def thin_check(path: Path, *opts: str) -> int:
    return run_tool("thin_check", *opts, path, check=False).returncode


def serious(report: CheckReport) -> list[Problem]:
    return [p for p in report.problems if p.severity != Severity.WARNING]


def assert_clean_both(path: Path) -> CheckReport:
    report = ours(path)
    assert serious(report) == [], [str(p) for p in report.problems]
    assert report.clean
    assert thin_check(path) == 0
    return report


def find(
    report: CheckReport, severity: Severity, *, block: int | None, structure: str, text: str
) -> Problem:
    """The problem naming this block and structure with this text; fails listing them all."""
    for p in report.problems:
        if (
            p.severity == severity
            and (block is None or p.block == block)
            and structure in p.structure
            and text in p.message
        ):
            return p
    raise AssertionError(
        f"no {severity.value} problem at block {block} in {structure!r} "
        f"with {text!r}; got:\n" + "\n".join(map(str, report.problems))
    )


def metadata(path: Path) -> ThinMetadata:
    return ThinMetadata(MemoryBlocks(path.read_bytes()))


def patch(
    path: Path, blocknr: int, edit: Callable[[bytearray], None], salt: int | None = None
) -> None:
    """Edit one block in place; re-seal its checksum with ``salt`` (None: leave it stale)."""
    image = bytearray(path.read_bytes())
    block = image[blocknr * BLOCK_SIZE : (blocknr + 1) * BLOCK_SIZE]
    edit(block)
    if salt is not None:
        seal(block, salt)
    image[blocknr * BLOCK_SIZE : (blocknr + 1) * BLOCK_SIZE] = block
    path.write_bytes(image)


def put_u32(offset: int, value: int) -> Callable[[bytearray], None]:
    return lambda b: _U32.pack_into(b, offset, value)


def put_u64(offset: int, value: int) -> Callable[[bytearray], None]:
    return lambda b: _U64.pack_into(b, offset, value)


def set_bitmap_count(index: int, value: int) -> Callable[[bytearray], None]:
    """Bitmap entry ``index``: the lower-numbered bit is the high bit (section 6.2)."""

    def edit(block: bytearray) -> None:
        byte, shift = 16 + index // 4, 2 * (index % 4)
        block[byte] &= ~(3 << shift) & 0xFF
        block[byte] |= ((value >> 1) << shift) | ((value & 1) << (shift + 1))

    return edit


def bitmap_count(path: Path, bitmap: int, index: int) -> int:
    raw = path.read_bytes()[bitmap * BLOCK_SIZE + 16 + index // 4]
    shift = 2 * (index % 4)
    return (((raw >> shift) & 1) << 1) | ((raw >> (shift + 1)) & 1)


def first_leaf(path: Path, root: int, value_size: int) -> int:
    md = metadata(path)
    return next(TreeWalk(md.source, root, value_size, "t").leaves()).blocknr


def superblock(path: Path) -> Superblock:
    return Superblock.unpack(path.read_bytes()[:BLOCK_SIZE])


def values_offset(max_entries: int) -> int:
    return NODE_KEYS + 8 * max_entries


SMALL = random_pool(11, 2, 300)


# --------------------------------------------------------------------------------------------
# Clean metadata passes both tools


@pytest.mark.parametrize(
    ("seed", "devices", "per_device", "share"),
    [
        (1, 1, 1, 0.5),
        (2, 3, 500, 0.5),
        (3, 5, 3000, 0.8),
        (4, 4, 400, 1.0),
        (5, 2, 6000, 0.0),
    ],
)
def test_generated_pools_pass_both(
    restore_xml: RestoreFn, seed: int, devices: int, per_device: int, share: float
) -> None:
    pool = random_pool(seed, devices, per_device, share=share)
    report = assert_clean_both(restore_xml(pool))
    assert report.summary.devices == devices
    assert report.summary.mappings == devices * per_device
    assert report.summary.transaction_id == pool.transaction


def test_empty_pool_and_empty_devices(restore_xml: RestoreFn) -> None:
    assert_clean_both(restore_xml(Pool(devices=[], nr_data_blocks=100)))
    pool = Pool(devices=[Device(0), Device(16777215)], nr_data_blocks=100)
    assert ours(restore_xml(pool)).summary.devices == 2


def test_deep_tree_passes(restore_xml: RestoreFn) -> None:
    path = restore_xml(random_pool(6, 1, 60_000))
    md = metadata(path)
    root = md.mapping_roots()[0]
    child = read_node(md.source, root, 8, "t").child_list()[0]
    assert not read_node(md.source, child, 8, "t").is_leaf  # three levels
    assert assert_clean_both(path).summary.mappings == 60_000


def test_overflow_counts_from_shared_data_blocks(restore_xml: RestoreFn) -> None:
    path = restore_xml(random_pool(7, 4, 300, share=1.0))
    sb = superblock(path)
    md = metadata(path)
    leaf = read_node(md.source, sb.data_sm.ref_count_root, 4, "t")
    assert leaf.nr_entries > 0 and int(leaf.values_u32().max()) >= 3
    assert_clean_both(path)


def test_needs_check_flag_is_a_warning_and_can_be_cleared(
    restore_xml: RestoreFn, capsys: pytest.CaptureFixture[str]
) -> None:
    pool = random_pool(8, 2, 100)
    pool.flags = 1
    path = restore_xml(pool)
    report = ours(path)
    find(report, Severity.WARNING, block=0, structure="superblock", text="NEEDS_CHECK")
    assert report.clean
    code, out, _ = cli(capsys, path, "--clear-needs-check-flag")
    assert code == 0 and "NEEDS_CHECK flag cleared" in out
    assert superblock(path).flags == 0
    assert thin_check(path) == 0
    assert 'flags="0"' in run_tool("thin_dump", path).stdout


# --------------------------------------------------------------------------------------------
# Corruptions of section 11.1's table and more


def test_bit_flip_in_details_node(restore_xml: RestoreFn) -> None:
    path = restore_xml(SMALL)
    root = superblock(path).device_details_root

    def flip(b: bytearray) -> None:
        b[100] ^= 0x10

    patch(path, root, flip)
    find(
        ours(path), Severity.FATAL, block=root, structure="device details tree", text="bad checksum"
    )
    assert thin_check(path) == 1


def test_unreadable_mapping_leaf_does_not_drown_in_data_count_noise(
    restore_xml: RestoreFn,
) -> None:
    path = restore_xml(random_pool(7, 4, 300, share=1.0))
    leaf = first_leaf(path, metadata(path).mapping_roots()[0], 8)

    def flip(b: bytearray) -> None:
        b[3000] ^= 1

    patch(path, leaf, flip)
    report = ours(path)
    find(
        report,
        Severity.FATAL,
        block=leaf,
        structure="mapping tree of device 0",
        text="bad checksum",
    )
    assert not [p for p in report.problems if "data reference counts" in p.message]
    find(
        report,
        Severity.WARNING,
        block=None,
        structure="data space map",
        text="higher counts than the readable mappings explain",
    )
    assert thin_check(path) == 1


def test_wrong_blocknr_with_fixed_checksum(restore_xml: RestoreFn) -> None:
    path = restore_xml(SMALL)
    leaf = first_leaf(path, metadata(path).mapping_roots()[0], 8)
    patch(path, leaf, put_u64(8, leaf + 1), BTREE_CSUM_XOR)
    find(
        ours(path),
        Severity.FATAL,
        block=leaf,
        structure="mapping tree of device 0",
        text="bad block nr",
    )
    assert thin_check(path) == 1


def test_metadata_count_leak_is_non_fatal(
    restore_xml: RestoreFn, capsys: pytest.CaptureFixture[str]
) -> None:
    path = restore_xml(SMALL)
    sb = superblock(path)
    bitmap = metadata_index(MemoryBlocks(path.read_bytes()), sb.metadata_sm)[0].blocknr
    free = sb.metadata_sm.nr_blocks - 1
    assert bitmap_count(path, bitmap, free) == 0
    patch(path, bitmap, set_bitmap_count(free, 1), BITMAP_CSUM_XOR)
    report = ours(path)
    find(
        report,
        Severity.NON_FATAL,
        block=free,
        structure="metadata space map",
        text="expected 0, but got 1",
    )
    assert report.fatal == 0 and not report.clean
    assert ours(path, "--ignore-non-fatal-errors").clean
    assert thin_check(path) == 1
    assert thin_check(path, "--ignore-non-fatal-errors") == 0
    assert cli(capsys, path)[0] == 1
    assert cli(capsys, path, "--ignore-non-fatal-errors")[0] == 0


def test_metadata_count_missing_is_fatal(restore_xml: RestoreFn) -> None:
    path = restore_xml(SMALL)
    sb = superblock(path)
    bitmap = metadata_index(MemoryBlocks(path.read_bytes()), sb.metadata_sm)[0].blocknr
    live = sb.device_details_root
    assert bitmap_count(path, bitmap, live) == 1
    patch(path, bitmap, set_bitmap_count(live, 0), BITMAP_CSUM_XOR)
    report = ours(path, "--ignore-non-fatal-errors")
    problem = find(
        report,
        Severity.FATAL,
        block=live,
        structure="metadata space map",
        text="expected 1, but got 0",
    )
    assert "device details tree" in problem.message
    assert not report.clean
    assert thin_check(path, "--ignore-non-fatal-errors") == 1


def test_wrong_mapped_blocks(restore_xml: RestoreFn) -> None:
    path = restore_xml(SMALL)
    leaf = superblock(path).device_details_root
    patch(path, leaf, put_u64(values_offset(126), 299), BTREE_CSUM_XOR)  # dev 0: 300 -> 299
    find(
        ours(path),
        Severity.FATAL,
        block=leaf,
        structure="device details tree",
        text="mapped_blocks is 299 but its mapping tree holds 300",
    )
    assert thin_check(path) == 0  # 0.9.0 does not compare it (section 11.1)


def test_mapping_beyond_data_device(restore_xml: RestoreFn) -> None:
    path = restore_xml(SMALL)
    nr_data = superblock(path).data_sm.nr_blocks
    leaf = first_leaf(path, metadata(path).mapping_roots()[0], 8)
    patch(path, leaf, put_u64(values_offset(252), (nr_data + 5) << 24), BTREE_CSUM_XOR)
    find(
        ours(path),
        Severity.FATAL,
        block=leaf,
        structure="mapping tree",
        text=f"data block {nr_data + 5}, beyond the data device",
    )
    assert thin_check(path) == 0  # 0.9.0 misses it


def test_mapping_time_later_than_superblock_is_a_warning(restore_xml: RestoreFn) -> None:
    path = restore_xml(SMALL)
    leaf = first_leaf(path, metadata(path).mapping_roots()[0], 8)
    raw = path.read_bytes()
    value = _U64.unpack_from(raw, leaf * BLOCK_SIZE + values_offset(252))[0]
    patch(path, leaf, put_u64(values_offset(252), (value & ~0xFFFFFF) | 1000), BTREE_CSUM_XOR)
    report = ours(path)
    find(report, Severity.WARNING, block=leaf, structure="mapping tree", text="mapping time 1000")
    assert report.clean


@pytest.mark.parametrize("new_count", [0, 2])
def test_data_count_changed(restore_xml: RestoreFn, new_count: int) -> None:
    path = restore_xml(random_pool(9, 1, 200))
    md = metadata(path)
    data_block = next(md.mappings(0, md.mapping_roots()[0]))[1]
    entry = data_index(md.source, md.superblock.data_sm)[0]
    assert bitmap_count(path, entry.blocknr, data_block) == 1
    patch(path, entry.blocknr, set_bitmap_count(data_block, new_count), BITMAP_CSUM_XOR)
    find(
        ours(path, "--ignore-non-fatal-errors"),
        Severity.FATAL,
        block=entry.blocknr,
        structure="data space map bitmap 0",
        text=f"data block {data_block}: expected 1, but got {new_count}",
    )
    assert thin_check(path) == 0  # 0.9.0 does not verify data counts (section 11.1)


def test_data_count_leak_is_non_fatal(restore_xml: RestoreFn) -> None:
    path = restore_xml(random_pool(9, 1, 200))
    sb = superblock(path)
    entry = data_index(MemoryBlocks(path.read_bytes()), sb.data_sm)[0]
    free = next(b for b in range(sb.data_sm.nr_blocks) if bitmap_count(path, entry.blocknr, b) == 0)
    patch(path, entry.blocknr, set_bitmap_count(free, 1), BITMAP_CSUM_XOR)
    report = ours(path)
    find(
        report,
        Severity.NON_FATAL,
        block=entry.blocknr,
        structure="data space map",
        text=f"data block {free}: expected 0, but got 1",
    )
    assert report.fatal == 0


def test_overflow_entry_removed(restore_xml: RestoreFn) -> None:
    path = restore_xml(random_pool(7, 4, 300, share=1.0))
    sb = superblock(path)
    root = sb.data_sm.ref_count_root
    node = read_node(MemoryBlocks(path.read_bytes()), root, 4, "t")
    assert node.is_leaf and node.nr_entries > 1
    removed = int(node.keys[0])
    keys, values = node.key_list()[1:], node.values_u32().tolist()[1:]

    def drop_first(b: bytearray) -> None:
        _U32.pack_into(b, NODE_NR_ENTRIES, len(keys))
        struct.pack_into(f"<{len(keys)}Q", b, NODE_KEYS, *keys)
        struct.pack_into(f"<{len(values)}I", b, values_offset(node.max_entries), *values)

    patch(path, root, drop_first, BTREE_CSUM_XOR)
    find(
        ours(path),
        Severity.FATAL,
        block=None,
        structure="data space map bitmap 0",
        text=f"block {removed} has bitmap count 3 but no entry in the ref-count tree",
    )


def deep_root(restore_xml: RestoreFn) -> tuple[Path, int]:
    path = restore_xml(random_pool(10, 1, 40_000))
    root = metadata(path).mapping_roots()[0]
    assert not read_node(MemoryBlocks(path.read_bytes()), root, 8, "t").is_leaf
    return path, root


def test_child_pointer_out_of_range(restore_xml: RestoreFn) -> None:
    path, root = deep_root(restore_xml)
    patch(path, root, put_u64(values_offset(252), 10**9), BTREE_CSUM_XOR)
    find(
        ours(path),
        Severity.FATAL,
        block=10**9,
        structure="mapping tree of device 0",
        text="outside the metadata device",
    )
    assert thin_check(path) == 1


def test_cycle_to_an_ancestor(restore_xml: RestoreFn) -> None:
    path, root = deep_root(restore_xml)
    patch(path, root, put_u64(values_offset(252) + 8, root), BTREE_CSUM_XOR)
    started = time.monotonic()
    report = ours(path)
    assert time.monotonic() - started < 10
    find(report, Severity.FATAL, block=root, structure="mapping tree of device 0", text="cycle")
    assert thin_check(path) == 1


@pytest.mark.parametrize(
    ("field", "value", "text"),
    [
        (NODE_NR_ENTRIES, 253, "nr_entries 253 exceeds max_entries 252"),
        (NODE_VALUE_SIZE, 16, "leaf value size 16, expected 8"),
        (NODE_MAX_ENTRIES, 250, "max_entries 250 is impossible"),
        (4, 0, "neither internal nor leaf"),
    ],
)
def test_bad_node_header(restore_xml: RestoreFn, field: int, value: int, text: str) -> None:
    path = restore_xml(SMALL)
    leaf = first_leaf(path, metadata(path).mapping_roots()[0], 8)
    patch(path, leaf, put_u32(field, value), BTREE_CSUM_XOR)
    find(ours(path), Severity.FATAL, block=leaf, structure="mapping tree of device 0", text=text)
    assert thin_check(path) == 1


def test_wrong_value_size_in_details(restore_xml: RestoreFn) -> None:
    path = restore_xml(SMALL)
    leaf = superblock(path).device_details_root
    patch(path, leaf, put_u32(NODE_VALUE_SIZE, 16), BTREE_CSUM_XOR)
    find(
        ours(path),
        Severity.FATAL,
        block=leaf,
        structure="device details tree",
        text="value size 16, expected 24",
    )
    assert thin_check(path) == 1


def test_unsorted_keys(restore_xml: RestoreFn) -> None:
    path = restore_xml(SMALL)
    leaf = first_leaf(path, metadata(path).mapping_roots()[0], 8)
    raw = path.read_bytes()
    k0, k1 = struct.unpack_from("<QQ", raw, leaf * BLOCK_SIZE + NODE_KEYS)
    patch(path, leaf, lambda b: struct.pack_into("<QQ", b, NODE_KEYS, k1, k0), BTREE_CSUM_XOR)
    find(
        ours(path),
        Severity.FATAL,
        block=leaf,
        structure="mapping tree of device 0",
        text="not strictly increasing",
    )
    assert thin_check(path) == 1


def test_device_missing_from_mapping_tree(restore_xml: RestoreFn) -> None:
    path = restore_xml(SMALL)  # devices 0 and 10
    top = superblock(path).data_mapping_root
    patch(path, top, put_u64(NODE_KEYS + 8, 11), BTREE_CSUM_XOR)  # dev 10 -> 11
    report = ours(path)
    find(report, Severity.FATAL, block=top, structure="mapping tree (top level)", text="device 11")
    find(
        report,
        Severity.FATAL,
        block=None,
        structure="device details tree",
        text="device 10 has details but no mapping tree",
    )
    # Observed: 0.9.0 does not notice (its "missing devices" comes from unreadable nodes).
    assert thin_check(path) == 0


def test_bad_magic_with_fixed_checksum(restore_xml: RestoreFn) -> None:
    path = restore_xml(SMALL)
    patch(path, 0, put_u64(32, 12345), SUPERBLOCK_CSUM_XOR)
    find(ours(path), Severity.FATAL, block=0, structure="superblock", text="bad magic 12345")
    assert thin_check(path) == 0  # the tools do not check the magic (section 2)


def test_feature_flags_and_block_size(restore_xml: RestoreFn) -> None:
    path = restore_xml(SMALL)
    patch(path, 0, put_u32(360, 1), SUPERBLOCK_CSUM_XOR)
    patch(path, 0, put_u32(336, 100), SUPERBLOCK_CSUM_XOR)
    report = ours(path)
    find(report, Severity.FATAL, block=0, structure="superblock", text="feature flags")
    find(report, Severity.FATAL, block=0, structure="superblock", text="data block size 100")


def test_truncated_file(restore_xml: RestoreFn, capsys: pytest.CaptureFixture[str]) -> None:
    path = restore_xml(random_pool(12, 2, 3000))
    with open(path, "r+b") as f:
        f.truncate(20 * BLOCK_SIZE)
    report = ours(path)
    find(
        report,
        Severity.FATAL,
        block=0,
        structure="superblock",
        text="manages 2048 blocks but the device holds 20",
    )
    find(report, Severity.FATAL, block=None, structure="", text="outside the metadata device")
    assert cli(capsys, path)[0] == 1
    assert thin_check(path) == 1


@pytest.mark.parametrize("content", ["zeros", "garbage", "tiny"])
def test_not_metadata_at_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    path = tmp_path / "meta.bin"
    data = {
        "zeros": bytes(1 << 20),
        "garbage": random.Random(1).randbytes(1 << 20),
        "tiny": b"\1" * 100,
    }[content]
    path.write_bytes(data)
    report = ours(path)
    assert report.fatal and report.problems[0].structure == "superblock"
    code, out, _ = cli(capsys, path)
    assert code == 1 and "superblock" in out
    assert thin_check(path) == 1


def test_xml_given_by_mistake(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dump.xml"
    path.write_text(SMALL.xml())
    code, out, _ = cli(capsys, path)
    assert code == 1
    assert (
        "this looks like XML; `thinmgr metadata restore` turns thin_dump XML into metadata" in out
    )
    assert thin_check(path) == 1


def test_missing_source_keeps_its_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, tmp_path / "absent")
    assert code == 3 and "no such file" in err


def test_super_block_only_and_skip_mappings(restore_xml: RestoreFn) -> None:
    path = restore_xml(SMALL)
    leaf = first_leaf(path, metadata(path).mapping_roots()[0], 8)
    patch(path, leaf, put_u32(NODE_NR_ENTRIES, 253), BTREE_CSUM_XOR)
    assert ours(path, "--super-block-only").clean
    assert thin_check(path, "--super-block-only") == 0
    report = ours(path, "--skip-mappings")
    assert report.clean and report.summary.mappings is None
    assert report.stages == [
        "examining superblock",
        "examining devices tree",
        "examining mapping tree",
    ]
    assert not ours(path).clean


# --------------------------------------------------------------------------------------------
# Held metadata snapshots (restore.py's hold_snapshot)


def held_snapshot_file(tmp_path: Path) -> tuple[Path, int]:
    path = tmp_path / "snap.bin"
    path.write_bytes(restore_to_image(random_pool(13, 3, 2000).xml(), 2048, hold_snapshot=True))
    held = superblock(path).held_root
    assert held
    return path, held


def test_held_snapshot_passes_both(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, held = held_snapshot_file(tmp_path)
    report = assert_clean_both(path)
    assert report.summary.metadata_snap == held
    snap = ours(path, "-m")
    assert snap.clean and snap.summary.mappings == 6000
    assert "checking space map counts" not in snap.stages
    assert thin_check(path, "-m") == 0
    assert cli(capsys, path, "-m")[0] == 0
    assert cli(capsys, path, f"--metadata-snap={held}")[0] == 0
    assert cli(capsys, path, f"--metadata-snap={held + 1}")[0] == 2


def test_held_snapshot_corrupted(tmp_path: Path) -> None:
    path, held = held_snapshot_file(tmp_path)

    def flip(b: bytearray) -> None:
        b[50] ^= 1

    patch(path, held, flip)
    find(
        ours(path),
        Severity.FATAL,
        block=held,
        structure="metadata snapshot superblock",
        text="bad checksum",
    )
    assert not ours(path, "-m").clean
    assert thin_check(path) == 1


def test_held_snapshot_not_referenced_leaks(tmp_path: Path) -> None:
    path, held = held_snapshot_file(tmp_path)
    patch(path, 0, put_u64(56, 0), SUPERBLOCK_CSUM_XOR)  # forget the snapshot
    report = ours(path)
    find(
        report,
        Severity.NON_FATAL,
        block=held,
        structure="metadata space map",
        text="expected 0, but got 1",
    )
    assert report.fatal == 0
    assert thin_check(path) == 1
    assert thin_check(path, "--ignore-non-fatal-errors") == 0


def test_no_snapshot_held(restore_xml: RestoreFn, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, restore_xml(SMALL), "-m")
    assert code == 3 and "no metadata snapshot" in err


# --------------------------------------------------------------------------------------------
# The command line


def test_cli_output(restore_xml: RestoreFn, capsys: pytest.CaptureFixture[str]) -> None:
    path = restore_xml(SMALL)
    code, out, err = cli(capsys, path)
    assert code == 0
    assert err.splitlines() == [
        "examining superblock",
        "examining devices tree",
        "examining mapping tree",
        "checking space map counts",
    ]
    assert "devices: 2, mappings: 600" in out and "result: clean" in out
    assert cli(capsys, path, "-q") == (0, "", "")
    code, data = json_cli(capsys, path)
    assert code == 0 and data["clean"] is True
    summary = data["summary"]
    assert isinstance(summary, dict) and summary["mappings"] == 600
    patch(path, superblock(path).device_details_root, put_u32(NODE_VALUE_SIZE, 16), BTREE_CSUM_XOR)
    code, data = json_cli(capsys, path)
    assert code == 1 and data["clean"] is False
    problems = data["problems"]
    assert isinstance(problems, list)
    assert {"severity", "block", "structure", "message"} <= problems[0].keys()
    code, out, _ = cli(capsys, path)
    assert code == 1 and "fatal: device details tree, block" in out
    assert cli(capsys, path, "--clear-needs-check-flag")[0] == 1


# --------------------------------------------------------------------------------------------
# Hostile metadata: never a crash, a loop or unbounded memory


def test_fuzzed_blocks_never_crash(restore_xml: RestoreFn) -> None:
    clean = bytearray(restore_xml(random_pool(14, 3, 700, share=1.0)).read_bytes())
    rng = random.Random(5)
    used = sorted({b for b in range(64) if any(clean[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE])})
    salts = (BTREE_CSUM_XOR, BITMAP_CSUM_XOR, SUPERBLOCK_CSUM_XOR, None)
    for _ in range(300):
        image = bytearray(clean)
        for _ in range(rng.randint(1, 3)):
            blocknr = rng.choice(used)
            block = image[blocknr * BLOCK_SIZE : (blocknr + 1) * BLOCK_SIZE]
            for _ in range(rng.randint(1, 4)):
                offset = rng.choice([rng.randrange(4, 64), rng.randrange(BLOCK_SIZE)])
                block[offset] = rng.randrange(256)
            salt = salts[0] if blocknr else SUPERBLOCK_CSUM_XOR
            if rng.random() < 0.8:
                salt = rng.choice(salts) if blocknr else salt
                if salt is not None:
                    seal(block, salt)
            image[blocknr * BLOCK_SIZE : (blocknr + 1) * BLOCK_SIZE] = block
        report = check_metadata(MemoryBlocks(bytes(image)))
        assert report.summary is not None


def test_many_mappings_checked_without_per_mapping_loops(restore_xml: RestoreFn) -> None:
    # Not a benchmark (those live in benchmarks/): a guard against per-mapping Python loops.
    path = restore_xml(random_pool(15, 2, 100_000), size=32 << 20)
    started = time.monotonic()
    report = ours(path)
    assert time.monotonic() - started < 3
    assert report.clean and report.summary.mappings == 200_000
