"""Device-mapper through its ioctls on ``/dev/mapper/control`` (no libdevmapper, no dmsetup).

Struct layouts and numbers are those of ``include/uapi/linux/dm-ioctl.h`` at interface version
4.47.0 (linux-libc-dev 6.1, "-ioctl (2022-07-28)"); the layouts have not changed since 4.0 and
``tests/unit/test_dm_abi.py`` pins every size, offset and ioctl number. We ask for interface
4.0.0, the oldest the kernel accepts, so any 4.x kernel serves us.

Buffers: every ioctl passes one ``struct dm_ioctl`` (312 bytes) followed by its payload; the
kernel writes results after ``data_start`` and sets ``DM_BUFFER_FULL_FLAG`` when they do not
fit, in which case the call is repeated with a buffer twice as large (as libdevmapper does).

udev: the top 16 bits of ``event_nr`` are the udev "cookie" flags of libdevmapper
(``DM_UDEV_*`` in libdevmapper.h, not in the kernel header). We send flags with a zero
semaphore part: dmsetup's udev rules then run without anyone waiting for a notification
("carries flags to control udev rules only", dmsetup.c ``_udevcomplete``), so nothing here ever
blocks on udev. Device nodes are thinmgr's own business (``thinmgr.kernel.devnodes``) and
tables always name devices by ``major:minor``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from thinmgr.errors import ConflictError, IOFailure, NotFoundError, ThinmgrError, UsageError
from thinmgr.kernel.errno_map import kernel_error

CONTROL_PATH = "/dev/mapper/control"

# --- linux/dm-ioctl.h ------------------------------------------------------------------------
DM_IOCTL_TYPE = 0xFD
DM_NAME_LEN = 128
DM_UUID_LEN = 129
DM_MAX_TYPE_NAME = 16
DM_VERSION_MAJOR = 4

# struct dm_ioctl: version[3], data_size, data_start, target_count (u32), open_count (s32),
# flags, event_nr, padding (u32), dev (u64), name[128], uuid[129], data[7]. 312 bytes.
DM_IOCTL = struct.Struct(f"=3IIIIiIIIQ{DM_NAME_LEN}s{DM_UUID_LEN}s7x")
# struct dm_target_spec: sector_start, length (u64), status (s32), next (u32),
# target_type[16]. 40 bytes; the parameter string follows it.
DM_TARGET_SPEC = struct.Struct(f"=QQiI{DM_MAX_TYPE_NAME}s")
# struct dm_name_list: dev (u64), next (u32), name[] at offset 12.
DM_NAME_LIST_HEAD = struct.Struct("=QI")
# struct dm_target_versions: next (u32), version[3] (u32), name[] at offset 16.
DM_TARGET_VERSIONS_HEAD = struct.Struct("=I3I")
# struct dm_target_msg: sector (u64), message[] at offset 8.
DM_TARGET_MSG_HEAD = struct.Struct("=Q")

# enum: the ioctl command numbers
DM_VERSION_CMD = 0
DM_REMOVE_ALL_CMD = 1
DM_LIST_DEVICES_CMD = 2
DM_DEV_CREATE_CMD = 3
DM_DEV_REMOVE_CMD = 4
DM_DEV_RENAME_CMD = 5
DM_DEV_SUSPEND_CMD = 6
DM_DEV_STATUS_CMD = 7
DM_DEV_WAIT_CMD = 8
DM_TABLE_LOAD_CMD = 9
DM_TABLE_CLEAR_CMD = 10
DM_TABLE_DEPS_CMD = 11
DM_TABLE_STATUS_CMD = 12
DM_LIST_VERSIONS_CMD = 13
DM_TARGET_MSG_CMD = 14
DM_DEV_SET_GEOMETRY_CMD = 15
DM_DEV_ARM_POLL_CMD = 16
DM_GET_TARGET_VERSION_CMD = 17

# flags (In / Out as the header marks them)
DM_READONLY_FLAG = 1 << 0
DM_SUSPEND_FLAG = 1 << 1
DM_PERSISTENT_DEV_FLAG = 1 << 3
DM_STATUS_TABLE_FLAG = 1 << 4
DM_ACTIVE_PRESENT_FLAG = 1 << 5
DM_INACTIVE_PRESENT_FLAG = 1 << 6
DM_BUFFER_FULL_FLAG = 1 << 8
DM_SKIP_BDGET_FLAG = 1 << 9
DM_SKIP_LOCKFS_FLAG = 1 << 10
DM_NOFLUSH_FLAG = 1 << 11
DM_QUERY_INACTIVE_TABLE_FLAG = 1 << 12
DM_UEVENT_GENERATED_FLAG = 1 << 13
DM_UUID_FLAG = 1 << 14
DM_SECURE_DATA_FLAG = 1 << 15
DM_DATA_OUT_FLAG = 1 << 16
DM_DEFERRED_REMOVE = 1 << 17
DM_INTERNAL_SUSPEND_FLAG = 1 << 18

# --- libdevmapper.h: udev cookie flags (upper 16 bits of event_nr) -----------------------------
DM_UDEV_FLAGS_SHIFT = 16
DM_UDEV_DISABLE_DM_RULES_FLAG = 0x0001
DM_UDEV_DISABLE_SUBSYSTEM_RULES_FLAG = 0x0002
DM_UDEV_DISABLE_DISK_RULES_FLAG = 0x0004
DM_UDEV_DISABLE_OTHER_RULES_FLAG = 0x0008
DM_UDEV_LOW_PRIORITY_FLAG = 0x0010
DM_UDEV_DISABLE_LIBRARY_FALLBACK = 0x0020
DM_UDEV_PRIMARY_SOURCE_FLAG = 0x0040

# A user-visible device: the dm rules make /dev/mapper/NAME, the rest (blkid...) may look at it.
UDEV_VISIBLE = DM_UDEV_PRIMARY_SOURCE_FLAG | DM_UDEV_DISABLE_LIBRARY_FALLBACK
# A private device (a thin-pool): no blkid probing, no other rules (as LVM does for its pools).
UDEV_PRIVATE = UDEV_VISIBLE | DM_UDEV_DISABLE_DISK_RULES_FLAG | DM_UDEV_DISABLE_OTHER_RULES_FLAG

_IOC_READ_WRITE = 3  # _IOC_WRITE | _IOC_READ on x86, arm, arm64, riscv, s390
_INITIAL_BUFFER = 16 * 1024  # libdevmapper's first guess as well
_MAX_BUFFER = 64 * 1024 * 1024


def _align8(value: int) -> int:
    # the kernel's align_ptr()/align_val(): results are laid out on 8-byte boundaries
    return (value + 7) & ~7


def ioctl_number(nr: int) -> int:
    """``_IOWR(DM_IOCTL, nr, struct dm_ioctl)`` (asm-generic/ioctl.h encoding)."""
    return (_IOC_READ_WRITE << 30) | (DM_IOCTL.size << 16) | (DM_IOCTL_TYPE << 8) | nr


DM_VERSION = ioctl_number(DM_VERSION_CMD)
DM_LIST_DEVICES = ioctl_number(DM_LIST_DEVICES_CMD)
DM_DEV_CREATE = ioctl_number(DM_DEV_CREATE_CMD)
DM_DEV_REMOVE = ioctl_number(DM_DEV_REMOVE_CMD)
DM_DEV_SUSPEND = ioctl_number(DM_DEV_SUSPEND_CMD)
DM_DEV_STATUS = ioctl_number(DM_DEV_STATUS_CMD)
DM_TABLE_LOAD = ioctl_number(DM_TABLE_LOAD_CMD)
DM_TABLE_CLEAR = ioctl_number(DM_TABLE_CLEAR_CMD)
DM_TABLE_STATUS = ioctl_number(DM_TABLE_STATUS_CMD)
DM_LIST_VERSIONS = ioctl_number(DM_LIST_VERSIONS_CMD)
DM_TARGET_MSG = ioctl_number(DM_TARGET_MSG_CMD)
DM_GET_TARGET_VERSION = ioctl_number(DM_GET_TARGET_VERSION_CMD)


def decode_dev(dev: int) -> tuple[int, int]:
    """The kernel's ``huge_decode_dev``: (major, minor) of a ``dm_ioctl.dev`` value."""
    return (dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)


