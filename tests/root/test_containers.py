"""`thinmgr run|exec|ps|stop|rm|logs` on the real user engine (root tier), through the CLI.

One pool per module (made once: each CLI call costs about a second on a 2-core machine) holds
a busybox volume (``mkfs.ext4 -d`` of ``tests/support/busybox.py``'s tree) and the same tree
imported as the image ``bb``. Every test checks that what it ran left nothing behind: no
container device, no row, no cgroup, no loop device, no mount.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.busybox import populate_rootfs, rootfs_tar

pytestmark = pytest.mark.root

CLI = [sys.executable, "-m", "thinmgr"]


class Home:
    """A thinmgr home with one user-engine pool: a busybox volume ``bb`` and image ``bb``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = dict(os.environ, THINMGR_HOME=str(root / "home"))
        self.env.pop("THINMGR_TRACE_TIMINGS", None)
        self.pool = f"ct{os.getpid() % 10000}x{random.randrange(1 << 16):x}"
        self.volume = f"{self.pool}/bb"

    def cli(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*CLI, *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"thinmgr {' '.join(args)} -> {result.returncode}: {result}")
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.cli("--json", *args).stdout)

    def ps(self) -> dict[str, dict[str, Any]]:
        return {c["name"]: c for c in self.json("ps", "-a")}

    def devices(self) -> dict[str, dict[str, Any]]:
        return {v["name"]: v for v in self.json("volume", "list", self.pool)}

    def loops(self) -> list[str]:
        out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True)
        return [line for line in out.stdout.splitlines() if str(self.root) in line]

    def assert_clean(self, *names: str) -> None:
        """No container (row or device) left, nothing active, no cgroup of ``names``."""
        from thinmgr.runtime.cgroups import find_stale

        assert self.ps() == {}
        devices = self.devices()
        assert {n for n in devices if n.startswith("ctr-")} == set(), devices
        assert all(d["state"] == "inactive" for d in devices.values()), devices
        assert self.loops() == []
        stale = set(find_stale())
        assert stale.isdisjoint(names), stale
        assert list((self.root / "home" / "containers").glob("*/*")) == []


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    root = tmp_path_factory.mktemp("containers")
    h = Home(root)
    h.cli("pool", "create", h.pool, "--size", "1G", "--engine", "user")
    try:
        h.cli("volume", "create", h.pool, "bb", "--size", "128M")
        link = h.cli("volume", "activate", h.pool, "bb").stdout.strip()
        tree = populate_rootfs(root / "tree")
        subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), link], check=True)
        h.cli("volume", "deactivate", h.pool, "bb")
        h.cli("image", "import", h.pool, "bb", str(rootfs_tar(root / "bb.tar")), "--size", "128M")
        yield h
    finally:
        names = [c["name"] for c in h.json("ps", "-a")]
        if names:
            h.cli("rm", "-f", *names, check=False)
        h.cli("pool", "destroy", h.pool, "--force", check=False)
        for line in h.loops():
            subprocess.run(["losetup", "-d", line.split(":", 1)[0]], check=False)


@pytest.fixture
def clean(home: Home) -> Iterator[Home]:
    """The home, checked clean after the test (containers removed first when it failed)."""
    yield home
    home.assert_clean()


def test_run_rm_output_and_exit_codes(clean: Home) -> None:
    h = clean
    done = h.cli("run", "--rm", h.volume, "--", "sh", "-c", "echo --x; exit 3", check=False)
    assert (done.returncode, done.stdout) == (3, "--x\n"), done
    found = h.cli("run", "--rm", h.volume, "--", "/no/such/command", check=False)
    assert found.returncode == 127 and "No such file" in found.stderr, found
    denied = h.cli("run", "--rm", h.volume, "--", "/etc/passwd", check=False)
    assert denied.returncode == 126, denied
    killed = h.cli("run", "--rm", h.volume, "--", "sh", "-c", "kill -9 $$", check=False)
    assert killed.returncode == 137, killed


