"""cgroup limits on the real kernel (cgroup v1 hybrid on the development and CI machines).

Each test forks a child that joins a fresh ``ContainerCgroups`` and then does what the limit
must stop; the parent checks the outcome and that nothing is left behind.
"""

from __future__ import annotations

import itertools
import os
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.forked import in_child
from thinmgr.runtime.cgroups import ContainerCgroups, Limits, parse_proc_cgroup

pytestmark = pytest.mark.root

_counter = itertools.count()


def _v1_or_skip() -> None:
    if not os.path.isdir("/sys/fs/cgroup/memory"):
        pytest.skip("these tests are for cgroup v1 (see tests/lab/test_cgroups_v2.py)")


@pytest.fixture
def make_cgroups() -> Iterator[Callable[..., ContainerCgroups]]:
    _v1_or_skip()
    made: list[ContainerCgroups] = []

    def make(
        limits: Limits | None = None, block_device: tuple[int, int] | None = None
    ) -> ContainerCgroups:
        cgroups = ContainerCgroups.create(
            f"t{os.getpid()}-{next(_counter)}", limits or Limits(), block_device=block_device
        )
        made.append(cgroups)
        return cgroups

    yield make
    for cgroups in made:
        cgroups.kill_all()
        cgroups.remove()
        assert not any(os.path.exists(p) for p in cgroups.paths().values())


def test_cgroups_nest_under_the_callers_own(make_cgroups: Callable[..., ContainerCgroups]) -> None:
    own = parse_proc_cgroup(Path("/proc/self/cgroup").read_text())
    cgroups = make_cgroups()
    memory = cgroups.paths()["memory"]
    expected = os.path.normpath(f"/sys/fs/cgroup/memory/{own['memory']}/thinmgr/{cgroups.name}")
    assert memory == expected
    assert cgroups.version == 1
    assert "devices" in cgroups.paths() and "freezer" in cgroups.paths()

    def body() -> bytes:
        return Path("/proc/self/cgroup").read_bytes()

    status, out = in_child(cgroups, body)
    assert os.waitstatus_to_exitcode(status) == 0, out
    seen = parse_proc_cgroup(out.decode())
    assert seen["memory"] == f"{own['memory'].rstrip('/')}/thinmgr/{cgroups.name}"
    assert seen["pids"].endswith(f"/thinmgr/{cgroups.name}")
    assert seen["devices"] == own["devices"]  # devices is joined separately


def test_memory_limit_oom_kills(make_cgroups: Callable[..., ContainerCgroups]) -> None:
    cgroups = make_cgroups(Limits(memory_bytes=32 << 20))
    memsw = Path(cgroups.paths()["memory"], "memory.memsw.limit_in_bytes")
    if memsw.exists():
        assert int(memsw.read_text()) == 32 << 20

    def body() -> bytes:
        hog = bytearray(b"\x01") * (128 << 20)  # touches every page
        return str(len(hog)).encode()

    status, out = in_child(cgroups, body)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, out
    stats = cgroups.stats()
    assert stats["oom_kills"] >= 1
    assert stats["memory_peak_bytes"] <= 32 << 20


def test_pids_limit_refuses_forks(make_cgroups: Callable[..., ContainerCgroups]) -> None:
    cgroups = make_cgroups(Limits(pids_limit=5))

    def body() -> bytes:
        forked = 0
        try:
            for _ in range(20):
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                forked += 1
        except BlockingIOError:  # EAGAIN from the pids controller
            return f"refused after {forked}".encode()
        return f"not refused after {forked}".encode()

    status, out = in_child(cgroups, body)
    assert os.waitstatus_to_exitcode(status) == 0
    assert out == b"refused after 4", out  # the child itself is the fifth task
    assert len(cgroups.pids()) == 4  # the sleepers (the fixture's kill_all ends them)


