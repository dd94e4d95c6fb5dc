"""The launcher's pure pieces: user lookup, PATH search, exit codes, status pipe framing."""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

import pytest

from thinmgr.errors import UsageError
from thinmgr.kernel.namespaces import pivot_root_syscall_number
from thinmgr.runtime import status, users
from thinmgr.runtime.init import exit_code
from thinmgr.runtime.process import candidates, exit_code_for_exec_errno

PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
PASSWD += "app:x:1000:1000::/home/app:/bin/sh\n"
GROUP = "root:x:0:\ntty:x:5:app\nnogroup:x:65534:\napp:x:1000:\nwheel:x:10:app,root\n"


@pytest.fixture
def tables(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "passwd").write_text(PASSWD)
    (tmp_path / "group").write_text(GROUP)
    return {"passwd": str(tmp_path / "passwd"), "group": str(tmp_path / "group")}


@pytest.mark.parametrize(
    ("spec", "uid", "gid", "groups", "home"),
    [
        (None, 0, 0, (0, 10), "/root"),
        ("app", 1000, 1000, (1000, 5, 10), "/home/app"),
        ("1000", 1000, 1000, (1000, 5, 10), "/home/app"),
        ("app:nogroup", 1000, 65534, (65534,), "/home/app"),
        ("4242", 4242, 0, (0,), "/"),  # unknown uid: docker runs it with gid 0
        ("4242:77", 4242, 77, (77,), "/"),
    ],
)
def test_user_lookup_follows_docker(
    tables: dict[str, str],
    spec: str | None,
    uid: int,
    gid: int,
    groups: tuple[int, ...],
    home: str,
) -> None:
    creds = users.resolve(spec, **tables)
    assert (creds.uid, creds.gid, creds.groups, creds.home) == (uid, gid, groups, home)


@pytest.mark.parametrize("spec", ["ghost", "app:ghosts", ":5", "99999999999"])
def test_bad_users_are_usage_errors(tables: dict[str, str], spec: str) -> None:
    with pytest.raises(UsageError):
        users.resolve(spec, **tables)


def test_path_search_and_exit_codes() -> None:
    assert candidates("ls", "/usr/bin:/bin") == ["/usr/bin/ls", "/bin/ls"]
    assert candidates("./x", "/bin") == ["./x"]
    assert candidates("x", ":/bin") == ["./x", "/bin/x"]
    assert exit_code_for_exec_errno(errno.ENOENT) == 127
    assert exit_code_for_exec_errno(errno.EACCES) == 126
    assert exit_code_for_exec_errno(errno.ENOEXEC) == 126
    assert exit_code(3 << 8) == 3
    assert exit_code(signal.SIGKILL) == 137
    assert exit_code(signal.SIGTERM) == 143


def test_pivot_root_numbers() -> None:
    assert pivot_root_syscall_number("x86_64") == 155
    assert pivot_root_syscall_number("aarch64") == 41


def test_status_messages_from_several_writers() -> None:
    read_end, write_end = os.pipe()
    status.send(write_end, pid=42)
    status.send(write_end, error="x" * 10_000)  # cut to one atomic write
    status.send(write_end, exec_errno=errno.ENOENT, command="nope")
    os.write(write_end, b"garbage\n")
    os.close(write_end)
    report = status.read_all(read_end)
    os.close(read_end)
    assert report.pid == 42
    assert report.error is not None and report.error.endswith("...")
    assert (report.exec_errno, report.command) == (errno.ENOENT, "nope")


def test_marks_are_kept_first_wins_and_split_the_launch_phase() -> None:
    from thinmgr.ops.containers import _add_launch_parts
    from thinmgr.ops.timings import Timings

    start = time.monotonic()
    read_end, write_end = os.pipe()
    status.mark(write_end, "mount")
    status.mark(write_end, "mounted")
    status.send(write_end, mark="mount", at=1.0)  # a repeated step keeps the first time
    status.send(write_end, mark="bogus", at="not a time")
    os.close(write_end)
    report = status.read_all(read_end)
    os.close(read_end)
    assert set(report.marks) == {"mount", "mounted"}
    assert start <= report.marks["mount"] <= report.marks["mounted"] <= time.monotonic()

    timings = Timings(enabled=True)
    _add_launch_parts(timings, start, {"cgroups": start, **report.marks})
    names = [name for name, _ in timings.phases]
    assert names == ["launch.cgroups", "launch.namespaces", "launch.mount", "launch.exec"]
    assert all(seconds >= 0 for _, seconds in timings.phases)
    quiet = Timings(enabled=True)
    _add_launch_parts(quiet, start, {"mount": start})  # incomplete: nothing made up
    assert quiet.phases == []


class _FakeCgroups:
    def __init__(self, paths: dict[str, str]) -> None:
        self._paths = paths

    def paths(self) -> dict[str, str]:
        return self._paths


def test_mknod_is_dropped_and_the_root_nodev_where_no_devices_cgroup_filters() -> None:
    from typing import Any, cast

    from thinmgr.kernel import caps
    from thinmgr.runtime.launch import bounding_set, devices_filtered

    v1 = cast(Any, _FakeCgroups({"memory": "/m", "devices": "/d"}))
    v2 = cast(Any, _FakeCgroups({"unified": "/u"}))
    assert devices_filtered(v1) and bounding_set(v1) == caps.DOCKER_DEFAULT_CAPS
    for unfiltered in (v2, None):
        assert not devices_filtered(unfiltered)
        assert bounding_set(unfiltered) == caps.DOCKER_DEFAULT_CAPS - {caps.CAP_MKNOD}
