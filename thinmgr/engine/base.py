"""The Engine protocol: what the manager (``thinmgr.ops``) asks of kernel and user engines.

Both engines serve the same on-disk metadata format and pass one conformance suite. Names
are the domain's (pools, thin devices, volumes); the kernel's (thin-pool messages, tables)
stay inside each engine. Every method raises ``ThinmgrError`` subclasses only.

Device ids are chosen by the caller (the manager allocates them and never reuses one after a
fault); engines only check them against the 24-bit limit of dm-thin.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from thinmgr.format.blocks import BlockSource


class NoSpacePolicy(StrEnum):
    """What a pool does when its data device is full (dm-thin's ``error_if_no_space``)."""

    ERROR = "error"  # fail the write with ENOSPC at once
    QUEUE = "queue"  # hold writes until the pool is extended (the kernel's default, 60 s)


class PoolMode(StrEnum):
    """The modes of the kernel's thin-pool status line."""

    READ_WRITE = "rw"
    OUT_OF_DATA_SPACE = "out_of_data_space"
    READ_ONLY = "ro"
    FAIL = "fail"


@dataclass(frozen=True)
class PoolSpec:
    """Everything an engine needs to find and run a pool.

    ``metadata`` and ``data`` are block devices or regular files; ``run_dir`` is the pool's
    private run-time directory (sockets, FUSE mounts, pid files), created by the manager.
    """

    name: str
    metadata: Path
    data: Path
    run_dir: Path
    data_block_sectors: int = 128
    low_water_mark: int = 0  # data blocks; 0 = engine default
    no_space: NoSpacePolicy = NoSpacePolicy.ERROR


@dataclass(frozen=True)
class PoolStatus:
    transaction_id: int
    data_block_sectors: int
    used_data_blocks: int
    total_data_blocks: int
    used_metadata_blocks: int
    total_metadata_blocks: int
    held_metadata_root: int | None
    mode: PoolMode
    needs_check: bool
    active: bool


@dataclass(frozen=True)
class VolumeStatus:
    dev_id: int
    mapped_blocks: int
    highest_mapped_block: int | None
    active: bool
    device: Path | None  # the block device node while active
    open_count: int  # > 0: something (a mount, a process) holds the device open


@dataclass(frozen=True)
class MetadataView:
    """Read it with ``ThinMetadata(view.source, snap=view.snap)``."""

    source: BlockSource
    snap: bool  # True: read through the held metadata snapshot (a live kernel pool)


class Engine(Protocol):
    """One engine instance serves any number of pools, each given by its ``PoolSpec``."""

    name: str

    # --- pools -------------------------------------------------------------------------
    def format_pool(self, spec: PoolSpec, *, nr_data_blocks: int) -> None:
        """Write fresh, empty metadata (transaction id 0, no devices) onto ``spec.metadata``."""

    def activate_pool(self, spec: PoolSpec) -> None:
        """Make the pool ready for messages and volumes; idempotent."""

    def deactivate_pool(self, spec: PoolSpec) -> None:
        """Commit and stop serving the pool; refused (BusyError) while volumes are active."""

    def pool_status(self, spec: PoolSpec) -> PoolStatus: ...

    def extend_pool(self, spec: PoolSpec, *, nr_data_blocks: int) -> None:
        """Grow the data space to ``nr_data_blocks`` (the data device is already that big)."""

    # --- thin devices (the thin-pool messages) --------------------------------------------
    def create_thin(self, spec: PoolSpec, dev_id: int) -> None: ...

    def create_snapshot(self, spec: PoolSpec, dev_id: int, origin_id: int) -> None:
        """O(1) snapshot; the caller suspends an active origin first (``suspended``)."""

    def delete_thin(self, spec: PoolSpec, dev_id: int) -> None: ...

    def set_transaction_id(self, spec: PoolSpec, current: int, new: int) -> None:
        """Compare-and-swap: ConflictError if the pool's id is not ``current``."""

    def thin_ids(self, spec: PoolSpec) -> set[int]:
        """The device ids the pool metadata holds (what `doctor` compares with the catalog)."""
        ...

    # --- volumes (thin devices as block devices) ------------------------------------------
    def activate_volume(
        self, spec: PoolSpec, dev_id: int, *, name: str, size_bytes: int, read_only: bool
    ) -> Path:
        """Expose the thin device as a block device; returns its stable path. Idempotent."""
        ...

    def deactivate_volume(self, spec: PoolSpec, dev_id: int, *, force: bool = False) -> None:
        """Flush and remove the block device; BusyError while it is open unless ``force``."""

    def resize_volume(self, spec: PoolSpec, dev_id: int, *, size_bytes: int) -> None:
        """Grow an active volume's block device (inactive volumes have no size to change)."""

    def volume_status(self, spec: PoolSpec, dev_id: int) -> VolumeStatus: ...

    def volume_device(self, spec: PoolSpec, dev_id: int) -> Path | None:
        """The block device of an active volume, None when it is inactive.

        The cheap part of ``volume_status`` for the many callers that only ask "active, and
        where": no mapping counts (a walk of the mapping tree for an inactive volume on the
        kernel engine) and no count of openers (a scan of every process's descriptors on
        the user engine)."""
        ...

    def suspended(self, spec: PoolSpec, dev_id: int) -> AbstractContextManager[None]:
        """Hold new I/O to an active volume and flush what is in flight, until exit.

        Used around a snapshot of a live origin (after FIFREEZE of its filesystem)."""
        ...

    def link_path(self, spec: PoolSpec, name: str) -> Path | None:
        """A stable path the engine links an active volume at (the user engine's
        ``/dev/thinmgr/POOL/NAME``), or None when the device node itself is the stable path."""
        ...

    # --- run-time leftovers ------------------------------------------------------------------
    def find_stale(self, spec: PoolSpec, *, fix: bool) -> list[str]:
        """What a killed process of this engine left behind (mounts, loop devices, links);
        with ``fix``, remove it. Used by `thinmgr doctor`."""
        ...

    # --- metadata access for diffs and checks --------------------------------------------
    def release_metadata_snapshot(self, spec: PoolSpec) -> None:
        """Release a metadata snapshot left held (by a crashed reader or another tool);
        a no-op when none is held. Used by `thinmgr doctor --fix`."""

    def metadata_view(self, spec: PoolSpec) -> AbstractContextManager[MetadataView]:
        """A stable view of the committed metadata while the context lasts.

        The kernel engine reserves a metadata snapshot for the duration (always released);
        the user engine commits and serves the committed blocks."""
        ...


def iter_engines() -> Iterator[str]:
    """The engine names thinmgr knows, in `auto`'s order of preference."""
    yield "kernel"
    yield "user"
