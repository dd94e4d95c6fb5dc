#!/usr/bin/env bash
# Lab 2: cgroups — memory, CPU and block-I/O limits by hand (v2 files, or v1 where the host
# has v1), observed with real workloads, then the same limits through `thinmgr run`.
#
#   sudo bash lab.sh          (in the lab VM; any engine)
#
# Runs unattended (the qemu lab tier runs it); cleans up everything it made.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 77; }
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
work="$(mktemp -d "${TMPDIR:-/var/tmp}/lab2.XXXXXX")"
export THINMGR_HOME="$work/home"
pool="lab2-$$"
loopdev=""
made=()
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
now_ms() { date +%s%3N; }

cleanup() {
    set +e
    for cg in "${made[@]}"; do rmdir "$cg" 2>/dev/null; done
    [ -n "$loopdev" ] && losetup -d "$loopdev"
    thinmgr image rm bb >/dev/null 2>&1
    thinmgr pool destroy "$pool" --force >/dev/null 2>&1
    rm -rf "$work"
}
trap cleanup EXIT

step "Which cgroup version, and where this shell is"
run cat /proc/self/cgroup
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    version=2
    echo "cgroup v2 (unified): one tree at /sys/fs/cgroup; controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
else
    version=1
    echo "cgroup v1: one tree per controller under /sys/fs/cgroup/<controller>"
fi

# new_group NAME: makes the group(s) and echoes the v2 path (or nothing on v1)
v2_parent=/sys/fs/cgroup
if [ "$version" = 2 ]; then
    # Controllers must be enabled in the parent's subtree_control for a child to have them.
    for c in memory cpu io pids; do
        echo "+$c" >"$v2_parent/cgroup.subtree_control" 2>/dev/null || true
    done
fi
join_and_run() { # join_and_run GROUP-PATHS... -- COMMAND...: runs COMMAND inside the groups
    local groups=()
    while [ "$1" != -- ]; do groups+=("$1"); shift; done
    shift
    sh -c 'for g in "$@"; do case "$g" in --) break ;; esac; echo $$ >"$g/cgroup.procs"; done; while [ "$1" != -- ]; do shift; done; shift; exec "$@"' \
        sh "${groups[@]}" -- "$@"
}

step "Memory: a 32 MiB limit, and a process that wants 64 MiB is OOM-killed"
if [ "$version" = 2 ]; then
    mem="$v2_parent/lab2-mem-$$"; mkdir "$mem"; made+=("$mem")
    run sh -c "echo 32M >$mem/memory.max; echo 0 >$mem/memory.swap.max 2>/dev/null || true"
else
    mem="/sys/fs/cgroup/memory/lab2-mem-$$"; mkdir "$mem"; made+=("$mem")
    run sh -c "echo 32M >$mem/memory.limit_in_bytes"
    [ -f "$mem/memory.memsw.limit_in_bytes" ] && echo 32M >"$mem/memory.memsw.limit_in_bytes"
fi
status=0
join_and_run "$mem" -- dd if=/dev/zero of=/dev/null bs=64M count=1 2>/dev/null || status=$?
echo "dd with a 64 MiB buffer exited $status (137 = killed by SIGKILL, the OOM killer)"
[ "$status" = 137 ] || { echo "expected an OOM kill" >&2; exit 1; }
if [ "$version" = 2 ]; then run grep oom_kill "$mem/memory.events"; else run grep oom_kill "$mem/memory.oom_control"; fi
join_and_run "$mem" -- dd if=/dev/zero of=/dev/null bs=8M count=4 2>/dev/null && echo "an 8 MiB buffer fits: exit 0"

step "CPU: a quota of 20% of one CPU, and a busy loop for 2 seconds"
if [ "$version" = 2 ]; then
    cpu="$v2_parent/lab2-cpu-$$"; mkdir "$cpu"; made+=("$cpu")
    run sh -c "echo '20000 100000' >$cpu/cpu.max"
    join_and_run "$cpu" -- timeout 2 sh -c 'while :; do :; done' || true
    used_us=$(awk '/^usage_usec/ {print $2}' "$cpu/cpu.stat")
    throttled=$(awk '/^nr_throttled/ {print $2}' "$cpu/cpu.stat")
