"""Loop devices through ``/dev/loop-control`` and the loop ioctls.

Constants and struct layouts are those of ``include/uapi/linux/loop.h`` (Linux 6.x; the ABI has
been stable since ``LOOP_CONFIGURE`` arrived in 5.8). The loop ioctl numbers are plain numbers,
not ``_IOW``-encoded, so they are the same on every architecture.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from thinmgr.errors import BusyError, NotFoundError
from thinmgr.kernel.errno_map import kernel_error

LOOP_CONTROL = "/dev/loop-control"

# linux/loop.h: ioctls on a loop device
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_CAPACITY = 0x4C07
LOOP_SET_DIRECT_IO = 0x4C08
LOOP_SET_BLOCK_SIZE = 0x4C09
LOOP_CONFIGURE = 0x4C0A
# linux/loop.h: ioctls on /dev/loop-control
LOOP_CTL_ADD = 0x4C80
LOOP_CTL_REMOVE = 0x4C81
LOOP_CTL_GET_FREE = 0x4C82

# linux/loop.h: lo_flags
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_PARTSCAN = 8
LO_FLAGS_DIRECT_IO = 16

LO_NAME_SIZE = 64
LO_KEY_SIZE = 32

# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit (u64 each);
# lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags (u32 each);
# lo_file_name[64], lo_crypt_name[64], lo_encrypt_key[32]; lo_init[2] (u64). 232 bytes.
LOOP_INFO64 = struct.Struct(f"=5Q4I{LO_NAME_SIZE}s{LO_NAME_SIZE}s{LO_KEY_SIZE}s2Q")
# struct loop_config: fd, block_size (u32); struct loop_info64 info; __reserved[8] (u64). 304 bytes.
LOOP_CONFIG_HEAD = struct.Struct("=II")
LOOP_CONFIG_SIZE = LOOP_CONFIG_HEAD.size + LOOP_INFO64.size + 8 * 8

# How often LOOP_CTL_GET_FREE + LOOP_CONFIGURE is retried when another process takes the
# free device between the two calls (losetup does the same loop).
_ATTACH_ATTEMPTS = 16


@dataclass(frozen=True)
class LoopStatus:
    """What ``LOOP_GET_STATUS64`` says about a bound loop device."""

    device: str
    number: int
    backing_file: str
    offset: int
    size_limit: int
    flags: int

    @property
    def autoclear(self) -> bool:
        return bool(self.flags & LO_FLAGS_AUTOCLEAR)

    @property
    def direct_io(self) -> bool:
        return bool(self.flags & LO_FLAGS_DIRECT_IO)

    @property
    def read_only(self) -> bool:
        return bool(self.flags & LO_FLAGS_READ_ONLY)


def device_path(number: int) -> str:
    return f"/dev/loop{number}"


def pack_info64(
    *, file_name: str = "", flags: int = 0, offset: int = 0, size_limit: int = 0
) -> bytes:
    name = os.fsencode(file_name)[: LO_NAME_SIZE - 1]
    return LOOP_INFO64.pack(0, 0, 0, offset, size_limit, 0, 0, 0, flags, name, b"", b"", 0, 0)


def pack_config(
    backing_fd: int, *, block_size: int = 0, file_name: str = "", flags: int = 0
) -> bytes:
    info = pack_info64(file_name=file_name, flags=flags)
    reserved = bytes(LOOP_CONFIG_SIZE - LOOP_CONFIG_HEAD.size - len(info))
    return LOOP_CONFIG_HEAD.pack(backing_fd, block_size) + info + reserved


def unpack_status(device: str, raw: bytes) -> LoopStatus:
    fields = LOOP_INFO64.unpack(raw)
    _dev, _ino, _rdev, offset, size_limit, number, _enc, _keysize, flags, name = fields[:10]
    return LoopStatus(
        device=device,
        number=number,
        backing_file=os.fsdecode(name.split(b"\0", 1)[0]),
        offset=offset,
        size_limit=size_limit,
        flags=flags,
    )


def get_free() -> int:
    """Number of a free loop device, created by the kernel if none is free."""
    try:
        fd = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise kernel_error(f"open {LOOP_CONTROL}", exc) from exc
    try:
        return fcntl.ioctl(fd, LOOP_CTL_GET_FREE)
    except OSError as exc:
        raise kernel_error("find a free loop device (LOOP_CTL_GET_FREE)", exc) from exc
    finally:
        os.close(fd)


def open_device(device: str, *, exclusive: bool = False) -> int:
    """Open a loop device; ``exclusive`` fails with BusyError while it is mounted or claimed."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_EXCL if exclusive else 0)
    try:
        return os.open(device, flags)
    except OSError as exc:
        what = f"open {device}" + (" exclusively" if exclusive else "")
        hint = "It is mounted or held open: unmount it first." if exc.errno == errno.EBUSY else None
        raise kernel_error(what, exc, hint=hint) from exc


