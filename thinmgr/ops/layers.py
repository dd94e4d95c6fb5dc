"""`thinmgr layer export` / `layer import`: a volume's blocks as a layer-diff file, and back.

Export reads, from the pool metadata, which blocks the device changed against its parent
(``compute_delta`` with ``changed_only``: shared subtrees are never read) or, without a
parent, every mapped block; the data is read from the pool's data device at the mapped data
blocks, while the engine's metadata view keeps those mappings stable. Blocks mapped in the
parent and unmapped in the device become discard extents.

Parent identity: a file made against a parent carries the parent's *content digest*: the
sha256 of the parent volume's bytes from 0 to its size, unmapped blocks read as zeros (what
``sha256sum`` of the activated volume prints). Import computes the same digest of the
parent it is given and refuses a mismatch, so a layer applies only onto identical content,
on any pool, whatever the block size or the data block placement.

Import checks the whole file (bounds, chunk checksums, whole-file digest, parent) before it
creates anything; then it snapshots the parent (or creates a volume), writes the extents
through the activated volume's block device, and on any failure removes what it created.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from thinmgr.errors import ConflictError, IOFailure, ThinmgrError, UsageError
from thinmgr.format.constants import SECTOR_SIZE
from thinmgr.format.delta import DeltaKind, compute_delta, device_root
from thinmgr.format.dump import leaf_arrays
from thinmgr.format.metadata import ThinMetadata
from thinmgr.layers.diff_format import (
    LayerHeader,
    LayerReader,
    LayerSummary,
    LayerWriter,
    check_parent,
    verify_layer,
)
from thinmgr.ops.diff import DeviceRef, pool_metadata, resolve_devices
from thinmgr.ops.files import atomic_binary_writer
from thinmgr.ops.manager import Manager

READ_SIZE = 8 << 20  # bytes read from the data device at a time
BLKDISCARD = 0x1277  # linux/fs.h _IO(0x12, 119)
_ZEROS = bytes(READ_SIZE)


@dataclass(frozen=True)
class Mapped:
    """A run of virtual blocks mapped to consecutive data blocks."""

    begin: int
    length: int
    data: int


@dataclass(frozen=True)
class Plan:
    """What an export writes, in volume order: data runs (with where the data is) and
    discards (``data`` is None)."""

    runs: list[tuple[int, int, int | None]]  # (begin, length, data block or None)

    def data_blocks(self) -> int:
        return sum(n for _, n, d in self.runs if d is not None)


@dataclass
class LayerResult:
    pool: str
    device: str
    parent: str | None
    file: str
    digest: str
    parent_digest: str | None
    block_size: int
    volume_size: int
    data_extents: int
    discard_extents: int
    data_bytes: int
    discard_bytes: int
    file_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- reading a pool


def mapped_runs(md: ThinMetadata, dev: int) -> list[Mapped]:
    """All of a device's mappings, folded into runs consecutive in virtual and data block."""
    keys, values = leaf_arrays(md.mapping_leaves(dev, device_root(md, dev)))
    if len(keys) == 0:
        return []
    data = values >> np.uint64(24)
    one = np.uint64(1)
    breaks = (np.diff(keys) != one) | (np.diff(data) != one)
    starts = np.flatnonzero(np.concatenate(([True], breaks)))
    lengths = np.diff(np.append(starts, len(keys)))
    return [
        Mapped(b, n, d)
        for b, n, d in zip(
            keys[starts].tolist(), lengths.tolist(), data[starts].tolist(), strict=True
        )
    ]


def change_plan(md: ThinMetadata, parent: int | None, dev: int) -> Plan:
    if parent is None:
        return Plan([(m.begin, m.length, m.data) for m in mapped_runs(md, dev)])
    # verbose: each run's data blocks are consecutive, so a run is one read.
    delta = compute_delta(md, parent, dev, verbose=True, changed_only=True)
    runs: list[tuple[int, int, int | None]] = []
    for run in delta.runs:
        if run.kind == DeltaKind.LEFT_ONLY:
            runs.append((run.begin, run.length, None))
        elif run.kind in (DeltaKind.RIGHT_ONLY, DeltaKind.DIFFERENT):
            runs.append((run.begin, run.length, run.right_data))
    return Plan(runs)


def read_blocks(data_fd: int, block_size: int, data_block: int, length: int) -> Iterator[bytes]:
    start = data_block * block_size
    end = start + length * block_size
    while start < end:
        size = min(READ_SIZE, end - start)
        chunk = os.pread(data_fd, size, start)
        if len(chunk) != size:
            raise IOFailure(
                f"data device ends at byte {start + len(chunk)}, a mapping points at "
                f"byte {start + size - 1}",
                hint="Run `thinmgr pool check` on the pool.",
            )
        yield chunk
        start += size


def _hash_zeros(digest: Any, count: int) -> None:
    view = memoryview(_ZEROS)
    while count > 0:
        step = min(count, len(_ZEROS))
        digest.update(view[:step])
        count -= step