else
    cpu="/sys/fs/cgroup/cpu,cpuacct/lab2-cpu-$$"; [ -d /sys/fs/cgroup/cpu,cpuacct ] || cpu="/sys/fs/cgroup/cpu/lab2-cpu-$$"
    mkdir "$cpu"; made+=("$cpu")
    acct="$cpu" # cpu and cpuacct share a hierarchy on most hosts; where not, a second group
    if [ ! -f "$cpu/cpuacct.usage" ]; then
        acct="/sys/fs/cgroup/cpuacct/lab2-cpu-$$"; mkdir "$acct"; made+=("$acct")
    fi
    run sh -c "echo 100000 >$cpu/cpu.cfs_period_us; echo 20000 >$cpu/cpu.cfs_quota_us"
    join_and_run "$cpu" "$acct" -- timeout 2 sh -c 'while :; do :; done' || true
    used_us=$(( $(cat "$acct/cpuacct.usage") / 1000 ))
    throttled=$(awk '/^nr_throttled/ {print $2}' "$cpu/cpu.stat")
fi
echo "CPU time used in 2 s of wall time: $((used_us / 1000)) ms (about 400 ms expected), throttled $throttled times"
[ "$used_us" -gt 0 ] && [ "$used_us" -lt 1200000 ] || { echo "the quota did not hold" >&2; exit 1; }

step "Block I/O: 1 MiB/s of writes to one loop device, and 2 MiB of direct writes"
truncate -s 64M "$work/disk.img"
loopdev=$(losetup --find --show "$work/disk.img")
majmin=$(lsblk -dno MAJ:MIN "$loopdev" | tr -d ' ')
if [ "$version" = 2 ]; then
    io="$v2_parent/lab2-io-$$"; mkdir "$io"; made+=("$io")
    run sh -c "echo '$majmin wbps=1048576' >$io/io.max"
    run cat "$io/io.max"
else
    io="/sys/fs/cgroup/blkio/lab2-io-$$"; mkdir "$io"; made+=("$io")
    run sh -c "echo '$majmin 1048576' >$io/blkio.throttle.write_bps_device"
    echo "note: v1 throttles only direct and fsync'd writes, not buffered writeback"
fi
t0=$(now_ms)
join_and_run "$io" -- dd if=/dev/zero of="$loopdev" bs=64K count=32 oflag=direct status=none
t1=$(now_ms)
echo "2 MiB with O_DIRECT took $((t1 - t0)) ms (unthrottled it takes a few ms)"
[ $((t1 - t0)) -ge 1500 ] || { echo "the throttle did not hold" >&2; exit 1; }
losetup -d "$loopdev"; loopdev=""

step "The same limits through thinmgr run (cgroups made for the container, removed after)"
run thinmgr pool create "$pool" --size 512M
bash "$repo/examples/lib/busybox-rootfs.sh" "$work/busybox.tar"
run thinmgr image import "$pool" bb "$work/busybox.tar"
status=0
thinmgr run --rm --memory 32m bb -- dd if=/dev/zero of=/dev/null bs=64M count=1 || status=$?
echo "thinmgr run --memory 32m, 64 MiB buffer: exit $status"
[ "$status" = 137 ] || { echo "expected 137" >&2; exit 1; }
run thinmgr run --rm --pids-limit 8 bb -- sh -c 'for i in 1 2 3 4 5 6 7 8 9 10; do sleep 5 & done 2>&1 | head -1; true'
t0=$(now_ms)
run thinmgr run --rm --device-write-bps 1m bb -- dd if=/dev/zero of=/data bs=64K count=32 oflag=direct
t1=$(now_ms)
echo "2 MiB of direct writes to the container's own volume at 1 MiB/s: $((t1 - t0)) ms"
[ $((t1 - t0)) -ge 1500 ] || { echo "the container's throttle did not hold" >&2; exit 1; }
echo done