def test_environment_workdir_hostname_user(clean: Home) -> None:
    h = clean
    script = 'echo "$GREETING $FROM_HOST $(pwd) $(hostname) $(id -u)"'
    done = h.cli(
        "run", "--rm", "-e", "GREETING=hi", "-e", "FROM_HOST", "-w", "/etc",
        "--hostname", "box1", "-u", "nobody", h.volume, "--", "sh", "-c", script,
    )  # fmt: skip
    assert done.stdout == "hi  /etc box1 65534\n"
    h.env["FROM_HOST"] = "host-value"
    try:
        done = h.cli(
            "run", "--rm", "-e", "FROM_HOST", h.volume, "--", "sh", "-c", "echo $FROM_HOST"
        )
    finally:
        del h.env["FROM_HOST"]
    assert done.stdout == "host-value\n"


def test_image_target_and_writes_stay_in_the_container(clean: Home) -> None:
    h = clean
    h.cli("run", "--name", "writer", "bb", "--", "sh", "-c", "echo mine > /marker")
    assert h.ps()["writer"]["state"] == "exited" and h.ps()["writer"]["exit_code"] == 0
    assert h.ps()["writer"]["image"] == "bb:latest"
    # Neither the image nor another container from it sees the write; the volume neither.
    for target in ("bb", "bb:latest", h.volume):
        check = h.cli("run", "--rm", target, "--", "test", "-e", "/marker", check=False)
        assert check.returncode == 1, (target, check)
    # The writer's own device holds it.
    link = h.cli("volume", "activate", h.pool, "ctr-writer").stdout.strip()
    try:
        out = subprocess.run(
            ["debugfs", "-R", "cat /marker", link], capture_output=True, check=False
        )
        assert out.stdout == b"mine\n", out
    finally:
        h.cli("volume", "deactivate", h.pool, "ctr-writer")
    busy = h.cli("volume", "remove", h.pool, "ctr-writer", check=False)
    assert busy.returncode != 0 and "container" in busy.stderr
    h.cli("rm", "writer")
    missing = h.cli("rm", "writer", check=False)
    assert missing.returncode == 3 and "no container" in missing.stderr
    no_cmd = h.cli("run", "--rm", "bb", check=False)  # the rootfs tarball sets no Cmd
    assert no_cmd.returncode == 125 and "no command" in no_cmd.stderr


def test_read_only_root(clean: Home) -> None:
    h = clean
    script = "touch /x 2>/dev/null && echo root-writable; touch /tmp/y && echo tmp-writable"
    done = h.cli("run", "--rm", "--read-only", h.volume, "--", "sh", "-c", script)
    assert done.stdout == "tmp-writable\n"


def test_detached_ps_logs_exec_stop_rm(clean: Home) -> None:
    h = clean
    script = 'echo started; trap "echo got-term; exit 0" TERM; while :; do sleep 0.1; done'
    name = h.cli("run", "-d", "--name", "svc", h.volume, "--", "sh", "-c", script).stdout
    assert name.strip() == "svc"
    # --no-init: sh is PID 1 and, having no handler, ignores SIGTERM (pid-namespace init).
    h.cli("run", "-d", "--no-init", "--name", "deaf", h.volume, "--", "sleep", "60")
    running = {c["name"]: c for c in h.json("ps")}
    assert set(running) == {"svc", "deaf"} and running["svc"]["pid"] > 0
    deadline = time.monotonic() + 5
    while "started" not in h.cli("logs", "svc").stdout and time.monotonic() < deadline:
        time.sleep(0.1)
    assert h.cli("logs", "svc").stdout == "started\n"
    seen = h.cli("exec", "-e", "X=1", "svc", "--", "sh", "-c", "echo $X $(hostname); ps -o comm")
    assert seen.stdout.startswith("1 svc\n") and "sleep" in seen.stdout, seen.stdout
    assert h.cli("exec", "svc", "--", "sh", "-c", "exit 7", check=False).returncode == 7
    refused = h.cli("rm", "svc", check=False)
    assert refused.returncode == 5 and "running" in refused.stderr

    h.cli("stop", "svc")  # init forwards SIGTERM to sh, whose trap exits 0 ... as code 0
    started = time.monotonic()
    h.cli("stop", "--time", "1", "deaf")
    assert time.monotonic() - started >= 1.0
    states = h.ps()
    assert states["svc"]["state"] == "exited" and states["svc"]["exit_code"] == 0
    assert states["deaf"]["exit_code"] == 137
    assert h.cli("logs", "svc").stdout == "started\ngot-term\n"
    not_running = h.cli("exec", "svc", "--", "true", check=False)
    assert not_running.returncode == 125 and "not running" in not_running.stderr
    h.cli("run", "-d", "--name", "plain", h.volume, "--", "sleep", "60")
    h.cli("stop", "plain")  # with init: the SIGTERM kills sleep: 128 + 15
    assert h.ps()["plain"]["exit_code"] == 143
    h.cli("run", "-d", "--name", "forced", h.volume, "--", "sleep", "60")
    h.cli("rm", "svc", "deaf", "plain")
    h.cli("rm", "-f", "forced")
    h.assert_clean("svc", "deaf", "plain", "forced")


