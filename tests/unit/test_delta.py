"""`metadata delta` against thin_delta 0.9.0, and the shared-subtree skipping of --changed-only.

Pools come from thin_restore (the oracle). Shared subtrees, which thin_restore 0.9.0 cannot
make, are made by patching a restored image: where device B's tree holds a node whose content
equals the node at the same place in device A's tree, B's parent is repointed at A's node and
resealed. thin_delta does not check reference counts, so it reads such images fine.
"""

from __future__ import annotations

import random
import struct
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import RestoreFn, run_tool
from tests.support.xmlgen import Device, Pool
from thinmgr.cli.app import run
from thinmgr.format.blocks import MemoryBlocks
from thinmgr.format.btree import read_node
from thinmgr.format.checksum import seal
from thinmgr.format.constants import BLOCK_SIZE, BTREE_CSUM_XOR, MAPPING_VALUE_SIZE
from thinmgr.format.delta import DeltaKind, compute_delta, delta_xml
from thinmgr.format.metadata import ThinMetadata
from thinmgr.format.superblock import Superblock

Mapping = dict[int, tuple[int, int]]  # vblock -> (data block, time)


# --------------------------------------------------------------------------- pool builders


def runs_of(mapping: Mapping) -> list[tuple[int, int, int, int]]:
    runs: list[tuple[int, int, int, int]] = []
    for v in sorted(mapping):
        d, t = mapping[v]
        if runs:
            v0, d0, n, t0 = runs[-1]
            if v == v0 + n and d == d0 + n and t == t0:
                runs[-1] = (v0, d0, n + 1, t0)
                continue
        runs.append((v, d, 1, t))
    return runs


def pool_of(left: Mapping, right: Mapping, nr_data: int, *, extra: Mapping | None = None) -> Pool:
    devices = [Device(1, runs=runs_of(left)), Device(4, creation_time=1, runs=runs_of(right))]
    if extra is not None:
        devices.append(Device(9, runs=runs_of(extra)))
    return Pool(devices=devices, nr_data_blocks=nr_data, time=2, transaction=3)


def random_left(rng: random.Random, n: int, nr_data: int) -> Mapping:
    """n mappings in runs of random length, with gaps, on random data blocks."""
    out: Mapping = {}
    v = rng.randrange(0, 40)
    while len(out) < n:
        run = rng.randint(1, 12)
        d = rng.randrange(0, nr_data - run)
        t = rng.randint(0, 2)
        for i in range(min(run, n - len(out))):
            out[v + i] = (d + i, t)
        v += run + (rng.randrange(1, 30) if rng.random() < 0.3 else 0)
    return out


def derive(
    rng: random.Random, left: Mapping, nr_data: int, *, p_diff: float, p_drop: float, p_add: float
) -> Mapping:
    """A snapshot of ``left`` after writes: some blocks moved (in runs), dropped or added."""
    right: Mapping = {}
    keys = sorted(left)
    i = 0
    while i < len(keys):
        span = keys[i : i + rng.randint(1, 10)]
        r = rng.random()
        if r < p_diff:
            d = rng.randrange(0, nr_data - len(span))
            right.update({v: (d + j, 2) for j, v in enumerate(span)})
        elif r < p_diff + p_drop:
            pass
        else:
            right.update({v: left[v] for v in span})
        i += len(span)
    top = (max(keys) if keys else 0) + 1
    for _ in range(int(len(left) * p_add)):
        v = rng.randrange(0, top + 200)
        if v not in right:
            right[v] = (rng.randrange(0, nr_data), 1)
    return right


def thin_delta(path: Path, a: int, b: int, *extra: str) -> str:
    return run_tool("thin_delta", "--snap1", str(a), "--snap2", str(b), *extra, path).stdout


def ours(
    path: Path,
    a: int,
    b: int,
    *,
    verbose: bool = False,
    snap: bool | int = False,
    changed_only: bool = False,
) -> str:
    blocks = MemoryBlocks(path.read_bytes())
    md = ThinMetadata(blocks, snap=snap)
    return "".join(
        delta_xml(md, compute_delta(md, a, b, verbose=verbose, changed_only=changed_only))
    )


