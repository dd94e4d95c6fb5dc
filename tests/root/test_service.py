"""The command service on the real user engine (root tier): a resident process forks a
worker per command; the result must be the command's own -- output, exit code, stdin, cwd,
environment, signals, cgroup nesting under the client -- and a client killed mid-command
takes its worker (and so the container) with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.root.test_manager_user import CLI, Env
from tests.root.test_manager_user import env as env  # noqa: PLC0414 (the fixture)
from tests.support.busybox import rootfs_tar
from thinmgr.service import control, server

pytestmark = pytest.mark.root

CGROUP_V1_PIDS = Path("/sys/fs/cgroup/pids")


@pytest.fixture
def served(env: Env, tmp_path: Path) -> Iterator[Env]:
    """A pool with image bb, and the service running for the home."""
    pool = env.pool_name("s")
    env.cli("pool", "create", pool, "--size", "1G", "--engine", "user")
    env.cli("image", "import", pool, "bb", rootfs_tar(tmp_path / "bb.tar"))
    started = env.json("service", "start")
    assert started["running"] and started["socket"] == str(env.home / "service.sock")
    try:
        yield env
    finally:
        env.cli("service", "stop")
        env.cli("pool", "destroy", pool, "--force")


def worker_pids(env: Env) -> list[int]:
    """Children of the service: its workers."""
    service = int((env.home / "service.pid").read_text())
    children = Path(f"/proc/{service}/task/{service}/children").read_text().split()
    return [int(pid) for pid in children]


def test_lifecycle_status_conflict_and_stop(env: Env) -> None:
    assert env.cli("service", "status", check=False).returncode == 3
    first = env.json("service", "start")
    try:
        assert env.json("service", "status")["pid"] == first["pid"]
        again = env.cli("service", "start", check=False)
        assert again.returncode == 4 and "already runs" in again.stderr
        listed = env.json("pool", "list")  # served
        assert listed == []
    finally:
        stopped = env.json("service", "stop")
    assert stopped["stopped"] == first["pid"]
    assert not (env.home / "service.sock").exists()
    assert not control._alive(first["pid"])  # gone, or a zombie its new parent may reap
    assert env.json("service", "stop")["stopped"] is None


def test_served_commands_match_in_process_ones(served: Env, tmp_path: Path) -> None:
    env = served
    pool = env.pool_name("s")
    through_service = [env.cli("--json", *args).stdout for args in (("pool", "list"),
                       ("image", "list"), ("volume", "list", pool))]  # fmt: skip
    error = env.cli("pool", "status", "nope", check=False)
    assert worker_pids(env) == []  # every worker has ended
    env.cli("service", "stop")
    in_process = [env.cli("--json", *args).stdout for args in (("pool", "list"),
                  ("image", "list"), ("volume", "list", pool))]  # fmt: skip
    assert [json.loads(t) for t in through_service] == [json.loads(t) for t in in_process]
    local_error = env.cli("pool", "status", "nope", check=False)
    assert (error.returncode, error.stderr) == (local_error.returncode, local_error.stderr)
    env.cli("service", "start")


def test_run_gets_stdin_cwd_env_and_exit_codes(served: Env, tmp_path: Path) -> None:
    env = served
    fed = subprocess.run(
        [*CLI, "run", "-i", "--rm", "bb", "--", "cat"],
        input="through the service\n",
        capture_output=True,
        text=True,
        env=dict(env.env, FOO="from-the-client"),
        cwd=tmp_path,
        check=False,
    )
    assert (fed.returncode, fed.stdout) == (0, "through the service\n"), fed.stderr
    shown = subprocess.run(
        [*CLI, "run", "--rm", "-e", "FOO", "bb", "--", "sh", "-c", 'echo "$FOO"; exit 7'],
        capture_output=True,
        text=True,
        env=dict(env.env, FOO="from-the-client"),
        check=False,
    )
    assert (shown.returncode, shown.stdout) == (7, "from-the-client\n")
    assert env.cli("run", "--rm", "bb", "--", "/nope", check=False).returncode == 127
    # A relative path resolves in the client's working directory.
    (tmp_path / "sub").mkdir()
    rootfs_tar(tmp_path / "sub" / "again.tar")
    imported = subprocess.run(
        [*CLI, "--json", "image", "import", env.pool_name("s"), "again", "sub/again.tar"],
        capture_output=True,
        text=True,
        env=env.env,
        cwd=tmp_path,
        check=False,
    )
    assert imported.returncode == 0, imported.stderr
    assert "again:latest" in {f"{i['name']}:{i['tag']}" for i in env.json("image", "list")}


def test_signals_reach_the_container_and_a_killed_client_takes_its_worker(
    served: Env,
) -> None:
    env = served
    interrupted = subprocess.Popen(
        [*CLI, "run", "--rm", "bb", "--", "sleep", "30"], env=env.env, stderr=subprocess.PIPE
    )
    time.sleep(2)
    interrupted.send_signal(signal.SIGINT)
    assert interrupted.wait(timeout=20) == 130  # the container's sleep died of SIGINT

    victim = subprocess.Popen(
        [*CLI, "run", "--name", "victim", "bb", "--", "sleep", "30"], env=env.env
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        listed = env.json("ps")
        if listed and listed[0]["state"] == "running":
            break
        time.sleep(0.1)
    container_pid = env.json("ps")[0]["pid"]
    victim.kill()
    victim.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        worker_pids(env) or Path(f"/proc/{container_pid}").exists()
    ):
        time.sleep(0.1)
    assert worker_pids(env) == [] and not Path(f"/proc/{container_pid}").exists()
    gone = env.json("ps", "-a")
    assert [(c["name"], c["state"]) for c in gone] == [("victim", "exited")]
    env.cli("rm", "victim")


def test_containers_nest_under_the_clients_cgroup(served: Env) -> None:
    env = served
    assert CGROUP_V1_PIDS.is_dir(), "this test expects the cgroup v1 pids hierarchy"
    client_group = CGROUP_V1_PIDS / f"thx-client-{os.getpid()}"
    client_group.mkdir()
    try:
        procs = str(client_group / "cgroup.procs")

        def enter_group() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        started = subprocess.run(
            [*CLI, "run", "--detach", "--name", "nested", "bb", "--", "sleep", "30"],
            env=env.env,
            capture_output=True,
            text=True,
            preexec_fn=enter_group,
            check=False,
        )
        assert started.returncode == 0, started.stderr
        assert (client_group / "thinmgr" / "nested").is_dir()
        env.cli("stop", "nested", "--time", "1")
        env.cli("rm", "nested")
    finally:
        for leaf in sorted(client_group.rglob("*"), reverse=True):
            if leaf.is_dir():
                leaf.rmdir()
        client_group.rmdir()


def test_changed_code_is_refused_and_stops_the_service(served: Env) -> None:
    env = served
    source = Path(server.__file__)
    before = source.stat()
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    try:
        listed = env.cli("--json", "pool", "list")  # refused by the service: runs here
        assert [p["name"] for p in json.loads(listed.stdout)] == [env.pool_name("s")]
    finally:
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (env.home / "service.sock").exists():
        time.sleep(0.05)
    assert env.cli("service", "status", check=False).returncode == 3
