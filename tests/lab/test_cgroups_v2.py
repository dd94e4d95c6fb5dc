"""cgroup v2 limits in the kernel lab guest (cgroup2 mounted on /sys/fs/cgroup).

The guest runs the tests from its root cgroup, so the container cgroups are
/sys/fs/cgroup/thinmgr/<name>. The guest CPU is emulated (TCG) and slow: the checks use
small sizes and only upper bounds on CPU time.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.forked import in_child
from thinmgr.runtime.cgroups import UNIFIED, ContainerCgroups, Limits

pytestmark = pytest.mark.lab

_counter = itertools.count()


@pytest.fixture
def make_cgroups() -> Iterator[Callable[..., ContainerCgroups]]:
    made: list[ContainerCgroups] = []

    def make(
        limits: Limits | None = None, block_device: tuple[int, int] | None = None
    ) -> ContainerCgroups:
        cgroups = ContainerCgroups.create(
            f"v2-{next(_counter)}", limits or Limits(), block_device=block_device
        )
        made.append(cgroups)
        return cgroups

    yield make
    for cgroups in made:
        cgroups.kill_all()
        cgroups.remove()
        assert not os.path.exists(cgroups.paths()[UNIFIED])


def test_v2_layout_and_limit_files(make_cgroups: Callable[..., ContainerCgroups]) -> None:
    cgroups = make_cgroups(Limits(memory_bytes=32 << 20, cpus=0.5, cpu_shares=512, pids_limit=9))
    assert cgroups.version == 2
    path = Path(cgroups.paths()[UNIFIED])
    own = Path("/proc/self/cgroup").read_text().strip().removeprefix("0::")
    assert path == Path("/sys/fs/cgroup", own.lstrip("/"), "thinmgr", cgroups.name)
    assert (path / "memory.max").read_text() == f"{32 << 20}\n"
    if (path / "memory.swap.max").exists():
        assert (path / "memory.swap.max").read_text() == "0\n"
    assert (path / "cpu.max").read_text() == "50000 100000\n"
    assert (path / "cpu.weight").read_text() == "20\n"
    assert (path / "pids.max").read_text() == "9\n"
    assert any("not filtered" in w for w in cgroups.warnings())


def test_v2_memory_max_oom_kills(make_cgroups: Callable[..., ContainerCgroups]) -> None:
    cgroups = make_cgroups(Limits(memory_bytes=24 << 20))

    def body() -> bytes:
        hog = bytearray(b"\x01") * (64 << 20)
        return str(len(hog)).encode()

    status, out = in_child(cgroups, body)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, out
    assert cgroups.stats()["oom_kills"] >= 1


def test_v2_pids_max_refuses_forks(make_cgroups: Callable[..., ContainerCgroups]) -> None:
    cgroups = make_cgroups(Limits(pids_limit=3))

    def body() -> bytes:
        forked = 0
        try:
            for _ in range(10):
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                forked += 1
        except BlockingIOError:
            return f"refused after {forked}".encode()
        return f"not refused after {forked}".encode()

    status, out = in_child(cgroups, body)
    assert os.waitstatus_to_exitcode(status) == 0
    assert out == b"refused after 2", out
    assert len(cgroups.pids()) == 2
    cgroups.kill_all()  # cgroup.kill
    assert cgroups.pids() == []


def test_v2_cpu_max_throttles(make_cgroups: Callable[..., ContainerCgroups]) -> None:
    cgroups = make_cgroups(Limits(cpus=0.2))

    def body() -> bytes:
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            pass
        return b"done"

    started = time.monotonic()
    _, out = in_child(cgroups, body)
    elapsed = time.monotonic() - started
    assert out == b"done"
    stat = dict(
        line.split() for line in Path(cgroups.paths()[UNIFIED], "cpu.stat").read_text().splitlines()
    )
    assert int(stat["nr_throttled"]) >= 1
    assert int(stat["usage_usec"]) / 1e6 / elapsed <= 0.35


def test_v2_io_max_throttles_direct_writes(
    make_cgroups: Callable[..., ContainerCgroups], tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    device = subprocess.run(
        ["losetup", "-f", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        rdev = os.stat(device).st_rdev
        number = (os.major(rdev), os.minor(rdev))
        cgroups = make_cgroups(Limits(device_write_bps=1 << 20), block_device=number)
        io_max = Path(cgroups.paths()[UNIFIED], "io.max").read_text()
        assert io_max.startswith(f"{number[0]}:{number[1]} rbps=max wbps={1 << 20} ")

        def body() -> bytes:
            started = time.monotonic()
            subprocess.run(
                ["dd", "if=/dev/zero", f"of={device}", "bs=512K", "count=4", "oflag=direct"],
                check=True,
                capture_output=True,
            )
            return f"{time.monotonic() - started:.3f}".encode()

        status, out = in_child(cgroups, body)
        assert os.waitstatus_to_exitcode(status) == 0, out
        assert float(out) >= 1.5, f"2 MiB at 1 MiB/s took only {out.decode()} s"
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def test_v2_cleanup_leaves_nothing(make_cgroups: Callable[..., ContainerCgroups]) -> None:
    cgroups = make_cgroups()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        cgroups.join(0)
        time.sleep(30)
        os._exit(0)
    deadline = time.monotonic() + 5
    while not cgroups.pids() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cgroups.pids() == [pid]
    cgroups.kill_all()
    os.waitpid(pid, 0)
    cgroups.remove()
    cgroups.remove()
    assert not os.path.exists(cgroups.paths()[UNIFIED])
    assert not os.path.exists(os.path.dirname(cgroups.paths()[UNIFIED]))
