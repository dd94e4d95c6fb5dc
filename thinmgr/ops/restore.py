"""`metadata restore`: thin_dump XML -> metadata file or device, written whole or not at all.

* An existing regular file is rebuilt in a temporary file next to it (same size and mode),
  which then replaces it by rename.
* A block device is built into an anonymous temporary file first; only when the whole new
  metadata is ready are its blocks copied onto the device, fsynced, then the superblock
  (the commit point, format section 8) written and fsynced.
* A target that does not exist is created: ``size`` bytes, or by the kernel's rule of thumb
  (48 bytes per data block, at least 2 MiB, format section 10) with headroom, and never
  smaller than the XML needs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from thinmgr.errors import (
    BusyError,
    ConflictError,
    IOFailure,
    NoSpaceError,
    NotFoundError,
    PermissionDenied,
    ThinmgrError,
    UsageError,
)
from thinmgr.format.checksum import checksum_ok
from thinmgr.format.constants import BLOCK_SIZE, MAX_METADATA_BLOCKS, SUPERBLOCK_CSUM_XOR
from thinmgr.format.restore import MetadataTooSmallError, RestoreSummary, restore
from thinmgr.format.xmlparse import XmlInputError, read_superblock_element
from thinmgr.ops.units import format_size

CHUNK = 1 << 20
MIN_NEW_SIZE = 2 << 20  # the kernel documentation's minimum metadata size
BYTES_PER_DATA_BLOCK = 48  # rule of thumb of thin-provisioning.rst
HEADROOM = 1.25


@dataclass(frozen=True)
class RestoreResult:
    summary: RestoreSummary
    target: str
    created: bool
    size: int


def _os_error(path: str, exc: OSError, what: str) -> ThinmgrError:
    if exc.errno == errno.ENOENT:
        return NotFoundError(f"{path}: no such {what}")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionDenied(f"{path}: permission denied")
    if exc.errno == errno.EISDIR:
        return IOFailure(f"{path}: is a directory", hint=f"Give the {what} itself.")
    if exc.errno == errno.EBUSY:
        return BusyError(f"{path}: device is busy (in use by a pool, mount or other program)")
    return IOFailure(f"{path}: {exc.strerror}")


# -- input ----------------------------------------------------------------------------------


def _check_looks_like_xml(path: str, head: bytes) -> None:
    if len(head) >= BLOCK_SIZE and checksum_ok(head[:BLOCK_SIZE], SUPERBLOCK_CSUM_XOR):
        raise XmlInputError(
            f"{path} is binary thin-pool metadata, not an XML dump",
            hint="Give the XML written by `thinmgr metadata dump` (or thin_dump); to copy "
            "binary metadata, dump it first.",
        )
    if b"\0" in head:
        raise XmlInputError(
            f"{path} is a binary file, not an XML dump",
            hint="Give the XML written by `thinmgr metadata dump` or thin_dump.",
        )


def _chunks(path: str) -> Iterator[bytes]:
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed below; a generator owns it)
    except OSError as exc:
        raise _os_error(path, exc, "XML file") from exc
    with handle:
        try:
            head = handle.read(CHUNK)
        except OSError as exc:
            raise _os_error(path, exc, "XML file") from exc
        _check_looks_like_xml(path, head)
        chunk = head
        while chunk:
            yield chunk
            try:
                chunk = handle.read(CHUNK)
            except OSError as exc:
                raise _os_error(path, exc, "XML file") from exc


def _with_path(path: str, error: XmlInputError) -> XmlInputError:
    return XmlInputError(
        f"{path}, {error.message}" if error.line is not None else f"{path}: {error.message}",
        hint=error.hint,
    )


# -- target ---------------------------------------------------------------------------------


def _holds_thin_metadata(fd: int) -> bool:
    block = os.pread(fd, BLOCK_SIZE, 0)
    return len(block) == BLOCK_SIZE and checksum_ok(block, SUPERBLOCK_CSUM_XOR)


def _refuse_existing(target: str, fd: int, force: bool) -> None:
    if not force and _holds_thin_metadata(fd):
        raise ConflictError(
            f"{target} already holds thin-pool metadata (its superblock checksum is valid)",
            hint="Add --force to overwrite it; take a backup with `thinmgr metadata dump` first.",
        )


def _build(xml: str, fd: int, nr_blocks: int, hold_snapshot: bool) -> RestoreSummary:
    def write_block(blocknr: int, data: bytes | bytearray) -> None:
        os.pwrite(fd, data, blocknr * BLOCK_SIZE)

    try:
        return restore(_chunks(xml), nr_blocks, write_block, hold_snapshot=hold_snapshot)
    except XmlInputError as error:
        raise _with_path(xml, error) from None


def _restore_into_file(
    xml: str,
    target: Path,
    size: int,
    *,
    mode: int | None,
    owner: tuple[int, int] | None,
    hold_snapshot: bool,
) -> RestoreSummary:
    directory = target.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=directory)
    except OSError as exc:
        raise _os_error(str(directory), exc, "directory") from exc
    try:
        try:
            os.ftruncate(fd, size)
            summary = _build(xml, fd, size // BLOCK_SIZE, hold_snapshot)
            if mode is not None:
                os.fchmod(fd, mode)
            if owner is not None:
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, *owner)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return summary


def _restore_into_device(
    xml: str, target: str, fd: int, size: int, hold_snapshot: bool
) -> RestoreSummary:
    written: list[int] = []
    with tempfile.TemporaryFile(prefix="thinmgr-restore.") as scratch:
        sfd = scratch.fileno()

        def write_block(blocknr: int, data: bytes | bytearray) -> None:
            os.pwrite(sfd, data, blocknr * BLOCK_SIZE)
            written.append(blocknr)

        try:
            summary = restore(
                _chunks(xml), size // BLOCK_SIZE, write_block, hold_snapshot=hold_snapshot
            )
        except XmlInputError as error:
            raise _with_path(xml, error) from None
        # The new metadata is complete: only now is the device touched.
        try:
            for blocknr in sorted(set(written) - {0}):
                os.pwrite(fd, os.pread(sfd, BLOCK_SIZE, blocknr * BLOCK_SIZE), blocknr * BLOCK_SIZE)
            os.fsync(fd)
            os.pwrite(fd, os.pread(sfd, BLOCK_SIZE, 0), 0)  # the commit point, last
            os.fsync(fd)
        except OSError as exc:
            raise _os_error(target, exc, "device") from exc
    return summary


def _size_for_new(xml: str) -> int:
    try:
        sb = read_superblock_element(_chunks(xml))
    except XmlInputError as error:
        raise _with_path(xml, error) from None
    wanted = int(max(MIN_NEW_SIZE, BYTES_PER_DATA_BLOCK * sb.nr_data_blocks) * HEADROOM)
    return _clamp_blocks(-(-wanted // (1 << 20)) * (1 << 20))


def _clamp_blocks(size: int) -> int:
    return min(size, MAX_METADATA_BLOCKS * BLOCK_SIZE)


def _too_small(target: str, error: MetadataTooSmallError) -> NoSpaceError:
    need = error.needed_blocks * BLOCK_SIZE
    return NoSpaceError(
        f"{target} is too small: {error.message}",
        hint=f"Give a target of at least {format_size(need)} ({need} bytes).",
    )


def restore_metadata(
    xml: str,
    target: str,
    *,
    size: int | None = None,
    force: bool = False,
    hold_snapshot: bool = False,
) -> RestoreResult:
    """Restore ``xml`` into ``target`` (see the module docstring for the rules)."""
    path = Path(target)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise _os_error(target, exc, "metadata file or device") from exc

    if st is None:
        return _restore_new(xml, path, size, hold_snapshot)
    if size is not None:
        raise UsageError(
            f"{target} exists; --size only sizes a new file",
            hint="Drop --size, or restore to a path that does not exist yet.",
        )
    if stat.S_ISBLK(st.st_mode):
        try:
            fd = os.open(target, os.O_RDWR | os.O_EXCL)
        except OSError as exc:
            raise _os_error(target, exc, "device") from exc
        try:
            dev_size = os.lseek(fd, 0, os.SEEK_END)
            _refuse_existing(target, fd, force)
            try:
                summary = _restore_into_device(xml, target, fd, dev_size, hold_snapshot)
            except MetadataTooSmallError as error:
                raise _too_small(target, error) from None
        finally:
            os.close(fd)
        return RestoreResult(summary, target, False, dev_size)
    if not stat.S_ISREG(st.st_mode):
        raise IOFailure(f"{target}: not a regular file or block device")
    try:
        fd = os.open(target, os.O_RDONLY)
    except OSError as exc:
        raise _os_error(target, exc, "metadata file") from exc
    try:
        _refuse_existing(target, fd, force)
    finally:
        os.close(fd)
    try:
        summary = _restore_into_file(
            xml,
            path,
            st.st_size,
            mode=stat.S_IMODE(st.st_mode),
            owner=(st.st_uid, st.st_gid),
            hold_snapshot=hold_snapshot,
        )
    except MetadataTooSmallError as error:
        raise _too_small(target, error) from None
    return RestoreResult(summary, target, False, st.st_size)


def _restore_new(xml: str, path: Path, size: int | None, hold_snapshot: bool) -> RestoreResult:
    target = str(path)
    if size is not None:
        if size < BLOCK_SIZE:
            raise UsageError(f"--size {size} is smaller than one 4 KiB metadata block")
        try:
            summary = _restore_into_file(
                xml, path, size, mode=None, owner=None, hold_snapshot=hold_snapshot
            )
        except MetadataTooSmallError as error:
            raise _too_small(target, error) from None
        return RestoreResult(summary, target, True, size)
    new_size = _size_for_new(xml)
    for _ in range(3):
        try:
            summary = _restore_into_file(
                xml, path, new_size, mode=None, owner=None, hold_snapshot=hold_snapshot
            )
            return RestoreResult(summary, target, True, new_size)
        except MetadataTooSmallError as error:
            # The rule of thumb was short (many snapshots share data blocks): the failed
            # attempt counted what is needed, so size from that.
            grown = _clamp_blocks(int(error.needed_blocks * BLOCK_SIZE * HEADROOM))
            if grown <= new_size:
                raise _too_small(target, error) from None
            new_size = -(-grown // (1 << 20)) * (1 << 20)
            new_size = _clamp_blocks(new_size)
    raise IOFailure(f"{target}: could not size the new metadata file")