def without_same(compact_xml: str) -> str:
    return "".join(
        line for line in compact_xml.splitlines(keepends=True) if not line.startswith("    <same ")
    )


def assert_like_thin_delta(path: Path, a: int, b: int) -> None:
    expected = thin_delta(path, a, b)
    assert ours(path, a, b) == expected
    assert ours(path, a, b, verbose=True) == thin_delta(path, a, b, "--verbose")
    assert ours(path, a, b, changed_only=True) == without_same(expected)


# --------------------------------------------------------------------------- byte identity

NR_DATA = 40000


def _pair(kind: str, seed: int) -> tuple[Mapping, Mapping]:
    rng = random.Random(seed)
    left = random_left(rng, rng.randint(50, 1500), NR_DATA)
    if kind == "identical":
        return left, dict(left)
    if kind == "disjoint":
        shift = max(left) + 5
        return left, {v + shift: (d, t) for v, (d, t) in left.items()}
    if kind == "left_only":
        return left, {v: x for v, x in left.items() if rng.random() < 0.5}
    if kind == "right_only":
        return {v: x for v, x in left.items() if rng.random() < 0.5}, left
    if kind == "different_data":
        return left, derive(rng, left, NR_DATA, p_diff=0.9, p_drop=0, p_add=0)
    if kind == "empty_left":
        return {}, left
    if kind == "empty_right":
        return left, {}
    if kind == "both_empty":
        return {}, {}
    # "mixed": moved, dropped and added blocks, gaps, runs cut by data discontinuities
    return left, derive(rng, left, NR_DATA, p_diff=0.3, p_drop=0.2, p_add=0.2)


KINDS = [
    "identical",
    "disjoint",
    "left_only",
    "right_only",
    "different_data",
    "empty_left",
    "empty_right",
    "both_empty",
    "mixed",
]


@pytest.mark.parametrize("kind", KINDS)
def test_identical_to_thin_delta(kind: str, restore_xml: RestoreFn) -> None:
    for seed in range(3 if kind != "both_empty" else 1):
        left, right = _pair(kind, seed)
        path = restore_xml(pool_of(left, right, NR_DATA))
        assert_like_thin_delta(path, 1, 4)
        assert_like_thin_delta(path, 4, 1)


def test_many_random_pairs(restore_xml: RestoreFn) -> None:
    rng = random.Random(99)
    for _ in range(12):
        left = random_left(rng, rng.randint(1, 3000), NR_DATA)
        right = derive(
            rng,
            left,
            NR_DATA,
            p_diff=rng.random() / 2,
            p_drop=rng.random() / 3,
            p_add=rng.random() / 2,
        )
        path = restore_xml(pool_of(left, right, NR_DATA))
        assert_like_thin_delta(path, 1, 4)


def test_same_device_on_both_sides(restore_xml: RestoreFn) -> None:
    left, right = _pair("mixed", 7)
    path = restore_xml(pool_of(left, right, NR_DATA))
    assert_like_thin_delta(path, 4, 4)


def test_deep_trees(restore_xml: RestoreFn) -> None:
    """> 60,000 mappings per device: internal nodes on both sides."""
    rng = random.Random(5)
    left = random_left(rng, 65000, 400000)
    right = derive(rng, left, 400000, p_diff=0.05, p_drop=0.02, p_add=0.02)
    path = restore_xml(pool_of(left, right, 400000), size=32 << 20)
    md = ThinMetadata(MemoryBlocks(path.read_bytes()))
    root = md.mapping_roots()[1]
    assert not read_node(md.source, root, MAPPING_VALUE_SIZE, "t").is_leaf
    assert_like_thin_delta(path, 1, 4)


# --------------------------------------------------------------------------- shared subtrees


def _node_content(image: bytearray, blocknr: int) -> bytes:
    block = image[blocknr * BLOCK_SIZE : (blocknr + 1) * BLOCK_SIZE]
    return bytes(block[16:])  # everything but checksum, flags and the block's own number