def test_memory_pids_and_io_limits(clean: Home) -> None:
    h = clean
    ok = h.cli("run", "--rm", "-m", "32m", h.volume, "--", "dd", "if=/dev/zero", "of=/dev/null",
               "bs=8M", "count=1")  # fmt: skip
    assert ok.returncode == 0
    oom = h.cli("run", "--rm", "-m", "32m", h.volume, "--", "dd", "if=/dev/zero",
                "of=/dev/null", "bs=100M", "count=1", check=False)  # fmt: skip
    assert oom.returncode == 137, oom
    forks = "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 1 & done 2>&1; wait"
    pids = h.cli("run", "--rm", "--pids-limit", "10", h.volume, "--", "sh", "-c", forks,
                 check=False)  # fmt: skip
    assert "can't fork" in pids.stdout + pids.stderr, pids
    write = "dd if=/dev/zero of=/f bs=1M count=3 oflag=direct 2>/dev/null"
    started = time.monotonic()
    h.cli("run", "--rm", "--device-write-bps", "1m", h.volume, "--", "sh", "-c", write)
    assert time.monotonic() - started >= 2.5
    own = f"/dev/thinmgr/{h.pool}/ctr-io"
    done = h.cli("run", "--rm", "--name", "io", "--device-read-bps", f"{own}:10m", h.volume,
                 "--", "true")  # fmt: skip
    assert done.returncode == 0
    other = h.cli("run", "--rm", "--device-read-bps", "/dev/sda:1m", h.volume, "--", "true",
                  check=False)  # fmt: skip
    assert other.returncode == 125 and "not this container's volume" in other.stderr


BAD_INPUT = [
    (("--memory", "banana"), "not a size"),
    (("--cpus", "999"), "online CPUs"),
    (("--cpus", "abc"), "not a valid float"),
    (("--cpuset-cpus", "7-9"), "not online"),
    (("--net", "bridge"), "not supported"),
    (("-w", "relative"), "not absolute"),
    (("-e", "=x"), "no name"),
]


def test_bad_input_is_125_and_leaves_nothing(clean: Home) -> None:
    for args, message in BAD_INPUT:
        bad = clean.cli("run", "--rm", "--name", "bad", *args, clean.volume, "--", "true",
                        check=False)  # fmt: skip
        assert bad.returncode == 125 and message in bad.stderr, (args, bad)
    clean.assert_clean("bad")


def test_setup_failures_leave_nothing(clean: Home) -> None:
    h = clean
    unknown = h.cli("run", "--name", "u1", "no-such-image", "--", "true", check=False)
    assert unknown.returncode == 125 and "no image" in unknown.stderr
    for command in (["/no/such"], ["/etc/passwd"]):  # 127/126: never started, nothing kept
        failed = h.cli("run", "--name", "u2", h.volume, "--", *command, check=False)
        assert failed.returncode in (126, 127)
    h.assert_clean("u1", "u2")
    h.cli("run", "--name", "dup", h.volume, "--", "true")
    taken = h.cli("run", "--name", "dup", h.volume, "--", "true", check=False)
    assert taken.returncode == 125 and "already exists" in taken.stderr
    h.cli("rm", "dup")


