"""`metadata restore`: our writer against thin_restore/thin_dump/thin_check 0.9.0 (the oracles).

Every image we write must pass thin_check, dump (thin_dump and our reader) byte for byte as
thin_restore's image of the same XML dumps, and hold exactly the reference counts that
section 5.1 of dm-thin-format.md prescribes, recomputed here from the trees.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import RestoreFn, run_tool
from tests.support.xmlgen import Device, Pool, random_pool
from thinmgr.cli.app import run
from thinmgr.format.blocks import MemoryBlocks
from thinmgr.format.btree import TreeWalk
from thinmgr.format.constants import (
    DETAILS_VALUE_SIZE,
    ENTRIES_PER_BITMAP,
    INDEX_VALUE_SIZE,
    MAPPING_VALUE_SIZE,
    REFCOUNT_VALUE_SIZE,
)
from thinmgr.format.dump import dump_xml
from thinmgr.format.metadata import ThinMetadata
from thinmgr.format.node_writer import BuiltTree, build_btree, node_sizes
from thinmgr.format.restore import restore_to_image
from thinmgr.format.spacemap import data_index, metadata_index, read_counts
from thinmgr.ops.units import parse_size

NR_BLOCKS = 2048  # 8 MiB


# -- helpers --------------------------------------------------------------------------------


def write_image(
    tmp_path: Path,
    xml: str,
    nr_blocks: int = NR_BLOCKS,
    *,
    hold_snapshot: bool = False,
    name: str = "ours.bin",
) -> Path:
    out = tmp_path / name
    out.write_bytes(restore_to_image(xml, nr_blocks, hold_snapshot=hold_snapshot))
    return out


def thin_dump(path: Path, *extra: str) -> str:
    return run_tool("thin_dump", *extra, path).stdout


def our_dump(path: Path, *, snap: bool = False) -> str:
    md = ThinMetadata(MemoryBlocks(path.read_bytes()), snap=snap)
    return "".join(dump_xml(md))


def assert_matches_oracle(
    tmp_path: Path, restore_xml: RestoreFn, xml: str, nr_blocks: int = NR_BLOCKS
) -> Path:
    ours = write_image(tmp_path, xml, nr_blocks)
    theirs = restore_xml(xml, size=nr_blocks * 4096)
    check = run_tool("thin_check", ours, check=False)
    assert check.returncode == 0, check.stderr
    expected = thin_dump(theirs)
    assert thin_dump(ours) == expected
    assert our_dump(ours) == expected
    assert_counts_exact(ours)
    return ours


class Recount:
    """Expected reference counts, recomputed from the trees (format section 5.1)."""

    def __init__(self, image: bytes) -> None:
        self.source = MemoryBlocks(image)
        self.md = ThinMetadata(self.source)
        sb = self.md.superblock
        self.meta = np.zeros(sb.metadata_sm.nr_blocks, dtype=np.int64)
        self.data: dict[int, int] = {}
        self.seen: set[int] = set()
        self.meta[0] += 1
        views = [sb]
        if sb.held_root:
            self.meta[sb.held_root] += 1
            views.append(ThinMetadata(self.source, snap=True).view)
        for view in views:
            self.tree(view.device_details_root, DETAILS_VALUE_SIZE)
            for leaf in self.tree(view.data_mapping_root, MAPPING_VALUE_SIZE):
                for sub_root in leaf.child_list():
                    for sub_leaf in self.tree(sub_root, MAPPING_VALUE_SIZE):
                        for value in sub_leaf.child_list():
                            self.data[value >> 24] = self.data.get(value >> 24, 0) + 1
        self.tree(sb.data_sm.bitmap_root, INDEX_VALUE_SIZE)
        self.tree(sb.data_sm.ref_count_root, REFCOUNT_VALUE_SIZE)
        self.tree(sb.metadata_sm.ref_count_root, REFCOUNT_VALUE_SIZE)
        self.meta[sb.metadata_sm.bitmap_root] += 1
        for entry in metadata_index(self.source, sb.metadata_sm):
            self.meta[entry.blocknr] += 1
        for entry in data_index(self.source, sb.data_sm):
            self.meta[entry.blocknr] += 1

    def tree(self, root: int, value_size: int) -> list:  # type: ignore[type-arg]
        """Counts one reference per parent entry; descends a shared node only once."""

        def enter(blocknr: int) -> bool:
            self.meta[blocknr] += 1
            first = blocknr not in self.seen
            self.seen.add(blocknr)
            return first

        return list(
            TreeWalk(
                self.source, root, value_size, "recount", enter=enter, check_occupancy=True
            ).leaves()
        )


def assert_counts_exact(path: Path) -> None:
    image = path.read_bytes()
    recount = Recount(image)
    source, sb = recount.source, recount.md.superblock
    meta_index = metadata_index(source, sb.metadata_sm)
    meta = read_counts(source, sb.metadata_sm, meta_index, "metadata space map")
    assert np.array_equal(meta.counts.astype(np.int64), recount.meta)
    assert sb.metadata_sm.nr_allocated == int(np.count_nonzero(recount.meta))
    expected_data = np.zeros(sb.data_sm.nr_blocks, dtype=np.int64)
    for block, count in recount.data.items():
        expected_data[block] = count
    data = read_counts(source, sb.data_sm, data_index(source, sb.data_sm), "data space map")
    assert np.array_equal(data.counts.astype(np.int64), expected_data)
    assert sb.data_sm.nr_allocated == len(recount.data)
    for counts, index, total in (
        (recount.meta, meta_index, sb.metadata_sm.nr_blocks),
        (expected_data, data.index, sb.data_sm.nr_blocks),
    ):
        padded = np.zeros(len(index) * ENTRIES_PER_BITMAP, dtype=np.int64)
        padded[:total] = counts
        for i, entry in enumerate(index):
            chunk = padded[i * ENTRIES_PER_BITMAP : (i + 1) * ENTRIES_PER_BITMAP]
            # nr_free kernel-style, against all 16320 entries (section 6.3)
            assert entry.nr_free == ENTRIES_PER_BITMAP - np.count_nonzero(chunk)
            free = np.flatnonzero(chunk == 0)
            assert entry.none_free_before == (free[0] if len(free) else ENTRIES_PER_BITMAP)
    # counts > 2 live in the overflow trees, and only they
    assert set(meta.overflow) == set(np.flatnonzero(recount.meta > 2).tolist())
    assert set(data.overflow) == {b for b, c in recount.data.items() if c > 2}


# -- the node writer -----------------------------------------------------------------------


class Counter:
    def __init__(self, first: int = 10) -> None:
        self.next = first

    def allocate(self) -> int:
        self.next += 1
        return self.next - 1


@pytest.mark.parametrize("count", [0, 1, 84, 252, 253, 504, 505, 10_000, 63_505])
def test_node_sizes_keep_every_non_root_node_at_least_a_third_full(count: int) -> None:
    sizes = node_sizes(count, 252)
    assert sum(sizes) == count
    assert all(s <= 252 for s in sizes)
    if len(sizes) > 1:
        assert min(sizes) >= 84 and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("count", [0, 5, 336, 337, 200_000])
def test_build_btree_reads_back_with_any_value_size(count: int) -> None:
    image = bytearray(4096 * 2000)

    def write(blocknr: int, data: bytes | bytearray) -> None:
        image[blocknr * 4096 : (blocknr + 1) * 4096] = data

    keys = np.arange(count, dtype=np.uint64) * np.uint64(3) + np.uint64(7)
    values = (np.arange(count, dtype=np.uint32) * 11).astype("<u4")
    tree: BuiltTree = build_btree(keys, values, 4, Counter(), write, root_block=2)
    assert tree.root == 2 and len(set(tree.nodes)) == len(tree.nodes)
    walk = TreeWalk(MemoryBlocks(image), tree.root, 4, "test", check_occupancy=True)
    leaves = list(walk.leaves())
    got_keys = np.concatenate([leaf.keys for leaf in leaves])
    got_values = np.concatenate([leaf.values_u32() for leaf in leaves])
    assert np.array_equal(got_keys, keys) and np.array_equal(got_values, values)


# -- round trips against the oracles -----------------------------------------------------------


@pytest.mark.parametrize(
    "seed,devices,mappings", [(1, 1, 10), (2, 3, 700), (3, 5, 2_000), (4, 2, 6_000), (5, 8, 300)]
)
def test_random_pools_match_thin_restore(
    tmp_path: Path, restore_xml: RestoreFn, seed: int, devices: int, mappings: int
) -> None:
    assert_matches_oracle(tmp_path, restore_xml, random_pool(seed, devices, mappings).xml())


def test_no_devices(tmp_path: Path, restore_xml: RestoreFn) -> None:
    assert_matches_oracle(tmp_path, restore_xml, Pool(devices=[], nr_data_blocks=100).xml())


def test_empty_devices_and_the_largest_dev_id(tmp_path: Path, restore_xml: RestoreFn) -> None:
    pool = Pool(
        devices=[
            Device(0),
            Device(5, transaction=3, creation_time=2, snap_time=3),
            Device((1 << 24) - 1, runs=[(0, 1, 3, 1)]),
        ],
        nr_data_blocks=10,
        time=3,
    )
    assert_matches_oracle(tmp_path, restore_xml, pool.xml())


def test_a_mapping_at_the_largest_virtual_block(tmp_path: Path, restore_xml: RestoreFn) -> None:
    pool = Pool(
        devices=[Device(1, runs=[(0, 0, 1, 0), ((1 << 64) - 2, 5, 2, 0)])], nr_data_blocks=10
    )
    assert_matches_oracle(tmp_path, restore_xml, pool.xml())


def test_many_devices_give_internal_nodes_in_details_and_top_trees(
    tmp_path: Path, restore_xml: RestoreFn
) -> None:
    pool = Pool(
        devices=[Device(i * 2, runs=[(i, i, 1, 0)]) for i in range(300)], nr_data_blocks=400
    )
    ours = assert_matches_oracle(tmp_path, restore_xml, pool.xml())
    md = ThinMetadata(MemoryBlocks(ours.read_bytes()))
    details = TreeWalk(md.source, md.superblock.device_details_root, DETAILS_VALUE_SIZE, "d")
    assert len(list(details.leaves())) == 3  # 300 details at 126 per leaf


def test_deep_tree_and_several_data_bitmaps(tmp_path: Path, restore_xml: RestoreFn) -> None:
    # 210,000 mappings in one device: 834 leaves -> 4 internal nodes -> root (height 3);
    # 220,000 data blocks need 14 bitmaps.
    runs = [(i * 10, i * 7, 7, 1) for i in range(30_000)]
    pool = Pool(devices=[Device(0, runs=runs)], nr_data_blocks=220_000)
    ours = assert_matches_oracle(tmp_path, restore_xml, pool.xml(), nr_blocks=4096)
    md = ThinMetadata(MemoryBlocks(ours.read_bytes()))
    walk = TreeWalk(md.source, md.mapping_roots()[0], MAPPING_VALUE_SIZE, "m")
    list(walk.leaves())
    assert walk.leaf_depth == 2


def sharing_xml(users: int, def_runs: int, *, own: bool = True) -> tuple[str, str]:
    """A pool where ``users`` devices ref one shared def, and the same pool written out."""
    shared = "".join(
        f'    <range_mapping origin_begin="{1000 + i * 4}" data_begin="{i * 4}" '
        f'length="3" time="1"/>\n'
        for i in range(def_runs)
    )
    head = (
        '<superblock uuid="" time="1" transaction="1" flags="0" version="2" '
        'data_block_size="128" nr_data_blocks="20000">\n'
    )
    defs, expanded = [head, '  <def name="base">\n', shared, "  </def>\n"], [head]
    for dev in range(users):
        before = (
            (f'    <single_mapping origin_block="{dev}" data_block="{10_000 + dev}" time="0"/>\n')
            if own and dev % 2
            else ""
        )
        after = (
            (
                f'    <range_mapping origin_begin="{100_000 + dev}" '
                f'data_begin="{12_000 + dev * 200}" length="{dev * 50 + 1}" time="1"/>\n'
            )
            if own
            else ""
        )
        open_tag = (
            f'  <device dev_id="{dev}" mapped_blocks="0" transaction="0" '
            'creation_time="0" snap_time="1">\n'
        )
        defs += [open_tag, before, '    <ref name="base"/>\n', after, "  </device>\n"]
        expanded += [open_tag, before, shared, after, "  </device>\n"]
    defs.append("</superblock>\n")
    expanded.append("</superblock>\n")
    return "".join(defs), "".join(expanded)


@pytest.mark.parametrize(
    "users,def_runs,own",
    [(4, 400, True), (3, 400, False), (5, 20, False), (5, 20, True), (6, 1, True)],
)
def test_def_ref_sharing(
    tmp_path: Path, restore_xml: RestoreFn, users: int, def_runs: int, own: bool
) -> None:
    with_defs, expanded = sharing_xml(users, def_runs, own=own)
    ours = write_image(tmp_path, with_defs)
    check = run_tool("thin_check", ours, check=False)
    assert check.returncode == 0, check.stderr
    expected = thin_dump(restore_xml(expanded))
    assert thin_dump(ours) == expected
    assert our_dump(ours) == expected
    assert_counts_exact(ours)
    recount = Recount(ours.read_bytes())
    if def_runs == 400 and not own:
        # shared leaves count once for their data: counts stay 1, but the leaves are
        # referenced by every user -> the metadata overflow tree is in use
        assert max(recount.data.values()) == 1 and recount.meta.max() == users


def test_data_counts_above_two_use_the_overflow_tree(
    tmp_path: Path, restore_xml: RestoreFn
) -> None:
    # five devices map the same data blocks from distinct leaves: counts of 5
    runs = [(i * 3, i, 1, 0) for i in range(600)]
    pool = Pool(devices=[Device(d, runs=runs) for d in range(5)], nr_data_blocks=1000)
    ours = assert_matches_oracle(tmp_path, restore_xml, pool.xml())
    assert set(Recount(ours.read_bytes()).data.values()) == {5}


def test_held_metadata_snapshot(tmp_path: Path) -> None:
    xml = random_pool(7, 3, 800).xml()
    ours = write_image(tmp_path, xml, hold_snapshot=True)
    check = run_tool("thin_check", ours, check=False)
    assert check.returncode == 0, check.stderr
    live = thin_dump(ours)
    held = ThinMetadata(MemoryBlocks(ours.read_bytes())).superblock.held_root
    assert held > 0
    snap = thin_dump(ours, "-m")
    # the snapshot shows the same devices and mappings; only the superblock line differs
    assert snap.split("\n", 1)[1] == live.split("\n", 1)[1]
    assert snap.split("\n", 1)[0].endswith('nr_data_blocks="0">')
    # our reader names the snapshot block on the superblock line; thin_dump 0.9.0 does not
    assert our_dump(ours, snap=True).replace(f' metadata_snap="{held}"', "") == snap
    assert_counts_exact(ours)


def test_superblock_fields(tmp_path: Path) -> None:
    xml = Pool(devices=[], nr_data_blocks=100, time=9, transaction=77, flags=1, version=1).xml()
    md = ThinMetadata(MemoryBlocks(write_image(tmp_path, xml, 5000).read_bytes()))
    sb = md.superblock
    assert (sb.version, sb.time, sb.trans_id, sb.flags) == (2, 9, 77, 1)
    assert sb.uuid == b"\0" * 16 and sb.metadata_nr_blocks == 5000
    assert (sb.metadata_sm.bitmap_root, sb.metadata_sm.ref_count_root) == (1, 2)


# -- the command line -----------------------------------------------------------------------


def test_cli_restore_creates_and_summarises(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.xml"
    src.write_text(random_pool(3, 2, 500).xml())
    out = tmp_path / "new.bin"
    assert run(["metadata", "restore", "-i", str(src), "-o", str(out)]) == 0
    line = capsys.readouterr().out
    assert "2 devices, 1000 mappings" in line
    assert out.stat().st_size == 3 << 20  # 2 MiB minimum plus headroom, rounded up
    assert run_tool("thin_check", out, check=False).returncode == 0
    # a second restore refuses to overwrite valid metadata without --force
    before = out.read_bytes()
    assert run(["metadata", "restore", "-i", str(src), "-o", str(out)]) == 4
    err = capsys.readouterr().err
    assert "already holds thin-pool metadata" in err and "--force" in err
    assert out.read_bytes() == before
    assert run(["--json", "metadata", "restore", "-i", str(src), "-o", str(out), "--force"]) == 0
    assert '"mappings": 1000' in capsys.readouterr().out


def test_cli_size_and_too_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in.xml"
    src.write_text(random_pool(3, 4, 20_000).xml())
    out = tmp_path / "sized.bin"
    assert run(["metadata", "restore", "-i", str(src), "-o", str(out), "--size", "4M"]) == 0
    assert out.stat().st_size == 4 << 20
    small = tmp_path / "small.bin"
    assert run(["metadata", "restore", "-i", str(src), "-o", str(small), "--size", "64K"]) == 6
    err = capsys.readouterr().err
    assert "too small" in err and "needs at least" in err
    assert not small.exists()
    existing = tmp_path / "existing.bin"
    existing.write_bytes(b"\0" * 65536)
    assert run(["metadata", "restore", "-i", str(src), "-o", str(existing)]) == 6
    assert existing.read_bytes() == b"\0" * 65536
    assert run(["metadata", "restore", "-i", str(src), "-o", str(out), "--size", "4Q"]) == 2


GOOD_HEAD = (
    '<superblock uuid="" time="1" transaction="1" data_block_size="128" nr_data_blocks="100">\n'
)
DEV = '  <device dev_id="1" mapped_blocks="0" transaction="0" creation_time="0" snap_time="0">\n'


@pytest.mark.parametrize(
    "body,line,words",
    [
        (
            GOOD_HEAD + DEV + '    <single_mapping origin_block="1" data_block="2" time="0"/>\n'
            "    <bogus/>\n  </device>\n</superblock>\n",
            4,
            "unknown element <bogus>",
        ),
        (
            GOOD_HEAD + DEV + '    <single_mapping origin_block="1" data_block="x" time="0"/>\n'
            "  </device>\n</superblock>\n",
            3,
            "data_block='x'",
        ),
        (
            GOOD_HEAD + DEV + '    <single_mapping origin_block="1" data_block="2"/>\n'
            "  </device>\n</superblock>\n",
            3,
            "lacks attribute time",
        ),
        (
            GOOD_HEAD
            + DEV
            + '    <single_mapping origin_block="1" data_block="2" time="0" x="1"/>\n'
            "  </device>\n</superblock>\n",
            3,
            "unknown attribute x",
        ),
        (
            GOOD_HEAD + DEV.replace('"1"', '"16777216"', 1) + "  </device>\n</superblock>\n",
            2,
            "dev_id",
        ),
        (
            GOOD_HEAD + DEV + '    <single_mapping origin_block="5" data_block="2" time="0"/>\n'
            '    <single_mapping origin_block="5" data_block="3" time="0"/>\n'
            "  </device>\n</superblock>\n",
            4,
            "out of order",
        ),
        (
            GOOD_HEAD + DEV + '    <range_mapping origin_begin="0" data_begin="2" length="3" '
            'time="0"/>\n    <single_mapping origin_block="2" data_block="9" time="0"/>\n'
            "  </device>\n</superblock>\n",
            4,
            "overlaps",
        ),
        (
            GOOD_HEAD + DEV + '    <single_mapping origin_block="5" data_block="100" time="0"/>\n'
            "  </device>\n</superblock>\n",
            3,
            "beyond the data device",
        ),
        (
            GOOD_HEAD + DEV + '    <single_mapping origin_block="5" data_block="1" '
            'time="16777216"/>\n  </device>\n</superblock>\n',
            3,
            "24 bits",
        ),
        (
            GOOD_HEAD.replace('nr_data_blocks="100"', 'nr_data_blocks="2000000000000"')
            + DEV
            + "  </device>\n</superblock>\n",
            1,
            "nr_data_blocks",
        ),
        (GOOD_HEAD.replace('"128"', '"200"') + "</superblock>\n", 1, "data_block_size 200"),
        (
            GOOD_HEAD + DEV + "  </device>\n" + DEV + "  </device>\n</superblock>\n",
            4,
            "appears twice",
        ),
        (
            GOOD_HEAD + DEV + '    <ref name="nope"/>\n  </device>\n</superblock>\n',
            3,
            "names no <def>",
        ),
        (GOOD_HEAD + DEV + "  </device>\n", 4, "not well-formed"),
        (
            GOOD_HEAD + '  <single_mapping origin_block="1" data_block="2" time="0"/>\n'
            "</superblock>\n",
            2,
            "not allowed inside <superblock>",
        ),
    ],
)
def test_bad_xml_names_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, line: int, words: str
) -> None:
    src = tmp_path / "bad.xml"
    src.write_text(body)
    out = tmp_path / "target.bin"
    out.write_bytes(b"\x01" * (8 << 20))
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert run(["metadata", "restore", "-i", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"line {line}:" in err and words in err, err
    assert "Traceback" not in err
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    assert {p.name for p in tmp_path.iterdir()} == {"bad.xml", "target.bin"}  # no temp left


def test_input_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_xml: RestoreFn
) -> None:
    out = tmp_path / "o.bin"
    assert run(["metadata", "restore", "-i", str(tmp_path / "missing.xml"), "-o", str(out)]) == 3
    binary = restore_xml(random_pool(1, 1, 10).xml())
    assert run(["metadata", "restore", "-i", str(binary), "-o", str(out)]) == 2
    assert "binary thin-pool metadata" in capsys.readouterr().err
    empty = tmp_path / "empty.xml"
    empty.write_text("")
    assert run(["metadata", "restore", "-i", str(empty), "-o", str(out)]) == 2
    assert "empty or truncated" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "text,value",
    [
        ("4096", 4096),
        ("512K", 512 << 10),
        ("4M", 4 << 20),
        ("1G", 1 << 30),
        ("1.5GiB", 3 << 29),
        ("2048s", 1 << 20),
        ("8 MB", 8 << 20),
        ("0", 0),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "-4M", "4Q", "0.3K", "1e6", "4 M B"])
def test_parse_size_rejects(text: str) -> None:
    from thinmgr.errors import UsageError

    with pytest.raises(UsageError):
        parse_size(text)
