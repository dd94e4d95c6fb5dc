"""thin-pool / thin status lines and table lines, in the formats dm-thin.c (Linux 6.1) prints."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from thinmgr.engine.base import PoolMode
from thinmgr.engine.kernel.status import parse_pool_status, parse_thin_status
from thinmgr.engine.kernel.tables import (
    PoolFeatures,
    parse_pool_table,
    parse_thin_table,
    pool_table,
    thin_table,
)
from thinmgr.errors import IOFailure, UsageError
from thinmgr.kernel.dm import Target

POOL_LINES = [
    # (line as the kernel prints it, trailing space included, expected fields)
    (
        "0 12/4096 0/4096 - rw discard_passdown queue_if_no_space - 1024 ",
        dict(
            transaction_id=0,
            used_metadata_blocks=12,
            total_metadata_blocks=4096,
            used_data_blocks=0,
            total_data_blocks=4096,
            held_metadata_root=None,
            mode=PoolMode.READ_WRITE,
            error_if_no_space=False,
            needs_check=False,
            metadata_low_watermark=1024,
        ),
    ),
    (
        "7 57/4096 312/4096 57 rw discard_passdown error_if_no_space - 1024 ",
        dict(transaction_id=7, held_metadata_root=57, error_if_no_space=True),
    ),
    (
        "3 20/1024 4096/4096 - out_of_data_space no_discard_passdown error_if_no_space - 256",
        dict(mode=PoolMode.OUT_OF_DATA_SPACE, discard="no_discard_passdown"),
    ),
    (
        "18446744073709551615 1/2 3/4 - ro ignore_discard queue_if_no_space needs_check 0 ",
        dict(
            transaction_id=2**64 - 1,
            mode=PoolMode.READ_ONLY,
            needs_check=True,
            discard="ignore_discard",
            metadata_low_watermark=0,
        ),
    ),
    # 4.2 .. 5.12 kernels: no watermark
    ("1 10/100 5/50 - rw discard_passdown queue_if_no_space - ", dict(metadata_low_watermark=None)),
    # before 4.2: no needs_check either
    ("1 10/100 5/50 - rw discard_passdown queue_if_no_space", dict(needs_check=False)),
]


@pytest.mark.parametrize(("line", "expected"), POOL_LINES)
def test_pool_status_lines(line: str, expected: dict[str, object]) -> None:
    status = parse_pool_status(line)
    assert not status.failed
    for field, value in expected.items():
        assert getattr(status, field) == value, field


@pytest.mark.parametrize("line", ["Fail", "Fail ", "Error"])
def test_pool_failure(line: str) -> None:
    status = parse_pool_status(line)
    assert status.failed and status.mode is PoolMode.FAIL
    assert status.reason == line.strip()


@pytest.mark.parametrize(
    "line",
    [
        "",
        "0 12/4096 0/4096",
        "x 12/4096 0/4096 - rw discard_passdown queue_if_no_space - 1",
        "0 12-4096 0/4096 - rw discard_passdown queue_if_no_space - 1",
        "0 12/4096 0/4096 - fast discard_passdown queue_if_no_space - 1",
        "0 12/4096 0/4096 - rw discard_sometimes queue_if_no_space - 1",
        "0 12/4096 0/4096 - rw discard_passdown panic_if_no_space - 1",
        "0 12/4096 0/4096 - rw discard_passdown queue_if_no_space maybe 1",
        "0 12/4096 0/4096 - rw discard_passdown queue_if_no_space - 1 extra",
        "0 12/4096 0/4096 x rw discard_passdown queue_if_no_space - 1",
    ],
)
def test_pool_status_garbage_is_a_clear_error(line: str) -> None:
    with pytest.raises(IOFailure, match="thin-pool status line"):
        parse_pool_status(line)


@given(
    tid=st.integers(0, 2**64 - 1),
    meta=st.tuples(st.integers(0, 2**32), st.integers(0, 2**32)),
    data=st.tuples(st.integers(0, 2**40), st.integers(0, 2**40)),
    held=st.one_of(st.none(), st.integers(1, 2**32)),
    mode=st.sampled_from(["rw", "ro", "out_of_data_space"]),
    discard=st.sampled_from(["discard_passdown", "no_discard_passdown", "ignore_discard"]),
    error=st.booleans(),
    needs_check=st.booleans(),
    watermark=st.integers(0, 2**32),
)
def test_pool_status_round_trip(
    tid: int,
    meta: tuple[int, int],
    data: tuple[int, int],
    held: int | None,
    mode: str,
    discard: str,
    error: bool,
    needs_check: bool,
    watermark: int,
) -> None:
    line = (
        f"{tid} {meta[0]}/{meta[1]} {data[0]}/{data[1]} {held if held else '-'} {mode} "
        f"{discard} {'error' if error else 'queue'}_if_no_space "
        f"{'needs_check' if needs_check else '-'} {watermark} "
    )
    status = parse_pool_status(line)
    assert (status.transaction_id, status.used_metadata_blocks, status.total_metadata_blocks) == (
        tid,
        *meta,
    )
    assert (status.used_data_blocks, status.total_data_blocks) == data
    assert status.held_metadata_root == held
    assert status.mode.value == mode
    assert status.discard == discard
    assert status.error_if_no_space is error
    assert status.needs_check is needs_check
    assert status.metadata_low_watermark == watermark


def test_thin_status_lines() -> None:
    status = parse_thin_status("2048 4095")
    assert status.mapped_sectors == 2048 and status.highest_mapped_sector == 4095
    assert status.mapped_blocks(128) == 16
    assert status.highest_mapped_block(128) == 31
    empty = parse_thin_status("0 -")
    assert empty.mapped_sectors == 0 and empty.highest_mapped_sector is None
    assert empty.highest_mapped_block(128) is None
    closed = parse_thin_status("-")
    assert not closed.open and not closed.failed
    for line in ("Fail", "Error"):
        failed = parse_thin_status(line)
        assert failed.failed and failed.reason == line


@pytest.mark.parametrize("line", ["", "1", "1 2 3", "a 2", "1 b", "- -"])
def test_thin_status_garbage(line: str) -> None:
    with pytest.raises(IOFailure, match="thin status line"):
        parse_thin_status(line)


# --- tables ----------------------------------------------------------------------------------
def test_pool_table_line_plain() -> None:
    table = pool_table(metadata_dev=(7, 0), data_dev=(7, 1), nr_data_blocks=4096, block_sectors=128)
    assert table.target().line() == "0 524288 thin-pool 7:0 7:1 128 0 0"


def test_pool_table_features_in_kernel_order() -> None:
    features = PoolFeatures(
        error_if_no_space=True, skip_block_zeroing=True, no_discard_passdown=True
    )
    table = pool_table(
        metadata_dev=(254, 3),
        data_dev=(259, 1048575),
        nr_data_blocks=10,
        block_sectors=2097152,
        low_water_mark=5,
        features=features,
    )
    line = table.target().line()
    assert line == (
        "0 20971520 thin-pool 254:3 259:1048575 2097152 5 "
        "3 skip_block_zeroing no_discard_passdown error_if_no_space"
    )
    # what DM_TABLE_STATUS gives back (trailing space from emit_flags) parses to the same
    back = parse_pool_table(Target(0, table.length, "thin-pool", table.target().params + " "))
    assert back == table
    assert back.nr_data_blocks == 10


@pytest.mark.parametrize("block_sectors", [0, 64, 127, 129, 192, 2097152 + 128, 4194304])
def test_pool_table_rejects_bad_block_sizes(block_sectors: int) -> None:
    with pytest.raises(UsageError, match="data block size"):
        pool_table(
            metadata_dev=(7, 0), data_dev=(7, 1), nr_data_blocks=1, block_sectors=block_sectors
        )


def test_pool_table_rejects_empty_pool_and_negative_watermark() -> None:
    with pytest.raises(UsageError):
        pool_table(metadata_dev=(7, 0), data_dev=(7, 1), nr_data_blocks=0, block_sectors=128)
    with pytest.raises(UsageError):
        pool_table(
            metadata_dev=(7, 0),
            data_dev=(7, 1),
            nr_data_blocks=1,
            block_sectors=128,
            low_water_mark=-1,
        )


def test_thin_table() -> None:
    table = thin_table(pool_dev=(254, 0), dev_id=16777215, size_bytes=1 << 30)
    assert table.target().line() == "0 2097152 thin 254:0 16777215"
    assert parse_thin_table(table.target()) == table
    with_origin = parse_thin_table(Target(0, 8, "thin", "254:0 3 7:9"))
    assert with_origin.external_origin == (7, 9)


@pytest.mark.parametrize(
    ("dev_id", "size"), [(-1, 512), (1 << 24, 512), (0, 0), (0, 511), (0, 513)]
)
def test_thin_table_rejects(dev_id: int, size: int) -> None:
    with pytest.raises(UsageError):
        thin_table(pool_dev=(254, 0), dev_id=dev_id, size_bytes=size)


@pytest.mark.parametrize(
    "target",
    [
        Target(0, 8, "linear", "7:0 0"),
        Target(0, 8, "thin-pool", "7:0 7:1 128"),
        Target(0, 8, "thin-pool", "/dev/loop0 7:1 128 0 0"),
        Target(0, 8, "thin-pool", "7:0 7:1 128 0 2 skip_block_zeroing"),
        Target(0, 8, "thin-pool", "7:0 7:1 128 0 1 go_faster"),
    ],
)
def test_pool_table_parse_errors(target: Target) -> None:
    with pytest.raises(IOFailure):
        parse_pool_table(target)