def encode_dev(major: int, minor: int) -> int:
    """The kernel's ``huge_encode_dev`` (``new_encode_dev``)."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def _cstring(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _encode_name(value: str, limit: int, what: str) -> bytes:
    raw = value.encode()
    if len(raw) >= limit or b"\0" in raw or (what == "name" and "/" in value):
        raise UsageError(
            f"invalid device-mapper {what} {value!r}: at most {limit - 1} bytes, no NUL"
            + (" and no '/'" if what == "name" else ""),
        )
    return raw


# --- what the ioctls return -------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceInfo:
    """``struct dm_ioctl`` as the kernel filled it in about one device."""

    name: str
    uuid: str
    major: int
    minor: int
    open_count: int
    target_count: int
    event_nr: int
    flags: int

    @property
    def devno(self) -> str:
        return f"{self.major}:{self.minor}"

    @property
    def suspended(self) -> bool:
        return bool(self.flags & DM_SUSPEND_FLAG)

    @property
    def read_only(self) -> bool:
        return bool(self.flags & DM_READONLY_FLAG)

    @property
    def has_active_table(self) -> bool:
        return bool(self.flags & DM_ACTIVE_PRESENT_FLAG)

    @property
    def has_inactive_table(self) -> bool:
        return bool(self.flags & DM_INACTIVE_PRESENT_FLAG)

    @property
    def deferred_remove(self) -> bool:
        return bool(self.flags & DM_DEFERRED_REMOVE)


@dataclass(frozen=True)
class Target:
    """One line of a table: ``start length type params`` (sectors)."""

    start: int
    length: int
    target_type: str
    params: str

    def line(self) -> str:
        return f"{self.start} {self.length} {self.target_type} {self.params}"


@dataclass(frozen=True)
class ListedDevice:
    name: str
    major: int
    minor: int


@dataclass(frozen=True)
class TargetVersion:
    name: str
    version: tuple[int, int, int]


# --- marshalling (pure; tested without root) --------------------------------------------------
def pack_header(
    *,
    data_size: int,
    data_start: int = DM_IOCTL.size,
    name: str = "",
    uuid: str = "",
    flags: int = 0,
    event_nr: int = 0,
    target_count: int = 0,
    dev: int = 0,
) -> bytes:
    return DM_IOCTL.pack(
        DM_VERSION_MAJOR,
        0,
        0,
        data_size,
        data_start,
        target_count,
        0,
        flags,
        event_nr,
        0,
        dev,
        _encode_name(name, DM_NAME_LEN, "name") if name else b"",
        _encode_name(uuid, DM_UUID_LEN, "uuid") if uuid else b"",
    )


def unpack_info(buf: bytes | bytearray) -> DeviceInfo:
    f = DM_IOCTL.unpack_from(buf, 0)
    major, minor = decode_dev(f[10])
    return DeviceInfo(
        name=_cstring(f[11]),
        uuid=_cstring(f[12]),
        major=major,
        minor=minor,
        open_count=f[6],
        target_count=f[5],
        event_nr=f[8],
        flags=f[7],
    )


def pack_targets(targets: Sequence[Target]) -> bytes:
    """The DM_TABLE_LOAD payload: specs each followed by its NUL-terminated params, 8-aligned.

    On input ``next`` is the distance from this spec to the next one (dm-ioctl.c
    ``next_target``); on output it is an offset from the start of the data (see
    ``unpack_targets``)."""
    out = bytearray()
    for target in targets:
        params = target.params.encode() + b"\0"
        size = _align8(DM_TARGET_SPEC.size + len(params))
        kind = _encode_name(target.target_type, DM_MAX_TYPE_NAME, "target type")
        head = DM_TARGET_SPEC.pack(target.start, target.length, 0, size, kind)
        out += head + params + bytes(size - len(head) - len(params))
    return bytes(out)


def unpack_targets(buf: bytes | bytearray, data_start: int, count: int) -> list[Target]:
    """Specs of a DM_TABLE_STATUS result; ``next`` is relative to the data start there
    (dm-ioctl.c ``retrieve_status``, libdevmapper ``_unmarshal_status``)."""
    targets: list[Target] = []
    offset = data_start
    for _ in range(count):
        start, length, _status, nxt, kind = DM_TARGET_SPEC.unpack_from(buf, offset)
        params_at = offset + DM_TARGET_SPEC.size
        end = buf.find(b"\0", params_at)
        params = bytes(buf[params_at : end if end >= 0 else len(buf)]).decode("utf-8", "replace")
        targets.append(Target(start, length, _cstring(kind), params))
        offset = data_start + nxt
    return targets


def unpack_name_list(buf: bytes | bytearray, data_start: int) -> list[ListedDevice]:
    """A DM_LIST_DEVICES result: ``dm_name_list`` records chained by relative ``next``."""
    devices: list[ListedDevice] = []
    offset = data_start
    while True:
        dev, nxt = DM_NAME_LIST_HEAD.unpack_from(buf, offset)
        if dev == 0:  # "Flags no data": there are no devices at all
            break
        name_at = offset + 12
        name = _cstring(bytes(buf[name_at : name_at + DM_NAME_LEN]))
        major, minor = decode_dev(dev)
        devices.append(ListedDevice(name, major, minor))
        if nxt == 0:
            break
        offset += nxt
    return devices


def unpack_target_versions(buf: bytes | bytearray, data_start: int) -> list[TargetVersion]:
    """A DM_LIST_VERSIONS result: ``dm_target_versions`` records chained by relative ``next``."""
    versions: list[TargetVersion] = []
    offset = data_start
    while offset + DM_TARGET_VERSIONS_HEAD.size <= len(buf):
        nxt, v0, v1, v2 = DM_TARGET_VERSIONS_HEAD.unpack_from(buf, offset)
        name_at = offset + DM_TARGET_VERSIONS_HEAD.size
        name = _cstring(bytes(buf[name_at : name_at + 256]))
        if not name:
            break
        versions.append(TargetVersion(name, (v0, v1, v2)))
        if nxt == 0:
            break
        offset += nxt
    return versions


def pack_message(message: str, sector: int = 0) -> bytes:
    return DM_TARGET_MSG_HEAD.pack(sector) + message.encode() + b"\0"


# --- the control device -----------------------------------------------------------------------
class DMControl:
    """An open ``/dev/mapper/control``; every call names its device (by name or uuid)."""

    def __init__(self, path: str = CONTROL_PATH) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise kernel_error(
                f"open {path}",
                exc,
                hint="The kernel needs device-mapper (dm_mod) and thinmgr needs root.",
            ) from exc

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DMControl:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # The one place that calls ioctl.
    def _call(
        self,
        request: int,
        what: str,
        *,
        name: str = "",
        uuid: str = "",
        flags: int = 0,
        event_nr: int = 0,
        payload: bytes = b"",
        target_count: int = 0,
    ) -> tuple[DeviceInfo, bytearray]:
        size = max(_INITIAL_BUFFER, _align8(DM_IOCTL.size + len(payload)))
        while True:
            buf = bytearray(size)
            buf[: DM_IOCTL.size] = pack_header(
                data_size=size,
                name=name,
                uuid=uuid,
                flags=flags,
                event_nr=event_nr,
                target_count=target_count,
            )
            buf[DM_IOCTL.size : DM_IOCTL.size + len(payload)] = payload
            try:
                fcntl.ioctl(self._fd, request, buf, True)
            except OSError as exc:
                raise _dm_error(what, exc) from exc
            info = unpack_info(buf)
            if not info.flags & DM_BUFFER_FULL_FLAG:
                return info, buf
            if size >= _MAX_BUFFER:
                raise IOFailure(f"cannot {what}: the kernel's answer exceeds {_MAX_BUFFER} bytes")
            size *= 2  # too small: ask again with more room, as libdevmapper does

    @staticmethod
    def _data_start(buf: bytearray) -> int:
        return int(DM_IOCTL.unpack_from(buf, 0)[4])

    def version(self) -> tuple[int, int, int]:
        _, buf = self._call(DM_VERSION, "read the device-mapper version")
        major, minor, patch = DM_IOCTL.unpack_from(buf, 0)[:3]
        return int(major), int(minor), int(patch)

    def list_devices(self) -> list[ListedDevice]:
        _, buf = self._call(DM_LIST_DEVICES, "list device-mapper devices")
        return unpack_name_list(buf, self._data_start(buf))

    def target_versions(self) -> list[TargetVersion]:
        _, buf = self._call(DM_LIST_VERSIONS, "list device-mapper targets")
        return unpack_target_versions(buf, self._data_start(buf))

    def target_version(self, target: str) -> TargetVersion | None:
        """One target's version. DM_GET_TARGET_VERSION (4.41+) takes the target's name in
        ``dm_ioctl.name`` and loads its module on demand (``dm_get_target_type``); an unknown
        target (EINVAL) or an older kernel (ENOTTY) falls back to the list of loaded ones."""
        try:
            _, buf = self._call(DM_GET_TARGET_VERSION, f"look up the {target} target", name=target)
        except ThinmgrError:
            return next((v for v in self.target_versions() if v.name == target), None)
        found = unpack_target_versions(buf, self._data_start(buf))
        return found[0] if found else None

    def info(self, name: str = "", *, uuid: str = "") -> DeviceInfo:
        """DM_DEV_STATUS; NotFoundError when no such device exists."""
        info, _ = self._call(
            DM_DEV_STATUS, f"query {_label(name, uuid)}", name=name, uuid=uuid, flags=0
        )
        return info

    def find(self, name: str = "", *, uuid: str = "") -> DeviceInfo | None:
        try:
            return self.info(name, uuid=uuid)
        except NotFoundError:
            return None

    def create(self, name: str, *, uuid: str = "", read_only: bool = False) -> DeviceInfo:
        flags = DM_READONLY_FLAG if read_only else 0
        what = f"create {_label(name, '')}"
        try:
            info, _ = self._call(DM_DEV_CREATE, what, name=name, uuid=uuid, flags=flags)
        except ThinmgrError as exc:
            if isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.EBUSY:
                # dm_hash_insert answers EBUSY when the name or uuid is taken
                raise ConflictError(
                    f"cannot {what}: a device with that name or uuid exists",
                    hint="Remove it first or pick another name.",
                ) from exc
            raise
        return info

    def load_table(
        self, name: str, targets: Sequence[Target], *, read_only: bool = False
    ) -> DeviceInfo:
        """Load into the inactive slot; ``resume`` makes it live."""
        info, _ = self._call(
            DM_TABLE_LOAD,
            f"load a table into {_label(name, '')} ({'; '.join(t.line() for t in targets)})",
            name=name,
            flags=DM_READONLY_FLAG if read_only else 0,
            payload=pack_targets(targets),
            target_count=len(targets),
        )
        return info

    def clear_table(self, name: str) -> DeviceInfo:
        info, _ = self._call(DM_TABLE_CLEAR, f"clear the inactive table of {name}", name=name)
        return info

    def suspend(self, name: str, *, flush: bool = True, lockfs: bool = True) -> DeviceInfo:
        """Hold new I/O; ``lockfs`` freezes a mounted file system first, ``flush`` waits for
        (rather than requeues) the I/O in flight."""
        flags = DM_SUSPEND_FLAG | (0 if flush else DM_NOFLUSH_FLAG)
        flags |= 0 if lockfs else DM_SKIP_LOCKFS_FLAG
        info, _ = self._call(DM_DEV_SUSPEND, f"suspend {name}", name=name, flags=flags)
        return info

    def resume(
        self, name: str, *, udev_flags: int = UDEV_VISIBLE, lockfs: bool = True
    ) -> DeviceInfo:
        """Resume, switching to the inactive table if one was loaded (the kernel suspends a
        running device around the switch itself)."""
        flags = 0 if lockfs else DM_SKIP_LOCKFS_FLAG
        info, _ = self._call(
            DM_DEV_SUSPEND,
            f"resume {name}",
            name=name,
            flags=flags,
            event_nr=udev_flags << DM_UDEV_FLAGS_SHIFT,
        )
        return info

    def remove(
        self, name: str, *, deferred: bool = False, udev_flags: int = UDEV_VISIBLE
    ) -> DeviceInfo:
        """Remove; with ``deferred`` an open device goes when its last opener closes it."""
        info, _ = self._call(
            DM_DEV_REMOVE,
            f"remove {name}",
            name=name,
            flags=DM_DEFERRED_REMOVE if deferred else 0,
            event_nr=udev_flags << DM_UDEV_FLAGS_SHIFT,
        )
        return info

    def _table_status(self, name: str, flags: int, what: str) -> list[Target]:
        info, buf = self._call(DM_TABLE_STATUS, what, name=name, flags=flags)
        return unpack_targets(buf, self._data_start(buf), info.target_count)

    def status(self, name: str, *, noflush: bool = False) -> list[Target]:
        """Each target's status line; ``noflush`` keeps thin-pool from committing first."""
        flags = DM_NOFLUSH_FLAG if noflush else 0
        return self._table_status(name, flags, f"read the status of {name}")

    def table(self, name: str, *, inactive: bool = False) -> list[Target]:
        flags = DM_STATUS_TABLE_FLAG | (DM_QUERY_INACTIVE_TABLE_FLAG if inactive else 0)
        return self._table_status(name, flags, f"read the table of {name}")

    def message(self, name: str, message: str, *, sector: int = 0) -> str:
        """Send a target message; returns what the target answered (often nothing)."""
        info, buf = self._call(
            DM_TARGET_MSG,
            f"send '{message}' to {name}",
            name=name,
            payload=pack_message(message, sector),
        )
        if not info.flags & DM_DATA_OUT_FLAG:
            return ""
        start = self._data_start(buf)
        end = buf.find(b"\0", start)
        return bytes(buf[start : end if end >= 0 else len(buf)]).decode("utf-8", "replace")


def _label(name: str, uuid: str) -> str:
    return f"device-mapper device {name}" if name else f"device-mapper device with uuid {uuid}"


def _dm_error(what: str, exc: OSError) -> ThinmgrError:
    if exc.errno == errno.ENXIO:  # dm-ioctl's answer for "no such device"
        return NotFoundError(f"cannot {what}: no such device-mapper device")
    if exc.errno == errno.EEXIST:
        return ConflictError(f"cannot {what}: it already exists")
    if exc.errno == errno.EINVAL:
        return IOFailure(
            f"cannot {what}: the kernel rejected it (invalid argument)",
            hint="The kernel log (`dmesg | tail`) names the reason.",
        )
    return kernel_error(what, exc)


__all__ = [
    "CONTROL_PATH",
    "UDEV_PRIVATE",
    "UDEV_VISIBLE",
    "DMControl",
    "DeviceInfo",
    "ListedDevice",
    "Target",
    "TargetVersion",
    "decode_dev",
    "encode_dev",
    "ioctl_number",
]
