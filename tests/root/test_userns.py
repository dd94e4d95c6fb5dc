"""``--userns``: the container in its own user namespace (container 0..65535 = host
100000..165535) on an idmapped root (thinmgr.runtime.userns), on a real ext4 loop device."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.root.test_runtime import _assert_clean, _make_image, _spec, run_here
from tests.support.busybox import populate_rootfs
from thinmgr.runtime import launch, userns
from thinmgr.runtime.spec import Started

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("userns")
    tree = populate_rootfs(base / "tree")
    loop = _make_image(tree, base / "root.img")
    yield Path(loop)
    subprocess.run(["losetup", "-d", loop], check=False)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def _host_view(device: Path, relative: str) -> os.stat_result:
    """stat of ``relative`` on the container's file system mounted plainly on the host."""
    with tempfile.TemporaryDirectory() as mnt:
        subprocess.run(["mount", "-o", "ro", str(device), mnt], check=True)
        try:
            return os.stat(os.path.join(mnt, relative))
        finally:
            subprocess.run(["umount", mnt], check=True)


def test_root_in_the_container_is_100000_on_the_host(
    device: Path, state: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    script = (
        "id -u; id -g; cat /proc/self/uid_map /proc/self/gid_map; stat -c '%u:%g' /bin/busybox; "
        "echo made > /root/made-inside; stat -c '%u:%g' /root/made-inside; "
        "hostname; cut -d' ' -f2 /proc/mounts | tr '\\n' ' '; echo; echo x > /dev/null && "
        "head -c4 /dev/zero | wc -c; cat /proc/1/comm; sleep 0.3"
    )
    host_uids: list[str] = []

    def started(info: Started) -> None:
        with open(f"/proc/{info.pid}/status") as f:
            host_uids.extend(line.split()[1] for line in f if line.startswith(("Uid:", "Gid:")))

    out = run_here(
        _spec(device, state, ["/bin/sh", "-c", script], hostname="ns1", userns=True),
        on_started=started,
    )
    lines = capfd.readouterr().out.splitlines()
    assert out.code == 0, lines
    base = str(userns.HOST_ID_BASE)
    assert lines[0:2] == ["0", "0"]
    assert lines[2].split() == ["0", base, "65536"] and lines[3].split() == ["0", base, "65536"]
    assert lines[4] == "0:0"  # on-disk 0 seen as the container's root through the idmap
    assert lines[5] == "0:0"
    assert lines[6] == "ns1"
    assert {"/", "/dev", "/dev/pts", "/proc", "/sys", "/proc/sys"} <= set(lines[7].split())
    assert "/work" not in lines[7].split()
    assert lines[8] == "4"
    assert lines[9] == launch.INIT_NAME
    assert host_uids == [base, base]  # PID 1's Uid: and Gid: lines (real uid, real gid)
    _assert_clean(device, out, state)
    # Written through the idmapped mount by host uid 100000: stored as uid 0 on disk.
    made = _host_view(device, "root/made-inside")
    assert (made.st_uid, made.st_gid) == (0, 0)


def test_confinement_is_kept(device: Path, state: Path, capfd: pytest.CaptureFixture[str]) -> None:
    script = (
        "grep -E '^(CapBnd|CapEff|NoNewPrivs|Seccomp):' /proc/self/status; "
        "mount -t tmpfs x /mnt 2>/dev/null; echo mount=$?; "
        "unshare -m true 2>/dev/null; echo unshare=$?"
    )
    out = run_here(_spec(device, state, ["/bin/sh", "-c", script], userns=True))
    assert out.code == 0
    text = capfd.readouterr().out
    assert "NoNewPrivs:\t1" in text and "Seccomp:\t2" in text
    assert "mount=0" not in text and "unshare=0" not in text


def test_non_root_user_and_read_only_root(
    device: Path, state: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    script = "id -u; touch /x 2>/dev/null; echo root=$?; touch /tmp/y; echo tmp=$?"
    spec = _spec(device, state, ["/bin/sh", "-c", script], userns=True, user="1000")
    assert run_here(spec).code == 0
    assert capfd.readouterr().out.split() == ["1000", "root=1", "tmp=0"]
    spec = _spec(device, state, ["/bin/sh", "-c", "touch /x; echo $?"], userns=True, read_only=True)
    assert run_here(spec).code == 0
    assert capfd.readouterr().out.split() == ["1"]


def test_host_network_is_refused(device: Path, state: Path) -> None:
    """sysfs of a network namespace the user namespace does not own cannot be mounted."""
    spec = _spec(device, state, ["true"], userns=True, net="host")
    with pytest.raises(launch.LaunchError, match="cannot be combined with --net host"):
        run_here(spec)
    assert not (state / launch.STAGING_DIR).exists()


def test_exec_joins_the_user_namespace(
    device: Path, state: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    spec = _spec(
        device, state, ["/bin/sh", "-c", "exec sleep 30"], userns=True, log_path=state / "log"
    )
    started: list[Started] = []
    assert launch.run(spec, detach=True, on_started=started.append, on_exit=lambda _: None) is None
    info = started[0]
    try:
        script = "id -u; cut -f1-3 /proc/self/uid_map | tr -s ' '; touch /e && stat -c %u /e"
        for user, expected in ((None, "0"), ("1000", "1000")):
            code = launch.exec_in(
                info.pid,
                info.cgroups,
                ["/bin/sh", "-c", script],
                env={},
                workdir="/",
                user=user,
                tty=False,
                interactive=False,
            )
            lines = capfd.readouterr().out.split("\n")
            assert lines[0] == expected
            assert lines[1].split() == ["0", str(userns.HOST_ID_BASE), "65536"]
            assert code == (0 if user is None else 1)  # uid 1000 cannot write to /
    finally:
        launch.stop(info.pid, info.cgroups, timeout=5)
    assert not launch.alive(info.pid)


def test_cli_run_userns(tmp_path: Path) -> None:
    from tests.root.test_containers import Home

    h = Home(tmp_path)
    h.cli("pool", "create", h.pool, "--size", "256M", "--engine", "user")
    try:
        h.cli("volume", "create", h.pool, "bb", "--size", "64M")
        link = h.cli("volume", "activate", h.pool, "bb").stdout.strip()
        subprocess.run(
            ["mkfs.ext4", "-q", "-d", str(populate_rootfs(tmp_path / "tree")), link], check=True
        )
        h.cli("volume", "deactivate", h.pool, "bb")
        script = "id -u; cat /proc/self/uid_map | tr -s ' '"
        done = h.cli("run", "--rm", "--userns", h.volume, "--", "sh", "-c", script)
        assert done.stdout.split() == ["0", "0", str(userns.HOST_ID_BASE), "65536"], done
        plain = h.cli("run", "--rm", h.volume, "--", "sh", "-c", script)
        assert plain.stdout.split() == ["0", "0", "0", "4294967295"], plain
        refused = h.cli(
            "run", "--rm", "--userns", "--net", "host", h.volume, "--", "true", check=False
        )
        assert refused.returncode == 125 and "--net host" in refused.stderr, refused
        h.assert_clean()
    finally:
        h.cli("pool", "destroy", h.pool, "--force", check=False)
        for line in h.loops():
            subprocess.run(["losetup", "-d", line.split(":", 1)[0]], check=False)
