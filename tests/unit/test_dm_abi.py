"""The device-mapper ABI as thinmgr.kernel.dm packs it, pinned without root.

Sizes, offsets and ioctl numbers are those of linux/dm-ioctl.h 4.47.0 (linux-libc-dev 6.1),
measured with gcc (sizeof/offsetof) on x86_64; the marshalling functions are checked against
buffers laid out the way dm-ioctl.c writes them.
"""

from __future__ import annotations

import struct

import pytest

from thinmgr.errors import UsageError
from thinmgr.kernel import dm


def test_struct_sizes() -> None:
    assert dm.DM_IOCTL.size == 312
    assert dm.DM_TARGET_SPEC.size == 40
    assert dm.DM_NAME_LIST_HEAD.size == 12  # name[] starts at 12 (sizeof is 16 with padding)
    assert dm.DM_TARGET_VERSIONS_HEAD.size == 16
    assert dm.DM_TARGET_MSG_HEAD.size == 8


def test_dm_ioctl_field_offsets() -> None:
    # offsetof(struct dm_ioctl, ...) from gcc: version 0, data_size 12, data_start 16,
    # target_count 20, open_count 24, flags 28, event_nr 32, padding 36, dev 40, name 48,
    # uuid 176, data 305
    raw = dm.pack_header(
        data_size=0x11111111,
        data_start=0x22222222,
        target_count=0x33,
        flags=0x44444444,
        event_nr=0x55555555,
        dev=0x0102030405060708,
        name="n" * 127,
        uuid="u" * 128,
    )
    assert len(raw) == 312
    assert struct.unpack_from("=3I", raw, 0) == (4, 0, 0)
    assert struct.unpack_from("=I", raw, 12)[0] == 0x11111111
    assert struct.unpack_from("=I", raw, 16)[0] == 0x22222222
    assert struct.unpack_from("=I", raw, 20)[0] == 0x33
    assert struct.unpack_from("=i", raw, 24)[0] == 0
    assert struct.unpack_from("=I", raw, 28)[0] == 0x44444444
    assert struct.unpack_from("=I", raw, 32)[0] == 0x55555555
    assert struct.unpack_from("=Q", raw, 40)[0] == 0x0102030405060708
    assert raw[48 : 48 + 127] == b"n" * 127 and raw[175] == 0
    assert raw[176 : 176 + 128] == b"u" * 128 and raw[304] == 0
    assert raw[305:] == bytes(7)


def test_target_spec_offsets() -> None:
    # sector_start 0, length 8, status 16, next 20, target_type 24
    raw = dm.pack_targets([dm.Target(7, 9, "thin-pool", "7:0 7:1 128 0 0")])
    assert struct.unpack_from("=QQiI", raw, 0) == (7, 9, 0, len(raw))
    assert raw[24:40].rstrip(b"\0") == b"thin-pool"
    assert raw[40:].rstrip(b"\0") == b"7:0 7:1 128 0 0"
    assert len(raw) % 8 == 0


EXPECTED_IOCTLS = {
    "DM_VERSION": 0xC138FD00,
    "DM_LIST_DEVICES": 0xC138FD02,
    "DM_DEV_CREATE": 0xC138FD03,
    "DM_DEV_REMOVE": 0xC138FD04,
    "DM_DEV_SUSPEND": 0xC138FD06,
    "DM_DEV_STATUS": 0xC138FD07,
    "DM_TABLE_LOAD": 0xC138FD09,
    "DM_TABLE_CLEAR": 0xC138FD0A,
    "DM_TABLE_STATUS": 0xC138FD0C,
    "DM_LIST_VERSIONS": 0xC138FD0D,
    "DM_TARGET_MSG": 0xC138FD0E,
    "DM_GET_TARGET_VERSION": 0xC138FD11,
}


@pytest.mark.parametrize(("name", "number"), sorted(EXPECTED_IOCTLS.items()))
def test_ioctl_numbers(name: str, number: int) -> None:
    assert getattr(dm, name) == number


def test_flags() -> None:
    assert dm.DM_BUFFER_FULL_FLAG == 0x100
    assert dm.DM_DEFERRED_REMOVE == 0x20000
    assert dm.DM_DATA_OUT_FLAG == 0x10000
    assert dm.DM_STATUS_TABLE_FLAG == 0x10
    assert dm.DM_SKIP_LOCKFS_FLAG == 0x400
    assert dm.DM_NOFLUSH_FLAG == 0x800
    # libdevmapper's cookie: flags only (semaphore part 0), so nothing waits for udev
    assert dm.UDEV_VISIBLE << dm.DM_UDEV_FLAGS_SHIFT & 0xFFFF == 0
    assert dm.UDEV_PRIVATE & dm.DM_UDEV_DISABLE_DISK_RULES_FLAG


