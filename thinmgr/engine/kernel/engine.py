"""``KernelEngine``: the Engine protocol served by the kernel's ``thin-pool`` and ``thin`` targets.

Everything goes through DM ioctls (``thinmgr.kernel.dm``), never dmsetup. Device-mapper names:

* pool: ``thinmgr-<pool>-tpool`` with uuid ``THINMGR-POOL-<pool>`` (private: no blkid probing);
* volume: ``thinmgr-<pool>-<name>`` for the name the manager gives, with uuid
  ``THINMGR-THIN-<pool>-<dev id>``; the uuid is how a volume is found again from its device id.

File-backed pools run on loop devices attached with autoclear: the pool table holds them open,
so they go away by themselves when the pool is removed, and a crash leaks nothing once the
pool device is gone. Tables name every device by major:minor.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from thinmgr.engine.base import (
    MetadataView,
    NoSpacePolicy,
    PoolMode,
    PoolSpec,
    PoolStatus,
    VolumeStatus,
)
from thinmgr.engine.kernel.status import parse_pool_status, parse_thin_status
from thinmgr.engine.kernel.tables import (
    SECTOR_SIZE,
    DevNo,
    PoolFeatures,
    PoolTable,
    check_block_sectors,
    check_dev_id,
    parse_pool_table,
    parse_thin_table,
    pool_table,
    thin_table,
)
from thinmgr.errors import (
    BusyError,
    ConflictError,
    IOFailure,
    NotFoundError,
    ThinmgrError,
    UsageError,
)
from thinmgr.format.constants import BLOCK_SIZE, NEEDS_CHECK_FLAG, THIN_SUPERBLOCK_LOCATION
from thinmgr.format.metadata import ThinMetadata
from thinmgr.kernel import loop
from thinmgr.kernel.devnodes import MAPPER_DIR, ensure_node, node_path, remove_node
from thinmgr.kernel.dm import (
    CONTROL_PATH,
    UDEV_PRIVATE,
    UDEV_VISIBLE,
    DeviceInfo,
    DMControl,
    Target,
)
from thinmgr.kernel.errno_map import kernel_error
from thinmgr.kernel.files import drop_block_cache


@dataclass(frozen=True)
class Availability:
    """Whether this host can run the kernel engine, and why (not)."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


def pool_dm_name(spec: PoolSpec) -> str:
    return f"thinmgr-{spec.name}-tpool"


def pool_uuid(spec: PoolSpec) -> str:
    return f"THINMGR-POOL-{spec.name}"


def volume_dm_name(spec: PoolSpec, name: str) -> str:
    """The device-mapper name of a volume: ``thinmgr-<pool>-<volume>`` (names are global)."""
    return f"thinmgr-{spec.name}-{name}"


def volume_uuid(spec: PoolSpec, dev_id: int) -> str:
    return f"THINMGR-THIN-{spec.name}-{dev_id}"


def _errno_of(exc: ThinmgrError) -> int | None:
    cause = exc.__cause__
    return cause.errno if isinstance(cause, OSError) else None