def _configure(
    dev_fd: int, device: str, backing_fd: int, name: str, flags: int, block_size: int
) -> None:
    config = pack_config(backing_fd, block_size=block_size, file_name=name, flags=flags)
    try:
        fcntl.ioctl(dev_fd, LOOP_CONFIGURE, config)
        return
    except OSError as exc:
        # Same fallback rule as util-linux's loopcxt_setup_device: kernels before 5.8 answer
        # EINVAL or ENOTTY to the unknown LOOP_CONFIGURE.
        if exc.errno not in (errno.EINVAL, errno.ENOTTY, errno.ENOSYS):
            raise kernel_error(f"configure {device} over {name}", exc) from exc
    _set_fd_then_status(dev_fd, device, backing_fd, name, flags, block_size)


def _set_fd_then_status(
    dev_fd: int, device: str, backing_fd: int, name: str, flags: int, block_size: int
) -> None:
    """The pre-5.8 sequence: LOOP_SET_FD, LOOP_SET_STATUS64, then block size and direct I/O."""
    try:
        fcntl.ioctl(dev_fd, LOOP_SET_FD, backing_fd)
    except OSError as exc:
        raise kernel_error(f"bind {device} to {name} (LOOP_SET_FD)", exc) from exc
    try:
        settable = flags & (LO_FLAGS_AUTOCLEAR | LO_FLAGS_PARTSCAN)
        fcntl.ioctl(dev_fd, LOOP_SET_STATUS64, pack_info64(file_name=name, flags=settable))
        if block_size:
            fcntl.ioctl(dev_fd, LOOP_SET_BLOCK_SIZE, block_size)
        if flags & LO_FLAGS_DIRECT_IO:
            _try_direct_io(dev_fd, enable=True)
    except OSError as exc:
        with contextlib.suppress(OSError):  # undo the half-done binding
            fcntl.ioctl(dev_fd, LOOP_CLR_FD, 0)
        raise kernel_error(f"set up {device} over {name}", exc) from exc


def _try_direct_io(dev_fd: int, *, enable: bool) -> bool:
    try:
        fcntl.ioctl(dev_fd, LOOP_SET_DIRECT_IO, int(enable))
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # the backing file cannot do O_DIRECT at this block size
            return False
        raise
    return True


@dataclass
class AttachedLoop:
    """A bound loop device and the descriptor this process holds on it.

    With autoclear the kernel unbinds the device when its last opener closes, so holding ``fd``
    keeps it bound and a crashed holder leaks nothing once the device's other users let go.
    """

    device: str
    fd: int


