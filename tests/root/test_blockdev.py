"""A BlockBackend as a real block device: ext4 on it, mount, fsync, detach, re-attach.

Every test checks that it leaves no loop device and no FUSE mount behind (``losetup -a`` and
/proc/mounts), and cleans up by force if a test fails half-way.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from thinmgr.engine.user.backend import BlockBackend, BytesLike, FileBackend
from thinmgr.engine.user.blockdev import BlockDevice, attach
from thinmgr.errors import BusyError, ConflictError, IOFailure

pytestmark = pytest.mark.root

SIZE = 128 << 20


class CountingBackend(FileBackend):
    """FileBackend that counts what reaches it."""

    def __init__(self, path: Path, *, size: int | None = None) -> None:
        super().__init__(path, size=size)
        self.flushes = 0
        self.writes = 0
        self.discarded = 0

    def write(self, offset: int, data: BytesLike) -> None:
        self.writes += 1
        super().write(offset, data)

    def flush(self) -> None:
        self.flushes += 1
        super().flush()

    def discard(self, offset: int, length: int) -> None:
        self.discarded += length
        super().discard(offset, length)


def run(*args: str | Path) -> str:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True).stdout


def leftovers(root: Path) -> list[str]:
    """Loop devices over, and mounts under, ``root``."""
    found = [line for line in run("losetup", "-a").splitlines() if str(root) in line]
    with open("/proc/mounts", encoding="utf-8") as mounts:
        found += [line for line in mounts if str(root) in line.split()[1]]
    return found


class Harness:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.mnt = root / "mnt"
        self.mnt.mkdir()
        self.devices: list[BlockDevice] = []

    def attach(self, backend: BlockBackend, name: str = "vol") -> BlockDevice:
        block = attach(
            backend, run_dir=self.root / "run" / name, link=self.root / "dev" / "pool" / name
        )
        self.devices.append(block)
        return block

    def mount(self, block: BlockDevice) -> None:
        run("mount", block.link, self.mnt)

    def umount(self) -> None:
        run("umount", self.mnt)

    def cleanup(self) -> None:
        """Forced cleanup after a failure; a passing test has left nothing to do here."""
        with open("/proc/mounts", encoding="utf-8") as mounts:
            mounted = str(self.mnt) in mounts.read()
        if mounted:
            subprocess.run(["umount", "-l", str(self.mnt)], check=False)
        for block in self.devices:
            with contextlib.suppress(Exception):
                block.detach()
            with contextlib.suppress(Exception):
                block.export.stop(force=True)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        leaked = leftovers(tmp_path)
        h.cleanup()
        assert leaked == [], f"left behind: {leaked}"
        assert leftovers(tmp_path) == []


def write_files(root: Path) -> dict[str, str]:
    sums = {}
    for index, size in enumerate((1, 4096, 3 << 20, (5 << 20) + 17)):
        data = os.urandom(size)
        (root / f"file{index}").write_bytes(data)
        sums[f"file{index}"] = hashlib.sha256(data).hexdigest()
    return sums


def read_sums(root: Path, names: list[str]) -> dict[str, str]:
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in names}


def test_ext4_survives_detach_and_reattach(harness: Harness, tmp_path: Path) -> None:
    backend = CountingBackend(tmp_path / "backing.img", size=SIZE)
    block = harness.attach(backend)
    assert os.readlink(block.link) == block.device
    assert Path(block.device).is_block_device()
    run("mkfs.ext4", "-q", "-F", block.link)
    harness.mount(block)
    sums = write_files(harness.mnt)
    harness.umount()
    block.detach()
    assert not os.path.lexists(block.link)
    assert leftovers(tmp_path) == []

    again = harness.attach(backend)
    run("fsck.ext4", "-n", "-f", again.link)  # clean file system after the round trip
    harness.mount(again)
    run("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
    assert read_sums(harness.mnt, list(sums)) == sums
    harness.umount()
    again.detach()
    backend.close()


def test_fsync_reaches_the_backend(harness: Harness, tmp_path: Path) -> None:
    backend = CountingBackend(tmp_path / "backing.img", size=SIZE)
    block = harness.attach(backend)
    run("mkfs.ext4", "-q", "-F", block.link)
    harness.mount(block)
    before = backend.flushes
    run(
        "dd",
        "if=/dev/urandom",
        f"of={harness.mnt / 'f'}",
        "bs=64k",
        "count=16",
        "conv=fsync",
        "status=none",
    )
    assert backend.flushes > before  # ext4's journal commit sends a preflush down the stack
    harness.umount()

    before_writes, before_flushes = backend.writes, backend.flushes
    fd = os.open(block.device, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xab" * 4096, 1 << 20)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert backend.writes > before_writes
    assert backend.flushes > before_flushes
    assert backend.read(1 << 20, 4096) == b"\xab" * 4096  # on the backend, not only in a cache
    block.detach()
    backend.close()


def test_detach_while_mounted_is_refused(harness: Harness, tmp_path: Path) -> None:
    backend = FileBackend(tmp_path / "backing.img", size=SIZE)
    block = harness.attach(backend)
    run("mkfs.ext4", "-q", "-F", block.link)
    harness.mount(block)
    with pytest.raises(BusyError, match=block.device):
        block.detach()
    (harness.mnt / "still-works").write_text("yes")  # nothing was torn down
    assert os.readlink(block.link) == block.device
    harness.umount()
    block.detach()
    block.detach()  # idempotent
    backend.close()


def test_discard_reaches_the_backend(harness: Harness, tmp_path: Path) -> None:
    backend = CountingBackend(tmp_path / "backing.img", size=SIZE)
    block = harness.attach(backend)
    fd = os.open(block.device, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\x11" * (1 << 20), 4 << 20)
        os.fsync(fd)
    finally:
        os.close(fd)
    run("blkdiscard", "-o", str(4 << 20), "-l", str(1 << 20), block.link)
    assert backend.discarded >= 1 << 20
    assert backend.read(4 << 20, 1 << 20) == bytes(1 << 20)
    block.detach()
    backend.close()


def test_failed_attach_leaves_nothing(harness: Harness, tmp_path: Path) -> None:
    backend = FileBackend(tmp_path / "backing.img", size=SIZE)
    taken = tmp_path / "dev" / "pool" / "vol"
    taken.parent.mkdir(parents=True)
    taken.write_text("not a symlink")
    with pytest.raises(ConflictError):
        harness.attach(backend)
    assert leftovers(tmp_path) == []
    backend.close()


class FailingBackend(FileBackend):
    """FileBackend whose writes fail (an I/O error of the backend) once ``failing`` is set."""

    failing = False

    def write(self, offset: int, data: BytesLike) -> None:
        if self.failing:
            raise IOFailure("injected write failure")
        super().write(offset, data)


def test_failed_writes_are_eio_logged_and_do_not_hold_the_device(
    harness: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Buffered writes that fail at writeback reach the writer's fsync as EIO, the pool
    server's log says why (once a second, not once a request), and detaching the device
    afterwards is not refused: fsync reports failed writeback once and no retry could
    write those pages (the case of a pool out of data space under a container)."""
    backend = FailingBackend(tmp_path / "backing.img", size=SIZE)
    block = harness.attach(backend)
    backend.failing = True
    with caplog.at_level(logging.ERROR, logger="thinmgr.engine.user.fuse_export"):
        fd = os.open(block.device, os.O_WRONLY)
        try:
            for _ in range(64):
                os.write(fd, b"x" * 65536)  # the loop device's page cache takes them
            with pytest.raises(OSError) as failed:
                os.fsync(fd)
            assert failed.value.errno == errno.EIO
        finally:
            os.close(fd)
        block.detach()
    logged = [r.getMessage() for r in caplog.records if "failed with EIO" in r.getMessage()]
    assert logged and "injected write failure" in logged[0]
    assert len(logged) <= 3, logged  # the writeback was many requests within a second or two
    assert leftovers(tmp_path) == []
    backend.close()