# --- reading metadata without the page-cache pitfalls ----------------------------------------
class _PreadBlocks:
    """A metadata file or device as a ``BlockSource``, read with pread.

    A regular file behind a (buffered) loop device shares its page cache with the kernel's
    writes. A block device does not: dm-bufio writes bypass its page cache, so that cache is
    dropped first (BLKFLSBUF, then POSIX_FADV_DONTNEED) and nothing is memory-mapped.
    """

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise kernel_error(f"open the pool metadata {self.path}", exc) from exc
        try:
            st = os.fstat(self._fd)
            if stat.S_ISBLK(st.st_mode):
                with contextlib.suppress(OSError):
                    drop_block_cache(self._fd)
                size = os.lseek(self._fd, 0, os.SEEK_END)
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                size = st.st_size
        except OSError as exc:
            os.close(self._fd)
            raise kernel_error(f"inspect the pool metadata {self.path}", exc) from exc
        self._nr = size // BLOCK_SIZE

    @property
    def nr_blocks(self) -> int:
        return self._nr

    def read_block(self, blocknr: int) -> bytes:
        try:
            data = os.pread(self._fd, BLOCK_SIZE, blocknr * BLOCK_SIZE)
        except OSError as exc:
            raise kernel_error(f"read block {blocknr} of {self.path}", exc) from exc
        if len(data) != BLOCK_SIZE:
            raise IOFailure(f"short read of block {blocknr} of {self.path}")
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _device_size(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise kernel_error(f"open {path}", exc) from exc
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


@dataclass
class _Backing:
    """A pool's metadata or data device as a table names it; ``fd`` holds a fresh loop."""

    dev: DevNo
    fd: int | None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # autoclear: the loop now lives exactly as long as the table
            self.fd = None


def _direct_io_works(path: Path) -> bool:
    """Whether ``path`` really serves O_DIRECT reads (one aligned 4 KiB read at offset 0).

    The loop driver turns direct I/O on whenever the file's address space has a
    ``direct_IO`` operation (Linux 6.1 ``__loop_update_dio``). overlayfs has a no-op one, so a
    file on overlayfs over tmpfs (the lab guest's root, many containers) gets a direct-I/O
    loop whose every request then fails with EIO in tmpfs (no O_DIRECT before Linux 6.6);
    dm-thin sees that as a failed data write. Only a real read tells the two apart."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        buf = mmap.mmap(-1, mmap.PAGESIZE)  # page-aligned, as O_DIRECT wants
        try:
            os.preadv(fd, [buf], 0)
        except OSError:
            return False
        finally:
            buf.close()
        return True
    finally:
        os.close(fd)


def _attach_backing(path: Path, *, direct_io: bool) -> _Backing:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise kernel_error(f"find the pool device {path}", exc) from exc
    if stat.S_ISBLK(st.st_mode):
        return _Backing((os.major(st.st_rdev), os.minor(st.st_rdev)), None)
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path} is neither a block device nor a regular file")
    direct_io = direct_io and _direct_io_works(path)
    try:
        attached = loop.attach(path, autoclear=True, direct_io=direct_io)
    except ThinmgrError:
        if not direct_io:
            raise
        attached = loop.attach(path, autoclear=True)  # the file system cannot do O_DIRECT
    rdev = os.fstat(attached.fd).st_rdev
    return _Backing((os.major(rdev), os.minor(rdev)), attached.fd)


def _loop_device_of(dev: DevNo) -> str | None:
    """``/dev/loopN`` when major:minor is a loop device, else None."""
    try:
        target = os.readlink(f"/sys/dev/block/{dev[0]}:{dev[1]}")
    except OSError:
        return None
    name = os.path.basename(target)
    return f"/dev/{name}" if name.startswith("loop") else None


class KernelEngine:
    """The Engine protocol on dm-thin. One instance serves any number of pools."""

    name = "kernel"

    def __init__(
        self,
        *,
        control_path: str = CONTROL_PATH,
        mapper_dir: Path = MAPPER_DIR,
        skip_block_zeroing: bool = False,
        discard_passdown: bool = True,
    ) -> None:
        self.control_path = control_path
        self.mapper_dir = mapper_dir
        self.skip_block_zeroing = skip_block_zeroing
        self.discard_passdown = discard_passdown
        self._control: DMControl | None = None

    # --- availability ------------------------------------------------------------------------
    @staticmethod
    def available(control_path: str = CONTROL_PATH) -> Availability:
        """Cheap check for ``--engine auto``: device-mapper present, thin-pool loadable."""
        if not os.path.exists(control_path):
            return Availability(
                False,
                f"{control_path} does not exist: this kernel has no device-mapper "
                "(dm_mod not built or not loaded)",
            )
        try:
            with DMControl(control_path) as dm:
                version = dm.version()
                target = dm.target_version("thin-pool")
        except ThinmgrError as exc:
            return Availability(False, f"device-mapper is not usable: {exc}")
        if target is None:
            return Availability(
                False,
                "device-mapper has no thin-pool target (the dm-thin-pool module is missing)",
            )
        dm_version = ".".join(map(str, version))
        thin_version = ".".join(map(str, target.version))
        return Availability(True, f"device-mapper {dm_version}, thin-pool {thin_version}")

    @property
    def dm(self) -> DMControl:
        if self._control is None:
            self._control = DMControl(self.control_path)
        return self._control

    def close(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None

    # --- helpers -----------------------------------------------------------------------------
    def _features(self, spec: PoolSpec) -> PoolFeatures:
        return PoolFeatures(
            skip_block_zeroing=self.skip_block_zeroing,
            no_discard_passdown=not self.discard_passdown,
            error_if_no_space=spec.no_space == NoSpacePolicy.ERROR,
        )

    def _pool_info(self, spec: PoolSpec) -> DeviceInfo | None:
        info = self.dm.find(uuid=pool_uuid(spec))
        return info if info is not None and info.has_active_table else None

    def _active_pool(self, spec: PoolSpec) -> DeviceInfo:
        """The pool's device, activating the pool first when needed."""
        info = self.dm.find(uuid=pool_uuid(spec))
        if info is None or not info.has_active_table:
            self.activate_pool(spec)
            info = self.dm.info(uuid=pool_uuid(spec))
        return info

    def _pool_table(self, info: DeviceInfo) -> PoolTable:
        targets = self.dm.table(info.name)
        if len(targets) != 1:
            raise IOFailure(f"{info.name} has {len(targets)} targets, one thin-pool expected")
        return parse_pool_table(targets[0])

    def _volume(self, spec: PoolSpec, dev_id: int) -> DeviceInfo | None:
        return self.dm.find(uuid=volume_uuid(spec, dev_id))

    def _volumes(self, spec: PoolSpec) -> list[DeviceInfo]:
        prefix = volume_uuid(spec, 0)[:-1]
        found = []
        for listed in self.dm.list_devices():
            info = self.dm.find(listed.name)
            if info is not None and info.uuid.startswith(prefix):
                found.append(info)
        return found

    def _message(self, spec: PoolSpec, message: str) -> None:
        info = self._active_pool(spec)
        try:
            self.dm.message(info.name, message)
        except ThinmgrError as exc:
            raise self._message_error(spec, message, exc) from exc

    @staticmethod
    def _message_error(spec: PoolSpec, message: str, exc: ThinmgrError) -> ThinmgrError:
        code = _errno_of(exc)
        words = message.split()
        where = f"pool {spec.name}"
        if code == errno.EEXIST:
            return ConflictError(f"{where}: thin device {words[1]} already exists ({message})")
        if code == errno.ENODATA:
            return NotFoundError(f"{where}: no such thin device ({message})")
        if code == errno.EBUSY:
            return BusyError(f"{where}: '{message}' refused: device or snapshot busy")
        return exc

    def _read_superblock_source(self, spec: PoolSpec) -> ThinMetadata:
        source = _PreadBlocks(spec.metadata)
        try:
            return ThinMetadata(source)
        finally:
            source.close()  # the superblock is parsed; nothing else is read

    # --- pools -------------------------------------------------------------------------------
    def format_pool(self, spec: PoolSpec, *, nr_data_blocks: int) -> None:
        """Zero the superblock, then let the kernel format it: dm-thin writes fresh metadata
        (transaction 0, no devices) when it finds block 0 all zeroes (``__open_or_format``)."""
        check_block_sectors(spec.data_block_sectors)
        if self.dm.find(uuid=pool_uuid(spec)) is not None:
            raise BusyError(f"pool {spec.name} is active: deactivate it before formatting")
        need = nr_data_blocks * spec.data_block_sectors * SECTOR_SIZE
        if _device_size(spec.data) < need:
            raise UsageError(
                f"data device {spec.data} is smaller than {nr_data_blocks} blocks ({need} bytes)"
            )
        try:
            fd = os.open(spec.metadata, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.pwrite(fd, bytes(BLOCK_SIZE), THIN_SUPERBLOCK_LOCATION * BLOCK_SIZE)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise kernel_error(f"clear the metadata superblock of {spec.metadata}", exc) from exc
        self._activate(spec, nr_data_blocks)
        self.deactivate_pool(spec)

    def activate_pool(self, spec: PoolSpec) -> None:
        info = self.dm.find(uuid=pool_uuid(spec))
        if info is not None and info.has_active_table:
            return
        if info is not None:  # a half-made device from an interrupted activation
            self.dm.remove(info.name, udev_flags=UDEV_PRIVATE)
        # The size the pool was last given, from the metadata; new pools take the data device.
        recorded = self._read_superblock_source(spec).superblock.data_sm.nr_blocks
        block_bytes = spec.data_block_sectors * SECTOR_SIZE
        available = _device_size(spec.data) // block_bytes
        if recorded > available:
            raise UsageError(
                f"data device {spec.data} holds {available} blocks but pool {spec.name} "
                f"has {recorded}",
                hint="A pool cannot shrink: restore the data device's size.",
            )
        self._activate(spec, recorded or available)

    def _activate(self, spec: PoolSpec, nr_data_blocks: int) -> None:
        name = pool_dm_name(spec)
        metadata = _attach_backing(spec.metadata, direct_io=False)
        try:
            data = _attach_backing(spec.data, direct_io=True)
        except BaseException:
            metadata.release()
            raise
        try:
            table = pool_table(
                metadata_dev=metadata.dev,
                data_dev=data.dev,
                nr_data_blocks=nr_data_blocks,
                block_sectors=spec.data_block_sectors,
                low_water_mark=spec.low_water_mark,
                features=self._features(spec),
            )
            self.dm.create(name, uuid=pool_uuid(spec))
            try:
                self.dm.load_table(name, [table.target()])
                self.dm.resume(name, udev_flags=UDEV_PRIVATE)
            except BaseException:
                with contextlib.suppress(ThinmgrError):
                    self.dm.remove(name, udev_flags=UDEV_PRIVATE)
                raise
        finally:
            metadata.release()
            data.release()

    def deactivate_pool(self, spec: PoolSpec) -> None:
        info = self.dm.find(uuid=pool_uuid(spec))
        if info is None:
            return
        volumes = self._volumes(spec)
        if volumes:
            names = ", ".join(v.name for v in volumes)
            raise BusyError(
                f"pool {spec.name} still has active volumes: {names}",
                hint="Deactivate its volumes first.",
            )
        if info.open_count:
            raise BusyError(f"pool {spec.name} ({info.name}) is held open by another user")
        self.dm.remove(info.name, udev_flags=UDEV_PRIVATE)  # dm-thin commits on the way out

    def pool_status(self, spec: PoolSpec) -> PoolStatus:
        info = self.dm.find(uuid=pool_uuid(spec))
        if info is None or not info.has_active_table:
            return self._inactive_pool_status(spec)
        table = self._pool_table(info)
        line = parse_pool_status(self.dm.status(info.name)[0].params)
        return PoolStatus(
            transaction_id=line.transaction_id,
            data_block_sectors=table.block_sectors,
            used_data_blocks=line.used_data_blocks,
            total_data_blocks=line.total_data_blocks,
            used_metadata_blocks=line.used_metadata_blocks,
            total_metadata_blocks=line.total_metadata_blocks,
            held_metadata_root=line.held_metadata_root,
            mode=line.mode,
            needs_check=line.needs_check,
            active=True,
        )

    def _inactive_pool_status(self, spec: PoolSpec) -> PoolStatus:
        sb = self._read_superblock_source(spec).superblock
        return PoolStatus(
            transaction_id=sb.trans_id,
            data_block_sectors=sb.data_block_size,
            used_data_blocks=sb.data_sm.nr_allocated,
            total_data_blocks=sb.data_sm.nr_blocks,
            used_metadata_blocks=sb.metadata_sm.nr_allocated,
            total_metadata_blocks=sb.metadata_sm.nr_blocks,
            held_metadata_root=sb.held_root or None,
            mode=PoolMode.READ_WRITE,
            needs_check=bool(sb.flags & NEEDS_CHECK_FLAG),
            active=False,
        )

    def extend_pool(self, spec: PoolSpec, *, nr_data_blocks: int) -> None:
        """Reload the pool table with the new length; dm-thin grows its data space map when
        the new table is resumed (``pool_preresume``). Inactive pools are grown the same way
        and deactivated again."""
        was_active = self._pool_info(spec) is not None
        info = self._active_pool(spec)
        try:
            table = self._pool_table(info)
            if nr_data_blocks < table.nr_data_blocks:
                raise UsageError(
                    f"pool {spec.name} has {table.nr_data_blocks} data blocks; "
                    "dm-thin pools cannot shrink"
                )
            if nr_data_blocks == table.nr_data_blocks:
                return
            self._refresh_loop_capacity(table.data_dev)
            need = nr_data_blocks * table.block_sectors * SECTOR_SIZE
            if _device_size(spec.data) < need:
                raise UsageError(f"data device {spec.data} is smaller than {need} bytes")
            grown = pool_table(
                metadata_dev=table.metadata_dev,
                data_dev=table.data_dev,
                nr_data_blocks=nr_data_blocks,
                block_sectors=table.block_sectors,
                low_water_mark=table.low_water_mark,
                features=table.features,
            )
            self.dm.load_table(info.name, [grown.target()])
            self.dm.resume(info.name, udev_flags=UDEV_PRIVATE)
        finally:
            if not was_active:
                self.deactivate_pool(spec)

    @staticmethod
    def _refresh_loop_capacity(dev: DevNo) -> None:
        device = _loop_device_of(dev)
        if device is None:
            return
        fd = loop.open_device(device)
        try:
            loop.set_capacity(fd, device)
        finally:
            os.close(fd)

    # --- thin devices ------------------------------------------------------------------------
    def create_thin(self, spec: PoolSpec, dev_id: int) -> None:
        check_dev_id(dev_id)
        self._message(spec, f"create_thin {dev_id}")

    def create_snapshot(self, spec: PoolSpec, dev_id: int, origin_id: int) -> None:
        """An active origin that is not suspended yet is suspended around the message (the
        kernel requires it: unsuspended I/O could race the sharing of its mappings)."""
        check_dev_id(dev_id)
        check_dev_id(origin_id)
        with self.suspended(spec, origin_id):
            self._message(spec, f"create_snap {dev_id} {origin_id}")

    def delete_thin(self, spec: PoolSpec, dev_id: int) -> None:
        check_dev_id(dev_id)
        volume = self._volume(spec, dev_id)
        if volume is not None:
            raise BusyError(
                f"thin device {dev_id} of pool {spec.name} is active as {volume.name}",
                hint="Deactivate the volume first.",
            )
        self._message(spec, f"delete {dev_id}")

    def set_transaction_id(self, spec: PoolSpec, current: int, new: int) -> None:
        try:
            self._message(spec, f"set_transaction_id {current} {new}")
        except ThinmgrError as exc:
            actual = self.pool_status(spec).transaction_id
            if actual != current:
                raise ConflictError(
                    f"pool {spec.name} is at transaction {actual}, not {current}",
                    hint="Another writer changed the pool: run `thinmgr doctor`.",
                ) from exc
            raise

    def thin_ids(self, spec: PoolSpec) -> set[int]:
        with self.metadata_view(spec) as view:
            return set(ThinMetadata(view.source, snap=view.snap).device_details())

    # --- volumes -----------------------------------------------------------------------------
    def activate_volume(
        self, spec: PoolSpec, dev_id: int, *, name: str, size_bytes: int, read_only: bool
    ) -> Path:
        pool = self._active_pool(spec)
        # Device-mapper names are global: prefix the pool so two pools' volumes never clash.
        name = volume_dm_name(spec, name)
        existing = self._volume(spec, dev_id)
        if existing is not None and existing.has_active_table:
            if existing.name != name:
                raise ConflictError(
                    f"thin device {dev_id} of pool {spec.name} is already active as "
                    f"{existing.name}, not {name}"
                )
            return ensure_node(name, existing.major, existing.minor, mapper_dir=self.mapper_dir)
        if existing is not None:  # half-made by an interrupted activation
            self.dm.remove(existing.name)
        table = thin_table(pool_dev=(pool.major, pool.minor), dev_id=dev_id, size_bytes=size_bytes)
        self.dm.create(name, uuid=volume_uuid(spec, dev_id), read_only=read_only)
        try:
            try:
                self.dm.load_table(name, [table.target()], read_only=read_only)
            except ThinmgrError as exc:
                if _errno_of(exc) == errno.ENODATA:  # thin_ctr: "Couldn't open thin device"
                    raise NotFoundError(f"pool {spec.name} has no thin device {dev_id}") from exc
                raise
            info = self.dm.resume(name, udev_flags=UDEV_VISIBLE)
        except BaseException:
            with contextlib.suppress(ThinmgrError):
                self.dm.remove(name)
            raise
        return ensure_node(name, info.major, info.minor, mapper_dir=self.mapper_dir)

    def deactivate_volume(self, spec: PoolSpec, dev_id: int, *, force: bool = False) -> None:
        info = self._volume(spec, dev_id)
        if info is None:
            return
        if info.open_count and not force:
            raise BusyError(
                f"volume {info.name} is open ({info.open_count} openers)",
                hint="Unmount it or stop what uses it, or deactivate with force.",
            )
        if info.open_count:
            # What `dmsetup remove --force` does: swap in an error table so the holders' I/O
            # fails and the thin device is released, then remove once the last one closes.
            self.dm.load_table(info.name, [Target(0, self._length(info), "error", "")])
            self.dm.resume(info.name, lockfs=False)
            self.dm.remove(info.name, deferred=True)
        else:
            if info.suspended:
                self.dm.resume(info.name)
            self.dm.remove(info.name)
        remove_node(info.name, info.major, info.minor, mapper_dir=self.mapper_dir)

    def _length(self, info: DeviceInfo) -> int:
        return sum(t.length for t in self.dm.table(info.name))

    def resize_volume(self, spec: PoolSpec, dev_id: int, *, size_bytes: int) -> None:
        info = self._volume(spec, dev_id)
        if info is None:
            raise NotFoundError(f"thin device {dev_id} of pool {spec.name} is not active")
        current = parse_thin_table(self.dm.table(info.name)[0])
        grown = thin_table(pool_dev=current.pool_dev, dev_id=dev_id, size_bytes=size_bytes)
        if grown.length < current.length:
            raise UsageError(f"volume {info.name} cannot shrink ({current.length} sectors now)")
        if grown.length == current.length:
            return
        self.dm.load_table(info.name, [grown.target()], read_only=info.read_only)
        self.dm.resume(info.name, lockfs=False)

    def volume_device(self, spec: PoolSpec, dev_id: int) -> Path | None:
        check_dev_id(dev_id)
        info = self._volume(spec, dev_id)
        if info is None or not info.has_active_table:
            return None
        return node_path(info.name, self.mapper_dir)

    def volume_status(self, spec: PoolSpec, dev_id: int) -> VolumeStatus:
        check_dev_id(dev_id)
        info = self._volume(spec, dev_id)
        if info is not None and info.has_active_table:
            pool = self._pool_info(spec)
            if pool is None:
                raise NotFoundError(f"pool {spec.name} is not active")
            block_sectors = self._pool_table(pool).block_sectors
            line = parse_thin_status(self.dm.status(info.name)[0].params)
            if line.failed:
                raise IOFailure(f"volume {info.name}: the pool has failed ({line.reason})")
            return VolumeStatus(
                dev_id=dev_id,
                mapped_blocks=line.mapped_blocks(block_sectors),
                highest_mapped_block=line.highest_mapped_block(block_sectors),
                active=True,
                device=node_path(info.name, self.mapper_dir),
                open_count=info.open_count,
            )
        with self.metadata_view(spec) as view:
            md = ThinMetadata(view.source, snap=view.snap)
            devices = md.devices()
            if dev_id not in devices:
                raise NotFoundError(f"pool {spec.name} has no thin device {dev_id}")
            details, root = devices[dev_id]
            highest = None
            for leaf in md.mapping_leaves(dev_id, root):
                keys = leaf.key_list()
                if keys:
                    highest = keys[-1]
        return VolumeStatus(dev_id, details.mapped_blocks, highest, False, None, 0)

    @contextlib.contextmanager
    def _suspend_volume(
        self, spec: PoolSpec, dev_id: int, *, lockfs: bool = True
    ) -> Iterator[None]:
        info = self._volume(spec, dev_id)
        if info is None or not info.has_active_table or info.suspended:
            yield  # nothing to hold, or the caller already holds it
            return
        self.dm.suspend(info.name, lockfs=lockfs)  # lockfs: a mounted file system is frozen first
        try:
            yield
        finally:
            self.dm.resume(info.name)

    def suspended(self, spec: PoolSpec, dev_id: int) -> AbstractContextManager[None]:
        # The caller (ops/snapshots.py) has already frozen a mounted file system with FIFREEZE:
        # DM's own lockfs would freeze it a second time, which the kernel refuses with EBUSY
        # (freeze_super on a frozen super block; seen on 6.1 in the lab).
        return self._suspend_volume(spec, dev_id, lockfs=False)

    # --- metadata ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _view(self, spec: PoolSpec) -> Iterator[MetadataView]:
        pool = self._pool_info(spec)
        if pool is None:  # nothing writes the metadata of an inactive pool
            source = _PreadBlocks(spec.metadata)
            try:
                yield MetadataView(source, snap=False)
            finally:
                source.close()
            return
        try:
            self.dm.message(pool.name, "reserve_metadata_snap")  # the kernel commits first
        except ThinmgrError as exc:
            if _errno_of(exc) == errno.EBUSY:
                raise BusyError(
                    f"pool {spec.name} already holds a metadata snapshot",
                    hint=f"Release it: `dmsetup message {pool.name} 0 release_metadata_snap`.",
                ) from exc
            raise
        try:
            source = _PreadBlocks(spec.metadata)
            try:
                yield MetadataView(source, snap=True)
            finally:
                source.close()
        finally:
            self.dm.message(pool.name, "release_metadata_snap")

    def metadata_view(self, spec: PoolSpec) -> AbstractContextManager[MetadataView]:
        return self._view(spec)

    def release_metadata_snapshot(self, spec: PoolSpec) -> None:
        """Release a metadata snapshot left held (`doctor --fix`); a no-op when none is.

        The held root lives in the superblock, so it outlasts a deactivation: an inactive pool
        that holds one is activated just long enough to send ``release_metadata_snap``."""
        if self._pool_info(spec) is not None:
            if self.pool_status(spec).held_metadata_root is not None:
                self._message(spec, "release_metadata_snap")
            return
        if not self._read_superblock_source(spec).superblock.held_root:
            return
        self.activate_pool(spec)
        try:
            self._message(spec, "release_metadata_snap")
        finally:
            self.deactivate_pool(spec)

    def link_path(self, spec: PoolSpec, name: str) -> Path | None:
        # /dev/mapper/thinmgr-POOL-NAME is itself stable: the kernel names the device.
        return None

    def find_stale(self, spec: PoolSpec, *, fix: bool) -> list[str]:
        # The kernel keeps dm devices whether or not thinmgr lives; the catalog comparison
        # (doctor's other checks) finds volumes active without a catalog row.
        return []
