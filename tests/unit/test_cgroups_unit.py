"""cgroup plumbing without root: /proc parsing, limit checks, value conversions."""

from __future__ import annotations

from pathlib import Path

import pytest

from thinmgr.errors import UnsupportedError, UsageError
from thinmgr.runtime.cgroups import (
    UNIFIED,
    ContainerCgroups,
    HostFacts,
    Limits,
    blkio_throttles,
    caller_dirs,
    check_limits,
    cpu_quota_us,
    format_cpu_list,
    io_max_line,
    parse_cpu_list,
    parse_layout,
    parse_proc_cgroup,
    shares_to_weight,
)

# /proc/self/cgroup and mountinfo of the development machine (v1 hybrid)
HYBRID_CGROUP = """\
9:name=systemd:/
8:pids:/
7:blkio:/
6:freezer:/
5:devices:/
4:memory:/process_api/763bc7aca0b2
3:cpuset:/
2:cpuacct:/
1:cpu,cpuacct:/
0::/
"""
HYBRID_MOUNTINFO = """\
23 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_MOUNTINFO = """\
1 0 0:2 / / rw - overlay overlay rw
30 1 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate
"""
HOST = HostFacts(online_cpus=frozenset({0, 1}), mem_total=24 << 30)


def test_parse_proc_cgroup_hybrid() -> None:
    own = parse_proc_cgroup(HYBRID_CGROUP)
    assert own["memory"] == "/process_api/763bc7aca0b2"
    assert own["cpu"] == own["cpuacct"] == "/"
    assert own["name=systemd"] == "/"
    assert own[""] == "/"


def test_parse_proc_cgroup_v2_path_with_colon() -> None:
    assert parse_proc_cgroup("0::/user.slice/a:b.scope\n") == {"": "/user.slice/a:b.scope"}


def test_layout_hybrid_is_v1_and_nests_under_the_callers_memory_cgroup() -> None:
    layout = parse_layout(HYBRID_MOUNTINFO)
    assert layout.version == 1
    assert layout.v2 == ("/sys/fs/cgroup/unified", "/")
    assert "name=systemd" not in layout.v1
    dirs = caller_dirs(layout, parse_proc_cgroup(HYBRID_CGROUP))
    assert dirs["memory"] == "/sys/fs/cgroup/memory/process_api/763bc7aca0b2"
    assert dirs["cpu"] == dirs["cpuacct"] == "/sys/fs/cgroup/cpu,cpuacct"
    assert dirs["pids"] == "/sys/fs/cgroup/pids"


def test_layout_v2() -> None:
    layout = parse_layout(V2_MOUNTINFO)
    assert layout.version == 2
    assert caller_dirs(layout, parse_proc_cgroup("0::/\n")) == {UNIFIED: "/sys/fs/cgroup"}
    nested = caller_dirs(layout, parse_proc_cgroup("0::/a/b\n"))
    assert nested == {UNIFIED: "/sys/fs/cgroup/a/b"}


def test_layout_with_a_mount_root_strips_it() -> None:
    # a cgroup file system mounted from a sub-cgroup (as inside a container)
    text = "30 1 0:26 /lxc/c1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    layout = parse_layout(text)
    assert caller_dirs(layout, {"": "/lxc/c1/inner"}) == {UNIFIED: "/sys/fs/cgroup/inner"}


def test_no_cgroup_mount_is_unsupported_with_a_hint() -> None:
    with pytest.raises(UnsupportedError) as info:
        parse_layout("23 1 254:0 / / rw - ext4 /dev/vda rw\n")
    assert "mount -t cgroup2" in info.value.hint


@pytest.mark.parametrize(
    ("shares", "weight"),
    [(2, 1), (1024, 39), (262144, 10000), (512, 20), (0, 0)],
)
def test_shares_to_weight_matches_runc(shares: int, weight: int) -> None:
    assert shares_to_weight(shares) == weight


def test_cpu_list_round_trip() -> None:
    assert parse_cpu_list("0-3,6,8-9\n") == {0, 1, 2, 3, 6, 8, 9}
    assert format_cpu_list({0, 1, 2, 3, 6, 8, 9}) == "0-3,6,8-9"
    assert parse_cpu_list("") == frozenset()
    for bad in ("a", "3-1", "1-", "-1", "1,,2"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


def test_cpu_quota() -> None:
    assert cpu_quota_us(0.2) == 20_000
    assert cpu_quota_us(1.5) == 150_000
    assert cpu_quota_us(0.001) == 1_000


def test_io_max_line() -> None:
    assert io_max_line((7, 3), Limits()) is None
    limits = Limits(device_write_bps=1 << 20, device_read_iops=100)
    assert io_max_line((7, 3), limits) == "7:3 wbps=1048576 riops=100"
    full = Limits(device_read_bps=1, device_write_bps=2, device_read_iops=3, device_write_iops=4)
    assert io_max_line((259, 0), full) == "259:0 rbps=1 wbps=2 riops=3 wiops=4"


def test_blkio_throttle_lines() -> None:
    limits = Limits(device_write_bps=1 << 20, device_read_iops=50)
    assert blkio_throttles((7, 0), limits) == {
        "blkio.throttle.write_bps_device": "7:0 1048576",
        "blkio.throttle.read_iops_device": "7:0 50",
    }


def test_valid_limits_pass() -> None:
    check_limits(Limits(), HOST)
    check_limits(
        Limits(memory_bytes=64 << 20, cpus=2, cpu_shares=512, cpuset_cpus="0-1", pids_limit=-1),
        HOST,
    )


@pytest.mark.parametrize(
    ("limits", "words"),
    [
        (Limits(memory_bytes=1 << 20), "too small"),
        (Limits(memory_bytes=25 << 30), "exceeds this host's memory"),
        (Limits(cpus=3), "exceeds the 2 online CPUs"),
        (Limits(cpus=0), "too small"),
        (Limits(cpus=float("nan")), "too small"),
        (Limits(cpu_shares=1), "out of range"),
        (Limits(cpu_shares=300_000), "out of range"),
        (Limits(cpuset_cpus="2"), "not online: 2"),
        (Limits(cpuset_cpus="0-x"), "bad --cpuset-cpus"),
        (Limits(cpuset_cpus=""), "not online"),
        (Limits(device_write_bps=0), "--device-write-bps must be positive"),
    ],
)
def test_bad_limits_are_usage_errors(limits: Limits, words: str) -> None:
    with pytest.raises(UsageError) as info:
        check_limits(limits, HOST)
    assert words in info.value.message


def test_from_paths_round_trip_and_refusals() -> None:
    paths = {
        "memory": "/sys/fs/cgroup/memory/x/thinmgr/c1",
        "pids": "/sys/fs/cgroup/pids/thinmgr/c1",
    }
    cgroups = ContainerCgroups.from_paths(paths)
    assert cgroups.version == 1
    assert cgroups.name == "c1"
    assert cgroups.paths() == paths
    v2 = ContainerCgroups.from_paths({UNIFIED: "/sys/fs/cgroup/thinmgr/c2"})
    assert v2.version == 2
    assert any("not filtered" in w for w in v2.warnings())
    for bad in (
        {},
        {"memory": "/sys/fs/cgroup/memory/c1"},  # not under thinmgr/
        {"memory": "/sys/fs/cgroup/memory/thinmgr/../../c1"},
        {"memory": "/sys/fs/cgroup/memory/thinmgr/c1", "pids": "/sys/fs/cgroup/pids/thinmgr/c2"},
        {"bogus": "/sys/fs/cgroup/bogus/thinmgr/c1"},
        {"memory": "relative/thinmgr/c1"},
    ):
        with pytest.raises(UsageError):
            ContainerCgroups.from_paths(bad)


def test_create_rejects_bad_names_and_device_limits_without_a_device() -> None:
    with pytest.raises(UsageError):
        ContainerCgroups.create("../escape", Limits(), block_device=None)
    with pytest.raises(UsageError):
        ContainerCgroups.create("ok", Limits(device_read_bps=1), block_device=None)


def test_v2_parent_skips_cgroups_with_processes_of_their_own(tmp_path: Path) -> None:
    from thinmgr.runtime.cgroups import v2_parent

    root = tmp_path / "cg"
    scope = root / "user.slice" / "user-0.slice" / "session-1.scope"
    scope.mkdir(parents=True)
    (root / "cgroup.procs").write_text("1\n")
    (root / "user.slice" / "cgroup.procs").write_text("")
    (root / "user.slice" / "user-0.slice" / "cgroup.procs").write_text("")
    (scope / "cgroup.procs").write_text("4242\n4243\n")
    # A session scope holds the caller: nest in the nearest ancestor without processes.
    assert v2_parent(str(scope), str(root)) == str(root / "user.slice" / "user-0.slice")
    # A caller's cgroup without processes of its own (they live in a leaf below) is used.
    (scope / "cgroup.procs").write_text("")
    assert v2_parent(str(scope), str(root)) == str(scope)
    # The root cgroup is exempt from the no-internal-processes rule.
    assert v2_parent(str(root), str(root)) == str(root)
