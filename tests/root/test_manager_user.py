"""The manager's commands on the real user engine (root tier): pools, volumes, snapshots, doctor.

Command-level tests run the CLI in subprocesses; the crash and concurrency tests fork workers
that call the same use cases (``thinmgr.ops``) in-process, so that 100+ SIGKILL trials and 2 x
50 operations fit in a few tens of seconds on a 2-core machine. Crash points are injected
with the test-only ``THINMGR_TEST_CRASH_AT`` (``ops/journal.py``) or hit by a kill after a
random delay. Every test leaves no mount, loop device, FUSE mount, link or server behind,
even when it fails (``Env.cleanup``), and fails if the code under test left any.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from thinmgr.engine.user.engine import DEV_ROOT
from thinmgr.errors import ThinmgrError
from thinmgr.ops.journal import CRASH_ENV
from thinmgr.ops.manager import Manager, open_manager

pytestmark = pytest.mark.root

CLI = [sys.executable, "-c", "from thinmgr.cli.main import main; main()"]


def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], check=check, capture_output=True, text=True)


class Env:
    """A thinmgr home in a temporary directory, and everything a test made from it."""

    def __init__(self, root: Path, tag: str) -> None:
        self.root = root
        self.home = root / "home"
        self.tag = tag  # pool names start with it: /dev/thinmgr/NAME links are global
        self.mounts: list[Path] = []
        # No server linger: these tests check that a pool's server is gone as soon as its
        # last volume is (test_user_engine.py checks the linger itself).
        self.env = dict(os.environ, THINMGR_HOME=str(self.home), THINMGR_SERVER_LINGER="0")
        self.env.pop(CRASH_ENV, None)

    def pool_name(self, suffix: str) -> str:
        return f"{self.tag}{suffix}"

    def cli(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*CLI, *map(str, args)],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"thinmgr {' '.join(map(str, args))}: {result.stderr}")
        return result

    def json(self, *args: str | Path) -> Any:
        return json.loads(self.cli("--json", *args).stdout)

    def mount(self, device: str | Path, name: str) -> Path:
        point = self.root / "mnt" / name
        point.mkdir(parents=True, exist_ok=True)
        run("mount", device, point)
        self.mounts.append(point)
        return point

    def umount(self, point: Path) -> None:
        run("umount", point)
        self.mounts.remove(point)

    def leftovers(self) -> list[str]:
        found = [
            line for line in run("losetup", "-a").stdout.splitlines() if str(self.root) in line
        ]
        with open("/proc/mounts", encoding="utf-8") as mounts:
            found += [line.strip() for line in mounts if str(self.root) in line.split()[1]]
        for pid in self._server_pids():
            found.append(f"server process {pid}")
        if DEV_ROOT.is_dir():
            found += [
                f"link dir {d}"
                for d in DEV_ROOT.iterdir()
                if d.name.startswith(self.tag) and any(d.iterdir())
            ]
        return found

    def _server_pids(self) -> list[int]:
        pids = []
        for pid_file in (self.home / "run").glob("*/server.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text())
                if Path(f"/proc/{pid}").exists():
                    pids.append(pid)
        return pids

    def cleanup(self) -> None:
        """Remove by force whatever is left (a failed test): mounts, servers, FUSE, loops."""
        for point in reversed(self.mounts):
            run("umount", "-l", point, check=False)
        for pid in self._server_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        for line in run("losetup", "-a").stdout.splitlines():
            if str(self.root) in line:
                run("losetup", "-d", line.split(":", 1)[0], check=False)
        with open("/proc/mounts", encoding="utf-8") as mounts:
            points = [line.split()[1] for line in mounts if str(self.root) in line.split()[1]]
        for point in reversed(points):
            run("umount", "-l", point, check=False)
        if DEV_ROOT.is_dir():
            for directory in DEV_ROOT.iterdir():
                if directory.name.startswith(self.tag):
                    for link in directory.iterdir():
                        link.unlink()
                    directory.rmdir()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    # Pool servers stop with their last volume here, also those a test starts in-process:
    # the leftover check below must not mistake a lingering server for a leaked one.
    monkeypatch.setenv("THINMGR_SERVER_LINGER", "0")
    e = Env(tmp_path, f"t{os.getpid() % 10000}x{random.randrange(1 << 16):x}")
    try:
        yield e
    finally:
        leaked = e.leftovers()
        e.cleanup()
        assert leaked == [], f"left behind: {leaked}"
        assert e.leftovers() == []


def assert_agree(home: Path, pool: str) -> None:
    """Catalog and pool agree (ids, transaction id), doctor is silent, thin_check is clean."""
    from thinmgr.catalog.models import Device, Pool
    from thinmgr.ops.doctor import doctor
    from thinmgr.ops.manager import get_pool

    with open_manager(home) as mgr:
        assert [f.as_dict() for f in doctor(mgr)] == []
        with mgr.catalog.read() as session:
            row = get_pool(session, pool)
            ids = {d.thin_id for d in session.query(Device).filter(Device.pool_id == row.id)}
            tid, pending = row.transaction_id, row.pending_transaction_id
            assert session.get(Pool, row.id) is not None
        h = mgr.find(pool)
        assert pending is None
        assert h.engine.thin_ids(h.spec) == ids
        assert h.engine.pool_status(h.spec).transaction_id == tid
        if not (h.spec.run_dir / "server.sock").exists():  # thin_check the file when idle
            result = run("thin_check", h.spec.metadata, check=False)
            assert result.returncode == 0, result.stderr


# --- commands ----------------------------------------------------------------------------------


def test_pool_volume_snapshot_commands(env: Env) -> None:
    p = env.pool_name("a")
    env.cli("pool", "create", p, "--size", "1G", "--engine", "user")
    assert [x["name"] for x in env.json("pool", "list")] == [p]
    status = env.json("pool", "status", p)
    assert status["served"] == "idle" and status["engine"] == "user"
    assert "active, idle" in env.cli("pool", "status", p).stdout
    env.cli("pool", "extend", p, "--size", "2G")
    assert env.json("pool", "status", p)["data_size"] == 2 << 30
    env.cli("pool", "deactivate", p)
    env.cli("pool", "activate", p)

    env.cli("volume", "create", p, "v1", "--size", "256M")
    env.cli("volume", "resize", p, "v1", "--size", "384M")  # inactive: the catalog grows
    assert env.json("volume", "show", p, "v1")["size"] == 384 << 20
    link = env.cli("volume", "activate", p, "v1").stdout.strip()
    assert link == str(DEV_ROOT / p / "v1")
    shown = env.json("volume", "show", p, "v1")
    assert shown["path"] == link and shown["device"].startswith("/dev/loop")
    assert env.json("pool", "status", p)["served"] == "serving"
    refused = env.cli("volume", "resize", p, "v1", "--size", "512M", check=False)
    assert refused.returncode != 0 and "deactivate" in refused.stderr.lower()
    assert env.json("volume", "show", p, "v1")["size"] == 384 << 20

    run("mkfs.ext4", "-q", link)
    point = env.mount(link, "v1")
    (point / "hello").write_text("before\n")
    env.cli("snapshot", p, "v1", "live")  # mounted origin: freeze + suspend
    (point / "hello").write_text("after\n")
    env.cli("volume", "create", p, "v2", "--size", "64M")
    env.cli("snapshot", p, "v2", "cold", "--read-only")  # inactive origin
    for command in (("volume", "remove", p, "v1"), ("volume", "deactivate", p, "v1")):
        busy = env.cli(*command, check=False)
        assert busy.returncode != 0 and "open" in busy.stderr
    snap = env.cli("volume", "activate", p, "live").stdout.strip()
    snap_point = env.mount(snap, "live")
    assert (snap_point / "hello").read_text() == "before\n"
    env.umount(snap_point)
    env.cli("volume", "deactivate", p, "live")

    # --force on a mounted volume: the engine still refuses to detach under a filesystem,
    # so the removal is deferred, and finished by doctor --fix once it is unmounted.
    forced = env.json("volume", "remove", p, "v1", "--force")
    assert forced["deferred"] is True
    env.umount(point)
    fixed = env.json("doctor", "--fix")
    assert any(f["kind"] == "deferred-removal" and f["fixed"] for f in fixed["findings"]), fixed
    names = {v["name"] for v in env.json("volume", "list", p)}
    assert names == {"v2", "cold", "live"}
    assert env.cli("pool", "check", p).returncode == 0
    assert env.cli("pool", "dump", p).stdout.startswith("<superblock")
    assert_agree(env.home, p)
    busy = env.cli("pool", "destroy", p, check=False)
    assert busy.returncode != 0 and "--force" in busy.stderr
    env.cli("pool", "destroy", p, "--force")
    assert env.json("pool", "list") == []


# --- crashes -------------------------------------------------------------------------------


def forked(home: Path, action: Callable[[Manager], object], crash_at: str | None) -> int:
    """Run ``action`` in a forked child (modules already imported: cheap); its pid."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            if crash_at is not None:
                os.environ[CRASH_ENV] = crash_at
            with open_manager(home) as mgr:
                action(mgr)
        except ThinmgrError:
            code = 3
        except BaseException:
            traceback.print_exc()
            code = 4
        finally:
            os._exit(code)
    return pid


