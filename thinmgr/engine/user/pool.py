"""The user engine's thin pool: dm-thin's pool target in Python, over the kernel's metadata.

``UserPool`` owns one pool: its metadata (a ``PoolMetadata`` transaction over a
``FileBlockStore``) and its data file or device. It serves the thin-pool messages
(create_thin, create_snap, delete, set_transaction_id, reserve/release_metadata_snap), the
status line, data space growth, commits, and the thin volumes (``ThinVolume``) whose data
path follows dm-thin's rules (format sections 5.3, 8).

Every metadata operation and every volume request runs under one lock, so calls may come
from any number of threads. Messages are committed before they return (the kernel commits
them at the next flush or within a second; a manager wants them durable at once).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from thinmgr.engine.base import PoolMode, PoolStatus
from thinmgr.engine.user.store import FileBlockStore, device_size, open_error
from thinmgr.errors import (
    BusyError,
    IOFailure,
    NoSpaceError,
    NotFoundError,
    ThinmgrError,
    UsageError,
)
from thinmgr.format.blocks import BlockSource
from thinmgr.format.constants import (
    MAX_DATA_BLOCK_SECTORS,
    MAX_METADATA_BLOCKS,
    MIN_DATA_BLOCK_SECTORS,
    NEEDS_CHECK_FLAG,
    SECTOR_SIZE,
    THIN_SUPERBLOCK_LOCATION,
)
from thinmgr.format.superblock import parse_superblock
from thinmgr.format.txn import BlockStore, PoolMetadata, format_metadata

if TYPE_CHECKING:
    from thinmgr.engine.user.volume import ThinVolume


class OutOfDataSpaceError(NoSpaceError):
    """The pool has no free data block for a write that needs one (ENOSPC to the writer)."""

    default_hint = "Extend the pool's data device (`thinmgr pool extend`), then retry."


@dataclass
class DeviceCache:
    """What the data path needs of one thin device, kept in step with the metadata.

    ``mappings`` holds every mapping as the packed on-disk value (data block << 24 | time,
    section 4.3); ``snapshotted_time`` decides sharing (section 5.3).
    """

    mappings: dict[int, int]
    snapshotted_time: int


def check_block_sectors(sectors: int) -> None:
    """The kernel's data block size rule (format section 10)."""
    if (
        sectors % MIN_DATA_BLOCK_SECTORS
        or not MIN_DATA_BLOCK_SECTORS <= sectors <= MAX_DATA_BLOCK_SECTORS
    ):
        raise UsageError(
            f"data block size of {sectors} sectors is not supported: it must be a multiple "
            f"of {MIN_DATA_BLOCK_SECTORS} sectors (64 KiB) between 64 KiB and 1 GiB",
            hint="Pick e.g. 128 (64 KiB), 256 (128 KiB) or 2048 (1 MiB) sectors.",
        )