def share_identical(image: bytearray, a_root: int, b_root: int) -> int:
    """Repoint B's children at A's where the subtrees are equal; returns nodes shared."""
    source = MemoryBlocks(image)
    a = read_node(source, a_root, MAPPING_VALUE_SIZE, "a")
    b = read_node(source, b_root, MAPPING_VALUE_SIZE, "b")
    if a.is_leaf or b.is_leaf:
        return 0
    a_children = dict(zip(a.key_list(), a.child_list(), strict=True))
    shared = 0
    changed = False
    for i, (key, child) in enumerate(zip(b.key_list(), b.child_list(), strict=True)):
        twin = a_children.get(key)
        if twin is None or twin == child:
            continue
        shared += share_identical(image, twin, child)
        if _node_content(image, twin) == _node_content(image, child):
            struct.pack_into("<Q", image, b_root * BLOCK_SIZE + b.values_offset + 8 * i, twin)
            shared += 1
            changed = True
    if changed:
        block = bytearray(image[b_root * BLOCK_SIZE : (b_root + 1) * BLOCK_SIZE])
        seal(block, BTREE_CSUM_XOR)
        image[b_root * BLOCK_SIZE : (b_root + 1) * BLOCK_SIZE] = block
    return shared


def shared_pool(
    restore_xml: RestoreFn, tmp_path: Path, n: int, nr_changed: int, seed: int
) -> tuple[Path, Mapping, Mapping]:
    """Devices 1 and 4: 4 is 1 with ``nr_changed`` scattered blocks moved, sharing the rest."""
    rng = random.Random(seed)
    left = {v: (v + 10, 0) for v in range(n)}
    right = dict(left)
    for v in rng.sample(range(n), nr_changed):
        right[v] = (n + 100 + v, 1)
    path = restore_xml(pool_of(left, right, 2 * n + 1000), size=64 << 20)
    image = bytearray(path.read_bytes())
    roots = ThinMetadata(MemoryBlocks(image)).mapping_roots()
    assert share_identical(image, roots[1], roots[4]) > 0
    out = tmp_path / f"shared{seed}.bin"
    out.write_bytes(image)
    return out, left, right


class CountingBlocks:
    """A BlockSource that records every block read."""

    def __init__(self, image: bytes) -> None:
        self.inner = MemoryBlocks(image)
        self.reads: list[int] = []

    @property
    def nr_blocks(self) -> int:
        return self.inner.nr_blocks

    def read_block(self, blocknr: int) -> memoryview:
        self.reads.append(blocknr)
        return self.inner.read_block(blocknr)


@pytest.mark.parametrize(("n", "nr_changed"), [(30000, 3), (70000, 5)])
def test_changed_only_reads_only_what_changed(
    restore_xml: RestoreFn, tmp_path: Path, n: int, nr_changed: int
) -> None:
    path, _, _ = shared_pool(restore_xml, tmp_path, n, nr_changed, seed=n)
    # thin_delta still reads the patched image, and we agree with it in every mode.
    assert_like_thin_delta(path, 1, 4)
    assert_like_thin_delta(path, 4, 1)

    full = CountingBlocks(path.read_bytes())
    compute_delta(ThinMetadata(full), 1, 4)
    counting = CountingBlocks(path.read_bytes())
    delta = compute_delta(ThinMetadata(counting), 1, 4, changed_only=True)
    assert delta.stats.shared_subtrees > 0
    assert delta.stats.shared_subtrees_read == 0
    # superblock + top-level lookups + per side: the spine to each changed leaf and the leaf.
    height = 2 if n < 63000 else 3
    assert len(counting.reads) <= 8 + 2 * nr_changed * height + 2 * height
    assert len(full.reads) > n // 252  # the full delta reads every leaf once
    assert sorted(r.begin for r in delta.runs) == sorted(
        r.begin for r in delta.runs if r.kind == DeltaKind.DIFFERENT
    )


