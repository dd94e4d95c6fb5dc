"""The loop and FUSE ABI as linux/loop.h and linux/fuse.h define it (no root needed)."""

from __future__ import annotations

import errno

import pytest

from thinmgr.errors import BusyError, IOFailure, NotFoundError, PermissionDenied
from thinmgr.kernel import fuse, loop
from thinmgr.kernel.errno_map import kernel_error


def test_struct_sizes_match_linux_headers() -> None:
    assert loop.LOOP_INFO64.size == 232  # sizeof(struct loop_info64)
    assert loop.LOOP_CONFIG_SIZE == 304  # sizeof(struct loop_config)
    assert len(loop.pack_config(3, block_size=4096, file_name="x")) == 304


def test_ioctl_numbers() -> None:
    assert (loop.LOOP_SET_FD, loop.LOOP_CLR_FD) == (0x4C00, 0x4C01)
    assert (loop.LOOP_SET_STATUS64, loop.LOOP_GET_STATUS64) == (0x4C04, 0x4C05)
    assert (loop.LOOP_SET_CAPACITY, loop.LOOP_SET_DIRECT_IO) == (0x4C07, 0x4C08)
    assert (loop.LOOP_SET_BLOCK_SIZE, loop.LOOP_CONFIGURE) == (0x4C09, 0x4C0A)
    assert (loop.LOOP_CTL_ADD, loop.LOOP_CTL_REMOVE, loop.LOOP_CTL_GET_FREE) == (
        0x4C80,
        0x4C81,
        0x4C82,
    )
    assert (loop.LO_FLAGS_READ_ONLY, loop.LO_FLAGS_AUTOCLEAR) == (1, 4)
    assert (loop.LO_FLAGS_PARTSCAN, loop.LO_FLAGS_DIRECT_IO) == (8, 16)


def test_loop_config_layout() -> None:
    raw = loop.pack_config(7, block_size=4096, file_name="/run/v", flags=loop.LO_FLAGS_AUTOCLEAR)
    assert raw[:8] == (7).to_bytes(4, "little") + (4096).to_bytes(4, "little")
    info = raw[8 : 8 + 232]
    assert int.from_bytes(info[52:56], "little") == loop.LO_FLAGS_AUTOCLEAR  # lo_flags
    assert info[56:62] == b"/run/v"  # lo_file_name
    assert raw[240:] == bytes(64)  # __reserved[8]


def test_status_round_trip() -> None:
    raw = loop.pack_info64(file_name="/x/volume", flags=loop.LO_FLAGS_DIRECT_IO, offset=512)
    status = loop.unpack_status("/dev/loop9", raw)
    assert status.backing_file == "/x/volume"
    assert status.offset == 512
    assert status.direct_io and not status.autoclear and not status.read_only


def test_long_file_names_are_cut_to_fit() -> None:
    status = loop.unpack_status("/dev/loop0", loop.pack_info64(file_name="a" * 200))
    assert status.backing_file == "a" * 63  # LO_NAME_SIZE - 1, NUL-terminated


def test_fuse_struct_sizes() -> None:
    assert fuse.IN_HEADER.size == 40
    assert fuse.OUT_HEADER.size == 16
    assert fuse.INIT_OUT.size == 64
    assert fuse.ATTR.size == 88
    assert fuse.ATTR_OUT_HEAD.size + fuse.ATTR.size == 104  # fuse_attr_out
    assert fuse.ENTRY_OUT_HEAD.size + fuse.ATTR.size == 128  # fuse_entry_out
    assert fuse.OPEN_OUT.size == 16
    assert fuse.WRITE_IN.size == 40
    assert fuse.WRITE_OUT.size == 8
    assert fuse.FALLOCATE_IN.size == 32
    assert fuse.KSTATFS.size == 80
    assert fuse.DIRENT_HEAD.size == 24


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (errno.EBUSY, BusyError),
        (errno.ENXIO, NotFoundError),
        (errno.EPERM, PermissionDenied),
        (errno.EIO, IOFailure),
    ],
)
def test_kernel_errors_name_the_device(code: int, kind: type[Exception]) -> None:
    error = kernel_error("detach /dev/loop3", OSError(code, "boom"))
    assert isinstance(error, kind)
    assert "/dev/loop3" in str(error)