class UserPool:
    """One open pool. Create with ``UserPool.create`` or reopen with ``UserPool.open``."""

    def __init__(self, store: BlockStore, data_fd: int, data_path: str, meta: PoolMetadata) -> None:
        self._store = store
        self._data_fd = data_fd
        self.data_path = data_path
        self._meta = meta
        self.lock = threading.RLock()
        self.block_bytes = meta.data_block_size * SECTOR_SIZE
        self.mode = PoolMode.READ_WRITE
        self._caches: dict[int, DeviceCache] = {}
        self._open_volumes: dict[int, int] = {}
        self._closed = False

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        metadata_path: str | os.PathLike[str],
        data_path: str | os.PathLike[str],
        *,
        data_block_sectors: int = 128,
        nr_metadata_blocks: int | None = None,
        store: BlockStore | None = None,
    ) -> UserPool:
        """Format fresh metadata as the kernel does (``format_metadata``) on an existing,
        sized metadata file or device; the data device's size fixes the number of data
        blocks. ``store`` replaces the metadata file (tests inject faults through it)."""
        check_block_sectors(data_block_sectors)
        store = store if store is not None else FileBlockStore(metadata_path)
        data_fd, data_path_s = _open_data(data_path)
        try:
            nr_data_blocks = device_size(data_fd) // (data_block_sectors * SECTOR_SIZE)
            if nr_data_blocks == 0:
                raise UsageError(
                    f"data device {data_path_s} is smaller than one "
                    f"{data_block_sectors * SECTOR_SIZE}-byte data block"
                )
            nr_meta = min(nr_metadata_blocks or store.nr_blocks, MAX_METADATA_BLOCKS)
            meta = format_metadata(nr_meta, data_block_sectors, nr_data_blocks, store=store)
        except BaseException:
            os.close(data_fd)
            _close_store(store)
            raise
        return cls(store, data_fd, data_path_s, meta)

    @classmethod
    def open(
        cls,
        metadata_path: str | os.PathLike[str],
        data_path: str | os.PathLike[str],
        *,
        data_block_sectors: int | None = None,
        store: BlockStore | None = None,
    ) -> UserPool:
        """Reopen a pool at its last commit. Like the kernel's pool target it refuses a
        different data block size, metadata with NEEDS_CHECK set, and a data device
        smaller than the data space map."""
        store = store if store is not None else FileBlockStore(metadata_path)
        try:
            data_fd, data_path_s = _open_data(data_path)
        except BaseException:
            _close_store(store)
            raise
        try:
            if store.nr_blocks >= 1:
                sb = parse_superblock(
                    store.read_block(THIN_SUPERBLOCK_LOCATION), THIN_SUPERBLOCK_LOCATION
                )
                if data_block_sectors is not None and data_block_sectors != sb.data_block_size:
                    # dm-thin pool_ctr: "changing the data block size is not supported"
                    raise UsageError(
                        f"changing the data block size is not supported: the pool has "
                        f"{sb.data_block_size} sectors, {data_block_sectors} were asked for"
                    )
            meta = PoolMetadata.open(store)  # refuses NEEDS_CHECK
            needed = meta.nr_data_blocks * meta.data_block_size * SECTOR_SIZE
            have = device_size(data_fd)
            if have < needed:
                raise UsageError(
                    f"data device {data_path_s} has {have} bytes, less than the "
                    f"{meta.nr_data_blocks} data blocks ({needed} bytes) the metadata manages",
                    hint="Give the pool its full data device back.",
                )
        except BaseException:
            os.close(data_fd)
            _close_store(store)
            raise
        return cls(store, data_fd, data_path_s, meta)

    def close(self, *, commit: bool = True) -> None:
        """Commit and close the files; refused while volumes are open. ``commit=False``
        drops the open transaction, as a crash would (the last commit stays)."""
        with self.lock:
            if self._closed:
                return
            if commit and any(self._open_volumes.values()):
                raise BusyError(
                    f"thin devices {sorted(d for d, n in self._open_volumes.items() if n)} "
                    "still have open volumes"
                )
            try:
                if commit:
                    self.commit()
            finally:
                self._closed = True
                os.close(self._data_fd)
                _close_store(self._store)

    def __enter__(self) -> UserPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the thin-pool messages ----------------------------------------------------------

    def create_thin(self, dev: int) -> None:
        with self._metadata_op():
            self._meta.create_thin(dev)
            self._commit_locked()

    def create_snap(self, dev: int, origin: int) -> None:
        """O(1) snapshot (section 5.4), committed before returning. The origin's data path
        sees its new snapshotted_time at once, so its next writes break sharing."""
        with self._metadata_op():
            self._meta.create_snap(dev, origin)
            cache = self._caches.get(origin)
            if cache is not None:
                cache.snapshotted_time = self._meta.device_details(origin).snapshotted_time
            self._commit_locked()

    def delete(self, dev: int) -> None:
        with self._metadata_op():
            if self._open_volumes.get(dev):
                raise BusyError(f"thin device {dev} has an open volume")
            self._meta.delete(dev)
            self._caches.pop(dev, None)
            self._commit_locked()

    def set_transaction_id(self, current: int, new: int) -> None:
        with self._metadata_op():
            self._meta.set_transaction_id(current, new)
            self._commit_locked()

    def reserve_metadata_snap(self) -> int:
        """Section 7.1; the held block is named by the superblock from the commit made here."""
        with self._metadata_op():
            self._flush_data()  # reserve commits: data first (section 8)
            held = self._meta.reserve_metadata_snap()
            self._commit_locked()
            return held

    def release_metadata_snap(self) -> None:
        with self._metadata_op():
            self._meta.release_metadata_snap()
            self._commit_locked()

    # -- status --------------------------------------------------------------------------

    def status(self) -> PoolStatus:
        with self.lock:
            meta = self._meta
            sb = meta.committed_superblock
            return PoolStatus(
                transaction_id=meta.transaction_id,
                data_block_sectors=meta.data_block_size,
                used_data_blocks=meta.nr_data_blocks - meta.free_data_blocks,
                total_data_blocks=meta.nr_data_blocks,
                used_metadata_blocks=meta.tm.sm.nr_blocks - meta.free_metadata_blocks,
                total_metadata_blocks=meta.tm.sm.nr_blocks,
                held_metadata_root=meta.held_root or None,
                mode=self.mode,
                needs_check=bool(sb.flags & NEEDS_CHECK_FLAG),
                active=not self._closed,
            )

    def thin_ids(self) -> set[int]:
        with self.lock:
            return set(self._meta.devices())

    def thin_status(self, dev: int) -> tuple[int, int | None]:
        """(mapped blocks, highest mapped virtual block or None), as the thin status line."""
        with self.lock:
            mapped = self._meta.device_details(dev).mapped_blocks
            return mapped, self._meta.highest_mapped_block(dev)

    def mappings(self, dev: int) -> dict[int, int]:
        """Virtual block -> data block of every mapping of ``dev`` (current transaction)."""
        with self.lock:
            return {vblock: packed >> 24 for vblock, packed in self.cache(dev).mappings.items()}

    @property
    def nr_data_blocks(self) -> int:
        return self._meta.nr_data_blocks

    @property
    def metadata(self) -> PoolMetadata:
        """The open transaction (for tests and tools; hold ``lock`` while using it)."""
        return self._meta

    # -- space, commit -------------------------------------------------------------------

    def extend_data(self, nr_data_blocks: int) -> None:
        """Grow the data space map to ``nr_data_blocks`` (the device already has that size)
        and commit; a pool that ran out of data space is read-write again."""
        with self._metadata_op():
            have = device_size(self._data_fd) // self.block_bytes
            if nr_data_blocks > have:
                raise UsageError(
                    f"the data device holds {have} data blocks, fewer than {nr_data_blocks}",
                    hint="Grow the data file or device first.",
                )
            if nr_data_blocks < self._meta.nr_data_blocks:
                raise UsageError(
                    f"cannot shrink the pool's data space from {self._meta.nr_data_blocks} "
                    f"to {nr_data_blocks} blocks (dm-thin refuses it too)"
                )
            self._meta.resize_data_dev(nr_data_blocks)
            self._commit_locked()
            if self.mode is PoolMode.OUT_OF_DATA_SPACE:
                self.mode = PoolMode.READ_WRITE

    def commit(self) -> None:
        """Flush the data device, then commit the metadata (format section 8: data written
        to new blocks is stable before any committed metadata points at it)."""
        with self.lock:
            self._check_open()
            if self.mode in (PoolMode.READ_ONLY, PoolMode.FAIL):
                self._flush_data()  # nothing to commit: the transaction was aborted
                return
            with self._metadata_failure_guard():
                self._commit_locked()

    def committed_source(self) -> BlockSource:
        """A read-only view of the metadata as of a commit made now (for diffs and checks).

        Blocks the committed superblock reaches are not overwritten before the next commit
        (section 5.2), so the view is stable until the pool commits again; take it, read,
        and drop it before the next message or flush."""
        with self.lock:
            self.commit()
            if isinstance(self._store, FileBlockStore):
                return FileBlockStore(self._store.path, read_only=True)
            return self._store

    # -- volumes -------------------------------------------------------------------------

    def volume(self, dev: int, size_bytes: int, *, read_only: bool = False) -> ThinVolume:
        """A ``BlockBackend`` over thin device ``dev`` of ``size_bytes`` (a multiple of 512)."""
        from thinmgr.engine.user.volume import ThinVolume

        if size_bytes <= 0 or size_bytes % SECTOR_SIZE:
            raise UsageError(
                f"volume size {size_bytes} is not a positive multiple of {SECTOR_SIZE} bytes"
            )
        with self.lock:
            self._check_open()
            self.cache(dev)  # NotFoundError now rather than at the first read
            self._open_volumes[dev] = self._open_volumes.get(dev, 0) + 1
        return ThinVolume(self, dev, size_bytes, read_only=read_only)

    def volume_closed(self, dev: int) -> None:
        with self.lock:
            self._open_volumes[dev] = max(0, self._open_volumes.get(dev, 0) - 1)

    # -- what the data path uses (call with ``lock`` held) ---------------------------------

    @property
    def data_fd(self) -> int:
        return self._data_fd

    def cache(self, dev: int) -> DeviceCache:
        """The device's mappings, loaded from the metadata on first use and kept in step
        by ``map_block``/``unmap_block`` afterwards."""
        cache = self._caches.get(dev)
        if cache is None:
            self._check_open()
            details = self._meta.device_details(dev)  # NotFoundError for unknown devices
            mappings: dict[int, int] = {}
            for keys, values in self._meta.mapping_leaves(dev):
                packed = np.frombuffer(b"".join(values), dtype="<u8").tolist()
                mappings.update(zip(keys, packed, strict=True))
            cache = DeviceCache(mappings, details.snapshotted_time)
            self._caches[dev] = cache
        return cache

    def alloc_data_block(self) -> int:
        """``alloc_data_block`` in dm-thin.c: when nothing is free, commit once (blocks freed
        in this transaction become reusable) and retry; still nothing: out of data space."""
        self.check_writable()
        meta = self._meta
        try:
            return meta.alloc_data_block()
        except NoSpaceError:
            if meta.free_data_blocks == 0:
                self._out_of_data_space()
        with self._metadata_failure_guard():
            self._commit_locked()
        try:
            return meta.alloc_data_block()
        except NoSpaceError:
            self._out_of_data_space()
            raise  # unreachable: _out_of_data_space raises

    def map_block(self, dev: int, vblock: int, data_block: int) -> None:
        """Insert a mapping at the current time and mirror it in the cache."""
        with self._metadata_failure_guard():
            self._meta.insert_mapping(dev, vblock, data_block)
        self.cache(dev).mappings[vblock] = (data_block << 24) | self._meta.time

    def unmap_block(self, dev: int, vblock: int) -> None:
        with self._metadata_failure_guard():
            self._meta.remove_mapping(dev, vblock)
        self.cache(dev).mappings.pop(vblock, None)

    def check_writable(self) -> None:
        self._check_open()
        if self.mode in (PoolMode.READ_ONLY, PoolMode.FAIL):
            raise IOFailure(
                f"the pool is in {self.mode.value} mode after a metadata failure: writes are "
                "refused (EIO), reads still work",
                hint="Deactivate the pool and run `thinmgr metadata check` on its metadata.",
            )

    # -- internals -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("the pool is closed")

    def _out_of_data_space(self) -> None:
        self.mode = PoolMode.OUT_OF_DATA_SPACE
        raise OutOfDataSpaceError(
            f"the pool is out of data space: all {self._meta.nr_data_blocks} data blocks "
            "are in use (ENOSPC)"
        )

    def _flush_data(self) -> None:
        try:
            os.fdatasync(self._data_fd)
        except OSError as exc:
            raise IOFailure(f"flushing data device {self.data_path}: {exc}") from exc

    def _commit_locked(self) -> None:
        self._flush_data()
        self._meta.commit()

    @contextmanager
    def _metadata_op(self) -> Iterator[None]:
        """A message: under the lock, on a writable pool, failures handled as the kernel."""
        with self.lock:
            self.check_writable()
            with self._metadata_failure_guard():
                yield

    @contextmanager
    def _metadata_failure_guard(self) -> Iterator[None]:
        """Keep the in-memory transaction consistent when an operation fails midway.

        Refusals raised before anything changed (unknown or existing device, bad id,
        transaction id mismatch, data space full) pass through. Anything else, e.g. a full
        metadata device in the middle of a btree insert, leaves a half-changed
        transaction: like dm-thin's ``metadata_operation_failed`` the transaction is
        aborted (the metadata reopened at the last commit) and the pool turns read-only.
        """
        try:
            yield
        except (NotFoundError, UsageError, BusyError, OutOfDataSpaceError):
            raise
        except ThinmgrError as exc:
            if _is_refusal(exc):
                raise
            self._abort(exc)
            raise
        except OSError as exc:
            self._abort(exc)
            raise IOFailure(f"I/O error on the pool's metadata: {exc}") from exc

    def _abort(self, exc: BaseException) -> None:
        self._caches.clear()
        try:
            self._meta = PoolMetadata.open(self._store)
            self.mode = PoolMode.READ_ONLY
        except (ThinmgrError, OSError):
            self.mode = PoolMode.FAIL


def _is_refusal(exc: ThinmgrError) -> bool:
    """Errors the transaction layer raises before changing anything."""
    from thinmgr.errors import ConflictError

    if isinstance(exc, ConflictError):
        return True
    # The data space map's own "full" error comes before any change; a full *metadata*
    # device (NoSpaceError from the metadata space map) happens midway and is not one.
    return isinstance(exc, NoSpaceError) and "snapshot clock" in exc.message


def _open_data(path: str | os.PathLike[str]) -> tuple[int, str]:
    path_s = os.fspath(path)
    try:
        fd = os.open(path_s, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise open_error(path_s, exc, "data device") from exc
    try:
        device_size(fd)
    except (OSError, UsageError) as exc:
        os.close(fd)
        raise UsageError(f"data device {path_s} is not a regular file or block device") from exc
    return fd, path_s


def _close_store(store: BlockStore) -> None:
    close = getattr(store, "close", None)
    if callable(close):
        close()