def test_whole_device_shared(restore_xml: RestoreFn, tmp_path: Path) -> None:
    """A fresh snapshot: B's top-level entry points at A's root; nothing below is read."""
    left = {v: (v, 0) for v in range(5000)}
    path = restore_xml(pool_of(left, {0: (9999, 0)}, 20000))
    image = bytearray(path.read_bytes())
    md = ThinMetadata(MemoryBlocks(image))
    roots = md.mapping_roots()
    top = read_node(md.source, md.view.data_mapping_root, MAPPING_VALUE_SIZE, "top")
    index = top.key_list().index(4)
    struct.pack_into(
        "<Q", image, top.blocknr * BLOCK_SIZE + top.values_offset + 8 * index, roots[1]
    )
    block = bytearray(image[top.blocknr * BLOCK_SIZE : (top.blocknr + 1) * BLOCK_SIZE])
    seal(block, BTREE_CSUM_XOR)
    image[top.blocknr * BLOCK_SIZE : (top.blocknr + 1) * BLOCK_SIZE] = block
    patched = tmp_path / "snap.bin"
    patched.write_bytes(image)
    assert_like_thin_delta(patched, 1, 4)
    counting = CountingBlocks(bytes(image))
    delta = compute_delta(ThinMetadata(counting), 1, 4, changed_only=True)
    assert len(delta.runs) == 0
    assert roots[1] not in counting.reads


# --------------------------------------------------------------------------- metadata snapshot


def hold_snapshot(path: Path, location: int) -> None:
    """reserve_metadata_snap's superblock copy (format section 7.1), without the counts."""
    image = bytearray(path.read_bytes())
    sb = Superblock.unpack(image[:BLOCK_SIZE])
    image[location * BLOCK_SIZE : (location + 1) * BLOCK_SIZE] = sb.snapshot_copy(location).pack()
    image[:BLOCK_SIZE] = replace(sb, held_root=location).pack()
    path.write_bytes(image)


def test_metadata_snapshot(restore_xml: RestoreFn) -> None:
    left, right = _pair("mixed", 3)
    path = restore_xml(pool_of(left, right, NR_DATA))
    hold_snapshot(path, 1900)
    # Live view: thin_delta prints metadata_snap; the snapshot's copy holds none.
    live = thin_delta(path, 1, 4)
    assert 'metadata_snap="1900"' in live.splitlines()[0]
    assert ours(path, 1, 4) == live
    for flag, snap in (("-m", True), ("--metadata-snap=1900", 1900)):
        expected = thin_delta(path, 1, 4, flag)
        assert 'nr_data_blocks="0"' in expected
        assert ours(path, 1, 4, snap=snap) == expected
        assert ours(path, 1, 4, snap=snap, verbose=True) == thin_delta(
            path, 1, 4, flag, "--verbose"
        )


# --------------------------------------------------------------------------- the command


def test_cli_matches_thin_delta(restore_xml: RestoreFn, capsys: pytest.CaptureFixture[str]) -> None:
    left, right = _pair("mixed", 11)
    path = restore_xml(pool_of(left, right, NR_DATA))
    assert run(["metadata", "delta", str(path), "--thin1", "1", "--thin2", "4"]) == 0
    assert capsys.readouterr().out == thin_delta(path, 1, 4)
    assert run(["metadata", "delta", str(path), "--snap1", "4", "--snap2", "1", "--verbose"]) == 0
    assert capsys.readouterr().out == thin_delta(path, 4, 1, "--verbose")
    hold_snapshot(path, 1900)
    assert run(["metadata", "delta", "-m", str(path), "--snap1", "1", "--snap2", "4"]) == 0
    assert capsys.readouterr().out == thin_delta(path, 1, 4, "-m")


