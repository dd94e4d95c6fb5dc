"""The user engine end to end: pools on sparse files, volumes as real block devices.

ext4 on a thin volume, snapshots of a live (frozen) origin, deactivate/reactivate, a server
killed with SIGKILL mid-write, and a pool running out of data space. Every test leaves no loop
device, FUSE mount or server process behind, even when it fails (the fixture checks and
cleans up by force).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from thinmgr.engine.base import PoolSpec
from thinmgr.engine.user.engine import UserEngine
from thinmgr.errors import BusyError

pytestmark = pytest.mark.root

BLOCK_SECTORS = 128  # 64 KiB data blocks
BLOCK_BYTES = BLOCK_SECTORS * 512


def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], check=check, capture_output=True, text=True)


def leftovers(root: Path) -> list[str]:
    found = [line for line in run("losetup", "-a").stdout.splitlines() if str(root) in line]
    with open("/proc/mounts", encoding="utf-8") as mounts:
        found += [line.strip() for line in mounts if str(root) in line.split()[1]]
    pid_file = root / "run" / "server.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        if Path(f"/proc/{pid}").exists():
            found.append(f"server process {pid}")
    return found


class Pool:
    def __init__(self, root: Path, *, data_bytes: int, linger: float = 0.0) -> None:
        self.root = root
        (root / "meta").write_bytes(b"")
        os.truncate(root / "meta", 16 << 20)
        (root / "data").write_bytes(b"")
        os.truncate(root / "data", data_bytes)
        self.spec = PoolSpec(
            "tpool", root / "meta", root / "data", root / "run", data_block_sectors=BLOCK_SECTORS
        )
        # No linger by default: these tests check that the server is gone the moment its
        # last volume is (test_server_lingers_after_its_last_volume checks the linger).
        self.engine = UserEngine(dev_root=root / "dev", linger=linger)
        self.engine.format_pool(self.spec, nr_data_blocks=data_bytes // BLOCK_BYTES)
        self.mounts: list[Path] = []
        self.started: list[int] = []  # server pids seen, to kill by id if a test fails

    def activate(self, dev: int, name: str, size: int, *, read_only: bool = False) -> Path:
        link = self.engine.activate_volume(
            self.spec, dev, name=name, size_bytes=size, read_only=read_only
        )
        with contextlib.suppress(OSError, ValueError):
            self.started.append(int((self.spec.run_dir / "server.pid").read_text()))
        return link

    def mount(self, link: Path, name: str, *options: str) -> Path:
        point = self.root / "mnt" / name
        point.mkdir(parents=True, exist_ok=True)
        run("mount", *(("-o", ",".join(options)) if options else ()), link, point)
        self.mounts.append(point)
        return point

    def umount(self, point: Path) -> None:
        run("umount", point)
        self.mounts.remove(point)

    def thin_check(self) -> None:
        result = run("thin_check", self.spec.metadata, check=False)
        assert result.returncode == 0, result.stderr + result.stdout

    def server_pid(self) -> int | None:
        try:
            return int((self.spec.run_dir / "server.pid").read_text())
        except (OSError, ValueError):
            return None

    def cleanup(self) -> None:
        for point in list(self.mounts):
            run("umount", "-l", point, check=False)
        for dev in range(8):
            with contextlib.suppress(Exception):
                self.engine.deactivate_volume(self.spec, dev)
        for pid in self.started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        with contextlib.suppress(Exception):
            self.engine.cleanup_stale(self.spec)


@contextlib.contextmanager
def make_pool(root: Path, *, data_bytes: int, linger: float = 0.0) -> Iterator[Pool]:
    pool = Pool(root, data_bytes=data_bytes, linger=linger)
    try:
        yield pool
    finally:
        leaked = leftovers(root)
        pool.cleanup()
        assert leaked == [], f"left behind: {leaked}"
        assert leftovers(root) == []


def write_files(directory: Path, total_mib: int, prefix: str) -> dict[str, str]:
    sums = {}
    chunk = os.urandom(1 << 20)
    for index in range(total_mib // 16):
        name = f"{prefix}{index}"
        digest = hashlib.sha256()
        with open(directory / name, "wb") as f:
            for part in range(16):
                data = chunk[part:] + chunk[:part] + index.to_bytes(4, "little")
                f.write(data)
                digest.update(data)
        sums[name] = digest.hexdigest()
    return sums


def read_sums(directory: Path) -> dict[str, str]:
    out = {}
    for path in sorted(directory.iterdir()):
        if path.is_file():
            out[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def test_ext4_snapshot_deactivate_reactivate(tmp_path: Path) -> None:
    with make_pool(tmp_path, data_bytes=2 << 30) as pool:
        engine, spec = pool.engine, pool.spec
        engine.create_thin(spec, 1)
        origin = pool.activate(1, "origin", 1 << 30)
        run("mkfs.ext4", "-q", "-F", origin)
        point = pool.mount(origin, "origin")
        before = write_files(point, 256, "a")
        os.sync()

        run("fsfreeze", "-f", point)  # as the manager does before a live snapshot
        try:
            with engine.suspended(spec, 1):
                engine.create_snapshot(spec, 2, 1)
        finally:
            run("fsfreeze", "-u", point)

        # change the origin after the snapshot: delete one file, rewrite another, add some
        (point / "a0").unlink()
        (point / "a1").write_bytes(os.urandom(3 << 20))
        after = write_files(point, 64, "b")
        os.sync()

        snap = pool.activate(2, "snap", 1 << 30, read_only=True)
        snap_point = pool.mount(snap, "snap", "ro", "noload")
        drop_caches()
        assert {k: v for k, v in read_sums(snap_point).items() if k[0] in "ab"} == before
        expected_origin = {k: v for k, v in before.items() if k not in ("a0", "a1")} | after
        origin_now = read_sums(point)
        assert {k: v for k, v in origin_now.items() if k != "a1" and k[0] in "ab"} == (
            expected_origin
        )

        with pytest.raises(BusyError):
            engine.deactivate_volume(spec, 1)  # mounted: refused, even with force
        with pytest.raises(BusyError):
            engine.deactivate_volume(spec, 1, force=True)
        pool.umount(snap_point)
        pool.umount(point)
        engine.deactivate_volume(spec, 2)
        engine.deactivate_volume(spec, 1)
        assert pool.server_pid() is None and not (spec.run_dir / "server.sock").exists()
        assert not os.path.lexists(origin)
        pool.thin_check()
        assert engine.thin_ids(spec) == {1, 2}

        origin = pool.activate(1, "origin", 1 << 30)
        point = pool.mount(origin, "origin")
        assert read_sums(point) == origin_now
        status = engine.volume_status(spec, 1)
        assert status.active and status.open_count >= 1 and status.mapped_blocks > 0
        pool.umount(point)
        engine.deactivate_volume(spec, 1)
        pool.thin_check()


def test_sigkill_server_mid_write_reopens_at_last_commit(tmp_path: Path) -> None:
    with make_pool(tmp_path, data_bytes=1 << 30) as pool:
        engine, spec = pool.engine, pool.spec
        engine.create_thin(spec, 1)
        link = pool.activate(1, "vol", 256 << 20)
        flushed = os.urandom(32 << 20)
        fd = os.open(link, os.O_WRONLY)
        try:
            os.write(fd, flushed)
            os.fsync(fd)  # flush = commit
        finally:
            os.close(fd)
        writer = subprocess.Popen(
            [
                "dd",
                "if=/dev/urandom",
                f"of={link}",
                "bs=1M",
                "seek=64",
                "count=150",
                "oflag=direct",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.3)
            pid = pool.server_pid()
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        finally:
            writer.kill()
            writer.wait()
        cleaned = engine.cleanup_stale(spec)
        assert any("dead FUSE mount" in line for line in cleaned), cleaned
        assert leftovers(tmp_path) == [] or all("loop" in x for x in leftovers(tmp_path))
        deadline = time.monotonic() + 10
        while leftovers(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)  # the loop device autoclears once dd has let go
        pool.thin_check()
        link = pool.activate(1, "vol", 256 << 20)
        with open(link, "rb", buffering=0) as f:
            assert f.read(len(flushed)) == flushed
        engine.deactivate_volume(spec, 1)
        pool.thin_check()


def test_enospc_then_extend(tmp_path: Path) -> None:
    with make_pool(tmp_path, data_bytes=4 << 20) as pool:  # 64 data blocks of 64 KiB
        engine, spec = pool.engine, pool.spec
        engine.create_thin(spec, 1)
        link = pool.activate(1, "vol", 64 << 20)
        started = time.monotonic()
        result = run(
            "dd",
            "if=/dev/urandom",
            f"of={link}",
            "bs=1M",
            "count=16",
            "oflag=direct",
            check=False,
        )
        elapsed = time.monotonic() - started
        assert result.returncode != 0 and "No space left on device" in result.stderr
        assert elapsed < 1.5
        status = engine.pool_status(spec)
        assert status.used_data_blocks == status.total_data_blocks == 64
        engine.deactivate_volume(spec, 1)
        pool.thin_check()

        os.truncate(spec.data, 8 << 20)
        link = pool.activate(1, "vol", 64 << 20)
        engine.extend_pool(spec, nr_data_blocks=128)
        data = os.urandom(4 << 20)
        fd = os.open(link, os.O_WRONLY)
        try:
            os.pwrite(fd, data, 8 << 20)
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(link, "rb", buffering=0) as f:
            f.seek(8 << 20)
            assert f.read(len(data)) == data
        assert engine.pool_status(spec).total_data_blocks == 128
        engine.deactivate_volume(spec, 1)
        pool.thin_check()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    return False


def _wait_exit(pid: int, timeout: float) -> None:
    """The server lets go of the pool (lock, socket, pid file) before its interpreter exits."""
    deadline = time.monotonic() + timeout
    while _alive(pid):
        assert time.monotonic() < deadline, f"server {pid} still runs after {timeout:g} s"
        time.sleep(0.02)


def test_server_lingers_after_its_last_volume(tmp_path: Path) -> None:
    """With a linger the server outlives its last volume by that long: a new activation in
    the meantime reuses it, commands go to it, and it stops by itself afterwards; `stop`
    (deactivate_pool) and stop_idle_server end a lingering server at once."""
    with make_pool(tmp_path, data_bytes=64 << 20, linger=1.0) as pool:
        engine, spec = pool.engine, pool.spec
        engine.create_thin(spec, 1)
        pool.activate(1, "vol", 16 << 20)
        first = pool.server_pid()
        assert first is not None
        engine.deactivate_volume(spec, 1)
        assert pool.server_pid() == first and _alive(first)
        assert engine.thin_ids(spec) == {1}  # answered by the lingering server
        engine.create_thin(spec, 2)  # a message: committed by it, as always
        pool.activate(2, "two", 16 << 20)
        assert pool.server_pid() == first  # reused, not restarted
        engine.deactivate_volume(spec, 2)
        _wait_exit(first, 10)
        assert pool.server_pid() is None and not (spec.run_dir / "server.sock").exists()
        pool.thin_check()
        assert engine.thin_ids(spec) == {1, 2}  # in-process again, as committed

        pool.activate(1, "vol", 16 << 20)
        second = pool.server_pid()
        assert second is not None and second != first
        engine.deactivate_volume(spec, 1)
        started = time.monotonic()
        engine.deactivate_pool(spec)  # `pool deactivate`/`pool destroy`: at once
        assert time.monotonic() - started < 0.9 and pool.server_pid() is None
        _wait_exit(second, 2)

        pool.activate(1, "vol", 16 << 20)
        third = pool.server_pid()
        assert third is not None
        assert not engine.stop_idle_server(spec)  # a volume is active: it stays
        engine.deactivate_volume(spec, 1)
        started = time.monotonic()
        assert engine.stop_idle_server(spec)  # `doctor --fix`: at once
        assert time.monotonic() - started < 0.9 and pool.server_pid() is None
        _wait_exit(third, 2)