def wait(pid: int, kill_after: float | None = None) -> int:
    if kill_after is not None:
        time.sleep(kill_after)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def test_sigkill_at_every_step_then_doctor_fix(env: Env) -> None:
    from thinmgr.ops.doctor import doctor
    from thinmgr.ops.pools import CreatePool, create_pool
    from thinmgr.ops.snapshots import create_snapshot
    from thinmgr.ops.volumes import create_volume, remove_volume

    p = env.pool_name("c")
    with open_manager(env.home) as mgr:
        create_pool(mgr, CreatePool(p, engine="user", size=256 << 20))
        create_volume(mgr, p, "base", 64 << 20)
    counter = iter(range(1_000_000))

    def create(mgr: Manager) -> None:
        create_volume(mgr, p, f"v{next(counter)}", 64 << 20)

    def snapshot(mgr: Manager) -> None:
        create_snapshot(mgr, p, "base", f"s{next(counter)}")

    def remove_one(mgr: Manager) -> None:
        remove_volume(mgr, p, victim)

    points = {
        "create_thin": ("written-ahead", "engine-done", "advanced"),
        "create_snapshot": ("written-ahead", "engine-done", "advanced"),
        "delete_thin": ("marked", "written-ahead", "engine-done", "advanced"),
    }
    actions = {"create_thin": create, "create_snapshot": snapshot, "delete_thin": remove_one}
    rng = random.Random(4)
    trials = killed = 0
    plan = [(kind, f"{kind}:{point}", None) for kind in points for point in points[kind]] * 3
    # random kills land mostly inside the step (an in-process step takes ~30-80 ms here)
    plan += [(kind, None, rng.uniform(0.0, 0.05)) for kind in points for _ in range(30)]

    def more_random_kills() -> Iterator[tuple[str, str | None, float | None]]:
        # A random delay can outlast a fast step (the command then exits 0): keep drawing
        # random kills until 100 have landed, within a bound.
        while killed < 100 and trials < 300:
            yield rng.choice(list(points)), None, rng.uniform(0.0, 0.03)

    for kind, crash_at, delay in itertools.chain(plan, more_random_kills()):
        next(counter)  # the parent and the child agree on the name the child uses
        victim = f"r{trials}"
        if kind == "delete_thin":
            with open_manager(env.home) as mgr:
                create_volume(mgr, p, victim, 64 << 20)
        code = wait(forked(env.home, actions[kind], crash_at), delay)
        assert code in (0, 3, -signal.SIGKILL), f"trial {trials} ({kind}, {crash_at}): {code}"
        killed += code == -signal.SIGKILL
        trials += 1
        with open_manager(env.home) as mgr:
            for finding in doctor(mgr, fix=True):
                assert finding.fixed or not finding.fixable, finding
        assert_agree(env.home, p)
    assert trials >= 100 and killed >= 100, (trials, killed)
    env.cli("pool", "destroy", p, "--force")


