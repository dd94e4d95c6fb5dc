#!/usr/bin/env bash
# Snapshots of a container that is running and writing. The container's disk is a thin
# snapshot (ctr-NAME) mounted inside its own mount namespace; `thinmgr snapshot` reaches that
# mount through the container's /proc/PID/root, freezes the file system (FIFREEZE: dirty data
# flushed, new writes held), takes the O(1) snapshot and thaws it. `thinmgr commit` does the
# same to make an image layer. Both copies are clean file systems: e2fsck finds nothing.
#
#   sudo bash examples/live-container-snapshot.sh [HOME]   (default: a temporary home, removed at the end)
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "run as root (loop devices, FUSE, mount, namespaces)" >&2; exit 77; }
here=$(cd "$(dirname "$0")" && pwd)
if [ $# -ge 1 ]; then home="$1"; keep=1; else home="$(mktemp -d "${TMPDIR:-/var/tmp}/thinmgr-ex.XXXXXX")"; keep=0; fi
export THINMGR_HOME="$home"
pool="live$$"
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

cleanup() {
    set +e
    thinmgr rm --force app >/dev/null 2>&1
    thinmgr volume deactivate "$pool" app-snap >/dev/null 2>&1
    thinmgr pool destroy "$pool" --force >/dev/null 2>&1
    [ "$keep" = 1 ] || rm -rf "$home"
}
trap cleanup EXIT

thinmgr pool create "$pool" --size 1G
bash "$here/lib/busybox-rootfs.sh" "$home/busybox.tar.gz"
thinmgr image import "$pool" busybox "$home/busybox.tar.gz"

# The "application": appends a numbered record and rewrites a 256 KiB file in place, without
# pause. In place (conv=notrunc) matters on a thin pool: a file truncated and written again
# gets new blocks from ext4 each time, and without discard the pool never gets the old ones
# back, so an endless rewriter fills any pool (`thinmgr pool status` shows it coming).
step "A detached container that writes all the time" \
    thinmgr run --detach --name app busybox -- sh -c \
    'i=0; while :; do i=$((i + 1)); echo "record $i" >>/records; dd if=/dev/urandom of=/state bs=64k count=4 conv=notrunc 2>/dev/null; done'
sleep 1
step "Snapshot its disk while it runs" thinmgr snapshot "$pool" ctr-app app-snap
step "Commit it as an image while it runs" thinmgr commit app busybox:live
sleep 0.5
step "It kept writing" thinmgr exec app -- sh -c 'wc -l </records'

snap=$(thinmgr volume activate "$pool" app-snap)
step "The snapshot's file system is clean (a forced read-only check)" e2fsck -fn "$snap"
thinmgr volume deactivate "$pool" app-snap
step "So is the committed image: a container on it reads the records of that moment" \
    thinmgr run --rm busybox:live -- sh -c 'wc -l </records; tail -n 1 /records'
thinmgr stop app --time 1
thinmgr rm app
step "The snapshot and the new layer share the blocks the writer did not rewrite since" \
    thinmgr image tree "$pool"