@pytest.mark.parametrize(("major", "minor"), [(254, 0), (7, 3), (259, 1048575), (4095, 256)])
def test_dev_encoding_round_trip(major: int, minor: int) -> None:
    encoded = dm.encode_dev(major, minor)
    assert dm.decode_dev(encoded) == (major, minor)
    if major < 4096:  # the kernel's 32-bit encoding agrees with glibc's makedev there
        import os

        assert os.major(encoded) == major and os.minor(encoded) == minor


def _status_buffer(targets: list[tuple[int, int, str, str]]) -> tuple[bytearray, int]:
    """Lay out a DM_TABLE_STATUS answer the way dm-ioctl.c retrieve_status does."""
    data_start = 312
    out = bytearray(312)
    for start, length, kind, params in targets:
        spec_at = len(out)
        body = params.encode() + b"\0"
        end = spec_at + 40 + len(body)
        nxt = ((end + 7) & ~7) - data_start  # offset from the data start, not relative
        out += struct.pack("=QQiI16s", start, length, 0, nxt, kind.encode()) + body
        out += bytes(((end + 7) & ~7) - end)
    return out, data_start


def test_unpack_status_targets() -> None:
    lines = [(0, 2048, "linear", "7:0 0"), (2048, 4096, "thin", "0 -")]
    buf, start = _status_buffer(lines)
    targets = dm.unpack_targets(buf, start, 2)
    assert [(t.start, t.length, t.target_type, t.params) for t in targets] == lines


def test_unpack_name_list() -> None:
    data_start = 312
    buf = bytearray(312)
    records = [("pool", 254, 0), ("a-much-longer-volume-name", 254, 17)]
    for i, (name, major, minor) in enumerate(records):
        at = len(buf)
        body = struct.pack("=QI", dm.encode_dev(major, minor), 0) + name.encode() + b"\0"
        body += bytes(8)  # event_nr, flags (4.37+) after the aligned name
        body += bytes(-len(body) % 8)
        if i < len(records) - 1:
            body = body[:8] + struct.pack("=I", len(body)) + body[12:]
        buf += body
        assert at % 8 == 0
    assert dm.unpack_name_list(buf, data_start) == [dm.ListedDevice(*r) for r in records]


def test_unpack_empty_name_list() -> None:
    assert dm.unpack_name_list(bytearray(312 + 16), 312) == []


def test_unpack_target_versions() -> None:
    buf = bytearray(312)
    entries = [("thin-pool", (1, 23, 0)), ("thin", (1, 23, 0)), ("error", (1, 6, 0))]
    for i, (name, ver) in enumerate(entries):
        body = struct.pack("=I3I", 0, *ver) + name.encode() + b"\0"
        body += bytes(-len(body) % 8)
        if i < len(entries) - 1:
            body = struct.pack("=I", len(body)) + body[4:]
        buf += body
    got = dm.unpack_target_versions(buf, 312)
    assert got == [dm.TargetVersion(n, v) for n, v in entries]


def test_pack_message() -> None:
    raw = dm.pack_message("create_snap 1 0")
    assert raw == bytes(8) + b"create_snap 1 0\0"


@pytest.mark.parametrize("bad", ["x" * 128, "a/b", "nul\0"])
def test_bad_names_are_usage_errors(bad: str) -> None:
    with pytest.raises(UsageError):
        dm.pack_header(data_size=312, name=bad)


def test_unpack_info_reads_back_header() -> None:
    raw = bytearray(dm.pack_header(data_size=312, name="vol", uuid="THINMGR-THIN-p-1", flags=0x22))
    struct.pack_into("=Q", raw, 40, dm.encode_dev(254, 3))
    struct.pack_into("=i", raw, 24, 2)
    info = dm.unpack_info(raw)
    assert (info.name, info.uuid, info.major, info.minor) == ("vol", "THINMGR-THIN-p-1", 254, 3)
    assert info.open_count == 2 and info.suspended and info.has_active_table
    assert info.devno == "254:3"


def test_kernel_engine_unavailable_without_control() -> None:
    from thinmgr.engine.kernel.engine import KernelEngine

    verdict = KernelEngine.available("/nonexistent/mapper/control")
    assert not verdict
    assert "device-mapper" in verdict.reason
