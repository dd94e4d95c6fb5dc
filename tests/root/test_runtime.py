"""The launcher on a real ext4 loop device: namespaces, mounts, confinement, exit codes, init,
exec, detach, stop and cleanup (thinmgr.runtime.launch).

The root file system is busybox (tests/support/busybox.py) put into an ext4 image by
``mkfs.ext4 -d`` (no mount needed) and attached to a loop device; no pool is involved. Most
tests call the launcher in this process (it forks; the container writes to the captured
stdout); the tests that kill the launcher run it in a child interpreter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.busybox import populate_rootfs
from thinmgr.errors import ThinmgrError
from thinmgr.runtime import launch
from thinmgr.runtime.cgroups import Limits
from thinmgr.runtime.spec import LaunchSpec, Started

pytestmark = pytest.mark.root

DOCKER_CAP_MASK = "00000000a80425fb"


def _make_image(tree: Path, image: Path) -> str:
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image)], check=True)
    out = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A loop device holding the busybox root, plus /bin/notexec (mode 0644)."""
    base = tmp_path_factory.mktemp("rootfs")
    tree = populate_rootfs(base / "tree")
    (tree / "bin" / "notexec").write_text("#!/bin/sh\necho never\n")
    os.chmod(tree / "bin" / "notexec", 0o644)
    loop = _make_image(tree, base / "root.img")
    yield Path(loop)
    subprocess.run(["losetup", "-d", loop], check=False)


@pytest.fixture(scope="module")
def evil_device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An image whose /dev is a symlink to the host's / (runc CVE-2021-30465 style)."""
    base = tmp_path_factory.mktemp("evil")
    tree = populate_rootfs(base / "tree")
    shutil.rmtree(tree / "dev")
    (tree / "dev").symlink_to("/")
    loop = _make_image(tree, base / "evil.img")
    yield Path(loop)
    subprocess.run(["losetup", "-d", loop], check=False)


@dataclass
class Outcome:
    code: int | None
    started: list[Started] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)


def _spec(device: Path, state: Path, argv: list[str], **kw: Any) -> LaunchSpec:
    return LaunchSpec(
        name=kw.pop("name", "t-" + state.parent.name[-40:].strip("_")),
        rootfs_device=device,
        argv=argv,
        state_dir=state,
        **kw,
    )


def run_here(spec: LaunchSpec, *, on_started: Callable[[Started], None] | None = None) -> Outcome:
    outcome = Outcome(None)

    def started(info: Started) -> None:
        outcome.started.append(info)
        if on_started is not None:
            on_started(info)

    outcome.code = launch.run(spec, detach=False, on_started=started, on_exit=outcome.exits.append)
    return outcome


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def _mounted_anywhere(dev: Path) -> list[str]:
    """Every /proc/PID/mountinfo line that mounts ``dev`` (by major:minor)."""
    rdev = os.stat(dev).st_rdev
    wanted = f"{os.major(rdev)}:{os.minor(rdev)}"
    hits = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/mountinfo") as f:
                hits += [f"{entry}: {line}" for line in f if line.split()[2] == wanted]
        except OSError:
            continue
    return hits


