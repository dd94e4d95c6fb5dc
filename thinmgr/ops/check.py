"""Checking a metadata file or device, and clearing its NEEDS_CHECK flag afterwards."""

from __future__ import annotations

import os
import struct

from thinmgr.errors import CorruptMetadataError, IOFailure
from thinmgr.format.check import (
    DEFAULT_OPTIONS,
    CheckOptions,
    CheckReport,
    Progress,
    check_metadata,
    looks_like_xml,
)
from thinmgr.format.checksum import seal
from thinmgr.format.constants import BLOCK_SIZE, NEEDS_CHECK_FLAG, SUPERBLOCK_CSUM_XOR
from thinmgr.format.superblock import parse_superblock
from thinmgr.ops.sources import MetadataFile, _open_error

_FLAGS = struct.Struct("<I")
_FLAGS_OFFSET = 4


def check_file(
    path: str, options: CheckOptions = DEFAULT_OPTIONS, *, progress: Progress | None = None
) -> CheckReport:
    """Check the metadata at ``path`` (opened read-only)."""
    with MetadataFile(path) as source:
        report = check_metadata(source, options, progress=progress)
    superblock_failed = report.summary.transaction_id is None and report.fatal > 0
    if superblock_failed and looks_like_xml(_head(path)):
        report.looks_like_xml = True
    return report


def _head(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(512)
    except OSError:
        return b""


def clear_needs_check_flag(path: str) -> bool:
    """Rewrite block 0 with NEEDS_CHECK cleared, as ``thin_check --clear-needs-check-flag``.

    Returns whether the flag was set. Only the flags word changes, the checksum is sealed
    again, and the block is written with one 4 KiB pwrite and fsynced: the superblock's
    meaningful bytes lie in its first sector, so a torn write leaves the old or the new one
    (format section 8).
    """
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise _open_error(path, exc) from exc
    try:
        block = bytearray(os.pread(fd, BLOCK_SIZE, 0))
        # Refuses anything that is not a valid superblock: never write over something else.
        parse_superblock(block, 0)
        flags = _FLAGS.unpack_from(block, _FLAGS_OFFSET)[0]
        if not flags & NEEDS_CHECK_FLAG:
            return False
        _FLAGS.pack_into(block, _FLAGS_OFFSET, flags & ~NEEDS_CHECK_FLAG)
        seal(block, SUPERBLOCK_CSUM_XOR)
        if os.pwrite(fd, bytes(block), 0) != BLOCK_SIZE:
            raise IOFailure(f"{path}: short write of the superblock")
        os.fsync(fd)
        return True
    except CorruptMetadataError:
        raise
    except OSError as exc:
        raise IOFailure(f"{path}: cannot rewrite the superblock: {exc.strerror}") from exc
    finally:
        os.close(fd)
