"""`metadata ls` against thin_ls 0.9.0, and its JSON against an independent count."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import RestoreFn, run_tool
from tests.support.xmlgen import Device, Pool, random_pool
from thinmgr.cli.app import run
from thinmgr.format.constants import BLOCK_SIZE
from thinmgr.format.ls import LS_FIELDS, human_size
from thinmgr.format.superblock import Superblock

FIELD_LISTS = [
    None,  # thin_ls's default set
    ",".join(LS_FIELDS),
    "DEV,EXCLUSIVE,SHARED,MAPPED",
    "SHARED_BLOCKS,DEV,EXCLUSIVE_BLOCKS",
    "TRANSACTION,SNAP_TIME,CREATE_TIME,MAPPED_SECTORS,EXCLUSIVE_SECTORS,SHARED_SECTORS",
    "MAPPED_BYTES,EXCLUSIVE_BYTES,SHARED_BYTES,DEV,DEV",
]


def ours(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert run(["metadata", "ls", *args]) == 0
    return capsys.readouterr().out


def thin_ls(*args: str | Path) -> str:
    return run_tool("thin_ls", *args).stdout


def pools() -> list[Pool]:
    out = [
        random_pool(seed, nr_devices, per_device, share=share)
        for seed, nr_devices, per_device, share in [
            (1, 3, 300, 0.5),
            (2, 5, 2000, 0.7),
            (3, 1, 50, 0.0),
            (4, 6, 800, 0.9),
        ]
    ]
    # A block mapped twice by one device counts as shared; an empty device; a big
    # data block size for the human-readable sizes.
    twice = Device(2, runs=[(0, 10, 4, 0), (100, 10, 1, 0), (200, 500, 3, 1)])
    out.append(
        Pool(
            devices=[twice, Device(3), Device(8, runs=[(0, 11, 2, 0)])],
            nr_data_blocks=1000,
            data_block_size=384,
        )
    )
    return out


@pytest.mark.parametrize("index", range(5))
def test_text_identical_to_thin_ls(
    index: int, restore_xml: RestoreFn, capsys: pytest.CaptureFixture[str]
) -> None:
    path = restore_xml(pools()[index])
    for fields in FIELD_LISTS:
        option = ["-o", fields] if fields else []
        assert ours(capsys, str(path), *option) == thin_ls(*option, path), fields
        assert ours(capsys, str(path), "--no-headers", *option) == thin_ls(
            "--no-headers", *option, path
        ), fields


def test_metadata_snapshot(restore_xml: RestoreFn, capsys: pytest.CaptureFixture[str]) -> None:
    path = restore_xml(random_pool(8, 3, 500))
    image = bytearray(path.read_bytes())
    sb = Superblock.unpack(image[:BLOCK_SIZE])
    image[1900 * BLOCK_SIZE : 1901 * BLOCK_SIZE] = sb.snapshot_copy(1900).pack()
    image[:BLOCK_SIZE] = replace(sb, held_root=1900).pack()
    path.write_bytes(image)
    fields = ",".join(LS_FIELDS)
    assert ours(capsys, "-m", str(path), "-o", fields) == thin_ls("-m", "-o", fields, path)


def test_json_against_independent_count(
    restore_xml: RestoreFn, capsys: pytest.CaptureFixture[str]
) -> None:
    pool = random_pool(5, 4, 1500, share=0.8)
    path = restore_xml(pool)
    assert run(["--json", "metadata", "ls", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    refs: Counter[int] = Counter()
    blocks_of = {}
    for dev in pool.devices:
        blocks = [d + i for _, d, n, _ in dev.runs for i in range(n)]
        blocks_of[dev.dev_id] = blocks
        refs.update(blocks)
    bytes_per_block = pool.data_block_size * 512
    assert [row["dev"] for row in doc] == sorted(blocks_of)
    for row in doc:
        blocks = blocks_of[row["dev"]]
        exclusive = sum(1 for b in blocks if refs[b] == 1)
        assert row["mapped_blocks"] == len(blocks)
        assert row["exclusive_blocks"] == exclusive
        assert row["shared_blocks"] == len(blocks) - exclusive
        assert row["exclusive_bytes"] == exclusive * bytes_per_block
        assert row["mapped_bytes"] == len(blocks) * bytes_per_block
        dev = next(d for d in pool.devices if d.dev_id == row["dev"])
        assert (row["transaction"], row["creation_time"], row["snap_time"]) == (
            dev.transaction,
            dev.creation_time,
            dev.snap_time,
        )
    assert any(row["shared_blocks"] for row in doc)
    assert any(row["exclusive_blocks"] for row in doc)


@pytest.mark.parametrize(("nr_bytes", "text"), [
    (0, "0"), (64 << 10, "64KiB"), (8192 << 10, "8192KiB"), (8256 << 10, "8MiB"),
    (64000 << 10, "63MiB"), (63488 << 10, "62MiB"), (1048064 << 10, "1024MiB"),
    (1049088 << 10, "1024MiB"), (1049344 << 10, "1024MiB"), (8389120 << 10, "8192MiB"),
    (8704 << 20, "9GiB"), (9472 << 20, "9GiB"), (9728 << 20, "10GiB"),
    (16777088 << 10, "16GiB"),
])  # fmt: skip
def test_human_sizes_as_thin_ls_prints_them(nr_bytes: int, text: str) -> None:
    # Observed from thin_ls 0.9.0's MAPPED column.
    assert human_size(nr_bytes) == text


def test_unknown_field(restore_xml: RestoreFn, capsys: pytest.CaptureFixture[str]) -> None:
    path = restore_xml(random_pool(1, 1, 10))
    assert run(["metadata", "ls", str(path), "-o", "DEV,NOPE"]) == 2
    err = capsys.readouterr().err
    assert "unknown field 'NOPE'" in err
    assert run(["metadata", "ls", str(path), "-o", ""]) == 2


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["metadata", "ls", str(tmp_path / "absent")]) == 3
    assert "no such file" in capsys.readouterr().err
