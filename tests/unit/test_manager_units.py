"""Small pieces of the manager: names, sizing, engine choice, mountinfo, signatures, freeze."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from thinmgr.errors import BusyError, ThinmgrError, UnsupportedError, UsageError
from thinmgr.kernel.freeze import parse_mountinfo
from thinmgr.ops import engines, snapshots
from thinmgr.ops.blockdevs import signature_of
from thinmgr.ops.naming import check_name
from thinmgr.ops.pools import MAX_METADATA_BYTES, block_sectors_of, metadata_size_for


@pytest.mark.parametrize("name", ["p", "pool-1", "a.b_c+d", "9", "x" * 56])
def test_good_names(name: str) -> None:
    assert check_name("pool", name) == name


@pytest.mark.parametrize("name", ["", "a/b", "..", ".x", "-x", "x" * 57, "a b", "é", "a\\b", "a:b"])
def test_bad_names(name: str) -> None:
    with pytest.raises(UsageError):
        check_name("pool", name)


def test_metadata_sizing_follows_the_kernel_rule() -> None:
    # A tiny pool: room for 4096 thin devices (16 MiB) plus 96 bytes, rounded up to a MiB.
    assert metadata_size_for(1) == 17 << 20
    # 1 TiB of 64 KiB blocks: 16 Mi blocks x 48 B x 2 = 1536 MiB, plus 16 MiB for devices
    assert metadata_size_for(1 << 24) == 1552 << 20
    assert metadata_size_for(1 << 40) == MAX_METADATA_BYTES


def test_metadata_of_a_small_pool_holds_a_thousand_volumes(tmp_path: Path) -> None:
    """Every thin device costs metadata blocks the per-data-block rule does not count."""
    from thinmgr.engine.user.pool import UserPool

    meta, data = tmp_path / "meta", tmp_path / "data"
    meta.write_bytes(b"")
    os.truncate(meta, metadata_size_for((1 << 30) // (64 << 10)))  # a 1 GiB pool
    data.write_bytes(b"")
    os.truncate(data, 1 << 30)
    pool = UserPool.create(meta, data, data_block_sectors=128)
    try:
        for dev in range(1000):
            pool.create_thin(dev)
        assert pool.status().used_metadata_blocks < pool.status().total_metadata_blocks
    finally:
        pool.close()


def test_block_sizes() -> None:
    assert block_sectors_of(64 << 10) == 128
    assert block_sectors_of(1 << 30) == 2097152
    for bad in (0, 32 << 10, 96 << 10, 2 << 30):
        with pytest.raises(UsageError):
            block_sectors_of(bad)


def test_engine_selection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not engines.kernel_has_dm_thin(tmp_path)
    (tmp_path / "dev/mapper").mkdir(parents=True)
    (tmp_path / "dev/mapper/control").touch()
    assert not engines.kernel_has_dm_thin(tmp_path)
    (tmp_path / "sys/module/dm_thin_pool").mkdir(parents=True)
    assert engines.kernel_has_dm_thin(tmp_path)
    # this host has no device-mapper: the kernel engine is refused with the reason
    with pytest.raises(UnsupportedError, match=r"kernel engine is not available here: .*mapper"):
        engines.load_engine("kernel", {})
    assert engines.resolve_engine_name("auto") == "user"
    with pytest.raises(UsageError):
        engines.resolve_engine_name("zfs")
    monkeypatch.setattr(engines, "kernel_has_dm_thin", lambda root=Path("/"): False)
    assert engines.resolve_engine_name("auto") == "user"
    fake = engines.load_engine("kernel", {engines.FACTORY_ENV: "tests.support.fake_engine:factory"})
    assert fake.name == "kernel"


def test_mountinfo_parsing() -> None:
    text = (
        "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext4 /dev/thin\\0401 rw\n"
        "37 35 253:3 / /data rw shared:2 - xfs /dev/mapper/x rw\n"
        "garbage line\n"
    )
    mounts = parse_mountinfo(text)
    assert [(m.device, m.mount_point, m.fs_type, m.source) for m in mounts] == [
        ("98:0", "/mnt/with space", "ext4", "/dev/thin 1"),
        ("253:3", "/data", "xfs", "/dev/mapper/x"),
    ]


@pytest.mark.parametrize(
    ("offset", "magic", "what"),
    [
        (1080, b"\x53\xef", "ext"),
        (0, b"XFSB", "XFS"),
        (65600, b"_BHRfS_M", "btrfs"),
        (4086, b"SWAPSPACE2", "swap"),
        (0, b"LUKS\xba\xbe", "LUKS"),
        (32, (27022010).to_bytes(8, "little"), "dm-thin"),
    ],
)
def test_signatures(tmp_path: Path, offset: int, magic: bytes, what: str) -> None:
    image = tmp_path / "dev.img"
    image.write_bytes(bytes(offset) + magic + bytes(70000))
    found = signature_of(image)
    assert found is not None and what in found
    image.write_bytes(bytes(80000))
    assert signature_of(image) is None


def _fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_freeze_always_thaws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[str] = []
    fds: list[int] = []
    monkeypatch.setattr(snapshots, "freeze_fd", lambda fd, what: calls.append(f"freeze {what}"))
    monkeypatch.setattr(
        snapshots, "thaw_fd", lambda fd, what: fds.append(fd) or calls.append(f"thaw {what}")
    )
    with pytest.raises(ThinmgrError), snapshots.frozen(str(tmp_path), label="/mnt"):
        calls.append("snapshot")
        raise ThinmgrError("engine failed")
    assert calls == ["freeze /mnt", "snapshot", "thaw /mnt"]
    assert not _fd_is_open(fds[0])  # the one descriptor of freeze and thaw is closed


def test_freeze_is_bounded_and_thaws_late(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import threading

    release = threading.Event()
    thawed: list[int] = []
    done = threading.Event()
    monkeypatch.setattr(snapshots, "freeze_fd", lambda fd, what: release.wait(5))
    monkeypatch.setattr(
        snapshots, "thaw_fd", lambda fd, what: thawed.append(fd) or done.set() or True
    )
    with (
        pytest.raises(BusyError, match="took more than"),
        snapshots.frozen(str(tmp_path), timeout=0.05),
    ):
        pass
    assert not thawed
    release.set()  # the freeze finally returns: the worker thaws at once, then closes
    assert done.wait(5)
    deadline = time.monotonic() + 5
    while _fd_is_open(thawed[0]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _fd_is_open(thawed[0])


def test_a_failed_freeze_closes_its_descriptor(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """EBUSY (already frozen) is a BusyError like the timeout, but nothing owns the
    descriptor then: the freeze closes it."""
    opened: list[int] = []
    real_open = snapshots.open_directory
    monkeypatch.setattr(
        snapshots, "open_directory", lambda p: opened.append(real_open(p)) or opened[-1]
    )

    def refuse(fd: int, what: str) -> None:
        raise BusyError(f"freeze {what}: Device or resource busy")

    monkeypatch.setattr(snapshots, "freeze_fd", refuse)
    with pytest.raises(BusyError, match="busy"), snapshots.frozen(str(tmp_path)):
        pass
    assert opened and not _fd_is_open(opened[0])