# --- concurrency -------------------------------------------------------------------------


def test_two_processes_fifty_mixed_operations_each(env: Env) -> None:
    from thinmgr.ops.pools import CreatePool, create_pool, pool_status
    from thinmgr.ops.snapshots import create_snapshot
    from thinmgr.ops.volumes import (
        activate_volume,
        create_volume,
        deactivate_volume,
        list_volumes,
        remove_volume,
        resize_volume,
        show_volume,
    )

    p = env.pool_name("m")
    with open_manager(env.home) as mgr:
        create_pool(mgr, CreatePool(p, engine="user", size=256 << 20))
    results = env.root / "results"
    results.mkdir()

    def worker(index: int) -> Callable[[Manager], None]:
        def work(mgr: Manager) -> None:
            rng = random.Random(index)
            mine: list[str] = []
            outcome = {"ok": 0, "refused": []}
            for step in range(50):
                choice = rng.random()
                try:
                    if index == 0 and step == 10 and mine:
                        activate_volume(mgr, p, mine[0])  # part of the run goes via a server
                    elif index == 0 and step == 40 and mine:
                        deactivate_volume(mgr, p, mine[0])
                    elif choice < 0.35 or not mine:
                        name = f"w{index}v{step}"
                        create_volume(mgr, p, name, 32 << 20)
                        mine.append(name)
                    elif choice < 0.55:
                        name = f"w{index}s{step}"
                        create_snapshot(mgr, p, rng.choice(mine), name)
                        mine.append(name)
                    elif choice < 0.7:
                        victim = mine[-1]
                        remove_volume(mgr, p, victim)
                        mine.remove(victim)
                    elif choice < 0.8:
                        resize_volume(mgr, p, mine[-1], (64 << 20) + step * (1 << 20))
                    elif choice < 0.9:
                        show_volume(mgr, p, rng.choice(mine))
                        list_volumes(mgr, p)
                    else:
                        pool_status(mgr, p)
                    outcome["ok"] += 1
                except ThinmgrError as exc:  # a clean failure: a message and an exit code
                    outcome["refused"].append(f"{type(exc).__name__}: {exc}")
            if index == 0 and mine:
                with contextlib.suppress(ThinmgrError):
                    deactivate_volume(mgr, p, mine[0])
            (results / f"{index}.json").write_text(json.dumps(outcome))

        return work

    pids = [forked(env.home, worker(i), None) for i in range(2)]
    codes = [wait(pid) for pid in pids]
    assert codes == [0, 0]
    outcomes = [json.loads((results / f"{i}.json").read_text()) for i in range(2)]
    assert sum(o["ok"] for o in outcomes) >= 80, outcomes
    assert_agree(env.home, p)
    env.cli("pool", "destroy", p, "--force")


