"""Parsing of the kernel's ``thin-pool`` and ``thin`` status lines.

Formats as ``pool_status``/``thin_status`` in drivers/md/dm-thin.c (Linux 6.1) print them and
Documentation/admin-guide/device-mapper/thin-provisioning.rst describes them:

thin-pool::

    <transaction id> <used metadata blocks>/<total metadata blocks>
    <used data blocks>/<total data blocks> <held metadata root|->
    ro|rw|out_of_data_space [no_]discard_passdown|ignore_discard
    error_if_no_space|queue_if_no_space needs_check|- <metadata low watermark>

or ``Fail`` when the pool is in failure mode, or ``Error`` when the kernel could not read its
own metadata to answer. Kernels before 4.2 stop after the no-space policy and before 5.13 (or
so) have no watermark; those fields are optional here.

thin::

    <nr mapped sectors> <highest mapped sector|->

or ``Fail`` (the pool failed), ``Error``, or ``-`` when the thin device is not open yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from thinmgr.engine.base import PoolMode
from thinmgr.errors import IOFailure

_MODES = {"rw": PoolMode.READ_WRITE, "ro": PoolMode.READ_ONLY}
_MODES["out_of_data_space"] = PoolMode.OUT_OF_DATA_SPACE
_DISCARD = ("discard_passdown", "no_discard_passdown", "ignore_discard")
_NO_SPACE = ("error_if_no_space", "queue_if_no_space")
_FAILED = ("Fail", "Error")


@dataclass(frozen=True)
class ThinPoolStatusLine:
    """A parsed thin-pool status line; counters are 0 and ``mode`` FAIL when ``failed``."""

    failed: bool
    transaction_id: int = 0
    used_metadata_blocks: int = 0
    total_metadata_blocks: int = 0
    used_data_blocks: int = 0
    total_data_blocks: int = 0
    held_metadata_root: int | None = None
    mode: PoolMode = PoolMode.FAIL
    discard: str = "discard_passdown"
    error_if_no_space: bool = False
    needs_check: bool = False
    metadata_low_watermark: int | None = None
    reason: str = ""  # "Fail" or "Error" when failed


@dataclass(frozen=True)
class ThinStatusLine:
    """A parsed thin status line, in sectors as the kernel prints them."""

    failed: bool
    mapped_sectors: int = 0
    highest_mapped_sector: int | None = None
    open: bool = True  # False for "-": the thin device is not open in the pool yet
    reason: str = ""

    def mapped_blocks(self, block_sectors: int) -> int:
        return self.mapped_sectors // block_sectors

    def highest_mapped_block(self, block_sectors: int) -> int | None:
        if self.highest_mapped_sector is None:
            return None
        # the kernel prints (highest + 1) * sectors_per_block - 1
        return (self.highest_mapped_sector + 1) // block_sectors - 1


def _bad(kind: str, line: str, why: str) -> IOFailure:
    return IOFailure(
        f"unexpected {kind} status line from the kernel ({why}): {line!r}",
        hint="This kernel's dm-thin prints a format thinmgr does not know; please report it.",
    )


def _number(kind: str, line: str, text: str, what: str) -> int:
    if not text.isdigit():
        raise _bad(kind, line, f"{what} is {text!r}, not a number")
    return int(text)


def _fraction(kind: str, line: str, text: str, what: str) -> tuple[int, int]:
    used, slash, total = text.partition("/")
    if not slash:
        raise _bad(kind, line, f"{what} is {text!r}, not USED/TOTAL")
    return _number(kind, line, used, f"used {what}"), _number(kind, line, total, f"total {what}")


def parse_pool_status(line: str) -> ThinPoolStatusLine:
    kind = "thin-pool"
    fields = line.split()
    if len(fields) == 1 and fields[0] in _FAILED:
        return ThinPoolStatusLine(failed=True, reason=fields[0])
    if len(fields) < 7:
        raise _bad(kind, line, f"{len(fields)} fields, at least 7 expected")
    transaction_id = _number(kind, line, fields[0], "transaction id")
    used_meta, total_meta = _fraction(kind, line, fields[1], "metadata blocks")
    used_data, total_data = _fraction(kind, line, fields[2], "data blocks")
    held = None if fields[3] == "-" else _number(kind, line, fields[3], "held metadata root")
    if fields[4] not in _MODES:
        raise _bad(kind, line, f"unknown mode {fields[4]!r}")
    if fields[5] not in _DISCARD:
        raise _bad(kind, line, f"unknown discard setting {fields[5]!r}")
    if fields[6] not in _NO_SPACE:
        raise _bad(kind, line, f"unknown no-space policy {fields[6]!r}")
    needs_check = False
    if len(fields) > 7:
        if fields[7] not in ("needs_check", "-"):
            raise _bad(kind, line, f"expected needs_check or '-', got {fields[7]!r}")
        needs_check = fields[7] == "needs_check"
    watermark = None
    if len(fields) > 8:
        watermark = _number(kind, line, fields[8], "metadata low watermark")
    if len(fields) > 9:
        raise _bad(kind, line, f"{len(fields)} fields, at most 9 expected")
    return ThinPoolStatusLine(
        failed=False,
        transaction_id=transaction_id,
        used_metadata_blocks=used_meta,
        total_metadata_blocks=total_meta,
        used_data_blocks=used_data,
        total_data_blocks=total_data,
        held_metadata_root=held,
        mode=_MODES[fields[4]],
        discard=fields[5],
        error_if_no_space=fields[6] == "error_if_no_space",
        needs_check=needs_check,
        metadata_low_watermark=watermark,
    )


def parse_thin_status(line: str) -> ThinStatusLine:
    kind = "thin"
    fields = line.split()
    if len(fields) == 1 and fields[0] in _FAILED:
        return ThinStatusLine(failed=True, reason=fields[0])
    if fields == ["-"]:
        return ThinStatusLine(failed=False, open=False)
    if len(fields) != 2:
        raise _bad(kind, line, f"{len(fields)} fields, 2 expected")
    mapped = _number(kind, line, fields[0], "mapped sectors")
    highest = None if fields[1] == "-" else _number(kind, line, fields[1], "highest mapped sector")
    return ThinStatusLine(failed=False, mapped_sectors=mapped, highest_mapped_sector=highest)