def test_cli_json(restore_xml: RestoreFn, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    left, right = _pair("mixed", 12)
    path = restore_xml(pool_of(left, right, NR_DATA))
    assert (
        run(
            [
                "metadata",
                "delta",
                str(path),
                "--snap1",
                "1",
                "--snap2",
                "4",
                "--format",
                "json",
                "--verbose",
                "--changed-only",
            ]
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["left"] == 1 and doc["right"] == 4
    # Every run against the mappings themselves.
    for kind, begin, length, ldata, rdata in doc["runs"]:
        for i in range(length):
            v = begin + i
            if kind == "left_only":
                assert v not in right and left[v][0] == ldata + i
            elif kind == "right_only":
                assert v not in left and right[v][0] == rdata + i
            else:
                assert kind == "different"
                assert left[v][0] == ldata + i != right[v][0] == rdata + i
    changed = {
        v for v in set(left) | set(right) if left.get(v, (None,))[0] != right.get(v, (None,))[0]
    }
    assert sum(r[2] for r in doc["runs"]) == len(changed)
    assert run(["--json", "metadata", "delta", str(path), "--snap1", "1", "--snap2", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"]


def test_unknown_device(restore_xml: RestoreFn, capsys: pytest.CaptureFixture[str]) -> None:
    path = restore_xml(pool_of({0: (1, 0)}, {0: (2, 0)}, 100))
    assert run(["metadata", "delta", str(path), "--snap1", "1", "--snap2", "77"]) == 3
    err = capsys.readouterr().err
    assert "thin device 77 does not exist" in err
    assert "Traceback" not in err
    assert run(["metadata", "delta", str(path), "--snap1", "5", "--snap2", "1"]) == 3


@pytest.mark.parametrize("missing", ["--snap1", "--snap2"])
def test_missing_device_option(
    missing: str, restore_xml: RestoreFn, capsys: pytest.CaptureFixture[str]
) -> None:
    path = restore_xml(pool_of({0: (1, 0)}, {0: (2, 0)}, 100))
    args = {"--snap1": "1", "--snap2": "4"}
    del args[missing]
    flat = [x for kv in args.items() for x in kv]
    assert run(["metadata", "delta", str(path), *flat]) == 2
    assert f"{missing} (or --thin{missing[-1]}) not specified" in capsys.readouterr().err


def _leaf_blocks(path: Path, dev: int) -> list[int]:
    md = ThinMetadata(MemoryBlocks(path.read_bytes()))
    return [leaf.blocknr for leaf in md.mapping_leaves(dev, md.mapping_roots()[dev])]


@pytest.mark.parametrize("changed_only", [False, True])
def test_corrupted_leaf(
    changed_only: bool, restore_xml: RestoreFn, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(1)
    left = random_left(rng, 3000, NR_DATA)
    path = restore_xml(
        pool_of(left, derive(rng, left, NR_DATA, p_diff=0.5, p_drop=0, p_add=0), NR_DATA)
    )
    victim = _leaf_blocks(path, 4)[3]
    image = bytearray(path.read_bytes())
    image[victim * BLOCK_SIZE + 100] ^= 0xFF
    path.write_bytes(image)
    args = ["metadata", "delta", str(path), "--snap1", "1", "--snap2", "4"]
    assert run(args + (["--changed-only"] if changed_only else [])) == 7
    err = capsys.readouterr().err
    assert f"block {victim}" in err and "checksum" in err
    assert "Traceback" not in err


def test_cycle_in_tree_is_reported(restore_xml: RestoreFn, tmp_path: Path) -> None:
    """An internal node pointing at itself must not loop."""
    left = {v: (v, 0) for v in range(3000)}
    path = restore_xml(pool_of(left, {0: (1, 0)}, 10000))
    image = bytearray(path.read_bytes())
    md = ThinMetadata(MemoryBlocks(image))
    root = md.mapping_roots()[1]
    node = read_node(md.source, root, MAPPING_VALUE_SIZE, "t")
    struct.pack_into("<Q", image, root * BLOCK_SIZE + node.values_offset + 8, root)
    block = bytearray(image[root * BLOCK_SIZE : (root + 1) * BLOCK_SIZE])
    seal(block, BTREE_CSUM_XOR)
    image[root * BLOCK_SIZE : (root + 1) * BLOCK_SIZE] = block
    from thinmgr.errors import CorruptMetadataError

    with pytest.raises(CorruptMetadataError) as info:
        compute_delta(ThinMetadata(MemoryBlocks(image)), 1, 4)
    assert info.value.block is not None


def test_runs_iterate_as_tuples(restore_xml: RestoreFn) -> None:
    path = restore_xml(
        pool_of({0: (5, 0), 1: (6, 0), 3: (9, 0)}, {1: (6, 0), 3: (8, 0), 4: (1, 0)}, 100)
    )
    delta = compute_delta(ThinMetadata(MemoryBlocks(path.read_bytes())), 1, 4, verbose=True)
    got = [(r.kind, r.begin, r.length, r.left_data, r.right_data) for r in delta.runs]
    assert got == [
        (DeltaKind.LEFT_ONLY, 0, 1, 5, None),
        (DeltaKind.SAME, 1, 1, 6, 6),
        (DeltaKind.DIFFERENT, 3, 1, 9, 8),
        (DeltaKind.RIGHT_ONLY, 4, 1, None, 1),
    ]
    assert np.all(delta.runs.length > 0)


def test_oracle_disagrees_nowhere_on_subprocess_cli(restore_xml: RestoreFn) -> None:
    """The installed console script, end to end."""
    left, right = _pair("mixed", 21)
    path = restore_xml(pool_of(left, right, NR_DATA))
    result = subprocess.run(
        ["thinmgr", "metadata", "delta", str(path), "--snap1", "1", "--snap2", "4", "--verbose"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == thin_delta(path, 1, 4, "--verbose")


# --------------------------------------------------------------------------- fast paths


def _reseal(image: bytearray, blocknr: int) -> None:
    block = bytearray(image[blocknr * BLOCK_SIZE : (blocknr + 1) * BLOCK_SIZE])
    seal(block, BTREE_CSUM_XOR)
    image[blocknr * BLOCK_SIZE : (blocknr + 1) * BLOCK_SIZE] = block


def test_changed_only_fast_paths_agree_with_full_walk(
    restore_xml: RestoreFn, tmp_path: Path
) -> None:
    """--changed-only compares a node and its copy (same keys) in bulk; the full walk goes
    node by node. Both must find the same changed runs and the same shared subtrees."""
    path, _, _ = shared_pool(restore_xml, tmp_path, 70000, 40, seed=3)
    md = ThinMetadata(MemoryBlocks(path.read_bytes()))
    for verbose in (False, True):
        full = compute_delta(md, 1, 4, verbose=verbose)
        changed = compute_delta(md, 1, 4, verbose=verbose, changed_only=True)
        assert changed.stats.shared_subtrees == full.stats.shared_subtrees
        keep = full.runs.kind != DeltaKind.SAME
        for name in ("kind", "begin", "length", "left_data", "right_data"):
            assert np.array_equal(getattr(changed.runs, name), getattr(full.runs, name)[keep])
        assert len(changed.runs) > 0


@pytest.mark.parametrize("side", [1, 4])
def test_changed_only_checks_key_order_of_changed_leaves(
    side: int, restore_xml: RestoreFn, tmp_path: Path
) -> None:
    """A changed leaf whose keys are out of order (checksum resealed) is reported by block,
    whichever side it is on: the bulk comparison does not skip the check."""
    path, _, _ = shared_pool(restore_xml, tmp_path, 30000, 3, seed=8)
    image = bytearray(path.read_bytes())
    shared = set(_leaf_blocks(path, 1)) & set(_leaf_blocks(path, 4))
    victim = next(b for b in _leaf_blocks(path, side) if b not in shared)
    node = read_node(MemoryBlocks(image), victim, MAPPING_VALUE_SIZE, "t")
    first, second = node.key_list()[:2]
    keys_at = victim * BLOCK_SIZE + 32  # the keys follow the 32-byte node header
    struct.pack_into("<QQ", image, keys_at, second, first)
    _reseal(image, victim)
    from thinmgr.errors import CorruptMetadataError

    with pytest.raises(CorruptMetadataError) as info:
        compute_delta(ThinMetadata(MemoryBlocks(bytes(image))), 1, 4, changed_only=True)
    assert info.value.block == victim
    assert "strictly increasing" in str(info.value)