# --- a full pool ---------------------------------------------------------------------------


def test_pool_full_enospc_warns_extend_continues(env: Env) -> None:
    p = env.pool_name("f")
    env.cli("pool", "create", p, "--size", "4M", "--engine", "user")  # 64 blocks of 64 KiB
    env.cli("volume", "create", p, "v", "--size", "64M")
    link = env.cli("volume", "activate", p, "v").stdout.strip()
    started = time.monotonic()
    result = run(
        "dd", "if=/dev/urandom", f"of={link}", "bs=1M", "count=16", "oflag=direct", check=False
    )
    assert result.returncode != 0 and "No space left on device" in result.stderr
    assert time.monotonic() - started < 1.0
    status = env.json("pool", "status", p)
    assert status["data_used_percent"] == 100.0
    assert any("data space" in w for w in status["warnings"])
    assert "warning" in env.cli("pool", "status", p).stderr
    env.cli("pool", "extend", p, "--size", "16M")
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
    env.cli("volume", "deactivate", p, "v")
    assert env.cli("pool", "check", p).returncode == 0
    assert_agree(env.home, p)
    env.cli("pool", "destroy", p, "--force")


# --- live snapshot under a writer ----------------------------------------------------------


def test_live_snapshot_under_concurrent_writer_is_fsck_clean(env: Env) -> None:
    p = env.pool_name("w")
    env.cli("pool", "create", p, "--size", "1G", "--engine", "user")
    env.cli("volume", "create", p, "v", "--size", "256M")
    link = env.cli("volume", "activate", p, "v").stdout.strip()
    run("mkfs.ext4", "-q", link)
    point = env.mount(link, "v")
    script = (
        "i=0; while :; do dd if=/dev/urandom of=$0/f$((i % 40)) bs=64k count=$((i % 7 + 1)) "
        "2>/dev/null; mkdir -p $0/d$((i % 5)); echo $i > $0/d$((i % 5))/n; i=$((i+1)); done"
    )
    writer = subprocess.Popen(["sh", "-c", script, str(point)])
    try:
        time.sleep(0.5)
        for name in ("s1", "s2"):
            started = time.monotonic()
            env.cli("snapshot", p, "v", name)
            assert time.monotonic() - started < 10
            time.sleep(0.3)
    finally:
        writer.kill()
        writer.wait()
    for name in ("s1", "s2"):
        snap = env.cli("volume", "activate", p, name).stdout.strip()
        fsck = run("e2fsck", "-fn", snap, check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        env.cli("volume", "deactivate", p, name)
    env.umount(point)
    env.cli("volume", "deactivate", p, "v")
    assert_agree(env.home, p)
    env.cli("pool", "destroy", p, "--force")


def test_doctor_frees_a_loop_device_leaked_by_a_killed_server(env: Env) -> None:
    """A server killed while its volume is held open leaves the loop device bound (autoclear
    waits for the last user): doctor reports it, --fix detaches it and clears the rest."""
    pool = env.pool_name("lk")
    env.cli("pool", "create", pool, "--size", "256M")
    env.cli("volume", "create", pool, "v", "--size", "64M")
    device = os.path.realpath(env.cli("volume", "activate", pool, "v").stdout.strip())
    holder = os.open(device, os.O_RDONLY)  # like a mount, keeps the loop device bound
    try:
        for pid in env._server_pids():
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while env._server_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        report = json.loads(env.cli("--json", "doctor", check=False).stdout)
        stale = [f["detail"] for f in report["findings"] if f["kind"] == "stale-runtime-state"]
        assert any(d.startswith(f"leaked loop device {device} ") for d in stale), report
        assert not report["ok"]
        fixed = json.loads(env.cli("--json", "doctor", "--fix", check=False).stdout)
        assert any(f["kind"] == "stale-runtime-state" and f["fixed"] for f in fixed["findings"])
    finally:
        os.close(holder)
    deadline = time.monotonic() + 10
    while any(device in line for line in run("losetup", "-a").stdout.splitlines()):
        assert time.monotonic() < deadline, f"{device} still bound after doctor --fix"
        time.sleep(0.05)
    env.cli("volume", "deactivate", pool, "v", check=False)
    env.cli("doctor", "--fix", check=False)
    assert json.loads(env.cli("--json", "doctor").stdout)["ok"]
    env.cli("pool", "destroy", pool, "--force")


def _wait_server_gone(env: Env, pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not Path(f"/proc/{pid}").exists()


def test_sigterm_stops_a_server_cleanly_unless_a_volume_is_in_use(env: Env) -> None:
    """SIGTERM (kill, a shutdown) commits at once; a server whose volumes nothing uses then
    detaches them and stops, leaving no dead FUSE mount; one with a mounted volume stays up
    and says why in its log. `pool activate` brings the volumes back, as after a reboot."""
    pool = env.pool_name("tm")
    env.cli("pool", "create", pool, "--size", "256M")
    env.cli("volume", "create", pool, "a", "--size", "64M")
    env.cli("volume", "create", pool, "b", "--size", "64M")
    link = env.cli("volume", "activate", pool, "a").stdout.strip()
    env.cli("volume", "activate", pool, "b")
    run("mkfs.ext4", "-q", link)
    point = env.mount(link, "a")
    (point / "kept").write_text("written before SIGTERM\n")
    [pid] = env._server_pids()
    log = env.home / "run" / pool / "server.log"

    os.kill(pid, signal.SIGTERM)  # a is mounted: refused
    deadline = time.monotonic() + 10
    while "staying up" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "staying up, volumes in use: a" in log.read_text()
    assert Path(f"/proc/{pid}").exists()
    env.umount(point)

    os.kill(pid, signal.SIGTERM)  # nothing in use now: detach both and stop
    assert _wait_server_gone(env, pid), "the server did not stop on SIGTERM"
    assert env.leftovers() == []  # no loop device, no FUSE mount, no link
    env.cli("pool", "activate", pool)
    states = {v["name"]: v["state"] for v in env.json("volume", "list", pool)}
    assert states == {"a": "active", "b": "active"}, states
    point = env.mount(link, "a")
    assert (point / "kept").read_text() == "written before SIGTERM\n"
    env.umount(point)
    env.cli("volume", "deactivate", pool, "a")
    env.cli("volume", "deactivate", pool, "b")
    assert_agree(env.home, pool)
    env.cli("pool", "destroy", pool, "--force")