def test_sigkill_of_foreground_run_is_reconciled(clean: Home) -> None:
    h = clean
    process = subprocess.Popen(
        [*CLI, "run", "--name", "victim", h.volume, "--", "sleep", "60"],
        env=h.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        pid = 0
        deadline = time.monotonic() + 20
        while not pid and time.monotonic() < deadline:
            pid = next((c["pid"] for c in h.json("ps") if c["name"] == "victim"), 0)
            time.sleep(0.1)
        assert pid, "the container did not start"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        deadline = time.monotonic() + 5  # PDEATHSIG: the container dies with its launcher
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{pid}").exists()
        victim = h.ps()["victim"]
        assert victim["state"] == "exited" and victim["pid"] is None
        assert h.devices()["ctr-victim"]["state"] == "inactive"
        from thinmgr.runtime.cgroups import find_stale

        assert "victim" not in find_stale()
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()
    h.cli("rm", "victim")


def test_full_pool_is_named_and_leaves_nothing(clean: Home) -> None:
    """A container on a pool out of data space: its mount fails with a bare EIO from ext4 (the
    first write of the snapshot needs a block); the error must name the full pool, and the
    removal of the half-made container must not be deferred by the writes that failed."""
    h = clean
    pool = f"{h.pool}f"
    h.cli("pool", "create", pool, "--size", "32M", "--engine", "user")
    try:
        h.cli("volume", "create", pool, "bb", "--size", "64M")
        link = h.cli("volume", "activate", pool, "bb").stdout.strip()
        subprocess.run(["mkfs.ext4", "-q", "-d", str(h.root / "tree"), link], check=True)
        h.cli("volume", "deactivate", pool, "bb")
        h.cli("volume", "create", pool, "filler", "--size", "64M")
        filler = h.cli("volume", "activate", pool, "filler").stdout.strip()
        filled = subprocess.run(
            ["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "oflag=direct"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert "No space left" in filled.stderr, filled
        failed = h.cli("run", "--rm", "--name", "full", f"{pool}/bb", "--", "true", check=False)
        assert failed.returncode == 125, failed
        assert f"pool {pool!r} is out of data space" in failed.stderr, failed.stderr
        assert "thinmgr pool extend" in failed.stderr
        volumes = {v["name"]: v for v in h.json("volume", "list", pool)}
        assert set(volumes) == {"bb", "filler"}, volumes  # no ctr-full, not even "deleting"
        loops = [line for line in h.loops() if f"/{pool}/" in line]
        assert len(loops) == 1, loops  # the filler's alone
    finally:
        h.cli("volume", "deactivate", pool, "filler", check=False)
        h.cli("pool", "destroy", pool, "--force", check=False)


def test_writes_of_the_detached_supervisor_are_kept(clean: Home) -> None:
    """The supervisor of a detached container is a fork of `thinmgr run`; when the container
    ends it records the exit and, under the pool lock, finishes pending work, here a removal
    deferred while the device was busy. An earlier build forked it with open SQLite
    connections, and its writes were lost once another thinmgr process closed the catalog:
    the pool had deleted the device, the catalog never knew (doctor: transaction-id-drift)."""
    h = clean
    h.cli("run", "--detach", "--name", "sup", "bb", "--", "sleep", "600")
    h.cli("volume", "create", h.pool, "held", "--size", "16M")
    device = h.cli("volume", "activate", h.pool, "held").stdout.strip()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time; os.open(sys.argv[1], os.O_RDONLY | "
         "os.O_EXCL); print('held', flush=True); time.sleep(600)", device],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        removed = h.cli("volume", "remove", h.pool, "held", "--force")
        assert "deferred" in removed.stderr, removed
        assert h.devices()["held"]["state"] == "deleting"
    finally:
        holder.kill()
        holder.wait()
    h.cli("rm", "-f", "sup")  # the supervisor finishes the removal as it deactivates
    assert "held" not in h.devices()
    doctor = h.cli("doctor", check=False)
    assert doctor.returncode == 0 and "agree" in doctor.stdout, doctor