def content_digest(
    md: ThinMetadata, data_fd: int, dev: int, size_bytes: int, block_size: int
) -> bytes:
    """sha256 of the volume's bytes 0..size, unmapped blocks as zeros (see the module doc)."""
    digest = hashlib.sha256()
    position = 0
    for run in mapped_runs(md, dev):
        begin = run.begin * block_size
        if begin >= size_bytes:
            break
        _hash_zeros(digest, begin - position)
        length = min(run.length, -(-(size_bytes - begin) // block_size))
        remaining = size_bytes - begin
        for chunk in read_blocks(data_fd, block_size, run.data, length):
            digest.update(chunk[:remaining])
            remaining -= len(chunk)
        position = min(size_bytes, begin + length * block_size)
    _hash_zeros(digest, size_bytes - position)
    return digest.digest()


@contextlib.contextmanager
def _data_fd(path: Path) -> Iterator[int]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise IOFailure(f"{path}: cannot open the pool's data device ({exc.strerror})") from None
    try:
        yield fd
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- export


def export_layer(
    mgr: Manager,
    pool_name: str,
    device: str,
    output: Path,
    *,
    parent: str | None = None,
    name_by_digest: bool = False,
    level: int = 3,
) -> LayerResult:
    """Writes DEVICE's changes against PARENT (or all its mapped blocks) to ``output``
    atomically; with ``name_by_digest`` ``output`` is a directory and the file is named
    ``<sha256>.thindiff``."""
    if name_by_digest and not output.is_dir():
        raise UsageError(f"{output} is not a directory (needed to name the file by its digest)")
    names = [device] if parent is None else [device, parent]
    with mgr.locked(pool_name):
        h, refs = resolve_devices(mgr, pool_name, *names)
        dev = refs[0]
        parent_ref = refs[1] if parent is not None else None
        if parent_ref is not None and parent_ref.size_bytes != dev.size_bytes:
            raise UsageError(
                f"{device!r} ({dev.size_bytes} bytes) and its parent {parent!r} "
                f"({parent_ref.size_bytes} bytes) differ in size",
                hint="Export it without --parent.",
            )
        with pool_metadata(h) as md, _data_fd(h.spec.data) as data_fd:
            block_size = md.view.data_block_size * SECTOR_SIZE
            parent_digest = (
                None
                if parent_ref is None
                else content_digest(
                    md, data_fd, parent_ref.thin_id, parent_ref.size_bytes, block_size
                )
            )
            plan = change_plan(md, None if parent_ref is None else parent_ref.thin_id, dev.thin_id)
            header = LayerHeader(
                block_size, dev.size_bytes, plan.data_blocks() * block_size, parent_digest
            )
            target = output / ".export.thindiff" if name_by_digest else output
            with atomic_binary_writer(target) as out:
                writer = LayerWriter(out, header, level=level)
                for begin, length, data in plan.runs:
                    if data is None:
                        writer.discard(begin, length)
                    else:
                        writer.data(begin, length, read_blocks(data_fd, block_size, data, length))
                digest = writer.finish()
    final = output / f"{digest}.thindiff" if name_by_digest else output
    if name_by_digest:
        os.replace(target, final)
    with final.open("rb") as stream:
        summary = verify_layer(stream, parent_digest=parent_digest)
    return _result(pool_name, device, parent, final, summary)


@dataclass(frozen=True)
class ChangeDigest:
    """The identity of a device's change against its parent, and its size."""

    digest: str  # hex sha256
    data_bytes: int
    discard_bytes: int


CHANGE_DIGEST_MAGIC = b"thinmgr-change-v1\0"


def change_digest(mgr: Manager, pool_name: str, device: str, *, parent: str | None) -> ChangeDigest:
    """sha256 over DEVICE's change against PARENT: block size, volume size, then each run in
    volume order as (kind, begin, length) with the data of written runs.

    What `commit` keys a layer by (its diff id). Unlike a layer-diff file it needs no
    content digest of the parent (which hashes the parent's whole virtual size, zeros
    included: seconds for a large image): the chain id already names the parent. It reads
    only the changed blocks, found in the metadata (shared subtrees skipped).
    """
    names = [device] if parent is None else [device, parent]
    digest = hashlib.sha256(CHANGE_DIGEST_MAGIC)
    data_bytes = discard_bytes = 0
    with mgr.locked(pool_name):
        h, refs = resolve_devices(mgr, pool_name, *names)
        dev = refs[0]
        parent_dev = refs[1].thin_id if parent is not None else None
        with pool_metadata(h) as md, _data_fd(h.spec.data) as data_fd:
            block_size = md.view.data_block_size * SECTOR_SIZE
            digest.update(struct.pack("<QQ", block_size, dev.size_bytes))
            for begin, length, data in change_plan(md, parent_dev, dev.thin_id).runs:
                kind = b"D" if data is None else b"W"
                digest.update(kind + struct.pack("<QQ", begin, length))
                if data is None:
                    discard_bytes += length * block_size
                    continue
                data_bytes += length * block_size
                for chunk in read_blocks(data_fd, block_size, data, length):
                    digest.update(chunk)
    return ChangeDigest(digest.hexdigest(), data_bytes, discard_bytes)


def _result(pool: str, device: str, parent: str | None, path: Path, s: LayerSummary) -> LayerResult:
    return LayerResult(
        pool=pool,
        device=device,
        parent=parent,
        file=str(path),
        digest=s.digest,
        parent_digest=None if s.header.parent_digest is None else s.header.parent_digest.hex(),
        block_size=s.header.block_size,
        volume_size=s.header.volume_size,
        data_extents=s.data_extents,
        discard_extents=s.discard_extents,
        data_bytes=s.data_bytes,
        discard_bytes=s.discard_bytes,
        file_bytes=s.file_bytes,
    )


# --------------------------------------------------------------------------- import


def _open_layer(path: Path) -> Any:
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such layer-diff file") from None
    except OSError as exc:
        raise IOFailure(f"{path}: {exc.strerror}") from None


def _parent_digest(mgr: Manager, pool_name: str, parent: str) -> tuple[DeviceRef, bytes]:
    with mgr.locked(pool_name):
        h, (ref,) = resolve_devices(mgr, pool_name, parent)
        with pool_metadata(h) as md, _data_fd(h.spec.data) as data_fd:
            block_size = md.view.data_block_size * SECTOR_SIZE
            return ref, content_digest(md, data_fd, ref.thin_id, ref.size_bytes, block_size)


def import_layer(
    mgr: Manager, pool_name: str, file: Path, name: str, *, parent: str | None
) -> LayerResult:
    """Rebuilds a device from a layer-diff file: a snapshot of PARENT plus the file's
    extents (or a new volume holding them). Nothing is created unless the whole file checks
    out; whatever was created is removed if writing fails."""
    from thinmgr.ops.volumes import create_volume

    with _open_layer(file) as stream:
        header = LayerReader(stream).header  # bounds of the header, before anything else
    parent_digest: bytes | None = None
    if parent is not None:
        ref, parent_digest = _parent_digest(mgr, pool_name, parent)
        check_parent(header, parent_digest)
        if ref.size_bytes != header.volume_size:
            raise ConflictError(
                f"the file is for a {header.volume_size}-byte volume, parent {parent!r} "
                f"has {ref.size_bytes} bytes"
            )
    else:
        check_parent(header, None)
    block_bytes = mgr.find(pool_name).spec.data_block_sectors * SECTOR_SIZE
    if header.volume_size % block_bytes:
        raise UsageError(
            f"the file's volume size {header.volume_size} is not a whole number of this "
            f"pool's {block_bytes}-byte data blocks",
            hint="Import it into a pool with a block size that divides the volume size.",
        )
    with _open_layer(file) as stream:
        summary = verify_layer(stream, parent_digest=parent_digest)
    if parent is not None:
        from thinmgr.ops.snapshots import create_snapshot

        create_snapshot(mgr, pool_name, parent, name)
    else:
        create_volume(mgr, pool_name, name, header.volume_size)
    try:
        _apply(mgr, pool_name, name, file, parent_digest)
    except BaseException:
        _remove(mgr, pool_name, name)
        raise
    return _result(pool_name, name, parent, file, summary)


def _apply(
    mgr: Manager, pool_name: str, name: str, file: Path, parent_digest: bytes | None
) -> None:
    from thinmgr.ops.volumes import activate_volume, deactivate_volume

    path = activate_volume(mgr, pool_name, name).path
    if path is None:
        raise IOFailure(f"volume {name!r} has no block device after activation")
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            # A second reading checks everything again as it goes: a file changed since the
            # first pass fails here, and the caller removes the volume.
            with _open_layer(file) as stream:
                reader = LayerReader(stream)
                check_parent(reader.header, parent_digest)
                for piece in reader.pieces():
                    if piece.data is None:
                        size = piece.extent.length * reader.header.block_size
                        _discard(fd, piece.byte_offset, size)
                    else:
                        _pwrite_all(fd, piece.data, piece.byte_offset)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        deactivate_volume(mgr, pool_name, name)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _discard(fd: int, offset: int, size: int) -> None:
    """Unmap the range (BLKDISCARD); where the device cannot discard, write zeros, which
    reads back the same."""
    try:
        fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", offset, size))
        return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
            raise
    end = offset + size
    while offset < end:
        step = min(len(_ZEROS), end - offset)
        _pwrite_all(fd, _ZEROS[:step], offset)
        offset += step


def _remove(mgr: Manager, pool_name: str, name: str) -> None:
    from thinmgr.ops.volumes import remove_volume

    with contextlib.suppress(ThinmgrError):
        remove_volume(mgr, pool_name, name, force=True)