def test_cpu_quota_holds(make_cgroups: Callable[..., ContainerCgroups]) -> None:
    cgroups = make_cgroups(Limits(cpus=0.2))
    wall = 1.5

    def body() -> bytes:
        end = time.monotonic() + wall
        while time.monotonic() < end:
            pass
        return b"done"

    started = time.monotonic()
    _, out = in_child(cgroups, body)
    elapsed = time.monotonic() - started
    assert out == b"done"
    share = cgroups.stats()["cpu_usage_us"] / 1e6 / elapsed
    assert 0.08 <= share <= 0.35, f"used {share:.0%} of one CPU with a 20 % quota"
    throttled = Path(cgroups.paths()["cpu"], "cpu.stat").read_text()
    assert "nr_throttled 0\n" not in throttled


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    device = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def test_write_bps_throttles_direct_writes(
    make_cgroups: Callable[..., ContainerCgroups], loop_device: str
) -> None:
    rdev = os.stat(loop_device).st_rdev
    device = (os.major(rdev), os.minor(rdev))
    cgroups = make_cgroups(Limits(device_write_bps=1 << 20), block_device=device)
    assert any("buffered" in w for w in cgroups.warnings())
    line = Path(cgroups.paths()["blkio"], "blkio.throttle.write_bps_device").read_text()
    assert line.split() == [f"{device[0]}:{device[1]}", str(1 << 20)]

    def body() -> bytes:
        started = time.monotonic()
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={loop_device}", "bs=1M", "count=3", "oflag=direct"],
            check=True,
            capture_output=True,
        )
        return f"{time.monotonic() - started:.3f}".encode()

    status, out = in_child(cgroups, body)
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert float(out) >= 2.5, f"3 MiB at 1 MiB/s took only {out.decode()} s"


def test_devices_cgroup_denies_other_devices(
    make_cgroups: Callable[..., ContainerCgroups], tmp_path: Path
) -> None:
    cgroups = make_cgroups()
    fuse = tmp_path / "fuse"  # c 10:229, not on the allow-list (and present here)
    null = tmp_path / "null"
    os.mknod(fuse, 0o600 | stat.S_IFCHR, os.makedev(10, 229))
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.close(os.open(fuse, os.O_RDWR))  # allowed outside the container's cgroup

    def body() -> bytes:
        os.close(os.open(null, os.O_RDWR))
        try:
            os.close(os.open(fuse, os.O_RDWR))
        except PermissionError:
            return b"denied"
        return b"allowed"

    status, out = in_child(cgroups, body, devices=True)
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert out == b"denied"


def test_kill_all_and_remove_leave_nothing(make_cgroups: Callable[..., ContainerCgroups]) -> None:
    cgroups = make_cgroups(Limits(memory_bytes=64 << 20))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        cgroups.join(0)
        cgroups.join_devices(0)
        for _ in range(3):
            if os.fork() == 0:
                break
        os.write(w, b".")
        time.sleep(60)
        os._exit(0)
    os.close(w)
    deadline = time.monotonic() + 5
    while len(cgroups.pids()) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(cgroups.pids()) >= 4
    reopened = ContainerCgroups.from_paths(cgroups.paths())  # as `thinmgr stop` would
    reopened.kill_all()
    assert reopened.pids() == []
    _, status = os.waitpid(pid, 0)
    os.close(r)
    assert os.WTERMSIG(status) == signal.SIGKILL
    reopened.remove()
    reopened.remove()  # idempotent
    for path in cgroups.paths().values():
        assert not os.path.exists(path)
    # the shared thinmgr/ level goes too once no container uses it
    assert not os.path.exists(os.path.dirname(cgroups.paths()["pids"]))


def test_a_leftover_cgroup_of_the_same_name_is_replaced(
    make_cgroups: Callable[..., ContainerCgroups],
) -> None:
    first = make_cgroups(Limits(memory_bytes=64 << 20))
    second = ContainerCgroups.create(first.name, Limits(memory_bytes=32 << 20), block_device=None)
    limit = Path(second.paths()["memory"], "memory.limit_in_bytes").read_text()
    assert int(limit) == 32 << 20
    second.remove()