def attach(
    backing: str | os.PathLike[str],
    *,
    read_only: bool = False,
    autoclear: bool = True,
    direct_io: bool = False,
    block_size: int = 0,
) -> AttachedLoop:
    """Bind a free loop device to ``backing``; the caller owns the returned descriptor."""
    name = os.fspath(backing)
    open_flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    try:
        backing_fd = os.open(name, open_flags)
    except OSError as exc:
        raise kernel_error(f"open loop backing file {name}", exc) from exc
    flags = (LO_FLAGS_READ_ONLY if read_only else 0) | (LO_FLAGS_AUTOCLEAR if autoclear else 0)
    flags |= LO_FLAGS_DIRECT_IO if direct_io else 0
    try:
        for _ in range(_ATTACH_ATTEMPTS):
            device = device_path(get_free())
            dev_fd = open_device(device)
            try:
                _configure(dev_fd, device, backing_fd, name, flags, block_size)
            except BusyError:
                os.close(dev_fd)  # someone bound it between GET_FREE and CONFIGURE: next one
                continue
            except BaseException:
                os.close(dev_fd)
                raise
            return AttachedLoop(device=device, fd=dev_fd)
        raise BusyError(f"cannot attach {name}: every free loop device was taken by others")
    finally:
        os.close(backing_fd)


def status(device: str) -> LoopStatus:
    """LOOP_GET_STATUS64; NotFoundError when the device is not bound."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise kernel_error(f"open {device}", exc) from exc
    try:
        raw = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(LOOP_INFO64.size))
    except OSError as exc:
        raise kernel_error(f"read the status of {device}", exc) from exc
    finally:
        os.close(fd)
    return unpack_status(device, raw)


def is_bound(device: str) -> bool:
    try:
        status(device)
    except NotFoundError:
        return False
    return True


def set_direct_io(dev_fd: int, device: str, *, enable: bool) -> bool:
    """LOOP_SET_DIRECT_IO; False when the backing file cannot do direct I/O."""
    try:
        return _try_direct_io(dev_fd, enable=enable)
    except OSError as exc:
        raise kernel_error(f"switch direct I/O on {device}", exc) from exc


def set_capacity(dev_fd: int, device: str) -> None:
    """LOOP_SET_CAPACITY: re-read the backing file's size after it grew or shrank."""
    try:
        fcntl.ioctl(dev_fd, LOOP_SET_CAPACITY, 0)
    except OSError as exc:
        raise kernel_error(f"update the capacity of {device}", exc) from exc


def detach(dev_fd: int, device: str) -> None:
    """LOOP_CLR_FD. While others hold the device open the kernel defers it (autoclear)."""
    try:
        fcntl.ioctl(dev_fd, LOOP_CLR_FD, 0)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # already unbound: detaching is idempotent
            return
        raise kernel_error(f"detach {device}", exc) from exc


def wait_unbound(device: str, timeout: float = 10.0) -> None:
    """Wait until the kernel has really released ``device`` (autoclear runs on last close)."""
    deadline = time.monotonic() + timeout
    while is_bound(device):
        if time.monotonic() > deadline:
            raise BusyError(
                f"{device} is still bound {timeout:.0f} s after detach",
                hint=f"Something holds {device} open; see `fuser -v {device}`.",
            )
        time.sleep(0.01)


def holders(device: str) -> list[str]:
    """Block devices stacked on ``device`` (from sysfs), e.g. a dm table using it."""
    path = Path("/sys/block") / Path(device).name / "holders"
    try:
        return sorted(p.name for p in path.iterdir())
    except OSError:
        return []


__all__ = [
    "AttachedLoop",
    "LoopStatus",
    "attach",
    "detach",
    "device_path",
    "get_free",
    "holders",
    "is_bound",
    "open_device",
    "set_capacity",
    "set_direct_io",
    "status",
    "wait_unbound",
]


def bound_devices() -> list[tuple[str, str]]:
    """(device, backing file) of every bound loop device, from sysfs (full paths, unlike
    LOOP_GET_STATUS64's 63-byte name)."""
    found = []
    for entry in sorted(Path("/sys/block").glob("loop*")):
        try:
            backing = (entry / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue  # not bound
        found.append((f"/dev/{entry.name}", backing))
    return found