def _own_cgroup_dirs(name: str) -> list[str]:
    """The v1 cgroup directories named after container ``name`` (nested anywhere)."""
    found = [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/thinmgr/{name}")]
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, own = line.split(":", 2)
        if own != "/" and controllers and not controllers.startswith("name="):
            nested = Path(f"/sys/fs/cgroup/{controllers}{own}/thinmgr/{name}")
            found += [str(nested)] if nested.exists() else []
    return found


def _assert_clean(dev: Path, outcome_or_paths: Outcome | dict[str, str], state: Path) -> None:
    paths = (
        outcome_or_paths.started[0].cgroups
        if isinstance(outcome_or_paths, Outcome)
        else outcome_or_paths
    )
    assert not _mounted_anywhere(dev)
    assert [p for p in paths.values() if os.path.exists(p)] == []
    assert not (state / launch.STAGING_DIR).exists()


# -- what the container sees ----------------------------------------------------------------


def test_init_is_pid1_and_command_pid2_with_host_hidden(
    device: Path, state: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    script = (
        "cat /proc/1/comm; echo pid=$$; ls /proc | grep -c '^[0-9]'; hostname; "
        "cut -d' ' -f2 /proc/mounts | tr '\\n' ' '; echo; "
        "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; cat /sys/class/net/lo/flags; "
        "tr '\\0' ' ' </proc/1/cmdline; echo"
    )
    out = run_here(_spec(device, state, ["/bin/sh", "-c", script], hostname="box1"))
    assert out.code == 0 and out.exits == [0]
    lines = capfd.readouterr().out.splitlines()
    assert lines[0] == launch.INIT_NAME
    assert lines[1] == "pid=2"
    assert int(lines[2]) <= 4  # 1, 2, ls, grep: nothing of the host
    assert lines[3] == "box1"
    mounts = lines[4].split()
    assert mounts[0] == "/" and "/work" not in mounts and "/sys/fs/cgroup" not in mounts
    assert {"/dev", "/dev/pts", "/proc", "/sys", "/proc/sys"} <= set(mounts)
    assert lines[5:-2] == ["lo"]
    assert int(lines[-2], 16) & 0x1  # IFF_UP
    # The init's command line is its name only: nothing of the host's (python path, options).
    assert lines[-1].split() == [launch.INIT_NAME]
    _assert_clean(device, out, state)
    assert (state / launch.EXIT_FILE).read_text() == "0\n"
    assert int((state / launch.PID_FILE).read_text()) == out.started[0].pid


def test_no_init_makes_the_command_pid1(
    device: Path, state: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = run_here(
        _spec(device, state, ["/bin/sh", "-c", "echo $$; cat /proc/1/comm; true"], init=False)
    )
    assert out.code == 0
    assert capfd.readouterr().out.split() == ["1", "sh"]


def test_confinement(device: Path, state: Path, capfd: pytest.CaptureFixture[str]) -> None:
    probes = {
        "caps": "grep -E '^(CapBnd|CapEff|CapInh|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status",
        "mount": "mount -t tmpfs x /mnt",
        "unshare": "unshare -m true",
        "procsys": "echo 1 > /proc/sys/kernel/ns_last_pid",
        "sys": "echo x > /sys/kernel/uevent_helper",
        "hostname": "hostname other",
        "loopdev": "mknod /tmp/blk b 7 0 && head -c1 /tmp/blk >/dev/null",
        "kcore": "test -s /proc/keys",
    }
    script = "; ".join(
        f"echo '## {name}'; ({cmd}) 2>&1; echo rc=$?" for name, cmd in probes.items()
    )
    out = run_here(_spec(device, state, ["/bin/sh", "-c", script]))
    assert out.code == 0
    text = capfd.readouterr().out
    sections = dict(re.findall(r"## (\w+)\n(.*?)(?=\n## |\Z)", text, re.S))
    caps = dict(line.split(":\t") for line in sections["caps"].splitlines()[:-1])
    assert caps["CapBnd"] == DOCKER_CAP_MASK and caps["CapEff"] == DOCKER_CAP_MASK
    assert caps["CapInh"] == caps["CapAmb"] == "0000000000000000"
    assert caps["NoNewPrivs"] == "1" and caps["Seccomp"] == "2"
    for name in ("mount", "unshare", "procsys", "sys", "hostname", "loopdev", "kcore"):
        assert not sections[name].endswith("rc=0"), (name, sections[name])
    assert "Read-only file system" in sections["procsys"]
    assert "Operation not permitted" in sections["loopdev"]  # devices cgroup


def test_user_and_read_only_root(
    device: Path, state: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    script = (
        "id -u; id -g; grep CapEff /proc/self/status | cut -f2; echo $HOME; "
        "touch /x 2>&1; echo rc=$?; touch /tmp/x; echo rc=$?"
    )
    spec = _spec(device, state, ["/bin/sh", "-c", script], user="nobody", read_only=True)
    assert run_here(spec).code == 0
    lines = capfd.readouterr().out.splitlines()
    assert lines[:4] == ["65534", "65534", "0000000000000000", "/nonexistent"]
    assert "Read-only file system" in lines[4] and lines[5] == "rc=1"
    assert lines[6] == "rc=0"
    spec = _spec(device, tmp_state(state), ["/bin/sh", "-c", "id -u; id -g"], user="1234:5678")
    assert run_here(spec).code == 0
    assert capfd.readouterr().out.split() == ["1234", "5678"]


def tmp_state(state: Path) -> Path:
    return state.parent / f"state{time.monotonic_ns()}"


def test_net_host_sees_host_interfaces(
    device: Path, state: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    run_here(_spec(device, state, ["/bin/sh", "-c", "tail -n +3 /proc/net/dev"], net="host"))
    assert (
        len(capfd.readouterr().out.splitlines())
        == len(Path("/proc/net/dev").read_text().splitlines()) - 2
    )


# -- exit codes and failures ----------------------------------------------------------------


def test_exit_status_is_returned(device: Path, state: Path) -> None:
    out = run_here(_spec(device, state, ["/bin/sh", "-c", "exit 3"]))
    assert out.code == 3 and out.exits == [3]
    out = run_here(_spec(device, tmp_state(state), ["/bin/sh", "-c", "exit 4"], init=False))
    assert out.code == 4


@pytest.mark.parametrize(
    ("argv", "error", "code"),
    [
        (["/bin/notexec"], launch.CommandNotExecutable, 126),
        (["no-such-command"], launch.CommandNotFound, 127),
        (["/no/such/path"], launch.CommandNotFound, 127),
    ],
)
@pytest.mark.parametrize("init", [True, False])
def test_exec_failures_raise_before_start(
    device: Path, state: Path, argv: list[str], error: type[Exception], code: int, init: bool
) -> None:
    outcome = Outcome(None)
    spec = _spec(device, state, argv, init=init)
    with pytest.raises(error) as info:
        launch.run(
            spec,
            detach=False,
            on_started=outcome.started.append,
            on_exit=outcome.exits.append,
        )
    assert info.value.exit_code == code  # type: ignore[attr-defined]
    assert outcome.started == [] and outcome.exits == []
    _assert_clean(device, {}, state)
    assert not _own_cgroup_dirs(spec.name)


def test_setup_failures_raise_and_leave_nothing(
    device: Path, evil_device: Path, state: Path, tmp_path: Path
) -> None:
    not_a_device = tmp_path / "file"
    not_a_device.write_bytes(b"")
    cases = [  # (spec, exit code, words of the message)
        (_spec(not_a_device, state, ["true"]), 125, "not a block device"),
        (_spec(device, state, ["true"], user="nosuchuser"), 125, "unable to find user nosuchuser"),
        (_spec(device, state, ["true"], init=False, user="x:nogroup2"), 125, "unable to find"),
        (_spec(evil_device, state, ["true"]), 125, "/dev of the image as a mount point: symlink"),
        (_spec(device, state, ["true"], net="bridge"), 125, "unknown network mode"),
        (_spec(device, state, ["true"], limits=Limits(cpus=10_000.0)), 2, "cpus"),
    ]
    for spec, code, words in cases:
        with pytest.raises(ThinmgrError) as info:
            run_here(spec)
        assert (info.value.exit_code, words in str(info.value)) == (code, True), info.value
        assert not _mounted_anywhere(evil_device) and not _mounted_anywhere(device)
        assert not _own_cgroup_dirs(spec.name)
        assert not (state / launch.STAGING_DIR).exists()


# -- signals, init, stop ---------------------------------------------------------------------


def _later(seconds: float, code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds}); {code}"])


def test_sigterm_forwarded_by_launcher_and_init_gives_143(device: Path, state: Path) -> None:
    helpers: list[subprocess.Popen[bytes]] = []
    me = os.getpid()
    out = run_here(
        _spec(device, state, ["sleep", "30"]),
        on_started=lambda s: helpers.append(_later(0.2, f"import os; os.kill({me}, 15)")),
    )
    helpers[0].wait()
    assert out.code == 143 and out.exits == [143]
    _assert_clean(device, out, state)


def test_stop_kills_pid1_without_init_after_timeout(device: Path, state: Path) -> None:
    helpers: list[subprocess.Popen[bytes]] = []

    def stop_later(info: Started) -> None:
        call = "from thinmgr.runtime import launch; "
        call += f"launch.stop({info.pid}, {info.cgroups!r}, timeout=0.3)"
        helpers.append(_later(0.1, call))

    began = time.monotonic()
    out = run_here(_spec(device, state, ["sleep", "30"], init=False), on_started=stop_later)
    helpers[0].wait()
    assert out.code == 137  # sleep as PID 1 ignores SIGTERM: SIGKILL after the timeout
    assert time.monotonic() - began < 10
    _assert_clean(device, out, state)


def _zombies_of(pid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == pid:
                count += 1
    return count


@pytest.mark.parametrize(("init", "expected_zombies"), [(True, 0), (False, 2)])
def test_orphans_are_reaped_only_with_init(
    device: Path, state: Path, init: bool, expected_zombies: int
) -> None:
    seen: list[int] = []

    def count(info: Started) -> None:
        time.sleep(0.5)
        seen.append(_zombies_of(info.pid))

    script = "(sleep 0.05 &); (sleep 0.05 &); exec sleep 1"
    out = run_here(_spec(device, state, ["/bin/sh", "-c", script], init=init), on_started=count)
    assert out.code == 0 and seen == [expected_zombies]


# -- detached, exec, stop ------------------------------------------------------------------


def _wait_for(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return path.read_text()


def test_detached_run_exec_and_stop(
    device: Path, state: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    log = state.parent / "ctr.log"
    spec = _spec(
        device,
        state,
        ["/bin/sh", "-c", "echo out; echo err >&2; exec sleep 30"],
        log_path=log,
        hostname="detached1",
    )
    started: list[Started] = []
    marker = state.parent / "on_exit"

    def on_exit(code: int) -> None:  # runs in the supervisor
        marker.write_text(str(code))

    assert launch.run(spec, detach=True, on_started=started.append, on_exit=on_exit) is None
    info = started[0]
    try:
        assert launch.alive(info.pid, time.time())
        assert not launch.alive(info.pid, time.time() - 3600)  # started later: a reused pid
        probe = "hostname; pwd; echo $A; ps -o comm | sort | tr '\\n' ' '; echo; "
        probe += "grep -E ':(pids|memory):' /proc/self/cgroup; grep NoNewPrivs /proc/self/status"
        code = launch.exec_in(
            info.pid,
            info.cgroups,
            ["/bin/sh", "-c", probe + "; exit 7"],
            env={"A": "1"},
            workdir="/tmp",
            user=None,
            tty=False,
            interactive=False,
        )
        assert code == 7
        lines = capfd.readouterr().out.splitlines()
        assert lines[:3] == ["detached1", "/tmp", "1"]
        assert "sleep" in lines[3] and launch.INIT_NAME in lines[3]  # the container's processes
        # in the container's cgroups: its cgroup namespace root
        assert lines[4:] == ["8:pids:/", "4:memory:/", "NoNewPrivs:\t1"]
        with pytest.raises(launch.CommandNotFound):
            launch.exec_in(
                info.pid,
                info.cgroups,
                ["nope"],
                env={},
                workdir="/",
                user=None,
                tty=False,
                interactive=False,
            )
    finally:
        launch.stop(info.pid, info.cgroups, timeout=5)
    assert not launch.alive(info.pid)
    assert _wait_for(marker) == "143"
    assert (state / launch.EXIT_FILE).read_text() == "143\n"
    assert log.read_text().split() == ["out", "err"]
    _assert_clean(device, info.cgroups, state)


def test_detached_start_the_caller_cannot_record_is_taken_down(device: Path, state: Path) -> None:
    seen: list[Started] = []

    def failing(info: Started) -> None:
        seen.append(info)
        raise RuntimeError("catalog is gone")

    spec = _spec(device, state, ["sleep", "30"], log_path=state / "log")
    with pytest.raises(RuntimeError):
        launch.run(spec, detach=True, on_started=failing, on_exit=lambda code: None)
    deadline = time.monotonic() + 5
    while (
        launch.alive(seen[0].pid) or _own_cgroup_dirs(spec.name)
    ) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not launch.alive(seen[0].pid)
    _assert_clean(device, seen[0].cgroups, state)


def test_tty_is_a_pty_of_the_container(
    device: Path, state: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b"tty; echo in=$$\nexit 5\n")
    os.close(write_end)
    saved = os.dup(0)
    os.dup2(read_end, 0)
    os.close(read_end)
    try:
        out = run_here(_spec(device, state, ["/bin/sh"], tty=True, interactive=True))
    finally:
        os.dup2(saved, 0)
        os.close(saved)
    assert out.code == 5
    text = capfd.readouterr().out.replace("\r", "")
    assert "/dev/pts/0" in text and "in=2" in text


# -- the launcher killed ---------------------------------------------------------------------

DRIVER = """
import json, sys
from pathlib import Path
from thinmgr.runtime import launch
from thinmgr.runtime.spec import LaunchSpec
args = json.loads(sys.argv[1])
spec = LaunchSpec(name=args["name"], rootfs_device=Path(args["device"]), argv=args["argv"],
                  state_dir=Path(args["state"]))
def started(info):
    Path(args["state"], "started.json").write_text(json.dumps(info.cgroups))
sys.exit(launch.run(spec, detach=False, on_started=started, on_exit=lambda c: None))
"""


def test_sigkill_of_the_launcher_takes_the_container(device: Path, state: Path) -> None:
    name = "t-killed"
    args = {"name": name, "device": str(device), "argv": ["sleep", "30"], "state": str(state)}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(args)])
    try:
        cgroups = json.loads(_wait_for(state / "started.json"))
        pid = int((state / launch.PID_FILE).read_text())
        assert launch.alive(pid)
        driver.kill()
        driver.wait()
        deadline = time.monotonic() + 5
        while launch.alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not launch.alive(pid)  # PDEATHSIG: intermediate, then PID 1 and its namespace
        from thinmgr.runtime.cgroups import ContainerCgroups

        leftover = ContainerCgroups.from_paths(cgroups)
        deadline = time.monotonic() + 5
        while leftover.pids() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert leftover.pids() == []
        assert not _mounted_anywhere(device)
        leftover.remove()  # what `thinmgr ps`/`rm` do for a dead launcher's cgroups
        assert [p for p in cgroups.values() if os.path.exists(p)] == []
    finally:
        if driver.poll() is None:
            driver.kill()
