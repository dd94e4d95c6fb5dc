#!/usr/bin/env bash
# Lab 1: namespaces by hand, then with thinmgr.
#
#   sudo bash lab.sh          (in the lab VM; any engine)
#
# First the kernel's own tools: `unshare` creates namespaces (and, with --fork, clones a child
# into the new pid namespace), `nsenter` joins them with setns(2). Then `thinmgr run` does the
# same for a container on a thin snapshot of a busybox image, and `thinmgr exec` joins a
# running one. Runs unattended (the qemu lab tier runs it); cleans up everything it made.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 77; }
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
work="$(mktemp -d "${TMPDIR:-/var/tmp}/lab1.XXXXXX")"
export THINMGR_HOME="$work/home"
pool="lab1-$$"
sleeper=""
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
expect() { # expect WHAT ACTUAL WANTED
    if [ "$2" != "$3" ]; then echo "unexpected $1: got '$2', wanted '$3'" >&2; exit 1; fi
    echo "ok: $1 = $2"
}

cleanup() {
    set +e
    [ -n "$sleeper" ] && pkill -KILL -P "$sleeper" 2>/dev/null && wait "$sleeper" 2>/dev/null
    thinmgr rm --force web >/dev/null 2>&1
    thinmgr image rm bb >/dev/null 2>&1
    thinmgr pool destroy "$pool" --force >/dev/null 2>&1
    rm -rf "$work"
}
trap cleanup EXIT

step "Every process lives in one namespace of each type: here are this shell's"
run ls -l /proc/$$/ns

step "unshare: a new UTS and pid namespace; --fork clones the command as the new pid 1"
out=$(unshare --uts --pid --fork --mount-proc sh -c 'hostname lab1-box; hostname; echo "pid=$$"')
echo "$out"
expect "hostname inside" "$(echo "$out" | sed -n 1p)" "lab1-box"
expect "pid inside" "$(echo "$out" | sed -n 2p)" "pid=1"
echo "the host's hostname is unchanged: $(hostname)"

step "A long-lived namespace set (uts, ipc, net, pid, mount), then setns into it with nsenter"
unshare --uts --ipc --net --pid --mount --fork --mount-proc sh -c 'hostname lab1-ns; exec sleep 300' &
sleeper=$!
for _ in $(seq 50); do
    target=$(pgrep -P "$sleeper" sleep || true)
    [ -n "$target" ] && break
    sleep 0.1
done
[ -n "$target" ] || { echo "the namespaced sleep did not start" >&2; exit 1; }
echo "the namespaced sleep is pid $target on the host"
run readlink /proc/$$/ns/net /proc/"$target"/ns/net
expect "hostname via setns" "$(nsenter -t "$target" -u hostname)" "lab1-ns"
# A new network namespace has only the loopback interface.
expect "interfaces in its netns" "$(nsenter -t "$target" -n cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' ')" "lo"
# Joining its pid namespace (and its /proc): the sleep is pid 1 there.
expect "pid 1 in its pid ns" "$(nsenter -t "$target" -p -m cat /proc/1/comm)" "sleep"
# A pid namespace's init ignores signals it has no handler for (SIGTERM included), so the
# sleep needs SIGKILL; unshare then exits with it.
kill -KILL "$target"; wait "$sleeper" 2>/dev/null || true; sleeper=""

step "The same with thinmgr: a pool, a busybox image built offline, a container"
run thinmgr pool create "$pool" --size 512M
bash "$repo/examples/lib/busybox-rootfs.sh" "$work/busybox.tar"
run thinmgr image import "$pool" bb "$work/busybox.tar"
run thinmgr run --rm --hostname box1 bb -- sh -c 'hostname; echo "pid $$"; ps; cat /proc/net/dev'
expect "hostname in the container" "$(thinmgr run --rm --hostname box1 bb -- hostname)" "box1"
# With the default init, thinmgr's reaper is pid 1 and the command pid 2.
expect "the command's pid" "$(thinmgr run --rm bb -- sh -c 'echo $$')" "2"
expect "exit status passes through" "$(thinmgr run --rm bb -- sh -c 'exit 7' || echo $?)" "7"

step "A detached container, joined with thinmgr exec (setns into its namespaces)"
run thinmgr run -d --name web --hostname web bb -- sleep 300
run thinmgr ps
expect "hostname via exec" "$(thinmgr exec web -- hostname)" "web"
run thinmgr exec web -- ps
pid=$(thinmgr --json ps | python3 -c 'import json,sys; print([c["pid"] for c in json.load(sys.stdin) if c["name"]=="web"][0])')
echo "its init is pid $pid on the host; its namespaces differ from ours:"
run readlink /proc/$$/ns/pid /proc/"$pid"/ns/pid
run thinmgr stop web
run thinmgr rm web
echo done
